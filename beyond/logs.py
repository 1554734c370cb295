"""A run's curves where people look at them: metrics.csv, one row per epoch (as timm's
summary.csv), and TensorBoard's event files, written by process 0 into the run's folder."""
import csv
import glob
import io
import os

from beyond.files import remove, write_whole


def write_csv(folder, history):
    """metrics.csv: every epoch of the history once, the same figures as metrics.json's, written
    whole from the history, so a continued run adds its epochs and repeats none."""
    columns = list(dict.fromkeys(key for m in history for key in m))  # older epochs have no lr
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_whole(os.path.join(folder, "metrics.csv"), table.getvalue().encode())


SCALARS = ("loss", "train_acc", "test_acc", "lr", "examples_per_sec")
EVENTS, SUFFIX = "events.out.tfevents.*", ".finetune"  # this program's: no other's are removed


def tensorboard(folder, options, history):
    """A SummaryWriter into the run's folder, holding the run's options as hyperparameters and the
    epochs of history so far: written anew at each start, as metrics.csv is after each epoch."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    before = event_files(folder)
    writer = SummaryWriter(folder, filename_suffix=SUFFIX)
    plain = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in options.items()}
    for summary in hparams(plain, {"test_acc": 0.0}):
        writer.file_writer.add_summary(summary)
    for metrics in history:
        add_epoch(writer, metrics)
    for path in before:  # the run's earlier files, once this one holds what they should hold
        remove(path)
    return writer


def event_files(folder):
    """This program's event files in folder."""
    return [path for path in glob.glob(os.path.join(glob.escape(folder), EVENTS + SUFFIX))
            if os.path.isfile(path)]


def add_epoch(writer, metrics):
    """The epoch's figures as scalars at its number."""
    for key in SCALARS:
        if key in metrics:
            writer.add_scalar(key, metrics[key], metrics["epoch"])
    writer.flush()
