"""The data of D2L §14.2: the hot-dog download, the book's augmentations, the training and
evaluation sets of a data folder (its layout, a split of class folders alone, the decoded cache),
and the loaders."""
import copy
import hashlib
import http.client
import itertools
import math
import os
import sys
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from images import ImageFolder, every_class_read, grid, ignored, inside, left_out, load_rgb, nfc, split_classes
from utils import UserError, local_processes, made_folder, rank, say, what_to_do, whole, world_size, writable_folder

HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # torchvision checks its MD5


# ---------------------------------------------------------------- download
def sha1_of(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha1=None):
    """Fetch url into path (through a temporary name). A failed download leaves nothing, not even
    the folders made for it; a file with the wrong SHA-1 is never used: removed where it was
    downloaded now, moved to PATH.bad where it was there before (put there by hand, perhaps)."""
    placed = os.path.exists(path)
    if not placed:
        try:
            with (made_folder(os.path.dirname(path) or "."), whole(path) as part,
                  urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f):
                expected = int(r.headers.get("Content-Length", -1))
                copy_with_progress(r, f, os.path.basename(path), expected)
                if expected >= 0 and f.tell() != expected:
                    raise OSError(f"the connection closed after {f.tell()} of {expected} bytes")
        except (OSError, http.client.HTTPException) as e:  # no network, refused, truncated
            raise UserError(f"cannot download {url} ({e}); fetch it on a machine with network "
                            f"and put it at {path}") from None
    if sha1 and sha1_of(path) != sha1:
        if placed:
            os.replace(path, path + ".bad")
        else:
            os.remove(path)
        done = f"moved to {path}.bad" if placed else "removed"
        raise UserError(f"{path} has the wrong SHA-1 (expected {sha1}), so it was {done}; run again to download it afresh")
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


def extract(zip_path, folder):
    """Unzip the folder zip_path holds (hotdog.zip: hotdog/) into folder, through a temporary
    name: never half a data set."""
    name = os.path.basename(folder)
    try:
        with whole(folder) as part, zipfile.ZipFile(zip_path) as z:
            for info in z.infolist():
                if not inside(os.path.join(part, info.filename), part):
                    raise UserError(f"{zip_path} holds a path outside the data root ({info.filename}); "
                                    "delete it and download it again")
                top, _, info.filename = info.filename.partition("/")
                if top == name and info.filename:
                    z.extract(info, part)
    except (zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{zip_path} is not a whole zip file ({e}); delete it and download it again") from None
    except OSError as e:  # a full disk, a folder that cannot be written
        raise UserError(f"cannot extract {zip_path} into {folder} ({e.strerror or e}); {what_to_do(e)}") from None


def get_hotdog(root="data", url=HOTDOG_URL, sha1=HOTDOG_SHA1):
    """The hot-dog set (D2L §14.2.2.1) under root/hotdog, downloaded and extracted on first use."""
    folder = os.path.join(root, "hotdog")
    if not os.path.isdir(folder):
        extract(download(url, os.path.join(root, "hotdog.zip"), sha1), folder)
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
# bilinear, antialiased resize as PIL's, to within one level in 255). The loaders yield uint8
# images; the book's last two steps, ToTensor's scaling and `normalize`, run on whole batches on
# the device (`normalize` below): per image on a CPU core they cost twice the crop and resize,
# and floats are 4x the bytes.
train_augs = make_train_augs(224)
test_augs = make_test_augs(256, 224)


def normalize(X, mean=MEAN, std=STD):
    """A batch of uint8 images as the net's input: scaled to [0, 1] (ToTensor), then normalised."""
    return v2.functional.normalize(X.float() / 255, mean, std)


def with_augs(sets, sizes):
    """The training set and the evaluation sets with the book's augmentations at the sizes a
    net's ImageNet weights were trained with (models.preprocessing; resnet18: the book's own)."""
    sets[0].transform = make_train_augs(sizes["crop"], sizes["interpolation"])
    for evaluation in sets[1:]:
        evaluation.transform = make_test_augs(sizes["resize"], sizes["crop"], sizes["interpolation"])
    return sets


# ---------------------------------------------------------------- a data folder's sets
VAL = ["val", "valid", "validation"]
SPLITS = ("train", "test", *VAL)


def image_folders(data_dir, cache_budget=None, workers=1, val_split=0.2, seed=0, held_out=None, out=None):
    """The training and evaluation ImageFolders of data_dir with the book's augmentations: its
    train/ and test/ (or val/; with both, a third, book_folders), or, where it holds class folders
    alone, a split of them (split_by_class). Decoded once if their pixels fit in cache_budget bytes (default: half the
    available memory; 0: never). out: the run's folder, refused where it would be read as data."""
    if layout(data_dir, out) == "classes":
        folders = split_by_class(data_dir, val_split, seed, held_out)
    else:
        folders = book_folders(data_dir)
    return decoded(folders, cache_budget, workers)


def layout(data_dir, out=None):
    """How data_dir holds its images: "splits" (train/ beside test/ or val/, as the book's: any
    other folder beside them is left unused), or "classes" (class folders alone, to be split).
    out, a run's folder, is refused inside a folder whose images are read (the splits, or data_dir
    itself where it holds class folders alone): what a run writes is never read as data."""
    splits = [name for name in subfolders(data_dir) if name.lower() in SPLITS]
    classes = [name for name in subfolders(data_dir) if name.lower() not in SPLITS]
    for folder in [os.path.join(data_dir, name) for name in splits] or [data_dir]:
        if out and inside(out, folder):
            raise UserError(f"out={out} lies in {folder}, whose folders are read as classes of images, "
                            "and what a run writes there would be too; choose an out= outside it")
    if not classes or "train" in map(str.lower, splits) and len(splits) > 1:
        return "splits"
    if splits:  # train/ alone (or test/) beside class folders: which is meant?
        raise UserError(f"{data_dir} holds both {sorted(splits)} and class folders {sorted(classes)[:3]}; "
                        "keep one layout: train/<class>/ and test/<class>/, or <class>/ alone, to be split")
    return "classes"


def subfolders(data_dir):
    return [e.name for e in os.scandir(data_dir) if e.is_dir() and not ignored(e.name)] \
        if os.path.isdir(data_dir) else []


def book_folders(data_dir):
    """data_dir's train/ and test/ ImageFolders, as the book's (where it has no test/, its val/,
    valid/ or validation/). Where it holds val/ and test/ together, the epochs are evaluated on
    val/, and test/ comes third: the final test, evaluated once, at the end."""
    splits = [split_folder(data_dir, ["train"]), split_folder(data_dir, ["test", *VAL])]
    if os.path.basename(splits[1]).lower() == "test" and set(VAL) & set(map(str.lower, subfolders(data_dir))):
        splits.insert(1, split_folder(data_dir, VAL))
    classes = [[nfc(name) for name in split_classes(s, data_dir)[0]] for s in splits]
    for split, names in zip(splits, classes):
        if names != classes[0]:
            raise UserError(f"{splits[0]} has classes {classes[0]} but {split} has {names}; "
                            "give both the same class folders")
    folders = [ImageFolder(split, augs, data_dir) for split, augs in zip(splits, (train_augs, test_augs, test_augs))]
    unused = sorted(set(subfolders(data_dir)) - {os.path.basename(s) for s in splits})
    if unused:
        folders[1].where += f" ({', '.join(name + '/' for name in unused)} left unused)"
    return folders


def same_data(sets, ckpt):
    """Refuse to continue a run (ckpt: its checkpoint) on data other than it was trained on, in one
    line naming the difference: other classes; the other layout (the images tested on would change,
    and some held out would be trained on); or val/ beside test/ where the run had none, or the
    other way round (what val/ and test/ are for, each message says)."""
    classes, path, before, now = class_names(sets[0]), ckpt["path"], ckpt.get("final_split"), final_split(sets)
    if classes != ckpt["classes"]:
        raise UserError(f"{path} was trained on classes {ckpt['classes']}, not {classes}; continue it with "
                        "a data folder of those classes")
    split = ckpt.get("held_out") is not None  # the run held images of class folders alone out for testing
    if split != (getattr(sets[1], "held_out", None) is not None):
        tested, holds = (("images held out of class folders alone", "train/ and test/") if split
                         else ("a test folder", "class folders alone, to split"))
        raise UserError(f"{path} was tested on {tested}, and the data folder now holds {holds}; continue it with the "
                        "data folder it was trained on")
    if now and not before:
        raise UserError(f"{path} was trained with no val/ beside {now}, and {os.path.dirname(sets[1].root)} now holds "
                        f"{os.path.basename(sets[1].root)}/, which would choose the epochs in {now}'s place; move it out "
                        "of the data folder to continue the run, or train a new one in another out=")
    if before and not now:
        raise UserError(f"{path} chose its epochs on val/ and kept {before} for a final test, but the data folder no "
                        "longer holds both; put them back to continue the run, or train a new one in another out=")


def final_split(sets):
    """The final test's folder ("test/"), where the sets hold one beside val/ (book_folders)."""
    return os.path.basename(os.path.normpath(sets[2].root)) + "/" if len(sets) > 2 else None


def split_folder(data_dir, names):
    """The first of names that is a folder in data_dir: the evaluation split is test/, or where
    a data set has none, its val/ (valid/, validation/)."""
    found = {e.name.lower(): e.path for e in os.scandir(data_dir) if e.is_dir()} if os.path.isdir(data_dir) else {}
    for name in names:  # Train/ as well as train/
        if name in found:
            return found[name]
    raise UserError(f"{os.path.join(data_dir, names[0])} is not a folder; the data folder needs "
                    "train/ and test/ (or val/), each with one subfolder of images per class, "
                    "or only the class folders, which runs.train_runs and the command line split")


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
    for folder, held_part in ((train_set, False), (test_set, True)):
        folder.keep([i for i, path in enumerate(paths) if (path in held) == held_part])
    every_class_read(test_set, "holds none of the images the run held out for testing (held_out.txt); continue it "
                               "with the folder it was split from, or train anew in another out=")
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


# ---------------------------------------------------------------- the decoded cache
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
        self.starts = [0, *itertools.accumulate(3 * width * height for width, height in folder.sizes)]
        self.pixels = torch.empty(self.starts.pop(), dtype=torch.uint8)
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
            failed = [error for error in pool.map(self.decode, range(len(self))) if error]
        # Those that cannot be decoded are left out as those whose headers cannot be read (readable)
        left_out(failed, len(self.samples))
        kept = [i for i, shape in enumerate(self.shapes) if shape]
        self.samples, self.targets, self.shapes, self.starts = (
            [items[i] for i in kept] for items in (self.samples, self.targets, self.shapes, self.starts))
        every_class_read(self)

    def decode(self, i):
        """Decode image i into its place; the error, where its pixels cannot be read (a file cut
        short after a whole header)."""
        try:
            pixels = v2.functional.pil_to_tensor(load_rgb(self.samples[i][0]))
        except UserError as e:
            self.shapes[i] = None
            return str(e)
        self.shapes[i] = tuple(pixels.shape)  # turned upright: the same pixels, perhaps (3, w, h)
        self.image(i).copy_(pixels)

    def image(self, i):
        return self.pixels[self.starts[i]:self.starts[i] + math.prod(self.shapes[i])].view(self.shapes[i])

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        return self.transform(self.image(i)), self.targets[i]


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
    needed = sum(3 * width * height for folder in folders for width, height in folder.sizes)
    budget = cache_budget or available_memory() // (2 * local_processes())
    if needed > budget:
        say(f"note: decoding images every epoch: decoded they would take {needed / 2**30:.3g} GB, "
            f"more than the cache's {budget / 2**30:.3g} GB (cache_budget; --cache-gb)", file=sys.stderr)
        return folders
    return [DecodedImages(folder, workers) for folder in folders]


# ---------------------------------------------------------------- other data sets
def cifar10(root="data"):
    """CIFAR-10 through the same augmentations, upsampled to 224 as the pretrained net expects."""
    archive = os.path.join(root, "cifar-10-python.tar.gz")
    fetch = not os.path.isdir(os.path.join(root, "cifar-10-batches-py"))
    try:
        if fetch:  # ours: written whole, and a failure is one line; torchvision checks the MD5 and extracts
            download(CIFAR10_URL, archive)
        return [torchvision.datasets.CIFAR10(root, train=t, transform=augs, download=fetch)
                for t, augs in ((True, train_augs), (False, test_augs))]
    except (OSError, http.client.HTTPException) as e:
        if os.path.exists(archive) and not check_integrity(archive, torchvision.datasets.CIFAR10.tgz_md5):
            raise UserError(f"{archive} is not CIFAR-10's archive (another MD5), and torchvision could not download "
                            f"it again ({e}); delete it, and run again or put a whole copy there") from None
        raise UserError(f"cannot download CIFAR-10 ({e}); put cifar-10-python.tar.gz "
                        f"in {root} by hand") from None


def fake_data(train=2000, test=800, num_classes=2):
    """Random images shaped like the hot-dog set, to measure speed with no data and no network."""
    return [torchvision.datasets.FakeData(n, (3, 256, 256), num_classes, augs, random_offset=o)
            for n, augs, o in ((train, train_augs, 0), (test, test_augs, train))]


def datasets(data_dir=None, dataset="hotdog", root="data", **folders):
    """The training and evaluation sets: data_dir's (image_folders, given **folders), else the
    dataset "hotdog" or "cifar10", downloaded into root on first use, or "dummy", random images."""
    if dataset == "dummy":
        return fake_data()
    if dataset == "cifar10":
        return cifar10(root)
    return image_folders(data_dir or get_hotdog(root), **folders)


# ---------------------------------------------------------------- loaders
def load_data(batch_size=128, data_dir=None, root="data", persistent=False):
    """The book's train_iter and test_iter, which its train_fine_tuning builds inline
    (§14.2.2.3): torchvision's ImageFolders of data_dir's train/ and test/ (where it has no
    test/, its val/) with train_augs and test_augs, shuffled for training; default the hot-dog
    set, downloaded into root on first use. The command line reads a data folder as devices
    write it instead (datasets: phone photos turned upright, hidden folders skipped, class
    folders alone split, images decoded once). Their worker processes, one per core, start
    with each pass over a loader and end with it: loaders a notebook keeps hold none. With
    persistent, they live as long as the loaders (make_loaders): for a caller that drops them."""
    data_dir = data_dir or get_hotdog(root)
    train_imgs = torchvision.datasets.ImageFolder(split_folder(data_dir, ["train"]), transform=train_augs)
    test_imgs = torchvision.datasets.ImageFolder(split_folder(data_dir, ["test", *VAL]), transform=test_augs)
    # label i names class i in each; one name in either Unicode form (macOS writes NFD) is one class
    if test_imgs.classes != train_imgs.classes and list(map(nfc, test_imgs.classes)) != list(map(nfc, train_imgs.classes)):
        raise UserError(f"{train_imgs.root} has classes {train_imgs.classes} but {test_imgs.root} has "
                        f"{test_imgs.classes}; give both the same class folders")
    return make_loaders(train_imgs, test_imgs, batch_size, default_workers(), persistent=persistent)


def class_names(dataset):
    """A data set's class names; FakeData (--dummy) has only a number of classes."""
    return getattr(dataset, "classes", None) or [str(i) for i in range(dataset.num_classes)]


def default_workers(workers=None):
    """workers, where given; else one loader process per core this process may use, shared
    among the processes on this machine, at most 16."""
    if workers is not None:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cores // local_processes()))


def make_loaders(train_set, test_set, batch_size=128, workers=0, seed=0, persistent=True):
    """Shuffled training and ordered test loaders; under torch.distributed each process gets its
    share: the global batch is split, and every test image is evaluated by exactly one process.
    persistent: the worker processes live as long as the loaders. Started anew each epoch, they
    would share this process's memory copy-on-write, and every page it writes while they live
    (weights, gradients, activations) would be copied again each epoch."""
    world = world_size()
    if batch_size < world:
        raise UserError(f"batch_size={batch_size} is smaller than the {world} processes; "
                        "give at least one image per process")
    sampler = DistributedSampler(train_set, seed=seed) if world > 1 else None
    if world > 1:
        test_set = Subset(test_set, range(rank(), len(test_set), world))
    opts = dict(num_workers=workers, pin_memory=torch.cuda.is_available(),
                persistent_workers=persistent and workers > 0, prefetch_factor=4 if workers else None)
    return (DataLoader(train_set, batch_size // world, shuffle=sampler is None, sampler=sampler, **opts),
            DataLoader(test_set, batch_size // world, **opts))


def samples(data_dir, out="."):
    """The book's first look at the data (§14.2.2.1): 8 images of the first class and 8 of the
    last (fewer where a class has fewer), as loaded and after train_augs; writes out/samples.png
    and returns its path."""
    # out is refused among the class folders (layout): samples.png there would be trained on
    train = data_dir if layout(data_dir, out) == "classes" else split_folder(data_dir, ["train"])
    folder = ImageFolder(train, data_dir=data_dir)
    first, last = folder.targets[0], folder.targets[-1]
    picks = [[i for i, t in enumerate(folder.targets) if t == first][:8],
             [i for i, t in enumerate(folder.targets) if t == last][-8:]]
    images = [[folder[i][0] for i in row] for row in picks]
    rows = images + [[train_augs(img) for img in row] for row in images]
    captions = [["as loaded"] * 8] * 2 + [["train_augs"] * 8] * 2
    return grid(rows, captions, os.path.join(writable_folder(out), "samples.png"))
