"""The decoded cache: a data set's images decoded once into memory, augmented afresh per item."""
import itertools
import math
import os
import sys

import torch
from torchvision.transforms import v2

from beyond import UserError
from beyond.photos import each_read, every_class_read, load_rgb, test_set_whole
from beyond.processes import local_processes, say


class DecodedImages(torch.utils.data.Dataset):
    """An ImageFolder decoded once into one uint8 buffer, so worker processes share it cheaply."""

    def __init__(self, folder, workers=1):
        for name in ("classes", "targets", "transform", "samples", "root", "where", "held_out"):
            setattr(self, name, getattr(folder, name))
        self.shapes = [(3, height, width) for width, height in folder.sizes]
        self.starts = [0, *itertools.accumulate(3 * w * h for w, h in folder.sizes)]
        self.pixels = torch.empty(self.starts.pop(), dtype=torch.uint8)
        kept = each_read(self.decode, range(len(self)), workers)
        items = (self.samples, self.targets, self.shapes, self.starts)
        self.samples, self.targets, self.shapes, self.starts = ([x[i] for i in kept] for x in items)
        every_class_read(self)

    def decode(self, i):
        """Decode image i into its place; returns the error where it cannot be read."""
        try:
            pixels = v2.functional.pil_to_tensor(load_rgb(self.samples[i][0]))
        except UserError as e:
            return str(e)
        self.shapes[i] = tuple(pixels.shape)  # turned upright: the same pixels, perhaps (3, w, h)
        self.image(i).copy_(pixels)

    def image(self, i):
        return self.pixels.narrow(0, self.starts[i], math.prod(self.shapes[i])).view(self.shapes[i])

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        return self.transform(self.image(i)), self.targets[i]


def available_memory():
    """Linux's MemAvailable in bytes, else half of all memory."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(row.split()[1]) * 1024 for row in f if row.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def decoded(folders, cache_budget=None, workers=1):
    """The folders as DecodedImages if they fit in cache_budget bytes (0: never), else as is."""
    if cache_budget == 0:
        return uncached(folders, workers)
    # each process on this machine holds its own copy
    needed = sum(3 * width * height for folder in folders for width, height in folder.sizes)
    budget = cache_budget or available_memory() // (2 * local_processes())
    if needed > budget:
        say(f"note: decoding images every epoch: decoded they would take {needed / 2**30:.3g} GB, "
            f"more than the cache's {budget / 2**30:.3g} GB (cache_budget; --cache-gb)",
            file=sys.stderr)
        return uncached(folders, workers)
    return [DecodedImages(folder, workers) for folder in folders]


def uncached(folders, workers=1):
    """The folders, read from disk every epoch; the sets tested on (all but the first) read whole
    once first (photos.test_set_whole)."""
    return [folders[0], *(test_set_whole(folder, workers) for folder in folders[1:])]
