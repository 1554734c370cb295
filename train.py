"""Training and evaluation: D2L §14.2's `train_fine_tuning`, with §14.1's `train_ch13` loop.

The book's recipe comes first and reads top to bottom. What the book leaves out comes after it:
where and how the arithmetic runs, several processes, the progress line and resuming. Each is a
wrapper around the recipe's objects or a one-line helper, and does nothing where it does not
apply (one process, fp32, a fresh run).
"""
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from data import UserError, normalize, rank, world_size, write_whole


# ================================================================ the book's recipe
def train_fine_tuning(net, learning_rate, train_iter, test_iter, num_epochs=5, param_group=True,
                      runtime=None, resume=None):
    """§14.2.2: with param_group, the new output layer learns at 10x the base learning rate.

    A generator: yields an `Epoch` after each epoch, so the caller prints and saves between them.
    """
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
    yield from train_ch13(net, train_iter, test_iter, loss, optimizer, num_epochs,
                          runtime or make_runtime(), resume)


@dataclass
class Epoch:
    """What training yields after each epoch."""
    metrics: dict          # epoch, loss, train_acc, examples, first_batch_sec, test_acc, examples_per_sec
    probs: torch.Tensor    # the test set's class probabilities, in dataset order
    labels: torch.Tensor
    state: dict            # what a checkpoint needs to continue: model, optimizer, scaler


def train_ch13(net, train_iter, test_iter, loss, optimizer, num_epochs, runtime, resume=None):
    """§14.1: each epoch, one pass over the training data, then the accuracy on the test data."""
    net = runtime.place(net)
    model = distributed(net, runtime.device)  # `net` itself on one process
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
        X, y = runtime.input(X), y.to(runtime.device, non_blocking=True)
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
    """§14.1's `evaluate_accuracy_gpu`, keeping what it counts: the class probabilities and the
    label of every test example, in dataset order."""
    same_buffers(net)
    net.eval()
    probs, labels = [], []
    for X, y in test_iter:
        with runtime.autocast():
            probs.append(torch.softmax(net(runtime.input(X)).float(), 1).cpu())
        labels.append(y)
    return gather_in_order(torch.cat(probs), torch.cat(labels))


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
        raise UserError(f"--device {name}: this machine has no such device; leave --device out "
                        "to use the best one there is")
    return device


@dataclass
class Runtime:
    """The device and its arithmetic. Autocast is off in fp32, and the gradient scaler passes
    everything through unless the autocast type is fp16 (whose small gradients underflow)."""
    device: torch.device
    dtype: torch.dtype | None  # autocast's, None for fp32
    memory_format: torch.memory_format
    scaler: torch.amp.GradScaler

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def place(self, net):
        return net.to(self.device, memory_format=self.memory_format)

    def input(self, X):
        """uint8 images from a loader as the net's input (data.normalize runs here, on the device)."""
        return normalize(X.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)

    def __str__(self):
        return (f"{self.device}, {'fp32' if self.dtype is None else str(self.dtype)[6:] + ' autocast'}"
                + (", channels-last" if self.memory_format == torch.channels_last else ""))


def make_runtime(device=None, precision="amp"):
    """With precision "amp", on CUDA and on the CPU: channels-last memory format (measured faster
    on both), and autocast to the type the device computes fastest without losing accuracy (see
    amp_dtype). With "fp32", and on MPS: the book's arithmetic."""
    device = device or try_device()
    amp = precision == "amp" and device.type in ("cuda", "cpu")
    dtype = amp_dtype(device) if amp else None
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    # GradScaler's first scale, 2**16, is made for a mean loss; the book's loss is summed over a
    # batch of 128, so its gradients are 128x larger and fp16 would overflow for the first steps
    # (the scaler skips those, and then adapts to any batch size).
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 / 128, enabled=dtype == torch.float16)
    return Runtime(device, dtype, torch.channels_last if amp else torch.contiguous_format, scaler)


def amp_dtype(device):
    """bf16 where the device has it natively: CUDA GPUs from Ampere on, CPUs with AMX or
    AVX512-BF16 (PyTorch's own check). fp16, with its gradient scaler, on older GPUs. None (fp32)
    on other CPUs, where bf16 is emulated and runs at half the speed of fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    cpu = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}  # older torch: fp32
    return torch.bfloat16 if cpu.get("amx_bf16") or cpu.get("avx512_bf16") else None


class Progress:
    """A loader's batches, with a progress line on a terminal, and the seconds until the first
    batch arrived (the loader's start-up). The book redraws every num_batches // 5 batches, which
    is zero with fewer than five; this redraws every half second."""

    def __init__(self, loader, metric):
        self.loader, self.metric = loader, metric  # metric: loss sum, correct, examples so far
        self.show = sys.stderr.isatty() and rank() == 0 and hasattr(loader, "__len__")  # not an islice
        self.first_batch_sec = 0.0

    def __iter__(self):
        start = shown = time.perf_counter()
        for i, batch in enumerate(self.loader):
            if i == 0:
                self.first_batch_sec = time.perf_counter() - start
            yield batch
            if self.show and time.perf_counter() - shown > 0.5:
                shown, (loss_sum, _, n) = time.perf_counter(), self.metric.tolist()
                print(f"\r  batch {i + 1}/{len(self.loader)}  loss {loss_sum / n:.3f}  "
                      f"{n * world_size() / (shown - start):.1f} examples/sec",
                      end="", file=sys.stderr, flush=True)
        if self.show:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


# ================================================================ several processes
def distributed(net, device):
    """DistributedDataParallel over the processes, or `net` itself on one process."""
    if world_size() == 1:
        return net
    model = nn.parallel.DistributedDataParallel(net, [device] if device.type == "cuda" else None)
    model.register_comm_hook(None, allreduce_sum)
    return model


def allreduce_sum(process_group, bucket):
    """DDP's own hook averages the gradients over processes: sum them instead, so the gradient
    is the book's, of the loss summed over the global batch, and its learning rates hold."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


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
    """Process r evaluated examples r, r + world, r + 2 world, ...: put them back in order."""
    if world_size() == 1:
        return probs, labels
    parts = [None] * world_size()
    dist.all_gather_object(parts, (probs, labels))
    n = sum(len(part_labels) for _, part_labels in parts)
    probs, labels = torch.empty(n, probs.shape[1]), torch.empty(n, dtype=labels.dtype)
    for r, (part_probs, part_labels) in enumerate(parts):
        probs[r::world_size()], labels[r::world_size()] = part_probs, part_labels
    return probs, labels


# ================================================================ resuming
def rng_states():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore(resume, optimizer, scaler):
    """Continue a loaded checkpoint (the caller has loaded the weights): returns the number of
    epochs it had finished, 0 for a fresh run."""
    if not resume:
        return 0
    optimizer.load_state_dict(resume["optimizer"])
    if resume["scaler"] and scaler.is_enabled():  # empty when written without fp16
        scaler.load_state_dict(resume["scaler"])
    torch.set_rng_state(resume["rng"]["torch"])
    random.setstate(resume["rng"]["python"])
    if resume["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
    return len(resume["history"])


def save_checkpoint(path, epoch, history, meta):
    """Through a temporary name: a crash or a full disk never leaves half a checkpoint."""
    state = {**epoch.state, "history": history, "rng": rng_states(), **meta}
    write_whole(path, lambda f: torch.save(state, f))
