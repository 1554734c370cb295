"""Fine-tune resnet18 to recognise hot dogs, as in Dive into Deep Learning §14.2.

    python finetune.py --pretrained     # fine-tune the ImageNet net (book: test acc 0.940)
    python finetune.py --scratch        # the same net from random weights (book: 0.850)

This file is the command line: it parses arguments and wires data.py, models.py and train.py.
"""
import argparse
import contextlib
import csv
import io
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass

try:
    import fcntl  # file locks, on Linux and macOS
except ImportError:
    fcntl = None

import torch
import torch.distributed as dist
import torchvision

import data
import models
import plots
import train
from data import UserError, rank, world_size
from train import say

# The book's recipe, per mode: base lr, whether fc learns at 10x, and the figures it reports.
RECIPES = {"pretrained": dict(lr=5e-5, param_group=True, book=(0.242, 0.909, 0.940)),
           "scratch": dict(lr=5e-4, param_group=False, book=(0.352, 0.846, 0.850))}
DATASETS = {"hotdog": dict(epochs=5), "cifar10": dict(epochs=10, lr=5e-4, book_test_acc=0.828)}


def positive(kind, zero=False):
    """An argparse type: a number above 0 (or, with zero, at least 0)."""
    def parse(text):
        value = kind(text)
        if value < 0 or value == 0 and not zero:
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'positive'}, got {text}")
        return value
    return parse


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parse_args(argv=None):
    """The command line's arguments; args.typed names the options given on it, whatever their value."""
    p = parser()
    args = p.parse_args(argv)
    args.mode = "predict" if args.predict else "resume" if args.resume else args.mode
    if not args.mode:
        p.error("say what to do: --pretrained, --scratch, --compare, --predict, --show-samples or --resume")
    if args.predict and not args.model:
        p.error("--predict needs --model PATH (a model.pt written by training)")
    untouched = object()  # argparse sets only what was typed on a namespace that has every option
    typed = vars(p.parse_args(argv, argparse.Namespace(**{key: untouched for key in vars(args)})))
    args.typed = sorted(key for key, value in typed.items() if value is not untouched)
    return args


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    for flag, text in (("pretrained", "fine-tune the ImageNet resnet18"),
                       ("scratch", "train resnet18 from random weights"),
                       ("compare", "both, with a table against the book"),
                       ("show-samples", "write samples.png and exit")):
        mode.add_argument(f"--{flag}", dest="mode", action="store_const", const=flag, help=text)
    mode.add_argument("--predict", nargs="+", metavar="IMAGE", help="classify images with --model")
    mode.add_argument("--resume", metavar="PATH", help="continue the run that wrote PATH (model.pt)")
    p.add_argument("--model", metavar="PATH", help="a model.pt written by training, for --predict")
    p.add_argument("--dataset", choices=DATASETS, default="hotdog")
    p.add_argument("--data-dir", help="a folder with train/ and test/ ImageFolders, or class folders alone")
    p.add_argument("--data-root", default="data", help="where downloads go (default: ./data)")
    p.add_argument("--dummy", action="store_true", help="random hot-dog-shaped data, for speed")
    p.add_argument("--cache-gb", type=positive(float, zero=True), metavar="GB",
                   help="decode images once if they fit in GB (default: half the free memory)")
    p.add_argument("--no-cache", dest="cache_gb", action="store_const", const=0,
                   help="decode images every epoch, not once (--cache-gb 0)")
    p.add_argument("--arch", help="any ImageNet classifier of torchvision's, e.g. resnet50, mobilenet_v3_small, "
                                  "convnext_tiny (default: resnet18, the book's)")
    p.add_argument("--weights", metavar="FILE", help="the arch's ImageNet state-dict, for offline use")
    p.add_argument("--epochs", type=positive(int), help="default: 5 (cifar10: 10)")
    p.add_argument("--batch-size", type=positive(int), default=128, help="global, over all processes")
    p.add_argument("--lr", type=positive(float), nargs="+",
                   help="base lr; several give one run each (default: 5e-5 pretrained, 5e-4 scratch)")
    p.add_argument("--no-param-group", action="store_true", help="fc at the base lr, not 10x")
    p.add_argument("--freeze", action="store_true", help="train only the new output layer")
    p.add_argument("--init-head-from-imagenet", action="store_true", help="start from ImageNet's hot-dog row")
    p.add_argument("--workers", type=positive(int, zero=True),
                   help="loader processes (default: one per core, at most 16)")
    p.add_argument("--max-megapixels", type=positive(float), default=200,
                   help="larger images are refused as possible decompression bombs (default: 200)")
    p.add_argument("--val-split", type=fraction, default=0.2, metavar="FRACTION",
                   help="a --data-dir of class folders alone: the share of each class held out for testing")
    p.add_argument("--seed", type=int, default=0, help="for the initial head, the shuffles and --val-split")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best there is)")
    p.add_argument("--precision", choices=["amp", "fp32"], default="amp",
                   help="amp (default): channels-last, and bf16 autocast where the CPU or GPU has native "
                        "bf16 (fp16 on older GPUs); fp32: the book's arithmetic")
    p.add_argument("--out", help="output folder (default: runs/<mode>-<time>)")
    return p


# ---------------------------------------------------------------- what to train
@dataclass
class Run:
    """One training: a name, the book's mode, its learning rate, and where it writes."""
    name: str
    mode: str
    lr: float
    out: str


def plan_runs(args, out):
    """Every training the arguments ask for: one, both modes (--compare), one per --lr. A single
    run writes into out, several each into a folder of their own inside it."""
    modes = ["pretrained", "scratch"] if args.mode == "compare" else [args.mode]
    lrs = {mode: args.lr or [DATASETS[args.dataset].get("lr", RECIPES[mode]["lr"])] for mode in modes}
    runs = [(mode if len(lrs[mode]) == 1 else f"{mode}-lr{lr:g}", mode, lr) for mode in modes for lr in lrs[mode]]
    return [Run(name, mode, lr, out if len(runs) == 1 else os.path.join(out, name)) for name, mode, lr in runs]


def same_arch(args, ckpt, path):
    """The checkpoint knows its architecture: an --arch given beside it must be the same."""
    if args.arch and args.arch != ckpt.get("arch", "resnet18"):
        raise UserError(f"{path} holds a {ckpt.get('arch', 'resnet18')}, not a {args.arch}; leave --arch out")


# What may differ when a run continues; every other option must be the one the run began with.
MAY_CHANGE = {"epochs", "device", "workers", "max_megapixels", "cache_gb", "out", "resume", "typed"}
PATHS = {"data_dir", "data_root", "weights"}  # compared, and stored, as absolute paths


def resumed_args(args):
    """The arguments of the run --resume names (its model.pt, or its folder): those it began
    with, and the ones that may change given anew. It continues as a rerun on that folder would."""
    path = os.path.abspath(checkpoint_in(args.resume))
    ckpt = train.load_checkpoint(path)
    same_arch(args, ckpt, path)
    defaults = vars(parse_args(["--scratch"]))  # for options newer than the checkpoint
    given = {k: getattr(args, k) for k in args.typed if k not in ("resume", "arch", "out")}
    typed_then = ckpt["args"].get("typed", ["workers"])
    before = {k: v for k, v in ckpt["args"].items() if k != "workers" or k in typed_then}  # else this machine's
    refuse_changes({**defaults, **before}, given, path)
    args = argparse.Namespace(**{**defaults, **before, **given, "resume": path, "typed": args.typed})
    out = os.path.dirname(path)
    args.out = os.path.dirname(out) if len(plan_runs(args, out)) > 1 else out  # --compare: its folder
    return args


def checkpoint_in(path):
    """A model.pt: path itself, or in the folder path, or in a run's folder inside it (--compare)."""
    found = [path] if not os.path.isdir(path) else sorted(
        p for p in [os.path.join(path, "model.pt")] + [os.path.join(path, name, "model.pt") for name in os.listdir(path)]
        if os.path.exists(p))
    if not found:
        raise UserError(f"{path} holds no model.pt; give the model.pt of a training run, or its folder")
    return found[0]


def refuse_changes(before, now, path):
    """A run continues with the options it began with: name those that differ, in one line."""
    def same(key, value):
        return os.path.abspath(value) if key in PATHS and value else value

    def shown(value):
        return "the default" if value is None else " ".join(map(str, value)) if isinstance(value, list) else value

    def flag(key):
        return "--pretrained, --scratch or --compare" if key == "mode" else "--" + key.replace("_", "-")

    changed = sorted(k for k in before if k in now and k not in MAY_CHANGE and same(k, before[k]) != same(k, now[k]))
    if changed:
        options = "; ".join(f"{flag(k)}: {shown(before[k])} there, {shown(now[k])} now" for k in changed)
        raise UserError(f"{path} was made with other options ({options}); continue it with the same, "
                        "or choose another --out")


def run_checkpoint(run, args):
    """The checkpoint in the run's folder to continue, or None for a fresh run. Process 0 reads
    it and sends it to the others, so that all continue from the same epoch (torchrun restarts
    every process of a job when one fails)."""
    named = args.resume and os.path.dirname(args.resume) == run.out  # --resume's own file
    path = args.resume if named else os.path.join(run.out, "model.pt")
    ckpt = train.from_process_0(train.load_checkpoint(path) if rank() == 0 and os.path.exists(path) else None)
    if ckpt:
        refuse_changes(ckpt["args"], vars(args), path)
    return ckpt


# ---------------------------------------------------------------- training
def local_first(fn, *a):
    """Run fn on each machine's first process (it downloads), then on the others (they find its
    files). Machines that share a file system would download side by side: give --data-dir."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        dist.barrier()
    result = fn(*a)
    if first and dist.is_initialized():
        dist.barrier()
    return result


def load_sets(args):
    """The data the arguments name, augmented at the sizes args.arch was trained at (resnet18:
    the book's augmentations)."""
    settings = models.preprocessing(args.arch)
    sets = datasets(args)
    sets[0].transform = data.make_train_augs(settings["crop"], settings["interpolation"])
    sets[1].transform = data.make_test_augs(settings["resize"], settings["crop"], settings["interpolation"])
    return sets


def datasets(args):
    if args.dummy:
        return data.fake_data()
    if args.dataset == "cifar10":
        return data.cifar10(args.data_root)
    folder = args.data_dir or data.get_hotdog(args.data_root)
    budget = None if args.cache_gb is None else int(args.cache_gb * 2**30)
    split = args.out and os.path.join(args.out, "held_out.txt")  # a continued run's split, as it was
    held_out = open(split, encoding="utf-8").read().splitlines() if split and os.path.exists(split) else None
    return data.image_folders(folder, budget, args.workers or 1, args.val_split, args.seed, held_out)


def build_net(run, classes, args, ckpt=None):
    """The book's net for the run's mode, with a checkpoint's weights when resuming."""
    torch.manual_seed(args.seed)  # the same initial head on every process
    num_classes = len(classes)
    if run.mode == "scratch":
        net = models.scratch_net(num_classes, args.arch)
    else:
        hotdog = models.hotdog_class(classes) if args.init_head_from_imagenet else None
        net = local_first(models.finetune_net, num_classes, args.weights, hotdog, args.arch)
        net = models.freeze_features(net) if args.freeze else net
    if ckpt:
        try:
            net.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise UserError(f"{os.path.join(run.out, 'model.pt')} holds another architecture than {args.arch} "
                            f"with {num_classes} classes; continue it with the program that wrote it") from None
    return net


def check_out(run, classes, ckpt):
    """The run's folder, refusing to continue a run with other classes."""
    checkpoint = os.path.join(run.out, "model.pt")
    if ckpt and ckpt["classes"] != classes:
        raise UserError(f"{checkpoint} was trained on classes {ckpt['classes']}, not {classes}; "
                        "continue it with the data it was trained on")
    if rank() == 0:
        data.writable_folder(run.out)
    return checkpoint


def train_one(run, args, sets, device, ckpt=None):
    """Train one net, saving model.pt after every epoch; report it and return its result."""
    random.seed(args.seed)
    classes = data.class_names(sets[0])
    checkpoint = check_out(run, classes, ckpt)
    net = build_net(run, classes, args, ckpt)
    torch.manual_seed(args.seed + rank())  # then each process draws its own augmentations
    train_iter, test_iter = data.make_loaders(*sets, args.batch_size, args.workers, args.seed)
    runtime = train.make_runtime(device, args.precision)
    say(header(run, args, sets, runtime))
    meta = dict(args=vars(args), run=dict(name=run.name, mode=run.mode, lr=run.lr), classes=classes,
                transform=dict(**models.preprocessing(args.arch), mean=data.MEAN, std=data.STD), arch=args.arch)
    history = ckpt["history"] if ckpt else []
    param_group = RECIPES[run.mode]["param_group"] and not args.no_param_group
    for epoch in train.fine_tuning_epochs(net, run.lr, train_iter, test_iter, args.epochs, param_group,
                                          runtime, ckpt):
        history.append(epoch.metrics)
        say(train.epoch_line(epoch.metrics))
        train.save_checkpoint(checkpoint, epoch, history, meta)
    result = summary(run, history, classes, epoch, runtime, args)
    if rank() == 0:
        report(result, epoch, sets[1], run.out)
    return result


def header(run, args, sets, runtime):
    """The run's first line: the net and its image sizes, the data, the learning rate, the runtime."""
    size = models.preprocessing(args.arch)
    split = f" {sets[1].where}" if hasattr(sets[1], "where") else ""
    return (f"{run.name}: {args.arch} at {size['crop']} px (resized to {size['resize']}, {size['interpolation']}), "
            f"training on {len(sets[0])} images, testing on {len(sets[1])}{split}, lr {run.lr:g}, {runtime}"
            + (f" x {world_size()} processes, {processes_batch(args.batch_size)}" if world_size() > 1 else ""))


def processes_batch(batch_size):
    """How the global batch splits over the processes: evenly, so a batch that does not divide
    by their number is made smaller (each process must take as many steps as the others)."""
    each = batch_size // world_size()
    return f"batch {each} each" + (f", {each * world_size()} in all (not {batch_size})"
                                   if batch_size % world_size() else "")


def summary(run, history, classes, epoch, runtime, args):
    """What metrics.json holds: the last epoch's figures, the history, the confusion matrix."""
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    confusion.index_put_((epoch.labels, epoch.probs.argmax(1)), torch.ones_like(epoch.labels), accumulate=True)
    last = history[-1]
    return dict(name=run.name, mode=run.mode, lr=run.lr, loss=last["loss"], train_acc=last["train_acc"],
                test_acc=last["test_acc"], examples_per_sec=sum(m["examples_per_sec"] for m in history) / len(history),
                device=str(runtime.device), world_size=world_size(),
                precision=str(runtime.dtype or torch.float32), memory_format=str(runtime.memory_format),
                history=history, classes=classes, confusion=confusion.tolist(), args=vars(args),
                versions=dict(python=platform.python_version(), torch=torch.__version__,
                              torchvision=torchvision.__version__))


def report(result, epoch, test_set, out):
    """Print the book's summary and the confusion matrix; write metrics.json and mistakes.png."""
    classes = result["classes"]
    print(train.summary_line(result))
    print(f"{result['examples_per_sec']:.1f} examples/sec on {result['device']}")
    if len(classes) <= 10:
        print("confusion (rows: true class, columns: predicted):")
        for c, row in zip(classes, result["confusion"]):
            print(f"  {c:>12} " + " ".join(f"{v:6d}" for v in row))
    data.write_whole(os.path.join(out, "metrics.json"), json.dumps(result, indent=1).encode())
    probs, labels = epoch.probs, epoch.labels
    preds = probs.argmax(1)
    wrong = (preds != labels).nonzero().flatten()[:16].tolist()
    plots.mistakes([test_set[i][0] for i in wrong],
                   [f"true {classes[labels[i]]}\npred {classes[preds[i]]} {probs[i].max():.2f}" for i in wrong],
                   os.path.join(out, "mistakes.png"))


def print_table(results, dataset):
    print(f"\n{'run':<24} {'loss':>6} {'train acc':>9} {'test acc':>8} {'ex/sec':>8}   book")
    for r in results:
        if dataset == "cifar10":
            book = f"test acc {DATASETS['cifar10']['book_test_acc']}"
        else:
            book = "loss {:.3f}, train acc {:.3f}, test acc {:.3f}".format(*RECIPES[r["mode"]]["book"])
        print(f"{r['name']:<24} {r['loss']:6.3f} {r['train_acc']:9.3f} {r['test_acc']:8.3f} "
              f"{r['examples_per_sec']:8.1f}   {book}")


def train_runs(args):
    """Everything one process does: set up, train every planned run, write the outputs. A run
    whose folder holds a checkpoint continues it: after Ctrl-C (--resume), and when torchrun
    restarts a job's processes."""
    args = resumed_args(args) if args.resume else args
    args.arch = models.check_arch(args.arch or "resnet18")
    args.epochs = args.epochs or DATASETS[args.dataset]["epochs"]
    args.workers = data.default_workers() if args.workers is None else args.workers
    for key in PATHS:
        setattr(args, key, getattr(args, key) and os.path.abspath(getattr(args, key)))
    device = train.join_processes(train.try_device(args.device))
    args.out = os.path.abspath(args.out or default_out(args.mode))
    try:
        with writing_to(args.out) if rank() == 0 else contextlib.nullcontext():
            return train_all(args, args.out, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def default_out(mode):
    """runs/<mode>-<time>. Under torchrun the time is when torchrun started, the same for every
    restart of the job's processes: they find their checkpoint there."""
    started = job_start() if "TORCHELASTIC_RUN_ID" in os.environ else time.time()
    return os.path.join("runs", f"{mode}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}")


def job_start():
    """When this process's parent (torchrun, which restarts it) started, from Linux's /proc."""
    try:
        ticks = int(open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


@contextlib.contextmanager
def writing_to(folder):
    """The output folder while a run writes to it: tried (a probe written) before any data is
    read, locked against a second run, and removed again if nothing was written to it."""
    new = not os.path.exists(folder)
    with open(os.path.join(data.writable_folder(folder), ".lock"), "w") as lock:
        if fcntl:  # Linux and macOS
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # the lock is the other run's: leave it
                raise UserError(f"another run is writing to {folder}; wait for it to end, or choose another --out") from None
        try:
            yield folder
        finally:
            os.remove(lock.name)  # still held, so no other run takes the folder meanwhile
            if new:
                remove_empty_folders(folder)


def train_all(args, out, device):
    """Load the data, train every planned run (continuing those that have begun), compare them."""
    start = time.perf_counter()
    sets = local_first(load_sets, args)
    say(f"data ready in {time.perf_counter() - start:.1f} s")
    if rank() == 0 and getattr(sets[1], "held_out", None) is not None:  # which images a split held out
        data.write_whole(os.path.join(out, "held_out.txt"), "".join(p + "\n" for p in sets[1].held_out).encode())
    runs, results = plan_runs(args, out), []
    for run in runs:
        ckpt = run_checkpoint(run, args)
        if ckpt and len(ckpt["history"]) >= args.epochs:
            say(f"{run.name}: finished its {len(ckpt['history'])} epochs already; give more --epochs to train on")
            results.append(finished(run, ckpt["history"]))
            continue
        try:
            results.append(train_one(run, args, sets, device, ckpt))
        except KeyboardInterrupt:
            return interrupted(os.path.join(run.out, "model.pt"))
    if rank() == 0:
        if len(results) > 1:
            print_table(results, args.dataset)
        plots.curves({r["name"]: r["history"] for r in results}, os.path.join(out, "curves.png"))
        print(f"wrote {out}")
    return 0


def finished(run, history):
    """A finished run's result: its metrics.json, or, where the run ended before writing it, the
    figures its checkpoint holds."""
    metrics = os.path.join(run.out, "metrics.json")
    if os.path.exists(metrics):
        return json.load(open(metrics))
    return dict(name=run.name, mode=run.mode, lr=run.lr, history=history,
                **{k: history[-1][k] for k in ("loss", "train_acc", "test_acc")},
                examples_per_sec=sum(m["examples_per_sec"] for m in history) / len(history))


def remove_empty_folders(folder):
    """Remove folder and the folders in it where nothing was written."""
    for root, _, _ in reversed(list(os.walk(folder))):  # the deepest first
        with contextlib.suppress(OSError):  # not empty
            os.rmdir(root)


def interrupted(checkpoint=None):
    """Ctrl-C: say how to continue, if an epoch had finished (process 0 says it)."""
    if rank() > 0:
        return 130
    print("\ninterrupted; " + (f"{checkpoint} holds the last whole epoch: continue with "
                               f"python finetune.py --resume {checkpoint}"
                               if checkpoint and os.path.exists(checkpoint) else
                               "no epoch had finished, so there is nothing to resume"), file=sys.stderr)
    return 130


# ---------------------------------------------------------------- the other modes
def predict(args):
    """Classify images and folders of them with a trained model.pt, in batches, through the test
    transforms saved beside it; print a line per image and write predictions.csv."""
    ckpt = train.load_checkpoint(args.model)
    same_arch(args, ckpt, args.model)
    csv_path = os.path.join(data.writable_folder(args.out or "."), "predictions.csv")
    classes, settings = ckpt["classes"], ckpt["transform"]
    paths = data.image_paths(args.predict)
    if not paths:
        raise UserError(f"found no images in {' '.join(args.predict)}; give image files or folders of them")
    augs = data.make_test_augs(settings["resize"], settings["crop"], settings.get("interpolation", "bilinear"))
    images = data.ImageFiles(paths, augs, settings["crop"])
    workers = data.default_workers() if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(images, args.batch_size, num_workers=workers)
    net = models.saved_net(ckpt)
    runtime = train.make_runtime(train.try_device(args.device), args.precision)
    probs, index = train.evaluate(runtime.place(net), loader, runtime)
    rows = [[paths[i], classes[p.argmax()], f"{p.max():.4f}", *(f"{q:.4f}" for q in p)]
            for i, p in zip(index.tolist(), probs) if i >= 0]
    for path, name, prob, *_ in rows:
        print(f"{path}: {name} {float(prob):.3f}")
    table = io.StringIO()
    csv.writer(table).writerows([["path", "class", "probability", *classes], *rows])
    data.write_whole(csv_path, table.getvalue().encode())
    print(f"wrote {csv_path}" + (f"; {len(paths) - len(rows)} of {len(paths)} images could not be read"
                                 if len(rows) < len(paths) else ""), file=sys.stderr)
    return 0 if len(rows) == len(paths) else 1


def show_samples(args):
    """The book's first look at the data (§14.2.2.1), and the same images as the net sees them."""
    path = os.path.join(data.writable_folder(args.out or "."), "samples.png")
    data_dir = args.data_dir or data.get_hotdog(args.data_root)
    train_dir = os.path.join(data_dir, "train")
    folder = data.ImageFolder(train_dir if os.path.isdir(train_dir) else data_dir)  # or class folders alone
    first, last = folder.targets[0], folder.targets[-1]  # fewer than 8 where a class has fewer
    picks = ([i for i, t in enumerate(folder.targets) if t == first][:8]
             + [i for i, t in enumerate(folder.targets) if t == last][-8:])
    images = [folder[i][0] for i in picks]
    if plots.samples(images, [data.train_augs(img) for img in images], path):
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- starting
# The modules' errors name a Python caller's arguments (`batch_size=3`); here, the flags.
FLAGS = {"batch_size=": "--batch-size ", "device=": "--device ", "weights_file=": "--weights ",
         "hotdog_class": "--init-head-from-imagenet", "arch=": "--arch "}


def one_line(error):
    """A library error as the command line's one line: from a loader worker, the message holds
    its traceback, so the last line; the arguments named as flags."""
    message = str(error).strip().splitlines()[-1].removeprefix("data.UserError: ")
    for argument, flag in FLAGS.items():
        message = message.replace(argument, flag)
    return f"error: {message}"


def guarded(fn, args):
    """Run fn(args), turning bad input and Ctrl-C into a one-line message and an exit status."""
    data.Image.MAX_IMAGE_PIXELS = int(args.max_megapixels * 10**6)  # PIL's limit, in every process
    try:
        return fn(args)
    except UserError as e:  # every process meets the same bad input: process 0 says it
        if rank() == 0:
            print(one_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()
    except torch.OutOfMemoryError:
        print(f"error: out of GPU memory at --batch-size {args.batch_size}; "
              f"try --batch-size {max(1, args.batch_size // 2)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # another process died (killed, out of memory): torchrun restarts all
        if int(os.environ.get("WORLD_SIZE", 1)) == 1 or "gloo" not in str(e) and not isinstance(e, dist.DistError):
            raise
        if rank() == 0:
            print("error: another process of this run stopped; with torchrun --max-restarts the "
                  "run continues from its last epoch", file=sys.stderr)
        return 1


def run_device(args):
    """The --device a run asks for; a resumed run's own, unless given anew."""
    if args.device or not args.resume:
        return args.device
    with contextlib.suppress(UserError):  # guarded(train_runs) will say what is wrong
        return train.load_checkpoint(checkpoint_in(args.resume))["args"]["device"]


def on_all_gpus(argv, gpus):
    """One process per GPU, as the book's try_all_gpus meant, started by torchrun's own launcher
    (`torchrun --standalone --nproc_per_node=GPUS finetune.py ...`): the environment torchrun
    sets, loader workers forked as under torchrun, and a process that dies reported."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args, run
    try:
        run(torchrun_args(["--standalone", f"--nproc_per_node={gpus}", os.path.abspath(__file__), *argv]))
    except ChildFailedError as e:
        return died(e)
    except SignalException:  # Ctrl-C: the processes have said how to continue
        return 130
    return 0


def died(error):
    """torchrun's report of a failed process as one line, where the process did not say why."""
    rank, failure = error.get_first_failure()
    if failure.exitcode >= 0:  # it exited with a status, after saying why
        return failure.exitcode
    print(f"error: process {rank} was killed by {failure.signal_name()}"
          + (" (as the out-of-memory killer does: try a smaller --batch-size or fewer --workers)"
             if failure.signal_name() == "SIGKILL" else ""), file=sys.stderr)
    return 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    if args.mode in ("predict", "show-samples"):  # under torchrun, once: by process 0
        return 0 if rank() > 0 else guarded(predict if args.mode == "predict" else show_samples, args)
    gpus = torch.cuda.device_count() if run_device(args) in (None, "cuda") else 0
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        return on_all_gpus(argv, gpus)
    return guarded(train_runs, args)


if __name__ == "__main__":
    sys.exit(main())
