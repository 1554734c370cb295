"""Training and evaluation for D2L §14.2: `train(net, ..., lr, param_group)` and `evaluate`.

One training loop and one evaluation loop serve every mode and device: the CPU, Apple's MPS,
one CUDA GPU, and many processes under torch.distributed (see finetune.py).
"""
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from data import UserError, normalize


def try_device(name=None):
    """The device to train on: the one named, else CUDA, else MPS, else the CPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available() or \
            device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: this machine has no such device; leave --device out "
                        "to use the best one there is")
    return device


def amp_dtype(device, precision="amp"):
    """Mixed precision on CUDA (bf16 where the GPU has it, else fp16); fp32 elsewhere."""
    if precision == "fp32" or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def param_groups(net, lr, param_group=True):
    """With param_group, the new output layer learns at 10x the base lr (§14.2.2)."""
    if not param_group:
        return [p for p in net.parameters() if p.requires_grad]
    params_1x = [p for name, p in net.named_parameters()
                 if name not in ("fc.weight", "fc.bias") and p.requires_grad]
    groups = [{"params": params_1x}, {"params": list(net.fc.parameters()), "lr": lr * 10}]
    return [g for g in groups if g["params"]]  # --freeze leaves the base group empty


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def to_input(X, device):
    """uint8 images from a loader as the net's input on the device (channels-last on CUDA)."""
    X = normalize(X.to(device, non_blocking=True))
    return X.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else X


def train_epoch(net, data_iter, loss, optimizer, device, dtype=None, scaler=None, progress=False):
    """One pass over data_iter; returns the loss sum, correct and examples, summed over
    processes, and the seconds until the first batch arrived."""
    net.train()
    for m in net.modules():  # frozen BatchNorm layers keep their running statistics (--freeze)
        if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
            m.eval()
    metric = torch.zeros(3, device=device)  # kept on the device: no sync per batch
    start = shown = time.perf_counter()
    first_batch = 0.0
    for i, (X, y) in enumerate(data_iter):
        if i == 0:
            first_batch = time.perf_counter() - start  # worker start-up and the first batch
        X, y = to_input(X, device), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            y_hat = net(X)
            losses = loss(y_hat, y)
        optimizer.zero_grad(set_to_none=True)
        # The book sums the loss over the batch, and its lr (5e-5, 5e-4) assume that sum: with the
        # mean they would be 128x too small. DDP averages gradients over processes, so multiply
        # by their number to keep the sum over the global batch.
        scaler.scale(losses.float().sum() * world_size()).backward()
        scaler.step(optimizer)
        scaler.update()
        metric[0] += losses.detach().float().sum()
        metric[1] += (y_hat.argmax(1) == y).sum()
        metric[2] += y.numel()
        if progress and time.perf_counter() - shown > 0.5:
            shown, (loss_sum, _, n) = time.perf_counter(), metric.tolist()
            print(f"\r  batch {i + 1}/{len(data_iter)}  loss {loss_sum / n:.3f}  "
                  f"{n * world_size() / (shown - start):.1f} examples/sec", end="", file=sys.stderr, flush=True)
    if progress:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    if world_size() > 1:
        dist.all_reduce(metric)
    return metric.tolist() + [first_batch]


@torch.no_grad()
def evaluate(net, data_iter, device, dtype=None):
    """Class probabilities and labels of every example, in dataset order (across processes too)."""
    net.eval()
    probs, labels = [], []
    for X, y in data_iter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            probs.append(torch.softmax(net(to_input(X, device)).float(), 1).cpu())
        labels.append(y)
    probs, labels = torch.cat(probs), torch.cat(labels)
    if world_size() > 1:  # process r evaluated examples r, r + world, r + 2 world, ...
        parts = [None] * world_size()
        dist.all_gather_object(parts, (probs, labels))
        n = sum(len(p[1]) for p in parts)
        probs, labels = torch.empty(n, probs.shape[1]), torch.empty(n, dtype=labels.dtype)
        for r, (part_probs, part_labels) in enumerate(parts):
            probs[r::world_size()], labels[r::world_size()] = part_probs, part_labels
    return probs, labels


def rng_states():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, **state):
    """Write through a temporary name, so a crash never leaves half a checkpoint."""
    torch.save(state, path + ".part")
    os.replace(path + ".part", path)


def prepare(net, lr, param_group, device, precision="amp"):
    """The net on the device, the book's optimizer (SGD, weight decay 1e-3), and the precision:
    returns (net, optimizer, autocast dtype or None, gradient scaler)."""
    fmt = torch.channels_last if device.type == "cuda" else torch.preserve_format
    net = net.to(device, memory_format=fmt)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    optimizer = torch.optim.SGD(param_groups(net, lr, param_group), lr=lr, weight_decay=1e-3)
    dtype = amp_dtype(device, precision)
    return net, optimizer, dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def train(net, train_iter, test_iter, lr, param_group=True, num_epochs=5, device=None,
          precision="amp", checkpoint=None, meta=None, resume=None, on_epoch=None, progress=False):
    """Train with the book's recipe (§14.2.2 `train_fine_tuning`, §13.1 `train_ch13`).

    Writes `checkpoint` after every epoch (with `meta` beside the weights), continues from a
    loaded checkpoint given as `resume`, and calls on_epoch(metrics) after each epoch.
    Returns the per-epoch metrics and the last evaluation's (probabilities, labels).
    """
    device = device or try_device()
    net, optimizer, dtype, scaler = prepare(net, lr, param_group, device, precision)
    loss = nn.CrossEntropyLoss(reduction="none")
    history = []
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        if resume["scaler"] and scaler.is_enabled():  # empty when written without fp16
            scaler.load_state_dict(resume["scaler"])
        history = resume["history"]
        set_rng_states(resume["rng"])
    model = net
    if world_size() > 1:
        model = nn.parallel.DistributedDataParallel(net, [device] if device.type == "cuda" else None)
    result = None
    for epoch in range(len(history), num_epochs):
        if hasattr(train_iter.sampler, "set_epoch"):
            train_iter.sampler.set_epoch(epoch)  # a new shuffle each epoch across processes
        start = time.perf_counter()
        loss_sum, correct, n, first_batch = train_epoch(model, train_iter, loss, optimizer, device,
                                                        dtype, scaler, progress)
        seconds = time.perf_counter() - start  # data loading included, unlike the book's timer
        if world_size() > 1:  # DDP hands process 0's BatchNorm statistics to the others before
            for buffer in net.buffers():  # each forward, not after the last one: do it here
                dist.broadcast(buffer, 0)
        result = evaluate(net, test_iter, device, dtype)
        history.append({"epoch": epoch + 1, "loss": loss_sum / n, "train_acc": correct / n,
                        "test_acc": (result[0].argmax(1) == result[1]).float().mean().item(),
                        "examples_per_sec": n / seconds, "first_batch_sec": first_batch})
        if checkpoint and rank() == 0:
            save_checkpoint(checkpoint, model=net.state_dict(), optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict(), history=history, rng=rng_states(), **(meta or {}))
        if on_epoch:
            on_epoch(history[-1])
    return history, result or evaluate(net, test_iter, device, dtype)
