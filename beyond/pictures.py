"""Pictures: the book's show_images, training curves and the test images a net gets wrong.
matplotlib is optional, used through its object API, never pyplot: the caller's backend stays."""
import io
import sys

import torch

from beyond.files import remove, write_whole


def figure(**kwargs):
    """A new matplotlib Figure, or None where matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("note: pictures skipped; `pip install matplotlib` to get them")
        return None
    return Figure(**kwargs)


def notebook():
    """IPython.display where this runs in a Jupyter kernel, else None."""
    ipython = sys.modules.get("IPython")  # every kernel has imported it; we never import it first
    shell = ipython and ipython.get_ipython()
    if not hasattr(shell, "kernel"):  # None, with no IPython, has no kernel either
        return None
    import IPython.display
    return IPython.display


def png(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def finish(fig, path=None):
    """Save the figure to path and show it in a notebook; returns path."""
    image = png(fig)
    if path:
        write_whole(path, image)
    if display := notebook():
        display.display(display.Image(image))
    return path


def as_picture(img):
    """An image as imshow takes it: a PIL image, or a tensor with channels first, last or none."""
    if not isinstance(img, torch.Tensor):
        return img
    img = img.detach().cpu()
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.permute(1, 2, 0)
    return img.squeeze(-1).numpy() if img.ndim == 3 and img.shape[-1] == 1 else img.numpy()


def show_images(imgs, num_rows, num_cols, titles=None, scale=1.5, path=None):
    """The book's d2l.show_images (§4.2): images in a grid, row by row; a None leaves a gap."""
    fig = figure(figsize=(num_cols * scale, num_rows * scale * (1.2 if titles else 1)))
    if fig is None:
        return None
    axes = fig.subplots(num_rows, num_cols, squeeze=False).flatten()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < len(imgs) and imgs[i] is not None:
            ax.imshow(as_picture(imgs[i]))
            ax.set_title(titles[i] if titles and i < len(titles) else "", fontsize=7)
    return finish(fig, path)


def draw_curves(fig, histories):
    """Train loss, train acc and test acc per epoch, one panel per run (the book's figure)."""
    axes = fig.subplots(1, len(histories), squeeze=False, sharey=True)
    for ax, (name, history) in zip(axes[0], histories.items()):
        epochs = [m["epoch"] for m in history]
        for key, style in (("loss", "o-"), ("train_acc", "o--"), ("test_acc", "o-.")):
            ax.plot(epochs, [m[key] for m in history], style, label=key.replace("_", " "))
        ax.set(title=name, xlabel="epoch", xlim=(0.5, max(epochs) + 0.5))
        ax.grid(True)
        ax.legend()
    return fig


def curves(histories, path=None):
    fig = figure(figsize=(4.5 * len(histories), 3.5))
    return fig and finish(draw_curves(fig, histories), path)


def animator():
    """The book's Animator: redraws a history's curves in place, in a notebook only."""
    display = notebook()
    if not display or not figure():
        return lambda history: None
    handle = display.display(display.Pretty(""), display_id=True)
    return lambda history: handle.update(
        display.Image(png(draw_curves(figure(figsize=(4.5, 3.5)), {"": history}))))


def grid(rows, captions, path, scale=1.6):
    width = max(map(len, rows))
    padded = [row[i] if i < len(row) else None for row in rows for i in range(width)]
    texts = [row[i] if i < len(row) else "" for row in captions for i in range(width)]
    return show_images(padded, len(rows), width, texts, scale, path)


def mistakes(test_set, probs, preds, labels, classes, path):
    """Up to 16 test images the net gets wrong (preds: -1 for none), captioned with both classes."""
    wrong = (preds != labels).nonzero().flatten()[:16].tolist()
    if not wrong:
        remove(path)
        return None
    pictures = [test_set[i][0] for i in wrong]
    captions = [f"true {classes[labels[i]]}\n" + (f"pred {classes[preds[i]]} {probs[i].max():.2f}"
                if preds[i] >= 0 else "pred nothing (NaN)") for i in wrong]
    return grid([pictures[i:i + 8] for i in range(0, len(wrong), 8)],
                [captions[i:i + 8] for i in range(0, len(wrong), 8)], path, scale=2)
