"""Files written whole through a temporary name (checkpoints, strict JSON, pictures), the run's
folder tried and locked, and files of tensors read back, each failure one UserError."""
import contextlib
import errno
import io
import math
import os
import shutil
import tempfile

try:
    import fcntl  # file locks, on Linux and macOS
except ImportError:
    fcntl = None

import torch

from beyond import UserError
from beyond.processes import rank


@contextlib.contextmanager
def whole(path):
    """The temporary name to write path under (a file or a folder): renamed to path when the
    block ends, removed if it fails, so the last whole file stays."""
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


def saved(obj):
    """obj as torch.save writes it, in memory: a failure to write is then the file's."""
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
    """path, created if need be, once a probe file has been written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"cannot write in the folder {path} ({e.strerror or e}); "
                        f"{what_to_do(e)}") from None
    return path


@contextlib.contextmanager
def made_folder(folder):
    """folder, created and tried for the block; the folders made for it are removed again
    where nothing was written in them (a run that wrote nothing, a failed download)."""
    made, path = None, os.path.abspath(folder)
    while not os.path.exists(path):  # the outermost folder that will be made
        made, path = path, os.path.dirname(path)
    try:
        yield writable_folder(folder)
    finally:
        for root, _, _ in reversed(list(os.walk(made)) if made else []):  # the deepest first
            with contextlib.suppress(OSError):  # not empty
                os.rmdir(root)


@contextlib.contextmanager
def writing_to(folder):
    """The run's folder while it writes there: tried before any data is read, locked against a
    second run, and removed if nothing was written. Process 0 writes; others do nothing."""
    if rank() > 0:
        yield folder
        return
    with made_folder(folder), open(os.path.join(folder, ".lock"), "w") as lock:
        if fcntl:  # Linux and macOS
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
    return "choose a folder you can write to"


def load_file(path, what, fix, name=None, into=None):
    """torch.load of weights or a checkpoint onto the CPU, or, given a net `into`, that net with
    them loaded; a file missing or not `what` is one UserError naming it and the fix."""
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
    """An exception's message as one line; its type's name where the message is empty."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def inside(path, folder):
    """Whether path (a file or a folder) lies in folder, links followed; folder itself counts."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder
