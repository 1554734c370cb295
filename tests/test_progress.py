"""What a run shows as it trains (beyond.progress): the progress line and the book's speed."""
import sys

import pytest
import torch

import models
from beyond import progress
from train import train_epoch

from conftest import CPU


def test_progress_with_fewer_batches_than_five(capsys, monkeypatch):
    """The book's display divides by num_batches // 5, which is zero here."""
    monkeypatch.setattr("train.time.perf_counter", iter(range(0, 1000, 10)).__next__)  # 10 s a call
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # progress shows on a terminal only
    net = models.scratch_net(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    metrics = train_epoch(net, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))],
                          torch.nn.CrossEntropyLoss(reduction="none"), optimizer, CPU)
    assert metrics["examples"] == 2
    err = capsys.readouterr().err
    assert "batch 1/1" in err and err.endswith("\r\033[K")


def test_examples_per_sec_are_the_books_all_epochs_over_their_time():
    """The summary's speed, as the book's train_ch13 gives it: every example over every second
    (the mean of the epochs' speeds would count a slow epoch as much as a fast one)."""
    history = [dict(examples=100, examples_per_sec=10.0), dict(examples=100, examples_per_sec=50.0)]
    assert progress.mean_speed(history) == pytest.approx(200 / (10 + 2))
