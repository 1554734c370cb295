"""Pictures (beyond.pictures): optional, drawn without changing the caller's matplotlib
backend; the samples, the mistakes, and a picture that cannot be written."""
import json
import os
import shutil
import sys

import pytest
import torch

import models
from beyond import datasets, loaders, pictures
from train import evaluate

from conftest import CPU, add_junk, full_disk, run_cli, write_folder


def test_pictures_are_optional(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    assert pictures.curves({"run": [{"epoch": 1, "loss": 1, "train_acc": 0, "test_acc": 0}]},
                                 str(tmp_path / "curves.png")) is None
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "curves.png").exists()
    monkeypatch.setattr(datasets, "samples", lambda *a: pytest.fail("data read"))
    status, _, err = run_cli(capsys, "--show-samples", "--data-dir", tmp_path / "d",
                             "--out", tmp_path / "ss")  # its one picture: refused before the data
    assert status == 2 and err.strip() == ("error: --show-samples draws samples.png with "
                                           "matplotlib, which cannot be imported here; pip install "
                                           "matplotlib") and not (tmp_path / "ss").exists()


def test_pictures_keep_the_callers_backend(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        path = pictures.curves({"run": [{"epoch": 1, "loss": 1, "train_acc": 0, "test_acc": 0}]},
                               tmp_path / "curves.png")  # a pathlib.Path, as str
        assert matplotlib.get_backend() == "pdf" and open(path, "rb").read(4) == b"\x89PNG"
    finally:
        matplotlib.use(before)


def test_show_samples(folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")  # the pictures it checks
    status, out, _ = run_cli(capsys, "--show-samples", "--data-dir", folder, "--out", tmp_path)
    assert status == 0 and (tmp_path / "samples.png").stat().st_size > 0 and "samples.png" in out
    state = torch.get_rng_state()  # from Python, the caller's random numbers stay as they were
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("GPUs' seeded"))
    datasets.samples(folder, str(tmp_path / "again"))
    assert torch.equal(state, torch.get_rng_state())
    again = (tmp_path / "again" / "samples.png").read_bytes()
    assert again == (tmp_path / "samples.png").read_bytes()  # the same picture each time
    shutil.copytree(folder, tmp_path / "d")
    among = str(tmp_path / "d" / "train" / "hotdog")  # samples.png there would be trained on
    status, _, err = run_cli(capsys, "--show-samples", "--data-dir", tmp_path / "d", "--out", among)
    assert (status == 2 and f"--out {among} lies in" in err
            and not os.path.exists(os.path.join(among, "samples.png")))


def test_samples_refuse_what_they_cannot_read_in_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # without it, --show-samples is refused before the data
    for argv, message in ((["--data-dir", tmp_path / "missing"], "missing is not a folder"),
                          (["--data-dir", tmp_path, "--data-root", tmp_path],
                           "--data-root is where the hot-dog set and CIFAR-10 are downloaded, "
                           "and --data-dir")):
        status, _, err = run_cli(capsys, "--show-samples", *argv, "--out", tmp_path / "ss")
        assert status == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "ss").exists()


def test_hidden_entries_are_never_samples(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the picture it draws
    write_folder(tmp_path / "d", train=3, test=2)
    add_junk(tmp_path / "d")
    assert run_cli(capsys, "--show-samples", "--data-dir", tmp_path / "d",
                   "--out", tmp_path / "samples")[0] == 0


def test_mistakes_are_the_misclassified_images(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")  # the pictures it checks
    root = write_folder(tmp_path / "d", train=4, test=4)
    for name in ("0.png", "1.png"):  # swap two test images per class: some mistakes are certain
        a = tmp_path / "d" / "test" / "hotdog" / name
        b = tmp_path / "d" / "test" / "not-hotdog" / name
        a.rename(tmp_path / "swap.png"), b.rename(a), (tmp_path / "swap.png").rename(b)
    shown = {}
    real = pictures.grid
    monkeypatch.setattr(pictures, "grid", lambda rows, captions, path, scale: shown.update(
        images=sum(rows, []), captions=sum(captions, []), path=real(rows, captions, path, scale)))
    status, out, _ = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                             "--batch-size", 8, "--workers", 0, "--precision", "fp32",
                             "--out", tmp_path / "out")
    assert status == 0
    net = models.scratch_net(2)
    net.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True)["model"])
    _, test_set = datasets.image_folders(root)
    probs, labels = evaluate(net, loaders.make_loaders(test_set, test_set, 4)[1], CPU)
    wrong = (probs.argmax(1) != labels).nonzero().flatten().tolist()
    assert wrong and len(shown["images"]) == len(wrong)
    for image, i, caption in zip(shown["images"], wrong, shown["captions"]):
        assert torch.equal(image, test_set[i][0])
        assert caption.startswith(f"true {test_set.classes[labels[i]]}\npred "
                                  f"{test_set.classes[1 - labels[i]]}")
    assert os.path.getsize(shown["path"]) > 0 and shown["path"].endswith("mistakes.png")
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    confusion = torch.tensor(metrics["confusion"])
    assert confusion.sum() == 8 and confusion.trace() == 8 - len(wrong)
    assert 1 - len(wrong) / 8 == pytest.approx(metrics["test_acc"])
    assert "confusion of epoch 1, the one best.pt keeps (rows: true class" in out


def test_a_picture_that_cannot_be_written_loses_nothing_else(folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")  # the pictures it checks
    full_disk(monkeypatch, "curves.png", at_call=1)
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1,
                             "--batch-size", 8, "--workers", 0, "--out", tmp_path)
    assert status == 2 and err.strip().splitlines() == [
        f"error: cannot write {tmp_path / 'curves.png'} (No space left on device); free some space "
        "there, or write to another folder"]
    assert (json.load(open(tmp_path / "metrics.json"))["history"]
            and (tmp_path / "model.pt").exists())
    written = set(os.listdir(tmp_path))  # mistakes.png too, where the net made any
    assert ({"metrics.json", "model.pt"} <= written
            and not {"curves.png", "curves.png.part"} & written)
