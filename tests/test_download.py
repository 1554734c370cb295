"""The hot-dog set's download (data.get_hotdog, beyond.download): verified, extracted once,
and nothing half-done left behind; CIFAR-10's offline."""
import errno
import hashlib
import io
import os
import sys
import zipfile

import pytest
import torchvision
from PIL import Image

import data
from beyond import UserError, datasets, download

from conftest import run_cli


def make_zip(tmp_path, names=("hotdog/train/hotdog/0.png", "hotdog/test/hotdog/0.png")):
    buf = io.BytesIO()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with zipfile.ZipFile(buf, "w") as z:
        for name in names:
            z.writestr(name, png.getvalue())
    return buf.getvalue()


def test_download_verify_extract_once(tmp_path, server):
    url, files, requests = server
    body = make_zip(tmp_path)
    files["/hotdog.zip"] = (body, len(body))
    sha1 = hashlib.sha1(body).hexdigest()
    folder = data.get_hotdog(str(tmp_path), url + "/hotdog.zip", sha1)
    assert os.path.isfile(os.path.join(folder, "train", "hotdog", "0.png"))
    assert data.get_hotdog(str(tmp_path), url + "/hotdog.zip", sha1) == folder
    assert requests == ["/hotdog.zip"]  # the second call did not download
    assert sorted(os.listdir(tmp_path)) == ["hotdog", "hotdog.zip"]


def test_checksum_mismatch_removes_the_file(tmp_path, server):
    url, files, _ = server
    files["/hotdog.zip"] = (b"junk", 4)
    with pytest.raises(UserError, match="wrong SHA-1 .* so it was removed"):
        data.get_hotdog(str(tmp_path), url + "/hotdog.zip", "0" * 40)
    assert os.listdir(tmp_path) == []
    # as the offline advice says: kept aside
    (tmp_path / "hotdog.zip").write_bytes(b"put here by hand")
    with pytest.raises(UserError, match="so it was moved to .*hotdog.zip.bad; run again"):
        data.get_hotdog(str(tmp_path), url + "/hotdog.zip", "0" * 40)
    assert os.listdir(tmp_path) == ["hotdog.zip.bad"]


def test_truncated_download_leaves_nothing(tmp_path, server):
    url, files, _ = server
    body = make_zip(tmp_path)
    files["/hotdog.zip"] = (body[:100], len(body))
    with pytest.raises(UserError, match="cannot download"):
        data.get_hotdog(str(tmp_path), url + "/hotdog.zip", hashlib.sha1(body).hexdigest())
    assert os.listdir(tmp_path) == []


def test_no_network_says_where_to_put_the_zip(tmp_path):
    with pytest.raises(UserError, match=r"put it at .*hotdog\.zip"):
        data.get_hotdog(str(tmp_path), "http://127.0.0.1:9/hotdog.zip", "0" * 40)
    with pytest.raises(UserError, match=r"^url=not a url is not a URL .*; give an http\(s\) URL"):
        data.get_hotdog(str(tmp_path), "not a url", "0" * 40)


def test_not_a_zip_and_escaping_paths_are_refused(tmp_path, server):
    url, files, _ = server
    for i, (body, message) in enumerate((
            (b"not a zip at all", "not a whole zip"),
            (make_zip(tmp_path, ["../evil.png"]), "outside the data root"),
            (make_zip(tmp_path, ["other/train/a/0.png"]), "holds nothing in a folder hotdog/"),
            (make_zip(tmp_path, ["hotdog/"]), "holds nothing in a folder hotdog/"))):
        root = tmp_path / str(i)
        files["/hotdog.zip"] = (body, len(body))
        with pytest.raises(UserError, match=message):
            data.get_hotdog(str(root), url + "/hotdog.zip", hashlib.sha1(body).hexdigest())
        assert not os.path.exists(root / "hotdog") and not os.path.exists(tmp_path / "evil.png")


def test_interrupted_extraction_is_redone(tmp_path, server):
    url, files, _ = server
    body = make_zip(tmp_path)
    files["/hotdog.zip"] = (body, len(body))
    os.makedirs(tmp_path / "hotdog.part" / "train")  # what a killed run leaves
    folder = data.get_hotdog(str(tmp_path), url + "/hotdog.zip", hashlib.sha1(body).hexdigest())
    assert os.path.isfile(os.path.join(folder, "test", "hotdog", "0.png"))
    assert not os.path.exists(tmp_path / "hotdog.part")


def test_a_full_disk_while_extracting_is_one_line(tmp_path, server, monkeypatch):
    url, files, _ = server
    body = make_zip(tmp_path)
    files["/hotdog.zip"] = (body, len(body))
    monkeypatch.setattr(zipfile.ZipFile, "extract",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC,
                                                                      "No space left on device")))
    with pytest.raises(UserError,
                       match=r"cannot extract .*hotdog\.zip .*\(No space left on device\); free "
                             r"some space"):
        data.get_hotdog(str(tmp_path), url + "/hotdog.zip", hashlib.sha1(body).hexdigest())
    assert not os.path.exists(tmp_path / "hotdog.part") and not os.path.exists(tmp_path / "hotdog")


def test_download_progress_on_a_terminal_only(tmp_path, server, capsys, monkeypatch):
    url, files, _ = server
    body = make_zip(tmp_path) * 2
    files["/hotdog.zip"] = (body, len(body))
    download.download(url + "/hotdog.zip", str(tmp_path / "quiet.zip"))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    download.download(url + "/hotdog.zip", str(tmp_path / "hotdog.zip"),
                      hashlib.sha1(body).hexdigest())
    err = capsys.readouterr().err
    assert "\r  hotdog.zip: 0.0 of 0.0 MB" in err and err.endswith("\r\033[K")


def test_downloads_offline_leave_no_folder_and_a_headless_arch_is_refused_first(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(UserError, match="cannot download"):
        datasets.cifar10(str(tmp_path / "new" / "root"))
    assert not (tmp_path / "new").exists()
    os.makedirs(tmp_path / "cut" / "cifar-10-batches-py")  # torchvision extracts in place
    with pytest.raises(UserError, match="cifar-10-batches-py lacks some of CIFAR-10's files"):
        datasets.cifar10(str(tmp_path / "cut"))
    monkeypatch.setattr(datasets, "download", lambda url, path: open(path, "w").close())
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: None)  # a proxy's
    with pytest.raises(UserError, match=r"cifar-10-python.tar.gz is not CIFAR-10's archive "
                                        r"\(Dataset not found or corrupted"):  # page, say
        datasets.cifar10(str(tmp_path))
    status, _, err = run_cli(capsys, "--scratch", "--arch", "squeezenet1_0",
                             "--data-dir", tmp_path / "nowhere")
    assert status == 2 and "SqueezeNet does not end in a Linear layer" in err and "--arch" in err
