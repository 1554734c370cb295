"""The knobs beyond the book measured on a small real data set: scikit-learn's digits, written as
ImageFolders of upscaled images. A resnet18 pretrained on digits 0 to 4 stands in for ImageNet's,
so that it runs offline; the book's recipe, the cosine schedule and label smoothing then fine-tune
it on a few images of each of digits 5 to 9, with several seeds.

    pip install scikit-learn
    python -m beyond.digits --out runs/digits   # prints the table docs/options.md shows
"""
import argparse
import os
import shlex
import statistics

import numpy as np
import torchvision
from PIL import Image

from beyond import UserError, checkpoints, cli, files, importable, runs

KNOBS = {"the book's recipe": {},
         "--lr-schedule cosine --warmup-epochs 1": dict(lr_schedule="cosine", warmup_epochs=1),
         "--label-smoothing 0.1": dict(label_smoothing=0.1)}


def write_digits(root, classes, train, test=0, seed=0):
    """Digits of classes, 8x8 grey upscaled to 64x64 RGB PNGs: train and test of each as
    root/train/<digit>/ and root/test/<digit>/, or, with no test, train of each as root/<digit>/."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    for digit in classes:
        mine = [i for i in order if digits.target[i] == digit]
        parts = ([("train", mine[:train]), ("test", mine[train:train + test])] if test
                 else [("", mine[:train])])
        for split, part in parts:
            folder = files.writable_folder(os.path.join(root, split, str(digit)))
            for i in part:
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
                image = Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).convert("RGB")
                image.save(os.path.join(folder, f"{i}.png"))
    return root


def pretrained_weights(out, epochs, per_class):
    """A resnet18 trained from scratch on per_class images of each of digits 0 to 4, saved as
    the state dict of torchvision's resnet18 (its 1000-way fc left as it was drawn)."""
    data_dir = write_digits(os.path.join(out, "digits0-4"), range(5), per_class)
    trained = runs.train_runs("scratch", os.path.join(out, "pretrain"), data_dir=data_dir,
                              epochs=epochs, batch_size=32, lr=5e-4, val_split=0.1)
    state = torchvision.models.resnet18().state_dict()
    saved = checkpoints.load_checkpoint(os.path.join(trained.out, "model.pt"))["model"]
    state.update({k: v for k, v in saved.items() if not k.startswith("fc.")})
    path = os.path.join(out, "resnet18-digits0-4.pth")
    files.write_whole(path, files.saved(state))
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/digits", help="a new folder (default: runs/digits)")
    # Each count (per digit, but for the epochs and seeds): its default, its least, and why
    counts = dict(per_class=(20, 1, None), test_per_class=(30, 1, None),
                  pretrain_per_class=(60, 2, "a tenth of each digit, at least one, is held out"),
                  epochs=(5, 2, "one epoch warms up, and one is the cosine's"),
                  pretrain_epochs=(3, 1, None), seeds=(3, 1, None))
    for name, (default, least, _) in counts.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default,
                       help=f"{least} or more (default: {default})")
    args = p.parse_args()
    for name, (_, least, why) in counts.items():
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is below {least}"
                    + (f" ({why})" if why else "") + f"; give {least} or more")
    if os.path.exists(args.out) or not args.out:  # its digits are written afresh: no old ones
        p.error(f"--out '{args.out}' is not a new folder; give the name of one")
    cli.script(p, measure, args, "interrupted; to measure again, give a new --out, or remove "
                                 f"{shlex.quote(args.out)}")


def enough_digits(asked):
    """Refuse, before any training, counts per digit beyond the digits scikit-learn holds."""
    from sklearn.datasets import load_digits
    held = np.bincount(load_digits().target)
    for classes, wanted, flags in asked:
        fewest = min(held[list(classes)])
        if wanted > fewest:
            raise UserError(f"{wanted} images of each of digits {classes[0]} to {classes[-1]} "
                            f"({flags}) are more than scikit-learn holds of the fewest of them, "
                            f"{fewest}; give fewer")


def measure(args):
    """Pretrain the stand-in, then train each knob with each seed; print the table."""
    if not importable("sklearn.datasets"):
        raise UserError("the digits are scikit-learn's, which cannot be imported here; "
                        "pip install scikit-learn")
    enough_digits([(range(5), args.pretrain_per_class, "--pretrain-per-class"),
                   (range(5, 10), args.per_class + args.test_per_class,
                    "--per-class and --test-per-class")])
    weights = pretrained_weights(args.out, args.pretrain_epochs, args.pretrain_per_class)
    data_dir = write_digits(os.path.join(args.out, "digits5-9"), range(5, 10), args.per_class,
                            args.test_per_class)
    table = {}
    for name, knob in KNOBS.items():
        for seed in range(args.seeds):
            out = os.path.join(args.out, f"{'-'.join(map(str, knob.values())) or 'book'}-{seed}")
            trained = runs.train_runs("pretrained", out, data_dir=data_dir, weights=weights,
                                      epochs=args.epochs, batch_size=32, seed=seed, **knob)
            table.setdefault(name, []).append(trained.results[0]["history"][-1]["test_acc"])
    print(f"\n{'':42} test acc: mean  spread (min to max) over {args.seeds} seeds")
    for name, accs in table.items():
        print(f"{name:42} {statistics.mean(accs):.3f}  {min(accs):.3f} to {max(accs):.3f}")


if __name__ == "__main__":
    main()
