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
from torch import nn

import checkpoints
import data
import models
import plots
import train
from processes import (from_process_0, join_processes, leave_processes, local_first, rank, say, torchrun_start,
                       world_size)
from photos import limit_megapixels
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
    patience=None, freeze_epochs=0, class_weights=None,               # beyond it: off by default
    workers=None, device=None, precision="amp",                       # where it runs
)


PRETRAINED_ONLY = ("weights", "freeze", "init_head_from_imagenet", "freeze_epochs")


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
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown or mode not in (*RECIPES, "compare"):
        raise UserError(f"train_runs takes a mode of {[*RECIPES, 'compare']} and the options {list(OPTIONS)}, "
                        f"not {unknown or mode}")
    return train_settled(settled(mode, options), out)


def train_settled(options, out=None):
    """train_runs, given every option (settled)."""
    limit_megapixels(options["max_megapixels"])
    device = join_processes(train.try_device(options["device"]))
    out = options["out"] = os.path.abspath(out or default_out(options["mode"]))
    try:
        with checkpoints.writing_to(out):
            return Trained(out, train_all(options, out, device))
    finally:
        leave_processes()


def settled(mode, given, typed=None):
    """The options of a run: the defaults, the ones given (recorded as `typed`, so that a
    continued run can tell them apart), paths made absolute, and the machine's defaults."""
    options = {**OPTIONS, **given, "mode": mode, "typed": sorted(typed or given), "resume": None}
    check_beyond(options)
    ignored = [key for key in PRETRAINED_ONLY if mode == "scratch" and options[key]]
    if ignored:
        raise UserError(f"{ignored[0]}= changes the pretrained net, and scratch trains from random weights; "
                        f"leave {ignored[0]}= out, or train pretrained (or compare: it applies to the pretrained run)")
    options["arch"] = models.check_arch(options["arch"])
    options["epochs"] = options["epochs"] or DATASETS[options["dataset"]]["epochs"]
    options["lr"] = lrs(options["lr"])
    options["workers"] = data.default_workers(options["workers"])
    for key in checkpoints.PATHS:
        options[key] = options[key] and os.path.abspath(options[key])
    return options


def check_beyond(options):
    """The options beyond the book's recipe, as a Python caller may give them wrong."""
    if options["class_weights"] not in (None, "balanced"):
        raise UserError(f"class_weights={options['class_weights']} is not a kind this program knows; give \"balanced\"")
    if options["class_weights"] and options["dummy"]:
        raise UserError("class_weights= needs labelled images, and dummy's are random; leave one out")
    for key in ("patience", "freeze_epochs"):
        if options[key] is not None and not (isinstance(options[key], int) and options[key] >= 0):
            raise UserError(f"{key}={options[key]} is not a number of epochs; give a whole number, 0 or more")


def resume(path, **given):
    """Continue the run that wrote path with the options it began with: path is a run's model.pt
    (that run alone) or its folder (for "compare", every run in it). Those in
    checkpoints.MAY_CHANGE (epochs, device, workers, ...) may be given anew; any other given
    must be the one the run began with."""
    unknown = sorted(set(given) - set(OPTIONS) - {"out"})
    if unknown:
        raise UserError(f"resume takes the options {list(OPTIONS)}, not {unknown}")
    if os.path.basename(path) == "best.pt":
        raise UserError(f"{path} is the epoch a run kept, for prediction; continue the run from its model.pt or folder")
    alone = not os.path.isdir(path)
    path = os.path.abspath(checkpoints.checkpoint_in(path))
    ckpt = checkpoints.load_checkpoint(path)
    began = ckpt["args"]
    if "mode" not in began:
        raise UserError(f"{path} was written by train.train_fine_tuning(..., out=); continue it with that call again")
    checkpoints.same_arch(given.pop("arch", None), ckpt, path)
    folder = os.path.dirname(path)  # where the run is now, wherever it began
    planned = plan_runs(began["mode"], {**OPTIONS, **began}, folder)
    out = os.path.dirname(folder) if len(planned) > 1 else folder  # several: each has a folder in out
    asked = given.pop("out", None)
    if asked and os.path.abspath(asked) != out:
        raise UserError(f"{path} continues in its own folder, {out}; leave out= out "
                        "(or copy that folder where you want it, and continue the copy)")
    if "workers" not in began["typed"]:  # the default of the machine it began on: this one's now
        began = {k: v for k, v in began.items() if k != "workers"}
    if began["lr"] is None and lrs(given.get("lr")) == [run.lr for run in planned]:
        del given["lr"]  # the recipe's own, which the run began with, typed out
    checkpoints.refuse_changes({**OPTIONS, **began}, given, path)
    options = settled(began["mode"], {k: v for k, v in {**began, **given}.items() if k in OPTIONS},
                      {*began["typed"], *given})
    return train_settled({**options, "resume": path if alone else None}, out)


def lrs(lr):
    """lr as a list of learning rates, each of which gives a run (lr=5e-5 gives one)."""
    return [lr] if isinstance(lr, (int, float)) else lr


def default_out(mode):
    """runs/<mode>-<time>. Under torchrun the time is when torchrun started, the same for every
    restart of the job's processes: they find their checkpoint there."""
    started = torchrun_start() or time.time()
    return os.path.join("runs", f"{mode}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}")


def plan_runs(mode, options, out):
    """Every training asked for: one, both modes ("compare"), one per lr. A single run writes
    into out, several each into a folder of their own inside it."""
    modes = ["pretrained", "scratch"] if mode == "compare" else [mode]
    rates = {m: options["lr"] or [DATASETS[options["dataset"]].get("lr", RECIPES[m]["lr"])] for m in modes}
    named = [(m if len(rates[m]) == 1 else f"{m}-lr{lr:g}", m, lr) for m in modes for lr in rates[m]]
    return [Run(name, m, lr, out if len(named) == 1 else os.path.join(out, name)) for name, m, lr in named]


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
                                  held_out=getattr(sets[1], "held_out", None), final_split=final_test_name(sets))
    ckpt = checkpoints.continued(run.out, about, checkpoint_name(run, options))
    history = ckpt["history"] if ckpt else []
    stopped = stalled(history, options["patience"], frozen_epochs(run, options))
    if len(history) >= options["epochs"] or stopped:
        why = f"it stopped early (patience {options['patience']})" if stopped else "give more epochs to train on"
        say(f"{run.name}: finished its {len(history)} epochs already; {why}")
        result = checkpoints.finished(run.out, ckpt)
    else:
        result = train_net(run, options, sets, runtime, about, ckpt)
    if len(sets) > 2 and "final_test" not in result:  # once, with the epoch kept; also after Ctrl-C in it
        result["final_test"] = final_test(run, sets, options, runtime)
        if rank() == 0:
            checkpoints.write_metrics(run.out, result)
    return result


def train_net(run, options, sets, runtime, about, ckpt):
    """Build the run's net, train it (continuing ckpt), and return its result."""
    history = ckpt["history"] if ckpt else []
    net = build_net(run.mode, about["classes"], options)
    torch.manual_seed(options["seed"] + rank())  # then each process draws its own augmentations
    train_iter, test_iter = data.make_loaders(*sets[:2], options["batch_size"], options["workers"], options["seed"])
    param_group = RECIPES[run.mode]["param_group"] and not options["no_param_group"]
    weights = loss_weights(options["class_weights"], sets[0], runtime.device)
    say(header(run, options, sets, runtime, weights))

    def epochs_of(num_epochs, resume):  # the book's recipe, for one phase
        return train.fine_tuning_epochs(net, run.lr, train_iter, test_iter, num_epochs, param_group, runtime, resume,
                                        weights)
    frozen = frozen_epochs(run, options)
    epochs = stopping(two_phases(epochs_of, net, frozen, options["epochs"], ckpt), options["patience"], frozen, history)
    history = train.train_and_show(checkpoints.saved(epochs, run.out, about, history, sets[1]), runtime, history)
    return checkpoints.finished(run.out, dict(about, history=history))


# ---------------------------------------------------------------- beyond the book
def two_phases(epochs_of, net, frozen, num_epochs, resume):
    """Two-phase fine-tuning, a linear probe and then every layer (Kumar et al., ICLR 2022): the
    first `frozen` epochs train only the output layer, the features and their BatchNorm
    statistics fixed (features_frozen); the others every layer, with the book's groups.
    With frozen 0, the book's epochs as they are. epochs_of(num_epochs, resume) gives the
    book's epochs; the second phase's resume holds only the history: checkpoints.restore then
    leaves the net, the optimizer and the random state as the first phase left them."""
    history = list(resume["history"]) if resume else []
    if len(history) < frozen:
        with features_frozen(net):
            for epoch in epochs_of(min(frozen, num_epochs), resume):
                history.append(epoch.metrics)
                yield epoch
        resume = {"history": history}  # the first phase ran here: its weights and state are in place
    yield from epochs_of(num_epochs, resume)


@contextlib.contextmanager
def features_frozen(net):
    """For a while, exercise 3: only the output layer learns, and the BatchNorm layers compute as
    at test time, their statistics fixed. The layers stay the same objects (models.freeze_features
    replaces them for good), so a checkpoint written meanwhile loads into the whole net."""
    features = [(param, param.requires_grad) for name, param in net.named_parameters() if not name.startswith("fc.")]
    norms = [module for module in net.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for param, _ in features:
        param.requires_grad_(False)
    for bn in norms:  # net.train() calls each layer's train(): this one's keeps it in eval mode
        bn.train = in_eval_mode(bn)
    try:
        yield net
    finally:
        for param, learned in features:  # as they were (--freeze keeps its own frozen)
            param.requires_grad_(learned)
        for bn in norms:
            del bn.train


def in_eval_mode(module):
    """A train(mode) for module that leaves it in eval mode, whatever the mode."""
    return lambda mode=True: nn.Module.train(module, False)


def frozen_epochs(run, options):
    """The epochs of the first phase: only a pretrained net has features worth keeping fixed."""
    return options["freeze_epochs"] if run.mode == "pretrained" else 0


def stopping(epochs, patience, frozen=0, history=()):
    """The epochs until the accuracy on the evaluation set has not improved for patience epochs
    (early stopping; stalled); with patience None, all of them."""
    history = list(history)
    for epoch in epochs:
        history.append(epoch.metrics)
        yield epoch
        if stalled(history, patience, frozen):
            return


def stalled(history, patience, frozen=0):
    """Whether patience epochs or more have passed since the best epoch, counted from the end of
    the first `frozen` epochs at the earliest (every layer learns only then: two_phases)."""
    if not (patience and history):
        return False
    return history[-1]["epoch"] - max(checkpoints.best_epoch(history)["epoch"], frozen) >= patience


def loss_weights(kind, train_set, device):
    """None (the book's: every image counts the same), or for "balanced", a weight per class that
    makes every class count the same in the summed loss: n / (classes x n_class), as
    scikit-learn's "balanced" (n images in all, n_class of the class)."""
    if kind is None:
        return None
    counts = torch.bincount(torch.as_tensor(train_set.targets), minlength=len(train_set.classes)).double()
    return (counts.sum() / (len(counts) * counts)).float().to(device)


def final_test_name(sets):
    """The final test's folder, where the data set holds one beside val/ (data.book_folders)."""
    return os.path.basename(os.path.normpath(sets[2].root)) + "/" if len(sets) > 2 else None


def final_test(run, sets, options, runtime):
    """The final test set evaluated once, with the weights best.pt keeps (model.pt's, for a run
    begun before best.pt was kept): which epoch's, the accuracy, and the figures."""
    best = os.path.join(run.out, "best.pt")
    best = from_process_0(checkpoints.load_checkpoint(best if os.path.exists(best) else
                                                      os.path.join(run.out, "model.pt")) if rank() == 0 else None)
    net = runtime.place(models.saved_net(best))
    loader = data.make_loaders(sets[2], sets[2], options["batch_size"], options["workers"])[1]  # the test loader
    probs, labels = train.evaluate(net, loader, runtime)
    return dict(split=final_test_name(sets), epoch=best["history"][-1]["epoch"], acc=train.accuracy(probs, labels),
                **checkpoints.figures(probs, labels, best["classes"]))


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


def header(run, options, sets, runtime, weights=None):
    """The run's first line: the net and its image sizes, the data, the learning rate, what goes
    beyond the book's recipe, the runtime."""
    size = models.preprocessing(options["arch"])
    split = f" {sets[1].where}" if hasattr(sets[1], "where") else ""
    final = f", and once, at the end, {len(sets[2])} in {final_test_name(sets)}" if len(sets) > 2 else ""
    frozen = frozen_epochs(run, options)
    phase = f", the output layer alone for the first {frozen} epoch(s)" if frozen else ""
    weighed = "" if weights is None else f", class weights balanced ({', '.join(f'{w:.2f}' for w in weights.tolist())})"
    several = f" x {world_size()} processes, {processes_batch(options['batch_size'])}" if world_size() > 1 else ""
    return (f"{run.name}: {options['arch']} at {size['crop']} px (resized to {size['resize']}, {size['interpolation']}), "
            f"training on {len(sets[0])} images, testing on {len(sets[1])}{split}{final}, lr {run.lr:g}{phase}{weighed}, "
            f"{runtime}{several}")


def processes_batch(batch_size):
    """How the global batch splits over the processes: evenly, so a batch that does not divide
    by their number is made smaller (each process must take as many steps as the others)."""
    each = batch_size // world_size()
    return f"batch {each} each" + (f", {each * world_size()} in all (not {batch_size})"
                                   if batch_size % world_size() else "")
