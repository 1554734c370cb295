"""A checkpoint's format in one place: what model.pt and best.pt hold, found, read and restored."""
import os
import random

import torch

import models
from beyond import UserError, quoted
from beyond.files import first_line, load_file, saved, write_whole
from beyond.processes import from_process_0, gathered, rank, world_size


def checkpoint_in(path, name="model.pt", one_run=False):
    """A model.pt: path itself, in the folder path, or its runs' first (one_run: only one)."""
    fix = "give the model.pt of a training run, or its folder"
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):  # "": no folder, not "."
        raise UserError(f"{quoted(path)} is not a path; {fix}")
    path = os.path.normpath(path)  # best.pt/ is best.pt
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; {fix}")
    found = [path] if not os.path.isdir(path) else checkpoints_in(path, name)
    if not found:
        raise UserError(f"{path} holds no {name}; {fix}")
    if one_run and len(found) > 1:
        raise several_runs(path, found)
    return found[0]


def several_runs(folder, checkpoints):
    runs = ", ".join(os.path.basename(os.path.dirname(p)) for p in checkpoints)
    return UserError(f"{folder} holds several runs ({runs}); give the folder of one of them")


def checkpoints_in(folder, name="model.pt"):
    """folder's own model.pt, else those of the runs' folders inside it."""
    own = os.path.join(folder, name)
    if os.path.exists(own):
        return [own]
    paths = [os.path.join(folder, run, name) for run in os.listdir(folder)]
    return sorted(p for p in paths if os.path.exists(p))


def kept_in(path):
    """The checkpoint that predicts for path: a file, or a run's best.pt, else its model.pt."""
    folder = isinstance(path, (str, os.PathLike)) and os.path.isdir(path)
    if folder and not checkpoints_in(path) and checkpoints_in(path, "best.pt"):  # copied alone
        return checkpoint_in(path, "best.pt", one_run=True)
    found = checkpoint_in(path, one_run=True)
    best = os.path.join(os.path.dirname(found), "best.pt")
    return best if folder and os.path.exists(best) else found


def load_checkpoint(path):
    """A model.pt or best.pt a run wrote: the weights, the classes, what continuing needs."""
    folder, name = os.path.split(path)
    if name == "best.pt" and os.path.exists(os.path.join(folder, "model.pt")):
        fix = ("put back a whole copy, or delete it to keep the run's last epoch, its model.pt, "
               "in its place")
    elif name == "model.pt" and os.path.exists(os.path.join(folder, "metrics.json")):
        fix = "it is cut short or damaged; put back a whole copy, or train anew in another out="
    elif name.endswith((".pt2", ".onnx")):
        fix = "it is a file --export wrote; give the run's folder, its best.pt or model.pt"
    else:
        fix = "give the model.pt of a training run"
    ckpt = load_file(path, "a checkpoint of this program", fix)
    if not isinstance(ckpt, dict) or "history" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this program; {fix}")
    return dict(ckpt.get("run", {}), **ckpt, path=path)  # older: name, mode and lr in "run"


def same_arch(arch, ckpt):
    held = ckpt.get("arch") or "resnet18"  # None: a net of one's own, read as a resnet18
    if arch and arch != held:
        raise UserError(f"{ckpt['path']} holds a {held}, not a {arch}; leave arch= out")


def saved_net(checkpoint):
    """The net a training run saved, ready to predict (FrozenBatchNorm2d loads any mode's)."""
    arch = checkpoint.get("arch") or "resnet18"  # None: a net of one's own, perhaps a resnet18
    with torch.random.fork_rng(devices=[]):  # the caller's numbers stay as they were
        net = models.freeze_features(models.scratch_net(len(checkpoint["classes"]), arch))
    try:
        net.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise UserError(f"the checkpoint holds the weights of another net than a {arch}; build "
                        "that net and load them into it: "
                        "net.load_state_dict(torch.load(path)['model'])") from None
    return net.eval()


def run_checkpoint(path):
    ckpt = load_checkpoint(path)
    if ckpt.get("is_best", os.path.basename(path) == "best.pt"):  # it would rewind the run
        raise UserError(f"{path} is the epoch a run kept, for prediction; continue the run "
                        "from its model.pt or folder")
    if "mode" not in ckpt["args"]:
        raise UserError(f"{path} was written by an older train.train_fine_tuning(..., out=), "
                        "which no run continues; train a run with beyond.runs.train_runs, or "
                        "predict with the file as it is")
    return ckpt


def save(folder, history, about, state, best=None):
    """Process 0 writes model.pt, best.pt too where best (the epoch's Epoch: best.pt keeps its
    test's probabilities and labels, so that its figures are those of its test acc), and
    held_out.txt after a split."""
    rng = gathered({"torch": torch.get_rng_state(), "python": random.getstate()})
    if rank() == 0:
        checkpoint = {**state, "history": history, "rng": rng, **about, "is_best": False}
        if best:  # first: a model.pt past the epoch best.pt lacks would leave it out for good
            tested = {"test_probs": best.probs, "test_labels": best.labels}
            write_whole(os.path.join(folder, "best.pt"), saved({**checkpoint, "is_best": True,
                                                                **tested}))
        write_whole(os.path.join(folder, "model.pt"), saved(checkpoint))
        if about["held_out"] is not None:
            held_out = "".join(p + "\n" for p in about["held_out"]).encode(errors="surrogateescape")
            write_whole(os.path.join(folder, "held_out.txt"), held_out)  # not UTF-8: as on disk


def restore(ckpt, net, optimizer, scaler, schedule=None):
    """A checkpoint's state put back (random numbers where as many processes); its history."""
    if not ckpt:
        return []
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{ckpt['path']} holds another architecture than this net "
                        f"({first_line(e)}); continue it with the net it was trained "
                        "with") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] and scaler.is_enabled():  # empty when written without fp16
        scaler.load_state_dict(ckpt["scaler"])
    if schedule:  # a run with a schedule continues it (its options are the run's own)
        schedule.load_state_dict(ckpt["schedule"])
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # older: one dict
    if len(states) == world_size():
        torch.set_rng_state(states[rank()]["torch"])
        random.setstate(states[rank()]["python"])
    return list(ckpt["history"])


def kept_epoch(folder, ckpt):
    """The metrics of the epoch best.pt keeps (None for a fresh run), made from ckpt if missing."""
    if not ckpt:
        return None
    best = os.path.join(folder, "best.pt")
    if rank() == 0 and not os.path.exists(best):
        write_whole(best, saved({k: v for k, v in ckpt.items() if k != "path"} | {"is_best": True}))
    return from_process_0(load_checkpoint(best)["history"][-1] if rank() == 0 else None)
