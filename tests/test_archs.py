"""Other architectures (--arch, beyond.archs): torchvision's ImageNet classifiers that end in
one Linear layer, through the same recipe: their cached weights, the book's parameter groups,
the augmentations their weights were trained with."""
import os

import pytest
import torch
import torchvision
from torchvision.transforms import v2

import models
from beyond import UserError, archs, checkpoints, datasets, loaders, runs
from train import evaluate

from conftest import CPU, recipe_optimizer, run_cli


ARCHS = ["mobilenet_v3_small", "densenet121"]  # head in classifier[-1]; head as classifier itself


@pytest.fixture(scope="session")
def arch_weights(torch_home):
    """Stand-in ImageNet weights for other architectures, where torchvision caches their
    defaults."""
    states = {}
    for arch in ARCHS:
        torch.manual_seed(7)
        states[arch] = torchvision.models.get_model(arch).state_dict()
        torch.save(states[arch], os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints",
                                              archs.weights_name(arch)))
    return states


def check_recipe_groups(monkeypatch, net):
    _, optimizer = recipe_optimizer(monkeypatch, net, 0.1)
    assert ({id(p) for p in optimizer.param_groups[1]["params"]}
            == {id(net.fc.weight), id(net.fc.bias)})
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())  # each exactly once


@pytest.mark.parametrize("arch", ARCHS)
def test_any_arch_fine_tunes_from_its_cached_weights_with_the_books_groups(
        arch, arch_weights, monkeypatch):
    net = models.finetune_net(3, arch=arch)
    body = {k.removeprefix("body."): v for k, v in net.state_dict().items()
            if not k.startswith("fc.")}
    saved = arch_weights[arch]
    assert (all(torch.equal(body[k], saved[k]) for k in body if k in saved)
            and len(body) == len(saved) - 2)
    assert (net.fc.out_features == 3
            and net.fc.weight.abs().max() <= (6 / (net.fc.in_features + 3)) ** 0.5)
    assert net.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 3)
    check_recipe_groups(monkeypatch, net)
    hotdog = models.finetune_net(2, arch=arch, hotdog_class=0).fc.weight[0]
    assert torch.equal(hotdog, saved[[k for k in saved if k.endswith("weight")][-1]][934])


@pytest.mark.parametrize("arch", ["swin_t", "vit_b_16", "efficientnet_b0", "inception_v3"])
def test_heads_named_otherwise_become_fc(arch, monkeypatch):
    net = models.scratch_net(2, arch)
    assert net.fc.out_features == 2 and not any(m.out_features == 1000 for m in net.modules()
                                                  if isinstance(m, torch.nn.Linear))
    check_recipe_groups(monkeypatch, net)
    models.freeze_features(net)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    size = archs.preprocessing(arch)["crop"]
    assert net.train()(torch.rand(2, 3, size, size)).shape == (2, 2)  # no side outputs in training


def test_checking_an_arch_leaves_the_callers_random_numbers():
    """An arch is checked on the meta device, where it can be (no weights drawn); a regnet, which
    cannot be, is built on the CPU, and its draws are not the caller's."""
    for arch in ("resnet18", "regnet_y_400mf"):
        state = torch.get_rng_state()
        assert archs.check_arch.__wrapped__(arch) == arch
        assert torch.equal(torch.get_rng_state(), state), arch


def test_every_classifier_with_one_linear_head_is_taken_and_the_others_refused_in_one_line():
    """check_arch builds each arch on the meta device; regnets, which cannot be built there, are
    built for real rather than crash; an arch without one Linear output layer is one line."""
    assert archs.check_arch("regnet_x_400mf") == "regnet_x_400mf"
    with pytest.raises(UserError,
                       match="^SqueezeNet does not end in a Linear layer.*choose another arch="):
        archs.check_arch("squeezenet1_0")


def test_arch_on_the_command_line(folder, tmp_path, capsys, arch_weights):
    run = tmp_path / "run"
    status, out, err = run_cli(capsys, "--pretrained", "--arch", "mobilenet_v3_small",
                               "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                               "--workers", 0, "--out", run)
    assert status == 0, err
    assert ("pretrained: mobilenet_v3_small at 224 px (resized to 256, bilinear), training on 8 "
            "images") in out
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["arch"] == "mobilenet_v3_small" and ckpt["transform"]["interpolation"] == "bilinear"
    status, out, err = run_cli(capsys, "--predict", os.path.join(folder, "test"),
                               "--model", run / "model.pt", "--out", tmp_path, "--workers", 0)
    probs, labels = evaluate(checkpoints.saved_net(ckpt),
                             loaders.make_loaders(*datasets.image_folders(folder), 4)[1], CPU)
    assert status == 0 and [line.split(": ")[1].split()[0] for line in out.splitlines()] \
        == [ckpt["classes"][p.argmax()] for p in probs]
    status, out, err = run_cli(capsys, "--resume", run / "model.pt", "--epochs", 2, "--workers", 0)
    assert status == 0 and "epoch 2:" in out, err
    for argv, message in ((["--predict", folder, "--model", run / "model.pt", "--arch", "resnet18"],
                           "holds a mobilenet_v3_small, not a resnet18; leave --arch out"),
                          (["--scratch", "--arch", "resnet19", "--data-dir", folder,
                            "--out", tmp_path / "x"],
                           "--arch resnet19 is not one of torchvision's ImageNet classifiers; "
                           "torchvision.models.list_models"),
                          (["--pretrained", "--weights", os.path.join(
                              os.environ["TORCH_HOME"], "hub", "checkpoints",
                              archs.weights_name("mobilenet_v3_small")),
                            "--data-dir", folder, "--out", tmp_path / "y"],  # which keys differ
                           "is not a resnet18 state-dict (Error(s) in loading state_dict for "
                           "ResNet: Missing key(s) in state_dict: ")):
        status, _, err = run_cli(capsys, *argv)
        assert status == 2 and err.strip().splitlines() == [err.strip()] and message in err
        assert len(err) < 400  # the keys that differ, cut short


def test_each_arch_gets_the_augmentations_its_weights_were_trained_with(folder):
    options = runs.settled("scratch", dict(data_dir=folder, arch="swin_t", workers=0))
    train_set, test_set = runs.load_sets(options)
    crop, = [t for t in train_set.transform.transforms if isinstance(t, v2.RandomResizedCrop)]
    resize, = [t for t in test_set.transform.transforms if isinstance(t, v2.Resize)]
    assert crop.size == (224, 224) and resize.size == [232, 232]
    assert crop.interpolation == resize.interpolation == v2.InterpolationMode.BICUBIC
    assert test_set[0][0].shape == (3, 224, 224)
