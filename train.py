"""Training and evaluation: D2L §14.2's `train_fine_tuning`, with §14.1's `train_ch13` loop.

First the book's recipe, in the book's order and with its names: `train_fine_tuning` and
`train_ch13` take the book's arguments, train, and return the history, from Python or a notebook
as in the book. Then where and how the arithmetic runs (devices, precision), and what training
shows (a line per epoch, the book's Animator and summary, a live progress line). Nothing here
keeps a run: runs.py drives the same loop, `ch13_epochs`, from outside, restoring a checkpoint
before it and saving one after each epoch.
"""
import contextlib
import sys
import time
from collections import namedtuple

import torch
from torch import nn

import data
import images
import models
from data import MEAN, STD, normalize
from utils import UserError, all_reduce_sum, gather_in_order, parallel, rank, reshuffle, same_buffers, say, world_size


# ================================================================ the book's recipe
def train_fine_tuning(net, learning_rate, batch_size=128, num_epochs=5, param_group=True, *,
                      data_dir=None, devices=None, precision="amp"):
    """§14.2.2.3, called as the book calls it: trains on data_dir (default: the hot-dog set,
    downloaded on first use) on all GPUs (else MPS, else the CPU), and returns the history, one
    dict of metrics per epoch. To keep the run in a folder and continue it, see runs.py."""
    make_runtime(devices, precision)  # devices and precision checked before the data is read
    # Loaders of this call alone, so their worker processes may live from epoch to epoch: they
    # end with the call, and no epoch waits for new ones (data.make_loaders says why that costs).
    train_iter, test_iter = data.load_data(batch_size, data_dir, persistent=True)
    models.check_outputs(net, train_iter.dataset.classes)
    # The book sums the loss over the batch, and its learning rates (5e-5, 5e-4) assume that
    # sum: with the mean they would be 128x too small.
    loss = nn.CrossEntropyLoss(reduction="none")
    trainer = fine_tuning_optimizer(net, learning_rate, param_group)
    return train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices, precision=precision)


def fine_tuning_optimizer(net, learning_rate, param_group=True):
    """The book's SGD. With param_group, the new output layer learns at 10x the base learning rate."""
    if param_group and not hasattr(net, "fc"):  # a net of one's own: one line, not an AttributeError
        raise UserError(f"param_group=True trains net.fc at 10x the learning rate, and this {type(net).__name__} "
                        "has no .fc; give param_group=False, or name its output layer net.fc")
    if param_group:
        params_1x = [param for name, param in net.named_parameters()
                     if name not in ["fc.weight", "fc.bias"]]
        return torch.optim.SGD([{'params': params_1x},
                                {'params': net.fc.parameters(),
                                 'lr': learning_rate * 10}],
                               lr=learning_rate, weight_decay=0.001)
    return torch.optim.SGD(net.parameters(), lr=learning_rate,
                           weight_decay=0.001)


def train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices=None, *, precision="amp"):
    """§14.1, called as the book calls it (the name is from the book's first edition, where
    computer vision was chapter 13): trains, shows each epoch and the book's summary, and returns
    the history, one dict of metrics per epoch."""
    runtime = make_runtime(devices, precision)
    for name, loader in (("train_iter", train_iter), ("test_iter", test_iter)):
        if hasattr(loader, "__len__") and not len(loader):  # else a division by zero, or argmax of nothing
            raise UserError(f"{name} gives no batches; give it a data set that holds images")
    history, animator = [], images.animator()
    for epoch in ch13_epochs(net, train_iter, test_iter, loss, trainer, range(num_epochs), runtime):
        history.append(epoch.metrics)
        show_epoch(history, animator)
    show_summary(history, runtime)
    return history


# What the loop yields after each epoch: the metrics (epoch, loss, train_acc, examples, first_batch_sec,
# test_acc, examples_per_sec), and the test set's class probabilities and labels, in dataset order.
Epoch = namedtuple("Epoch", "metrics probs labels")


def ch13_epochs(net, train_iter, test_iter, loss, optimizer, epochs, runtime):
    """§14.1's loop over epochs (a range: runs.py starts a continued run later): each epoch, one
    pass over the training data, then the accuracy on the test data; yields an `Epoch` after
    each, for the caller to show and keep."""
    net = runtime.place(net)  # in place: the optimizer's parameters are still the net's
    model = parallel(net, runtime.devices)  # the book's nn.DataParallel; `net` itself on one device
    for epoch in epochs:
        reshuffle(train_iter, epoch)
        start = time.perf_counter()
        train_metrics = train_epoch(model, train_iter, loss, optimizer, runtime)
        seconds = time.perf_counter() - start  # data loading included, unlike the book's timer
        probs, labels = evaluate(net, test_iter, runtime)  # the bare net: each process its own share of the test
        # set; with nn.DataParallel, the first GPU evaluates it all (the book's splits each batch among the GPUs)
        yield Epoch(dict(epoch=epoch + 1, **train_metrics, test_acc=accuracy(probs, labels),
                         examples_per_sec=train_metrics["examples"] / seconds), probs, labels)


def train_epoch(net, train_iter, loss, optimizer, runtime):
    """One pass over the data, §14.1's `train_batch_ch13` for each batch. Returns the mean loss,
    the accuracy and the number of examples (over all processes), and the seconds until the
    first batch arrived."""
    net.train()
    metric = torch.zeros(3, device=runtime.device)  # loss sum, correct, examples; kept on the device
    batches = Progress(train_iter, metric)
    with runtime.cudnn_flags():
        for X, y in batches:
            X, y = runtime.input(X), runtime.target(y)
            optimizer.zero_grad()
            with runtime.autocast():
                pred = net(X)
                losses = loss(pred, y)
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
    """The book's `evaluate_accuracy_gpu` (§7.6), keeping what it counts: the class probabilities
    and the label of every test example, in dataset order."""
    same_buffers(net)
    net.eval()
    probs, labels = [], []
    with runtime.cudnn_flags():
        for X, y in test_iter:
            with runtime.autocast():
                probs.append(torch.softmax(net(runtime.input(X)).float(), 1).cpu())
            labels.append(y)
    return gather_in_order(probs, labels)


def accuracy(probs, labels):
    return (predicted(probs) == labels).float().mean().item()


def predicted(probs):
    """Each example's class, -1 where its outputs are not finite: a diverged net's NaN predicts
    nothing (argmax would take NaN for the largest), so it is never right, and no epoch of it is kept."""
    return torch.where(probs.isfinite().all(1), probs.argmax(1), -1)


def figures(probs, labels, classes):
    """An evaluation's figures: the confusion matrix (rows: the true class; an example that
    predicts nothing, predicted's -1, is in no column), each class's precision, recall, F1 and
    count, and the balanced accuracy (the mean recall)."""
    preds, count = predicted(probs), torch.bincount(labels, minlength=len(classes)).double()
    answered = preds >= 0
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    confusion.index_put_((labels[answered], preds[answered]), torch.ones_like(preds[answered]), accumulate=True)
    right, predicted_as = confusion.diag().double(), confusion.sum(0).double()
    precision, recall = (torch.nan_to_num(right / n) for n in (predicted_as, count))  # 0 where none
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall))
    per_class = {name: dict(precision=p, recall=r, f1=f, count=int(n))
                 for name, p, r, f, n in zip(classes, precision.tolist(), recall.tolist(), f1.tolist(), count.tolist())}
    return dict(confusion=confusion.tolist(), per_class=per_class,
                balanced_accuracy=recall[count > 0].mean().item() if (count > 0).any() else 0.0)


# ================================================================ where and how it runs
def try_device(name=None, keyword="device"):
    """The device to train on: the one named, else CUDA, else MPS, else the CPU. keyword: the
    caller's argument that named it, for the error."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)  # raises for a name torch does not know, such as "gpu"
        missing = (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
                   or device.type == "mps" and not torch.backends.mps.is_available())
    except RuntimeError:
        missing = True
    if not missing and device.type not in ("cpu", "cuda", "mps"):  # xpu, meta...: torch knows them, this program not
        raise UserError(f"{keyword}={name}: this program computes on cpu, cuda (cuda:N) or mps; give one of those")
    if missing:
        raise UserError(f"{keyword}={name}: this machine has no such device; give no {keyword}= "
                        "to use the best one there is")
    return device


def try_all_gpus():
    """Every GPU of the machine, as the book's try_all_gpus; where there is none, the best other
    device (MPS, else the CPU), not the book's empty list, on which its train_ch13 fails."""
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [try_device()]


class Runtime:
    """The devices and their arithmetic. With precision "amp", on CUDA and on the CPU:
    channels-last memory format (measured faster on the CPU; the usual advice for GPUs with tensor
    cores), and autocast to the type the device computes fastest without losing accuracy (see
    amp_dtype). With "fp32", and on MPS: the book's arithmetic. The gradient scaler passes
    everything through unless the autocast type is fp16 (whose small gradients underflow)."""

    def __init__(self, devices, precision):
        self.devices, self.device = devices, devices[0]  # several GPUs share each batch; the first holds the net
        amp = precision == "amp" and self.device.type in ("cuda", "cpu")
        self.fp32 = precision == "fp32"  # the book's arithmetic, asked for: no autocast, and no TF32 either
        self.dtype = amp_dtype(self.device) if amp else None  # autocast's, None for fp32
        if len(devices) > 1 and self.dtype:  # nn.DataParallel's threads autocast to fp16, whatever was asked
            self.dtype = torch.float16
        self.memory_format = torch.channels_last if amp else torch.contiguous_format
        # GradScaler's first scale, 2**16, is made for a mean loss; the book's loss is summed over a
        # batch of 128, so its gradients are 128x larger and fp16 would overflow for the first steps
        # (the scaler skips those, and then adapts to any batch size).
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**16 / 128,
                                           enabled=self.dtype == torch.float16)
        # ImageNet's, on the device once: from a list, each batch would copy them there and wait
        # for the copy (a host sync per batch on CUDA)
        self.mean, self.std = (torch.tensor(stats, device=self.device).view(-1, 1, 1) for stats in (MEAN, STD))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    @contextlib.contextmanager
    def cudnn_flags(self):
        """cuDNN's flags, which hold for the whole process, set as this runtime computes for the
        block and put back as they were after it. Autotuning on: the input shapes are fixed, so
        cuDNN times its kernels once and keeps the fastest. In fp32, the book's arithmetic, no
        TF32 (10 bits of mantissa, not 23), which cuDNN uses for convolutions by default on Ampere
        and later GPUs (matrix products are fp32 by default)."""
        cudnn = torch.backends.cudnn
        before = cudnn.benchmark, cudnn.conv.fp32_precision  # TF32's setting from torch 2.9 on
        cudnn.benchmark = True
        if self.fp32:
            cudnn.conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            cudnn.benchmark, cudnn.conv.fp32_precision = before

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
    """The Runtime for a device or a list of GPUs (default: all GPUs, else the best device), in
    precision "amp" or "fp32"."""
    if precision not in ("amp", "fp32"):
        raise UserError(f"precision={precision} is not one this program computes in; give \"amp\" or \"fp32\"")
    names = [devices] if isinstance(devices, (str, torch.device)) else devices
    devices = [try_device(str(name), "devices") for name in names] if names else try_all_gpus()
    if len(devices) > 1 and (len(set(devices)) < len(devices) or any(d.type != "cuda" for d in devices)):
        raise UserError(f"devices={[str(d) for d in devices]}: nn.DataParallel splits a batch among different "
                        "GPUs only; give one device (devices=\"cpu\": one CPU computes on all its cores)")
    return Runtime(devices, precision)


def amp_dtype(device):
    """bf16 where the device has it natively: CUDA GPUs from Ampere on, CPUs with AMX or
    AVX512-BF16 (PyTorch's own check). fp16, with its gradient scaler, on older GPUs. None (fp32)
    on other CPUs, where bf16 is emulated and runs at half the speed of fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    cpu = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}  # older torch: fp32
    return torch.bfloat16 if cpu.get("amx_bf16") or cpu.get("avx512_bf16") else None


# ================================================================ what training shows
def show_epoch(history, animator):
    """What shows each epoch: the curves redrawn in place in a notebook (the book's Animator,
    images.animator), and a line, which the book does not print (its curves are its only
    figures until the summary): a terminal or a log file shows no curves."""
    m = history[-1]
    say(f"  epoch {m['epoch']}: loss {m['loss']:.3f}, train acc {m['train_acc']:.3f}, "
        f"test acc {m['test_acc']:.3f}, {m['examples_per_sec']:.1f} examples/sec"
        + (f" (start-up: first batch after {m['first_batch_sec']:.1f} s)" if m["epoch"] == 1 else ""))
    animator(history)


def show_summary(history, runtime):
    """The book's two closing lines."""
    if history:
        m = history[-1]
        say(f"loss {m['loss']:.3f}, train acc {m['train_acc']:.3f}, test acc {m['test_acc']:.3f}")
        say(f"{mean_speed(history):.1f} examples/sec on {runtime}")


def mean_speed(history):
    """The book's: the examples of every epoch over their seconds together."""
    return sum(m["examples"] for m in history) / sum(m["examples"] / m["examples_per_sec"] for m in history)


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
    notebook = images.notebook()
    if notebook:
        handle = notebook.display(notebook.Pretty(""), display_id=True)

        def show(text):
            if text:  # "" would clear the line: a notebook keeps each epoch's last one
                handle.update(notebook.Pretty(text))
        return show
    if sys.stderr.isatty():
        return lambda text: print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
    return None

