"""Data for D2L §14.2: the hot-dog download, the book's augmentations, datasets and loaders."""
import contextlib
import copy
import errno
import functools
import hashlib
import http.client
import itertools
import os
import shutil
import sys
import unicodedata
import urllib.request
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # torchvision checks its MD5


class UserError(Exception):
    """Bad input: the message names the problem and the fix, and is shown as one line."""


# ---------------------------------------------------------------- download
def sha1_of(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha1=None):
    """Fetch url into path through a temporary name; a bad file is removed, never kept."""
    if not os.path.exists(path):
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
                expected = int(r.headers.get("Content-Length", -1))
                copy_with_progress(r, f, os.path.basename(path), expected)
                size = f.tell()
            if expected >= 0 and size != expected:
                raise OSError(f"the connection closed after {size} of {expected} bytes")
        except (OSError, http.client.HTTPException) as e:  # no network, refused, truncated
            if os.path.exists(path + ".part"):
                os.remove(path + ".part")
            raise UserError(f"cannot download {url} ({e}); fetch it on a machine with network "
                            f"and put it at {path}") from None
        os.replace(path + ".part", path)
    if sha1 and sha1_of(path) != sha1:
        os.remove(path)
        raise UserError(f"{path} has the wrong SHA-1 (expected {sha1}), so it was removed; "
                        "run again to download it afresh")
    return path


def copy_with_progress(source, target, name, total):
    """shutil.copyfileobj, with a progress line on a terminal, as torch.hub's downloads have."""
    show = sys.stderr.isatty()
    while chunk := source.read(1 << 20):
        target.write(chunk)
        if show:
            print(f"\r  {name}: {target.tell() / 1e6:.1f}" + (f" of {total / 1e6:.1f}" if total > 0 else "")
                  + " MB", end="", file=sys.stderr, flush=True)
    if show:
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def write_whole(path, content):
    """Write bytes to path through a temporary name: a crash or a full disk never leaves half a
    file, and the last whole one stays. A failed write is one UserError naming the path."""
    try:
        with open(path + ".part", "wb") as f:
            f.write(content)
        os.replace(path + ".part", path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".part")
        raise UserError(f"cannot write {path} ({e.strerror or e}); {what_to_do(e)}") from None


def writable_folder(path):
    """path, created if need be, once a probe file has been written in it: a folder that cannot
    be written to is found before any work is done."""
    probe = os.path.join(path, ".write-probe")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write in the folder {path} ({e.strerror or e}); {what_to_do(e)}") from None
    return path


def what_to_do(error):
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space there, or write to another folder"
    return "choose a folder you can write to"


def extract(zip_path, root):
    """Unzip into a scratch folder, then move its contents into root: never half a data set."""
    scratch = os.path.join(root, ".extracting")
    shutil.rmtree(scratch, ignore_errors=True)  # what an interrupted run left behind
    try:
        with zipfile.ZipFile(zip_path) as z:
            for name in z.namelist():
                target = os.path.realpath(os.path.join(scratch, name))
                if not target.startswith(os.path.realpath(scratch) + os.sep):
                    raise UserError(f"{zip_path} holds a path outside the data root ({name}); "
                                    "delete it and download it again")
            z.extractall(scratch)
    except (zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{zip_path} is not a whole zip file ({e}); "
                        "delete it and download it again") from None
    except OSError as e:  # a full disk, a folder that cannot be written
        shutil.rmtree(scratch, ignore_errors=True)
        raise UserError(f"cannot extract {zip_path} into {root} ({e.strerror or e}); {what_to_do(e)}") from None
    for name in os.listdir(scratch):
        os.replace(os.path.join(scratch, name), os.path.join(root, name))
    os.rmdir(scratch)


def get_hotdog(root="data", url=HOTDOG_URL, sha1=HOTDOG_SHA1):
    """The hot-dog set (D2L §14.2.2.1) under root/hotdog, downloaded and extracted on first use."""
    folder = os.path.join(root, "hotdog")
    if not os.path.isdir(folder):
        extract(download(url, os.path.join(writable_folder(root), "hotdog.zip"), sha1), root)
    return folder


# ---------------------------------------------------------------- transforms
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, as the pretrained net saw


def make_train_augs(crop=224, interpolation="bilinear"):
    """The book's training augmentations, for a net trained at crop pixels (models.preprocessing)."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(crop, interpolation=v2.InterpolationMode(interpolation)),
                       v2.RandomHorizontalFlip(), v2.ToPureTensor()])


def make_test_augs(resize=256, crop=224, interpolation="bilinear"):
    """The book's test augmentations; the checkpoint keeps these settings for prediction."""
    return v2.Compose([v2.ToImage(), v2.Resize([resize, resize], interpolation=v2.InterpolationMode(interpolation)),
                       v2.CenterCrop(crop), v2.ToPureTensor()])


# The book's augmentations (§14.2.2.1) up to ToTensor. ToImage comes first, so the crop and resize
# run on uint8 tensors whether an image comes from PIL or from the decoded cache below (the same
# bilinear, antialiased resize as PIL's). The loaders yield uint8 images; the book's last two
# steps, ToTensor's scaling and `normalize`, run on whole batches on the device (`normalize`
# below): per image on a CPU core they cost twice the crop and resize, and floats are 4x the bytes.
train_augs = make_train_augs(224)
test_augs = make_test_augs(256, 224)


def normalize(X, mean=MEAN, std=STD):
    """A batch of uint8 images as the net's input: scaled to [0, 1] (ToTensor), then normalised."""
    return v2.functional.normalize(X.float() / 255, mean, std)


# ---------------------------------------------------------------- reading images
# torchvision's image types, and what phones and the web also give: GIF, and HEIC (read where the
# pillow-heif plugin is installed, and otherwise named as unreadable, never skipped unsaid).
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif", ".heic", ".heif")
# PIL refuses images over 89 megapixels as possible decompression bombs, and phones take 108.
Image.MAX_IMAGE_PIXELS = 200_000_000


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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return read(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {path} ({e}); raise the limit to read it: "
                        "PIL.Image.MAX_IMAGE_PIXELS (--max-megapixels on the command line)") from None
    except OSError as e:
        fix = ("install the HEIC plugin: pip install pillow-heif" if path.lower().endswith((".heic", ".heif"))
               else "delete or replace that file")
        raise UserError(f"cannot read image {path} ({e.strerror or e}); {fix}") from None


@functools.cache
def heif_plugin():
    """Let PIL read HEIC photos (iPhones' default), where the pillow-heif plugin is installed."""
    with contextlib.suppress(ImportError):
        from pillow_heif import register_heif_opener
        register_heif_opener()


# ---------------------------------------------------------------- finding images in folders
def ignored(name):
    """Never a class or an image: hidden names (.ipynb_checkpoints, .DS_Store, macOS's ._x.jpg),
    what NAS boxes and Windows add (Synology's @eaDir, Thumbs.db, desktop.ini), and __MACOSX."""
    return name.startswith((".", "@")) or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def nfc(name):
    """A name in Unicode's composed form: a Mac writes "é" as "e" and an accent (NFD), others as one
    character (NFC), and the two must be one class."""
    return unicodedata.normalize("NFC", name)


def image_files(folder):
    """The image files under folder, sorted: links to files and folders followed, but no folder
    read twice (a link back up would loop) and no file taken twice; ignored names skipped."""
    found, seen = {}, set()
    for root, folders, names in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            folders[:] = []
            continue
        seen.add(os.path.realpath(root))
        folders[:] = [name for name in folders if not ignored(name)]
        for path in sorted(os.path.join(root, name) for name in names
                           if not ignored(name) and has_file_allowed_extension(name, IMAGE_EXTENSIONS)):
            found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def class_folders(split):
    """The class folders of a split, in the order of their NFC names; the layout is
    split/<class>/<image>, with two classes or more."""
    entries = [e for e in os.scandir(split) if not ignored(e.name)]
    classes = sorted((e.name for e in entries if e.is_dir()), key=nfc)
    loose = [e.name for e in entries if e.is_file() and has_file_allowed_extension(e.name, IMAGE_EXTENSIONS)]
    if loose or len(classes) < 2:
        found = f"images ({loose[0]}, ...) but " if loose else ""
        raise UserError(f"{split} holds {found}{len(classes)} class folder(s) {classes}; the layout is "
                        f"{os.path.basename(split)}/<class>/<image>, with two classes or more")
    return classes


def readable(samples):
    """The samples whose images can be read, and their sizes, from the headers alone. Those that
    cannot be read are left out, with one note: how many, and what the first one needs."""
    kept, sizes, failed = [], [], []
    for path, target in samples:
        try:
            sizes.append(image_size(path))
            kept.append((path, target))
        except UserError as e:
            failed.append(str(e))
    if failed and not kept:
        raise UserError(f"none of the {len(failed)} images can be read; the first: {failed[0]}")
    if failed and rank() == 0:
        print(f"note: left out {len(failed)} file(s) that cannot be read as images; the first: {failed[0]}",
              file=sys.stderr)
    return kept, sizes


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder, for folders as people's devices write them: ignored names are
    never classes or images (pytorch/vision#2831: Jupyter's .ipynb_checkpoints/ would be a class),
    links are followed but no folder is read twice, classes sort by their NFC names, and images
    are read by load_rgb. Those that cannot be read are left out with a note (`readable`);
    `sizes` holds the (width, height) of the others."""

    def __init__(self, split, transform=None):
        super().__init__(split, transform, loader=load_rgb)
        self.samples, self.sizes = readable(self.samples)
        self.imgs, self.targets = self.samples, [target for _, target in self.samples]
        self.where = f"in {os.path.basename(os.path.normpath(split))}/"  # for the run's header line
        self.held_out = None  # where split_by_class made it: the held-out paths

    def find_classes(self, directory):
        classes = class_folders(directory)
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = []
        for name, target in class_to_idx.items():
            paths = image_files(os.path.join(directory, name))
            if not paths:
                raise UserError(f"{os.path.join(directory, name)} holds no images; put images in every "
                                "class folder, or remove it")
            samples += [(path, target) for path in paths]
        return samples


class DecodedImages(torch.utils.data.Dataset):
    """An ImageFolder decoded once into uint8 pixels, then augmented afresh per item.

    Where we differ from ImageFolder + PIL, and why: decoding a PNG costs several times the
    augmentations, so decoding every epoch starves a GPU. All images share one buffer, sized from
    their headers, so worker processes receive it whole (and cheaply) on every platform.
    """

    def __init__(self, folder, workers=1):
        self.classes, self.targets, self.transform = folder.classes, folder.targets, folder.transform
        self.samples, self.root, self.where, self.held_out = folder.samples, folder.root, folder.where, folder.held_out
        self.shapes = [(3, height, width) for width, height in folder.sizes]
        self.offsets = [0, *itertools.accumulate(3 * width * height for width, height in folder.sizes)]
        self.pixels = torch.empty(self.offsets[-1], dtype=torch.uint8)
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
            list(pool.map(self.decode, range(len(self))))

    def decode(self, i):
        pixels = v2.functional.pil_to_tensor(load_rgb(self.samples[i][0]))
        self.shapes[i] = tuple(pixels.shape)  # turned upright: the same pixels, perhaps (3, w, h)
        self.image(i).copy_(pixels)

    def image(self, i):
        return self.pixels[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i])

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        return self.transform(self.image(i)), self.targets[i]


SPLITS = ("train", "test", "val", "valid", "validation")


def image_folders(data_dir, cache_budget=None, workers=1, val_split=0.2, seed=0, held_out=None):
    """The training and evaluation ImageFolders of data_dir with the book's augmentations: its
    train/ and test/ (or val/), or, where it holds class folders and no train/, a split of them
    (split_by_class). Decoded once if their pixels fit in cache_budget bytes (default: half the
    available memory; 0: never)."""
    subfolders = [e.name for e in os.scandir(data_dir) if e.is_dir() and not ignored(e.name)] \
        if os.path.isdir(data_dir) else []
    classes = [name for name in subfolders if name.lower() not in SPLITS]
    if classes and len(classes) < len(subfolders):
        raise UserError(f"{data_dir} holds both {sorted(set(subfolders) - set(classes))} and class folders "
                        f"{sorted(classes)[:3]}; keep one layout: train/<class>/ and test/<class>/, "
                        "or <class>/ alone, to be split")
    if classes:
        folders = split_by_class(data_dir, val_split, seed, held_out)
    else:
        folders = book_folders(data_dir)
    return decoded(folders, cache_budget, workers)


def book_folders(data_dir):
    """data_dir's train/ and test/ (or val/, valid/, validation/) ImageFolders, as the book's."""
    splits = [split_folder(data_dir, ["train"]), split_folder(data_dir, ["test", "val", "valid", "validation"])]
    classes = [class_folders(s) for s in splits]
    if list(map(nfc, classes[0])) != list(map(nfc, classes[1])):
        raise UserError(f"{splits[0]} has classes {classes[0]} but {splits[1]} has {classes[1]}; "
                        "give both the same class folders")
    return [ImageFolder(split, augs) for split, augs in zip(splits, (train_augs, test_augs))]


def split_folder(data_dir, names):
    """The first of names that is a folder in data_dir: the evaluation split is test/, or where
    a data set has none, its val/ (valid/, validation/)."""
    found = {e.name.lower(): e.path for e in os.scandir(data_dir) if e.is_dir()} if os.path.isdir(data_dir) else {}
    for name in names:  # Train/ as well as train/
        if name in found:
            return found[name]
    raise UserError(f"{os.path.join(data_dir, names[0])} is not a folder; the data folder needs "
                    "train/ and test/ (or val/), each with one subfolder of images per class, "
                    "or only the class folders, to be split")


def split_by_class(data_dir, val_split, seed, held_out=None):
    """A folder of class folders as a training and an evaluation ImageFolder: from each class,
    val_split of its images, drawn with seed (the same on every process and every run), are held
    out for evaluation and get the test augmentations only. held_out, a list of paths relative to
    data_dir, names them instead: a resumed run holds out what it held out before."""
    train_set = ImageFolder(data_dir, train_augs)
    paths = [os.path.relpath(path, data_dir) for path, _ in train_set.samples]
    held = set(held_out) if held_out is not None else {paths[i] for i in hold_out(train_set, val_split, seed)}
    test_set = copy.copy(train_set)
    test_set.transform, test_set.held_out = test_augs, sorted(held & set(paths))
    test_set.where = f"of {len(paths)} images, split {val_split:g} by class, seed {seed}"
    samples, sizes = train_set.samples, train_set.sizes
    for folder, keep in ((train_set, False), (test_set, True)):
        picked = [i for i, path in enumerate(paths) if (path in held) == keep]
        folder.samples = folder.imgs = [samples[i] for i in picked]
        folder.sizes, folder.targets = [sizes[i] for i in picked], [samples[i][1] for i in picked]
    return [train_set, test_set]


def hold_out(folder, val_split, seed):
    """The indices to hold out: from each class, val_split of its images, at least one and never
    all, drawn with seed."""
    generator, held = torch.Generator().manual_seed(seed), []
    for target, name in enumerate(folder.classes):
        members = [i for i, t in enumerate(folder.targets) if t == target]
        if len(members) < 2:
            raise UserError(f"{os.path.join(folder.root, name)} holds {len(members)} image; to split it "
                            "for testing, a class needs at least 2")
        count = min(len(members) - 1, max(1, round(val_split * len(members))))
        held += [members[j] for j in torch.randperm(len(members), generator=generator)[:count].tolist()]
    return held


def available_memory():
    """Bytes the machine can still give (Linux's MemAvailable), else half of all memory."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def decoded(folders, cache_budget=None, workers=1):
    """The folders decoded once (DecodedImages) if their pixels fit in cache_budget bytes
    (default: half the available memory; 0: never), else as they are, with a note."""
    if cache_budget == 0:
        return folders
    # Each process on this machine holds its own copy: they share half of the free memory.
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    needed = sum(3 * width * height for folder in folders for width, height in folder.sizes)
    budget = cache_budget or available_memory() // (2 * local_processes)
    if needed > budget:
        if rank() == 0:
            print(f"note: decoding images every epoch: decoded they would take {needed / 2**30:.1f} GB, "
                  f"more than the cache's {budget / 2**30:.1f} GB (cache_budget; --cache-gb)", file=sys.stderr)
        return folders
    return [DecodedImages(folder, workers) for folder in folders]


def image_paths(items):
    """The images among items, each once however often it is named: files as given, folders
    searched (image_files)."""
    paths = [path for item in items for path in (image_files(item) if os.path.isdir(item) else [item])]
    first = {}
    for path in paths:
        first.setdefault(os.path.realpath(path), path)
    return list(first.values())


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


def cifar10(root="data"):
    """CIFAR-10 through the same augmentations, upsampled to 224 as the pretrained net expects."""
    fetch = not os.path.isdir(os.path.join(root, "cifar-10-batches-py"))
    try:
        if fetch:  # our download, for its progress line; torchvision checks the MD5 and extracts
            download(CIFAR10_URL, os.path.join(writable_folder(root), "cifar-10-python.tar.gz"))
        return [torchvision.datasets.CIFAR10(root, train=t, transform=augs, download=fetch)
                for t, augs in ((True, train_augs), (False, test_augs))]
    except (OSError, http.client.HTTPException) as e:
        raise UserError(f"cannot download CIFAR-10 ({e}); put cifar-10-python.tar.gz "
                        f"in {root} by hand") from None


def fake_data(train=2000, test=800, num_classes=2):
    """Random images shaped like the hot-dog set, to measure speed with no data and no network."""
    return [torchvision.datasets.FakeData(n, (3, 256, 256), num_classes, augs, random_offset=o)
            for n, augs, o in ((train, train_augs, 0), (test, test_augs, train))]


# ---------------------------------------------------------------- loaders
def load_data(batch_size=128, data_dir=None, root="data"):
    """The book's train_iter and test_iter (§14.2.2.3) over data_dir's train/ and test/ folders,
    default the hot-dog set, downloaded into root on first use."""
    workers = default_workers()
    return make_loaders(*image_folders(data_dir or get_hotdog(root), workers=workers), batch_size, workers)


def class_names(dataset):
    """A data set's class names; FakeData (--dummy) has only a number of classes."""
    return getattr(dataset, "classes", None) or [str(i) for i in range(dataset.num_classes)]


def default_workers():
    """One loader process per core this process may use, shared among the processes on this
    machine (torchrun's LOCAL_WORLD_SIZE), at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank():
    """This process's rank: the process group's, or before it is joined (and after it is left)
    the one torchrun gave it; 0 on its own."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))


def make_loaders(train_set, test_set, batch_size=128, workers=0, seed=0):
    """Shuffled training and ordered test loaders; under torch.distributed each process gets its
    share: the global batch is split, and every test image is evaluated by exactly one process."""
    world = world_size()
    if batch_size < world:
        raise UserError(f"batch_size={batch_size} is smaller than the {world} processes; "
                        "give at least one image per process")
    sampler = DistributedSampler(train_set, seed=seed) if world > 1 else None
    if world > 1:
        test_set = Subset(test_set, range(rank(), len(test_set), world))
    opts = dict(num_workers=workers, pin_memory=torch.cuda.is_available(),
                persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    return (DataLoader(train_set, batch_size // world, shuffle=sampler is None, sampler=sampler, **opts),
            DataLoader(test_set, batch_size // world, **opts))
