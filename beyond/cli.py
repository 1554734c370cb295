"""The command line: its flags (each option as beyond.options defines it), what each mode prints,
and errors and Ctrl-C turned into one line and an exit status; finetune.py calls it."""
import argparse
import os
import re
import shlex
import sys

import torch
import torch.distributed as dist

import data
from beyond import UserError, datasets, importable, predict, runs, shown
from beyond.options import DATASETS, DEFAULTS, OPTIONS, PATHS, checked, refuse_unread, takes
from beyond.photos import image_paths, megapixels_limit
from beyond.processes import job_size, rank, say

DESCRIPTION = "Fine-tune resnet18 to recognise hot dogs, as in Dive into Deep Learning §14.2."
MODES = {"pretrained": "fine-tune the ImageNet resnet18",
         "scratch": "train resnet18 from random weights",
         "compare": "both, with a table against the book",
         "show-samples": "write samples.png and exit"}

# Each option's help, in the order --help lists them (OPTIONS holds its default, type and values).
HELP = dict(
    dataset=f"hotdog or cifar10 (default: {DEFAULTS['dataset']})",
    data_dir="a folder with train/ and test/ ImageFolders, or class folders alone",
    data_root=f"where downloads go (default: ./{DEFAULTS['data_root']})",
    dummy="random hot-dog-shaped data, for speed",
    cache_gb="decode images once if they fit in GB (default: half the free memory)",
    arch="an ImageNet classifier of torchvision's that ends in one Linear layer, e.g. resnet50, "
         f"mobilenet_v3_small, convnext_tiny (default: {DEFAULTS['arch']}, the book's)",
    weights="the arch's ImageNet state-dict, for offline use",
    epochs="default: 5 (cifar10: 10)",
    batch_size=f"global, over all processes (default: {DEFAULTS['batch_size']})",
    lr="base lr; several give one run each (default: the recipe's, 5e-5 pretrained and 5e-4 "
       "scratch; 5e-4 for both with cifar10)",
    no_param_group="fc at the base lr, not 10x",
    freeze="train only the new output layer",
    init_head_from_imagenet="start from ImageNet's hot-dog row",
    patience="stop when the test acc (val/'s, where there is one) has not improved for N epochs",
    freeze_epochs="first train the output layer alone, N epochs",
    class_weights="balanced: weigh the loss so that every class counts the same",
    lr_schedule="cosine: the lr falls along a cosine to 0 at the run's end (default: "
                "constant, the book's)",
    warmup_epochs="with --lr-schedule: first raise the lr linearly over N epochs",
    label_smoothing="cross-entropy's label smoothing, from 0 (default, the book's) to below 1",
    tensorboard="also write TensorBoard's event files into the run's folder",
    workers="loader processes (default: one per core, at most 16)",
    max_megapixels="larger images are refused as possible decompression bombs "
                   f"(default: {DEFAULTS['max_megapixels']})",
    val_split="class folders alone: the share of each class held out for testing "
              f"(default: {DEFAULTS['val_split']})",
    seed="for the initial weights, the augmentations, the shuffles and --val-split "
         f"(default: {DEFAULTS['seed']})",
    device="cpu, cuda, cuda:1, mps (default: the best there is)",
    precision="amp (default): channels-last, and bf16 autocast where the CPU or GPU has native "
              "bf16 (fp16 on older GPUs); fp32: plain fp32, no TF32",
)
METAVARS = {"cache_gb": "GB", "weights": "FILE", "val_split": "FRACTION",
            "class_weights": "balanced", "lr_schedule": "cosine", "label_smoothing": "X",
            "max_megapixels": "N"}  # else N for whole numbers, argparse's NAME for the others
NARGS = {"lr": "+"}  # several lrs: one run each
# What each mode that trains nothing reads: another option typed beside it would be ignored.
READS = {"predict": {"model", "out", "batch_size", "workers", "device", "precision", "arch",
                     "max_megapixels"}, "export": {"export_format", "out"},
         "show-samples": {"data_dir", "data_root", "out", "max_megapixels"}}


def parse_args(argv=None):
    """The mode, and the options typed (those left out are not in the namespace: DEFAULTS)."""
    p = argparse.ArgumentParser(description=DESCRIPTION, argument_default=argparse.SUPPRESS)
    if rank() > 0:  # under torchrun every process parses the same line: process 0 alone says why
        p.error = lambda message: p.exit(2)
    mode = p.add_mutually_exclusive_group()
    for name, text in MODES.items():
        mode.add_argument(f"--{name}", dest="mode", action="store_const", const=name, help=text)
    mode.add_argument("--predict", nargs="+", action="extend", metavar="IMAGE",  # given twice: all
                      help="classify images with --model")
    mode.add_argument("--resume", metavar="PATH", help="continue the run that wrote PATH "
                                                       "(model.pt, or its folder)")
    mode.add_argument("--export", metavar="RUN", help="write one file that classifies images "
                      "without this project: RUN's folder (its best.pt), best.pt or model.pt")
    p.add_argument("--model", metavar="PATH", help="a run's folder (its best.pt), best.pt or "
                   "model.pt, for --predict")
    p.add_argument("--export-format", choices=["pt2", "onnx"], help="pt2 (default: torch.export's) "
                   "or onnx")
    for name, text in HELP.items():
        if OPTIONS[name][1] is bool:
            p.add_argument(flag(name), action="store_true", help=text)
        else:
            p.add_argument(flag(name), type=parsed(name), help=text, nargs=NARGS.get(name),
                           action="extend" if name in NARGS else "store",  # --lr a --lr b: both
                           metavar=METAVARS.get(name, "N" if OPTIONS[name][1] is int else None))
    p.add_argument("--no-cache", action="store_true", help="decode images every epoch, not once "
                   "(--cache-gb 0)")
    p.add_argument("--out", help="output folder (default: runs/<mode>-<time>; for --predict, "
                   "--show-samples: .); for --export, the file (default: beside the checkpoint, "
                   "best.pt2 or best.onnx for best.pt)")
    args = p.parse_args(argv)
    if hasattr(args, "no_cache"):  # two flags for one option: the last would win, unsaid
        if hasattr(args, "cache_gb"):
            p.error("--no-cache and --cache-gb each set the cache; give one of them")
        args.cache_gb = 0
        del args.no_cache
    if not any(hasattr(args, key) for key in ("mode", "predict", "resume", "export")):
        p.error("say what to do: --pretrained, --scratch, --compare, --predict, --export, "
                "--show-samples or --resume")
    if hasattr(args, "predict") != hasattr(args, "model"):
        p.error("--predict needs --model PATH (a run's folder, or its model.pt), and --model goes "
                "with --predict")
    if hasattr(args, "export_format") and not hasattr(args, "export"):
        p.error("--export-format goes with --export RUN")
    mode = next((m for m in READS if hasattr(args, m) or getattr(args, "mode", None) == m), None)
    for ignored in sorted(set(vars(args)) - READS[mode] - {"mode", mode}) if mode else ():
        typed = flag(ignored).replace("--cache-gb", "--cache-gb or --no-cache")  # both set it
        p.error(f"{typed} does not apply to --{mode}, which reads "
                f"{', '.join(map(flag, sorted(READS[mode])))}")
    return args


def parsed(name):
    """Option name's type on the command line: its text converted, then options.checked."""
    _, kind, allowed = OPTIONS[name]

    def parse(text):
        try:
            return checked(name, kind(text))
        except (UserError, ValueError):
            raise argparse.ArgumentTypeError(f"give {takes(kind, allowed)}, not "
                                             f"{text or repr(text)}") from None
    return parse


def train(options):
    """--pretrained, --scratch, --compare (options["mode"]) and --resume: train, print results."""
    resume = options.pop("resume", None)
    trained = runs.resume(resume, **options) if resume is not None else runs.train_runs(**options)
    for result in trained.results:
        print_result(result)
    if len(trained.results) > 1:
        print_table(trained.results)
    say(f"wrote {shown(trained.out)}")  # a newline in its name: shown, not obeyed
    return 0


def print_result(result):
    """The figures of the epoch best.pt keeps, an early stop, the epoch kept, the final test."""
    name, classes, history = result["name"], result["classes"], result["history"]
    if "per_class" in result and len(classes) <= 10:  # the confusion matrix and each class's
        of = (f" of epoch {result['figures_epoch']}, the one best.pt keeps"
              if "figures_epoch" in result else "")  # an older run's metrics.json names none
        say(f"{name}: confusion{of} (rows: true class, columns: predicted), then precision, "
            "recall, F1, count:")
        for c, row in zip(classes, result["confusion"]):
            say(f"  {c:>12} " + " ".join(f"{v:6d}" for v in row) + "   {precision:.3f} "
                "{recall:.3f} {f1:.3f} {count:5d}".format(**result["per_class"][c]))
        say(f"  balanced accuracy {result['balanced_accuracy']:.3f}")
    if len(history) < result["args"]["epochs"] and runs.stalled(
            history, result["args"].get("patience"), result["args"].get("freeze_epochs", 0)):
        say(f"{name}: stopped early after epoch {history[-1]['epoch']}: no better test acc in "
            f"{result['args']['patience']} epochs")
    if "kept" in result:
        kept = result["kept"]
        say(f"{name}: best.pt keeps epoch {kept['epoch']}, test acc {kept['test_acc']:.3f}"
            + (f"; {kept['note']}" if kept["optimistic"] else ""))
    if "final_test" in result:
        final = result["final_test"]
        say(f"{name}: {final['split']}, once, with epoch {final['epoch']}'s weights: acc "
            f"{final['acc']:.3f}, balanced accuracy {final['balanced_accuracy']:.3f}")


def print_table(results):
    say(f"\n{'run':<24} {'loss':>6} {'train acc':>9} {'test acc':>8} {'ex/sec':>8}   book")
    for r in results:
        if r["args"]["dataset"] == "cifar10":
            book = f"test acc {DATASETS['cifar10']['book_test_acc']}"
        else:
            book = "loss %.3f, train acc %.3f, test acc %.3f" % runs.RECIPES[r["mode"]]["book"]
        loss = float("nan") if r["loss"] is None else r["loss"]  # null: a run that diverged
        say(f"{r['name']:<24} {loss:6.3f} {r['train_acc']:9.3f} {r['test_acc']:8.3f} "
            f"{r['examples_per_sec']:8.1f}   {book}")


def predict_images(options):
    """--predict: a line per image, and predictions.csv."""
    keys = ("batch_size", "workers", "device", "precision", "arch")
    keywords = {key: options[key] for key in keys if key in options}
    out = options.get("out", ".")
    # listed once: a folder that changes meanwhile would give another count
    images = image_paths(options["predict"]) or options["predict"]  # none: predict says where
    predictions = predict.predict(options["model"], images, out=out, **keywords)
    for p in predictions:
        say(f"{shown(p.path)}: {p.label} {p.probability:.3f}")
    found = len(images)
    wrote = shown(os.path.join(out, "predictions.csv")) if predictions else "no predictions.csv"
    missed = f"; {found - len(predictions)} of {found} images are not predicted (named above)"
    print("wrote " + wrote + (missed if len(predictions) < found else ""), file=sys.stderr)
    return 0 if len(predictions) == found else 1


def export(options):
    """--export: one file, the run's test augmentations and net, for use without this project."""
    say("wrote " + shown(predict.export(options["export"], options.get("out"),
                                        format=options.get("export_format", "pt2"))))
    return 0


def show_samples(options):
    """--show-samples: the book's first look at the data, and the same images augmented."""
    if not importable("matplotlib.figure"):  # its one picture: nothing to do without it
        raise UserError("--show-samples draws samples.png with matplotlib, which cannot be "
                        "imported here; pip install matplotlib")
    refuse_unread({**DEFAULTS, **options}, set(options))  # --data-root beside --data-dir
    data_dir = options.get("data_dir") or data.get_hotdog(options.get("data_root", "data"))
    path = datasets.samples(data_dir, options.get("out", "."))
    say(f"wrote {shown(path)}")
    return 0


def one_line(error, typed=None):
    """A library error as one line, the Python arguments it names (batch_size=3) named as flags;
    the paths among typed, the options given, are quoted as they are (a folder named seed=3)."""
    paths = sorted(paths_in(typed or {}), key=len, reverse=True)  # a file before its folder
    message = str(error)
    for i, path in enumerate(paths):  # a path as a whole, not inside a word, a keyword (lr:) or
        # a path set aside already (\0i\0: a folder named 0 is not the 0 in it)
        message = re.sub(rf"(?<![\w.\0-]){re.escape(path)}(?![\w.=:\0-])", f"\0{i}\0", message)
    message = message.replace("format=", "--export-format ")
    message = message.replace("beyond.predict.predict", "--predict")
    message = re.sub(r"^images=", "--predict ", message)  # predict's list of paths
    for name in [*OPTIONS, "out", "mode", "resume"]:  # not inside a path such as runs/lr=0.1
        # batch_size=3: --batch-size 3; then lr: ... and "another out="
        message = re.sub(rf"(?<![\w/.=-]){name}=(?=\S)", flag(name) + " ", message)
        message = re.sub(rf"(?<![\w/.=-]){name}(=|(?=: ))", flag(name), message)
    for i, path in enumerate(paths):
        message = message.replace(f"\0{i}\0", path)
    return f"error: {message}"


def paths_in(options):
    """The paths among the options, as typed, absolute and real, and the parts of each."""
    given = [v for k, v in options.items() if k in (*PATHS, "out", "resume", "model", "export")]
    given += options.get("predict") or []
    return {part for path in given if isinstance(path, str)
            for form in (path, os.path.abspath(path), os.path.realpath(path))
            for part in parts(form)}


def parts(path):
    """path, the folders above it and the name of each: what a message may quote of it."""
    found = set()
    while path and path not in found:
        found |= {path, os.path.basename(path)}
        path = os.path.dirname(path)
    return found - {"", os.sep}


def script(parser, work, args, stopped="interrupted"):
    """work(args) for a script beside the command line (the benchmarks): its bad input is the
    parser's one-line error, with the options named as the command line's flags; Ctrl-C, stopped."""
    try:
        return work(args)
    except UserError as e:
        parser.error(one_line(e, vars(args)).removeprefix("error: "))
    except KeyboardInterrupt:
        parser.exit(130, f"\n{stopped}\n")


def flag(name):
    return "--" + name.replace("_", "-") if name != "mode" else (
        "--pretrained, --scratch or --compare")


def guarded(fn, options):
    """Run fn(options), turning bad input and Ctrl-C into a one-line message and an exit status."""
    try:
        with megapixels_limit(options.get("max_megapixels", DEFAULTS["max_megapixels"])):
            return fn(dict(options))  # a copy: fn may pop what it takes; one_line reads them all
    except UserError as e:  # every process meets the same bad input: process 0 says it
        say(one_line(e, options), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return interrupted(e)
    except BrokenPipeError:  # its reader stopped (| head): stop quietly, as the shell's tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so no last flush fails
        return 141  # 128 + SIGPIPE
    except torch.OutOfMemoryError:
        batch_size = options.get("batch_size", DEFAULTS["batch_size"])
        print(f"error: out of GPU memory at --batch-size {batch_size}; try --batch-size "
              f"{max(1, batch_size // 2)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # another process died (killed, out of memory): torchrun restarts all
        if job_size() == 1 or ("gloo" not in str(e) and not isinstance(e, dist.DistError)):
            raise
        say("error: another process of this run stopped; with torchrun --max-restarts the "
            "run continues from its last epoch", file=sys.stderr)
        return 1


def interrupted(error):
    """Ctrl-C: in a training, say how to continue where an epoch had finished (process 0 says)."""
    checkpoint = getattr(error, "checkpoint", "")  # set by runs.trained; None: before any epoch
    said = (f"; {shown(checkpoint)} holds the last whole epoch: continue with python finetune.py "
            f"--resume {shlex.quote(checkpoint)}" if checkpoint else
            "; no epoch had finished, so there is nothing to resume" if checkpoint is None else "")
    say("\ninterrupted" + said, file=sys.stderr)
    return 130


def on_all_gpus(argv, gpus, script):
    """One process per GPU, as the book's try_all_gpus meant, started by torchrun's own launcher."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args, run
    try:
        run(torchrun_args(["--standalone", f"--nproc_per_node={gpus}", script, *argv]))
    except ChildFailedError as e:
        return died(e)
    except SignalException:  # Ctrl-C: the processes have said how to continue
        return 130
    return 0


def died(error):
    """torchrun's report of a failed process as one line, where the process did not say why."""
    process, failure = error.get_first_failure()
    if failure.exitcode >= 0:  # it exited with a status, after saying why
        return failure.exitcode
    oom = " (as the out-of-memory killer does: try a smaller --batch-size or fewer --workers)"
    print(f"error: process {process} was killed by {failure.signal_name()}"
          + (oom if failure.signal_name() == "SIGKILL" else ""), file=sys.stderr)
    return 1
