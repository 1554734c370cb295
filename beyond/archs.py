"""torchvision's other ImageNet classifiers under the book's recipe, output layer as `net.fc`."""
import functools
import os
from collections import OrderedDict

import torch
import torchvision
from torch import nn

from beyond import UserError


@functools.cache
def check_arch(arch):
    """arch, where it is a torchvision ImageNet classifier with an output layer to replace."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"arch={arch} is not one of torchvision's ImageNet classifiers; "
                        "torchvision.models.list_models(module=torchvision.models) lists them")
    try:
        with torch.device("meta"):
            with_fc(torchvision.models.get_model(arch))
    except NotImplementedError:  # regnets compute their widths from values meta tensors lack
        with torch.random.fork_rng(devices=[]):  # the caller's numbers stay as they were
            with_fc(torchvision.models.get_model(arch))
    return arch


def check_outputs(net, classes):
    """Refuse a net whose last Linear layer (the book's net.fc) has not one output per class."""
    if not isinstance(net, nn.Module):  # models.finetune_net itself, say, not the net it makes
        raise UserError(f"the net given is a {type(net).__name__}, not a torch nn.Module; give a "
                        "net, such as models.finetune_net() (called: it makes one)")
    fc = ([module for module in net.modules() if isinstance(module, nn.Linear)] or [None])[-1]
    if fc and fc.out_features != len(classes):
        raise UserError(f"the net has {fc.out_features} outputs (its last Linear layer) but the "
                        f"data has {len(classes)} classes {classes[:5]}; give the net one output "
                        f"per class: models.finetune_net({len(classes)}) or "
                        f"models.scratch_net({len(classes)})")


def weights_name(arch):
    return os.path.basename(torchvision.models.get_model_weights(arch).DEFAULT.url)


def with_fc(net):
    """The net with its last Linear layer as `net.fc`, as resnet18's, as the book's code expects."""
    if getattr(net, "aux_logits", False):  # googlenet, inception_v3: no side outputs in training,
        net.aux_logits, net.AuxLogits, net.aux1, net.aux2 = False, None, None, None
        net.transform_input = True  # and, in every mode, the input their ImageNet weights expect
    name = ([n for n, module in net.named_modules() if isinstance(module, nn.Linear)] or [None])[-1]
    fc = name and net.get_submodule(name)
    if fc is None or fc.out_features != 1000:
        raise UserError(f"{type(net).__name__} does not end in a Linear layer with ImageNet's 1000 "
                        "outputs, so it has no output layer to replace; choose another arch=")
    if name == "fc":
        return net
    net.set_submodule(name, nn.Identity())
    return nn.Sequential(OrderedDict(body=net, fc=fc))  # fc(body(X)): weights body.*, fc.*


@functools.cache  # each run's data, checkpoint and header ask for it
def preprocessing(arch):
    """The image sizes and interpolation arch's ImageNet weights were trained with."""
    t = torchvision.models.get_model_weights(check_arch(arch)).DEFAULT.transforms()
    return dict(crop=t.crop_size[0], resize=t.resize_size[0], interpolation=t.interpolation.value)
