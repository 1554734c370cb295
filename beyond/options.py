"""The options of a run, defined once and checked once (`checked`), for the command line's flags
and for Python's keywords alike: each option's default, type and values, and the unread ones."""
import contextlib
import numbers
import os

import numpy as np
import torch

from beyond.folders import layout
from beyond import UserError, quoted

# Each data set's defaults: its epochs (and, for CIFAR-10, its lr and the book's figure).
DATASETS = {"hotdog": dict(epochs=5), "cifar10": dict(epochs=10, lr=5e-4, book_test_acc=0.828)}

# The values a number takes: the words for them, and the rule.
AT_LEAST_1, ZERO_OR_MORE = ("1 or more", lambda v: v >= 1), ("0 or more", lambda v: v >= 0)
BATCHES = ("1 or more, below 2**63", lambda v: 1 <= v < 2**63)  # 2**63 overflows the loader's index
MEGAPIXELS = ("above 0, below 1e12", lambda v: 0 < v < 1e12)  # x 10**6: pixels PIL compares
# Learning rates that a float32 holds: the base rate is no 0 there, and fc's 10x is finite.
LEARNING_RATES = ("from 1e-37 to below 1e37", lambda v: 1e-37 <= v < 1e37)
BETWEEN_0_AND_1 = ("between 0 and 1", lambda v: 0 < v < 1)
FROM_0_TO_BELOW_1 = ("from 0 to below 1", lambda v: 0 <= v < 1)
GIGABYTES = ("0 or more, below 2**33", lambda v: 0 <= v < 2**33)  # more bytes than a float holds
SEEDS = ("from -2**63 to 2**64 - 1", lambda v: -2**63 <= v < 2**64)  # what torch.manual_seed takes

NUMBERS = {int: numbers.Integral, float: numbers.Real}  # NumPy's numbers are these too
BOOLS = (bool, np.bool_)  # NumPy's True is not Python's

# Every option by its Python name: its default (None: off, or chosen at start), type and values.
OPTIONS = dict(
    dataset=("hotdog", str, list(DATASETS)), data_dir=(None, str, None),
    data_root=("data", str, None), dummy=(False, bool, None), cache_gb=(None, float, GIGABYTES),
    val_split=(0.2, float, BETWEEN_0_AND_1), max_megapixels=(200, float, MEGAPIXELS),  # the data
    arch=("resnet18", str, None), weights=(None, str, None), freeze=(False, bool, None),
    init_head_from_imagenet=(False, bool, None),                                 # the net
    epochs=(None, int, AT_LEAST_1), batch_size=(128, int, BATCHES),
    lr=(None, float, LEARNING_RATES), no_param_group=(False, bool, None),
    seed=(0, int, SEEDS),                                                        # the book's recipe
    patience=(None, int, AT_LEAST_1), freeze_epochs=(0, int, ZERO_OR_MORE),
    class_weights=(None, str, ["balanced"]), lr_schedule=(None, str, ["cosine"]),
    warmup_epochs=(0, int, ZERO_OR_MORE), label_smoothing=(0.0, float, FROM_0_TO_BELOW_1),
    tensorboard=(False, bool, None),                                             # beyond it: off
    workers=(None, int, ZERO_OR_MORE), device=(None, str, None),
    precision=("amp", str, ["amp", "fp32"]),                                     # where
)
DEFAULTS = {name: default for name, (default, _, _) in OPTIONS.items()}
PATHS = {"data_dir", "data_root", "weights"}  # made absolute, and compared so
PRETRAINED_ONLY = ("weights", "freeze", "init_head_from_imagenet", "freeze_epochs")


def checked(name, value):
    """value where option name (or out=, a path) takes it, else a UserError saying what it takes."""
    default, kind, allowed = OPTIONS.get(name, (None, str, None))  # out=: a path, or None
    if value is None and default is None:
        return None  # the default
    several = name == "lr" and isinstance(value, (list, tuple)) and value  # one run each
    given = value if several else [value]
    values = [as_kind(kind, v) for v in given]
    listed = isinstance(allowed, list)
    for v, typed in zip(given, values):
        if typed is None or (typed not in allowed if listed else allowed and not allowed[1](typed)):
            raise UserError(f"{name}={quoted(v)} is not {takes(kind, allowed)}; "
                            f"give {takes(kind, allowed)}")
    if several and len({f"{v:g}" for v in values}) < len(values):  # each lr names its run's folder
        raise UserError(f"lr={value} names two runs alike (a run's folder shows its lr to 6 "
                        "digits); give learning rates that differ there")
    return values if several else values[0]


def as_kind(kind, value):
    """value as an option's kind (NumPy's numbers and text as Python's, a path as text), else
    None: a checkpoint reads back plain values only."""
    if kind is bool or isinstance(value, BOOLS):  # True is an int to Python, never a number here
        return bool(value) if kind is bool and isinstance(value, BOOLS) else None
    if kind is str:  # not an empty text; a torch.device by its name (device=torch.device("cpu"))
        text = str(value) if isinstance(value, torch.device) else value
        text = os.fspath(text) if isinstance(text, (str, os.PathLike)) else None
        return (str(text) or None) if isinstance(text, str) else None
    if isinstance(value, NUMBERS[kind]):
        with contextlib.suppress(OverflowError):  # an int too large for a float
            return kind(value)
    return None


def takes(kind, allowed):
    """What an option takes, in words."""
    words = {int: "a whole number", float: "a number", str: "a non-empty text",
             bool: "True or False"}[kind]
    return ("one of " + ", ".join(map(repr, allowed)) if isinstance(allowed, list)
            else f"{words}, {allowed[0]}" if allowed else words)


def refuse_unread(options, given):
    """Refuse options, one of them given now, that the run would silently not read."""
    sources = [key for key in ("data_dir", "dummy", "dataset") if options[key] != DEFAULTS[key]]
    if len(sources) > 1 and given & set(sources):
        raise UserError(f"{sources[0]}= and {sources[1]}= each name the data to train on; give one "
                        "of them")
    if "data_root" in given and sources and sources[0] != "dataset":
        raise UserError(f"data_root= is where the hot-dog set and CIFAR-10 are downloaded, and "
                        f"{sources[0]}= downloads nothing; leave data_root= out")
    data_dir = options["data_dir"]
    if "val_split" in given and (not data_dir or os.path.isdir(data_dir)
                                 and layout(data_dir) == "splits"):
        data = data_dir or ("dummy data" if options["dummy"] else f"the {options['dataset']} set")
        raise UserError(f"val_split= splits a data_dir= of class folders alone, and {data} is not "
                        "one; leave val_split= out")
    if options["init_head_from_imagenet"] and (options["dummy"] or options["dataset"] != "hotdog"):
        data = "dummy data" if options["dummy"] else f"the {options['dataset']} set"
        raise UserError(f"init_head_from_imagenet= starts the class named like hot dog, and {data} "
                        "has none; leave init_head_from_imagenet= out")
    if options["warmup_epochs"] and not options["lr_schedule"] and "warmup_epochs" in given:
        raise UserError("warmup_epochs= warms up a schedule, and lr_schedule= gives none; give "
                        "lr_schedule=cosine too, or leave warmup_epochs= out")
    if options["freeze"] and options["freeze_epochs"] and given & {"freeze", "freeze_epochs"}:
        raise UserError("freeze= trains the output layer alone in every epoch, freeze_epochs= in "
                        "the first N; give one of them")


# The book's numeric arguments, and the run's options whose rules they follow.
BOOK_ARGUMENTS = {"batch_size": "batch_size", "num_epochs": "epochs", "learning_rate": "lr"}


def checked_number(name, value):
    """A number the book's calls take (NumPy's too), by the rule of the run's option."""
    _, kind, rule = OPTIONS[BOOK_ARGUMENTS[name]]
    with contextlib.suppress(OverflowError):  # an int too large for a float
        if isinstance(value, NUMBERS[kind]) and type(value) is not bool and rule[1](kind(value)):
            return kind(value)
    raise UserError(f"{name}={quoted(value)} is not {takes(kind, rule)}; give {takes(kind, rule)}")
