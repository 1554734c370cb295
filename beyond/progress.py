"""What training shows: a line per epoch, the book's closing summary, and a live progress line."""
import sys
import time

from beyond import pictures
from beyond.processes import rank, say, world_size


def show_epoch(history, animator, lr=False):
    """The epoch's line, and the curves redrawn (the book's Animator)."""
    m = history[-1]
    note = f" (start-up: first batch after {m['first_batch_sec']:.1f} s)" if m["epoch"] == 1 else ""
    say(f"  epoch {m['epoch']}: loss {m['loss']:.3f}, train acc {m['train_acc']:.3f}, "
        f"test acc {m['test_acc']:.3f}, {m['examples_per_sec']:.1f} examples/sec"
        + (f", lr {m['lr']:.3g}" if lr else "") + note)
    animator(history)


def show_summary(history, runtime):
    """The book's two closing lines."""
    m = history[-1]
    say(f"loss {m['loss']:.3f}, train acc {m['train_acc']:.3f}, test acc {m['test_acc']:.3f}")
    say(f"{mean_speed(history):.1f} examples/sec on {runtime}")


def mean_speed(history):
    """The book's examples/sec: every epoch's examples over their seconds together."""
    return (sum(m["examples"] for m in history)
            / sum(m["examples"] / m["examples_per_sec"] for m in history))


class Progress:
    """A loader's batches, with a progress line redrawn every half second (the book's
    num_batches // 5 is zero for small data); metric: loss sum, right, seen so far."""

    def __init__(self, loader, metric):
        self.loader, self.metric, self.first_batch_sec = loader, metric, 0.0
        self.show = live_text() if rank() == 0 and hasattr(loader, "__len__") else None

    def __iter__(self):
        start = shown = time.perf_counter()
        for i, batch in enumerate(self.loader):
            if i == 0:
                self.first_batch_sec = time.perf_counter() - start
            yield batch
            if self.show and (time.perf_counter() - shown > 0.5 or i + 1 == len(self.loader)):
                shown, (loss_sum, _, n) = time.perf_counter(), self.metric.tolist()
                self.show(f"  batch {i + 1}/{len(self.loader)}  loss {loss_sum / n:.3f}  "
                          f"{n * world_size() / (shown - start):.1f} examples/sec")
        if self.show:
            self.show("")


def live_text():
    """show(text), redrawing one line on a terminal or in a notebook; None in a log file."""
    if notebook := pictures.notebook():
        handle = notebook.display(notebook.Pretty(""), display_id=True)

        def show(text):
            if text:  # "" would clear the line: a notebook keeps each epoch's last one
                handle.update(notebook.Pretty(text))
        return show
    if sys.stderr.isatty():
        return lambda text: print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
    return None
