"""A model to trust: the epoch best.pt keeps, patience, the two phases (beyond.phases), class
weights, and each class's figures (beyond.figures), all of the epoch kept."""
import json
import os
import shutil

import pytest
import torch

import data
import models
import train
from beyond import UserError, checkpoints, figures, phases, predict, runs

from conftest import run_cli, write_folder


# ---------------------------------------------------------------- best.pt and the epoch it keeps
def plateau(monkeypatch, accuracies):
    """Each evaluation's accuracy taken from accuracies, in turn."""
    turn = iter(accuracies)
    monkeypatch.setattr(train, "accuracy", lambda probs, labels: next(turn))


def judged(monkeypatch, rights):
    """Each evaluation's predictions all right or all wrong, as rights says in turn."""
    turn = iter(rights)

    def evaluate(net, loader, runtime):
        labels = torch.as_tensor(loader.dataset.targets)
        return torch.nn.functional.one_hot(labels if next(turn) else 1 - labels, 2).float(), labels
    monkeypatch.setattr(train, "evaluate", evaluate)


def test_the_kept_epochs_figures_come_from_its_own_test(folder, tmp_path, monkeypatch):
    """best.pt's epoch keeps that test's figures, in this run and after a resume: best.pt read
    back and tested again could, in bf16, tip an image at 0.5 the other way and disagree with its
    test acc."""
    plateau(monkeypatch, [0.9, 0.5, 0.5])
    with monkeypatch.context() as m:
        m.setattr(runs, "evaluated", lambda *a: pytest.fail("best.pt tested again"))
        result = runs.train_runs("scratch", tmp_path / "run", data_dir=folder, epochs=2,
                                 batch_size=4, workers=0).results[0]
    assert result["kept"]["epoch"] == result["figures_epoch"] == 1
    monkeypatch.setattr(checkpoints, "saved_net", lambda *a: pytest.fail("best.pt tested again"))
    resumed = runs.resume(str(tmp_path / "run"), epochs=3).results[0]
    assert resumed["kept"]["epoch"] == 1 and resumed["confusion"] == result["confusion"]

def test_patience_stops_and_best_pt_keeps_the_epoch_metrics_names(
        folder, tmp_path, capsys, monkeypatch):
    plateau(monkeypatch, [0.5, 0.75, 0.75, 0.5, 1.0, 1.0])
    argv = ["--scratch", "--data-dir", folder, "--epochs", 6, "--patience", 2, "--batch-size", 8,
            "--workers", 0,
            "--out", tmp_path / "run"]
    status, out, err = run_cli(capsys, *argv)
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert status == 0 and [m["epoch"] for m in metrics["history"]] == [1, 2, 3, 4], err
    assert "stopped early after epoch 4: no better test acc in 2 epochs" in out
    # the first of the two best
    assert metrics["kept"]["epoch"] == 2 and metrics["kept"]["optimistic"]
    assert len([line for line in out.splitlines()
                if "chosen on the set its accuracy is measured on" in line]) == 1
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["history"][-1]["epoch"] == 2 and best["history"][-1]["test_acc"] == 0.75
    status, out, _ = run_cli(capsys, *argv)  # the same command again: it stopped, so it is finished
    assert status == 0 and "scratch: finished its 4 epochs already" in out and "epoch 5:" not in out
    status, out, _ = run_cli(capsys, "--predict", os.path.join(folder, "test"),
                             "--model", tmp_path / "run" / "best.pt", "--workers", 0,
                             "--out", tmp_path)
    assert status == 0 and len(out.splitlines()) == 4


def test_a_run_stopped_at_its_last_epoch_says_it_stopped_not_to_give_more_epochs(
        folder, tmp_path, capsys, monkeypatch):
    plateau(monkeypatch, [1.0, 0.5, 0.5])
    argv = ["--scratch", "--data-dir", folder, "--epochs", 3, "--patience", 2, "--batch-size", 8,
            "--workers", 0, "--out", tmp_path / "run"]
    assert run_cli(capsys, *argv)[0] == 0
    for more in ([], ["--epochs", 5]):  # an uninterrupted run of 5 would have stopped there too
        status, out, err = run_cli(capsys, "--resume", tmp_path / "run", *more)
        assert status == 0 and ("scratch: finished its 3 epochs already; no better test acc in 2 "
                                "epochs (its patience), so more train none") in out, out


def test_with_val_and_test_the_epoch_is_chosen_on_val_and_test_is_evaluated_once(
        tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path / "d", train=3, test=2)
    shutil.copytree(tmp_path / "d" / "test", tmp_path / "d" / "val")
    seen = []
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda net, loader, runtime: seen.append(
        os.path.basename(loader.dataset.root)) or real(net, loader, runtime))
    # epoch 2 the best: no evaluation again for the figures of an earlier one
    plateau(monkeypatch, [0.5, 1.0, 0.5])
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 2,
                               "--batch-size", 4, "--workers", 0, "--out", tmp_path / "run")
    assert status == 0, err
    assert "testing on 4 in val/, and once, at the end, 4 in test/" in out
    assert seen == ["val", "val", "test"]  # every epoch on val/, test/ once
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    final = metrics["final_test"]
    assert (final["split"] == "test/" and final["epoch"] == metrics["kept"]["epoch"]
            and not metrics["kept"]["optimistic"])
    assert sum(map(sum, final["confusion"])) == 4 and "test/, once, with epoch" in out
    assert "optimistic" not in out


def test_best_pt_says_what_it_is_under_any_name(tmp_path, capsys, scratch_run):
    # SCRATCH, one epoch, into tmp_path
    shutil.copytree(scratch_run[0], tmp_path, dirs_exist_ok=True)
    shutil.copy(tmp_path / "best.pt", tmp_path / "epoch1.pt")
    os.symlink(tmp_path / "best.pt", tmp_path / "link.pt")
    before = (tmp_path / "model.pt").read_bytes()
    for named in (f"{tmp_path / 'best.pt'}/", tmp_path / "epoch1.pt", tmp_path / "link.pt"):
        status, _, err = run_cli(capsys, "--resume", named, "--epochs", 2)
        assert status == 2 and "is the epoch a run kept, for prediction" in err, (named, err)
    # as --predict, --export read it
    assert checkpoints.load_checkpoint(checkpoints.kept_in(f"{tmp_path / 'best.pt'}/"))["is_best"]
    # written before checkpoints said what they are
    old = torch.load(tmp_path / "model.pt", weights_only=True)
    del old["is_best"]
    torch.save(old, tmp_path / "best.pt")
    assert run_cli(capsys, "--resume", tmp_path / "best.pt", "--epochs", 2)[0] == 2  # by its name
    assert (tmp_path / "model.pt").read_bytes() == before
    torch.save(old, tmp_path / "model.pt")
    status, out, err = run_cli(capsys, "--resume", tmp_path / "model.pt", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out, err


def test_a_model_pt_copied_alone_keeps_and_tests_an_epoch_it_has(tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path / "d", train=2, test=1)
    shutil.copytree(tmp_path / "d" / "test", tmp_path / "d" / "val")
    argv = ["--data-dir", root, "--batch-size", 4, "--workers", 0]
    plateau(monkeypatch, [1.0, 1.0])  # epoch 1 on val/, then the final test
    assert run_cli(capsys, "--scratch", *argv, "--epochs", 1, "--out", tmp_path / "a")[0] == 0
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")
    plateau(monkeypatch, [0.5, 0.75, 0.5])  # epochs 2 and 3, then the final test
    status, out, err = run_cli(capsys, "--resume", tmp_path / "b" / "model.pt", "--epochs", 3)
    metrics = json.load(open(tmp_path / "b" / "metrics.json"))
    best = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert status == 0 and metrics["kept"]["epoch"] == metrics["final_test"]["epoch"] == 1, err
    assert (best["history"][-1]["epoch"] == 1 and "best.pt keeps epoch 1" in out
            and "with epoch 1's weights" in out)
    first = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(best["model"][k], first[k]) for k in first)
    read, load = [], checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint",
                        lambda path: read.append(os.path.basename(path)) or load(path))
    os.makedirs(tmp_path / "c")
    # best.pt alone, copied to predict elsewhere
    shutil.copy(tmp_path / "b" / "best.pt", tmp_path / "c")
    # a folder: the epoch it keeps
    for model in (tmp_path / "b", tmp_path / "b" / "model.pt", tmp_path / "c"):
        predict.predict(model, os.path.join(root, "test"), workers=0)
    assert read == ["best.pt", "model.pt", "best.pt"]


def test_a_continued_run_without_mistakes_shows_none(folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")  # the pictures it checks
    argv = ["--scratch", "--data-dir", folder, "--batch-size", 8, "--workers", 0, "--out", tmp_path]
    read, load = [], checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint",
                        lambda path: read.append(os.path.basename(path)) or load(path))
    judged(monkeypatch, [False])
    assert run_cli(capsys, *argv, "--epochs", 1)[0] == 0 and (tmp_path / "mistakes.png").exists()
    # the last epoch is the one best.pt keeps: its figures are known without reading it back
    assert read == []
    judged(monkeypatch, [True])
    status, _, err = run_cli(capsys, *argv, "--epochs", 2)
    assert status == 0 and not (tmp_path / "mistakes.png").exists(), err
    # continued: each read once, best.pt for the epoch it keeps
    assert read == ["model.pt", "best.pt"]
    assert json.load(open(tmp_path / "metrics.json"))["balanced_accuracy"] == 1.0


def test_the_figures_are_those_of_the_epoch_kept_and_the_note_names_no_test_set(
        tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path / "d", train=2, test=2)
    os.rename(tmp_path / "d" / "test", tmp_path / "d" / "val")  # train/ and val/ alone
    # epoch 1 right, epoch 2 wrong, then best.pt's epoch again
    judged(monkeypatch, [True, False, True])
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 2,
                               "--batch-size", 4, "--workers", 0, "--out", tmp_path / "run")
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert (status == 0 and metrics["test_acc"] == 0
            and metrics["kept"]["epoch"] == metrics["figures_epoch"] == 1), err
    assert metrics["balanced_accuracy"] == 1 and torch.tensor(metrics["confusion"]).trace() == 4
    assert "confusion of epoch 1, the one best.pt keeps" in out and "balanced accuracy 1.000" in out
    assert "test set" not in out and "chosen on the set its accuracy is measured on" in out


def test_per_class_figures_match_a_hand_count(scratch_run):
    labels, preds = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])
    result = figures.figures(torch.nn.functional.one_hot(preds, 3).float(), labels, ["a", "b", "c"])
    assert result["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    a, b, c = (result["per_class"][name] for name in "abc")
    assert (a["precision"], a["recall"], a["count"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert (a["f1"] == pytest.approx(2 * (2 / 3) / (1 + 2 / 3))
            and result["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1) / 3))
    run, out = scratch_run
    metrics = json.load(open(run / "metrics.json"))
    assert set(metrics["per_class"]) == {"hotdog", "not-hotdog"}
    assert (sum(f["count"] for f in metrics["per_class"].values()) == 4
            and "balanced accuracy" in out)


# ---------------------------------------------------------------- two phases, class weights
def test_two_phases_keep_the_features_fixed_then_train_them(
        folder, tmp_path, capsys, torch_home, monkeypatch):
    argv = ["--pretrained", "--data-dir", folder, "--batch-size", 4, "--workers", 0, "--lr", "1e-2"]
    status, out, err = run_cli(capsys, *argv, "--freeze-epochs", 2, "--epochs", 2,
                               "--out", tmp_path / "frozen")
    assert status == 0 and "the output layer alone in the first 2 of 2 epochs" in out, err
    state = torch.load(tmp_path / "frozen" / "model.pt", weights_only=True)["model"]
    features = [k for k in torch_home if not k.startswith("fc.")]
    assert (any("running_mean" in k for k in features)
            and any(k.endswith("num_batches_tracked") for k in features))
    # weights and BatchNorm statistics
    assert all(torch.equal(state[k], torch_home[k]) for k in features)
    assert not torch.equal(state["fc.weight"], models.finetune_net().fc.weight)
    status, _, err = run_cli(capsys, *argv, "--freeze-epochs", 1, "--epochs", 2,
                             "--out", tmp_path / "whole")
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert (status == 0
            and not all(torch.equal(whole["model"][k], torch_home[k]) for k in features)), err
    status, _, err = run_cli(capsys, *argv, "--freeze-epochs", 1, "--epochs", 1,
                             "--out", tmp_path / "cut")
    # the checkpoint replaces every weight: continuing reads no ImageNet weights
    with monkeypatch.context() as m:
        m.setattr(models, "pretrained_net",
                  lambda *a: pytest.fail("the ImageNet weights were read"))
        status, out, err = run_cli(capsys, "--resume", tmp_path / "cut", "--epochs", 2)
    cut = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert status == 0 and "epoch 2:" in out and "epoch 1:" not in out, err
    # continued across the phases
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    assert json.load(open(tmp_path / "cut" / "metrics.json"))["args"]["freeze_epochs"] == 1


def test_balanced_class_weights_change_the_loss_as_the_formula_says(tmp_path, capsys, monkeypatch):
    targets = [0] * 6 + [1] * 2
    weights = runs.loss_weights("balanced",
                                type("Set", (), {"targets": targets, "classes": ["a", "b"]}), "cpu")
    assert weights.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])  # n / (classes x n_class)
    class Captured(Exception):
        pass

    def capture(net, train_iter, test_iter, loss, *a):
        losses.append(loss)
        raise Captured
    losses = []
    with monkeypatch.context() as patched:  # the loss a run hands to the book's loop
        patched.setattr(train, "ch13_epochs", capture)
        patched.setattr(runs, "loss_weights", lambda *a: weights)
        with pytest.raises(Captured):
            runs.train_runs("scratch", str(tmp_path / "w"), data_dir=write_folder(tmp_path / "w8"),
                            epochs=1, workers=0)
    loss = losses[0]
    pred, y = torch.randn(8, 2), torch.tensor(targets)
    plain = torch.nn.functional.cross_entropy(pred, y, reduction="none")
    assert loss(pred, y).sum().item() == pytest.approx((weights[y] * plain).sum().item())
    root = write_folder(tmp_path / "d", train=1, test=1)
    for i in range(1, 4):
        shutil.copy(tmp_path / "d" / "train" / "hotdog" / "0.png",
                    tmp_path / "d" / "train" / "hotdog" / f"x{i}.png")
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root,
                               "--class-weights", "balanced", "--epochs", 1, "--batch-size", 4,
                               "--workers", 0, "--out", tmp_path / "run")
    assert status == 0 and "class weights balanced (0.62, 2.50)" in out, err
    assert json.load(open(tmp_path / "run" / "metrics.json"))["args"]["class_weights"] == "balanced"


def test_a_compares_scratch_run_says_it_stopped_and_records_what_it_used(
        folder, tmp_path, capsys, monkeypatch):
    plateau(monkeypatch, [0.5] * 5)  # 3 pretrained epochs, 2 scratch
    status, out, err = run_cli(capsys, "--compare", "--data-dir", folder, "--freeze-epochs", 5,
                               "--patience", 1, "--epochs", 3, "--batch-size", 8, "--workers", 0,
                               "--out", tmp_path)
    assert status == 0, err
    assert "the output layer alone in the first 3 of 3 epochs" in out and "first 5" not in out
    assert "scratch: stopped early after epoch 2: no better test acc in 1 epochs" in out
    used = [json.load(open(tmp_path / name / "metrics.json"))["args"]["freeze_epochs"]
            for name in ("pretrained", "scratch")]
    assert used == [5, 0]
    # each run continues as it began
    status, out, err = run_cli(capsys, "--resume", tmp_path, "--epochs", 3)
    assert status == 0 and out.count("already") == 2, err


def test_the_extras_keep_their_promises_at_the_edges(folder, tmp_path, capsys, monkeypatch):
    """--freeze stays frozen after a first phase; patience counts from the second phase; the
    final test is made up after Ctrl-C in it; best.pt is not continued; the options a Python
    caller gives are checked first."""
    net = models.freeze_features(models.finetune_net())
    with phases.features_frozen(net):
        assert not any(p.requires_grad for p in net.parameters() if p is not net.fc.weight
                       and p is not net.fc.bias)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    flat = [{"epoch": e, "test_acc": 0.5} for e in range(1, 5)]
    assert (runs.stalled(flat, 2) and not runs.stalled(flat, 2, freeze_epochs=3)
            and runs.stalled(flat + [dict(epoch=5, test_acc=0.5)], 2, 3))
    root = write_folder(tmp_path / "d", train=2, test=1)
    shutil.copytree(tmp_path / "d" / "test", tmp_path / "d" / "val")
    real = runs.final_test
    monkeypatch.setattr(runs, "final_test", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = ["--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4, "--workers", 0,
            "--out", tmp_path / "run"]
    assert run_cli(capsys, *argv)[0] == 130
    monkeypatch.setattr(runs, "final_test", real)
    status, out, err = run_cli(capsys, *argv)
    assert (status == 0 and "finished its 1 epochs already" in out
            and "test/, once, with epoch 1" in out), err
    assert json.load(open(tmp_path / "run" / "metrics.json"))["final_test"]["split"] == "test/"
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run" / "best.pt", "--epochs", 2)
    assert status == 2 and "is the epoch a run kept, for prediction" in err
    for given, message in ((dict(class_weights="balance"),
                            "class_weights='balance' is not one of 'balanced'"),
                           (dict(class_weights="balanced", dummy=True), "needs labelled images"),
                           (dict(patience=-1), "patience=-1 is not a whole number, 1 or more")):
        with pytest.raises(UserError, match=message):
            runs.train_runs("scratch", str(tmp_path / "never"), **given)
    assert len(predict.predict(tmp_path / "run", os.path.join(folder, "test", "hotdog", "0.png"),
                               workers=0)) == 1
    # the book's call: train/ and test/, whatever else is there
    train_iter, test_iter = data.load_data(4, root)
    assert os.path.basename(test_iter.dataset.root) == "test"
