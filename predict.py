"""Prediction: a trained model.pt classifies image files and folders of them, in batches, through
the test augmentations its run used.

    import predict
    for p in predict.predict("runs/pretrained/model.pt", ["photos/"]):
        print(p.path, p.label, p.probability)
"""
import csv
import io
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch

import data
import models
import runs
import train
from images import image_paths, load_rgb
from utils import UserError, writable_folder, write_whole


@dataclass
class Prediction:
    """One image's prediction: the most likely class, its probability, and every class's."""
    path: str
    label: str
    probability: float
    probabilities: dict  # class name: probability


def predict(model, images, *, out=None, batch_size=128, workers=None, device=None, precision="amp", arch=None):
    """Classify images (a path or a list of paths: files, and folders searched for them) with
    model, a model.pt written by training (or its run's folder), on one device. Returns one
    Prediction per image that could be read, in the order given; each one that could not is named
    on stderr. With out, a folder: predictions.csv there too. arch, where given, must be the model's."""
    items = [images] if isinstance(images, (str, os.PathLike)) else images  # one file or folder
    items = list(items) if isinstance(items, Iterable) else [items]  # a generator read once
    if not all(isinstance(item, (str, os.PathLike)) for item in items):  # None, or a PIL image
        raise UserError(f"images={images!r:.80} is not a path or a list of paths; give image files or folders "
                        "of them (an image in memory: save it to a file first)")
    runs.checked("batch_size", batch_size)
    runs.checked("workers", workers)
    path = models.checkpoint_in(model)
    ckpt = models.load_checkpoint(path)
    models.same_arch(arch, ckpt, path)
    paths = image_paths(items)
    if not paths:
        raise UserError(f"found no images in {' '.join(map(str, items)) or 'an empty list'}; "
                        "give image files or folders of them")
    csv_path = out and os.path.join(writable_folder(out), "predictions.csv")  # tried before the work
    settings, classes = ckpt["transform"], ckpt["classes"]
    augs = data.make_test_augs(settings["resize"], settings["crop"], settings.get("interpolation", "bilinear"))
    loader = torch.utils.data.DataLoader(ImageFiles(paths, augs, settings["crop"]), batch_size,
                                         num_workers=data.default_workers(workers))
    runtime = train.make_runtime(train.try_device(device), precision)
    probs, index = train.evaluate(runtime.place(models.saved_net(ckpt)), loader, runtime)  # index for the label
    predictions = [Prediction(paths[i], classes[p.argmax()], p.max().item(), dict(zip(classes, p.tolist())))
                   for i, p in zip(index.tolist(), probs) if i >= 0]
    if csv_path:
        write_csv(predictions, classes, csv_path)
    return predictions


class ImageFiles(torch.utils.data.Dataset):
    """Images to predict, each with its index; one that cannot be read is named on stderr and
    comes as a blank image with index -1, so the others are still predicted."""

    def __init__(self, paths, augs, crop):
        self.paths, self.augs, self.crop = paths, augs, crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.augs(load_rgb(self.paths[i])), i
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return torch.zeros(3, self.crop, self.crop, dtype=torch.uint8), -1


def write_csv(predictions, classes, path):
    """predictions.csv: a row per image, its path, class and probability, then every class's."""
    table = io.StringIO()
    csv.writer(table).writerows([["path", "class", "probability", *classes]]
                                + [[p.path, p.label, f"{p.probability:.4f}", *(f"{q:.4f}" for q in p.probabilities.values())]
                                   for p in predictions])
    write_whole(path, table.getvalue().encode())
    return path
