"""A run's curves where people look at them: metrics.csv in every run, and TensorBoard's event
files with --tensorboard; a continued run adds its epochs and repeats none."""
import csv
import importlib.util
import json
import sys

import pytest

import train
from beyond import datasets, logs, progress

from conftest import run_cli

TINY = ["--batch-size", 4, "--workers", 0, "--epochs", 3]


def stopped_after(monkeypatch, module, name, epoch):
    """Ctrl-C as module.name returns, in the given epoch."""
    real = getattr(module, name)

    def stop(*args, **kwargs):
        real(*args, **kwargs)
        figures = next(a for a in args if isinstance(a, (list, dict)))  # a history, or an epoch's
        if (figures[-1] if isinstance(figures, list) else figures)["epoch"] == epoch:
            monkeypatch.setattr(module, name, real)
            raise KeyboardInterrupt
    monkeypatch.setattr(module, name, stop)


# Stops after each file of an epoch is written: the csv, the events (then model.pt), the line
STOPS = [(logs, "write_csv"), (logs, "add_epoch"), (progress, "show_epoch")]


@pytest.mark.parametrize("module, name", STOPS, ids=[name for _, name in STOPS])
def test_metrics_csv_and_event_files_hold_every_epoch_once_after_a_resume(
        module, name, folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    stopped_after(monkeypatch, module, name, 2)
    argv = ["--scratch", "--data-dir", folder, *TINY, "--tensorboard", "--out", run]
    assert run_cli(capsys, *argv)[0] == 130
    with open(run / "metrics.csv", "a") as f:  # what a run stopped while writing might leave
        f.write("3,0.5")
    status, out, err = run_cli(capsys, "--resume", run)
    assert status == 0 and "epoch 3:" in out, err
    history = json.load(open(run / "metrics.json"))["history"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["test_acc"]) for r in rows] == [m["test_acc"] for m in history]
    assert [float(r["lr"]) for r in rows] == [m["lr"] for m in history] == [5e-4] * 3
    events = EventAccumulator(str(run), purge_orphaned_data=False)  # as written
    events.Reload()
    for tag in ("loss", "train_acc", "test_acc", "lr", "examples_per_sec"):
        steps = [s.step for s in events.Scalars(tag)]
        assert steps == [1, 2, 3], tag
    assert [s.value for s in events.Scalars("test_acc")] == pytest.approx(
        [m["test_acc"] for m in history])


def test_every_run_writes_metrics_csv(scratch_run):
    run, _ = scratch_run
    history = json.load(open(run / "metrics.json"))["history"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [{k: float(v) for k, v in row.items()} for row in rows] == history


@pytest.mark.parametrize("missing", ["package", "a folder in its place"])
def test_tensorboard_missing_is_one_line_before_any_data(missing, tmp_path, capsys, monkeypatch):
    for name in [name for name in sys.modules if "tensorboard" in name]:
        monkeypatch.delitem(sys.modules, name)  # imported anew here; put back after the test
    if missing == "package":
        monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    elif importlib.util.find_spec("tensorboard") and importlib.util.find_spec("tensorboard").origin:
        pytest.skip("tensorboard is installed: a folder of that name does not hide it")
    else:  # a folder named tensorboard where Python looks: a namespace package, not TensorBoard
        (tmp_path / "tensorboard").mkdir()
        monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(datasets, "datasets", lambda *a, **k: pytest.fail("data read"))
    try:
        status, out, err = run_cli(capsys, "--scratch", "--tensorboard", "--out", tmp_path / "run")
    finally:  # what the failed import left, such as the folder read as a namespace package
        for name in [name for name in sys.modules if "tensorboard" in name]:
            del sys.modules[name]
    assert status == 2 and err.strip().endswith("pip install tensorboard") and not out, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_tensorboard_given_to_resume_writes_every_epoch_and_no_other_programs_files(
        folder, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert run_cli(capsys, "--scratch", "--data-dir", folder, *TINY[:4], "--epochs", 1,
                   "--out", run)[0] == 0
    (run / "events.out.tfevents.1.other").write_bytes(b"")  # another program's
    status, out, err = run_cli(capsys, "--resume", run, "--tensorboard")  # finished: written too
    assert status == 0 and "finished its 1 epochs already" in out, err
    events = EventAccumulator(str(run), purge_orphaned_data=False)
    events.Reload()
    assert [s.step for s in events.Scalars("test_acc")] == [1]
    written = sorted(run.glob("events.out.tfevents.*.finetune"))
    assert run_cli(capsys, "--resume", run, "--tensorboard")[0] == 0  # with events: none anew
    assert sorted(run.glob("events.out.tfevents.*.finetune")) == written
    status, out, err = run_cli(capsys, "--resume", run, "--epochs", 2, "--tensorboard")
    assert status == 0 and "epoch 2:" in out, err
    assert (run / "events.out.tfevents.1.other").exists()
    (run / "events.out.tfevents.1.other").unlink()
    events = EventAccumulator(str(run), purge_orphaned_data=False)  # as written
    events.Reload()
    assert [s.step for s in events.Scalars("test_acc")] == [1, 2]  # the epochs before it too


def test_a_run_begun_anew_replaces_the_events_of_one_stopped_before_its_first_save(
        folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    argv = ["--scratch", "--data-dir", folder, *TINY[:4], "--epochs", 2, "--tensorboard"]
    stopped_after(monkeypatch, logs, "add_epoch", 1)  # its hyperparameters and epoch 1 written
    assert run_cli(capsys, *argv, "--label-smoothing", 0.1, "--out", run)[0] == 130
    assert not (run / "model.pt").exists()
    assert run_cli(capsys, *argv, "--label-smoothing", 0.2, "--out", run)[0] == 0
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one run's hyperparameters
    events = EventAccumulator(str(run), purge_orphaned_data=False)  # as written
    events.Reload()
    assert [s.step for s in events.Scalars("test_acc")] == [1, 2]


def test_tensorboard_writes_nothing_before_the_first_epoch_and_each_run_its_own_options(
        folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    argv = ["--scratch", "--data-dir", folder, *TINY[:4], "--epochs", 1, "--tensorboard"]

    def stop(*args):
        raise KeyboardInterrupt
    with monkeypatch.context() as patched:  # Ctrl-C in the first epoch: no run's folder is left
        patched.setattr(train, "train_epoch", stop)
        assert run_cli(capsys, *argv, "--out", tmp_path / "stopped")[0] == 130
    assert not (tmp_path / "stopped").exists()
    assert run_cli(capsys, *argv, "--lr", 1e-3, 2e-3, "--out", tmp_path / "two")[0] == 0
    for lr in (1e-3, 2e-3):
        events = EventAccumulator(str(tmp_path / "two" / f"scratch-lr{lr:g}"),
                                  size_guidance={"tensors": 0})
        events.Reload()
        data = [plugin_data_pb2.HParamsPluginData.FromString(content)
                for content in events.PluginTagToContent("hparams").values()]
        hparams, = [d.session_start_info.hparams for d in data if d.HasField("session_start_info")]
        assert hparams["lr"].number_value == lr and hparams["mode"].string_value == "scratch"
