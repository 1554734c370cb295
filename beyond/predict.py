"""Prediction: a trained net classifies image files through its run's test augmentations, or
becomes one file that classifies images without this project (export).

    for p in beyond.predict.predict("runs/pretrained", ["photos/"]):  # the epoch its best.pt keeps
        print(p.path, p.label, p.probability)
    beyond.predict.export("runs/pretrained")  # runs/pretrained/best.pt2, for torch.export.load
"""
import csv
import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim
from torchvision.transforms import v2

import data
import train
from beyond import UserError, checkpoints, devices, loaders, quoted, shown
from beyond.figures import predicted
from beyond.files import first_line, writable_file, writable_folder, write_whole
from beyond.options import checked
from beyond.photos import image_paths, load_rgb


@dataclass
class Prediction:
    """One image's prediction: the most likely class, its probability, and every class's."""
    path: str
    label: str
    probability: float
    probabilities: dict  # class name: probability


def predict(model, images, *, out=None, batch_size=128, workers=None, device=None,
            precision="amp", arch=None):
    """Classify images (paths of files or folders) with model (a run's folder, best.pt or model.pt):
    a Prediction per image read, in order; the others named on stderr; predictions.csv in out."""
    items = [images] if isinstance(images, (str, os.PathLike)) else images  # one file or folder
    items = list(items) if isinstance(items, Iterable) else [items]  # a generator read once
    if not all(isinstance(item, (str, os.PathLike)) and os.fspath(item) for item in items):
        raise UserError(f"images={quoted(images)} is not a path or a list of paths; give image "
                        "files or folders of them (an image in memory: save it to a file first)")
    batch_size = checked("batch_size", batch_size)
    workers = checked("workers", workers)
    out = checked("out", out)
    path = checkpoints.kept_in(model)
    ckpt = checkpoints.load_checkpoint(path)
    checkpoints.same_arch(arch, ckpt)
    paths = image_paths(items)
    if not paths:
        raise UserError(f"found no images in {' '.join(map(str, items)) or 'an empty list'}; "
                        "give image files or folders of them")
    csv_path = out and writable_file(os.path.join(out, "predictions.csv"))  # tried first
    settings, classes = ckpt["transform"], ckpt["classes"]
    interpolation = settings.get("interpolation", "bilinear")
    augs = data.make_test_augs(settings["resize"], settings["crop"], interpolation)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, augs, settings["crop"]), batch_size,
                                         num_workers=loaders.default_workers(workers),
                                         generator=torch.Generator())  # not the caller's numbers
    runtime = devices.make_runtime(devices.try_device(device), precision)
    net = runtime.place(checkpoints.saved_net(ckpt))
    probs, index = train.evaluate(net, loader, runtime)  # index for the label
    preds, read = predicted(probs), index >= 0  # a net's NaN outputs predict nothing: -1
    kept = read & (preds >= 0)
    fp32 = "" if runtime.dtype is None else (f", or its {runtime.dtype} arithmetic overflowed: try "
                                             "the precision fp32")
    if read.any() and not kept.any():
        raise UserError(f"{path} gives outputs that are not numbers (NaN) for every image: its "
                        f"training diverged, and should be trained again with a lower lr{fp32}")
    for i in index[read & ~kept].tolist():  # named, as an image that cannot be read is
        print(f"error: {shown(paths[i])}: the net's outputs are not numbers (NaN){fp32}",
              file=sys.stderr)
    predictions = [Prediction(paths[i], classes[c], p.max().item(), dict(zip(classes, p.tolist())))
                   for i, c, p in zip(index[kept].tolist(), preds[kept].tolist(), probs[kept])]
    if csv_path and predictions:  # none predicted: an earlier predictions.csv stays
        write_csv(predictions, classes, csv_path)
    return predictions


class ImageFiles(torch.utils.data.Dataset):
    """Images to predict, each with its index; one that cannot be read: named, blank, index -1."""

    def __init__(self, paths, augs, crop):
        self.paths, self.augs, self.crop = paths, augs, crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.augs(load_rgb(self.paths[i])), i
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)  # shown on one line
            return torch.zeros(3, self.crop, self.crop, dtype=torch.uint8), -1


def write_csv(predictions, classes, path):
    """predictions.csv: a row per image, its path, class and probability, then every class's, in
    a column named after it ("probability of NAME" where that name is a column's already)."""
    table = io.StringIO()
    rows = [[p.path, p.label, *(f"{q:.4f}" for q in [p.probability, *p.probabilities.values()])]
            for p in predictions]
    header = ["path", "class", "probability"]
    for name in classes:
        while name in header:  # each column's name once, for csv.DictReader
            name = f"probability of {name}"
        header.append(name)
    csv.writer(table).writerows([header] + rows)
    write_whole(path, table.getvalue().encode(errors="surrogateescape"))  # not UTF-8: as on disk


def export(model, out=None, *, format="pt2"):
    """model (as predict takes it) as one file, Pixels, that classifies images without this project:
    format "pt2" (for torch.export.load) or "onnx", to out (default: beside it); returns out."""
    if format not in ("pt2", "onnx"):
        raise UserError(f"format={format} is not one this program exports; give format=pt2 or "
                        "format=onnx")
    other = "onnx" if format == "pt2" else "pt2"  # what out's name may ask for; the fix below
    out = checked("out", out)
    if out and not out.endswith("." + format):  # never over a checkpoint or a run's other files
        fix = (f"format={other} to export {other}" if out.endswith("." + other)
               else f"out= a name that ends in .{format}")
        raise UserError(f"out={out} is not a .{format} file; give {fix}")
    path = checkpoints.kept_in(model)
    ckpt = checkpoints.load_checkpoint(path)
    out = out or os.path.splitext(path)[0] + "." + format
    if os.path.realpath(out) == os.path.realpath(path):  # a checkpoint named .pt2 or .onnx
        raise UserError(f"{out} is the checkpoint exported, which the export would write over; "
                        "give out= another name")
    if os.path.isdir(out):  # found before the work, not by the last write
        raise UserError(f"out={out} is a folder; give out= the name of a file")
    writable_folder(os.path.dirname(out) or ".")  # tried before the work
    net = Pixels(checkpoints.saved_net(ckpt), ckpt["transform"]).eval()
    about = {"classes": json.dumps(ckpt["classes"]), "input": net.input(len(ckpt["classes"]))}
    images = torch.zeros(2, 3, 300, 400, dtype=torch.uint8)
    with torch.no_grad():  # as --predict refuses such a net
        if not net(images).isfinite().all():
            raise UserError(f"{path} gives outputs that are not numbers (NaN): its training "
                            "diverged, and should be trained again with a lower lr")
    dims = ({0: Dim("batch"), 2: Dim("height"), 3: Dim("width")},)
    file = io.BytesIO()
    try:
        if format == "pt2":
            exported = torch.export.export(net, (images,), dynamic_shapes=dims)
            torch.export.save(exported, file, extra_files=about)
        else:
            import onnx
            proto = torch.onnx.export(net, (images,), dynamo=True, dynamic_shapes=dims,
                                      input_names=["images"], output_names=["probabilities"],
                                      verbose=False).model_proto
            onnx.helper.set_model_props(proto, about)
            file.write(proto.SerializeToString())
    except Exception as e:  # onnx missing, or an operation the exporter cannot capture
        if format == "onnx" and isinstance(e, ImportError):
            raise UserError(f"format=onnx needs the packages onnx and onnxscript ({e}); "
                            "pip install onnx onnxscript") from None
        raise UserError(f"a {ckpt.get('arch') or 'resnet18'} cannot be captured as {format} "
                        f"({first_line(e)}); give format={other}, or classify with "
                        "beyond.predict.predict") from None
    write_whole(out, file.getvalue())
    return out


class Pixels(nn.Module):
    """A saved net from uint8 RGB pixels (batch, 3, height, width) to probabilities: the run's test
    augmentations (data.make_test_augs), data.normalize_batch, the net, and softmax."""

    def __init__(self, net, settings):
        super().__init__()
        self.net, self.resize, self.crop = net, settings["resize"], settings["crop"]
        self.interpolation = settings.get("interpolation", "bilinear")
        self.register_buffer("mean", torch.tensor(data.MEAN).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(data.STD).view(-1, 1, 1))

    def forward(self, images):
        images = images.to(torch.uint8)  # a no-op export keeps as a check: other types refused
        X = nn.functional.interpolate(images, [self.resize] * 2, mode=self.interpolation,
                                      antialias=True)  # torchvision's has a branch export can't see
        X = data.normalize_batch(v2.functional.center_crop(X, self.crop), (self.mean, self.std))
        return torch.softmax(self.net(X), 1)

    def input(self, num_classes):
        return ("images: uint8 RGB pixels as decoded, shape (batch, 3, height, width), any batch, "
                f"height and width; resized to {self.resize}x{self.resize} ({self.interpolation}, "
                f"antialiased), centre-cropped to {self.crop}x{self.crop}, scaled to [0, 1], "
                "normalised with ImageNet's mean and std. Output: probabilities, shape "
                f"(batch, {num_classes}), in the order of classes")
