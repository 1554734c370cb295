"""Several processes: which one this is, printing once, joining torchrun's process group, and the
book's training spread over processes with DistributedDataParallel. On one process every helper
here is a plain return, so the recipe calls them without an `if`."""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from utils import UserError


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
        print(*args, file=file or sys.stdout, flush=True)


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
