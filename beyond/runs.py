"""A run: all the book's recipe leaves out of a training, in one owner that drives the book's loop
(train.ch13_epochs) from outside; also resume, patience, two phases and class weights.

    trained = runs.train_runs("pretrained", data_dir="photos", epochs=3, out="runs/photos")
    trained = runs.resume("runs/photos", epochs=5)     # two more epochs, after a restart too
"""
import contextlib
import json
import os
import platform
import random
import time
from collections import namedtuple

import torch
import torchvision

import data
import models
import train
from beyond import (UserError, archs, checkpoints, datasets, folders, importable, loaders, logs,
                    pictures, progress)
from beyond.devices import make_runtime, try_device
from beyond.figures import figures, predicted
from beyond.files import finite, write_whole, writing_to
from beyond.options import (DATASETS, DEFAULTS, OPTIONS, PATHS, PRETRAINED_ONLY, checked,
                            refuse_unread)
from beyond.phases import two_phases
from beyond.photos import megapixels_limit
from beyond.processes import (from_process_0, join_processes, leave_processes, local_first,
                              processes_batch, rank, rng_kept, say, torchrun_start, world_size)
from beyond.schedule import epoch_schedule

# The book's recipe, per mode: base lr, whether fc learns at 10x, and the figures it reports.
RECIPES = {"pretrained": dict(lr=5e-5, param_group=True, book=(0.242, 0.909, 0.940)),
           "scratch": dict(lr=5e-4, param_group=False, book=(0.352, 0.846, 0.850))}

SUMMARY = ("loss", "train_acc", "test_acc")
VERSIONS = dict(python=platform.python_version(), torch=torch.__version__,
                torchvision=torchvision.__version__)
# What a continued run may be given anew; data_dir: a folder moved (folders.same_data compares).
MAY_CHANGE = {"epochs", "device", "workers", "max_megapixels", "cache_gb", "data_dir", "data_root",
              "tensorboard", "out", "resume", "typed"}


Run = namedtuple("Run", "name mode lr out")  # one training: its mode, its lr, where it writes
Trained = namedtuple("Trained", "out results")  # what train_runs and resume return


def train_runs(mode="pretrained", out=None, **options):
    """Train mode's runs ("pretrained", "scratch" or "compare") into out, continuing any there."""
    return trained(settled(mode, options), checked("out", out))


def resume(path, **given):
    """Continue the runs that wrote path (a model.pt, or a folder) as they began; see MAY_CHANGE."""
    given = given_anew(given)
    found = os.path.realpath(checkpoints.checkpoint_in(path))  # a link: the run it leads to
    ckpt = checkpoints.run_checkpoint(found)  # the only time this process reads it
    checkpoints.same_arch(given.pop("arch", None), ckpt)
    its_training = plan_runs(ckpt["args"]["mode"], {**DEFAULTS, **ckpt["args"]},
                             os.path.abspath(path))
    whole = several_runs_in(path, its_training)
    out = os.path.abspath(path) if whole else os.path.dirname(found)  # a run's own, whatever name
    planned = its_training if whole else [own_run(ckpt, out)]
    one_training(path, planned)
    asked = given.pop("out", None)
    if asked and os.path.realpath(asked) != os.path.realpath(out):
        held = f"the runs in {out} continue in their" if whole else f"{found} continues in its"
        raise UserError(f"{held} own folder, {out}; leave out= out "
                        "(or copy that folder where you want it, and continue the copy)")
    read = {found: ckpt}
    if whole:
        read = held_checkpoints(planned, found, ckpt)
        same_totals(read, planned, given, out)
    options = continued(ckpt, planned, given, out, read)
    return trained({**options, "resume": None if whole else found}, out, read)


def given_anew(given):
    """What resume is given: out= and the options, checked as train_runs checks them; None,
    where it is an option's default (epochs=, lr=), is as the run began."""
    unknown = sorted(set(given) - set(OPTIONS) - {"out"})
    if unknown:
        raise UserError(f"resume takes out= and the options {list(OPTIONS)}, not {unknown}")
    given = {key: checked(key, value) for key, value in given.items()}
    return {key: value for key, value in given.items() if value is not None}


def held_checkpoints(planned, found, ckpt):
    """The checkpoints of a folder's runs, each read once (ckpt: found's, read already)."""
    paths = [os.path.join(run.out, "model.pt") for run in planned]
    return {path: ckpt if os.path.realpath(path) == found else checkpoints.run_checkpoint(path)
            for path in paths if os.path.exists(path)}


def same_totals(read, planned, given, out):
    """Refuse to go on with one run's epochs where a folder's runs may train to several totals
    (one continued alone with more): the others would train on, or begin, to its total."""
    totals = {f"{ckpt['name']} to {ckpt['args']['epochs']}": ckpt["args"]["epochs"]
              for ckpt in read.values()}
    begins = [run.name for run in beginning(planned, read)]
    alone = [ckpt["name"] for ckpt in read.values() if ckpt["args"].get("resume")]
    if "epochs" not in given and (len(set(totals.values())) > 1 or begins and alone):
        why = (f"{begins[0]} begins beside {alone[0]}, continued alone; give epochs= anew to "
               "say how many every run trains to" if begins and alone else
               "they train to several totals; give epochs= anew to train every run to that "
               "many, or continue each run alone")
        raise UserError(f"the runs in {out} ({', '.join(totals)} epochs): {why}")


def beginning(planned, read):
    """The planned runs that begin anew: resume read no checkpoint of theirs."""
    return [run for run in planned if os.path.join(run.out, "model.pt") not in read]


def continued(ckpt, planned, given, out, read):
    """The options the planned runs (ckpt's, or its folder's in out) go on with: those they
    began with, and what is given anew where it may change (read: their checkpoints)."""
    began = ckpt["args"]
    if "workers" not in began["typed"]:  # the default of the machine it began on: this one's now
        began = {k: v for k, v in began.items() if k != "workers"}
    if lrs(given.get("lr")) == [run.lr for run in planned]:
        given = {k: v for k, v in given.items() if k != "lr"}  # the runs' own, typed out
    if len(planned) > 1 and "lr" in given:  # a folder of several runs: other lrs, other runs
        refuse_changes({"lr": began["lr"]}, {"lr": lrs(given["lr"])}, out, set())
    refuse_unread_by_mode(ckpt, planned, given, read)
    options = {k: v for k, v in {**began, **given}.items() if k in OPTIONS}
    options = settled(began["mode"], options, {*began["typed"], *given})
    # only what is given anew: an older run goes on as it began; what may not change, and the run
    # began with, is refused as a change (checkpoint_of), not as going unread
    refuse_unread(options, {k for k in given if k in may_change(ckpt, read) or k not in began})
    return options


def several_runs_in(path, its_training):
    """Whether path is the folder of a training's several runs (its_training, a --compare's, as
    the first run found began it): a folder without a model.pt of its own that holds several, or
    one in a folder named after one of them (the others to begin)."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "model.pt")):
        return False
    held = checkpoints.checkpoints_in(path)
    names = [run.name for run in its_training]
    return len(names) > 1 and (len(held) > 1 or os.path.basename(os.path.dirname(held[0])) in names)


def refuse_unread_by_mode(ckpt, planned, given, read):
    """Refuse the options only a pretrained run reads where they would go unread: given to a
    scratch run alone, or lost where a pretrained run begins from a scratch run's checkpoint."""
    unread = [key for key in PRETRAINED_ONLY if given.get(key)]
    if unread and all(run.mode == "scratch" for run in planned):
        raise UserError(f"{unread[0]}= changes the pretrained net, and {ckpt['path']} is a "
                        f"scratch run's, trained from random weights; leave {unread[0]}= out")
    begins = [run.out for run in beginning(planned, read) if run.mode == "pretrained"]
    lost = [f"{k}=" for k in PRETRAINED_ONLY if k in ckpt["args"]["typed"] and k not in given]
    if ckpt["mode"] == "scratch" and begins and lost:
        raise UserError(f"{begins[0]} begins anew (it has no model.pt), and {ckpt['path']}, a "
                        f"scratch run's, keeps no value of {' and '.join(lost)} (the compare "
                        "was given them); give them anew")


def own_run(ckpt, folder):
    """The run that wrote ckpt (a run is the one its checkpoint names), alone in folder."""
    return Run(ckpt["name"], ckpt["mode"], ckpt["lr"], folder)


def one_training(path, planned):
    """Refuse a folder path that holds runs of another training than planned's."""
    if os.path.isdir(path):
        held = [os.path.realpath(p) for p in checkpoints.checkpoints_in(path)]
        if set(held) - {os.path.realpath(os.path.join(run.out, "model.pt")) for run in planned}:
            error = checkpoints.several_runs(path, held)
            if len(planned) > 1:  # a --compare's, perhaps with one of its runs' folders renamed
                error = UserError(f"{error}, or put each run of the training back in the folder "
                                  f"named after it ({', '.join(run.name for run in planned)})")
            raise error


def asked_device(given):
    """The device a run asks for: the one given, else a resumed run's; None: the best there is."""
    if "device" in given or given.get("resume") is None:
        return given.get("device")
    with contextlib.suppress(UserError):  # resume will say what is wrong with its path
        ckpt = checkpoints.load_checkpoint(checkpoints.checkpoint_in(given["resume"]))
        return ckpt["args"].get("device")
    return None


def settled(mode, given, typed=None):
    """A run's options: the defaults, those given checked (typed: for resume), the machine's."""
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown or mode not in (*RECIPES, "compare"):
        raise UserError(f"train_runs takes a mode of {[*RECIPES, 'compare']} and the options "
                        f"{list(OPTIONS)}, not {unknown or mode}")
    options = {**DEFAULTS, **{k: checked(k, v) for k, v in given.items()},
               "mode": str(mode), "typed": sorted(typed or given), "resume": None}  # not NumPy's
    if options["class_weights"] and options["dummy"]:
        raise UserError("class_weights= needs labelled images, and dummy's are random; "
                        "leave one out")
    if typed is None:  # a run begun now (resume checks only what it is given anew)
        refuse_unread(options, set(given))
    for key in PRETRAINED_ONLY if mode == "scratch" else ():
        if options[key]:
            raise UserError(f"{key}= changes the pretrained net, and scratch trains from random "
                            f"weights; leave {key}= out, or train pretrained (or compare: it "
                            "applies to the pretrained run)")
    options.update(arch=archs.check_arch(options["arch"]), lr=lrs(options["lr"]),
                   epochs=options["epochs"] or DATASETS[options["dataset"]]["epochs"],
                   workers=loaders.default_workers(options["workers"]),
                   **{key: options[key] and os.path.abspath(options[key]) for key in PATHS})
    if options["lr_schedule"] and options["warmup_epochs"] >= options["epochs"]:
        raise UserError(f"warmup_epochs={options['warmup_epochs']} leaves none of the run's "
                        f"{options['epochs']} epochs to the cosine; give fewer warm-up epochs, or "
                        "more epochs=")
    if options["tensorboard"] and not importable("torch.utils.tensorboard"):
        raise UserError("tensorboard= writes TensorBoard's event files with the package "
                        "tensorboard, which cannot be imported here; pip install tensorboard")
    return options


def lrs(lr):
    return [lr] if isinstance(lr, (int, float)) else lr  # a list of learning rates, one run each


def default_out(mode):  # under torchrun, the time it started: every restart finds its checkpoint
    started = time.localtime(torchrun_start() or time.time())
    return os.path.join("runs", f"{mode}-{time.strftime('%Y%m%d-%H%M%S', started)}")


def plan_runs(mode, options, out):
    """Every training asked for (both modes for "compare", one per lr), in out or out/<name>."""
    modes = ["pretrained", "scratch"] if mode == "compare" else [mode]
    dataset = DATASETS[options["dataset"]]  # CIFAR-10's lr for both modes, else the recipe's
    rates = {m: options["lr"] or [dataset.get("lr", RECIPES[m]["lr"])] for m in modes}
    runs = [(m if len(rates[m]) == 1 else f"{m}-lr{lr:g}", m, lr) for m in modes for lr in rates[m]]
    return [Run(n, m, lr, out if len(runs) == 1 else os.path.join(out, n)) for n, m, lr in runs]


def trained(options, out, read=None):
    """Train every planned run into out, each continuing its checkpoint (read: what resume read)."""
    device = join_processes(try_device(options["device"]))
    out = options["out"] = os.path.abspath(out or default_out(options["mode"]))
    try:
        with (megapixels_limit(options["max_megapixels"]), writing_to(out), rng_kept(device),
              contextlib.ExitStack() as locks):
            # resume named one run (its checkpoint read, in read): that run alone
            runs = ([own_run(read[options["resume"]], out)] if options["resume"]
                    else plan_runs(options["mode"], options, out))
            for run in runs:  # each run's own folder too: one run may be continued alone
                if run.out != out:
                    locks.enter_context(writing_to(run.out))
            found = from_process_0(checkpoints.checkpoints_in(out) if rank() == 0 else None)
            if set(found) - {os.path.join(run.out, "model.pt") for run in runs}:
                raise UserError(f"out={out} holds another run, and a folder holds one run, or the "
                                "runs of one compare or of one list of learning rates; choose "
                                "another out=")
            ckpts = [checkpoint_of(run, options, read) for run in runs]  # before any data is read
            if any(ckpts) and options["data_dir"] and not os.path.isdir(options["data_dir"]):
                raise missing_data(options["data_dir"], next(filter(None, ckpts)))
            start = time.perf_counter()
            held_out = next(filter(None, ckpts), {}).get("held_out")  # what a run held out
            sets = local_first(load_sets, options, held_out)
            say(f"data ready in {time.perf_counter() - start:.1f} s")
            results = [train_one(run, run_options(run, options), sets, device, ckpt)
                       for run, ckpt in zip(runs, ckpts)]
            if rank() == 0 and len(runs) > 1:
                pictures.curves({r["name"]: r["history"] for r in results},
                                os.path.join(out, "curves.png"))
            return Trained(out, results)
    except KeyboardInterrupt as e:
        e.checkpoint = resumable(options)  # for the caller to say how to continue
        raise
    finally:
        leave_processes()


def missing_data(data_dir, ckpt):
    """The error for a data folder that is not there: the run's own, or one given now."""
    if data_dir == ckpt["args"].get("data_dir"):
        return UserError(f"data_dir={data_dir}, the run's data folder, is not a folder; give "
                         "data_dir= where it is now")
    return UserError(f"data_dir={data_dir} is not a folder; give data_dir= where the run's data "
                     "folder is now")


def load_sets(options, held_out=None):
    """The data the options name, augmented at the arch's sizes; held_out: what a run held out."""
    budget = None if options["cache_gb"] is None else int(options["cache_gb"] * 2**30)
    kind = "dummy" if options["dummy"] else options["dataset"]
    sets = datasets.datasets(options["data_dir"], kind, options["data_root"], cache_budget=budget,
                             workers=options["workers"] or 1, val_split=options["val_split"],
                             seed=options["seed"], held_out=held_out, out=options.get("out"))
    return datasets.with_augs(sets, archs.preprocessing(options["arch"]))


def train_one(run, options, sets, device, ckpt):
    """Train one net with its run_options, continuing ckpt; then a final test where there is one."""
    runtime = make_runtime(device, options["precision"])
    about = described(run, options, sets, runtime)
    if ckpt:  # on the data it was trained on (with its options: checkpoint_of)
        folders.same_data(sets, ckpt)
        about["tested"] = ckpt.get("tested")  # None: an older run's, tested on images unlisted
    history = ckpt["history"] if ckpt else []
    stopped = stalled(history, options["patience"], options["freeze_epochs"])
    if stopped or len(history) >= options["epochs"]:
        more = ("its cosine schedule ended there; train a new run for more epochs"
                if options["lr_schedule"] else "give more epochs to train on")
        say(f"{run.name}: finished its {len(history)} epochs already; "
            + (f"no better test acc in {options['patience']} epochs (its patience), so more "
               "train none" if stopped else more))
        checkpoints.kept_epoch(run.out, ckpt)  # best.pt, where it is missing
        if not logs.event_files(run.out) and (events := tensorboard(run, options, history)):
            events.close()  # --tensorboard given to resume it: its events, where it has none
        result = finished(run.out, ckpt) or concluded(run, sets, options, runtime,
                                                      {**about, "history": history})
    else:
        result = train_net(run, options, sets, runtime, about, ckpt)
    if len(sets) > 2 and "final_test" not in result:  # once, with the epoch kept; after Ctrl-C too
        result["final_test"] = final_test(run, sets, options, runtime)
        if rank() == 0:
            write_metrics(run.out, result)
    return result


def train_net(run, options, sets, runtime, about, ckpt):
    """Build the run's net and drive the book's loop over it, saving model.pt after each epoch."""
    hotdog = folders.hotdog_class(about["classes"]) if options["init_head_from_imagenet"] else None
    random.seed(options["seed"])
    torch.manual_seed(options["seed"])  # the same initial head on every process
    # A checkpoint replaces every weight: where one is restored, ImageNet's are not read
    net = runtime.place(local_first(net_for, "scratch" if ckpt else run.mode, len(about["classes"]),
                                    options["arch"], options["weights"], hotdog, options["freeze"]))
    torch.manual_seed((options["seed"] + rank()) % 2**64)  # each process its own augmentations
    train_iter, test_iter = loaders.make_loaders(*sets[:2], options["batch_size"],
                                                 options["workers"], options["seed"])
    weights = loss_weights(options["class_weights"], sets[0], runtime.device)
    loss = train.fine_tuning_loss(weights, options["label_smoothing"])  # the book's but where asked
    param_group = RECIPES[run.mode]["param_group"] and not options["no_param_group"]
    optimizer = train.fine_tuning_optimizer(net, run.lr, param_group)
    schedule = epoch_schedule(optimizer, options["lr_schedule"], options["warmup_epochs"],
                              options["epochs"])
    history = checkpoints.restore(ckpt, net, optimizer, runtime.scaler, schedule)  # fresh: []
    best_so_far = checkpoints.kept_epoch(run.out, ckpt)
    best_epoch = None  # best.pt's Epoch, where tested here: its figures are those of its test acc
    say(header(run, options, sets, runtime, weights))
    events = None  # TensorBoard's, made at the first epoch: a run stopped before leaves no file

    def book_epochs(*span):  # span: (start, end), the book's loop over epochs start + 1 to end
        return train.ch13_epochs(net, train_iter, test_iter, loss, optimizer, range(*span), runtime)
    animator, freeze_epochs = pictures.animator(), options["freeze_epochs"]
    try:
        for epoch in two_phases(book_epochs, net, len(history), freeze_epochs, options["epochs"]):
            history.append(dict(epoch.metrics, lr=optimizer.param_groups[0]["lr"]))
            if schedule:  # once per epoch, from outside the book's loop
                schedule.step()
            best = best_so_far is None or epoch.metrics["test_acc"] > best_so_far["test_acc"]
            best_so_far, best_epoch = (epoch.metrics, epoch) if best else (best_so_far, best_epoch)
            if rank() == 0:  # before model.pt: a run stopped between redoes the epoch, writes anew
                logs.write_csv(run.out, history)
            if events := events or tensorboard(run, options, history[:-1]):
                logs.add_epoch(events, history[-1])
            checkpoints.save(run.out, history, about, best=epoch if best else None, state=dict(
                model=net.state_dict(), optimizer=optimizer.state_dict(),
                scaler=runtime.scaler.state_dict(), schedule=schedule and schedule.state_dict()))
            progress.show_epoch(history, animator, lr=bool(schedule))  # once saved: it is kept
            if stalled(history, options["patience"], freeze_epochs):
                break
    finally:  # the writer's thread ends with the run, stopped or not
        if events:
            events.close()
    progress.show_summary(history, runtime)
    return concluded(run, sets, options, runtime, {**about, "history": history}, best_epoch)


def net_for(mode, num_classes, arch, weights, hotdog_class, freeze):
    """The book's net for a mode, "scratch" or "pretrained"; with freeze, exercise 3's."""
    net = (models.scratch_net(num_classes, arch) if mode == "scratch"
           else models.finetune_net(num_classes, weights, hotdog_class, arch))
    return models.freeze_features(net) if freeze else net


def tensorboard(run, options, history):
    """With --tensorboard, on process 0: the run's SummaryWriter, holding its own options (mode
    and lr, not those of every run of a compare) and history; else None."""
    if rank() == 0 and options["tensorboard"]:
        return logs.tensorboard(run.out, {**options, "mode": run.mode, "lr": run.lr}, history)
    return None


def run_options(run, options):
    """The options as run uses them: only a pretrained net has features worth keeping or fixing."""
    return options if run.mode == "pretrained" else {
        **options, **{key: DEFAULTS[key] for key in PRETRAINED_ONLY}}


def stalled(history, patience, freeze_epochs=0):
    """Whether patience epochs (None: never) passed since the best, counted after the frozen."""
    if not (patience and history):
        return False
    best = max(history, key=lambda m: m["test_acc"])  # the earliest of ties
    return history[-1]["epoch"] - max(best["epoch"], freeze_epochs) >= patience


def loss_weights(kind, train_set, device):
    """None (the book's), or "balanced": per class, scikit-learn's n / (classes x n_class)."""
    if kind is None:
        return None
    targets = torch.as_tensor(train_set.targets)
    counts = torch.bincount(targets, minlength=len(train_set.classes)).double()
    return (counts.sum() / (len(counts) * counts)).float().to(device)


def final_test(run, sets, options, runtime):
    """The final test set evaluated once, with best.pt's weights: its epoch, accuracy, figures."""
    best, probs, labels = evaluated(run, sets[2], options, runtime)
    classes = folders.class_names(sets[0])
    return dict(split=folders.final_split(sets), epoch=best["epoch"],
                acc=train.accuracy(probs, labels), **figures(probs, labels, classes))


def evaluated(run, test_set, options, runtime, as_tested=False):
    """The metrics of the epoch best.pt keeps, and its probabilities and labels for test_set
    (as_tested: as its epoch's test gave them, where best.pt holds them; else tested again)."""
    path = os.path.join(run.out, "best.pt")
    best = from_process_0(checkpoints.load_checkpoint(path) if rank() == 0 else None)
    if as_tested and "test_probs" in best:
        return best["history"][-1], best["test_probs"], best["test_labels"]
    loader = loaders.make_loaders(test_set, test_set, options["batch_size"], options["workers"])[1]
    net = runtime.place(checkpoints.saved_net(best))
    return (best["history"][-1], *train.evaluate(net, loader, runtime))


def header(run, options, sets, runtime, weights):
    """The run's first line: the net and its image sizes, the data, the lr, extras, the runtime."""
    size = archs.preprocessing(options["arch"])
    split = f" {sets[1].where}" if hasattr(sets[1], "where") else ""
    final = "" if len(sets) < 3 else (
        f", and once, at the end, {len(sets[2])} in {folders.final_split(sets)}")
    phase = "" if not options["freeze_epochs"] else (  # what this run will do
        f", the output layer alone in the first {min(options['freeze_epochs'], options['epochs'])}"
        f" of {options['epochs']} epochs")
    warmup = options["warmup_epochs"]
    schedule = "" if not options["lr_schedule"] else (
        f" falling along a cosine to 0 at epoch {options['epochs']}'s end"
        + (f" after {warmup} warm-up epoch(s)" if warmup else ""))
    smoothing = (f", label smoothing {options['label_smoothing']:g}"
                 if options["label_smoothing"] else "")
    weighed = "" if weights is None else (
        f", class weights balanced ({', '.join(f'{w:.2f}' for w in weights.tolist())})")
    several = "" if world_size() == 1 else (
        f" x {world_size()} processes, {processes_batch(options['batch_size'])}")
    return (f"{run.name}: {options['arch']} at {size['crop']} px (resized to {size['resize']}, "
            f"{size['interpolation']}), training on {len(sets[0])} images, testing on "
            f"{len(sets[1])}{split}{final}, lr {run.lr:g}{schedule}{phase}{smoothing}{weighed}, "
            f"{runtime}{several}")


def checkpoint_of(run, options, read):
    """The checkpoint run continues (None: a fresh run), refused where made with other options."""
    path = options["resume"] or os.path.join(run.out, "model.pt")
    ckpt = (read or {}).get(path) or from_process_0(None if rank() > 0 or not os.path.exists(path)
                                                    else checkpoints.run_checkpoint(path))
    best = os.path.join(run.out, "best.pt")  # without model.pt, a fresh run would write over it
    began = ckpt or from_process_0(None if rank() > 0 or not os.path.exists(best) else {
        k: v for k, v in checkpoints.load_checkpoint(best).items()
        if k in ("args", "held_out", "name", "history")})
    if not began:  # a fresh run
        return None
    if not ckpt and len(began["history"]) > 1:  # not one stopped between the two files
        raise UserError(f"{best} keeps epoch {len(began['history'])} of a run whose model.pt is "
                        "gone, and a new run would write over it; put model.pt back to continue "
                        "the run, or train anew in another out=")
    began_in = path if ckpt else best
    refuse_changes(run_options(run, began["args"]), run_options(run, options), began_in,
                   may_change(began, read))
    if began.get("name", run.name) != run.name:  # runs in each other's folders
        raise UserError(f"{began_in} holds the run {began['name']}, not {run.name}, "
                        f"whose folder it is in; put each run of {os.path.dirname(run.out)} back "
                        "in the folder named after it, or continue this one alone: resume="
                        f"{run.out}")
    if ckpt and options["epochs"] < len(ckpt["history"]):  # its total would read as fewer
        raise UserError(f"{began_in} has trained {len(ckpt['history'])} epochs, more than "
                        f"epochs={options['epochs']}; give epochs={len(ckpt['history'])} or more")
    return ckpt


def may_change(ckpt, read):
    """What may change (MAY_CHANGE): data_dir only to resume, val_split where none was held out."""
    changes = MAY_CHANGE if read is not None else MAY_CHANGE - {"data_dir"}
    if ckpt["args"].get("lr_schedule"):  # its cosine ends at the run's last epoch
        changes = changes - {"epochs"}
    return changes | ({"val_split"} if ckpt.get("held_out") is None else set())


def described(run, options, sets, runtime):
    """What a run's checkpoint and metrics.json say of it: what prediction needs, how it ran."""
    return dict(name=run.name, mode=run.mode, lr=run.lr, args=options, arch=options["arch"],
                classes=folders.class_names(sets[0]),
                transform=dict(archs.preprocessing(options["arch"]), mean=data.MEAN, std=data.STD),
                device=str(runtime.device), precision=str(runtime.dtype or torch.float32),
                memory_format=str(runtime.memory_format),
                held_out=getattr(sets[1], "held_out", None), tested=folders.tested(sets[1]),
                final_split=folders.final_split(sets))


# Why an option that may change on resume stays the same here (may_change).
WHY_SAME = {"data_dir": " (a data folder moved: resume the run with data_dir= where it is now)",
            "epochs": " (its cosine schedule ends at its last epoch)"}


def refuse_changes(before, now, path, changeable):
    """Refuse options that differ from those the run began with, but for those that may change."""
    def same(key, value):  # a folder through a link is that folder
        return os.path.realpath(value) if key in PATHS and value else value

    def words(value):
        return " ".join(map(str, value)) if isinstance(value, list) else (
            "the default" if value is None else value)

    changed = sorted(k for k in before if k in now and k not in changeable
                     and same(k, before[k]) != same(k, now[k]))
    if changed:
        options = "; ".join(f"{k}: {words(before[k])} there, {words(now[k])} now" for k in changed)
        why = "".join(WHY_SAME[k] for k in changed if k in WHY_SAME)
        raise UserError(f"{path} was made with other options ({options}); continue it with the "
                        f"same{why}, or train a new run in another out=")


def concluded(run, sets, options, runtime, about, best_epoch=None):
    """The run's results, written: about, the last epoch's figures and best.pt's (best_epoch: its
    Epoch, where tested in this process; else as best.pt keeps them)."""
    best, probs, labels = best_epoch or evaluated(run, sets[1], options, runtime, as_tested=True)
    history = about["history"]
    result = finite(dict({k: v for k, v in about.items()
                          if k not in ("transform", "held_out", "tested")},
                         **{k: history[-1][k] for k in SUMMARY},  # the book's summary
                         examples_per_sec=progress.mean_speed(history), world_size=world_size(),
                         figures_epoch=best["epoch"], **figures(probs, labels, about["classes"]),
                         kept=kept(best, about), versions=VERSIONS))
    if rank() == 0:  # metrics.json first: a picture that cannot be written loses nothing else
        write_metrics(run.out, result)
        pictures.curves({result["name"]: history}, os.path.join(run.out, "curves.png"))
        pictures.mistakes(sets[1], probs, predicted(probs), labels, result["classes"],
                          os.path.join(run.out, "mistakes.png"))  # what best.pt's epoch gets wrong
    return result


def kept(best, about):
    """The epoch best.pt keeps, its test acc, and whether that is optimistic (chosen on test/)."""
    optimistic = not about.get("final_split")
    return dict(epoch=best["epoch"], test_acc=best["test_acc"], optimistic=optimistic, note=(
        "the epoch was chosen on the set its accuracy is measured on, so that accuracy is "
        "optimistic; in a data folder, train/, val/ and test/ together keep test/ apart for one "
        "honest figure" if optimistic else None))


def write_metrics(folder, result):  # strict JSON: what is not finite was made None (files.finite)
    text = json.dumps(result, indent=1, allow_nan=False)
    write_whole(os.path.join(folder, "metrics.json"), text.encode())


def finished(folder, ckpt):
    """A finished run's metrics.json where it matches the checkpoint; else None (written again)."""
    with (contextlib.suppress(OSError, ValueError, KeyError, TypeError),
          open(os.path.join(folder, "metrics.json")) as f):
        result = json.load(f)
        same = result["history"] == finite(ckpt["history"]) and result["name"] == ckpt["name"]
        return result if same else None


def resumable(options):
    """What continues the runs stopped now (model.pt, or out for several); None before any epoch."""
    out = options["out"]
    with contextlib.suppress(UserError):  # out holds no model.pt
        found = checkpoints.checkpoint_in(out)
        return options["resume"] or (found if len(plan_runs(options["mode"], options, out)) == 1
                                     else out)
    return None
