"""A data folder's sets: its layout, a split of class folders, and checks on a continued run's."""
import copy
import os
import re

import torch

from beyond import UserError
from beyond.files import inside
from beyond.photos import ImageFolder, ignored, nfc, split_classes


VAL = ["val", "valid", "validation"]


SPLITS = ("train", "test", *VAL)


def layout(data_dir, out=None):
    """"splits" (train/ beside test/ or val/, as the book's) or "classes" (class folders alone)."""
    names = subfolders(data_dir)
    splits = [name for name in names if name.lower() in SPLITS]
    classes = [name for name in names if name.lower() not in SPLITS]
    for folder in [os.path.join(data_dir, name) for name in splits] or [data_dir]:
        if out and inside(out, folder):
            raise UserError(f"out={out} lies in {folder}, whose folders are read as classes of "
                            "images, and what a run writes there would be too; choose an out= "
                            "outside it")
    if not classes or "train" in map(str.lower, splits) and len(splits) > 1:
        return "splits"
    if splits:  # train/ alone (or test/) beside class folders: which is meant?
        raise UserError(f"{data_dir} holds both {sorted(splits)} and class folders "
                        f"{sorted(classes)[:3]}; keep one layout: train/<class>/ and "
                        "test/<class>/, or <class>/ alone, to be split")
    return "classes"


def subfolders(data_dir):
    """data_dir's folders, links to one too (os.path.isdir: False for a link that loops)."""
    entries = os.scandir(data_dir) if os.path.isdir(data_dir) else []
    return [e.name for e in entries if os.path.isdir(e) and not ignored(e.name)]


def book_folders(data_dir):
    """data_dir's train/ and test/ (or val/) ImageFolders; with both, test/ comes third."""
    splits = [split_folder(data_dir, ["train"]), split_folder(data_dir, ["test", *VAL])]
    found = subfolders(data_dir)
    if os.path.basename(splits[1]).lower() == "test" and set(VAL) & set(map(str.lower, found)):
        splits.insert(1, split_folder(data_dir, VAL))
    classes = [[nfc(name) for name in split_classes(s, data_dir)[0]] for s in splits]
    for split, names in zip(splits, classes):
        if names != classes[0]:
            raise UserError(f"{splits[0]} has classes {classes[0]} but {split} has {names}; "
                            "give both the same class folders")
    folders = [ImageFolder(split, data_dir=data_dir) for split in splits]
    if unused := sorted(set(found) - {os.path.basename(s) for s in splits}):
        folders[1].where += f" ({', '.join(name + '/' for name in unused)} left unused)"
    return folders


def same_data(sets, ckpt):
    """Refuse to continue a run (ckpt: its checkpoint) on other data than it was trained on."""
    classes, path = class_names(sets[0]), ckpt["path"]
    before, now = ckpt.get("final_split"), final_split(sets)
    if classes != ckpt["classes"]:
        raise UserError(f"{path} was trained on classes {ckpt['classes']}, not {classes}; "
                        "continue it with a data folder of those classes")
    split = ckpt.get("held_out") is not None
    if split != (getattr(sets[1], "held_out", None) is not None):
        was, holds = (("images held out of class folders alone", "train/ and test/") if split
                      else ("a test folder", "class folders alone, to split"))
        raise UserError(f"{path} was tested on {was}, and the data folder now holds {holds}; "
                        "continue it with the data folder it was trained on")
    if now and not before:
        raise UserError(f"{path} was trained with no val/ beside {now}, and "
                        f"{os.path.dirname(sets[1].root)} now holds "
                        f"{os.path.basename(sets[1].root)}/, which would choose the epochs in "
                        f"{now}'s place; move it out of the data folder to continue the run, or "
                        "train a new one in another out=")
    if before and not now:
        raise UserError(f"{path} chose its epochs on val/ and kept {before} for a final test, but "
                        "the data folder no longer holds both; put them back to continue the "
                        "run, or train a new one in another out=")
    same_test_images(sets[1], ckpt)


def same_test_images(test_set, ckpt):
    """Refuse a test set of other images than the run tested its epochs on (older runs: unsaid)."""
    before, now = ckpt.get("tested"), tested(test_set)
    if before is None or before == now:
        return
    changes = [f"{len(names)} {what}, the first {names[0]}" for names, what in (
        (sorted(set(before) - set(now)), "gone or unreadable now"),
        (sorted(set(now) - set(before)), "new or readable only now")) if names]
    raise UserError(f"{ckpt['path']} tested its epochs on {len(before)} images in {test_set.root}, "
                    f"and it now holds {len(now)} ({'; '.join(changes)}), so its epochs would be "
                    "compared on other images; put back those gone and move out those new, or "
                    "train anew in another out=")


def tested(test_set):
    """The images a set tests on, relative to its folder; none for CIFAR-10's and dummy data."""
    samples = getattr(test_set, "samples", [])
    return sorted(os.path.relpath(path, test_set.root) for path, _ in samples)


def final_split(sets):
    """The final test's folder ("test/"), where the sets hold one beside val/ (book_folders)."""
    return os.path.basename(os.path.normpath(sets[2].root)) + "/" if len(sets) > 2 else None


def split_folder(data_dir, names):
    """The first of names (any case) that is a folder in data_dir."""
    if not isinstance(data_dir, (str, os.PathLike)) or not os.path.isdir(data_dir):
        raise UserError(f"data_dir={data_dir or repr(data_dir)} is not a folder; give the folder "
                        "that holds your data")
    found = {e.name.lower(): e.path for e in os.scandir(data_dir) if os.path.isdir(e)}
    if paths := [found[name] for name in names if name in found]:
        return paths[0]
    raise UserError(f"{os.path.join(data_dir, names[0])} is not a folder; the data folder needs "
                    "train/ and test/ (or val/), each with one subfolder of images per class, "
                    "or only the class folders, which beyond.runs.train_runs and the command "
                    "line split")


def split_by_class(data_dir, val_split, seed, held_out=None):
    """Class folders as train and test ImageFolders: val_split of each class held out."""
    train_set = ImageFolder(data_dir)
    paths = [os.path.relpath(path, data_dir) for path, _ in train_set.samples]
    held = (set(held_out) if held_out is not None
            else {paths[i] for i in hold_out(train_set, val_split, seed)})
    missing = sorted(held - set(paths))  # renamed, moved or unreadable: it would change the test
    if missing:
        raise UserError(f"{len(missing)} of the {len(held)} images the run held out for testing "
                        f"(held_out.txt) cannot be found in {data_dir} or read, the first "
                        f"{missing[0]}; put them back as they were, or train anew in "
                        "another out=")
    targets = {train_set.targets[i] for i, path in enumerate(paths) if path in held}
    if new := [name for i, name in enumerate(train_set.classes) if i not in targets]:
        raise UserError(f"{os.path.join(data_dir, new[0])}: the run held out none of its images "
                        "(held_out.txt), as it would of a class it was trained on; move that "
                        "folder out to continue the run, or train anew in another out=")
    test_set = copy.copy(train_set)
    test_set.held_out = sorted(held)
    test_set.where = f"of {len(paths)} images, split {val_split:g} by class, seed {seed}"
    for folder, held_part in ((train_set, False), (test_set, True)):
        folder.keep([i for i, path in enumerate(paths) if (path in held) == held_part])
    return [train_set, test_set]


def hold_out(folder, val_split, seed):
    """The indices to hold out: val_split of each class, one or more, not all."""
    generator, held = torch.Generator().manual_seed(seed), []
    for target, name in enumerate(folder.classes):
        members = [i for i, t in enumerate(folder.targets) if t == target]
        if len(members) < 2:
            raise UserError(f"{os.path.join(folder.root, name)} holds {len(members)} image; to "
                            "split it for testing, a class needs at least 2")
        count = min(len(members) - 1, max(1, round(val_split * len(members))))
        drawn = torch.randperm(len(members), generator=generator)[:count].tolist()
        held += [members[j] for j in drawn]
    return held


def class_names(dataset):
    """A data set's class names; FakeData (--dummy) has only a number."""
    return getattr(dataset, "classes", None) or [str(i) for i in range(dataset.num_classes)]


def hotdog_class(classes):
    """The index of the class named like hot dog (hotdog, hot_dog, hot-dog, hot dog, or a plural;
    any case), whose output starts from ImageNet's hot-dog row (models.init_hotdog_head)."""
    found = [i for i, name in enumerate(classes)
             if re.fullmatch(r"hot[-_ ]?dogs?", nfc(name).lower())]
    if len(found) != 1:  # none, or two (hotdog and Hot_Dogs): which would start from the row?
        raise UserError(f"{len(found) or 'no'} classes of {classes} are named like hot dog "
                        "(hotdog, hot_dog, hot-dog, hot dog, or a plural); exactly one must be, to "
                        "start from ImageNet's hot-dog row; rename the class folders, or leave "
                        "init_head_from_imagenet= out")
    return found[0]


def same_classes(train_set, test_set):
    """Refuse a test set whose classes are not the training set's, in either Unicode form."""
    if (test_set.classes != train_set.classes
            and list(map(nfc, test_set.classes)) != list(map(nfc, train_set.classes))):
        raise UserError(f"{train_set.root} has classes {train_set.classes} but {test_set.root} "
                        f"has {test_set.classes}; give both the same class folders")
