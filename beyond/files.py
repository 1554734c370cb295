"""Files written whole through a temporary name, the run's folder tried and locked, and tensors
read back; each failure is one UserError."""
import contextlib
import errno
import io
import math
import os
import shutil
import tempfile

try:
    import fcntl
except ImportError:
    fcntl = None

import torch

from beyond import UserError
from beyond.processes import rank


@contextlib.contextmanager
def whole(path):
    """A temporary name for path, renamed to path when the block ends: the last whole file stays."""
    part = os.fspath(path) + ".part"  # a pathlib.Path too
    remove(part)  # what an interrupted run left
    try:
        yield part
        os.replace(part, path)
    except BaseException:
        remove(part)
        raise


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.remove(path)


def write_whole(path, content):
    try:
        with whole(path) as part, open(part, "wb") as f:
            f.write(content)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); {what_to_do(e)}") from None


def saved(obj):
    """torch.save into memory, so that a failure to write is only ever the file's."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def finite(value):
    """value (dicts and lists of figures) with NaN and infinity as None, for strict JSON."""
    if isinstance(value, dict):
        return {key: finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def writable_folder(path):
    """path, created if need be, once a probe file could be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"cannot write in the folder {path} ({e.strerror or e}); "
                        f"{what_to_do(e)}") from None
    return path


def writable_file(path):
    """path, where it could be written whole: its folder written in, and no folder in its way."""
    writable_folder(os.path.dirname(path) or ".")
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: a folder stands where the file would be; move it "
                        "away")
    return path


@contextlib.contextmanager
def made_folder(folder):
    """folder, created for the block; the folders made are removed again if left empty."""
    made, path = None, os.path.abspath(folder)
    while not os.path.exists(path):  # the outermost folder that will be made
        made, path = path, os.path.dirname(path)
    try:
        yield writable_folder(folder)
    finally:
        for root, _, _ in os.walk(made, topdown=False) if made else []:  # the deepest first
            with contextlib.suppress(OSError):  # not empty
                os.rmdir(root)


@contextlib.contextmanager
def writing_to(folder):
    """The run's folder, locked against a second run and removed if left empty (process 0 only)."""
    if rank() > 0:
        yield folder
        return
    with made_folder(folder), open(os.path.join(folder, ".lock"), "w") as lock:
        if fcntl:  # not on Windows
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # the lock is the other run's: leave it
                raise UserError(f"another run is writing to {folder}; wait for it to end, "
                                "or choose another out=") from None
        try:
            yield folder
        finally:
            os.remove(lock.name)  # still held, so no other run takes the folder meanwhile


def what_to_do(error):
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space there, or write to another folder"
    if error.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file stands where a folder would be; choose another folder"
    if error.errno == errno.EISDIR:
        return "a folder stands where the file would be; move it away"
    return "choose a folder you can write to"


def load_file(path, what, fix, name=None, into=None):
    """torch.load onto the CPU, or into the net `into`; a bad file is one UserError with `fix`."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{name or path} does not exist; {fix}") from None
    except Exception:  # empty, cut short, text, a pickle of other objects
        raise UserError(f"{name or path} is not {what}; {fix}") from None
    if into is None:
        return loaded
    try:
        into.load_state_dict(loaded)
    except RuntimeError as e:  # weights, but of another net: which keys or shapes differ
        raise UserError(f"{name or path} is not {what} ({first_line(e)}); {fix}") from None
    return into


def first_line(error):
    """An exception's message's first line (one that ends in a colon with the next, such as
    load_state_dict's), at most 160 characters, or its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = lines or [type(error).__name__]
    line = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return line if len(line) <= 160 else line[:157] + "..."


def inside(path, folder):
    """Whether path lies in folder (or is it), links followed."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder
