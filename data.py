"""Data for D2L §14.2: the hot-dog download, the book's augmentations, datasets and loaders."""
import hashlib
import http.client
import itertools
import os
import shutil
import urllib.request
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.transforms import v2

HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"


class UserError(Exception):
    """Bad input: the message names the problem and the fix, and is shown as one line."""


# ---------------------------------------------------------------- download
def sha1_of(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha1):
    """Fetch url into path through a temporary name; a bad file is removed, never kept."""
    if not os.path.exists(path):
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
                shutil.copyfileobj(r, f)
                size, expected = f.tell(), int(r.headers.get("Content-Length", -1))
            if expected >= 0 and size != expected:
                raise OSError(f"the connection closed after {size} of {expected} bytes")
        except (OSError, http.client.HTTPException) as e:  # no network, refused, truncated
            if os.path.exists(path + ".part"):
                os.remove(path + ".part")
            raise UserError(f"cannot download {url} ({e}); fetch it on a machine with network "
                            f"and put it at {path}") from None
        os.replace(path + ".part", path)
    if sha1_of(path) != sha1:
        os.remove(path)
        raise UserError(f"{path} has the wrong SHA-1 (expected {sha1}), so it was removed; "
                        "run again to download it afresh")
    return path


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
    for name in os.listdir(scratch):
        os.replace(os.path.join(scratch, name), os.path.join(root, name))
    os.rmdir(scratch)


def get_hotdog(root="data", url=HOTDOG_URL, sha1=HOTDOG_SHA1):
    """The hot-dog set (D2L §14.2.1) under root/hotdog, downloaded and extracted on first use."""
    folder = os.path.join(root, "hotdog")
    if not os.path.isdir(folder):
        os.makedirs(root, exist_ok=True)
        extract(download(url, os.path.join(root, "hotdog.zip"), sha1), root)
    return folder


# ---------------------------------------------------------------- transforms
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, as the pretrained net saw


def make_test_augs(resize=256, crop=224):
    """The book's test augmentations; the checkpoint keeps these settings for prediction."""
    return v2.Compose([v2.ToImage(), v2.Resize([resize, resize]), v2.CenterCrop(crop), v2.ToPureTensor()])


# The book's augmentations (§14.2.1) up to ToTensor. ToImage comes first, so the crop and resize
# run on uint8 tensors whether an image comes from PIL or from the decoded cache below (the same
# bilinear, antialiased resize as PIL's). The loaders yield uint8 images; the book's last two
# steps, ToTensor's scaling and `normalize`, run on whole batches on the device (`normalize`
# below): per image on a CPU core they cost twice the crop and resize, and floats are 4x the bytes.
train_augs = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), v2.ToPureTensor()])
test_augs = make_test_augs()
TEST_AUGS_SETTINGS = dict(resize=256, crop=224, mean=MEAN, std=STD)


def normalize(X, mean=MEAN, std=STD):
    """A batch of uint8 images as the net's input: scaled to [0, 1] (ToTensor), then normalised."""
    return v2.functional.normalize(X.float() / 255, mean, std)


# ---------------------------------------------------------------- datasets
def load_rgb(path):
    """Open any image as RGB (grey, palette, RGBA, CMYK), naming the file when it can't be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {path} ({e}); delete or replace that file") from None


class DecodedImages(torch.utils.data.Dataset):
    """An ImageFolder decoded once into uint8 pixels, then augmented afresh per item.

    Where we differ from ImageFolder + PIL, and why: decoding a PNG costs several times the
    augmentations, so decoding every epoch starves a GPU. All images share one buffer, so worker
    processes receive it whole (and cheaply) on every platform. Use --no-cache for a folder that
    does not fit in memory.
    """

    def __init__(self, folder, workers=1):
        self.classes, self.targets, self.transform = folder.classes, folder.targets, folder.transform
        self.samples = folder.samples
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
            images = list(pool.map(lambda s: v2.functional.pil_to_tensor(load_rgb(s[0])), folder.samples))
        self.shapes = [img.shape for img in images]
        self.offsets = [0, *itertools.accumulate(img.numel() for img in images)]
        self.pixels = torch.cat([img.flatten() for img in images])

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        image = self.pixels[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i])
        return self.transform(image), self.targets[i]


def image_folders(data_dir, cache=True, workers=1):
    """The train/ and test/ ImageFolders of data_dir with the book's augmentations."""
    splits = [os.path.join(data_dir, s) for s in ("train", "test")]
    for split in splits:
        if not os.path.isdir(split):
            raise UserError(f"{split} is not a folder; the data folder needs train/ and test/, "
                            "each with one subfolder of images per class")
    classes = [sorted(e.name for e in os.scandir(s) if e.is_dir()) for s in splits]
    if classes[0] != classes[1]:
        raise UserError(f"{splits[0]} has classes {classes[0]} but {splits[1]} has {classes[1]}; "
                        "give both the same class folders")
    sets = []
    for split, augs in zip(splits, (train_augs, test_augs)):
        try:
            folder = torchvision.datasets.ImageFolder(split, transform=augs, loader=load_rgb)
        except FileNotFoundError as e:
            raise UserError(f"{split}: {e}; put images in every class folder") from None
        sets.append(DecodedImages(folder, workers) if cache else folder)
    return sets


def cifar10(root="data"):
    """CIFAR-10 through the same augmentations, upsampled to 224 as the pretrained net expects."""
    download = not os.path.isdir(os.path.join(root, "cifar-10-batches-py"))
    try:
        return [torchvision.datasets.CIFAR10(root, train=t, transform=augs, download=download)
                for t, augs in ((True, train_augs), (False, test_augs))]
    except (OSError, http.client.HTTPException) as e:
        raise UserError(f"cannot download CIFAR-10 ({e}); put cifar-10-python.tar.gz "
                        f"in {root} by hand") from None


def fake_data(train=2000, test=800, num_classes=2):
    """Random images shaped like the hot-dog set, to measure speed with no data and no network."""
    return [torchvision.datasets.FakeData(n, (3, 256, 256), num_classes, augs, random_offset=o)
            for n, augs, o in ((train, train_augs, 0), (test, test_augs, train))]


# ---------------------------------------------------------------- loaders
def default_workers():
    """One loader process per core this process may use, at most 16."""
    return min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def make_loaders(train_set, test_set, batch_size=128, workers=0, device="cpu", seed=0):
    """Shuffled training and ordered test loaders; under torch.distributed each process gets its
    share: the global batch is split, and every test image is evaluated by exactly one process."""
    world = world_size()
    if batch_size < world:
        raise UserError(f"--batch-size {batch_size} is smaller than the {world} processes; "
                        "give at least one image per process")
    sampler = DistributedSampler(train_set, seed=seed) if world > 1 else None
    if world > 1:
        test_set = Subset(test_set, range(rank(), len(test_set), world))
    opts = dict(num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    return (DataLoader(train_set, batch_size // world, shuffle=sampler is None, sampler=sampler, **opts),
            DataLoader(test_set, batch_size // world, **opts))
