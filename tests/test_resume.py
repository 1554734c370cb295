"""Continuing a run (--resume, runs.resume, beyond.checkpoints): the same weights as a run
never stopped, only with the options it began with, its data folder moved, and what it refuses."""
import importlib.util
import json
import os
import shutil

import pytest
import torch
import torchvision

import data
import finetune
import models
from beyond import UserError, checkpoints, cli, loaders, predict, runs

from conftest import SCRATCH, class_folders_alone, run_cli, write_folder


# ---------------------------------------------------------------- the same run, continued
def test_resume_ends_with_the_same_weights(folder, tmp_path, capsys):
    common = ["--scratch", "--data-dir", folder, "--batch-size", 4, "--workers", 0, "--lr", "1e-3"]
    assert run_cli(capsys, *common, "--epochs", 2, "--out", tmp_path / "whole")[0] == 0
    assert run_cli(capsys, *common, "--epochs", 1, "--out", tmp_path / "cut")[0] == 0
    status, out, _ = run_cli(capsys, "--resume", tmp_path / "cut" / "model.pt", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out and "epoch 1:" not in out
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    for name, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert whole["history"][1]["loss"] == resumed["history"][1]["loss"]


def test_restore_puts_back_the_weights_the_optimizer_and_the_random_numbers(tmp_path):
    """What checkpoints.save keeps, checkpoints.restore puts back into a fresh net and optimizer:
    the weights, the optimizer's state (the book's SGD keeps none, so momentum stands in here for
    any that does) and the random numbers that draw the next crops and shuffles."""
    import random
    torch.manual_seed(0)
    net = models.scratch_net(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    history = [{"epoch": 1, "test_acc": 0.5}]
    checkpoints.save(str(tmp_path), history, {"held_out": None},
              dict(model=net.state_dict(), optimizer=optimizer.state_dict(), scaler={}))
    draws = torch.rand(3), random.random()  # what comes next, after the save
    torch.manual_seed(1)
    fresh = models.scratch_net(2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoints.restore(ckpt, fresh, fresh_optimizer,
                               torch.amp.GradScaler("cpu", enabled=False)) == history
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1]
    assert all(torch.equal(value, fresh.state_dict()[name])
               for name, value in net.state_dict().items())
    momentum = [optimizer.state[p]["momentum_buffer"] for p in net.parameters()]
    assert all(torch.equal(m, fresh_optimizer.state[p]["momentum_buffer"])
               for m, p in zip(momentum, fresh.parameters()))


def test_resume_finishes_every_run_of_a_compare(folder, tmp_path, capsys, compare_run):
    shutil.copytree(compare_run[0], tmp_path / "both")  # --compare, one epoch, batch 8
    shutil.rmtree(tmp_path / "both" / "scratch")  # as if stopped before scratch's first epoch
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both")
    assert status == 0, err
    assert "pretrained: finished its 1 epochs already" in out and "scratch: resnet18" in out
    # the table
    assert "pretrained " in out.split("\nrun ")[1] and "scratch " in out.split("\nrun ")[1]
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both" / "scratch" / "model.pt",
                               "--epochs", 2)
    # the run named, alone
    assert status == 0 and out.count("epoch 2:") == 1 and "scratch: resnet18" in out, err
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both" / "scratch", "--epochs", 3)
    # its folder: that run alone
    assert status == 0 and out.count("epoch 3:") == 1 and "pretrained" not in out, err
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both" / "scratch", "--lr", "5e-4",
                               "--epochs", 4)  # the scratch run's own lr, typed out: no change
    assert status == 0 and out.count("epoch 4:") == 1, err
    pretrained = tmp_path / "both" / "pretrained" / "metrics.json"
    assert [m["epoch"] for m in json.load(open(pretrained))["history"]] == [1]
    status, _, err = run_cli(capsys, "--resume", tmp_path / "both")  # 1 and 4 epochs: how many?
    assert status == 2 and ("(pretrained to 1, scratch to 4 epochs): they train to several totals; "
                            "give --epochs anew") in err, err
    curves = tmp_path / "both" / "curves.png"
    curves.unlink(missing_ok=True)
    status, _, err = run_cli(capsys, "--resume", tmp_path / "both", "--epochs", 2)
    assert status == 2 and "scratch/model.pt has trained 4 epochs, more than --epochs 2" in err
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both", "--epochs", 4)
    # the folder: every run, and its curves drawn again
    assert status == 0 and out.count("epoch 4:") == 1 and "pretrained: resnet18" in out, err
    assert [m["epoch"] for m in json.load(open(pretrained))["history"]] == [1, 2, 3, 4]
    assert curves.exists() or not importlib.util.find_spec("matplotlib")  # drawn where it can be
    assert run_cli(capsys, "--resume", tmp_path / "both" / "pretrained", "--epochs", 5)[0] == 0
    shutil.rmtree(tmp_path / "both" / "scratch")  # to begin anew beside a run continued alone
    status, _, err = run_cli(capsys, "--resume", tmp_path / "both")
    assert status == 2 and ("(pretrained to 5 epochs): scratch begins beside pretrained, continued "
                            "alone; give --epochs anew to say how many") in err, err


def test_a_run_is_the_one_its_checkpoint_holds_whatever_its_folders_name(
        folder, tmp_path, capsys, compare_run):
    """A run of a --compare copied under another name continues there, alone; in the folder of
    several runs, a run in another's folder is refused, not continued as that one."""
    shutil.copytree(compare_run[0] / "scratch", tmp_path / "mine")
    status, out, err = run_cli(capsys, "--resume", tmp_path / "mine", "--epochs", 2)
    assert status == 0 and out.count("epoch 2:") == 1 and f"wrote {tmp_path / 'mine'}" in out, err
    status, out, err = run_cli(capsys, "--resume", tmp_path / "mine" / "model.pt", "--epochs", 3,
                               "--out", tmp_path / "mine", "--lr", "5e-4")  # its own, typed
    assert status == 0 and out.count("epoch 3:") == 1, err
    metrics = json.load(open(tmp_path / "mine" / "metrics.json"))
    assert metrics["name"] == "scratch" and [m["epoch"] for m in metrics["history"]] == [1, 2, 3]
    swapped = tmp_path / "swapped"
    shutil.copytree(compare_run[0] / "scratch", swapped / "pretrained")
    shutil.copytree(compare_run[0] / "pretrained", swapped / "scratch")
    status, _, err = run_cli(capsys, "--compare", "--data-dir", folder, "--epochs", 2,
                             "--batch-size", 8, "--workers", 0, "--out", swapped)
    assert status == 2 and (f"{swapped / 'pretrained' / 'model.pt'} holds the run scratch, not "
                            "pretrained, whose folder it is in; put each run") in err, err
    status, _, err = run_cli(capsys, "--resume", swapped, "--epochs", 2)
    assert status == 2 and "holds the run scratch, not pretrained" in err, err
    status, out, err = run_cli(capsys, "--resume", swapped / "scratch", "--epochs", 2)
    assert status == 0 and "pretrained: resnet18" in out and "scratch:" not in out, err
    assert sorted(os.listdir(tmp_path)) == ["mine", "swapped"]
    # a checkpoint written before name, mode and lr stood at its top, in "run"
    ckpt = torch.load(tmp_path / "mine" / "model.pt", weights_only=False)
    ckpt["run"] = {key: ckpt.pop(key) for key in ("name", "mode", "lr")}
    torch.save(ckpt, tmp_path / "mine" / "model.pt")
    status, out, err = run_cli(capsys, "--resume", tmp_path / "mine", "--epochs", 4)
    assert status == 0 and out.count("epoch 4:") == 1 and "scratch: resnet18" in out, err


def test_a_compares_folder_continues_only_what_its_checkpoints_tell(
        folder, tmp_path, capsys, compare_run):
    """A link continues the run it leads to; a folder holding only scratch, in pretrained/, is
    refused; other lrs for a compare's folder are a change; what only a pretrained run reads is
    refused for scratch alone; and a pretrained run that begins anew from scratch's options needs
    it again, which scratch's checkpoint does not keep."""
    shutil.copytree(compare_run[0] / "scratch", tmp_path / "run" / "scratch")
    os.makedirs(tmp_path / "link")
    os.symlink(tmp_path / "run" / "scratch" / "model.pt", tmp_path / "link" / "model.pt")
    for epochs, given in ((2, tmp_path / "link" / "model.pt"), (3, tmp_path / "link")):
        status, out, err = run_cli(capsys, "--resume", given, "--epochs", epochs)
        assert status == 0 and f"wrote {tmp_path / 'run' / 'scratch'}\n" in out, err
    assert os.listdir(tmp_path / "link") == ["model.pt"]
    copy = tmp_path / "run" / "scratch" / "copy.pt"  # a run continued alone, named otherwise
    shutil.copy(tmp_path / "run" / "scratch" / "model.pt", copy)
    status, out, err = run_cli(capsys, "--resume", copy)  # as it began
    assert status == 0 and "scratch: finished its 3 epochs already" in out, err
    shutil.copytree(compare_run[0] / "scratch", tmp_path / "one" / "pretrained")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "one", "--epochs", 2)
    assert status == 2 and "holds the run scratch, not pretrained" in err, err
    shutil.copytree(compare_run[0], tmp_path / "both")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "both", "--lr", "1e-3", "2e-3")
    assert status == 2 and "(--lr: the default there, 0.001 0.002 now)" in err, err
    status, _, err = run_cli(capsys, "--resume", tmp_path / "both" / "scratch", "--freeze")
    assert status == 2 and "--freeze changes the pretrained net, and " in err, err
    shutil.rmtree(tmp_path / "both" / "pretrained")
    ckpt = torch.load(tmp_path / "both" / "scratch" / "model.pt", weights_only=False)
    ckpt["args"]["typed"].append("freeze")  # as if the compare was given --freeze
    torch.save(ckpt, tmp_path / "both" / "scratch" / "model.pt")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "both")
    assert status == 2 and "keeps no value of --freeze (the compare was given them)" in err, err
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both", "--freeze")
    assert status == 0 and "pretrained: resnet18" in out, err
    pretrained = torch.load(tmp_path / "both" / "pretrained" / "model.pt", weights_only=False)
    assert pretrained["args"]["freeze"] is True


def test_a_run_continued_past_its_metrics_reports_its_checkpoint(
        folder, tmp_path, capsys, scratch_run):
    # SCRATCH, one epoch, into tmp_path
    shutil.copytree(scratch_run[0], tmp_path, dirs_exist_ok=True)
    argv = [*SCRATCH, "--data-dir", folder, "--out", tmp_path]
    metrics = (tmp_path / "metrics.json").read_text()
    assert run_cli(capsys, *argv, "--epochs", 2)[0] == 0
    (tmp_path / "metrics.json").write_text(metrics)  # as if stopped after epoch 2's checkpoint
    trained = runs.resume(str(tmp_path), epochs=2)
    assert [m["epoch"] for m in trained.results[0]["history"]] == [1, 2]


def test_a_cpu_run_resumes_on_the_cpu_on_a_machine_with_gpus(folder, tmp_path, capsys, monkeypatch):
    assert run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                   "--workers", 0, "--device", "cpu", "--out", tmp_path)[0] == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(cli, "on_all_gpus",
                        lambda *a: pytest.fail("a process per GPU for a --device cpu run"))
    status, out, err = run_cli(capsys, "--resume", tmp_path / "model.pt", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out, err
    assert runs.asked_device({"resume": str(tmp_path)}) == "cpu"  # the run's own
    assert runs.asked_device({"resume": str(tmp_path), "device": "cuda"}) == "cuda"  # given anew
    assert runs.asked_device({"mode": "scratch"}) is None  # a new run: the best there is
    assert runs.asked_device({"resume": str(tmp_path / "none")}) is None  # resume names it


def test_a_run_on_the_machines_workers_continues_on_this_machines(folder, tmp_path, monkeypatch):
    """workers left out is the machine's default (one per core): continued on another machine, a
    run takes that machine's; typed, its own."""
    def machine(count):
        monkeypatch.setattr(loaders, "default_workers", lambda w=None: count if w is None else w)
    machine(0)
    runs.train_runs("scratch", str(tmp_path / "a"), data_dir=folder, epochs=1, batch_size=8)
    runs.train_runs("scratch", str(tmp_path / "b"), data_dir=folder, epochs=1, batch_size=8,
                    workers=0)
    machine(1)
    for run, workers in (("a", 1), ("b", 0)):
        assert runs.resume(str(tmp_path / run), epochs=2).results[0]["args"]["workers"] == workers


def test_a_checkpoint_from_a_machine_with_more_gpus_resumes(tmp_path, monkeypatch):
    """Older checkpoints held every GPU's random-number state, and taking 8 back on a machine
    with fewer raised IndexError. CUDA is simulated: is_available says yes, and restoring
    GPU states fails as it does with fewer GPUs."""
    net = models.scratch_net(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    old = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {},
           "history": [{"epoch": 1}],
           "rng": {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
                   "cuda": [torch.cuda.default_generators[0].get_state()
                            if torch.cuda.is_available()
                            else torch.get_rng_state()] * 8}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert len(checkpoints.restore(old, net, optimizer,
                                   torch.amp.GradScaler("cpu", enabled=False))) == 1
    checkpoints.save(str(tmp_path), [{"epoch": 1, "test_acc": 0.5}], {"held_out": None},
                     {"model": net.state_dict()})
    assert [set(state) for state in torch.load(tmp_path / "model.pt",
                                               weights_only=True)["rng"]] == [{"torch", "python"}]


# ---------------------------------------------------------------- only as it began
def test_resume_refuses_another_architecture(folder, tmp_path, capsys, scratch_run):
    ckpt = torch.load(scratch_run[0] / "model.pt", weights_only=True)
    ckpt["model"] = torchvision.models.resnet34(num_classes=2).state_dict()
    torch.save(ckpt, tmp_path / "other.pt")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "other.pt", "--epochs", 2)
    assert status == 2 and "another architecture" in err


def test_resume_refuses_another_class_set(folder, tmp_path, capsys, scratch_run):
    ckpt = torch.load(scratch_run[0] / "model.pt", weights_only=True)
    three = {"a": (0, 0, 0), "b": (1, 1, 1), "c": (2, 2, 2)}
    ckpt["args"]["data_dir"] = write_folder(tmp_path / "three", 1, 1, classes=three)
    torch.save(ckpt, tmp_path / "other.pt")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "other.pt", "--epochs", 2)
    assert status == 2 and "trained on classes" in err


def test_resume_refuses_other_options_and_stores_absolute_paths(
        folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folder, tmp_path / "d")
    assert run_cli(capsys, "--scratch", "--data-dir", "d", "--epochs", 1, "--batch-size", 8,
                   "--workers", 0, "--out", "run")[0] == 0
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert (ckpt["args"]["data_dir"] == str(tmp_path / "d")
            and ckpt["args"]["out"] == str(tmp_path / "run"))
    status, _, err = run_cli(capsys, "--resume", "run", "--epochs", 2, "--batch-size", 4,
                             "--precision", "fp32")
    assert status == 2 and err.strip() == (f"error: {tmp_path / 'run' / 'model.pt'} was made with "
                                           "other options (--batch-size: 8 there, 4 now; "
                                           "--precision: amp there, fp32 now); continue it with "
                                           "the same, or train a new run in another --out")
    # typed, though the default
    status, _, err = run_cli(capsys, "--resume", "run", "--batch-size", 128)
    assert status == 2 and "--batch-size: 8 there, 128 now" in err
    monkeypatch.chdir(folder)  # from another folder, with options that may change
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2, "--workers", 1)
    assert status == 0 and "epoch 2:" in out, err


def test_resume_refuses_another_out_and_takes_the_recipes_lr_typed(tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path / "run")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--out", tmp_path / "new",
                             "--epochs", 2)
    assert (status == 2 and len(err.strip().splitlines()) == 1
            and "continues in its own folder" in err)
    assert "leave --out out" in err and not (tmp_path / "new").exists()
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--lr", "5e-4", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out, err  # the recipe's 5e-4, which the run began with
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 1)  # fewer than 2
    assert status == 2 and err.strip().endswith("has trained 2 epochs, more than --epochs 1; "
                                                "give --epochs 2 or more"), err
    assert (tmp_path / "run" / "metrics.json").read_text() == metrics


def test_runs_of_either_kind_continue_only_as_they_began_and_flags_stay_apart_from_paths(
        folder, tmp_path, capsys, monkeypatch):
    # what train_fine_tuning(..., out=) once kept: no mode among its options
    old = tmp_path / "python"
    os.makedirs(old)
    torch.save({"model": models.scratch_net().state_dict(), "history": [{"epoch": 1}],
                "args": {"learning_rate": 5e-4},
                "arch": None, "classes": ["hotdog", "not-hotdog"],
                "transform": dict(resize=256, crop=224, interpolation="bilinear", mean=data.MEAN,
                                  std=data.STD)},
               old / "model.pt")
    status, _, err = run_cli(capsys, "--resume", old, "--epochs", 2)
    assert (status == 2 and "older train.train_fine_tuning" in err
            and len(err.strip().splitlines()) == 1)
    # it still predicts
    assert len(predict.predict(old, [os.path.join(folder, "test")], workers=0,
                               arch="resnet18")) == 4
    for argv in (["--scratch", "--model", "x.pt"], ["--resume", "run", "--model", "x.pt"]):
        with pytest.raises(SystemExit):
            finetune.main(argv)
        assert "--model goes with --predict" in capsys.readouterr().err
    status, _, err = run_cli(capsys, "--scratch", "--freeze", "--data-dir", folder,
                             "--out", tmp_path / "x")
    assert status == 2 and "--freeze changes the pretrained net" in err
    # a failed first run leaves no run folder behind, and a path keeps its = signs
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "lr=0.1")
    assert status == 2 and f"--data-dir {tmp_path / 'lr=0.1'} is not a folder" in err
    assert not os.path.exists("runs")  # nor the runs/ made for it


def test_a_best_pt_without_its_model_pt_is_trained_over_only_by_its_own_run(
        folder, tmp_path, capsys, scratch_run):
    """A run's folder that holds best.pt alone (its model.pt deleted, or best.pt copied in to
    predict): a run with other options would write over it, so it is refused; the same run (one
    stopped between writing best.pt and model.pt) trains again, where best.pt keeps epoch 1."""
    shutil.copytree(scratch_run[0], tmp_path / "run")
    os.remove(tmp_path / "run" / "model.pt")
    before = {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(tmp_path / "run")}
    status, _, err = run_cli(capsys, *SCRATCH, "--data-dir", folder, "--seed", 5,
                             "--out", tmp_path / "run")
    assert status == 2 and err.startswith(f"error: {tmp_path / 'run' / 'best.pt'} was made with "
                                          "other options (--seed: 0 there, 5 now); continue it "
                                          "with the same, or train"), err
    assert {name: (tmp_path / "run" / name).read_bytes()
            for name in os.listdir(tmp_path / "run")} == before
    status, out, err = run_cli(capsys, *SCRATCH, "--data-dir", folder, "--out", tmp_path / "run")
    assert status == 0 and "epoch 1:" in out and (tmp_path / "run" / "model.pt").exists(), err
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    best["history"].append(dict(best["history"][0], epoch=2))  # as if it kept epoch 2 of more
    torch.save(best, tmp_path / "run" / "best.pt")
    os.remove(tmp_path / "run" / "model.pt")
    status, _, err = run_cli(capsys, *SCRATCH, "--data-dir", folder, "--out", tmp_path / "run")
    assert status == 2 and "best.pt keeps epoch 2 of a run whose model.pt is gone" in err, err
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["history"][1]["epoch"] == 2


def test_a_folder_of_several_runs_names_them_and_a_copy_inside_a_run_never_stands_in(
        tmp_path, capsys, scratch_run, compare_run):
    """--predict, --export and --resume never pick one of several runs silently: a --compare's
    folder predicts with neither, and a folder of two trainings continues neither. A run's own
    model.pt comes before a copy in a folder inside it (backup/ sorts before model.pt)."""
    for name in ("a-run", "b-run"):
        shutil.copytree(scratch_run[0], tmp_path / "runs" / name)
    for argv in (["--predict", tmp_path, "--model", compare_run[0], "--out", tmp_path / "p"],
                 ["--export", compare_run[0], "--out", tmp_path / "best.pt2"],
                 ["--resume", tmp_path / "runs", "--epochs", 2]):
        status, out, err = run_cli(capsys, *argv)
        assert (status == 2 and " holds several runs (" in err
                and "give the folder of one of them" in err), err
    run = tmp_path / "runs" / "a-run"
    (run / "backup").mkdir()
    shutil.copy(run / "model.pt", run / "backup")
    assert (checkpoints.checkpoint_in(run) == str(run / "model.pt")
            and checkpoints.checkpoints_in(run) == [str(run / "model.pt")])
    assert checkpoints.kept_in(run) == str(run / "best.pt")
    # a run begun before best.pt: its model.pt predicts
    os.replace(run / "best.pt", run / "backup" / "best.pt")
    assert checkpoints.kept_in(run) == str(run / "model.pt")
    shutil.copytree(compare_run[0], tmp_path / "both")
    # one best.pt among several runs names no run either
    os.remove(tmp_path / "both" / "pretrained" / "best.pt")
    with pytest.raises(UserError,
                       match=r" holds several runs \(pretrained, scratch\); give the folder of one "
                             r"of them$"):
        checkpoints.kept_in(tmp_path / "both")
    # a compare's folder, and another training's run
    shutil.copytree(scratch_run[0], tmp_path / "both" / "zzz")
    with pytest.raises(UserError,
                       match=r" holds several runs \(pretrained, scratch, zzz\); give the folder "
                             r"of one of them, or put each run of the training back in the folder "
                             r"named after it \(pretrained, scratch\)$"):
        runs.resume(tmp_path / "both")
    # runs that keep their best.pt alone: the folder of one finds it
    for name in ("pretrained", "scratch", "zzz"):
        os.remove(tmp_path / "both" / name / "model.pt")
    shutil.rmtree(tmp_path / "both" / "pretrained")
    shutil.move(tmp_path / "both" / "zzz", tmp_path / "zzz")
    assert checkpoints.kept_in(tmp_path / "both") == str(tmp_path / "both" / "scratch" / "best.pt")


# ---------------------------------------------------------------- its data, moved or changed
def test_resume_with_the_data_folder_moved(folder, tmp_path, capsys):
    """--resume RUN --data-dir NEW continues where NEW holds the same classes (a split folder
    holds out the same images); where not, one line names the difference. The same command
    again with NEW is refused: it names another data folder, which may hold other images."""
    shutil.copytree(folder, tmp_path / "d")
    argv = ["--epochs", 1, "--batch-size", 4, "--workers", 0]
    assert run_cli(capsys, "--scratch", "--data-dir", tmp_path / "d", *argv,
                   "--out", tmp_path / "run")[0] == 0
    # the same folder, through a link: the same command
    os.symlink(tmp_path / "d", tmp_path / "link")
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "link", *argv,
                               "--out", tmp_path / "run")
    assert status == 0 and "finished its 1 epochs already" in out, err
    os.rename(tmp_path / "d", tmp_path / "moved")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "moved", *argv,
                             "--out", tmp_path / "run")
    assert status == 2 and (f"(--data-dir: {tmp_path / 'd'} there, {tmp_path / 'moved'} now); "
                            "continue it with the same (a data folder moved: resume the run with "
                            "--data-dir where it is now), or train") in err, err
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run",
                               "--data-dir", tmp_path / "moved", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out, err
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["args"]["data_dir"] == str(tmp_path / "moved")
    three = write_folder(tmp_path / "three", 1, 1,
                         classes={"a": (0, 0, 0), "b": (1, 1, 1), "c": (2, 2, 2)})
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--data-dir", three,
                             "--epochs", 3)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "was trained on classes ['hotdog', 'not-hotdog'], not ['a', 'b', 'c']" in err
    flat = class_folders_alone(tmp_path / "flat", counts=(5, 5))
    assert run_cli(capsys, "--scratch", "--data-dir", flat, *argv,
                   "--out", tmp_path / "split")[0] == 0
    held_out = (tmp_path / "split" / "held_out.txt").read_text()
    os.rename(flat, tmp_path / "flat2")
    status, out, err = run_cli(capsys, "--resume", tmp_path / "split",
                               "--data-dir", tmp_path / "flat2", "--epochs", 2)
    assert status == 0 and "testing on 2 of 10 images" in out, err
    assert (tmp_path / "split" / "held_out.txt").read_text() == held_out
    for path in held_out.splitlines():  # the images it held out are gone
        os.remove(tmp_path / "flat2" / path)
    status, _, err = run_cli(capsys, "--resume", tmp_path / "split",
                             "--data-dir", tmp_path / "flat2", "--epochs", 3)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "held out for testing" in err, err


def test_a_continued_runs_missing_data_and_damaged_best_pt_are_named_with_their_fix(
        tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    ckpt["args"]["data_dir"] = str(tmp_path / "moved")
    torch.save(ckpt, tmp_path / "run" / "model.pt")
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2)
    assert status == 2 and "data ready" not in out, err
    assert err == (f"error: --data-dir {tmp_path / 'moved'}, the run's data folder, is not a "
                   "folder; give --data-dir where it is now\n")
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--data-dir",
                               tmp_path / "typo", "--epochs", 2)  # a path just typed: not the run's
    assert status == 2 and err == (f"error: --data-dir {tmp_path / 'typo'} is not a folder; give "
                                   "--data-dir where the run's data folder is now\n")
    (tmp_path / "run" / "best.pt").write_bytes((tmp_path / "run" / "best.pt").read_bytes()[:1000])
    status, out, err = run_cli(capsys, "--predict", tmp_path, "--model", tmp_path / "run",
                               "--out", tmp_path / "p")
    assert status == 2 and err == (f"error: {tmp_path / 'run' / 'best.pt'} is not a checkpoint "
                                   "of this program; put back a whole copy, or delete it to keep "
                                   "the run's last epoch, its model.pt, in its place\n")
    # not a run's: no run's epoch takes its place
    os.replace(tmp_path / "run" / "best.pt", tmp_path / "best.pt")
    with pytest.raises(UserError,
                       match="best.pt is not a checkpoint of this program; give the model.pt of a "
                             "training run$"):
        checkpoints.load_checkpoint(str(tmp_path / "best.pt"))


def test_a_run_continues_without_the_val_split_it_never_read(folder, tmp_path, capsys, scratch_run):
    """A run begun with --val-split on train/ and test/ (taken before such a split was refused)
    continues without it: it split nothing, so the split is no change."""
    shutil.copytree(scratch_run[0], tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    ckpt["args"]["val_split"] = 0.3
    torch.save(ckpt, tmp_path / "run" / "model.pt")
    status, out, err = run_cli(capsys, *SCRATCH[:2], 2, *SCRATCH[3:], "--data-dir", folder,
                               "--out", tmp_path / "run")
    assert status == 0 and "epoch 2:" in out, err


def test_val_added_or_removed_between_runs_names_the_change_and_the_fix(folder, tmp_path, capsys):
    shutil.copytree(folder, tmp_path / "d")
    argv = ["--data-dir", tmp_path / "d", "--epochs", 1, "--batch-size", 4, "--workers", 0]
    assert run_cli(capsys, "--scratch", *argv, "--out", tmp_path / "run")[0] == 0
    shutil.copytree(tmp_path / "d" / "test", tmp_path / "d" / "val")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"was trained with no val/ beside test/, and {tmp_path / 'd'} now holds val/" in err
    assert ("move it out of the data folder to continue the run, or train a new one in another "
            "--out") in err
    assert run_cli(capsys, "--scratch", *argv, "--out", tmp_path / "run2")[0] == 0
    shutil.rmtree(tmp_path / "d" / "val")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run2", "--epochs", 2)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert ("chose its epochs on val/ and kept test/ for a final test" in err
            and "put them back" in err)


def test_an_option_that_may_not_change_is_refused_as_a_change_first(tmp_path, capsys,
                                                                    scratch_run):
    """Not as going unread: giving --lr-schedule too, as that refusal would ask, is a change."""
    status, _, err = run_cli(capsys, "--resume", scratch_run[0], "--warmup-epochs", 1)
    assert status == 2 and "was made with other options (--warmup-epochs: 0 there, 1 now)" in err
    shutil.copytree(scratch_run[0], tmp_path / "older")  # a run begun before there were schedules
    for name in ("model.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "older" / name, weights_only=False)
        for key in ("lr_schedule", "warmup_epochs"):
            del ckpt["args"][key]
        torch.save(ckpt, tmp_path / "older" / name)
    status, _, err = run_cli(capsys, "--resume", tmp_path / "older", "--epochs", 2,
                             "--warmup-epochs", 1)
    assert status == 2 and "--warmup-epochs warms up a schedule, and --lr-schedule gives" in err


@pytest.mark.parametrize("name", ["run", "model.pt.old"])  # a folder's name is only its name
def test_a_truncated_model_pt_names_its_fix(tmp_path, capsys, scratch_run, name):
    shutil.copytree(scratch_run[0], tmp_path / name)
    model = tmp_path / name / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    status, _, err = run_cli(capsys, "--resume", tmp_path / name, "--epochs", 2)
    assert status == 2 and err == (f"error: {model} is not a checkpoint of this program; it is "
                                   "cut short or damaged; put back a whole copy, or train anew "
                                   "in another --out\n"), err
