"""The networks of D2L §14.2: resnet18 fine-tuned from ImageNet, or trained from scratch; the
same recipe for torchvision's other ImageNet classifiers that end in one Linear layer; and
freezing the copied layers (exercise 3), for good or for a while."""
import contextlib
import functools
import os
import re
from collections import OrderedDict

import torch
import torchvision
from torch import nn

from images import nfc
from utils import UserError, load_file

HOTDOG_ROW = 934  # ImageNet's class "hotdog, hot dog, red hot"


def pretrained_net(arch="resnet18", weights_file=None):
    """torchvision's `arch` with its default ImageNet weights (for resnet18, the book's
    `pretrained=True`): downloaded once into $TORCH_HOME, or read from a state-dict file."""
    check_arch(arch)
    if weights_file is None:
        try:
            return torchvision.models.get_model(arch, weights="DEFAULT")
        except OSError as e:
            raise UserError(f"cannot download the ImageNet weights of {arch} ({e}); fetch {weights_name(arch)} "
                            "elsewhere and pass weights_file=FILE") from None
    return load_file(weights_file, f"a {arch} state-dict", f"give {weights_name(arch)}",
                     f"weights_file={weights_file}", into=torchvision.models.get_model(arch))


def finetune_net(num_classes=2, weights_file=None, hotdog_class=None, arch="resnet18"):
    """The pretrained body with a new output layer (§14.2.2.2): xavier-uniform weight, default bias.
    hotdog_class (exercise 4): the index of the class that starts from ImageNet's hot-dog row."""
    net = with_fc(pretrained_net(arch, weights_file))  # resnet18 has its fc already
    imagenet_fc, net.fc = net.fc, nn.Linear(net.fc.in_features, num_classes)
    nn.init.xavier_uniform_(net.fc.weight)
    if hotdog_class is not None:
        init_hotdog_head(net.fc, imagenet_fc, hotdog_class)
    net.arch = arch  # a checkpoint records it, to build the same net again
    return net


def init_hotdog_head(fc, imagenet_fc, hotdog_class):
    """Exercise 4: start the hot-dog class from ImageNet's hot-dog row, and every other class from
    the mean of the other 999 rows, a detector of "some other ImageNet class"."""
    if type(hotdog_class) is not int or not 0 <= hotdog_class < fc.out_features:  # else no class would start there
        raise UserError(f"hotdog_class={hotdog_class!r} is not the index of a class; give one of 0 to {fc.out_features - 1}")
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


def scratch_net(num_classes=2, arch="resnet18"):
    """The same architecture with torchvision's random initialisation throughout (§14.2.2.2)."""
    net = with_fc(torchvision.models.get_model(check_arch(arch)))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    net.arch = arch
    return net


def net_for(mode, num_classes=2, arch="resnet18", weights_file=None, hotdog_class=None, freeze=False):
    """The book's net for a mode: "scratch", or "pretrained", fine-tuned from the ImageNet
    weights; with freeze, frozen but for the output layer."""
    if mode == "scratch":
        net = scratch_net(num_classes, arch)
    else:
        net = finetune_net(num_classes, weights_file, hotdog_class, arch)
    return freeze_features(net) if freeze else net


# ---------------------------------------------------------------- other architectures
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


def freeze_features(net):
    """Exercise 3: train only the output layer, in place (the net is returned too). As in
    torchvision's detection models, the BatchNorm layers become FrozenBatchNorm2d: ImageNet's
    statistics stay fixed in training too, since with the layers' weights frozen, statistics
    drifting to the new data would no longer match them. The training loop needs no special case."""
    for name, param in net.named_parameters():
        param.requires_grad = name.startswith("fc.")
    for name, bn in list(net.named_modules()):
        if isinstance(bn, nn.BatchNorm2d):  # the same layer as it computes at test time
            frozen = torchvision.ops.FrozenBatchNorm2d(bn.num_features, bn.eps).to(bn.weight.device)
            frozen.load_state_dict(bn.state_dict())  # it drops num_batches_tracked itself
            net.set_submodule(name, frozen)
    return net


@contextlib.contextmanager
def features_frozen(net):
    """For a while, exercise 3: only the output layer learns, and the BatchNorm layers compute as
    at test time, their statistics fixed. The layers stay the same objects (models.freeze_features
    replaces them for good), so a checkpoint written meanwhile loads into the whole net."""
    features = [(param, param.requires_grad) for name, param in net.named_parameters() if not name.startswith("fc.")]
    norms = [module for module in net.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for param, _ in features:
        param.requires_grad_(False)
    for bn in norms:  # net.train() calls each layer's train(): this one's keeps it in eval mode
        bn.train = in_eval_mode(bn)
    try:
        yield net
    finally:
        for param, learned in features:  # as they were (--freeze keeps its own frozen)
            param.requires_grad_(learned)
        for bn in norms:
            del bn.train


def in_eval_mode(module):
    """A train(mode) for module that leaves it in eval mode, whatever the mode."""
    return lambda mode=True: nn.Module.train(module, False)


# ---------------------------------------------------------------- a saved net
def checkpoint_in(path, name="model.pt", one_run=False):
    """A model.pt (or another name): path itself, or in the folder path, or in the folders of runs
    inside it: the first (a --compare's runs continue together), or with one_run, where there are
    several, a UserError: which one is meant is the caller's to say."""
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"{path!r} is not a path; give the model.pt of a training run, or its folder")
    path = os.path.normpath(path)  # best.pt/ is best.pt
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; give the model.pt of a training run, or its folder")
    found = [path] if not os.path.isdir(path) else checkpoints_in(path, name)
    if not found:
        raise UserError(f"{path} holds no {name}; give the model.pt of a training run, or its folder")
    if one_run and len(found) > 1:
        raise several_runs(path, found)
    return found[0]


def several_runs(folder, checkpoints):
    """The error for a folder of several runs (their checkpoints) where one was meant."""
    runs = ", ".join(os.path.basename(os.path.dirname(p)) for p in checkpoints)
    return UserError(f"{folder} holds several runs ({runs}); give the folder of one of them")


def checkpoints_in(folder, name="model.pt"):
    """folder's own model.pt (or another name), else those in the runs' folders inside it, sorted:
    a copy kept in a folder inside a run's never stands in for the run's own."""
    own = os.path.join(folder, name)
    if os.path.exists(own):
        return [own]
    return sorted(p for p in (os.path.join(folder, run, name) for run in os.listdir(folder)) if os.path.exists(p))


def kept_in(path):
    """The checkpoint that predicts for path: a file as it is; a run's folder, the epoch its
    best.pt keeps (its model.pt, where a run begun before runs kept best.pt has none); a folder of
    several runs (a --compare's) is refused."""
    folder = isinstance(path, (str, os.PathLike)) and os.path.isdir(path)
    if folder and not checkpoints_in(path) and checkpoints_in(path, "best.pt"):  # a best.pt copied alone, to predict
        return checkpoint_in(path, "best.pt", one_run=True)
    found = checkpoint_in(path, one_run=True)  # the file, or the model.pt of the one run in the folder
    best = os.path.join(os.path.dirname(found), "best.pt")
    return best if folder and os.path.exists(best) else found


def load_checkpoint(path):
    """A model.pt or best.pt a run wrote: the weights, the classes, the test transforms'
    settings, and what continuing needs."""
    beside = os.path.join(os.path.dirname(path), "model.pt")  # a run's best.pt: it can be made again
    fix = ("put back a whole copy, or delete it to keep the run's last epoch, its model.pt, in its place"
           if os.path.basename(path) == "best.pt" and os.path.exists(beside) else "give the model.pt of a training run")
    ckpt = load_file(path, "a checkpoint of this program", fix)
    if not isinstance(ckpt, dict) or "history" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this program; {fix}")
    return dict(ckpt, path=path)


def same_arch(arch, ckpt):
    """The checkpoint knows its architecture: an arch given beside it must be the same."""
    held = ckpt.get("arch") or "resnet18"  # None: a net of one's own, read as the book's resnet18 (saved_net)
    if arch and arch != held:
        raise UserError(f"{ckpt['path']} holds a {held}, not a {arch}; leave arch= out")


def saved_net(checkpoint):
    """The net a training run saved (load_checkpoint), ready to predict. Its BatchNorm
    layers are FrozenBatchNorm2d, which compute as BatchNorm does at test time and so load the
    weights of any mode, --freeze or not."""
    arch = checkpoint.get("arch") or "resnet18"  # None: a net of one's own, perhaps the book's resnet18
    with torch.random.fork_rng(devices=[]):  # its initial weights, overwritten, are not drawn from the caller's numbers
        net = freeze_features(scratch_net(len(checkpoint["classes"]), arch))
    try:
        net.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise UserError(f"the checkpoint holds the weights of another net than a {arch}; build that net and load "
                        "them into it: net.load_state_dict(torch.load(path)['model'])") from None
    return net.eval()
