"""Photos as devices write them, read upright as 8-bit RGB (EXIF turns, 16-bit and float
pixels, CMYK, GIF, HEIC), and found in folders as people's machines fill them (hidden and system
files, links, names in either Unicode form, files that cannot be read)."""
import contextlib
import functools
import itertools
import os
import sys
import threading
import unicodedata
import warnings

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from beyond import UserError
from beyond.files import inside
from beyond.processes import say

# torchvision's image types, and what phones and the web also give: GIF, and HEIC (read where the
# pillow-heif plugin is installed, and otherwise named as unreadable, never skipped unsaid).
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif", ".heic", ".heif")


# Larger images are refused as possible decompression bombs: PIL's limit, 89 megapixels, is below
# what phones take (108), so 200, from the import on (in a loader worker too, however it starts).
Image.MAX_IMAGE_PIXELS = 200 * 10**6


@contextlib.contextmanager
def megapixels_limit(megapixels):
    """Another limit within the block, in this process and the loader worker processes it forks
    meanwhile. PIL's limit holds for the whole process: the one before is put back after."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(megapixels * 10**6)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


# ---------------------------------------------------------------- reading an image
# Python's warnings filters are the process's, and catch_warnings puts back the ones it found: two
# threads at once (data.DecodedImages decodes in several) could leave one's filter in place.
SIZE_CHECK = threading.Lock()


def load_rgb(path):
    """Any image as 8-bit RGB, the way up it was taken: the EXIF orientation applied (phones store
    portraits sideways), 16-bit and floating-point pixels scaled to 8 bits (PIL would clip them),
    grey, palette, alpha and CMYK converted, a GIF's first frame."""
    return read_image(path, upright_rgb)


def upright_rgb(img):
    ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the pixels
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit grey (I;16, I) and float (F)
        img = Image.fromarray(eight_bits(np.asarray(img)))
    return img.convert("RGB")


def eight_bits(pixels):
    """Pixels as 0 to 255, from their full scale: 65535 for 16-bit integers; for floating-point
    ones, 1 or 255 where none passes it, else 65535."""
    full = 65535
    if pixels.dtype.kind == "f" and pixels.max() <= 255:
        full = 1 if pixels.max() <= 1 else 255
    return np.clip(pixels * (255 / full) + 0.5, 0, 255).astype(np.uint8)


def image_size(path):
    """(width, height) from the image's header, without decoding its pixels; an EXIF turn swaps
    them, which changes no pixel count."""
    return read_image(path, lambda img: img.size)


def read_image(path, read):
    """read(the opened image), naming the file if it is damaged, not an image, or so large that
    it could be a decompression bomb."""
    heif_plugin()
    try:
        with SIZE_CHECK, warnings.catch_warnings():  # PIL checks the size as it opens, with a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)  # the header alone: the pixels are read outside the lock, in parallel
        with img:
            return read(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {path} ({e}); raise the limit to read it: --max-megapixels N (in "
                        "Python, runs' max_megapixels option, or around any call: with beyond.photos.megapixels_limit(N))") from None
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; check the path") from None
    except (OSError, ValueError) as e:  # PIL raises ValueError for some damaged headers and chunks too
        fix = ("install the HEIC plugin: pip install pillow-heif" if path.lower().endswith((".heic", ".heif"))
               else "delete or replace that file")
        raise UserError(f"cannot read image {path} ({getattr(e, 'strerror', None) or e}); {fix}") from None


@functools.cache
def heif_plugin():
    """Let PIL read HEIC photos (iPhones' default), where the pillow-heif plugin is installed."""
    with contextlib.suppress(ImportError):
        from pillow_heif import register_heif_opener
        register_heif_opener()


# ---------------------------------------------------------------- finding images in folders
SYSTEM_NAMES = ("__MACOSX", "Thumbs.db", "desktop.ini",  # macOS's zip files, Windows
                "@eaDir", "#recycle", "#snapshot", "@Recycle", "@Recently-Snapshot")  # Synology's and QNAP's


def ignored(name):
    """Never a class or an image: hidden names (.ipynb_checkpoints, .DS_Store, macOS's ._x.jpg),
    and what zip files, Windows and NAS boxes add (SYSTEM_NAMES). Only those: a class folder of
    one's own, @home, stays a class, never one left out unsaid."""
    return name.startswith(".") or name in SYSTEM_NAMES


def nfc(name):
    """A name in Unicode's composed form: a Mac writes "é" as "e" and an accent (NFD), others as one
    character (NFC), and the two must be one class."""
    return unicodedata.normalize("NFC", name)


def image_files(folder):
    """The image files under folder, sorted: links to files and folders followed, but no folder
    read twice (a link back up would loop) and no file taken twice; ignored names skipped, and
    pipes, sockets and devices (opening a pipe no one writes to would wait for ever)."""
    found, seen = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            folders[:] = []
            continue
        seen.add(os.path.realpath(root))
        folders[:] = [name for name in folders if not ignored(name)]
        found += sorted(os.path.join(root, name) for name in names if not ignored(name)
                        and has_file_allowed_extension(name, IMAGE_EXTENSIONS) and not special(os.path.join(root, name)))
    return sorted(once(found))


def special(path):
    """Whether path is a pipe, a socket or a device (a broken link is a file that cannot be read)."""
    return not os.path.isfile(path) and os.path.exists(path)  # one call for a file


def once(paths):
    """paths, each file once however many paths lead to it (links): the first path to it."""
    first = {}
    for path in paths:
        first.setdefault(os.path.realpath(path), path)
    return list(first.values())


def split_classes(split, data_dir):
    """A split's classes as ImageFolder.find_classes gives them: the first folder of each class, and
    each folder's class index. The folders are sorted by their NFC names, twins (one name in either
    form) one class; the layout is split/<class>/<image>, with two classes or more. Each must be where
    the data folder lays it out: one that is a link to another class's folder, or to a folder
    elsewhere in data_dir, is refused (its images belong to the class and split whose folder holds them)."""
    entries = [e for e in os.scandir(split) if not ignored(e.name)]
    folders = sorted((e.name for e in entries if e.is_dir()), key=lambda name: (nfc(name), name))
    classes = list(dict.fromkeys(map(nfc, folders)))
    loose = [e.name for e in entries if e.is_file() and has_file_allowed_extension(e.name, IMAGE_EXTENSIONS)]
    odd = [name for name in folders if shown(name) != name]
    if odd:  # a class's name is shown in tables, pictures and files
        raise UserError(f"the class folder {shown(os.path.join(split, odd[0]))} has a name that is not UTF-8 text, "
                        "or holds a control character (a newline, a tab); rename it")
    if loose or len(classes) < 2:
        found = f"images ({loose[0]}, ...) but " if loose else ""
        raise UserError(f"{split} holds {found}{len(classes)} class folder(s) {classes}; the layout is "
                        f"{os.path.basename(split)}/<class>/<image>, with two classes or more")
    reals = [os.path.realpath(os.path.join(split, name)) for name in folders]
    for name, real in zip(folders, reals):
        folder = os.path.join(split, name)
        in_place = os.path.join(os.path.realpath(data_dir), os.path.relpath(folder, data_dir))
        if real != in_place and (inside(real, data_dir) or reals.count(real) > 1):
            raise UserError(f"{folder} is a link to {real}, another class's folder or one inside the data folder; "
                            f"put the images of class {name} in a folder of its own, or remove the link")
    return [next(f for f in folders if nfc(f) == c) for c in classes], {f: classes.index(nfc(f)) for f in folders}


def shown(path):
    """path as text to print, on one line: the bytes of a name that is not UTF-8 (which Python
    decodes with surrogates) escaped, bad\\xff.png, and control characters too, a\\nb."""
    text = path.encode(errors="surrogateescape").decode(errors="backslashreplace")
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in text)


def readable(samples):
    """The samples whose images can be read, and their sizes, from the headers alone. Those that
    cannot be read are left out, with one note (left_out)."""
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
    """One note for the files that cannot be read (failed: their errors): how many, and what the
    first one needs. Where none of them can be read, an error."""
    if failed and len(failed) == of:
        raise UserError(f"none of the {of} images can be read; the first: {failed[0]}")
    if failed:
        say(f"note: left out {len(failed)} file(s) that cannot be read as images; the first: {failed[0]}",
            file=sys.stderr)


def every_class_read(folder, problem="holds no image that can be read; put readable images in every class folder, "
                                     "or remove it"):
    """Refuse a set (an ImageFolder, or one made from it) with a class none of whose images are
    left once those that cannot be read (or are not held out) are left out: no net learns or tests
    a class it never sees, and balanced class weights would divide by zero."""
    empty = [name for target, name in enumerate(folder.classes) if target not in folder.targets]
    if empty:
        raise UserError(f"{os.path.join(folder.root, empty[0])} {problem}")


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder, for folders as people's devices write them: ignored names are
    never classes or images (pytorch/vision#2831: Jupyter's .ipynb_checkpoints/ would be a class),
    links are followed but no folder is read twice and no image of data_dir (the data folder
    split lies in) leaves its split and class (make_dataset), classes sort by their NFC names,
    and images are read by load_rgb. Those that cannot be read are left out with a note (`readable`);
    `sizes` holds the (width, height) of the others."""

    def __init__(self, split, transform=None, data_dir=None):
        self.data_dir = data_dir or split  # a folder of class folders alone is its own data folder
        super().__init__(split, transform, loader=load_rgb)
        self.samples, self.sizes = readable(self.samples)
        self.keep(range(len(self.samples)))
        self.where = f"in {os.path.basename(os.path.normpath(split))}/"  # for the run's header line
        self.held_out = None  # where split_by_class made it: the held-out paths
        every_class_read(self)

    def keep(self, indices):
        """Only the samples at indices (a part of a split), with their sizes."""
        self.samples = self.imgs = [self.samples[i] for i in indices]
        self.sizes, self.targets = [self.sizes[i] for i in indices], [target for _, target in self.samples]
        # Whether each image's pixels could not be read (__getitem__), in shared memory: the
        # loader's worker processes each read some of the images, and one note names each once.
        self.unread = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __getitem__(self, i):
        """The image and its class. One whose pixels cannot be read now, though its header could
        (a file cut short: found where images are decoded every epoch), is named once and left
        out: the next image of its class stands in."""
        target = self.targets[i]
        for j in itertools.chain(range(i, len(self)), range(i)):
            if self.targets[j] != target or self.unread[j]:
                continue
            try:
                return super().__getitem__(j)
            except UserError as e:
                if not self.unread[j]:  # another worker may have met it meanwhile
                    self.unread[j] = True
                    say(f"note: left out {self.samples[j][0]}, which cannot be read now: {e}", file=sys.stderr)
        raise UserError(f"no image of class {self.classes[target]} can be read now; put readable images in its folder")

    def find_classes(self, directory):
        return split_classes(directory, self.data_dir)

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """Each image once, under the class whose folder holds it. A link may bring in images from
        elsewhere on the disk (the first class that reaches one takes it), but never another
        class's or another split's images of the data folder (a link back up reaches them all)."""
        samples, taken = [], set()
        for name, target in class_to_idx.items():
            folder = os.path.join(directory, name)
            mine = [path for path in image_files(folder) if os.path.realpath(path) not in taken
                    and (inside(path, folder) or not inside(path, self.data_dir))]
            if not mine:
                raise UserError(f"{folder} holds no images; put images in every class folder, or remove it")
            taken.update(map(os.path.realpath, mine))
            samples += [(path, target) for path in mine]
        return sorted(samples, key=lambda s: (s[1], s[0]))


def image_paths(items):
    """The images among items, each once however often it is named: files as given, folders
    searched (image_files)."""
    return once(path for item in items for path in (image_files(item) if os.path.isdir(item) else [item]))
