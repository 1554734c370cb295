"""Several processes, as torchvision's references keep them in utils.py; on one process each
helper is a plain return, so the recipe calls them without an `if`."""
import contextlib
import os
import random

import torch
import torch.distributed as dist
from torch import nn

from beyond import UserError


def rank():
    """The process group's rank, else torchrun's RANK; 0 on its own."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def under_torchrun():
    return "WORLD_SIZE" in os.environ


def job_size():
    """How many processes torchrun started, before they join; 1 alone."""
    return int(os.environ.get("WORLD_SIZE", 1))


def torchrun_start():
    """When torchrun started this job, the same for every restart (from /proc); else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        ticks = int(open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat")
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def local_processes():
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def say(*args, file=None):
    """print, on process 0 only."""
    if rank() == 0:
        print(*args, file=file, flush=True)


def local_first(fn, *a):
    """Run fn on each machine's first process (it downloads), then on the others."""
    first = local_rank() == 0
    if not first:
        dist.barrier()
    result = fn(*a)
    if first and dist.is_initialized():
        dist.barrier()
    return result


def join_processes(device):
    """Under torchrun, join the process group, one GPU each; returns this process's device."""
    several = job_size() > 1
    if several and device.type == "mps":
        raise UserError("several processes on a Mac: gloo cannot carry MPS tensors; run one "
                        "process (python finetune.py), or give device=cpu to each")
    if several and device.type == "cuda":
        device = torch.device("cuda", local_rank())
        if device.index >= torch.cuda.device_count():
            raise UserError(f"process {device.index} of this machine has no GPU of its own: it "
                            f"has {torch.cuda.device_count()}; start as many processes, or fewer")
    if device.type == "cuda" and device.index is not None:  # before anything else touches CUDA
        torch.cuda.set_device(device)
    if several:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=attempt_store(), rank=rank(), world_size=job_size())
    return device


@contextlib.contextmanager
def rng_kept(device):
    """The CPU's, Python's and the GPUs' random states, put back after the block."""
    python = random.getstate()
    gpu = torch.accelerator.current_accelerator()
    # reading CUDA's states would start CUDA, for a run on the CPU
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
    """The processes' meeting point, keyed per restart: torchrun's store outlives them (#135712)."""
    host = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank() == 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), job_size(),
                          is_master=host)
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def parallel(net, devices):
    """DDP over processes, else the book's nn.DataParallel over several GPUs, else net."""
    if not any(param.requires_grad for param in net.parameters()):  # as DDP refuses it
        raise UserError("no parameter of the net requires grad, so nothing would train; freeze "
                        "the copied layers alone (exercise 3): models.freeze_features(net)")
    if world_size() > 1:
        model = nn.parallel.DistributedDataParallel(
            net, devices if devices[0].type == "cuda" else None)
        model.register_comm_hook(None, summed_gradients)
        return model
    return nn.DataParallel(net, devices) if len(devices) > 1 else net


def summed_gradients(process_group, bucket):
    """Sum gradients over processes (DDP's hook averages), as the book's learning rates assume."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def gathered(obj):
    """[obj of process 0, obj of process 1, ...], on every process."""
    if world_size() == 1:
        return [obj]
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj)
    return objs


def from_process_0(obj):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def reshuffle(train_iter, epoch):
    """A new shuffle each epoch under DistributedSampler (a plain loader reshuffles itself)."""
    if hasattr(getattr(train_iter, "sampler", None), "set_epoch"):
        train_iter.sampler.set_epoch(epoch)


def all_reduce_sum(tensor):
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def same_buffers(net):
    """Process 0's BatchNorm statistics everywhere: DDP sends them before each forward only."""
    for buffer in net.buffers() if world_size() > 1 else []:
        dist.broadcast(buffer, 0)


def gather_in_order(probs, labels):
    """The batches' probabilities and labels, joined, and gathered back in dataset order; none at
    all is refused (an empty test_iter, found only after the training epoch before it)."""
    if not labels:  # more processes than test images: this one has none
        probs, labels = [torch.empty(0, 0)], [torch.empty(0, dtype=torch.long)]
    probs, labels = torch.cat(probs), torch.cat(labels)
    if world_size() > 1:
        probs, labels = in_order(gathered((probs, labels)))
    if not len(labels):
        raise UserError("test_iter gives no batches; give it a data set that holds images, in a "
                        "loader that gives them every epoch (a generator: only once)")
    return probs, labels


def in_order(parts):
    """Each process's (probabilities, labels) put back in dataset order: r, r + world, ..."""
    n = sum(len(part_labels) for _, part_labels in parts)
    classes = max(part_probs.shape[1] for part_probs, _ in parts)  # an empty part has 0
    probs, labels = torch.empty(n, classes), torch.empty(n, dtype=parts[0][1].dtype)
    for r, (part_probs, part_labels) in enumerate(parts):
        probs[r::world_size()] = part_probs.reshape(-1, classes)
        labels[r::world_size()] = part_labels
    return probs, labels


def processes_batch(batch_size):
    """How the global batch splits evenly over the processes (a remainder is dropped)."""
    each = batch_size // world_size()
    return f"batch {each} each" + (f", {each * world_size()} in all (not {batch_size})"
                                   if batch_size % world_size() else "")
