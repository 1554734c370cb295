"""The networks of D2L §14.2: resnet18 fine-tuned from ImageNet, or trained from scratch."""
import re

import torch
import torchvision
from torch import nn

from data import UserError, nfc

HOTDOG_ROW = 934  # ImageNet's class "hotdog, hot dog, red hot"


def imagenet_resnet18(weights_file=None):
    """resnet18 with ImageNet weights: downloaded once into $TORCH_HOME, or read from a file."""
    if weights_file is None:
        try:  # the book's `pretrained=True` is these weights
            return torchvision.models.resnet18(weights="IMAGENET1K_V1")
        except OSError as e:
            raise UserError(f"cannot download the ImageNet resnet18 weights ({e}); fetch "
                            "resnet18-f37072fd.pth elsewhere and pass weights_file=FILE") from None
    net = torchvision.models.resnet18()
    try:
        net.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    except FileNotFoundError:
        raise UserError(f"weights_file={weights_file} does not exist; give the path of "
                        "resnet18-f37072fd.pth") from None
    except Exception as e:  # unpickling or key errors: not a resnet18 state-dict either way
        raise UserError(f"weights_file={weights_file} is not a resnet18 state-dict "
                        f"({str(e).splitlines()[0]}); give resnet18-f37072fd.pth") from None
    return net


def finetune_net(num_classes=2, weights_file=None, hotdog_class=None):
    """The pretrained body with a new output layer (§14.2.2.2): xavier-uniform weight, default bias.
    hotdog_class (exercise 4): the index of the class that starts from ImageNet's hot-dog row."""
    net = imagenet_resnet18(weights_file)
    imagenet_fc, net.fc = net.fc, nn.Linear(net.fc.in_features, num_classes)
    nn.init.xavier_uniform_(net.fc.weight)
    if hotdog_class is not None:
        init_hotdog_head(net.fc, imagenet_fc, hotdog_class)
    return net


def init_hotdog_head(fc, imagenet_fc, hotdog_class):
    """Exercise 4: start the hot-dog class from ImageNet's hot-dog row, and every other class from
    the mean of the other 999 rows, a detector of "some other ImageNet class"."""
    others = torch.arange(imagenet_fc.out_features) != HOTDOG_ROW
    with torch.no_grad():
        for c in range(fc.out_features):
            rows = HOTDOG_ROW if c == hotdog_class else others
            fc.weight[c] = imagenet_fc.weight[rows].reshape(-1, fc.in_features).mean(0)
            fc.bias[c] = imagenet_fc.bias[rows].mean()


def hotdog_class(classes):
    """The index of the class named like hot dog (hotdog, hot_dog, hot-dog, hot dog; any case)."""
    for i, name in enumerate(classes):
        if re.fullmatch(r"hot[-_ ]?dogs?", nfc(name).lower()):
            return i
    raise UserError(f"no class is named like hot dog (hotdog, hot_dog, hot-dog) among {classes}, so none "
                    "can start from ImageNet's hot-dog row; rename that class's folder, or leave hotdog_class out")


def scratch_net(num_classes=2):
    """The same architecture with torchvision's random initialisation throughout (§14.2.2.2)."""
    net = torchvision.models.resnet18()
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def freeze_features(net):
    """Exercise 3: train only the output layer, in place (the net is returned too). As in
    torchvision's detection models, the BatchNorm layers become FrozenBatchNorm2d: ImageNet's
    statistics stay fixed in training too, since with the layers' weights frozen, statistics
    drifting to the new data would no longer match them. The training loop needs no special case."""
    for name, param in net.named_parameters():
        param.requires_grad = name.startswith("fc.")
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, frozen_batch_norm(child))
    return net


def frozen_batch_norm(bn):
    """A BatchNorm2d as it computes at test time, with its weights and statistics."""
    frozen = torchvision.ops.FrozenBatchNorm2d(bn.num_features, bn.eps).to(bn.weight.device)
    frozen.load_state_dict(bn.state_dict())  # it drops num_batches_tracked itself
    return frozen


def saved_net(checkpoint):
    """The net a training run saved (train.load_checkpoint), ready to predict. Its BatchNorm
    layers are FrozenBatchNorm2d, which compute as BatchNorm does at test time and so load the
    weights of any mode, --freeze or not."""
    net = torchvision.models.resnet18(num_classes=len(checkpoint["classes"]),
                                      norm_layer=torchvision.ops.FrozenBatchNorm2d)
    net.load_state_dict(checkpoint["model"])
    return net
