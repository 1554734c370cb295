"""Whole runs, as the command line makes them and as a notebook can: the runs asked for (one, both
modes for "compare", one per learning rate), each a net built for its mode and trained with the
book's recipe into a folder of its own, continued where that folder holds a checkpoint; and
`resume`, which continues a run with the options it began with.

    import runs
    trained = runs.train_runs("pretrained", data_dir="photos", epochs=3, out="runs/photos")
    trained = runs.resume("runs/photos", epochs=5)     # two more epochs
"""
import contextlib
import os
import random
import time
from dataclasses import dataclass

import torch

import checkpoints
import data
import models
import plots
import train
from processes import join_processes, leave_processes, local_first, rank, say, torchrun_start, world_size
from utils import UserError

# The book's recipe, per mode: base lr, whether fc learns at 10x, and the figures it reports.
RECIPES = {"pretrained": dict(lr=5e-5, param_group=True, book=(0.242, 0.909, 0.940)),
           "scratch": dict(lr=5e-4, param_group=False, book=(0.352, 0.846, 0.850))}
DATASETS = {"hotdog": dict(epochs=5), "cifar10": dict(epochs=10, lr=5e-4, book_test_acc=0.828)}

# Every option of a run, by its Python name (the command line's, with - for _), and its default.
OPTIONS = dict(
    dataset="hotdog", data_dir=None, data_root="data", dummy=False,  # what to train on
    cache_gb=None, val_split=0.2, max_megapixels=200,                 # how to read it
    arch="resnet18", weights=None, freeze=False, init_head_from_imagenet=False,  # the net
    epochs=None, batch_size=128, lr=None, no_param_group=False, seed=0,  # the book's recipe
    workers=None, device=None, precision="amp",                       # where it runs
)


@dataclass
class Run:
    """One training: a name, the book's mode, its learning rate, and where it writes."""
    name: str
    mode: str
    lr: float
    out: str


@dataclass
class Trained:
    """What train_runs and resume return: the folder they wrote, and one result per run (as its
    metrics.json: the last epoch's figures, the history, the confusion matrix, ...)."""
    out: str
    results: list


def train_runs(mode="pretrained", out=None, **options):
    """Train the runs mode asks for ("pretrained", "scratch" or "compare") with the options given
    (see OPTIONS), into out (default runs/<mode>-<time>). A run whose folder holds a checkpoint
    continues it: after Ctrl-C, and when torchrun restarts a job's processes."""
    unknown = sorted(set(options) - set(OPTIONS) - {"typed", "resume"})  # those two: from resume
    if unknown or mode not in (*RECIPES, "compare"):
        raise UserError(f"train_runs takes a mode of {[*RECIPES, 'compare']} and the options {list(OPTIONS)}, "
                        f"not {unknown or mode}")
    options = settled(mode, options)
    device = join_processes(train.try_device(options["device"]))
    out = options["out"] = os.path.abspath(out or default_out(mode))
    try:
        with checkpoints.writing_to(out):
            return Trained(out, train_all(options, out, device))
    finally:
        leave_processes()


def settled(mode, given):
    """The options of a run: the defaults, the ones given (recorded as `typed`, so that a
    continued run can tell them apart), paths made absolute, and the machine's defaults."""
    options = {**OPTIONS, **given, "mode": mode, "typed": given.get("typed", sorted(given))}
    options["arch"] = models.check_arch(options["arch"])
    options["epochs"] = options["epochs"] or DATASETS[options["dataset"]]["epochs"]
    options["lr"] = [options["lr"]] if isinstance(options["lr"], (int, float)) else options["lr"]  # lr=5e-5 too
    options["workers"] = data.default_workers(options["workers"])
    for key in checkpoints.PATHS:
        options[key] = options[key] and os.path.abspath(options[key])
    return options


def resume(path, **given):
    """Continue the run that wrote path (its model.pt, or its folder; for "compare", every run in
    it) with the options it began with. Those in checkpoints.MAY_CHANGE (epochs, device, workers,
    ...) may be given anew; any other given must be the one the run began with."""
    named = path if not os.path.isdir(path) else None  # a run's model.pt: that run alone
    path = os.path.abspath(checkpoints.checkpoint_in(path))
    ckpt = checkpoints.load_checkpoint(path)
    same_arch(given.pop("arch", None), ckpt, path)
    own = ckpt["args"].get("out", os.path.dirname(path))
    if given.get("out") and os.path.abspath(given.pop("out")) != own:
        raise UserError(f"{path} continues in its own folder, {own}; leave out= out "
                        "(or copy that folder where you want it, and continue the copy)")
    before = {k: v for k, v in ckpt["args"].items() if k != "workers" or k in ckpt["args"].get("typed", [])}  # else this machine's
    out = os.path.dirname(path)
    planned = plan_runs(before["mode"], {**OPTIONS, **before}, out)
    recipe = [run.lr for run in planned]
    if before["lr"] is None and given.get("lr") in (recipe, recipe[0] if len(recipe) == 1 else None):
        given.pop("lr", None)  # the recipe's lr, which the run began with, typed out
    checkpoints.refuse_changes({**OPTIONS, **before}, given, path)
    options = {k: v for k, v in {**before, **given}.items() if k in OPTIONS}
    return train_runs(before["mode"], os.path.dirname(out) if len(planned) > 1 else out, resume=named and path,
                      typed=sorted({*before.get("typed", []), *given}), **options)


def same_arch(arch, ckpt, path):
    """The checkpoint knows its architecture: an arch given beside it must be the same."""
    if arch and arch != ckpt.get("arch", "resnet18"):
        raise UserError(f"{path} holds a {ckpt.get('arch', 'resnet18')}, not a {arch}; leave arch= out")


def default_out(mode):
    """runs/<mode>-<time>. Under torchrun the time is when torchrun started, the same for every
    restart of the job's processes: they find their checkpoint there."""
    started = torchrun_start() or time.time()
    return os.path.join("runs", f"{mode}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}")


def plan_runs(mode, options, out):
    """Every training asked for: one, both modes ("compare"), one per lr. A single run writes
    into out, several each into a folder of their own inside it."""
    modes = ["pretrained", "scratch"] if mode == "compare" else [mode]
    lrs = {m: options["lr"] or [DATASETS[options["dataset"]].get("lr", RECIPES[m]["lr"])] for m in modes}
    runs = [(m if len(lrs[m]) == 1 else f"{m}-lr{lr:g}", m, lr) for m in modes for lr in lrs[m]]
    return [Run(name, m, lr, out if len(runs) == 1 else os.path.join(out, name)) for name, m, lr in runs]


# ---------------------------------------------------------------- training
def train_all(options, out, device):
    """Load the data, train every planned run (continuing those that have begun), and draw their
    curves side by side. Returns their results."""
    start = time.perf_counter()
    sets = local_first(load_sets, options, checkpoints.held_out(out))
    say(f"data ready in {time.perf_counter() - start:.1f} s")
    runs, results = plan_runs(options["mode"], options, out), []
    if options.get("resume"):  # a run's model.pt named: that run alone
        runs = [run for run in runs if run.out == os.path.dirname(options["resume"])]
    for run in runs:
        try:
            results.append(train_one(run, options, sets, device))
        except KeyboardInterrupt as e:
            e.checkpoint = resumable(run, out)  # for the caller to say how to continue
            raise
    if rank() == 0 and len(runs) > 1:
        plots.curves({r["name"]: r["history"] for r in results}, os.path.join(out, "curves.png"))
    return results


def load_sets(options, held_out=None):
    """The data the options name, augmented at the sizes the arch was trained at (resnet18: the
    book's augmentations). held_out: the images a continued run held out (a split of class folders)."""
    budget = None if options["cache_gb"] is None else int(options["cache_gb"] * 2**30)
    sets = data.datasets(options["data_dir"], "dummy" if options["dummy"] else options["dataset"],
                         options["data_root"], cache_budget=budget, workers=options["workers"] or 1,
                         val_split=options["val_split"], seed=options["seed"], held_out=held_out)
    return data.with_augs(sets, models.preprocessing(options["arch"]))


def train_one(run, options, sets, device):
    """Train one net into its folder, continuing its checkpoint; return its result."""
    runtime = train.make_runtime(device, options["precision"])
    about = checkpoints.described(options, options["arch"], sets[0], runtime, name=run.name, mode=run.mode, lr=run.lr,
                                  held_out=getattr(sets[1], "held_out", None))
    ckpt = checkpoints.continued(run.out, about, checkpoint_name(run, options))
    history = ckpt["history"] if ckpt else []
    if len(history) >= options["epochs"]:
        say(f"{run.name}: finished its {len(history)} epochs already; give more epochs to train on")
        return checkpoints.finished(run.out, ckpt)
    net = build_net(run.mode, about["classes"], options)
    torch.manual_seed(options["seed"] + rank())  # then each process draws its own augmentations
    train_iter, test_iter = data.make_loaders(*sets, options["batch_size"], options["workers"], options["seed"])
    say(header(run, options, sets, runtime))
    param_group = RECIPES[run.mode]["param_group"] and not options["no_param_group"]
    epochs = train.fine_tuning_epochs(net, run.lr, train_iter, test_iter, options["epochs"], param_group, runtime, ckpt)
    history = train.train_and_show(checkpoints.saved(epochs, run.out, about, history, sets[1]), runtime, history)
    return checkpoints.finished(run.out, dict(about, history=history))


def checkpoint_name(run, options):
    """The checkpoint a run continues: the file resume named, where it is this run's, else model.pt."""
    named = options.get("resume")
    return os.path.basename(named) if named and os.path.dirname(named) == run.out else "model.pt"


def resumable(run, out):
    """What continues a run stopped now: its model.pt; else, where another run of out has
    finished an epoch, out; else None."""
    mine = os.path.join(run.out, "model.pt")
    if os.path.exists(mine):
        return mine
    with contextlib.suppress(UserError):
        return checkpoints.checkpoint_in(out) and out
    return None


def build_net(mode, classes, options):
    """The book's net for the mode: from scratch, or fine-tuned from the ImageNet weights."""
    random.seed(options["seed"])
    torch.manual_seed(options["seed"])  # the same initial head on every process
    if mode == "scratch":
        return models.scratch_net(len(classes), options["arch"])
    hotdog = models.hotdog_class(classes) if options["init_head_from_imagenet"] else None
    net = local_first(models.finetune_net, len(classes), options["weights"], hotdog, options["arch"])
    return models.freeze_features(net) if options["freeze"] else net


def header(run, options, sets, runtime):
    """The run's first line: the net and its image sizes, the data, the learning rate, the runtime."""
    size = models.preprocessing(options["arch"])
    split = f" {sets[1].where}" if hasattr(sets[1], "where") else ""
    return (f"{run.name}: {options['arch']} at {size['crop']} px (resized to {size['resize']}, {size['interpolation']}), "
            f"training on {len(sets[0])} images, testing on {len(sets[1])}{split}, lr {run.lr:g}, {runtime}"
            + (f" x {world_size()} processes, {processes_batch(options['batch_size'])}" if world_size() > 1 else ""))


def processes_batch(batch_size):
    """How the global batch splits over the processes: evenly, so a batch that does not divide
    by their number is made smaller (each process must take as many steps as the others)."""
    each = batch_size // world_size()
    return f"batch {each} each" + (f", {each * world_size()} in all (not {batch_size})"
                                   if batch_size % world_size() else "")
