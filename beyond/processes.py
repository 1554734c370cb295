"""The ground floor every other module stands on, as torchvision's references keep theirs in
their utils.py: the error bad input raises, files written whole through a temporary name
(checkpoints and strict JSON among them), files of tensors read, and several processes (which
one this is, printing once, torchrun's process group, DDP with the gradient summed over
processes). On one process every helper of the last kind is a plain return, so the recipe
calls them without an `if`."""
import contextlib
import errno
import io
import math
import os
import random
import re
import shutil
import tempfile

try:
    import fcntl  # file locks, on Linux and macOS
except ImportError:
    fcntl = None

import torch
import torch.distributed as dist
from torch import nn


class UserError(Exception):
    """Bad input: the message names the problem and the fix, and is shown as one line."""

    def __init__(self, message=""):
        # A DataLoader raises a worker's error again, with the worker's traceback as the message:
        # its last line holds the worker's message
        if "Original Traceback" in message:
            message = re.sub(r"^[\w.]*UserError: ", "", message.strip().splitlines()[-1])
        super().__init__(message)


@contextlib.contextmanager
def whole(path):
    """The temporary name to write path under (a file or a folder): renamed to path when the
    block ends, removed if it fails. A run that is stopped or fails, or a full disk, never leaves
    half a file, and the last whole one stays."""
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
    """obj as torch.save writes it, in memory: for write_whole, so a failure to write is the file's."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def finite(value):
    """value (dicts and lists of figures) with every float that is not finite (NaN, infinity) as
    None: strict JSON, which json.dumps(..., allow_nan=False) writes, has no words for them."""
    if isinstance(value, dict):
        return {key: finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def writable_folder(path):
    """path, created if need be, once a probe file (a temporary file) has been written in it: a
    folder that cannot be written to is found before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"cannot write in the folder {path} ({e.strerror or e}); {what_to_do(e)}") from None
    return path


@contextlib.contextmanager
def made_folder(folder):
    """folder, created if need be and tried (writable_folder), for the block; after it, the
    folders made for it are removed again where nothing was written in them (a run that wrote
    nothing, a failed download)."""
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
    """The output folder while a run writes to it: tried (a probe written) before any data is
    read, locked against a second run, and removed again, with the folders made for it, if
    nothing was written to it. Process 0 writes; on the others this does nothing."""
    if rank() > 0:
        yield folder
        return
    with made_folder(folder), open(os.path.join(folder, ".lock"), "w") as lock:
        if fcntl:  # Linux and macOS
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # the lock is the other run's: leave it
                raise UserError(f"another run is writing to {folder}; wait for it to end, or choose another out=") from None
        try:
            yield folder
        finally:
            os.remove(lock.name)  # still held, so no other run takes the folder meanwhile


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
    except FileNotFoundError:
        raise UserError(f"{name or path} does not exist; {fix}") from None
    except Exception:  # empty, cut short, text, a pickle of other objects: torch's words would not help
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


# ================================================================ several processes


def rank():
    """This process's rank: the process group's, or before it is joined (and after it is left)
    the one torchrun gave it; 0 on its own."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def under_torchrun():
    """Whether torchrun (or the command line's all-GPUs start) started this process."""
    return "WORLD_SIZE" in os.environ


def job_size():
    """How many processes torchrun started for this job, before they join (WORLD_SIZE); 1 alone."""
    return int(os.environ.get("WORLD_SIZE", 1))


def torchrun_start():
    """When torchrun started this job, the same for every restart of its processes (the time its
    process, this one's parent, started, from Linux's /proc); None when torchrun did not."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        ticks = int(open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def local_rank():
    """This process's rank among those on its machine (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def local_processes():
    """How many processes torchrun started on this machine; they share its cores and memory."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def say(*args, file=None):
    """print, on process 0 only."""
    if rank() == 0:
        print(*args, file=file, flush=True)  # None: sys.stdout, as it is now


def local_first(fn, *a):
    """Run fn on each machine's first process (it downloads), then on the others (they find its
    files). Machines that share a file system would download side by side: give data_dir."""
    first = local_rank() == 0
    if not first:
        dist.barrier()
    result = fn(*a)
    if first and dist.is_initialized():
        dist.barrier()
    return result


def join_processes(device):
    """Under torchrun (or the command line's all-GPUs start), join the process group, one GPU
    each; the device this process trains on, made the current one before anything else touches
    CUDA (the bf16 check and memory figures read the current GPU)."""
    several = job_size() > 1
    if several and device.type == "mps":
        raise UserError("several processes on a Mac: gloo cannot carry MPS tensors; run one process "
                        "(python finetune.py), or give device=cpu to each")
    if several and device.type == "cuda":
        device = torch.device("cuda", local_rank())
        if device.index >= torch.cuda.device_count():
            raise UserError(f"process {device.index} of this machine has no GPU of its own: it has "
                            f"{torch.cuda.device_count()}; start as many processes, or fewer")
    if device.type == "cuda" and device.index is not None:  # "cuda" alone: the current one
        torch.cuda.set_device(device)
    if several:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=attempt_store(),
                                rank=rank(), world_size=job_size())
    return device


@contextlib.contextmanager
def rng_kept(device):
    """The random-number states of the CPU, of Python and of every GPU (CUDA's or MPS), put back
    after the block: a run seeds them all (torch.manual_seed), and the caller's draws go on as
    before. CUDA's are read where the run computes there or CUDA has started: reading them would
    start it, a GPU's memory taken, for a run on the CPU (whose seed CUDA then starts from)."""
    python = random.getstate()
    gpu = torch.accelerator.current_accelerator()  # None, or cuda or mps
    read = gpu and (gpu.type != "cuda" or device.type == "cuda" or torch.cuda.is_initialized())
    try:
        with torch.random.fork_rng(devices=range(torch.accelerator.device_count()) if read else [],
                                   device_type=gpu and gpu.type):
            yield
    finally:
        random.setstate(python)


def leave_processes():
    if dist.is_initialized():
        dist.destroy_process_group()


def attempt_store():
    """The processes' meeting point, its keys apart for each restart: torchrun's store outlives
    the processes it restarts, and a restarted process reading the last attempt's addresses
    would connect to a process that is gone (pytorch/pytorch#135712)."""
    host = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank() == 0  # else torchrun hosts it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), job_size(), is_master=host)
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def parallel(net, devices):
    """The net over several devices: DistributedDataParallel over processes (the command line's
    way), else in one process the book's nn.DataParallel over several GPUs; `net` itself on one."""
    if world_size() > 1:
        model = nn.parallel.DistributedDataParallel(net, devices if devices[0].type == "cuda" else None)
        model.register_comm_hook(None, allreduce_sum)
        return model
    return nn.DataParallel(net, devices) if len(devices) > 1 else net


def allreduce_sum(process_group, bucket):
    """DDP's own hook averages the gradients over processes: sum them instead, so the gradient
    is the book's, of the loss summed over the global batch, and its learning rates hold."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def gathered(obj):
    """[obj of process 0, obj of process 1, ...], on every process; [obj] on one."""
    if world_size() == 1:
        return [obj]
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj)
    return objs


def from_process_0(obj):
    """obj as process 0 has it, on every process (a checkpoint that only process 0 can read)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def reshuffle(train_iter, epoch):
    """A new shuffle each epoch under DistributedSampler (a plain loader reshuffles itself, and
    a list of batches has no sampler)."""
    sampler = getattr(train_iter, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def all_reduce_sum(tensor):
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def same_buffers(net):
    """Give every process process 0's BatchNorm statistics. DDP sends them before each training
    forward, not after the last one, so the processes would evaluate different nets."""
    for buffer in net.buffers() if world_size() > 1 else []:
        dist.broadcast(buffer, 0)


def gather_in_order(probs, labels):
    """The batches' probabilities and labels, each joined into one tensor. Process r evaluated
    examples r, r + world, r + 2 world, ...: put them back in order."""
    if not labels:  # more processes than test images: this one has none
        probs, labels = [torch.empty(0, 0)], [torch.empty(0, dtype=torch.long)]
    probs, labels = torch.cat(probs), torch.cat(labels)
    if world_size() == 1:
        return probs, labels
    parts = gathered((probs, labels))
    n = sum(len(part_labels) for _, part_labels in parts)
    classes = max(part_probs.shape[1] for part_probs, _ in parts)  # an empty part has 0
    probs, labels = torch.empty(n, classes), torch.empty(n, dtype=labels.dtype)
    for r, (part_probs, part_labels) in enumerate(parts):
        probs[r::world_size()], labels[r::world_size()] = part_probs.reshape(-1, classes), part_labels
    return probs, labels


def processes_batch(batch_size):
    """How the global batch splits over the processes: evenly, so a batch that does not divide
    by their number is made smaller (each process must take as many steps as the others)."""
    each = batch_size // world_size()
    return f"batch {each} each" + (f", {each * world_size()} in all (not {batch_size})"
                                   if batch_size % world_size() else "")
