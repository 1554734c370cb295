"""torchvision's other ImageNet classifiers under the book's recipe: which can be fine-tuned (one
Linear output layer, moved to `net.fc` where resnet18 has it), and the image sizes their weights
were trained with."""
import functools
import os
from collections import OrderedDict

import torch
import torchvision
from torch import nn

from beyond import UserError


@functools.cache
def check_arch(arch):
    """arch, where it is one of torchvision's ImageNet classifiers with an output layer to
    replace (checked on the meta device where the arch can be built there: no weights made, no
    time spent)."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"arch={arch} is not one of torchvision's ImageNet classifiers; "
                        "torchvision.models.list_models(module=torchvision.models) lists them")
    try:
        with torch.device("meta"):
            with_fc(torchvision.models.get_model(arch))
    except NotImplementedError:  # regnets work out their widths from tensors' values, which meta ones lack
        with torch.random.fork_rng(devices=[]):  # built on the CPU: its draws leave the caller's numbers as they were
            with_fc(torchvision.models.get_model(arch))
    return arch


def check_outputs(net, classes):
    """The net's output layer, its last Linear layer (the book's net.fc), gives one output per
    class of the data. A net of one's own may have no net.fc, which param_group=False never asks for."""
    fc = ([module for module in net.modules() if isinstance(module, nn.Linear)] or [None])[-1]
    if fc and fc.out_features != len(classes):
        raise UserError(f"the net has {fc.out_features} outputs (its last Linear layer) but the data has {len(classes)} "
                        f"classes {classes[:5]}; give the net one output per class: "
                        f"models.finetune_net({len(classes)}) or models.scratch_net({len(classes)})")


def weights_name(arch):
    """The file torchvision downloads for arch's default weights, e.g. resnet18-f37072fd.pth."""
    return os.path.basename(torchvision.models.get_model_weights(arch).DEFAULT.url)


def with_fc(net):
    """The net with its output layer as `net.fc`, where resnet18 has it, so that the book's code
    (`net.fc`, `params_1x` by name, --freeze) holds for every architecture. Other torchvision
    classifiers end in a Linear layer elsewhere (mobilenet, efficientnet, convnext, vgg:
    classifier[-1]; densenet: classifier; vit: heads.head; swin: head): it is moved out to `fc`."""
    if getattr(net, "aux_logits", False):  # googlenet, inception_v3: no side outputs in training,
        net.aux_logits, net.AuxLogits, net.aux1, net.aux2 = False, None, None, None
        net.transform_input = True  # and, in every mode, the input their ImageNet weights expect
    name = ([name for name, module in net.named_modules() if isinstance(module, nn.Linear)] or [None])[-1]
    fc = name and net.get_submodule(name)
    if fc is None or fc.out_features != 1000:
        raise UserError(f"{type(net).__name__} does not end in a Linear layer with ImageNet's 1000 "
                        "outputs, so it has no output layer to replace; choose another arch=")
    if name == "fc":
        return net
    net.set_submodule(name, nn.Identity())
    return nn.Sequential(OrderedDict(body=net, fc=fc))  # fc(body(X)), its weights named body.* and fc.*


@functools.cache  # each run's data, checkpoint and header ask for it
def preprocessing(arch="resnet18"):
    """The image sizes and interpolation arch's ImageNet weights were trained with (resnet18: the
    book's crop of 224 from 256, bilinear), for data.make_train_augs and make_test_augs."""
    augs = torchvision.models.get_model_weights(check_arch(arch)).DEFAULT.transforms()
    return dict(crop=augs.crop_size[0], resize=augs.resize_size[0], interpolation=augs.interpolation.value)
