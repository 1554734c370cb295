"""Pictures of a run: training curves, the test images the net gets wrong, and the data as the
net sees it. matplotlib is optional: without it each picture is skipped with a one-line note."""
import os

import torch


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("note: pictures skipped; `pip install matplotlib` to get them")
        return None


def as_picture(img):
    """A uint8 CHW tensor (or a PIL image) as something imshow shows."""
    return img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else img


def save(fig, plt, path):
    fig.savefig(path + ".part.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(path + ".part.png", path)
    return path


def curves(histories, path):
    """Train loss, train acc and test acc per epoch, one panel per run (the book's figure)."""
    plt = pyplot()
    if not plt:
        return None
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.5), squeeze=False, sharey=True)
    for ax, (name, history) in zip(axes[0], histories.items()):
        epochs = [m["epoch"] for m in history]
        for key, style in (("loss", "-"), ("train_acc", "--"), ("test_acc", "-.")):
            ax.plot(epochs, [m[key] for m in history], style, marker="o", label=key.replace("_", " "))
        ax.set(title=name, xlabel="epoch", xlim=(0.5, max(epochs) + 0.5))
        ax.grid(True)
        ax.legend()
    return save(fig, plt, path)


def grid(rows, captions, path, scale=1.6):
    plt = pyplot()
    if not plt or not rows[0]:
        return None
    fig, axes = plt.subplots(len(rows), len(rows[0]), squeeze=False,
                             figsize=(scale * len(rows[0]), scale * 1.2 * len(rows)))
    for ax_row, images, texts in zip(axes, rows, captions):
        for ax, img, text in zip(ax_row, images, texts):
            ax.imshow(as_picture(img))
            ax.set_title(text, fontsize=7)
            ax.axis("off")
    return save(fig, plt, path)


def mistakes(images, captions, path):
    """Up to 16 misclassified test images, captioned with the true and predicted class."""
    if not images:
        return None
    rows = [images[i:i + 8] for i in range(0, len(images), 8)]
    return grid(rows, [captions[i:i + 8] for i in range(0, len(images), 8)], path, scale=2)


def samples(images, augmented, path):
    """The book's first figure (two rows of 8, as loaded) and the same images after train_augs."""
    rows = [images[:8], images[8:], augmented[:8], augmented[8:]]
    captions = [["as loaded"] * 8] * 2 + [["train_augs"] * 8] * 2
    return grid(rows, captions, path)
