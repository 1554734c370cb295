"""The networks of D2L §14.2.2.2-3: resnet18 (or another of torchvision's, beyond.archs),
fine-tuned or from scratch, and the heads of exercises 3 (frozen layers) and 4 (the hot-dog row)."""
import numbers

import torch
import torchvision
from torch import nn

import beyond
import beyond.archs
import beyond.files

HOTDOG_ROW = 934  # ImageNet's class "hotdog, hot dog, red hot"


def pretrained_net(arch="resnet18", weights=None):
    """§14.2.2.2: torchvision's `arch` with its ImageNet weights (the book's `pretrained=True`),
    downloaded once into $TORCH_HOME, or read from weights, a state-dict file."""
    beyond.archs.check_arch(arch)
    if weights is None:
        try:
            return torchvision.models.get_model(arch, weights="DEFAULT")
        except OSError as e:
            raise beyond.UserError(f"cannot download the ImageNet weights of {arch} ({e}); fetch "
                                   f"{beyond.archs.weights_name(arch)} elsewhere and pass "
                                   "weights=FILE") from None
    net = torchvision.models.get_model(arch)
    return beyond.files.load_file(weights, f"a {arch} state-dict",
                                  f"give {beyond.archs.weights_name(arch)}",
                                  f"weights={weights}", into=net)


def finetune_net(num_classes=2, weights=None, hotdog_class=None, arch="resnet18"):
    """§14.2.2.2: the pretrained body with a new output layer, xavier-uniform weight, default
    bias (with hotdog_class, exercise 4: rows from ImageNet's, init_hotdog_head)."""
    net = beyond.archs.with_fc(pretrained_net(arch, weights))  # net.fc for every arch
    imagenet_fc, net.fc = net.fc, nn.Linear(net.fc.in_features, num_classes)
    nn.init.xavier_uniform_(net.fc.weight)
    if hotdog_class is not None:
        init_hotdog_head(net.fc, imagenet_fc, hotdog_class)
    net.arch = arch  # a checkpoint records it, to build the same net again
    return net


def scratch_net(num_classes=2, arch="resnet18"):
    """§14.2.2.3: the same architecture with torchvision's random initialisation throughout."""
    net = beyond.archs.with_fc(torchvision.models.get_model(beyond.archs.check_arch(arch)))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    net.arch = arch
    return net


def freeze_features(net):
    """Exercise 3: train only the output layer, in place; BatchNorm becomes FrozenBatchNorm2d,
    as in torchvision's detection models, so ImageNet's statistics stay fixed in training too."""
    for name, param in net.named_parameters():
        param.requires_grad = name.startswith("fc.")
    for name, bn in list(net.named_modules()):
        if isinstance(bn, nn.BatchNorm2d):  # the same layer as it computes at test time
            frozen = torchvision.ops.FrozenBatchNorm2d(bn.num_features, bn.eps).to(bn.weight.device)
            frozen.load_state_dict(bn.state_dict())  # it drops num_batches_tracked itself
            net.set_submodule(name, frozen)
    return net


def init_hotdog_head(fc, imagenet_fc, hotdog_class):
    """Exercise 4: the hot-dog class starts from ImageNet's hot-dog row, every other class from
    the mean of the other 999 rows."""
    if (not isinstance(hotdog_class, numbers.Integral) or isinstance(hotdog_class, bool)
            or not 0 <= hotdog_class < fc.out_features):  # NumPy's integers too
        raise beyond.UserError(f"hotdog_class={hotdog_class!r} is not the index of a class; "
                               f"give one of 0 to {fc.out_features - 1}")
    others = torch.arange(imagenet_fc.out_features) != HOTDOG_ROW
    with torch.no_grad():
        for c in range(fc.out_features):
            rows = [HOTDOG_ROW] if c == hotdog_class else others
            fc.weight[c] = imagenet_fc.weight[rows].mean(0)
            fc.bias[c] = imagenet_fc.bias[rows].mean()
