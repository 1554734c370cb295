"""Training and evaluation: D2L §14.2's `train_fine_tuning`, with §14.1's `train_ch13` loop.

The book's recipe comes first and reads top to bottom; `train_fine_tuning` and `train_ch13` take
the book's arguments, train, and return the history, from Python or a notebook as in the book.
The command line drives the same loop one epoch at a time (`fine_tuning_epochs`), printing and
saving between epochs. What the book leaves out comes after the recipe: where and how the
arithmetic runs, several processes, what a run shows, and resuming. Each is a wrapper around the
recipe's objects or a one-line helper, and does nothing where it does not apply (one device,
fp32, a fresh run).
"""
import io
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import data
import plots
from data import MEAN, STD, UserError, normalize, rank, world_size, write_whole


# ================================================================ the book's recipe
def train_fine_tuning(net, learning_rate, batch_size=128, num_epochs=5, param_group=True, *,
                      data_dir=None, devices=None, precision="amp"):
    """§14.2.2.3, called as the book calls it: trains on data_dir's train/ and test/ folders
    (default: the hot-dog set, downloaded on first use) on all GPUs (else MPS, else the CPU),
    and returns the history, one dict of metrics per epoch."""
    runtime = make_runtime(devices, precision)
    train_iter, test_iter = data.load_data(batch_size, data_dir)
    epochs = fine_tuning_epochs(net, learning_rate, train_iter, test_iter, num_epochs, param_group, runtime)
    return train_and_show(epochs, runtime)


def fine_tuning_epochs(net, learning_rate, train_iter, test_iter, num_epochs=5, param_group=True,
                       runtime=None, resume=None):
    """The recipe one epoch at a time: yields an `Epoch` after each. With param_group, the new
    output layer learns at 10x the base learning rate."""
    # The book sums the loss over the batch, and its learning rates (5e-5, 5e-4) assume that
    # sum: with the mean they would be 128x too small.
    loss = nn.CrossEntropyLoss(reduction="none")
    if param_group:
        params_1x = [param for name, param in net.named_parameters()
                     if name not in ["fc.weight", "fc.bias"]]
        optimizer = torch.optim.SGD([{'params': params_1x},
                                     {'params': net.fc.parameters(),
                                      'lr': learning_rate * 10}],
                                    lr=learning_rate, weight_decay=0.001)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=learning_rate,
                                    weight_decay=0.001)
    yield from ch13_epochs(net, train_iter, test_iter, loss, optimizer, num_epochs,
                           runtime or make_runtime(), resume)


def train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices=None, *, precision="amp"):
    """§14.1, called as the book calls it (the name is from the book's first edition, where
    computer vision was chapter 13): returns the history, one dict of metrics per epoch."""
    runtime = make_runtime(devices, precision)
    return train_and_show(ch13_epochs(net, train_iter, test_iter, loss, trainer, num_epochs, runtime), runtime)


@dataclass
class Epoch:
    """What training yields after each epoch."""
    metrics: dict          # epoch, loss, train_acc, examples, first_batch_sec, test_acc, examples_per_sec
    probs: torch.Tensor    # the test set's class probabilities, in dataset order
    labels: torch.Tensor
    state: dict            # what a checkpoint needs to continue: model, optimizer, scaler; the
                           # tensors are the net's own, so save them before the next epoch


def ch13_epochs(net, train_iter, test_iter, loss, optimizer, num_epochs, runtime, resume=None):
    """§14.1's loop: each epoch, one pass over the training data, then the accuracy on the test
    data; yields an `Epoch` after each."""
    net = runtime.place(net)  # in place: the optimizer's parameters are still the net's
    model = parallel(net, runtime.devices)  # `net` itself on one device
    first_epoch = restore(resume, optimizer, runtime.scaler)  # 0 for a fresh run
    for epoch in range(first_epoch, num_epochs):
        reshuffle(train_iter, epoch)
        start = time.perf_counter()
        train_metrics = train_epoch(model, train_iter, loss, optimizer, runtime)
        seconds = time.perf_counter() - start  # data loading included, unlike the book's timer
        probs, labels = evaluate(net, test_iter, runtime)
        metrics = dict(epoch=epoch + 1, **train_metrics, test_acc=accuracy(probs, labels),
                       examples_per_sec=train_metrics["examples"] / seconds)
        yield Epoch(metrics, probs, labels, dict(model=net.state_dict(), optimizer=optimizer.state_dict(),
                                                 scaler=runtime.scaler.state_dict()))


def train_epoch(net, train_iter, loss, optimizer, runtime):
    """One pass over the data, §14.1's `train_batch_ch13` for each batch. Returns the mean loss,
    the accuracy and the number of examples (over all processes), and the seconds until the
    first batch arrived."""
    net.train()
    metric = torch.zeros(3, device=runtime.device)  # loss sum, correct, examples; kept on the device
    batches = Progress(train_iter, metric)
    for X, y in batches:
        X, y = runtime.input(X), runtime.target(y)
        with runtime.autocast():
            pred = net(X)
            losses = loss(pred, y)
        optimizer.zero_grad()
        runtime.scaler.scale(losses.sum()).backward()
        runtime.scaler.step(optimizer)
        runtime.scaler.update()
        metric[0] += losses.detach().sum()
        metric[1] += (pred.argmax(1) == y).sum()
        metric[2] += y.numel()
    loss_sum, correct, n = all_reduce_sum(metric).tolist()
    return dict(loss=loss_sum / n, train_acc=correct / n, examples=n, first_batch_sec=batches.first_batch_sec)


@torch.no_grad()
def evaluate(net, test_iter, runtime):
    """The book's `evaluate_accuracy_gpu` (§7.6), keeping what it counts: the class probabilities and the
    label of every test example, in dataset order."""
    same_buffers(net)
    net.eval()
    probs, labels = [], []
    for X, y in test_iter:
        with runtime.autocast():
            probs.append(torch.softmax(net(runtime.input(X)).float(), 1).cpu())
        labels.append(y)
    return gather_in_order(probs, labels)


def accuracy(probs, labels):
    return (probs.argmax(1) == labels).float().mean().item()


# ================================================================ where and how it runs
def try_device(name=None):
    """The device to train on: the one named, else CUDA, else MPS, else the CPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)  # raises for a name torch does not know, such as "gpu"
        missing = (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
                   or device.type == "mps" and not torch.backends.mps.is_available())
    except RuntimeError:
        missing = True
    if missing:
        raise UserError(f"device={name}: this machine has no such device; give no device= "
                        "to use the best one there is")
    return device


def try_all_gpus():
    """Every GPU of the machine, as the book's try_all_gpus; where there is none, the best other
    device (MPS, else the CPU), not the book's empty list, on which its train_ch13 fails."""
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [try_device()]


@dataclass
class Runtime:
    """The devices and their arithmetic. Autocast is off in fp32, and the gradient scaler passes
    everything through unless the autocast type is fp16 (whose small gradients underflow)."""
    devices: list  # the first holds the net and the batches; several GPUs share each batch
    dtype: torch.dtype | None  # autocast's, None for fp32
    memory_format: torch.memory_format
    scaler: torch.amp.GradScaler
    mean: torch.Tensor  # ImageNet's, on the device once: from a list, each batch would copy it
    std: torch.Tensor   # there and wait for the copy (a host sync per batch on CUDA)

    @property
    def device(self):
        return self.devices[0]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def place(self, net):
        return net.to(self.device, memory_format=self.memory_format)

    def input(self, X):
        """A loader's batch as the net's input. This project's loaders yield uint8 images, which
        become the book's ToTensor + Normalize here, on the device (data.normalize); a batch of
        floats (the book's own loaders) has had them already and passes through untouched."""
        X = X.to(self.device, non_blocking=self.device.type == "cuda")  # pinned memory only there
        X = X if X.is_floating_point() else normalize(X, self.mean, self.std)
        return X.contiguous(memory_format=self.memory_format)

    def target(self, y):
        return y.to(self.device, non_blocking=self.device.type == "cuda")

    def __str__(self):
        return (f"{self.device}" + (f" and {len(self.devices) - 1} more" if len(self.devices) > 1 else "")
                + f", {'fp32' if self.dtype is None else str(self.dtype)[6:] + ' autocast'}"
                + (", channels-last" if self.memory_format == torch.channels_last else ""))


def make_runtime(devices=None, precision="amp"):
    """The runtime for a device or a list of them (default: all GPUs, else the best device).
    With precision "amp", on CUDA and on the CPU: channels-last memory format (measured faster
    on the CPU; the usual advice for GPUs with tensor cores), and autocast to the type the
    device computes fastest without losing accuracy (see amp_dtype). With "fp32", and on MPS:
    the book's arithmetic."""
    names = [devices] if isinstance(devices, (str, torch.device)) else devices
    devices = [try_device(str(name)) for name in names] if names else try_all_gpus()
    amp = precision == "amp" and devices[0].type in ("cuda", "cpu")
    # fp32 is the book's arithmetic: no TF32 (10 bits of mantissa, not 23), which cuDNN uses for
    # convolutions by default on Ampere and later GPUs (matrix products are fp32 by default)
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    dtype = amp_dtype(devices[0]) if amp else None
    if len(devices) > 1 and dtype:  # nn.DataParallel's threads autocast to fp16, whatever was asked
        dtype = torch.float16
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    # GradScaler's first scale, 2**16, is made for a mean loss; the book's loss is summed over a
    # batch of 128, so its gradients are 128x larger and fp16 would overflow for the first steps
    # (the scaler skips those, and then adapts to any batch size).
    scaler = torch.amp.GradScaler(devices[0].type, init_scale=2.0**16 / 128, enabled=dtype == torch.float16)
    mean, std = (torch.tensor(stats, device=devices[0]).view(-1, 1, 1) for stats in (MEAN, STD))
    return Runtime(list(devices), dtype, torch.channels_last if amp else torch.contiguous_format, scaler, mean, std)


def amp_dtype(device):
    """bf16 where the device has it natively: CUDA GPUs from Ampere on, CPUs with AMX or
    AVX512-BF16 (PyTorch's own check). fp16, with its gradient scaler, on older GPUs. None (fp32)
    on other CPUs, where bf16 is emulated and runs at half the speed of fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    cpu = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}  # older torch: fp32
    return torch.bfloat16 if cpu.get("amx_bf16") or cpu.get("avx512_bf16") else None


# ================================================================ what a run shows
def train_and_show(epochs, runtime):
    """Train, showing it as the book's train_ch13 does: a line per epoch, the curves redrawn in
    place in a notebook (the book's Animator), and the book's summary. Returns the history."""
    history, animate = [], plots.animator()
    for epoch in epochs:
        history.append(epoch.metrics)
        say(epoch_line(epoch.metrics))
        animate(history)
    if history:
        say(summary_line(history[-1]))
        say(f"{sum(m['examples_per_sec'] for m in history) / len(history):.1f} examples/sec on {runtime}")
    return history


def say(*args):
    """print, on process 0 only."""
    if rank() == 0:
        print(*args, flush=True)


def epoch_line(m):
    return (f"  epoch {m['epoch']}: loss {m['loss']:.3f}, train acc {m['train_acc']:.3f}, "
            f"test acc {m['test_acc']:.3f}, {m['examples_per_sec']:.1f} examples/sec"
            + (f" (start-up: first batch after {m['first_batch_sec']:.1f} s)" if m["epoch"] == 1 else ""))


def summary_line(m):
    """The book's closing line."""
    return f"loss {m['loss']:.3f}, train acc {m['train_acc']:.3f}, test acc {m['test_acc']:.3f}"


class Progress:
    """A loader's batches, with a live progress line on a terminal or in a notebook, and the
    seconds until the first batch arrived (the loader's start-up). The book redraws every
    num_batches // 5 batches, which is zero with fewer than five; this redraws every half second."""

    def __init__(self, loader, metric):
        self.loader, self.metric = loader, metric  # metric: loss sum, correct, examples so far
        self.show = live_text() if rank() == 0 and hasattr(loader, "__len__") else None  # not an islice
        self.first_batch_sec = 0.0

    def __iter__(self):
        start = shown = time.perf_counter()
        for i, batch in enumerate(self.loader):
            if i == 0:
                self.first_batch_sec = time.perf_counter() - start
            yield batch
            if self.show and (time.perf_counter() - shown > 0.5 or i + 1 == len(self.loader)):
                shown, (loss_sum, _, n) = time.perf_counter(), self.metric.tolist()
                self.show(f"  batch {i + 1}/{len(self.loader)}  loss {loss_sum / n:.3f}  "
                          f"{n * world_size() / (shown - start):.1f} examples/sec")
        if self.show:
            self.show("")


def live_text():
    """show(text), which redraws one line in place: with \\r on a terminal, where show("") clears
    it; as an output updated in place in a notebook, where the last line stays. Elsewhere (a log
    file) nothing: the epoch lines say enough."""
    notebook = plots.notebook()
    if notebook:
        handle = notebook.display(notebook.Pretty(""), display_id=True)

        def show(text):
            if text:  # "" would clear the line: a notebook keeps each epoch's last one
                handle.update(notebook.Pretty(text))
        return show
    if sys.stderr.isatty():
        return lambda text: print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
    return None


# ================================================================ several processes
def join_processes(device):
    """Under torchrun (or the command line's all-GPUs launcher), join the process group, one
    GPU each; the device this process trains on, made the current one before anything else
    touches CUDA (the bf16 check and memory figures read the current GPU)."""
    several = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if several and device.type == "mps":
        raise UserError("several processes on a Mac: gloo cannot carry MPS tensors; run one process "
                        "(python finetune.py), or give device=cpu to each")
    if several and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.index >= torch.cuda.device_count():
            raise UserError(f"process {device.index} of this machine has no GPU of its own: it has "
                            f"{torch.cuda.device_count()}; start as many processes, or fewer")
    if device.type == "cuda" and device.index is not None:  # "cuda" alone: the current one
        torch.cuda.set_device(device)
    if several:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=attempt_store(),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return device


def attempt_store():
    """The processes' meeting point, its keys apart for each restart: torchrun's store outlives
    the processes it restarts, and a restarted process reading the last attempt's addresses
    would connect to a process that is gone (pytorch/pytorch#135712)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0  # else torchrun hosts it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=host)
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
    """A new shuffle each epoch under DistributedSampler (the plain loader reshuffles itself)."""
    if hasattr(train_iter.sampler, "set_epoch"):
        train_iter.sampler.set_epoch(epoch)


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


# ================================================================ resuming
def rng_states():
    """Every process's random-number state (each draws its own augmentations). Not the GPUs':
    nothing in training draws from them, and a machine with fewer GPUs could not take them back."""
    return gathered({"torch": torch.get_rng_state(), "python": random.getstate()})


def restore(resume, optimizer, scaler):
    """Continue a loaded checkpoint (the caller has loaded the weights): returns the number of
    epochs it had finished, 0 for a fresh run. The random-number states come back where the
    processes are as many as they were (otherwise each keeps its fresh seed)."""
    if not resume:
        return 0
    optimizer.load_state_dict(resume["optimizer"])
    if resume["scaler"] and scaler.is_enabled():  # empty when written without fp16
        scaler.load_state_dict(resume["scaler"])
    states = resume["rng"] if isinstance(resume["rng"], list) else [resume["rng"]]  # older: one dict
    if len(states) == world_size():
        torch.set_rng_state(states[rank()]["torch"])
        random.setstate(states[rank()]["python"])
    return len(resume["history"])


def save_checkpoint(path, epoch, history, meta):
    """On every process (each adds its random-number state), and written by process 0, through
    a temporary name: a crash or a full disk never leaves half a checkpoint. It is made in
    memory first, so that any failure to write is the file's OSError, not torch.save's."""
    rng = rng_states()
    if rank() == 0:
        buffer = io.BytesIO()
        torch.save({**epoch.state, "history": history, "rng": rng, **meta}, buffer)
        write_whole(path, buffer.getvalue())


def load_checkpoint(path):
    """A model.pt that training wrote: the weights, the classes, the test transforms' settings,
    and what resuming needs."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; give the model.pt of a training run") from None
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint of this program ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "history" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this program; give the model.pt of a training run")
    return ckpt
