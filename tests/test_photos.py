"""Photos as devices write them (beyond.photos) and folders as people fill them: every image
read upright and in RGB, what cannot be read named once and left out, links, hidden entries,
twin names, names that are not UTF-8."""
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from beyond import UserError, checkpoints, cli, datasets, folders, photos, progress, runs

from conftest import add_junk, run_cli, sideways, write_folder


# ---------------------------------------------------------------- photos as devices write them
def test_image_modes_load_as_rgb(tmp_path):
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    for mode in ("L", "P", "RGBA", "CMYK"):
        img.convert(mode).save(tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    for path in tmp_path.iterdir():
        assert photos.load_rgb(str(path)).mode == "RGB"


def test_unreadable_and_huge_images_are_named(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(UserError, match="cut.png"):
        photos.load_rgb(str(tmp_path / "cut.png"))
    # a text chunk too large to decompress, after the PNG's header
    png = (tmp_path / "ok.png").read_bytes()
    text = b"zTXt" + b"Comment\0\0" + zlib.compress(bytes(2 << 20))
    (tmp_path / "text.png").write_bytes(png[:33] + struct.pack(">I", len(text) - 4) + text
                                        + struct.pack(">I", zlib.crc32(text)) + png[33:])
    (tmp_path / "head.ppm").write_bytes(b"P6\n64 4X\n255\n" + bytes(100))
    for name in ("text.png", "head.ppm"):  # PIL raises ValueError for these, not OSError
        for read in (photos.load_rgb, photos.image_size):
            with pytest.raises(UserError, match=f"^cannot read image .*{name} .*; "
                                                "delete or replace that file"):
                read(str(tmp_path / name))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for read in (photos.load_rgb, photos.image_size):  # the cache's size estimate reads headers too
        with pytest.raises(UserError, match="ok.png"):
            read(str(tmp_path / "ok.png"))


def test_every_reader_turns_photos_upright_and_scales_16_bits(tmp_path):
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8))
    sideways(upright, tmp_path / "sideways.png")
    grey = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "scan16.png")  # 16 bits a pixel
    assert Image.open(tmp_path / "scan16.png").mode == "I;16"
    Image.fromarray(grey).save(tmp_path / "scan8.png")
    upright.save(tmp_path / "anim.gif")
    for name in ("web.JFIF", "cam.jpe"):  # JPEG's other names, found too
        upright.save(tmp_path / name, format="JPEG")
    assert np.array_equal(np.asarray(photos.load_rgb(str(tmp_path / "sideways.png"))),
                          np.asarray(upright))
    assert np.array_equal(np.asarray(photos.load_rgb(str(tmp_path / "scan16.png"))),
                          np.asarray(photos.load_rgb(str(tmp_path / "scan8.png"))))
    assert photos.load_rgb(str(tmp_path / "anim.gif")).size == (40, 60)
    assert photos.image_files(str(tmp_path)) == [
        str(tmp_path / n) for n in ("anim.gif", "cam.jpe", "scan16.png", "scan8.png",
                                    "sideways.png", "web.JFIF")]


def test_avif_photos_are_found_and_read(tmp_path):
    """AVIF, as phones and the web now write it, where this Pillow reads it (11.3 and later)."""
    from PIL import features
    if not features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    Image.new("RGB", (40, 60), (200, 30, 30)).save(tmp_path / "phone.AVIF")
    assert photos.image_files(str(tmp_path)) == [str(tmp_path / "phone.AVIF")]
    assert photos.load_rgb(str(tmp_path / "phone.AVIF")).size == (40, 60)


def test_a_float_photos_nan_or_infinity_is_black_and_sets_no_scale(tmp_path, recwarn):
    pixels = np.random.default_rng(0).random((20, 30), dtype=np.float32)
    Image.fromarray(pixels).save(tmp_path / "whole.tif")
    pixels[0, :3] = np.nan, np.inf, -np.inf
    Image.fromarray(pixels).save(tmp_path / "holes.tif")
    whole, holes = (np.asarray(photos.load_rgb(str(tmp_path / f"{n}.tif")))
                    for n in ("whole", "holes"))
    assert not holes[0, :3].any() and np.array_equal(holes[1:], whole[1:]) and whole.mean() > 100
    assert not recwarn.list  # no cast of NaN to a byte


def test_sideways_and_16_bit_photos_predict_as_their_twins(tmp_path, capsys):
    """A net trained on upright 8-bit photos (decoded once, so the cache turns them too) gives
    the same predictions for the same photos stored sideways, and for a 16-bit twin."""
    root = write_folder(tmp_path / "d", train=3, test=2, size=(48, 32))
    photo = Image.open(tmp_path / "d" / "test" / "hotdog" / "0.png")
    sideways(photo, tmp_path / "d" / "train" / "hotdog" / "turned.png")
    train_set, _ = datasets.image_folders(root)
    turned = [i for i, (p, _) in enumerate(train_set.samples) if p.endswith("turned.png")][0]
    assert torch.equal(train_set.image(turned), v2.functional.pil_to_tensor(photo))
    status, _, _ = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                           "--batch-size", 4, "--workers", 0, "--out", tmp_path / "run")
    grey = np.asarray(photo.convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    sideways(photo, tmp_path / "turned.png")
    photo.save(tmp_path / "upright.png")
    twins = (tmp_path / f"{n}.png" for n in ("upright", "turned", "grey8", "grey16"))
    status, out, err = run_cli(capsys, "--predict", *twins,
                               "--model", tmp_path / "run" / "model.pt", "--out", tmp_path / "pred")
    probs = [line.rsplit(" ", 2)[1:] for line in out.splitlines()]
    assert status == 0 and len(probs) == 4, err
    assert probs[0] == probs[1] and probs[2] == probs[3]


def test_numbers_and_very_large_photos(folder, tmp_path, capsys, monkeypatch, scratch_run):
    with pytest.raises(SystemExit):
        cli.parse_args(["--scratch", "--workers", "-1"])
    assert "--workers: give a whole number, 0 or more, not -1" in capsys.readouterr().err
    # restored after the test
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    photo = os.path.join(folder, "test", "hotdog", "0.png")  # 40 x 48 pixels
    status, out, err = run_cli(capsys, "--predict", photo, "--model", scratch_run[0] / "model.pt",
                               "--out", tmp_path, "--max-megapixels", 0.001, "--workers", 0)
    assert status == 1 and "--max-megapixels" in err and not out
    status, out, _ = run_cli(capsys, "--predict", photo, "--model", scratch_run[0] / "model.pt",
                             "--out", tmp_path, "--max-megapixels", 0.002)
    assert status == 0 and out.startswith(photo)


def test_a_runs_image_limit_is_its_own(folder, tmp_path):
    """max_megapixels holds for the call alone, and in the loader workers it forks; after it,
    the process reads images as before, the caller's own Image.open included."""
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(UserError,
                       match=r"none of the 8 images can be read.* with "
                             r"beyond.photos.megapixels_limit\(N\)\)$"):
        runs.train_runs("scratch", str(tmp_path / "run"), data_dir=folder, max_megapixels=0.001,
                        workers=0)
    assert Image.MAX_IMAGE_PIXELS == before
    Image.open(os.path.join(folder, "train", "hotdog", "0.png")).load()
    limits = type("Limits", (torch.utils.data.Dataset,),
                  dict(__len__=lambda self: 1, __getitem__=lambda self, i: Image.MAX_IMAGE_PIXELS))
    with photos.megapixels_limit(5):
        loader = torch.utils.data.DataLoader(limits(), num_workers=1)
        assert list(loader) == [torch.tensor([5 * 10**6])]
    assert Image.MAX_IMAGE_PIXELS == before


# ------------------------------------------------------- what cannot be read: named once, left out
def test_what_cannot_be_read_is_named_once_with_what_to_do(tmp_path, capsys):
    root = write_folder(tmp_path / "d", train=3, test=2)
    heic = tmp_path / "d" / "train" / "hotdog" / "IMG_0001.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic not decodable")
    (tmp_path / "d" / "train" / "hotdog" / "broken.png").write_bytes(b"\x89PNG broken")
    for cache_budget in (None, 0):
        train_set, _ = datasets.image_folders(root, cache_budget)
        assert len(train_set) == 6
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: left out 2 file(s)")]
    assert len(notes) == 2 and "IMG_0001.heic" in notes[0] and "pip install pillow-heif" in notes[0]


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_a_truncated_image_is_left_out_with_a_note(cache, tmp_path, capsys):
    root = write_folder(tmp_path / "d", train=3, test=1)
    rng = np.random.default_rng(0)
    cut = tmp_path / "d" / "train" / "hotdog" / "cut.png"
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:20000])  # the header whole, the pixels cut short
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                               "--batch-size", 4, "--workers", 0, *cache, "--out", tmp_path / "out")
    assert status == 0 and "epoch 1:" in out, err
    assert "note: left out" in err and "cut.png" in err


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_a_test_image_cut_short_is_left_out_never_counted_twice(cache, tmp_path, capsys):
    """In training another image of its class stands in for one that cannot be read; a test set
    is decoded once before training, with the cache or without, so that none counts twice."""
    root = write_folder(tmp_path / "d", train=3, test=2)
    cut = tmp_path / "d" / "test" / "hotdog" / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
                    ).save(cut)
    cut.write_bytes(cut.read_bytes()[:20000])  # the header whole, the pixels cut short
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                               "--batch-size", 4, "--workers", 0, *cache, "--out", tmp_path / "out")
    assert status == 0 and "testing on 4 in test/" in out and "cut.png" in err, out + err
    with open(tmp_path / "out" / "metrics.json") as f:
        assert json.load(f)["per_class"]["hotdog"]["count"] == 2


def test_a_test_image_gone_bad_midway_stops_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    """Without the cache, a test set is read each epoch: an image that cannot be read since is not
    stood in for by another (which would count twice); the run stops, its last epoch kept."""
    root = write_folder(tmp_path / "d", train=3, test=2)
    real = progress.show_epoch

    def cut_after_1(history, *a, **k):
        real(history, *a, **k)
        (tmp_path / "d" / "test" / "hotdog" / "0.png").write_bytes(b"cut")
    monkeypatch.setattr(progress, "show_epoch", cut_after_1)
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 2,
                               "--batch-size", 4, "--workers", 0, "--no-cache",
                               "--out", tmp_path / "out")
    assert status == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / 'd' / 'test' / 'hotdog' / '0.png'}, an image the run tests on, cannot "
        "be read now; put it back as it was, then continue the run"], err
    assert len(torch.load(tmp_path / "out" / "model.pt", weights_only=True)["history"]) == 1


def test_an_image_cut_short_is_named_once_by_all_loader_workers(tmp_path, capfd):
    """With --no-cache each worker process reads some of the images, every epoch: the note that
    leaves a file out is said once, whichever worker meets it, however often (capfd: the
    workers write to the process's stderr, not to pytest's sys.stderr)."""
    root = write_folder(tmp_path / "d", train=3, test=2)
    cut = tmp_path / "d" / "train" / "hotdog" / "cut.png"
    pixels = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(cut)
    cut.write_bytes(cut.read_bytes()[:20000])
    status, out, err = run_cli(capfd, "--scratch", "--data-dir", root, "--epochs", 3,
                               "--batch-size", 4, "--workers", 2,
                               "--no-cache", "--out", tmp_path / "out")
    assert status == 0 and "epoch 3:" in out, err
    assert len([line for line in err.splitlines() if line.startswith("note: left out")
                and "cut.png" in line]) == 1, err


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_a_class_whose_only_training_image_is_cut_short_is_refused(cache, tmp_path, capsys):
    """The header is whole, so the image is found; its pixels are not, so it is left out, where
    it is decoded (once, or in the epoch that meets it): then hotdog has no image to learn from."""
    root = write_folder(tmp_path / "d", train=6, test=2)
    for path in (tmp_path / "d" / "train" / "hotdog").iterdir():
        path.unlink()
    cut = tmp_path / "d" / "train" / "hotdog" / "cut.png"
    pixels = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(cut)
    cut.write_bytes(cut.read_bytes()[:20000])
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                               "--batch-size", 4, "--workers", 0, "--class-weights", "balanced",
                               *cache, "--out", tmp_path / "out")
    error = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert (status == 2 and len(error) == 1 and "hotdog" in error[0]
            and "can be read" in error[0]), err
    assert "epoch 1:" not in out and not (tmp_path / "out" / "metrics.json").exists()


def test_a_class_no_loader_worker_can_read_is_one_line_from_python_too(tmp_path):
    """Every image of a class cut short after a whole header: the worker that finds none left
    raises a UserError, which the DataLoader raises again with the worker's traceback as its
    message; the caller gets the worker's one line."""
    root = write_folder(tmp_path / "d", train=2, test=1)
    for path in (tmp_path / "d" / "train" / "hotdog").iterdir():
        path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError) as e:
        runs.train_runs("scratch", str(tmp_path / "run"), data_dir=root, epochs=1, batch_size=4,
                        workers=1, cache_gb=0)
    assert str(e.value) == ("no image of class hotdog can be read now; put readable images in its "
                            "folder")


def test_a_class_with_no_readable_image_is_refused_with_its_first_files_fix(tmp_path, capsys):
    """...an iPhone's HEIC photos, say: the plugin to install."""
    root = write_folder(tmp_path / "d", train=2, test=1)
    for split in ("train", "test"):
        os.makedirs(tmp_path / "d" / split / "pizza")
        (tmp_path / "d" / split / "pizza" / "IMG_0.HEIC").write_bytes(b"\0\0\0\x18ftypheic no")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--out", tmp_path / "out")
    last = err.strip().splitlines()[-1]
    assert (status == 2 and "train/pizza holds no image that can be read; the first: cannot read "
            "image" in last and last.endswith("; install the HEIC plugin: pip install pillow-heif"))


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_a_class_whose_held_out_images_cannot_be_decoded_is_said_so(cache, tmp_path, capsys):
    """Class folders alone: the split is drawn from the images whose headers read; where all held
    out of a class are cut short, the error says so, not that the class has no readable image."""
    root = tmp_path / "d"
    for name, colour in (("a", 0), ("b", 200)):
        os.makedirs(root / name)
        for i in range(3):
            Image.new("RGB", (40, 48), (colour, i, 0)).save(root / name / f"{i}.png")
    held = folders.split_by_class(str(root), 0.2, 0)[1].held_out
    for path in held:
        if path.startswith("a"):  # the header whole, the pixels cut short
            noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
            Image.fromarray(noise).save(root / path)
            (root / path).write_bytes((root / path).read_bytes()[:20000])
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                             "--batch-size", 4, "--workers", 0, *cache, "--out", tmp_path / "out")
    assert status == 2 and err.strip().splitlines()[-1] == (
        f"error: {root / 'a'}: the images held out of it for testing cannot be read (noted above); "
        "replace them with whole copies (a new run may instead delete them, and hold out "
        "others)"), err


# ---------------------------------------------------------------- folders as people fill them
def test_non_image_files_are_skipped(tmp_path):
    root = write_folder(tmp_path)
    (tmp_path / "train" / "hotdog" / "notes.txt").write_text("not an image")
    assert len(datasets.image_folders(root)[0]) == 8


def test_hidden_entries_are_never_classes_or_images(tmp_path, capsys):
    root = tmp_path / "d"
    write_folder(root, train=3, test=2)
    add_junk(root)
    for cache_budget in (None, 0):
        train_set, test_set = datasets.image_folders(root, cache_budget)
        assert train_set.classes == test_set.classes == ["hotdog", "not-hotdog"]
        assert len(train_set) == 6 and len(test_set) == 4
        assert not any("/." in p
                       or "__MACOSX" in p for p, _ in train_set.samples + test_set.samples)
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                               "--batch-size", 4, "--workers", 0, "--out", tmp_path / "out")
    assert status == 0, err
    assert (".ipynb" not in out
            and len(json.load(open(tmp_path / "out" / "metrics.json"))["confusion"]) == 2)


def test_links_are_followed_but_no_folder_twice_and_system_entries_ignored(tmp_path, capsys):
    root = write_folder(tmp_path / "d", train=2, test=1)
    hotdog = tmp_path / "d" / "train" / "hotdog"
    os.symlink(hotdog, hotdog / "loop")  # a link back to its own folder
    os.symlink(hotdog / "0.png", hotdog / "link-to-0.png")  # the same file again
    os.symlink(hotdog / "1.png", hotdog / "0-link-to-1.png")  # named first: 1.png is kept
    write_folder(tmp_path / "elsewhere", train=1, test=0)
    # a linked folder outside the data
    os.symlink(tmp_path / "elsewhere" / "train" / "hotdog", hotdog / "more")
    os.makedirs(tmp_path / "d" / "train" / "@eaDir")  # Synology's thumbnails
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / "@eaDir" / "thumb.png")
    (hotdog / "Thumbs.db").write_bytes(b"junk")
    (hotdog / "desktop.ini").write_text("[.ShellClassInfo]")
    train_set, _ = datasets.image_folders(root)
    assert train_set.classes == ["hotdog", "not-hotdog"]
    assert not photos.ignored("@home")  # a class of one's own, not a NAS box's folder
    assert sorted(os.path.relpath(p, hotdog) for p, _ in train_set.samples if "/hotdog/" in p) \
        == ["0.png", "1.png", "more/0.png"]
    folder = tmp_path / "photos"
    os.makedirs(folder)
    os.symlink(hotdog, folder / "linked")  # --predict follows linked folders too
    assert sorted(map(os.path.basename, photos.image_paths([str(folder), str(folder / "linked"),
                                                            str(hotdog / "0.png")]))) \
        == ["0.png", "0.png",
            "1.png"]  # each file once (elsewhere's 0.png too), however often it is named
    own = os.path.realpath(hotdog / "0.png")  # its own name, given after a linked folder's
    assert photos.once([str(folder / "linked" / "0.png"), own]) == [own]


def test_a_link_back_up_labels_each_image_once_by_its_own_folder(tmp_path, capsys):
    root = write_folder(tmp_path / "d", train=2, test=1)
    os.symlink("..", tmp_path / "d" / "train" / "hotdog" / "loop")  # hotdog/loop/not-hotdog/...
    (tmp_path / "d" / "train" / "not-hotdog" / "broken.png").write_bytes(b"\x89PNG broken")
    train_set, _ = datasets.image_folders(root)
    assert len({os.path.realpath(p) for p, _ in train_set.samples}) == len(train_set) == 4
    for path, target in train_set.samples:
        folder_name = os.path.basename(os.path.dirname(os.path.realpath(path)))
        assert folder_name == train_set.classes[target], path
    notes = [line for line in capsys.readouterr().err.splitlines() if "left out" in line]
    assert len(notes) == 1 and "left out 1 file(s)" in notes[0]


def test_a_link_never_brings_in_another_splits_or_classs_images(tmp_path, capsys):
    """A link back up from train/hotdog reaches test/ and train/not-hotdog: each image stays in
    the split and class whose folder holds it. A class folder that is a link to another class's
    folder, or to a folder elsewhere in the data folder, is one line."""
    root = write_folder(tmp_path / "d", train=4, test=2)
    os.symlink("../..", tmp_path / "d" / "train" / "hotdog" / "up")
    argv = ["--data-dir", root, "--epochs", 1, "--batch-size", 4, "--workers", 0,
            "--out", tmp_path / "out"]
    status, out, err = run_cli(capsys, "--scratch", *argv)
    assert status == 0 and "training on 8 images, testing on 4 in test/" in out, err
    for split, folder in zip(("train", "test"), datasets.image_folders(root)):
        for path, target in folder.samples:
            assert (os.path.dirname(os.path.realpath(path))
                    == str(tmp_path / "d" / split / folder.classes[target]))
    os.symlink("test", tmp_path / "d" / "val")  # val/hotdog is test/hotdog
    with pytest.raises(UserError, match="val/hotdog is a link to .*test/hotdog"):
        datasets.image_folders(root)
    os.remove(tmp_path / "d" / "val")
    shutil.rmtree(tmp_path / "d" / "train" / "not-hotdog")
    os.symlink("hotdog", tmp_path / "d" / "train" / "not-hotdog")
    status, _, err = run_cli(capsys, "--scratch", *argv)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "train/not-hotdog is a link to" in err and "a folder of its own" in err


def test_a_link_that_loops_is_no_folder(tmp_path):
    """A link to itself, beside the splits or the classes, is neither a folder nor an image (the
    folder's listing raised ELOOP), in both layouts."""
    write_folder(tmp_path / "d", train=2, test=1)
    for where in ("d/loop", "d/train/loop.png", "d/test/loop"):
        os.symlink(os.path.basename(where), tmp_path / where)
    for root in (tmp_path / "d", tmp_path / "d" / "train"):  # class folders alone: split
        train_set, test_set = datasets.image_folders(str(root))
        assert train_set.classes == test_set.classes == ["hotdog", "not-hotdog"]
        assert len(train_set) + len(test_set) == (6 if root.name == "d" else 4)


def test_a_pipe_named_like_an_image_in_a_folder_is_skipped(tmp_path):
    """Opening a pipe no one writes to would wait for ever: in a folder, one named like an image is
    no image. Named on the command line (--predict <(curl ...)), it is read."""
    photo_dir = tmp_path / "photo_dir"
    photo_dir.mkdir()
    os.mkfifo(photo_dir / "x.png")
    Image.new("RGB", (8, 8)).save(photo_dir / "y.png")
    assert photos.image_files(str(photo_dir)) == [str(photo_dir / "y.png")]
    assert photos.image_paths([str(photo_dir / "x.png")]) == [str(photo_dir / "x.png")]


def test_class_names_from_a_mac_match_their_twins(tmp_path, capsys):
    import unicodedata
    root = write_folder(tmp_path / "d", train=2, test=1,
                        classes={"café": (200, 0, 0), "tea": (0, 0, 200)})
    os.rename(tmp_path / "d" / "test" / "café",
              tmp_path / "d" / "test" / unicodedata.normalize("NFD", "café"))
    train_set, test_set = datasets.image_folders(root)
    assert train_set.classes == ["café"] + ["tea"] and test_set.targets == [0, 1]
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                             "--batch-size", 4, "--workers", 0, "--out", tmp_path / "out")
    assert status == 0, err
    assert json.load(open(tmp_path / "out" / "metrics.json"))["classes"] == ["café", "tea"]


def test_twin_class_folders_are_one_class(tmp_path, capsys):
    """café written by a Mac (NFD) beside café written elsewhere (NFC): one class, both folders'
    images."""
    import unicodedata
    root = write_folder(tmp_path / "d", train=2, test=1,
                        classes={"café": (200, 0, 0), "tea": (0, 0, 200)})
    for split in ("train", "test"):
        twin = tmp_path / "d" / split / unicodedata.normalize("NFD", "café")
        os.makedirs(twin)
        Image.new("RGB", (40, 48), (200, 0, 0)).save(twin / "mac.png")
    train_set, test_set = datasets.image_folders(root)
    assert train_set.targets == [0, 0, 0, 1, 1] and test_set.targets == [0, 0, 1]
    assert [unicodedata.normalize("NFC", c) for c in train_set.classes] == ["café", "tea"]
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                             "--batch-size", 4, "--workers", 0, "--out", tmp_path / "out")
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert (status == 0 and len(metrics["classes"]) == 2
            and torch.tensor(metrics["confusion"]).sum() == 3), err


def test_names_that_are_not_utf8(folder, tmp_path, capsys, scratch_run):
    """Linux names are bytes: a photo whose name is not UTF-8 is predicted, shown with the odd
    byte escaped, and written to predictions.csv and held_out.txt as the disk has it; a class
    folder so named is refused in one line (tables, pictures and files show class names). So
    are control characters: a newline in a name is shown as \\n, never as a line of its own."""
    photo_dir = os.fsencode(tmp_path / "photo_dir")
    os.mkdir(photo_dir)
    shutil.copy(os.path.join(folder, "test", "hotdog", "0.png"), photo_dir + b"/bad\xff.png")
    status, out, err = run_cli(capsys, "--predict", os.fsdecode(photo_dir),
                               "--model", scratch_run[0], "--out", tmp_path, "--workers", 0)
    assert status == 0 and out.startswith(f"{tmp_path / 'photo_dir'}/bad\\xff.png: "), err
    assert photo_dir + b"/bad\xff.png," in (tmp_path / "predictions.csv").read_bytes()
    checkpoints.save(str(tmp_path), [], dict(held_out=[os.fsdecode(b"hotdog/bad\xff.png")]), {})
    assert (tmp_path / "held_out.txt").read_bytes() == b"hotdog/bad\xff.png\n"
    os.rename(photo_dir, photo_dir + b"/../not\xffhot")
    shutil.copytree(os.path.join(folder, "train", "hotdog"), tmp_path / "hotdog")
    with pytest.raises(UserError,
                       match=r"^the class folder .*/not\\xffhot has a name that is not UTF-8 text, "
                             r"or holds " r"a control character \(a newline, a tab\); rename it$"):
        datasets.image_folders(str(tmp_path))
    # a newline would print a line of its own
    os.rename(os.fsencode(tmp_path / "not") + b"\xffhot", tmp_path / "not\nhot")
    with pytest.raises(UserError,
                       match=r"^the class folder .*/not\\nhot has a name that is not UTF-8 text, "
                             r"or holds"):
        datasets.image_folders(str(tmp_path))
    os.mkdir(tmp_path / "more")
    shutil.copy(os.path.join(folder, "test", "hotdog", "0.png"),
                tmp_path / "more" / "two\nlines.png")
    status, out, err = run_cli(capsys, "--predict", tmp_path / "more", "--model", scratch_run[0],
                               "--out", tmp_path, "--workers", 0)
    assert (status == 0 and out.startswith(f"{tmp_path / 'more'}/two\\nlines.png: ")
            and len(out.splitlines()) == 1), out


def test_the_size_limit_named_is_the_one_set(tmp_path):
    photos.Image.new("RGB", (2000, 1000)).save(tmp_path / "big.png")
    for limit in (1, 0.5):  # PIL's warning at the limit, its error at twice it
        with photos.megapixels_limit(limit), pytest.raises(UserError) as e:
            photos.load_rgb(str(tmp_path / "big.png"))
        assert f"(2 megapixels, more than the limit of {limit:g}); raise the limit" in str(e.value)
