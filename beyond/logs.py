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
EVENTS = "events.out.tfevents.*"  # the names SummaryWriter gives its files


def tensorboard(folder, options, done):
    """A SummaryWriter into the run's folder. A fresh run replaces the events of one stopped before
    its first saved epoch and records its options as hyperparameters; a continued one (done: its
    epochs so far) drops any step after them that a stopped run wrote."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    if done:
        return SummaryWriter(folder, purge_step=done + 1)
    for name in glob.glob(os.path.join(glob.escape(folder), EVENTS)):  # as metrics.csv, anew
        remove(name)
    writer = SummaryWriter(folder)
    plain = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in options.items()}
    for summary in hparams(plain, {"test_acc": 0.0}):
        writer.file_writer.add_summary(summary)
    return writer


def add_epoch(writer, metrics):
    """The epoch's figures as scalars at its number."""
    for key in SCALARS:
        if key in metrics:
            writer.add_scalar(key, metrics[key], metrics["epoch"])
    writer.flush()
