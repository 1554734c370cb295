"""The data of D2L §14.2.2.1 and §14.2.2.3: the hot-dog set, the book's augmentations, and its
loaders; helpers the book leaves out come from the package `beyond`, as the book calls `d2l.*`."""
import functools
import os

import torch
import torchvision
from torchvision.transforms import v2

import beyond.download
import beyond.folders
import beyond.loaders

HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"


def get_hotdog(root="data", url=HOTDOG_URL, sha1=HOTDOG_SHA1):
    """§14.2.2.1's hot-dog set under root/hotdog, downloaded and extracted on first use."""
    folder = os.path.join(root, "hotdog")
    if not os.path.isdir(folder):
        zip_path = beyond.download.download(url, os.path.join(root, "hotdog.zip"), sha1)
        beyond.download.extract(zip_path, folder)
    return folder


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, as the pretrained net saw
normalize = torchvision.transforms.Normalize(MEAN, STD)


def normalize_batch(X, stats=None):
    """§14.2.2.1's ToTensor and normalize, on a batch of uint8 images on its device; a batch of
    floats (augmented as the book's, ending in normalize) passes. stats: (mean, std) tensors."""
    mean, std = stats or imagenet_stats(X.device)
    # in place, on X.float()'s copy: a batch of other than 3 channels raises, as the book's
    # Normalize does, where a copy would broadcast it to 3
    return X if X.is_floating_point() else v2.functional.normalize(X.float() / 255, mean, std, True)


@functools.cache
def imagenet_stats(device):  # once per device: a list copied there each batch would wait for it
    return [torch.tensor(stats, device=device).view(-1, 1, 1) for stats in (MEAN, STD)]


def make_train_augs(crop=224, interpolation="bilinear"):
    """§14.2.2.1's training augmentations before ToTensor, for a net trained at crop pixels."""
    resized_crop = v2.RandomResizedCrop(crop, interpolation=v2.InterpolationMode(interpolation))
    return v2.Compose([v2.ToImage(), resized_crop, v2.RandomHorizontalFlip(), v2.ToPureTensor()])


def make_test_augs(resize=256, crop=224, interpolation="bilinear"):
    """§14.2.2.1's test augmentations before ToTensor."""
    resize = v2.Resize([resize, resize], interpolation=v2.InterpolationMode(interpolation))
    return v2.Compose([v2.ToImage(), resize, v2.CenterCrop(crop), v2.ToPureTensor()])


# ToImage first, so the crop and resize run on uint8 tensors, from PIL or from the decoded cache;
# ToPureTensor leaves each image a plain uint8 tensor. The book's last two steps, ToTensor's
# scaling and normalize, run on whole batches on the device (`normalize_batch`, above), where
# they are nearly free and a uint8 batch moves 4x fewer bytes than a float one (docs/speed.md).
train_augs = make_train_augs(224)
test_augs = make_test_augs(256, 224)


def load_data(batch_size=128, data_dir=None, root="data", persistent=False):
    """The book's train_iter and test_iter (§14.2.2.3): the ImageFolders of data_dir's train/
    and test/ (or val/) with train_augs and test_augs; default the hot-dog set."""
    data_dir = get_hotdog(root) if data_dir is None else data_dir
    train_imgs = torchvision.datasets.ImageFolder(
        beyond.folders.split_folder(data_dir, ["train"]), transform=train_augs)
    test_imgs = torchvision.datasets.ImageFolder(
        beyond.folders.split_folder(data_dir, ["test", *beyond.folders.VAL]), transform=test_augs)
    beyond.folders.same_classes(train_imgs, test_imgs)
    return beyond.loaders.make_loaders(train_imgs, test_imgs, batch_size,
                                       beyond.loaders.default_workers(), persistent=persistent)
