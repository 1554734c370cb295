"""The data a run trains on, with the book's augmentations, and the book's first look at it."""
import http.client
import os

import torch
import torchvision
from torchvision.datasets.utils import check_integrity

import data
from beyond import UserError
from beyond.cache import decoded
from beyond.download import download
from beyond.files import writable_folder
from beyond.folders import book_folders, layout, split_by_class, split_folder
from beyond.options import checked
from beyond.photos import ImageFolder
from beyond.pictures import grid


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def image_folders(data_dir, cache_budget=None, workers=1, val_split=0.2, seed=0, held_out=None,
                  out=None):
    """data_dir's sets with the book's augmentations, decoded once where they fit in memory."""
    data_dir = checked("data_dir", data_dir)  # by a run's rules, for a call from Python too
    if data_dir is None:  # a run's default, the hot-dog set; this call has none
        raise UserError("data_dir=None is not a folder; give the folder that holds your data")
    val_split, seed = checked("val_split", val_split), checked("seed", seed)
    if layout(data_dir, out) == "classes":
        folders = split_by_class(data_dir, val_split, seed, held_out)
    else:
        folders = book_folders(data_dir)
    return with_augs(decoded(folders, cache_budget, workers))


def with_augs(sets, sizes=None):
    """The sets with the book's augmentations, at an arch's sizes (default: the book's own)."""
    augs = ((data.make_train_augs(sizes["crop"], sizes["interpolation"]),
             data.make_test_augs(sizes["resize"], sizes["crop"], sizes["interpolation"]))
            if sizes else (data.train_augs, data.test_augs))
    sets[0].transform = augs[0]
    for evaluation in sets[1:]:
        evaluation.transform = augs[1]
    return sets


def cifar10(root="data"):
    """CIFAR-10 through the same augmentations, upsampled to 224 as the pretrained net expects."""
    archive = os.path.join(root, "cifar-10-python.tar.gz")
    fetch = not os.path.isdir(os.path.join(root, "cifar-10-batches-py"))
    try:
        if fetch:  # ours writes it whole; torchvision then checks the MD5 and extracts
            download(CIFAR10_URL, archive)
        return [torchvision.datasets.CIFAR10(root, train=t, transform=augs, download=fetch)
                for t, augs in ((True, data.train_augs), (False, data.test_augs))]
    except RuntimeError as e:  # torchvision's "not found or corrupted"
        if fetch:  # the archive it downloaded
            raise UserError(f"{archive} is not CIFAR-10's archive ({e}); delete it, and run again "
                            "or put a whole copy there") from None
        raise UserError(f"{os.path.join(root, 'cifar-10-batches-py')} lacks some of CIFAR-10's "
                        "files (an extraction cut short?); delete it, and run again") from None
    except (OSError, http.client.HTTPException) as e:
        md5 = torchvision.datasets.CIFAR10.tgz_md5
        if os.path.exists(archive) and not check_integrity(archive, md5):
            raise UserError(f"{archive} is not CIFAR-10's archive (another MD5), and torchvision "
                            f"could not download it again ({e}); delete it, and run again or put a "
                            "whole copy there") from None
        raise UserError(f"cannot download CIFAR-10 ({e}); put cifar-10-python.tar.gz "
                        f"in {root} by hand") from None


def fake_data(train=2000, test=800, num_classes=2):
    """Random images shaped like the hot-dog set, to measure speed with no data and no network."""
    return [torchvision.datasets.FakeData(n, (3, 256, 256), num_classes, augs, random_offset=o)
            for n, augs, o in ((train, data.train_augs, 0), (test, data.test_augs, train))]


def datasets(data_dir=None, dataset="hotdog", root="data", **folders):
    """The training and evaluation sets: data_dir's, else "hotdog", "cifar10" or "dummy"."""
    if dataset == "dummy":
        return fake_data()
    if dataset == "cifar10":
        return cifar10(root)
    return image_folders(data_dir or data.get_hotdog(root), **folders)


def samples(data_dir, out="."):
    """The book's first look at the data (§14.2.2.1), with train_augs, in out/samples.png."""
    # layout refuses an out among the class folders: samples.png there would be trained on
    train = data_dir if layout(data_dir, out) == "classes" else split_folder(data_dir, ["train"])
    folder = ImageFolder(train, data_dir=data_dir)
    first, last = folder.targets[0], folder.targets[-1]
    picks = [[i for i, t in enumerate(folder.targets) if t == first][:8],
             [i for i, t in enumerate(folder.targets) if t == last][-8:]]
    images = [[folder[i][0] for i in row] for row in picks]
    with torch.random.fork_rng(devices=[]):  # the caller's random numbers stay as they were
        torch.random.default_generator.manual_seed(0)  # the same picture each time; the CPU's
        rows = images + [[data.train_augs(img) for img in row] for row in images]
    captions = [["as loaded"] * 8] * 2 + [["train_augs"] * 8] * 2
    return grid(rows, captions, os.path.join(writable_folder(out), "samples.png"))
