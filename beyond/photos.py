"""Photos as devices write them, read as upright 8-bit RGB, and found in folders people fill."""
import contextlib
import functools
import itertools
import os
import re
import sys
import threading
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

from beyond import UserError, shown
from beyond.files import inside
from beyond.processes import say

# torchvision's image types, and what phones and the web also give (HEIC needs pillow-heif).
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".jfif", ".jpe", ".gif", ".avif", ".heic", ".heif")

# PIL's bomb limit, 89 megapixels, is below phones' 108; set at import, every loader worker has it
Image.MAX_IMAGE_PIXELS = 200 * 10**6


@contextlib.contextmanager
def megapixels_limit(megapixels):
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(megapixels * 10**6)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


# Warnings filters are process-wide: two threads in catch_warnings could leave one's filter set.
SIZE_CHECK = threading.Lock()


def load_rgb(path):
    """Any image as upright 8-bit RGB: EXIF turns, 16-bit, float and CMYK pixels, GIFs."""
    return read_image(path, upright_rgb)


def upright_rgb(img):
    """An opened photo as --predict reads it: upright, in 8-bit RGB."""
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit grey (I;16, I) and float (F)
        img = Image.fromarray(eight_bits(np.asarray(img)))
    return img.convert("RGB")


def eight_bits(pixels):
    """Pixels scaled to 0-255 from 65535, or for floats from 1 or 255 where none passes it; a
    float's NaN or infinity is black, so that it sets no scale."""
    pixels, full = np.nan_to_num(pixels, nan=0, posinf=0, neginf=0), 65535
    if pixels.dtype.kind == "f" and pixels.max() <= 255:
        full = 1 if pixels.max() <= 1 else 255
    return np.clip(pixels * (255 / full) + 0.5, 0, 255).astype(np.uint8)


def image_size(path):
    return read_image(path, lambda img: img.size)


def read_image(path, read):
    """read(the opened image), naming the file where it is damaged, not an image, or too large."""
    heif_plugin()
    try:
        # PIL checks the size as it opens, with a warning; the pixels are read after the lock
        with SIZE_CHECK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            return read(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {path} ({too_large(e)}); raise the limit to read it: "
                        "--max-megapixels N (in Python, runs' max_megapixels option, or around "
                        "any call: with beyond.photos.megapixels_limit(N))") from None
    except (FileNotFoundError, NotADirectoryError):  # a.png/: a folder, were it there
        raise UserError(f"{path} does not exist; check the path") from None
    except (OSError, ValueError) as e:  # PIL raises ValueError for some damaged files too
        fix = ("install the HEIC plugin: pip install pillow-heif"
               if path.lower().endswith((".heic", ".heif")) else "delete or replace that file")
        raise UserError(f"cannot read image {path} ({getattr(e, 'strerror', None) or e}); "
                        f"{fix}") from None


def too_large(error):
    """PIL's size error as the image's megapixels against the limit set (PIL's names twice it)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    if not found:
        return str(error)
    limit = Image.MAX_IMAGE_PIXELS / 10**6
    return f"{int(found[1]) / 10**6:g} megapixels, more than the limit of {limit:g}"


@functools.cache
def heif_plugin():
    """Let PIL read HEIC photos (iPhones'), where pillow-heif is installed."""
    with contextlib.suppress(ImportError):
        from pillow_heif import register_heif_opener
        register_heif_opener()


SYSTEM_NAMES = ("__MACOSX", "Thumbs.db", "desktop.ini",  # macOS's zip files, Windows
                "@eaDir", "#recycle", "#snapshot", "@Recycle", "@Recently-Snapshot")  # NAS boxes'


def ignored(name):
    """Never a class or an image: hidden names (.DS_Store, ._x.jpg) and SYSTEM_NAMES."""
    return name.startswith(".") or name in SYSTEM_NAMES


def nfc(name):
    """A name in Unicode's composed form (NFC): a Mac writes accents apart (NFD)."""
    return unicodedata.normalize("NFC", name)


def image_files(folder):
    """The image files under folder, sorted, each once, links followed (no folder twice: loops)."""
    found, seen = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            folders[:] = []
            continue
        seen.add(os.path.realpath(root))
        folders[:] = [name for name in folders if not ignored(name)]
        images = [n for n in names if not ignored(n) and n.lower().endswith(IMAGE_EXTENSIONS)]
        found += sorted(p for p in (os.path.join(root, n) for n in images) if not special(p))
    return sorted(once(found))


def special(path):
    """Whether path is a pipe, a socket or a device (opening a pipe could wait for ever)."""
    return not os.path.isfile(path) and os.path.exists(path)  # one call for a file


def once(paths):
    """paths, each file once however many links lead to it, by its most direct path (the first of
    those)."""
    kept = {}
    for path in paths:
        real = os.path.realpath(path)
        if real not in kept or directness(path, real) > directness(kept[real], real):
            kept[real] = path
    return list(kept.values())


def directness(path, real):
    """2: no link on the way to the file (its own name); 1: the file is not itself a link; 0."""
    return 2 if os.path.abspath(path) == real else int(not os.path.islink(path))


def split_classes(split, data_dir):
    """ImageFolder.find_classes: each class's first folder by NFC name, each folder's index."""
    entries = [e for e in os.scandir(split) if not ignored(e.name)]
    # os.path's isdir and isfile: False for a link that loops, where DirEntry's raise
    folders = sorted((e.name for e in entries if os.path.isdir(e)), key=lambda n: (nfc(n), n))
    classes = list(dict.fromkeys(map(nfc, folders)))
    loose = [e.name for e in entries
             if os.path.isfile(e) and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if odd := [name for name in folders if shown(name) != name]:  # names are printed and drawn
        raise UserError(f"the class folder {os.path.join(split, odd[0])} has a name that "
                        "is not UTF-8 text, or holds a control character (a newline, a tab); "
                        "rename it")
    if loose or len(classes) < 2:
        found = f"images ({loose[0]}, ...) but " if loose else ""
        raise UserError(f"{split} holds {found}{len(classes)} class folder(s) {classes}; the "
                        f"layout is {os.path.basename(split)}/<class>/<image>, with two classes or "
                        "more")
    reals = [os.path.realpath(os.path.join(split, name)) for name in folders]
    for name, real in zip(folders, reals):
        folder = os.path.join(split, name)
        in_place = os.path.join(os.path.realpath(data_dir), os.path.relpath(folder, data_dir))
        if real != in_place and (inside(real, data_dir) or reals.count(real) > 1):
            raise UserError(f"{folder} is a link to {real}, another class's folder or one inside "
                            f"the data folder; put the images of class {name} in a folder of its "
                            "own, or remove the link")
    firsts = [next(f for f in folders if nfc(f) == c) for c in classes]
    return firsts, {f: classes.index(nfc(f)) for f in folders}


def readable(samples):
    """The samples whose image headers can be read, and their sizes."""
    kept, sizes, failed = [], [], []
    for path, target in samples:
        try:
            sizes.append(image_size(path))
            kept.append((path, target))
        except UserError as e:
            failed.append(str(e))
    left_out(failed, len(samples))
    return kept, sizes


def left_out(failed, of):
    """One note for the files that cannot be read (failed: their errors); an error if none can."""
    if failed:
        if len(failed) == of:
            raise UserError(f"none of the {of} images can be read; the first: {failed[0]}")
        say(f"note: left out {len(failed)} file(s) that cannot be read as images; the first: "
            f"{failed[0]}", file=sys.stderr)


def every_class_read(folder):
    """Refuse a set with a class that has no image left: no net learns a class it never sees."""
    if not (empty := [name for i, name in enumerate(folder.classes) if i not in folder.targets]):
        return
    path = os.path.join(folder.root, empty[0])
    if getattr(folder, "held_out", None):  # a split's test set, drawn from headers that read
        raise UserError(f"{path}: the images held out of it for testing cannot be read (noted "
                        "above); replace them with whole copies (a new run may instead delete "
                        "them, and hold out others)")
    first = next(iter(image_files(path)), None)
    if why := first and unreadable(first):  # with its fix: for HEIC, the plugin to install
        raise UserError(f"{path} holds no image that can be read; the first: {why}")
    raise UserError(f"{path} holds no image that can be read; put readable images in every class "
                    "folder, or remove it")


def each_read(read, items, workers=1):
    """read(item) for each item, in threads (PIL decodes without the GIL); read returns the error
    where it cannot, which left_out notes. The indices of the items read."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = list(pool.map(read, items))
    left_out([error for error in errors if error], len(errors))
    return [i for i, error in enumerate(errors) if not error]


def test_set_whole(folder, workers=1):
    """A set tested on, without the images that cannot be decoded now: in training another image
    of its class stands in for one (ImageFolder), which in a test would count that one twice; one
    that cannot be read later stops the run."""
    folder.keep(each_read(unreadable, [path for path, _ in folder.samples], workers))
    folder.stand_in = False
    every_class_read(folder)
    return folder


def unreadable(path):
    """The error that reading the image at path raises, else None."""
    try:
        load_rgb(path)
    except UserError as e:
        return str(e)
    return None


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder for folders as devices write them; `sizes`: (width, height)s."""

    def __init__(self, split, transform=None, data_dir=None):
        self.data_dir = data_dir or split  # a folder of class folders alone is its own data folder
        super().__init__(split, transform, loader=load_rgb)
        self.samples, self.sizes = readable(self.samples)
        self.keep(range(len(self.samples)))
        self.where = f"in {os.path.basename(os.path.normpath(split))}/"  # the run's header says so
        self.held_out = None  # where split_by_class made it: the held-out paths
        self.stand_in = True  # False: a set tested on, where no image may stand in for another
        every_class_read(self)

    def keep(self, indices):
        self.samples = self.imgs = [self.samples[i] for i in indices]
        self.sizes = [self.sizes[i] for i in indices]
        self.targets = [target for _, target in self.samples]
        # shared, so that the loader's worker processes name an unreadable image once
        self.unread = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __getitem__(self, i):
        """The image and its class; for one that cannot be read now, the next of its class (where
        stand_in)."""
        target = self.targets[i]
        for j in itertools.chain(range(i, len(self)), range(i)):
            if self.targets[j] != target or self.unread[j]:
                continue
            try:
                return super().__getitem__(j)
            except UserError as e:
                if not self.stand_in:  # counted twice, the other would change the test's figures
                    raise UserError(f"{self.samples[j][0]}, an image the run tests on, cannot be "
                                    "read now; put it back as it was, then continue the run") from e
                if not self.unread[j]:  # another worker may have met it meanwhile
                    self.unread[j] = True
                    say(f"note: left out {self.samples[j][0]}, which cannot be read now: {e}",
                        file=sys.stderr)
        raise UserError(f"no image of class {self.classes[target]} can be read now; "
                        "put readable images in its folder")

    def find_classes(self, directory):
        return split_classes(directory, self.data_dir)

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        """Each image once, under the class whose folder holds it, never another's via a link."""
        samples, taken = [], set()
        for name, target in class_to_idx.items():
            folder = os.path.join(directory, name)
            mine = [path for path in image_files(folder) if os.path.realpath(path) not in taken
                    and (inside(path, folder) or not inside(path, self.data_dir))]
            if not mine:
                raise UserError(f"{folder} holds no images; put images in every class folder, "
                                "or remove it")
            taken.update(map(os.path.realpath, mine))
            samples += [(path, target) for path in mine]
        return sorted(samples, key=lambda s: (s[1], s[0]))


def image_paths(items):
    """The images among items, each once: files as given, folders searched (image_files)."""
    paths = (image_files(item) if os.path.isdir(item) else [item] for item in items)
    return once(path for found in paths for path in found)
