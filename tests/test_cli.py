"""The command line (finetune.py, beyond.cli): its runs, bad input in one line that names the
problem and the fix, and its exit statuses (Ctrl-C, a closed pipe, a full disk)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import finetune
import train
from beyond import UserError, cli, pictures, predict, runs
from beyond.devices import try_device

from conftest import HERE, SCRATCH, full_disk, run_cli, write_folder


# ---------------------------------------------------------------- runs from the command line
def test_cli_pretrained_and_scratch(folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the pictures it checks
    for mode in ("--pretrained", "--scratch"):
        status, out, _ = run_cli(capsys, mode, "--data-dir", folder, "--epochs", 1,
                                 "--batch-size", 4, "--workers", 1, "--out", tmp_path / mode)
        assert status == 0, out
        assert "epoch 1: loss" in out and "examples/sec on cpu" in out
        metrics = json.load(open(tmp_path / mode / "metrics.json"))
        assert metrics["lr"] == {"--pretrained": 5e-5, "--scratch": 5e-4}[mode]
        assert len(metrics["history"]) == 1 and 0 <= metrics["test_acc"] <= 1
        assert f"test acc {metrics['test_acc']:.3f}" in out
        confusion = torch.tensor(metrics["confusion"])
        assert confusion.sum() == 4 and confusion.trace() / 4 == pytest.approx(metrics["test_acc"])
        assert (tmp_path / mode / "curves.png").stat().st_size > 0


def test_cli_as_a_user_runs_it(folder, tmp_path):
    """The real command in a fresh process, with loader worker utils."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "finetune.py"), "--pretrained",
                             "--data-dir", folder, "--epochs", "1", "--batch-size", "8",
                             "--workers", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "examples/sec on cpu" in result.stdout and (tmp_path / "model.pt").exists()


def test_batch_larger_than_the_training_set(folder, tmp_path, capsys):
    status, out, _ = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1,
                             "--batch-size", 1000, "--workers", 0, "--out", tmp_path)
    assert status == 0 and "epoch 1:" in out


# ---------------------------------------------------------------- bad input is one line
@pytest.mark.parametrize("setup, argv, message", [
    (None, ["--data-dir", "{tmp}/nowhere"], "nowhere is not a folder; give the folder that holds"),
    (None, ["--data-dir", "{tmp}/my seed=3 hotdog_class format=1"],  # a path, quoted as it is
     "^error: --data-dir /.*/my seed=3 hotdog_class format=1 is not a folder; give the folder"),
    (None, ["--resume", "{tmp}/old seed=3/model.pt"], "^error: /.*/old seed=3/model.pt does not"),
    (None, ["--resume", "seed=3"], "^error: seed=3 does not exist"),  # typed as it is, no / in it
    (None, ["--resume", ""], "^error: '' is not a path; give the model.pt"),  # not a new run
    (None, ["--resume", "{tmp}/runs/0/model.pt"], "^error: /.*/runs/0/model.pt does not exist"),
    ("one_class_alone", ["--data-dir", "{tmp}/w epochs=3"],  # a folder's name as it is too
     r"\['only'\]; the layout is w epochs=3/<class>/<image>"),
    ("no_test", ["--data-dir", "{tmp}/d"], "test is not a folder"),
    ("other_classes", ["--data-dir", "{tmp}/d"], "give both the same class folders"),
    ("empty_class", ["--data-dir", "{tmp}/d"], "put images in every class folder"),
    ("loose_images", ["--data-dir", "{tmp}/d"],
     r"d/train holds images \(0.png, ...\) but 0 class folder.*train/<class>/<image>"),
    ("one_class", ["--data-dir", "{tmp}/d"],
     r"1 class folder\(s\) \['hotdog'\]; the layout is train/<class>/<image>"),
    ("ok", ["--data-dir", "{tmp}/d", "--init-head-from-imagenet"],
     "no classes of .* are named like hot dog .* leave --init-head-from-imagenet out$"),
    ("ok", ["--data-dir", "{tmp}/d", "--weights", "{tmp}/none.pth"], "does not exist"),
    ("ok", ["--data-dir", "{tmp}/d", "--device", "cuda"], "no such device"),
    ("ok", ["--data-dir", "{tmp}/d", "--device", "cuda:7"], "no such device"),
    ("ok", ["--data-dir", "{tmp}/d", "--device", "gpu"],
     "--device gpu is not a device's name; give cpu, cuda"),
    ("ok", ["--data-dir", "{tmp}/d", "--device", "xpu"],
     "--device xpu: this program computes on cpu, cuda .* or mps"),
    ("ok", ["--resume", "{tmp}/none.pt"], "does not exist"),
])
def test_bad_input_is_one_line(setup, argv, message, tmp_path, capsys):
    root = tmp_path / "d"
    if setup:
        write_folder(root, train=2, test=1)
    if setup == "no_test":
        shutil.rmtree(root / "test")
    if setup == "other_classes":
        os.rename(root / "test" / "hotdog", root / "test" / "pizza")
    if setup == "empty_class":
        os.makedirs(root / "train" / "pizza")
        os.makedirs(root / "test" / "pizza")
    if setup == "loose_images":
        for name in os.listdir(root / "train" / "hotdog"):
            os.rename(root / "train" / "hotdog" / name, root / "train" / name)
        shutil.rmtree(root / "train" / "hotdog")
        shutil.rmtree(root / "train" / "not-hotdog")
    if setup == "one_class":
        shutil.rmtree(root / "train" / "not-hotdog")
    if setup == "one_class_alone":
        shutil.copytree(root / "train" / "hotdog", tmp_path / "w epochs=3" / "only")
    if "--init-head-from-imagenet" in argv:
        os.rename(root / "train" / "hotdog", root / "train" / "sausage")
        os.rename(root / "test" / "hotdog", root / "test" / "sausage")
    if ("cuda" in argv and torch.cuda.is_available()
            or "cuda:7" in argv and torch.cuda.device_count() > 7):
        pytest.skip("this machine has that device")
    argv = [a.format(tmp=tmp_path) for a in argv]
    mode = [] if "--resume" in argv else ["--pretrained"]
    status, out, err = run_cli(capsys, *mode, *argv, "--epochs", 1, "--out", tmp_path / "out")
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    import re
    assert re.search(message, err), err


def test_bad_arguments_are_refused(capsys):
    for argv in (["--scratch", "--epochs", "0"], ["--scratch", "--lr", "-1"],
                 ["--predict", "x.png"], []):
        with pytest.raises(SystemExit) as e:
            finetune.main(argv)
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_lr_or_predict_given_twice_takes_both():
    """--lr a --lr b is --lr a b (argparse would keep b alone, and one run would go unsaid)."""
    assert cli.parse_args(["--scratch", "--lr", "1e-4", "--lr", "2e-4", "3e-4"]).lr == [
        1e-4, 2e-4, 3e-4]
    assert cli.parse_args(["--scratch", "--epochs", "2", "--epochs", "3"]).epochs == 3
    assert cli.parse_args(["--predict", "a.png", "--model", "m", "--predict", "b.png"]).predict == [
        "a.png", "b.png"]  # so are --predict's images


def test_the_python_callers_errors_name_arguments_and_the_cli_names_flags(capsys):
    with pytest.raises(UserError, match="^device=gpu is not a device's name; give cpu, cuda "):
        try_device("gpu")
    status, _, err = run_cli(capsys, "--scratch", "--device", "gpu")
    assert (status == 2 and "error: --device gpu is not a device's name; give cpu, cuda (cuda:N) "
            "or mps, or no --device to use the best one there is" in err)


def test_output_folder_checked_first_and_none_left_by_an_early_failure(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "nowhere",
                             "--out", tmp_path / "file" / "x")
    # not the missing data: the folder comes first
    assert status == 2 and "cannot write in the folder" in err
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "nowhere",
                             "--out", tmp_path / "new" / "run")
    assert status == 2 and "nowhere is not a folder" in err
    assert not os.path.exists(tmp_path / "new")  # nor the folder made for it


def test_unwritable_out_is_one_line(folder, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1,
                             "--batch-size", 8, "--workers", 0, "--out", tmp_path / "file" / "run")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert (f"cannot write in the folder {tmp_path / 'file' / 'run'}" in err
            and "a file stands where a folder would be; choose another folder" in err)


def test_a_folder_named_with_a_newline_is_said_on_one_line(folder, tmp_path, capsys):
    status, out, err = run_cli(capsys, *SCRATCH, "--data-dir", folder, "--out", tmp_path / "a\nb")
    assert status == 0 and out.strip().splitlines()[-1] == f"wrote {tmp_path}/a\\nb", err


def test_an_empty_checkpoint_is_one_line(folder, tmp_path, capsys):
    (tmp_path / "e.pt").touch()
    for argv, message in ((["--resume", tmp_path / "e.pt"],
                           "e.pt is not a checkpoint of this program"),
                          (["--predict", folder, "--model", tmp_path / "e.pt"],
                           "e.pt is not a checkpoint of this program")):
        status, _, err = run_cli(capsys, *argv)
        assert status == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert message in err


def test_out_of_memory_names_the_batch_size(folder, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(train, "ch13_epochs", oom)
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--batch-size", 64,
                             "--out", tmp_path)
    assert status == 2 and "--batch-size 64" in err and "--batch-size 32" in err


# ----------------------------------------------- exit statuses: Ctrl-C, a closed pipe, a full disk
def test_ctrl_c_saves_and_says_how_to_resume(folder, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "finetune.py"), "--scratch",
                             "--data-dir", folder, "--epochs", "50", "--batch-size", "8",
                             "--workers", "0", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # (SIGINT as it is by default, even where the suite ignores it)
    # epoch 2's line comes after epoch 1's checkpoint, whatever the machine's speed
    for line in proc.stdout:
        if line.startswith("  epoch 2:"):
            break
    proc.send_signal(2)  # SIGINT, as Ctrl-C
    out, err = proc.communicate()
    assert proc.returncode == 130, err
    assert f"--resume {tmp_path / 'model.pt'}" in err and "Traceback" not in err
    assert torch.load(tmp_path / "model.pt", weights_only=True)["history"]


def test_ctrl_c_in_a_compare_says_how_to_resume_both_runs(folder, tmp_path, capsys, monkeypatch):
    """Ctrl-C in either run of a --compare, or while drawing their curves, names the folder;
    before a run's first epoch, that there is nothing to resume (its folder is gone)."""
    real = train.fine_tuning_optimizer

    def stopped_in_scratch(net, lr, *args, **kwargs):
        if lr == 5e-4:  # the scratch run, after pretrained finished
            raise KeyboardInterrupt
        return real(net, lr, *args, **kwargs)
    monkeypatch.setattr(train, "fine_tuning_optimizer", stopped_in_scratch)
    status, _, err = run_cli(capsys, "--compare", "--data-dir", folder, "--epochs", 1,
                             "--batch-size", 8, "--workers", 0, "--out", tmp_path / "both runs")
    assert status == 130 and f"--resume '{tmp_path / 'both runs'}'\n" in err, err  # to paste

    def ctrl_c_after_an_epoch(history, *args):
        if history:  # asked after each epoch, once it is saved
            raise KeyboardInterrupt
        return False
    monkeypatch.setattr(runs, "stalled", ctrl_c_after_an_epoch)
    # Ctrl-C in pretrained, after epoch 1
    status, _, err = run_cli(capsys, "--compare", "--data-dir", folder, "--epochs", 2,
                             "--batch-size", 8, "--workers", 0, "--out", tmp_path / "again")
    # the folder: both runs continue
    assert status == 130 and f"--resume {tmp_path / 'again'}\n" in err, err
    monkeypatch.undo()
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "fine_tuning_optimizer", ctrl_c)
    # before its first epoch
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1,
                             "--batch-size", 8, "--workers", 0, "--out", tmp_path / "none")
    assert status == 130 and "no epoch had finished, so there is nothing to resume" in err, err
    assert not (tmp_path / "none").exists()
    monkeypatch.undo()
    real_curves = pictures.curves

    def stopped_in_the_combined_curves(histories, path=None):
        if len(histories) > 1:  # every run finished
            raise KeyboardInterrupt
        return real_curves(histories, path)
    monkeypatch.setattr(pictures, "curves", stopped_in_the_combined_curves)
    status, _, err = run_cli(capsys, "--compare", "--data-dir", folder, "--epochs", 1,
                             "--batch-size", 8, "--workers", 0, "--out", tmp_path / "drawn")
    assert status == 130 and f"--resume {tmp_path / 'drawn'}\n" in err, err
    # no training: nothing to continue, nothing said of it
    monkeypatch.setattr(predict, "predict", ctrl_c)
    assert run_cli(capsys, "--predict", folder,
                   "--model", tmp_path / "drawn")[:3:2] == (130, "\ninterrupted\n")


@pytest.mark.parametrize("mode", [["--predict", "test", "--model", "run"],
                                  ["--scratch", "--data-dir", "."]])
def test_output_read_no_more_stops_it_quietly(folder, tmp_path, scratch_run, mode):
    """`finetune.py ... | head -1`: where what it prints is read no more, it stops, with no
    traceback and the status of a tool stopped by SIGPIPE (128 + 13)."""
    argv = [{"test": os.path.join(folder, "test"), "run": scratch_run[0], ".": folder}.get(a, a)
            for a in mode]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "finetune.py"), *map(str, argv),
                             "--workers", "0",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == "", err


def test_an_epoch_is_saved_before_its_line_is_printed(folder, tmp_path):
    """`| head -2`: the run stops at the line it cannot print, and the epoch that line reports is
    kept."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "finetune.py"), *map(str, SCRATCH),
                             "--data-dir", folder, "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("scratch: resnet18"):  # the run's header: epoch 1's line comes next
            break
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == "", err
    history = torch.load(tmp_path / "model.pt", weights_only=True)["history"]
    assert [m["epoch"] for m in history] == [1]


def test_full_disk_keeps_the_last_whole_checkpoint(folder, tmp_path, capsys, monkeypatch):
    full_disk(monkeypatch, "model.pt", at_call=2)  # the second epoch's checkpoint
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 2,
                             "--batch-size", 8, "--workers", 0, "--out", tmp_path)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot write {tmp_path / 'model.pt'} (No space left on device); free some space" in err
    assert len(torch.load(tmp_path / "model.pt", weights_only=True)["history"]) == 1
    assert not (tmp_path / "model.pt.part").exists()
