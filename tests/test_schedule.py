"""The knobs people reach for after the book: --lr-schedule cosine with --warmup-epochs, and
--label-smoothing; the book's constant rate and plain cross-entropy stay the default."""
import math

import pytest
import torch

import models
import train
from beyond import UserError, progress, runs
from beyond.schedule import epoch_schedule

from conftest import run_cli

COSINE = ["--lr-schedule", "cosine", "--warmup-epochs", 1]


def formula(base, warmup, epochs):
    """Each epoch's rate: e / (warmup + 1) of it in the warm-up, then a cosine to 0 at the end."""
    return [base * (e / (warmup + 1) if e <= warmup
                    else (1 + math.cos(math.pi * (e - warmup - 1) / (epochs - warmup))) / 2)
            for e in range(1, epochs + 1)]


@pytest.mark.parametrize("warmup, epochs", [(0, 5), (1, 5), (2, 4)])
def test_the_lr_of_every_epoch_is_the_formulas_in_both_groups(warmup, epochs):
    optimizer = train.fine_tuning_optimizer(models.scratch_net(), 5e-5)
    schedule, seen = epoch_schedule(optimizer, "cosine", warmup, epochs), []
    for _ in range(epochs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    assert [body for body, _ in seen] == pytest.approx(formula(5e-5, warmup, epochs), rel=1e-9)
    assert all(fc == pytest.approx(10 * body) for body, fc in seen)  # the book's 10x, every epoch
    assert epoch_schedule(optimizer, None, 0, epochs) is None  # the book's constant rate


def test_a_run_keeps_each_epochs_lr_and_resumes_mid_schedule_as_if_never_stopped(
        folder, tmp_path, capsys, monkeypatch):
    common = ["--scratch", "--data-dir", folder, "--batch-size", 4, "--workers", 0,
              "--precision", "fp32", "--epochs", 3, *COSINE, "--label-smoothing", 0.1]
    smoothing, real_loss = [], train.fine_tuning_loss
    monkeypatch.setattr(train, "fine_tuning_loss", lambda weight=None, label_smoothing=0.0: (
        smoothing.append(label_smoothing) or real_loss(weight, label_smoothing)))
    status, out, err = run_cli(capsys, *common, "--out", tmp_path / "whole")
    assert status == 0 and smoothing == [0.1], err
    assert "lr 0.0005 falling along a cosine to 0 at epoch 3's end after 1 warm-up" in out
    assert "label smoothing 0.1" in out and ", lr 0.00025" in out  # epoch 1's line
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert [m["lr"] for m in whole["history"]] == pytest.approx(formula(5e-4, 1, 3))
    real = progress.show_epoch

    def stopped_after_2(history, *a, **k):
        real(history, *a, **k)
        if history[-1]["epoch"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(progress, "show_epoch", stopped_after_2)
    assert run_cli(capsys, *common, "--out", tmp_path / "cut")[0] == 130
    monkeypatch.setattr(progress, "show_epoch", real)
    status, out, err = run_cli(capsys, "--resume", tmp_path / "cut", "--epochs", 4)
    assert status == 2 and ("(--epochs: 3 there, 4 now); continue it with the same (its cosine "
                            "schedule ends at its last epoch)") in err
    status, out, err = run_cli(capsys, "--resume", tmp_path / "cut")
    assert status == 0 and "epoch 3:" in out and "epoch 2:" not in out, err
    status, out, err = run_cli(capsys, "--resume", tmp_path / "cut")  # finished: no more epochs
    assert status == 0 and "its cosine schedule ended there; train a new run for more" in out, err
    cut = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    for name, value in whole["model"].items():
        assert torch.equal(value, cut["model"][name]), name
    assert [m["lr"] for m in cut["history"]] == [m["lr"] for m in whole["history"]]
    assert cut["schedule"] == whole["schedule"]


@pytest.mark.parametrize("argv, message", [
    (["--warmup-epochs", 1], "--warmup-epochs warms up a schedule, and --lr-schedule gives none"),
    ([*COSINE[:2], "--warmup-epochs", 3, "--epochs", 3],
     "--warmup-epochs 3 leaves none of the run's 3 epochs to the cosine; give fewer warm-up"),
    (["--label-smoothing", 1], "argument --label-smoothing: give a number, from 0 to below 1"),
    (["--lr-schedule", "step"], "argument --lr-schedule: give one of 'cosine', not step")])
def test_a_schedule_or_smoothing_that_cannot_be_is_one_line(argv, message, tmp_path, capsys):
    argv = ["--pretrained", "--data-dir", tmp_path / "none", *argv, "--out", tmp_path / "run"]
    try:
        status, _, err = run_cli(capsys, *argv)
    except SystemExit as e:  # argparse's own refusal: its usage, then one line
        status, err = e.code, capsys.readouterr().err
    assert status == 2 and message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="lr_schedule=cosine too"):
        runs.train_runs("pretrained", tmp_path / "run", data_dir=tmp_path, warmup_epochs=1)


def test_smoothing_changes_the_loss_as_the_formula_says():
    """(1 - e) of the true class's -log p, and e shared evenly over every class's -log p; with
    class weights, each class's term weighed by its weight."""
    torch.manual_seed(0)
    logits, y, weight = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), torch.rand(3)
    nll = -torch.log_softmax(logits, 1)
    for w in (None, weight):
        w_ = torch.ones(3) if w is None else w
        expected = 0.9 * w_[y] * nll[range(6), y] + 0.1 * (nll * w_).mean(1)
        got = train.fine_tuning_loss(w, 0.1)(logits, y)
        torch.testing.assert_close(got, expected)
    assert torch.equal(train.fine_tuning_loss()(logits, y), nll[range(6), y])  # the book's
