"""A run's folder and its checkpoints: the folder locked while a run writes to it, model.pt after
every epoch (all that continuing needs), continuing from it with the options the run began with,
and metrics.json and the pictures after the last epoch. Without a folder, nothing is written."""
import contextlib
import io
import json
import os
import platform
import random

try:
    import fcntl  # file locks, on Linux and macOS
except ImportError:
    fcntl = None

import torch
import torchvision

import data
import models
import plots
from processes import from_process_0, gathered, rank, world_size
from utils import UserError, first_line, load_file, remove_empty_folders, writable_folder, write_whole

# What may differ when a run continues; every other option must be the one the run began with.
MAY_CHANGE = {"epochs", "device", "workers", "max_megapixels", "cache_gb", "out", "resume", "typed"}
PATHS = {"data_dir", "data_root", "weights"}  # compared as absolute paths


@contextlib.contextmanager
def writing_to(folder):
    """The output folder while a run writes to it: tried (a probe written) before any data is
    read, locked against a second run, and removed again if nothing was written to it. Process 0
    writes; on the others, and without a folder, this does nothing."""
    if folder is None or rank() > 0:
        yield folder
        return
    new = not os.path.exists(folder)
    with open(os.path.join(writable_folder(folder), ".lock"), "w") as lock:
        if fcntl:  # Linux and macOS
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # the lock is the other run's: leave it
                raise UserError(f"another run is writing to {folder}; wait for it to end, or choose another out=") from None
        try:
            yield folder
        finally:
            os.remove(lock.name)  # still held, so no other run takes the folder meanwhile
            if new:
                remove_empty_folders(folder)


# ---------------------------------------------------------------- continuing
def load_checkpoint(path):
    """A model.pt that training wrote: the weights, the classes, the test transforms' settings,
    and what continuing needs."""
    fix = "give the model.pt of a training run"
    ckpt = load_file(path, "a checkpoint of this program", fix)
    if not isinstance(ckpt, dict) or "history" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this program; {fix}")
    return ckpt


def same_arch(arch, ckpt, path):
    """The checkpoint knows its architecture: an arch given beside it must be the same."""
    if arch and arch != ckpt.get("arch", "resnet18"):
        raise UserError(f"{path} holds a {ckpt.get('arch', 'resnet18')}, not a {arch}; leave arch= out")


def held_out(folder):
    """The images a run in folder held out for testing (a split of class folders), as its
    checkpoint keeps them; None where no run there has finished an epoch. What a run that never
    began left behind is never reused."""
    with contextlib.suppress(UserError):
        return folder and load_checkpoint(checkpoint_in(folder)).get("held_out")
    return None


def checkpoint_in(path):
    """A model.pt: path itself, or in the folder path, or in a run's folder inside it (--compare)."""
    found = [path] if not os.path.isdir(path) else sorted(
        p for p in [os.path.join(path, "model.pt")] + [os.path.join(path, name, "model.pt") for name in os.listdir(path)]
        if os.path.exists(p))
    if not found:
        raise UserError(f"{path} holds no model.pt; give the model.pt of a training run, or its folder")
    return found[0]


def described(args, arch, train_set, runtime, **run):
    """What a run's checkpoint and metrics.json say of it: its options (args), its architecture
    and classes, the test transforms' settings (for prediction), how it computes, and the run's
    own figures (name, mode, lr)."""
    return dict(**run, args=args, arch=arch, classes=data.class_names(train_set),  # arch None: a net of one's own
                transform=dict(**models.preprocessing(arch or "resnet18"), mean=data.MEAN, std=data.STD),
                device=str(runtime.device), precision=str(runtime.dtype or torch.float32),
                memory_format=str(runtime.memory_format))


def continued(folder, about, name="model.pt"):
    """The checkpoint in folder to continue, or None for a fresh run (or no folder). Process 0
    reads it and sends it to the others, so that all continue from the same epoch (torchrun
    restarts every process of a job when one fails). A checkpoint of a run described otherwise
    (other options or classes) is refused."""
    path = folder and os.path.join(folder, name)
    ckpt = from_process_0(load_checkpoint(path) if rank() == 0 and path and os.path.exists(path) else None)
    if ckpt:
        classes = about["classes"]
        if ("mode" in ckpt["args"]) != ("mode" in about["args"]):  # one has the command line's options
            raise UserError(f"{path} was written by {'runs' if 'mode' in ckpt['args'] else 'train_fine_tuning'}; "
                            "continue it the way it began, or choose another out=")
        refuse_changes({**ckpt["args"], "layout": ckpt.get("final_split")},
                       {**about["args"], "layout": about.get("final_split")}, path)
        if ckpt["classes"] != classes:
            raise UserError(f"{path} was trained on classes {ckpt['classes']}, not {classes}; "
                            "continue it with the data it was trained on")
        ckpt["path"] = path
    return ckpt


def refuse_changes(before, now, path):
    """A run continues with the options it began with: name those that differ, in one line."""
    def same(key, value):
        return os.path.abspath(value) if key in PATHS and value else value

    def shown(value):
        return "the default" if value is None else " ".join(map(str, value)) if isinstance(value, list) else value

    changed = sorted(k for k in before if k in now and k not in MAY_CHANGE and same(k, before[k]) != same(k, now[k]))
    if changed:
        options = "; ".join(f"{k}: {shown(before[k])} there, {shown(now[k])} now" for k in changed)
        raise UserError(f"{path} was made with other options ({options}); continue it with the same, "
                        "or choose another out=")


def restore(resume, net, optimizer, scaler):
    """Continue a loaded checkpoint: its weights into net, and the optimizer's, the gradient
    scaler's and the random-number states; returns the number of epochs it had finished, 0 for a
    fresh run. The random-number states come back where the processes are as many as they were
    (otherwise each keeps its fresh seed)."""
    if not resume:
        return 0
    if "model" not in resume:  # the epochs before ran in this process (two phases): all is in place
        return len(resume["history"])
    try:
        net.load_state_dict(resume["model"])
    except RuntimeError as e:
        raise UserError(f"{resume.get('path', 'the checkpoint')} holds another architecture than this net "
                        f"({first_line(e)}); continue it with the net it was trained with") from None
    optimizer.load_state_dict(resume["optimizer"])
    if resume["scaler"] and scaler.is_enabled():  # empty when written without fp16
        scaler.load_state_dict(resume["scaler"])
    states = resume["rng"] if isinstance(resume["rng"], list) else [resume["rng"]]  # older: one dict
    if len(states) == world_size():
        torch.set_rng_state(states[rank()]["torch"])
        random.setstate(states[rank()]["python"])
    return len(resume["history"])


def rng_states():
    """Every process's random-number state (each draws its own augmentations). Not the GPUs':
    nothing in training draws from them, and a machine with fewer GPUs could not take them back."""
    return gathered({"torch": torch.get_rng_state(), "python": random.getstate()})


# ---------------------------------------------------------------- saving
def saved(epochs, folder, about, history=(), test_set=None):
    """The epochs of train.fine_tuning_epochs, with the run's folder kept: model.pt after each
    (the run's description `about`, its history and every process's random-number state beside
    the weights), best.pt after each that is the best so far (best_epoch), and after the last,
    metrics.json, the curves and, given the test set, the test images the net gets wrong.
    Without a folder, the epochs as they are."""
    history, epoch = list(history), None
    if folder and rank() == 0:
        writable_folder(folder)  # a run of several has a folder of its own in out
    for epoch in epochs:
        history.append(epoch.metrics)
        if folder:
            save_checkpoint(os.path.join(folder, "model.pt"), epoch, history, about,
                            best=best_epoch(history) is history[-1])
            write_held_out(folder, about.get("held_out"))
        yield epoch
    if folder and epoch and rank() == 0:
        write_results(folder, results(history, epoch, about), epoch, test_set)


def save_checkpoint(path, epoch, history, about, best=False):
    """On every process (each adds its random-number state), and written by process 0, through
    a temporary name: a crash or a full disk never leaves half a checkpoint. It is made in
    memory first, so that any failure to write is the file's OSError, not torch.save's. With
    best, best.pt beside it too."""
    rng = rng_states()
    if rank() == 0:
        buffer = io.BytesIO()
        torch.save({**epoch.state, "history": history, "rng": rng, **about}, buffer)
        if best:  # first: model.pt naming a best epoch that best.pt lacks would mislead
            write_whole(os.path.join(os.path.dirname(path), "best.pt"), buffer.getvalue())
        write_whole(path, buffer.getvalue())


def best_epoch(history):
    """The epoch with the highest accuracy on the evaluation set (the earliest, where several
    tie): the one best.pt keeps."""
    return max(history, key=lambda m: m["test_acc"])


def write_held_out(folder, paths):
    """held_out.txt, beside the checkpoint that keeps the same list: the images a split held out."""
    if paths is not None and rank() == 0:
        write_whole(os.path.join(folder, "held_out.txt"), "".join(p + "\n" for p in paths).encode())


def results(history, epoch, about):
    """What metrics.json holds: the run's description, the last epoch's figures, the mean
    examples/sec, the history, the last evaluation's figures (figures), the epoch best.pt keeps,
    and the versions."""
    return dict(**{k: v for k, v in about.items() if k not in ("transform", "held_out")}, **last_figures(history),
                world_size=world_size(), history=history, **figures(epoch.probs, epoch.labels, about["classes"]),
                kept=kept(history, about), versions=dict(python=platform.python_version(), torch=torch.__version__,
                                                         torchvision=torchvision.__version__))


def kept(history, about):
    """The epoch best.pt keeps, its accuracy, and whether that figure is optimistic: chosen on the
    test set itself, where the data has no val/ beside its test/."""
    best, optimistic = best_epoch(history), not about.get("final_split")
    return dict(epoch=best["epoch"], test_acc=best["test_acc"], optimistic=optimistic,
                note=OPTIMISTIC if optimistic else None)


OPTIMISTIC = ("the epoch was chosen on the test set itself, so its accuracy is optimistic; in a data folder, "
              "val/ beside train/ and test/ keeps test/ apart for one honest figure")


def figures(probs, labels, classes):
    """An evaluation's figures: the confusion matrix (rows: the true class), each class's
    precision, recall, F1 and count, and the balanced accuracy (the mean recall)."""
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    confusion.index_put_((labels, probs.argmax(1)), torch.ones_like(labels), accumulate=True)
    right, count, predicted = confusion.diag().double(), confusion.sum(1).double(), confusion.sum(0).double()
    precision, recall = (torch.nan_to_num(right / n) for n in (predicted, count))  # 0 where none
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall))
    per_class = {name: dict(precision=p, recall=r, f1=f, count=int(n))
                 for name, p, r, f, n in zip(classes, precision.tolist(), recall.tolist(), f1.tolist(), count.tolist())}
    return dict(confusion=confusion.tolist(), per_class=per_class,
                balanced_accuracy=recall[count > 0].mean().item() if (count > 0).any() else 0.0)


def last_figures(history):
    """The last epoch's loss and accuracies, and the mean examples/sec over every epoch."""
    return dict(**{k: history[-1][k] for k in ("loss", "train_acc", "test_acc")},
                examples_per_sec=sum(m["examples_per_sec"] for m in history) / len(history))


def write_results(folder, result, epoch, test_set=None):
    """metrics.json, curves.png and, given the test set, mistakes.png: up to 16 test images the
    net gets wrong, with their true and predicted class."""
    write_metrics(folder, result)
    plots.curves({result.get("name", ""): result["history"]}, os.path.join(folder, "curves.png"))
    if test_set is not None:
        classes, probs, labels = result["classes"], epoch.probs, epoch.labels
        preds = probs.argmax(1)
        wrong = (preds != labels).nonzero().flatten()[:16].tolist()
        plots.mistakes([test_set[i][0] for i in wrong],
                       [f"true {classes[labels[i]]}\npred {classes[preds[i]]} {probs[i].max():.2f}" for i in wrong],
                       os.path.join(folder, "mistakes.png"))


def write_metrics(folder, result):
    write_whole(os.path.join(folder, "metrics.json"), json.dumps(result, indent=1).encode())


def finished(folder, ckpt):
    """A finished run's result: its metrics.json, or, where the run ended before writing it, the
    figures its checkpoint holds."""
    metrics = os.path.join(folder, "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as f:
            result = json.load(f)
        if len(result["history"]) == len(ckpt["history"]):  # else written before the later epochs
            return result
    about = {k: v for k, v in ckpt.items() if k in ("name", "mode", "lr", "classes", "args", "arch", "final_split")}
    return dict(**about, **last_figures(ckpt["history"]), history=ckpt["history"], kept=kept(ckpt["history"], ckpt))
