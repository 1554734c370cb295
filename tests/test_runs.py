"""A run and its folder (beyond.runs): --compare and several learning rates, one run (or one
plan's runs) per folder, a finished run never trained over, and what its folder holds."""
import json
import os
import shutil

import pytest
import torch

from beyond import devices, pictures

from conftest import SCRATCH, run_cli


def test_compare_and_several_lrs(folder, tmp_path, capsys, compare_run):
    both, out = compare_run
    table = out.split("book")[-1]
    assert "pretrained" in table and "test acc 0.940" in table
    assert "scratch" in table and "test acc 0.850" in table
    assert (both / "pretrained" / "model.pt").exists() and (both / "scratch" / "model.pt").exists()
    status, out, _ = run_cli(capsys, "--scratch", "--lr", "1e-4", "1e-3", "--data-dir", folder,
                             "--epochs", 1, "--batch-size", 8, "--workers", 0,
                             "--out", tmp_path / "lrs")
    assert status == 0 and "scratch-lr0.0001" in out and "scratch-lr0.001" in out
    assert json.load(open(tmp_path / "lrs" / "scratch-lr0.001" / "metrics.json"))["lr"] == 1e-3


def test_a_finished_run_is_never_overwritten(folder, tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path, dirs_exist_ok=True)  # SCRATCH, run once into tmp_path
    argv = [*SCRATCH, "--data-dir", folder, "--out", tmp_path]
    before = (tmp_path / "model.pt").read_bytes()
    status, out, err = run_cli(capsys, *argv)  # the same command again: nothing left to do
    assert status == 0 and "scratch: finished its 1 epochs already" in out, err
    status, _, err = run_cli(capsys, *argv, "--lr", "1e-3", "--seed", 5)  # another run's options
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert ("was made with other options (--lr: the default there, 0.001 now; --seed: 0 there, "
            "5 now)" in err)
    assert (tmp_path / "model.pt").read_bytes() == before


def test_a_folder_holds_one_run_or_the_runs_of_one_plan(
        folder, tmp_path, capsys, scratch_run, compare_run):
    """A --compare (or several lrs) into a single run's folder, or a single run into a
    --compare's, is refused before any data is read: each would write its curves.png over the
    other's, and resume would find the wrong model.pt. So is a run of the other mode."""
    pytest.importorskip("matplotlib")  # the pictures it checks
    shutil.copytree(scratch_run[0], tmp_path / "one")
    shutil.copytree(compare_run[0], tmp_path / "both")
    before = {name: (tmp_path / name / "curves.png").read_bytes() for name in ("one", "both")}
    for into, argv in (("one", ["--compare"]), ("one", ["--scratch", "--lr", "1e-3", "2e-3"]),
                       ("both", ["--scratch"])):
        status, out, err = run_cli(capsys, *argv, "--data-dir", folder, "--epochs", 1,
                                   "--batch-size", 8, "--workers", 0, "--out", tmp_path / into)
        assert (status == 2 and f"--out {tmp_path / into} holds another run" in err
                and "data ready" not in out), err
    status, out, err = run_cli(capsys, "--pretrained", "--data-dir", folder, "--epochs", 1,
                               "--workers", 0, "--out", tmp_path / "one")
    assert (status == 2 and "--compare: scratch there, pretrained now" in err
            and "data ready" not in out), err
    assert {name: (tmp_path / name / "curves.png").read_bytes()
            for name in ("one", "both")} == before
    assert sorted(os.listdir(tmp_path / "both")) == sorted(os.listdir(compare_run[0]))


def test_the_same_command_from_another_folder_continues_the_run(
        folder, tmp_path, capsys, monkeypatch, scratch_run):
    """The default data_root, ./data, is another folder from another working folder, and where
    downloads go changes no data: the run is found finished, not refused."""
    shutil.copytree(scratch_run[0], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(capsys, *SCRATCH, "--data-dir", folder, "--out", tmp_path / "run")
    assert status == 0 and "scratch: finished its 1 epochs already" in out, err


def test_a_second_run_on_the_same_folder_is_refused(folder, tmp_path, capsys, compare_run):
    """A folder is locked while a run writes to it; a compare's runs lock their own folders too,
    where one of them may be continued alone."""
    import fcntl
    os.makedirs(tmp_path / "run")
    shutil.copytree(compare_run[0], tmp_path / "both")
    for locked, argv in ((tmp_path / "run", ["--scratch", "--data-dir", folder, "--out",
                                             tmp_path / "run"]),
                         (tmp_path / "both" / "scratch", ["--resume", tmp_path / "both",
                                                          "--epochs", 2])):
        with open(locked / ".lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # a run writing there now
            status, out, err = run_cli(capsys, *argv)
        assert status == 2 and f"another run is writing to {locked};" in err, err
        assert "epoch" not in out
    assert not (tmp_path / "both" / ".lock").exists()


def test_a_finished_run_writes_again_the_results_it_lacks(folder, tmp_path, capsys, scratch_run):
    pytest.importorskip("matplotlib")  # the pictures it checks
    # SCRATCH, one epoch, into tmp_path
    shutil.copytree(scratch_run[0], tmp_path, dirs_exist_ok=True)
    argv = [*SCRATCH, "--data-dir", folder, "--out", tmp_path]
    written = json.load(open(tmp_path / "metrics.json"))
    for name in ("metrics.json", "curves.png"):  # as if the run had stopped after its last model.pt
        os.remove(tmp_path / name)
    status, out, err = run_cli(capsys, *argv)
    assert (status == 0 and "finished its 1 epochs already" in out
            and "balanced accuracy" in out), err
    again = json.load(open(tmp_path / "metrics.json"))
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert again["per_class"] == written["per_class"] and again["history"] == written["history"]
    for damaged in ('{"history": [', '{"history": [1]}'):  # by hand: not JSON, or not this run's
        (tmp_path / "metrics.json").write_text(damaged)
        status, _, err = run_cli(capsys, *argv)
        assert (status == 0 and json.load(open(tmp_path / "metrics.json"))["history"]
                == written["history"]), err


def test_a_folder_where_a_file_is_written_is_one_line(folder, tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "metrics.json")
    (tmp_path / "metrics.json").mkdir()  # the file written again, where a folder stands
    status, _, err = run_cli(capsys, *SCRATCH, "--data-dir", folder, "--out", tmp_path)
    assert status == 2 and err.strip().splitlines() == [
        f"error: cannot write {tmp_path / 'metrics.json'} (Is a directory); a folder stands where "
        "the file would be; move it away"], err


def test_a_diverging_run_writes_strict_json(folder, tmp_path, capsys, monkeypatch):
    """...and its NaN outputs predict nothing: never right (argmax would call them class 0, here
    half of each set), in the training accuracy too, in no column of the confusion matrix, each in
    mistakes.png, and refused by --predict."""
    argv = ["--compare", "--data-dir", folder, "--epochs", 2, "--lr", "1e8", "--precision", "fp32",
            "--batch-size", 4, "--workers", 0, "--out", tmp_path]
    captions = []
    monkeypatch.setattr(pictures, "grid",
                        lambda rows, texts, path, scale: captions.append(sum(texts, [])))
    assert run_cli(capsys, *argv)[0] == 0
    assert [len(texts) for texts in captions] == [4, 4]  # the 4 test images, in both runs
    assert all(text.endswith("\npred nothing (NaN)") for texts in captions
               for text in texts), captions
    losses = []
    for name in ("pretrained", "scratch"):
        text = (tmp_path / name / "metrics.json").read_text()
        metrics = json.loads(text,
                             parse_constant=lambda word: pytest.fail(f"{word} in metrics.json"))
        losses += [m["loss"] for m in metrics["history"]]
        assert ([m["test_acc"] for m in metrics["history"]] == [0, 0]
                and metrics["history"][-1]["train_acc"] == 0  # training on NaN outputs too
                and metrics["balanced_accuracy"] == 0)
        assert (metrics["confusion"] == [[0, 0], [0, 0]]
                and [c["count"] for c in metrics["per_class"].values()] == [2, 2])
    assert None in losses  # a run diverged
    # finished: the results read back, and the table printed
    status, out, err = run_cli(capsys, *argv)
    assert status == 0 and "nan" in out.split("book")[-1], err
    status, out, err = run_cli(capsys, "--predict", folder, "--model", tmp_path / "scratch",
                               "--out", tmp_path / "p")
    # where autocast runs, its type may have overflowed
    dtype = devices.amp_dtype(torch.device("cpu"))
    overflow = f", or its {dtype} arithmetic overflowed: try the precision fp32" if dtype else ""
    assert status == 2 and err.endswith("best.pt gives outputs that are not numbers (NaN) for "
                                        "every image: its training diverged, and should be "
                                        f"trained again with a lower lr{overflow}\n"), err
