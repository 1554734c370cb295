"""The recipe's tests: D2L §14.2's recipe (data.py, models.py, train.py) on tiny generated data,
offline, on the CPU: output shapes, parameter groups, a short overfit run, and the recipe held to
the book, each of its statements with a test that fails without it. The package's tests, one
file per concept, are in tests/; conftest.py holds what both share.

README's command runs them all in two processes (pytest-xdist's `-n 2`)."""
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data
import models
import train
from beyond import UserError, archs, datasets, devices, loaders
from train import evaluate, train_epoch

from conftest import COLOURS, CPU, one_epoch, recipe_optimizer, run_cli, write_folder


# ------------------------------- the nets: output shapes, ImageNet's weights, the exercises' heads
def test_output_shapes_and_head_init():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision's deprecation warnings among them
        nets = models.finetune_net(2), models.scratch_net(5)
    for net in nets:
        assert net.eval()(torch.rand(3, 3, 64, 64)).shape == (3, net.fc.out_features)
    fc = models.finetune_net(2).fc
    # xavier-uniform's; nn.Linear's own init stays within 1 / 512 ** 0.5 = 0.044
    bound = (6 / (512 + 2)) ** 0.5
    assert 0.8 * bound < fc.weight.abs().max() <= bound


def test_pretrained_weights_come_from_torch_home(torch_home):
    net = models.finetune_net(2)
    for name, value in net.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(value, torch_home[name]), name
    assert not torch.equal(net.fc.weight[:2], torch_home["fc.weight"][:2])


def test_weights(tmp_path, torch_home):
    torch.save(torch_home, tmp_path / "w.pth")
    net = models.finetune_net(2, weights=str(tmp_path / "w.pth"))
    assert torch.equal(net.conv1.weight, torch_home["conv1.weight"])
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not a resnet18 state-dict"):
        models.finetune_net(2, weights=str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="does not exist"):
        models.finetune_net(2, weights=str(tmp_path / "missing.pth"))


def test_weights_not_downloadable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache, so torchvision must download
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(UserError, match="weights=FILE"):
        models.finetune_net(2)


def test_init_head_from_imagenet(torch_home):
    fc = models.finetune_net(2, hotdog_class=0).fc
    w, b = torch_home["fc.weight"], torch_home["fc.bias"]
    assert torch.equal(fc.weight[0], w[934]) and fc.bias[0] == b[934]
    others = torch.cat([w[:934], w[935:]])
    assert torch.allclose(fc.weight[1], others.mean(0))
    for index in (2, -1, "hotdog", 1.0, True):
        with pytest.raises(UserError,
                           match=f"^hotdog_class={index!r} is not the index of a class; give one "
                                 "of 0 to 1$"):
            models.finetune_net(2, hotdog_class=index)


def test_the_hot_dog_row_goes_to_the_hot_dog_class(torch_home):
    fc = models.finetune_net(3, hotdog_class=np.int64(1)).fc  # NumPy's integers too
    w = torch_home["fc.weight"]
    assert torch.equal(fc.weight[1], w[934]) and torch.allclose(fc.weight[0], fc.weight[2])


def test_freeze_trains_only_the_head(folder):
    net = models.finetune_net(2)
    models.freeze_features(net)  # as a statement: in place
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_iter, test_iter = loaders.make_loaders(*datasets.image_folders(folder), batch_size=4)
    one_epoch(net, train_iter, test_iter)
    after = net.state_dict()
    for name in before:  # weights and BatchNorm statistics alike
        assert torch.equal(before[name], after[name]) == (not name.startswith("fc.")), name


# ------------------------------------------------------- parameter groups, and a short overfit run
def test_param_groups(monkeypatch):
    net = models.finetune_net(2)
    loss, optimizer = recipe_optimizer(monkeypatch, net, 0.1)  # train_ch13's, as handed to it
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(1.0)]
    assert all(g["weight_decay"] == 1e-3 for g in groups) and loss.reduction == "none"
    assert {id(p) for p in groups[1]["params"]} == {id(net.fc.weight), id(net.fc.bias)}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())  # each exactly once
    _, optimizer = recipe_optimizer(monkeypatch, net, 0.1, param_group=False)
    group, = optimizer.param_groups
    assert (group["lr"] == 0.1 and group["weight_decay"] == 1e-3
            and len(group["params"]) == len(list(net.parameters())))


def test_overfits_a_tiny_set():
    torch.manual_seed(0)
    X = torch.randn(16, 3, 32, 32)
    y = torch.arange(16) % 2
    X[y == 1] += 1.0
    net = models.scratch_net(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, weight_decay=1e-3)
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    metrics = [train_epoch(net, [(X, y)], loss, optimizer, CPU) for _ in range(15)]
    assert metrics[-1]["train_acc"] == 1 and metrics[-1]["examples"] == 16  # every example right
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 4


# -------------------- the recipe held to the book: each statement has a test that fails without it
def test_sum_not_mean_loss_gradients():
    """The recipe's gradient is the sum over the batch: twice the batch, twice the step."""
    torch.manual_seed(0)
    X, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    steps = []
    for batch in ((X, y), (torch.cat([X, X]), torch.cat([y, y]))):
        torch.manual_seed(0)
        net = models.scratch_net(2).eval()  # eval: BatchNorm does not depend on the batch
        net.train = lambda mode=True: net  # keep it so inside train_epoch
        before = net.fc.weight.detach().clone()
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
        train_epoch(net, [batch], torch.nn.CrossEntropyLoss(reduction="none"), optimizer, CPU)
        steps.append(net.fc.weight.detach() - before)
    assert torch.allclose(steps[1], 2 * steps[0], atol=1e-6)


def test_each_step_starts_from_zero_gradients():
    """train_epoch zeroes the gradients before each step: two steps move the weights as two
    separate SGD steps do, not as a gradient accumulated over both would."""
    torch.manual_seed(0)
    X, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    # eval: BatchNorm does not depend on the batch
    nets = [models.scratch_net(2).eval() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    nets[0].train = lambda mode=True: nets[0]  # keep it so inside train_epoch
    train_epoch(nets[0], [(X, y), (X, y)], loss, torch.optim.SGD(nets[0].parameters(), lr=1e-2),
                CPU)
    optimizer = torch.optim.SGD(nets[1].parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        loss(nets[1](X), y).sum().backward()
        optimizer.step()
    assert torch.allclose(nets[0].fc.weight, nets[1].fc.weight, atol=1e-6)


def test_each_epoch_trains_in_the_nets_training_mode():
    """train_epoch sets net.train(), as the book's train_batch_ch13 does each batch: after evaluate
    left the net in evaluation mode, BatchNorm learns its running statistics again."""
    torch.manual_seed(0)
    net = models.scratch_net(2).eval()  # as evaluating the epoch before leaves it
    X, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    before = net.bn1.running_mean.clone()
    train_epoch(net, [(X, y)], torch.nn.CrossEntropyLoss(reduction="none"),
                torch.optim.SGD(net.parameters(), lr=0.0), CPU)
    assert net.training and not torch.equal(net.bn1.running_mean, before)


def test_evaluate_uses_the_nets_evaluation_mode():
    """the book's evaluate_accuracy_gpu sets net.eval(): BatchNorm normalises with its running
    statistics, not the test batch's, and leaves them as they were."""
    torch.manual_seed(0)
    net = models.scratch_net(2).train()  # as an epoch of training leaves it
    X, y = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    before = {name: value.clone() for name, value in net.state_dict().items()}
    probs, labels = evaluate(net, [(X, y)], CPU)
    assert all(torch.equal(value, before[name]) for name, value in net.state_dict().items())
    with torch.no_grad():
        expected = torch.softmax(net.eval()(data.normalize_batch(X)), 1)
    assert torch.allclose(probs, expected, atol=1e-6)


def book_augs():
    """§14.2.2.1's augmentations as the book writes them: torchvision's PIL transforms, ToTensor
    and Normalize with ImageNet's statistics."""
    T = torchvision.transforms
    normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return (T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                       normalize]),
            T.Compose([T.Resize([256, 256]), T.CenterCrop(224), T.ToTensor(), normalize]))


def test_normalize_is_the_books():
    """normalize, for augmentations that end in ToTensor and normalize, as the book's do."""
    X = torch.rand(3, 4, 4)
    assert torch.equal(data.normalize(X), book_augs()[1].transforms[-1](X))


def test_augmentations_are_the_books_to_one_grey_level():
    """train_augs and test_augs, then normalize_batch, give the book's images within one grey
    level, with the same random draws (the crop's place and size, the flip), for the book's call
    (data.train_augs) and for a run (at resnet18's sizes, which are the book's)."""
    book_train, book_test = book_augs()
    sizes = archs.preprocessing("resnet18")
    assert sizes == dict(resize=256, crop=224, interpolation="bilinear")
    # not square
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8))
    one_grey = 1.5 / 255 / 0.224  # the differences are whole levels: below 1.5, at most one

    def ours(augs):
        return data.normalize_batch(augs(photo)[None])[0]
    for train_augs in (data.train_augs,
                       data.make_train_augs(sizes["crop"], sizes["interpolation"])):
        for seed in range(8):
            torch.manual_seed(seed)
            expected = book_train(photo)
            torch.manual_seed(seed)
            assert (ours(train_augs) - expected).abs().max() < one_grey, seed
    for test_augs in (data.test_augs,
                      data.make_test_augs(sizes["resize"], sizes["crop"], sizes["interpolation"])):
        assert (ours(test_augs) - book_test(photo)).abs().max() < one_grey


def test_loaders(folder):
    train_set, test_set = datasets.image_folders(folder)
    assert train_set.classes == ["hotdog", "not-hotdog"]
    train_iter, test_iter = loaders.make_loaders(train_set, test_set, batch_size=4)
    X, y = next(iter(test_iter))
    assert X.shape == (4, 3, 224, 224) and X.dtype == torch.uint8
    assert y.tolist() == [0, 0, 1, 1]  # hotdog = 0, not-hotdog = 1, in order
    expected = ((torch.tensor(COLOURS["hotdog"]) / 255 - torch.tensor(data.MEAN))
                / torch.tensor(data.STD))
    X = data.normalize_batch(X)
    assert X.dtype == torch.float32
    assert torch.allclose(X[0].mean((1, 2)), expected, atol=0.1)  # normalised as ImageNet
    assert next(iter(train_iter))[0].shape == (4, 3, 224, 224)
    with pytest.raises(RuntimeError, match="broadcast"):  # as the book's Normalize: not 3 channels
        data.normalize_batch(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))


def test_the_training_loader_is_shuffled_and_the_test_loader_is_not(folder):
    """The book's train_iter is shuffled (shuffle=True) and its test_iter is not: in the book's
    call (data.load_data) and in a run's loaders (loaders.make_loaders)."""
    def order(loader):
        return [i for batch in loader.batch_sampler for i in batch]
    torch.manual_seed(0)
    for train_iter, test_iter in (data.load_data(4, folder),
                                  loaders.make_loaders(*datasets.image_folders(folder), 4)):
        orders = [order(train_iter) for _ in range(3)]
        assert (all(sorted(o) == list(range(8)) for o in orders)
                and any(o != list(range(8)) for o in orders))
        assert order(test_iter) == list(range(4))


def test_the_books_loaders_refuse_test_classes_other_than_trains(tmp_path):
    """Label i is the i-th class folder of each: where test/'s are not train/'s, the test acc
    would score each test image against another class."""
    root = write_folder(tmp_path, train=1, test=1)
    os.rename(tmp_path / "test" / "not-hotdog", tmp_path / "test" / "pizza")
    with pytest.raises(UserError,
                       match=r"train has classes \['hotdog', 'not-hotdog'\] but \S*test has "
                             r"\['hotdog', " r"'pizza'\]; give both the same class folders$"):
        data.load_data(4, root)
    os.rename(tmp_path / "test" / "pizza", tmp_path / "test" / "not-hotdog")
    os.rename(tmp_path / "train" / "hotdog", tmp_path / "train" / "caf\u00e9")
    # one name, as macOS writes it: one class
    os.rename(tmp_path / "test" / "hotdog", tmp_path / "test" / "cafe\u0301")
    assert data.load_data(4, root)[1].dataset.classes == ["cafe\u0301", "not-hotdog"]


def test_test_folder_is_preferred_and_named(tmp_path, capsys):
    """The book's function evaluates test/ where val/ is there too; a run evaluates its epochs on
    val/ and tests on test/ once."""
    root = write_folder(tmp_path / "d", train=2, test=2)
    write_folder(tmp_path / "v", train=1, test=1)
    shutil.copytree(tmp_path / "v" / "test", tmp_path / "d" / "val")
    _, test_iter = data.load_data(4, root)
    assert os.path.basename(test_iter.dataset.root) == "test" and len(test_iter.dataset) == 4
    status, out, _ = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1,
                             "--batch-size", 8, "--workers", 0, "--out", tmp_path / "run")
    assert status == 0 and "testing on 2 in val/, and once, at the end, 4 in test/" in out


def test_the_books_loaders_hold_no_worker_process_between_passes(folder):
    """In a notebook the loaders live as long as the kernel holds them: their worker processes
    (one per core) must not."""
    import multiprocessing
    train_iter, test_iter = data.load_data(4, folder)
    assert train_iter.num_workers > 0
    before = set(multiprocessing.active_children())
    for loader in (train_iter, test_iter):
        assert sum(len(y) for _, y in loader) == len(loader.dataset)
    assert set(multiprocessing.active_children()) <= before


# ---------------------------------------------------------------- the book's calls, from Python
def test_the_books_train_fine_tuning_trains_and_returns_the_history(folder, capsys, monkeypatch):
    """§14.2's calls as the book writes them, data_dir apart: they train and return the history
    (the book's batch 128 and 5 epochs), and their loaders' worker processes end with the call."""
    import multiprocessing
    batch_sizes, make_loaders = [], loaders.make_loaders
    monkeypatch.setattr(loaders, "make_loaders",
                        lambda *a, **k: batch_sizes.append(a[2]) or make_loaders(*a, **k))
    finetune_net = models.finetune_net()
    before = finetune_net.fc.weight.detach().clone()
    children = set(multiprocessing.active_children())
    history = train.train_fine_tuning(finetune_net, 5e-5, data_dir=folder)
    assert set(multiprocessing.active_children()) <= children and batch_sizes == [128]
    out = capsys.readouterr().out
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5]  # the book's 5 epochs
    assert not torch.equal(finetune_net.fc.weight.detach().cpu(), before)
    last_two = out.strip().splitlines()[-2:]  # the book's closing lines
    m = history[-1]
    assert "epoch 5: loss" in out and last_two[0] == (f"loss {m['loss']:.3f}, train acc "
                                                      f"{m['train_acc']:.3f}, test acc "
                                                      f"{m['test_acc']:.3f}")
    assert last_two[1].endswith(f"examples/sec on {devices.make_runtime()}")
    scratch_net = models.scratch_net()
    history = train.train_fine_tuning(scratch_net, 5e-4, 4, 1, param_group=False, data_dir=folder)
    assert len(history) == 1 and history[0]["examples"] == 8


def test_train_ch13_takes_the_books_float_loaders_and_normalises_once(folder):
    """The book's own loaders (ToTensor + Normalize) reach the net as they are; uint8 batches
    would be normalised on the device instead."""
    T = torchvision.transforms
    normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    test_augs = T.Compose([T.Resize([256, 256]), T.CenterCrop(224), T.ToTensor(), normalize])
    test_imgs = torchvision.datasets.ImageFolder(os.path.join(folder, "test"), transform=test_augs)
    test_iter = torch.utils.data.DataLoader(test_imgs, batch_size=4)
    net, seen = models.scratch_net(), []
    net.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().float()))
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    trainer = torch.optim.SGD(net.parameters(), lr=1e-4, weight_decay=0.001)
    # the book's six arguments
    history = train.train_ch13(net, test_iter, test_iter, loss, trainer, 1)
    expected = torch.cat([X for X, _ in test_iter])
    # the evaluation's input
    assert len(history) == 1 and torch.allclose(torch.cat(seen[-1:]), expected)
    assert torch.allclose(torch.cat(seen[:-1]), expected)  # the training's: the same, unshuffled
