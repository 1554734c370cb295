"""The ground floor every other module stands on: the error bad input raises (and its message as
one line), writing files and folders whole through a temporary name, leaving none empty, and
reading files of tensors."""
import contextlib
import errno
import os
import shutil

import torch


class UserError(Exception):
    """Bad input: the message names the problem and the fix, and is shown as one line."""


@contextlib.contextmanager
def whole(path):
    """The temporary name to write path under (a file or a folder): renamed to path when the
    block ends, removed if it fails. A crash or a full disk never leaves half a file, and the
    last whole one stays."""
    part = path + ".part"
    remove(part)  # what an interrupted run left
    try:
        yield part
        os.replace(part, path)
    except BaseException:
        remove(part)
        raise


def remove(path):
    """Remove a file or a folder, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.remove(path)


def write_whole(path, content):
    """Write bytes to path (through `whole`); a failed write is one UserError naming the path."""
    try:
        with whole(path) as part, open(part, "wb") as f:
            f.write(content)
    except OSError as e:
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


def remove_empty_folders(folder):
    """Remove folder and the folders in it where nothing was written."""
    for root, _, _ in reversed(list(os.walk(folder))):  # the deepest first
        with contextlib.suppress(OSError):  # not empty
            os.rmdir(root)


def missing_folders(path):
    """path and those of its parents that do not exist yet, the deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def what_to_do(error):
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space there, or write to another folder"
    return "choose a folder you can write to"


def load_file(path, what, fix, name=None, into=None):
    """torch.load of a file of tensors (weights, a checkpoint) onto the CPU, or, given a net
    `into`, that net with the weights loaded. A file that is missing, or is not `what`, is one
    UserError naming it (as name) and the fix."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if into is None:
            return loaded
        into.load_state_dict(loaded)
        return into
    except FileNotFoundError:
        raise UserError(f"{name or path} does not exist; {fix}") from None
    except Exception as e:  # unpickling or an empty file: not what was asked for either way
        raise UserError(f"{name or path} is not {what} ({first_line(e)}); {fix}") from None


def first_line(error):
    """An exception's message as one line; its type's name where the message is empty."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
