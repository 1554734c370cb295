"""Training: D2L §14.2.2.3's `train_fine_tuning`, with §14.1's `train_ch13` loop, in the book's
order and names; devices, precision, processes and display come from `beyond`, as `d2l.*`."""
import time
from collections import namedtuple

import torch
from torch import nn

import beyond
import beyond.archs
import beyond.devices
import beyond.figures
import beyond.options
import beyond.pictures
import beyond.processes
import beyond.progress
import data


def train_fine_tuning(net, learning_rate, batch_size=128, num_epochs=5, param_group=True, *,
                      data_dir=None, devices=None, precision="amp"):
    """§14.2.2.3, called as the book calls it: trains on data_dir (default: the hot-dog set) and
    returns the history, one dict of metrics per epoch."""
    # the devices, checked before the data is fetched; as a list, which train_ch13 reads again
    devices = beyond.devices.make_runtime(devices, precision).asked
    # persistent: the loaders' worker processes end with this call, so they may live from epoch
    # to epoch and no epoch waits for new ones
    train_iter, test_iter = data.load_data(batch_size, data_dir, persistent=True)
    beyond.archs.check_outputs(net, train_iter.dataset.classes)
    loss = fine_tuning_loss()
    trainer = fine_tuning_optimizer(net, learning_rate, param_group)
    return train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices, precision)


def fine_tuning_loss(weight=None, label_smoothing=0.0):
    """§14.2.2.3's cross-entropy, one value per example, which the loop sums over the batch: its
    learning rates assume the sum, 128x the mean. Beyond it: class weights, label smoothing."""
    return nn.CrossEntropyLoss(weight=weight, reduction="none", label_smoothing=label_smoothing)


def fine_tuning_optimizer(net, learning_rate, param_group=True):
    """§14.2.2.3's SGD; with param_group, the new output layer learns at 10x the base rate."""
    if param_group and not hasattr(net, "fc"):  # net.fc below would raise AttributeError
        raise beyond.UserError(f"param_group=True trains net.fc at 10x the learning rate, and this "
                               f"{type(net).__name__} has no .fc; give param_group=False, or name "
                               "its output layer net.fc")
    learning_rate = beyond.options.checked_number("learning_rate", learning_rate)  # by --lr's rule
    if param_group:
        params_1x = [param for name, param in net.named_parameters()
                     if name not in ["fc.weight", "fc.bias"]]
        return torch.optim.SGD([{'params': params_1x},
                                {'params': net.fc.parameters(),
                                 'lr': learning_rate * 10}],
                               lr=learning_rate, weight_decay=0.001)
    return torch.optim.SGD(net.parameters(), lr=learning_rate,
                           weight_decay=0.001)


def train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices=None,
               precision="amp"):
    """§14.1 (chapter 13 in the book's releases before 1.0, hence the name), called as the book
    calls it: trains, shows each epoch and the book's summary, and returns the history."""
    runtime = beyond.devices.make_runtime(devices, precision)
    num_epochs = beyond.options.checked_number("num_epochs", num_epochs)  # by --epochs' rule
    history, animator = [], beyond.pictures.animator()
    for epoch in ch13_epochs(net, train_iter, test_iter, loss, trainer, range(num_epochs), runtime):
        history.append(epoch.metrics)
        beyond.progress.show_epoch(history, animator)
    beyond.progress.show_summary(history, runtime)
    return history


# What the loop yields after each epoch: the metrics, and the test set's class probabilities and
# labels, in dataset order.
Epoch = namedtuple("Epoch", "metrics probs labels")


def ch13_epochs(net, train_iter, test_iter, loss, trainer, epochs, runtime):
    """§14.1's loop over epochs (a range: a continued run starts later): one pass over the
    training data, then the accuracy on the test data; yields an `Epoch` after each."""
    net = runtime.place(net)  # in place: the trainer's parameters are still the net's
    model = beyond.processes.parallel(net, runtime.devices)  # the book's nn.DataParallel
    for epoch in epochs:
        beyond.processes.reshuffle(train_iter, epoch)
        start = time.perf_counter()
        train_metrics = train_epoch(model, train_iter, loss, trainer, runtime)
        seconds = time.perf_counter() - start  # data loading included, unlike the book's timer
        probs, labels = evaluate(net, test_iter, runtime)  # the bare net: each process its share
        yield Epoch(dict(epoch=epoch + 1, **train_metrics, test_acc=accuracy(probs, labels),
                         examples_per_sec=train_metrics["examples"] / seconds), probs, labels)


def train_epoch(net, train_iter, loss, trainer, runtime):
    """One pass over the data, §14.1's `train_batch_ch13` for each batch: the mean loss, the
    accuracy, the examples (over all processes), and the seconds until the first batch."""
    net.train()
    metric = torch.zeros(3, device=runtime.device)  # loss sum, correct, examples; on the device
    batches = beyond.progress.Progress(train_iter, metric)
    with runtime.cudnn_flags():
        for X, y in batches:
            X, y = data.normalize_batch(runtime.input(X)), runtime.target(y)
            trainer.zero_grad()
            with runtime.autocast():
                pred = net(X)
                losses = loss(pred, y)
            # the book's l.sum().backward() and trainer.step(): the scaler scales in fp16 alone
            runtime.scaler.scale(losses.sum()).backward()
            runtime.scaler.step(trainer)
            runtime.scaler.update()
            metric[0] += losses.detach().sum()
            metric[1] += (beyond.figures.predicted(pred) == y).sum()  # NaN: never right
            metric[2] += y.numel()
    loss_sum, correct, n = beyond.processes.all_reduce_sum(metric).tolist()
    if not n:  # no batch on any process: there was nothing to train on
        raise beyond.UserError("train_iter gives no batches; give it a data set that holds images, "
                               "in a loader that gives them every epoch (a generator: only once)")
    return dict(loss=loss_sum / n, train_acc=correct / n, examples=int(n),
                first_batch_sec=batches.first_batch_sec)


@torch.no_grad()
def evaluate(net, test_iter, runtime):
    """The book's `evaluate_accuracy_gpu` (its appendix's utility functions), returning what its
    accuracy counts: each test example's class probabilities and label, in dataset order."""
    beyond.processes.same_buffers(net)
    net.eval()
    probs, labels = [], []
    with runtime.cudnn_flags():
        for X, y in test_iter:
            X = data.normalize_batch(runtime.input(X))
            with runtime.autocast():
                probs.append(torch.softmax(net(X).float(), 1).cpu())
            labels.append(y)
    return beyond.processes.gather_in_order(probs, labels)


def accuracy(probs, labels):
    """The share of examples predicted as their class, whereas `d2l.accuracy` returns the count (a
    diverged net's NaN is never right)."""
    return (beyond.figures.predicted(probs) == labels).float().mean().item()
