"""Data folders (beyond.folders, beyond.datasets, beyond.cache): their layouts, a folder of
class folders split by class, the decoded-image cache, and the data sets that are not folders."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

import data
from beyond import UserError, cache, checkpoints, cli, datasets, folders, photos

from conftest import class_folders_alone, run_cli, write_folder


# ---------------------------------------------------------------- layouts
@pytest.mark.parametrize("name", ["val", "valid", "validation"])
def test_val_folder_when_there_is_no_test_folder(name, tmp_path, capsys):
    root = tmp_path / "d"
    write_folder(root, train=2, test=3)
    os.rename(root / "test", root / name)
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                               "--batch-size", 4, "--workers", 0, "--out", tmp_path / "out")
    assert status == 0, err
    assert f"testing on 6 in {name}/" in out
    assert torch.tensor(json.load(open(tmp_path / "out" / "metrics.json"))["confusion"]).sum() == 6


def test_the_hot_dog_class_is_the_one_named_like_hot_dog():
    assert [folders.hotdog_class(c)
            for c in (["apple", "Hot_Dog"], ["HOTDOG", "x"], ["a", "hot dogs"])] == [1, 0, 1]
    for classes, found in ((["pizza", "salad"], "no"), (["hotdog", "Hot_Dogs", "x"], "2")):
        with pytest.raises(UserError, match=f"^{found} classes of .* are named like hot dog"):
            folders.hotdog_class(classes)


def test_train_and_class_folders_together_is_one_line(tmp_path, capsys):
    """With train/ and test/ the book's layout is plain, and any other folder is left unused (and
    said so); train/ beside class folders, with no test/ or val/, is ambiguous."""
    root = write_folder(tmp_path / "d", train=2, test=1)
    os.makedirs(tmp_path / "d" / "predict" / "x")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "predict" / "x" / "0.png")
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                               "--batch-size", 4, "--workers", 0, "--out", tmp_path / "out")
    assert status == 0 and "testing on 2 in test/ (predict/ left unused)" in out, err
    shutil.rmtree(tmp_path / "d" / "test")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--out", tmp_path / "out2")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "holds both ['train'] and class folders ['predict']" in err
    with pytest.raises(SystemExit):
        cli.parse_args(["--scratch", "--val-split", "1"])


def test_a_runs_folder_inside_the_data_is_never_read_as_data(tmp_path, capsys):
    """--out among the class folders would be a class (and its pictures images): one line, and
    nothing left behind; beside train/ and test/ it is a folder left unused, as any other."""
    root = class_folders_alone(tmp_path / "photos", counts=(4, 4))
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                             "--batch-size", 4, "--workers", 0,
                             "--out", tmp_path / "photos" / "run2")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert (f"--out {tmp_path / 'photos' / 'run2'} lies in {root}" in err
            and "choose an --out outside it" in err)
    assert sorted(os.listdir(root)) == ["class0", "class1"]
    book = write_folder(tmp_path / "book", train=2, test=1)
    with pytest.raises(UserError, match="train, whose folders are read as classes"):
        datasets.image_folders(book, out=str(tmp_path / "book" / "train" / "run"))
    assert len(datasets.image_folders(book, out=str(tmp_path / "book" / "runs" / "run"))[0]) == 4


# ---------------------------------------------------------------- a folder of class folders, split
def test_class_folders_alone_are_split_by_class_reproducibly(tmp_path):
    root = class_folders_alone(tmp_path / "photos")
    train_set, test_set = datasets.image_folders(root, val_split=0.2, seed=0)
    held = lambda test: [sum(t == c for t in test.targets) for c in range(3)]
    # round(0.2 n), at least 1
    assert held(test_set) == [2, 1, 1] and len(train_set) + len(test_set) == 20
    assert not {p for p, _ in train_set.samples} & {p for p, _ in test_set.samples}
    assert test_set.transform is data.test_augs and train_set.transform is data.train_augs
    again = datasets.image_folders(root, val_split=0.2, seed=0)[1]
    other = datasets.image_folders(root, val_split=0.2, seed=1)[1]
    assert again.samples == test_set.samples and other.samples != test_set.samples
    assert datasets.image_folders(root, val_split=0.5)[1].targets.count(0) == 5
    reused = datasets.image_folders(root, held_out=test_set.held_out, seed=1)[1]
    assert reused.samples == test_set.samples  # a resumed run holds out what it held out before
    assert datasets.image_folders(root, seed=np.int64(1))[1].samples == other.samples
    for given, message in ((dict(val_split=5), "val_split=5 is not a number, between 0 and 1"),
                           (dict(seed=1.5), "seed=1.5 is not a whole number"),
                           (dict(data_dir=os.fsencode(root)),
                            "data_dir=b'.* is not a non-empty text"),
                           (dict(data_dir=None), "data_dir=None is not a folder; give the folder")):
        with pytest.raises(UserError, match="^" + message):  # by a run's rules, from Python too
            datasets.image_folders(**{"data_dir": root, **given})


def test_a_split_run_says_so_writes_the_split_and_resumes_it(tmp_path, capsys):
    root = class_folders_alone(tmp_path / "photos")
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                               "--batch-size", 4, "--workers", 0, "--val-split", 0.25, "--seed", 3,
                               "--out", tmp_path / "run")
    assert status == 0, err
    assert "training on 15 images, testing on 5 of 20 images, split 0.25 by class, seed 3" in out
    held_out = (tmp_path / "run" / "held_out.txt").read_text().splitlines()
    assert len(held_out) == 5 and all(os.path.exists(os.path.join(root, p)) for p in held_out)
    assert torch.tensor(json.load(open(tmp_path / "run" / "metrics.json"))["confusion"]).sum() == 5
    Image.new("RGB", (40, 48)).save(tmp_path / "photos" / "class0" / "new.png")  # the folder grows
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run" / "model.pt", "--epochs", 2)
    assert status == 0, err
    assert "training on 16 images, testing on 5 of 21 images" in out
    assert (tmp_path / "run" / "held_out.txt").read_text().splitlines() == held_out
    book = write_folder(tmp_path / "book", train=2, test=1,
                        classes={f"class{c}": (0, 0, 0) for c in range(3)})
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 3,
                             "--data-dir", book)
    # else tested on other images, and trained on some it held out
    assert status == 2 and ("was tested on images held out of class folders alone, and the data "
                            "folder now holds train/ and test/") in err, err
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", book, "--epochs", 1,
                             "--batch-size", 4, "--workers", 0, "--out", tmp_path / "run2")
    assert status == 0, err
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run2", "--epochs", 2,
                             "--data-dir", root)
    assert status == 2 and ("was tested on a test folder, and the data folder now holds class "
                            "folders alone") in err, err


def test_a_split_is_reused_only_from_a_run_that_began(tmp_path, capsys):
    """A run that stopped before its first epoch ended leaves no split behind: the next run on
    that folder splits as it is told. A begun run's split lives in its checkpoint."""
    root = class_folders_alone(tmp_path / "flat", counts=(6, 6))
    argv = ["--data-dir", root, "--epochs", 1, "--batch-size", 4, "--workers", 0,
            "--out", tmp_path / "run"]
    status, _, err = run_cli(capsys, "--pretrained", "--weights", tmp_path / "none.pth", *argv)
    assert (status == 2 and "does not exist" in err
            and not (tmp_path / "run" / "held_out.txt").exists())
    status, out, err = run_cli(capsys, "--scratch", "--val-split", 0.5, *argv)
    assert status == 0 and "testing on 6 of 12 images, split 0.5" in out, err
    held_out = (tmp_path / "run" / "held_out.txt").read_text().splitlines()
    assert (torch.load(tmp_path / "run" / "model.pt", weights_only=True)["held_out"] == held_out
            and len(held_out) == 6)


# ---------------------------------------------------------------- the cache
def test_cache_gives_the_same_images(folder):
    cached, _ = datasets.image_folders(folder)
    plain, _ = datasets.image_folders(folder, cache_budget=0)
    assert isinstance(cached, cache.DecodedImages) and not isinstance(plain, cache.DecodedImages)
    torch.manual_seed(1)
    a = cached[3]
    torch.manual_seed(1)
    b = plain[3]
    assert a[1] == b[1] and torch.equal(a[0], b[0])


def test_decoding_in_threads_leaves_the_warnings_filters_as_found(tmp_path):
    """The cache decodes in several threads, and each image's size check changes Python's warnings
    filters (the process's) for a moment: one thread at a time, so none is left behind."""
    root = write_folder(tmp_path, train=40, test=10)
    before = list(warnings.filters)
    for _ in range(3):
        assert isinstance(datasets.image_folders(root, workers=2)[0], cache.DecodedImages)
    assert warnings.filters == before


def test_cache_only_when_it_fits(folder, capsys):
    train_set, test_set = datasets.image_folders(folder)
    pixels = sum(3 * img.size[0] * img.size[1] for s in (train_set, test_set)
                 for img in (Image.open(p) for p, _ in s.samples))
    assert train_set.pixels.numel() + test_set.pixels.numel() == pixels  # the estimate is exact
    for i in range(len(test_set)):  # and each image sits where its header said
        assert torch.equal(test_set.image(i),
                           v2.functional.pil_to_tensor(photos.load_rgb(test_set.samples[i][0])))
    capsys.readouterr()
    train_set, _ = datasets.image_folders(folder, cache_budget=pixels - 1)
    assert not isinstance(train_set, cache.DecodedImages)
    err = capsys.readouterr().err
    assert (err.startswith("note: decoding images every epoch") and "--cache-gb" in err
            and len(err.splitlines()) == 1)


def test_cache_budget_flag(folder, tmp_path, capsys):
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1,
                               "--batch-size", 8, "--workers", 0, "--cache-gb", "0.000001",
                               "--out", tmp_path)
    assert status == 0 and "note: decoding images every epoch" in err


# ---------------------------------------------------------------- dummy data and CIFAR-10
def test_dummy_run(tmp_path, capsys, monkeypatch):
    real = datasets.fake_data
    monkeypatch.setattr(datasets, "fake_data", lambda: real(8, 4))  # a hot-dog set is 2000 + 800
    status, out, _ = run_cli(capsys, "--scratch", "--dummy", "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path)
    assert status == 0 and "training on 8 images, testing on 4" in out
    assert json.load(open(tmp_path / "metrics.json"))["classes"] == ["0", "1"]


def test_fake_data():
    train_set, test_set = datasets.fake_data()
    X, y = train_set[0]
    assert len(train_set) == 2000 and len(test_set) == 800
    assert X.shape == (3, 224, 224) and y in (0, 1)


def test_cifar10_through_the_same_dataset_function(tmp_path, capsys, monkeypatch):
    """Generated data in CIFAR-10's on-disk layout; torchvision checks the real files' MD5."""
    import pickle
    folder = tmp_path / "cifar-10-batches-py"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 4)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "labels": list(range(n))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    status, out, _ = run_cli(capsys, "--pretrained", "--dataset", "cifar10",
                             "--data-root", tmp_path, "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path / "out")
    assert status == 0 and "training on 10 images" in out
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert metrics["classes"] == [f"c{i}" for i in range(10)] and metrics["lr"] == 5e-4
    assert metrics["args"]["epochs"] == 1
    monkeypatch.undo()  # the real MD5 checks again
    # an archive put there by hand, not CIFAR-10's; no network to fetch another
    (tmp_path / "placed").mkdir()
    (tmp_path / "placed" / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(UserError,
                       match=r"cifar-10-python.tar.gz is not CIFAR-10's archive .*no "
                             r"network.*delete it"):
        datasets.cifar10(str(tmp_path / "placed"))


def test_a_held_out_image_renamed_is_named_and_never_trained_on(tmp_path, capsys):
    flat = class_folders_alone(tmp_path / "flat", counts=(5, 5))
    argv = ["--epochs", 1, "--batch-size", 4, "--workers", 0]
    run = tmp_path / "run"
    assert run_cli(capsys, "--scratch", "--data-dir", flat, *argv, "--out", run)[0] == 0
    held_out = (tmp_path / "run" / "held_out.txt").read_text()
    first = held_out.splitlines()[0]
    os.rename(os.path.join(flat, first), os.path.join(flat, first[:-4] + "-renamed.png"))
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2)
    assert status == 2 and len(err.strip().splitlines()) == 1 and not out, err
    assert ("1 of the 2 images the run held out for testing (held_out.txt) cannot be found in "
            f"{flat} or read, the first {first}; put them back") in err
    assert (tmp_path / "run" / "held_out.txt").read_text() == held_out
    os.rename(os.path.join(flat, first[:-4] + "-renamed.png"), os.path.join(flat, first))
    shutil.copytree(os.path.join(flat, "class0"), os.path.join(flat, "class9"))  # added since
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2)
    assert status == 2 and len(err.strip().splitlines()) == 1 and not out, err
    assert (f"{os.path.join(flat, 'class9')}: the run held out none of its images "
            "(held_out.txt), as it would of a class it was trained on; move that folder out") in err
    shutil.rmtree(os.path.join(flat, "class9"))
    assert run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2)[0] == 0


def test_a_test_set_changed_since_the_run_began_is_named(tmp_path, capsys):
    """A continued run tests its epochs on the images it tested them on, or says what changed:
    best.pt's epoch is chosen by comparing their accuracies."""
    root = write_folder(tmp_path / "d", train=4, test=2)
    argv = ["--epochs", 1, "--batch-size", 4, "--workers", 0, "--out", tmp_path / "run"]
    assert run_cli(capsys, "--scratch", "--data-dir", root, *argv)[0] == 0
    test = tmp_path / "d" / "test"
    shutil.copy(test / "hotdog" / "0.png", test / "hotdog" / "new.png")
    os.rename(test / "not-hotdog" / "1.png", tmp_path / "1.png")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert (f"model.pt tested its epochs on 4 images in {test}, and it now holds 4 (1 gone or "
            "unreadable now, the first not-hotdog/1.png; 1 new or readable only now, the first "
            "hotdog/new.png), so its epochs would be compared on other images") in err
    os.remove(test / "hotdog" / "new.png")
    os.rename(tmp_path / "1.png", test / "not-hotdog" / "1.png")
    assert run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2)[0] == 0
    older = checkpoints.load_checkpoint(str(tmp_path / "run" / "model.pt"))  # as runs wrote it
    torch.save({k: v for k, v in older.items() if k not in ("tested", "path")},  # before the list
               tmp_path / "run" / "model.pt")
    shutil.copy(test / "hotdog" / "0.png", test / "hotdog" / "new.png")
    assert run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 3)[0] == 0
    # what its first epochs were tested on is not known: no list, rather than one untrue of them
    assert checkpoints.load_checkpoint(str(tmp_path / "run" / "model.pt"))["tested"] is None
