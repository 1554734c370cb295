"""Prediction (--predict, beyond.predict): the evaluation loop's probabilities, folders in
batches with a CSV, and what it cannot predict named."""
import os

import pytest
import torch
from PIL import Image

import models
import train
from beyond import datasets, devices, loaders, photos, predict
from train import evaluate

from conftest import CPU, run_cli


def test_predict_matches_the_evaluation_loop(folder, tmp_path, capsys, scratch_run):
    run, _ = scratch_run
    ckpt = torch.load(run / "model.pt", weights_only=True)
    net = models.scratch_net(2)
    net.load_state_dict(ckpt["model"])
    _, test_set = datasets.image_folders(folder)
    probs, labels = evaluate(net, loaders.make_loaders(test_set, test_set, 4)[1], CPU)
    paths = [p for p, _ in test_set.samples]
    status, out, _ = run_cli(capsys, "--predict", *paths, "--model", run / "model.pt",
                             "--precision", "fp32", "--out", tmp_path / "predictions")
    assert status == 0
    for line, p in zip(out.splitlines(), probs):
        name, prob = line.split(": ")[1].split()
        assert (name == ckpt["classes"][p.argmax()]
                and float(prob) == pytest.approx(p.max().item(), abs=1e-3))


def test_predict_folders_in_batches_with_a_csv(folder, tmp_path, capsys, scratch_run):
    run, _ = scratch_run
    photo_dir = tmp_path / "photo_dir"
    os.makedirs(photo_dir / "b" / ".ipynb_checkpoints")
    for path in (photo_dir / "z.png", photo_dir / "a.png", photo_dir / "b" / "c.png",
                 photo_dir / "b" / ".ipynb_checkpoints" / "c.png"):
        Image.new("RGB", (50, 40), (220, 60, 30)).save(path)
    (photo_dir / "notes.txt").write_text("not an image")
    (photo_dir / "b" / "broken.png").write_bytes(b"\x89PNG broken")
    single = os.path.join(folder, "test", "not-hotdog", "0.png")
    status, out, err = run_cli(capsys, "--predict", single, photo_dir, "--model", run / "model.pt",
                               "--batch-size", 2, "--workers", 0, "--out", tmp_path / "pred")
    assert status == 1  # one image failed, the others were predicted
    assert "broken.png" in err and err.count("error:") == 1
    expected = [single, str(photo_dir / "a.png"), str(photo_dir / "b" / "c.png"),
                str(photo_dir / "z.png")]
    assert [line.split(": ")[0] for line in out.splitlines()] == expected
    import csv
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert [r["path"] for r in rows] == expected
    for row, line in zip(rows, out.splitlines()):
        probs = [float(row["hotdog"]), float(row["not-hotdog"])]
        assert (sum(probs) == pytest.approx(1, abs=1e-3)
                and float(row["probability"]) == pytest.approx(max(probs)))
        assert row["class"] == ["hotdog", "not-hotdog"][probs.index(max(probs))] == line.split()[1]
    assert rows[1]["hotdog"] == rows[3]["hotdog"]  # the same picture, in a different batch


def test_predict_counts_the_images_it_listed_once(tmp_path, capsys, scratch_run, monkeypatch):
    """The exit status compares the images predicted with those listed: an image added to the
    folder meanwhile is not one of them."""
    photo_dir = tmp_path / "photo_dir"
    photo_dir.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (50, 40)).save(photo_dir / name)
    real = predict.predict

    def then_added(*args, **kwargs):
        predictions = real(*args, **kwargs)
        Image.new("RGB", (50, 40)).save(photo_dir / "c.png")
        return predictions
    monkeypatch.setattr(predict, "predict", then_added)
    status, out, err = run_cli(capsys, "--predict", photo_dir, "--model", scratch_run[0],
                               "--workers", 0, "--out", tmp_path / "p")
    assert status == 0 and len(out.splitlines()) == 2 and "not predicted" not in err, err


def test_predict_finds_no_images(tmp_path, capsys, scratch_run):
    os.makedirs(tmp_path / "empty")
    status, _, err = run_cli(capsys, "--predict", tmp_path / "empty",
                             "--model", scratch_run[0] / "model.pt")
    assert status == 2 and "found no images" in err
    status, _, err = run_cli(capsys, "--predict", "", "--model", scratch_run[0] / "model.pt")
    assert status == 2 and err.startswith("error: --predict [''] is not a path or a list of"), err


def test_a_folder_named_predictions_csv_is_found_before_the_work(
        tmp_path, capsys, scratch_run, monkeypatch):
    os.makedirs(tmp_path / "p" / "predictions.csv")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    monkeypatch.setattr(train, "evaluate", lambda *a: pytest.fail("predicted before the check"))
    status, _, err = run_cli(capsys, "--predict", tmp_path / "a.png", "--model", scratch_run[0],
                             "--workers", 0, "--out", tmp_path / "p")
    assert status == 2 and err == (f"error: cannot write {tmp_path / 'p' / 'predictions.csv'}: a "
                                   "folder stands where the file would be; move it away\n"), err


def test_predict_names_missing_files_leaves_nothing_for_no_images_and_takes_a_folder(
        tmp_path, capsys, scratch_run):
    status, _, err = run_cli(capsys, "--predict", tmp_path / "nope.jpg", "--model", scratch_run[0],
                             "--workers", 0, "--out", tmp_path / "p1")
    assert (status == 1 and "nope.jpg does not exist; check the path" in err
            and "wrote no predictions.csv" in err)
    Image.new("RGB", (8, 8)).save(tmp_path / "real.png")
    status, _, err = run_cli(capsys, "--predict", f"{tmp_path / 'real.png'}/", "--model",
                             scratch_run[0], "--workers", 0, "--out", tmp_path / "p1")
    assert status == 1 and "real.png/ does not exist; check the path" in err, err
    # nothing predicted: an earlier one would stay
    assert not (tmp_path / "p1" / "predictions.csv").exists()
    os.makedirs(tmp_path / "empty")
    status, _, err = run_cli(capsys, "--predict", tmp_path / "empty", "--model", scratch_run[0],
                             "--out", tmp_path / "p2")
    assert status == 2 and "found no images" in err and not (tmp_path / "p2").exists()


def test_an_image_the_net_gives_nan_for_is_named_and_left_out(
        folder, tmp_path, capsys, monkeypatch, scratch_run):
    """NaN for one image (an overflow in fp16, say) leaves that image out, named; the others are
    predicted."""
    evaluate = train.evaluate

    def nan_first(*args):
        probs, index = evaluate(*args)
        probs[index == 0] = float("nan")
        return probs, index
    monkeypatch.setattr(train, "evaluate", nan_first)
    photo_dir = os.path.join(folder, "test", "hotdog")
    status, out, err = run_cli(capsys, "--predict", photo_dir, "--model", scratch_run[0],
                               "--out", tmp_path, "--workers", 0)
    first, *others = photos.image_files(photo_dir)
    # where autocast runs, its type may have overflowed
    dtype = devices.amp_dtype(torch.device("cpu"))
    overflow = f", or its {dtype} arithmetic overflowed: try the precision fp32" if dtype else ""
    assert (status == 1
            and f"error: {first}: the net's outputs are not numbers (NaN){overflow}\n" in err), err
    assert [line.split(":")[0] for line in out.splitlines()] == others and len(others) >= 1


def test_predictions_csv_names_each_column_once(tmp_path):
    """A class named like a column (class, probability) has its own: csv.DictReader reads each."""
    classes = ["class", "path", "probability", "probability of path"]
    made = [predict.Prediction("a.png", "class", 0.5, dict(zip(classes, [0.5, 0.2, 0.2, 0.1])))]
    predict.write_csv(made, classes, tmp_path / "p.csv")
    import csv
    row = next(csv.DictReader(open(tmp_path / "p.csv")))
    assert row == {"path": "a.png", "class": "class", "probability": "0.5000",
                   "probability of class": "0.5000", "probability of path": "0.2000",
                   "probability of probability": "0.2000",
                   "probability of probability of path": "0.1000"}
