"""Tests for the hot-dog fine-tuning recipe, on tiny generated data, offline, on the CPU.

README's command runs them in two processes (pytest-xdist's `-n 2`)."""
import os

# One of several test processes (pytest-xdist's workers): torch's arithmetic in one thread each, set
# before torch starts its pool and inherited by the processes tests start, unless set already. Each
# process's threads would run, and spin waiting, on every core, and the processes slow each other:
# on a 2-core Intel Xeon with AMX, `-n 2` took 7 min 29 s with torch's threads, 2 min 55 s with one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
import contextlib
import errno
import fcntl
import hashlib
import http.server
import io
import itertools
import json
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

import data
import finetune
import models
import train
from beyond import (UserError, archs, cache, checkpoints, cli, datasets, devices, download, figures, files,
                    folders, loaders, options, phases, photos, pictures, predict, processes, progress, runs)
from beyond.devices import make_runtime, try_device
from train import evaluate, train_epoch

CPU = make_runtime(torch.device("cpu"), "fp32")

HERE = os.path.dirname(os.path.abspath(__file__))
COLOURS = {"hotdog": (220, 60, 30), "not-hotdog": (30, 60, 220)}


def write_folder(root, train=4, test=2, size=(40, 48), classes=COLOURS, seed=0):
    """An ImageFolder with train/ and test/ of plain noisy colours, one colour per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for name, colour in classes.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 20, size + (3,)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="session", autouse=True)
def torch_home(tmp_path_factory):
    """A TORCH_HOME holding stand-in "ImageNet" weights, so --pretrained loads them offline."""
    home = tmp_path_factory.mktemp("torch_home")
    os.makedirs(home / "hub" / "checkpoints")
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    os.environ["TORCH_HOME"] = str(home)
    return state


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """The data folder tests only read, written once for every test process (made_once, below),
    so that each run made once names the same one as the test that continues it."""
    return made_once(tmp_path_factory, "hotdog", write_folder)[1]


def one_epoch(net, train_iter, test_iter, runtime=CPU, lr=0.01):
    """The book's loop for one epoch, with the recipe's summed loss and optimizer: its Epochs."""
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    return list(train.ch13_epochs(net, train_iter, test_iter, loss, train.fine_tuning_optimizer(net, lr), range(1), runtime))


def run_cli(capsys, *argv):
    """finetune.py's main in this process: (exit status, stdout, stderr)."""
    status = finetune.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def made_once(tmp_path_factory, name, make):
    """(folder, make(folder)'s result): made once, in a folder of that name in this pytest run's
    temporary folder, for every test process (under README's `-n 2`, the first to ask makes it
    while the other waits). The result is kept as JSON (a tuple comes back a list); a make that
    fails is made again, from an empty folder, by the next process to ask."""
    shared = tmp_path_factory.getbasetemp()
    folder = (shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared) / name
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # let go when the file closes
        if not (folder / "made.json").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed make left
            folder.mkdir()
            (folder / "made.json").write_text(json.dumps(make(folder)))
    return folder, json.loads((folder / "made.json").read_text())


def trained_once(tmp_path_factory, name, *argv):
    """A command line's run, trained once for every test that reads it (made_once): its folder, and what it printed."""
    def make(where):
        with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.redirect_stderr(io.StringIO()) as err:
            assert finetune.main([str(a) for a in (*argv, "--out", where / "run")]) == 0, err.getvalue()
        return printed.getvalue()
    where, printed = made_once(tmp_path_factory, name, make)
    return where / "run", printed


SCRATCH = ["--scratch", "--epochs", 1, "--batch-size", 8, "--workers", 0]  # with --data-dir folder


@pytest.fixture(scope="session")
def scratch_run(folder, tmp_path_factory):
    """`SCRATCH --data-dir folder`, trained once: (its folder, what it printed). Tests only read
    it; one that resumes it, or runs it again, works on a copy (shutil.copytree)."""
    return trained_once(tmp_path_factory, "scratch_run", *SCRATCH, "--data-dir", folder)


@pytest.fixture(scope="session")
def compare_run(folder, tmp_path_factory):
    """`--compare` on folder, one epoch, batch 8, trained once: (its folder, what it printed)."""
    return trained_once(tmp_path_factory, "compare_run", "--compare", "--data-dir", folder, "--epochs", 1,
                        "--batch-size", 8, "--workers", 0)


# ---------------------------------------------------------------- models
def test_output_shapes_and_head_init():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision's deprecation warnings among them
        nets = models.finetune_net(2), models.scratch_net(5)
    for net in nets:
        assert net.eval()(torch.rand(3, 3, 64, 64)).shape == (3, net.fc.out_features)
    fc = models.finetune_net(2).fc
    bound = (6 / (512 + 2)) ** 0.5  # xavier-uniform's; nn.Linear's own init stays within 1 / 512 ** 0.5 = 0.044
    assert 0.8 * bound < fc.weight.abs().max() <= bound


def test_pretrained_weights_come_from_torch_home(torch_home):
    net = models.finetune_net(2)
    for name, value in net.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(value, torch_home[name]), name
    assert not torch.equal(net.fc.weight[:2], torch_home["fc.weight"][:2])


def test_weights_file(tmp_path, torch_home):
    torch.save(torch_home, tmp_path / "w.pth")
    net = models.finetune_net(2, weights_file=str(tmp_path / "w.pth"))
    assert torch.equal(net.conv1.weight, torch_home["conv1.weight"])
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not a resnet18 state-dict"):
        models.finetune_net(2, weights_file=str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="does not exist"):
        models.finetune_net(2, weights_file=str(tmp_path / "missing.pth"))


def test_weights_not_downloadable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache, so torchvision must download
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(UserError, match="weights_file=FILE"):
        models.finetune_net(2)


def recipe_optimizer(monkeypatch, net, lr, param_group=True):
    """The loss and optimizer that the book's train_fine_tuning hands to train_ch13."""
    classes = [str(c) for c in range(net.fc.out_features)]
    loader = type("Loader", (), {"dataset": type("Set", (), {"classes": classes})})
    monkeypatch.setattr(data, "load_data", lambda *a, **k: (loader, loader))
    monkeypatch.setattr(train, "train_ch13", lambda net, train_iter, test_iter, loss, optimizer, *a, **k: (loss, optimizer))
    return train.train_fine_tuning(net, lr, param_group=param_group)


def test_param_groups(monkeypatch):
    net = models.finetune_net(2)
    loss, optimizer = recipe_optimizer(monkeypatch, net, 0.1)
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(1.0)]
    assert all(g["weight_decay"] == 1e-3 for g in groups) and loss.reduction == "none"
    assert {id(p) for p in groups[1]["params"]} == {id(net.fc.weight), id(net.fc.bias)}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())  # each exactly once
    _, optimizer = recipe_optimizer(monkeypatch, net, 0.1, param_group=False)
    group, = optimizer.param_groups
    assert group["lr"] == 0.1 and group["weight_decay"] == 1e-3 and len(group["params"]) == len(list(net.parameters()))


def test_init_head_from_imagenet(torch_home):
    fc = models.finetune_net(2, hotdog_class=0).fc
    w, b = torch_home["fc.weight"], torch_home["fc.bias"]
    assert torch.equal(fc.weight[0], w[934]) and fc.bias[0] == b[934]
    others = torch.cat([w[:934], w[935:]])
    assert torch.allclose(fc.weight[1], others.mean(0))
    for index in (2, -1, "hotdog", 1.0):
        with pytest.raises(UserError, match=f"^hotdog_class={index!r} is not the index of a class; give one of 0 to 1$"):
            models.finetune_net(2, hotdog_class=index)


# ---------------------------------------------------------------- training
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


def test_progress_with_fewer_batches_than_five(capsys, monkeypatch):
    """The book's display divides by num_batches // 5, which is zero here."""
    monkeypatch.setattr("train.time.perf_counter", iter(range(0, 1000, 10)).__next__)  # 10 s a call
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # progress shows on a terminal only
    net = models.scratch_net(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    metrics = train_epoch(net, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))],
                          torch.nn.CrossEntropyLoss(reduction="none"), optimizer, CPU)
    assert metrics["examples"] == 2
    err = capsys.readouterr().err
    assert "batch 1/1" in err and err.endswith("\r\033[K")


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
    nets = [models.scratch_net(2).eval() for _ in range(2)]  # eval: BatchNorm does not depend on the batch
    nets[1].load_state_dict(nets[0].state_dict())
    nets[0].train = lambda mode=True: nets[0]  # keep it so inside train_epoch
    train_epoch(nets[0], [(X, y), (X, y)], loss, torch.optim.SGD(nets[0].parameters(), lr=1e-2), CPU)
    optimizer = torch.optim.SGD(nets[1].parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        loss(nets[1](X), y).sum().backward()
        optimizer.step()
    assert torch.allclose(nets[0].fc.weight, nets[1].fc.weight, atol=1e-6)


def test_examples_per_sec_are_the_books_all_epochs_over_their_time():
    """The summary's speed, as the book's train_ch13 gives it: every example over every second
    (the mean of the epochs' speeds would count a slow epoch as much as a fast one)."""
    history = [dict(examples=100, examples_per_sec=10.0), dict(examples=100, examples_per_sec=50.0)]
    assert progress.mean_speed(history) == pytest.approx(200 / (10 + 2))


def test_freeze_trains_only_the_head(folder):
    net = models.finetune_net(2)
    models.freeze_features(net)  # as a statement: in place
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_iter, test_iter = loaders.make_loaders(*datasets.image_folders(folder), batch_size=4)
    one_epoch(net, train_iter, test_iter)
    after = net.state_dict()
    for name in before:  # weights and BatchNorm statistics alike
        assert torch.equal(before[name], after[name]) == (not name.startswith("fc.")), name


def test_device_choice(monkeypatch):
    """CUDA, else MPS, else the CPU; every GPU for the book's try_all_gpus (simulated here)."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert try_device() == torch.device("cpu") and devices.try_all_gpus() == [torch.device("cpu")]
    with pytest.raises(UserError, match="no such device"):
        try_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert try_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert try_device() == torch.device("cuda") and try_device("cuda:1") == torch.device("cuda", 1)
    assert devices.try_all_gpus() == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(UserError, match="no such device"):
        try_device("cuda:2")


def test_the_cpu_named_twice_is_refused_before_the_data(folder, tmp_path):
    """nn.DataParallel splits a batch among GPUs: the CPU twice (or one GPU twice) would run it
    on the CPU in fp16, DataParallel's type."""
    for named in (["cpu", "cpu"], [torch.device("cpu"), "cpu"]):
        with pytest.raises(UserError, match=r"devices=\['cpu', 'cpu'\]: nn.DataParallel .* give one device"):
            train.train_fine_tuning(models.scratch_net(), 5e-4, 4, 1, False, data_dir=str(tmp_path / "none"), devices=named)
    with pytest.raises(UserError, match="^devices=gpu: this machine has no such device; give no devices= "):  # its keyword
        train.train_fine_tuning(models.scratch_net(), 5e-4, devices="gpu")


# ---------------------------------------------------------------- data
def test_loaders(folder):
    train_set, test_set = datasets.image_folders(folder)
    assert train_set.classes == ["hotdog", "not-hotdog"]
    train_iter, test_iter = loaders.make_loaders(train_set, test_set, batch_size=4)
    X, y = next(iter(test_iter))
    assert X.shape == (4, 3, 224, 224) and X.dtype == torch.uint8
    assert y.tolist() == [0, 0, 1, 1]  # hotdog = 0, not-hotdog = 1, in order
    expected = (torch.tensor(COLOURS["hotdog"]) / 255 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)
    X = data.normalize(X)
    assert X.dtype == torch.float32
    assert torch.allclose(X[0].mean((1, 2)), expected, atol=0.1)  # normalised as ImageNet
    assert next(iter(train_iter))[0].shape == (4, 3, 224, 224)


def test_cache_gives_the_same_images(folder):
    cached, _ = datasets.image_folders(folder)
    plain, _ = datasets.image_folders(folder, cache_budget=0)
    assert isinstance(cached, cache.DecodedImages) and not isinstance(plain, cache.DecodedImages)
    torch.manual_seed(1)
    a = cached[3]
    torch.manual_seed(1)
    b = plain[3]
    assert a[1] == b[1] and torch.equal(a[0], b[0])


def test_image_modes_load_as_rgb(tmp_path):
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    for mode in ("L", "P", "RGBA", "CMYK"):
        img.convert(mode).save(tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    for path in tmp_path.iterdir():
        assert photos.load_rgb(str(path)).mode == "RGB"


def test_unreadable_and_huge_images_are_named(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(UserError, match="cut.png"):
        photos.load_rgb(str(tmp_path / "cut.png"))
    png = (tmp_path / "ok.png").read_bytes()  # a text chunk too large to decompress, after the PNG's header
    text = b"zTXt" + b"Comment\0\0" + zlib.compress(bytes(2 << 20))
    (tmp_path / "text.png").write_bytes(png[:33] + struct.pack(">I", len(text) - 4) + text
                                        + struct.pack(">I", zlib.crc32(text)) + png[33:])
    (tmp_path / "head.ppm").write_bytes(b"P6\n64 4X\n255\n" + bytes(100))
    for name in ("text.png", "head.ppm"):  # PIL raises ValueError for these, not OSError
        for read in (photos.load_rgb, photos.image_size):
            with pytest.raises(UserError, match=f"^cannot read image .*{name} .*; delete or replace that file"):
                read(str(tmp_path / name))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for read in (photos.load_rgb, photos.image_size):  # the cache's size estimate reads headers too
        with pytest.raises(UserError, match="ok.png"):
            read(str(tmp_path / "ok.png"))


def test_decoding_in_threads_leaves_the_warnings_filters_as_found(tmp_path):
    """The cache decodes in several threads, and each image's size check changes Python's warnings
    filters (the process's) for a moment: one thread at a time, so none is left behind."""
    root = write_folder(tmp_path, train=40, test=10)
    before = list(warnings.filters)
    for _ in range(3):
        assert isinstance(datasets.image_folders(root, workers=2)[0], cache.DecodedImages)
    assert warnings.filters == before


def test_non_image_files_are_skipped(tmp_path):
    root = write_folder(tmp_path)
    (tmp_path / "train" / "hotdog" / "notes.txt").write_text("not an image")
    assert len(datasets.image_folders(root)[0]) == 8


def test_dummy_run(tmp_path, capsys, monkeypatch):
    real = datasets.fake_data
    monkeypatch.setattr(datasets, "fake_data", lambda: real(8, 4))  # a hot-dog set is 2000 + 800
    status, out, _ = run_cli(capsys, "--scratch", "--dummy", "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path)
    assert status == 0 and "training on 8 images, testing on 4" in out
    assert json.load(open(tmp_path / "metrics.json"))["classes"] == ["0", "1"]


def test_fake_data():
    train_set, test_set = datasets.fake_data()
    X, y = train_set[0]
    assert len(train_set) == 2000 and len(test_set) == 800
    assert X.shape == (3, 224, 224) and y in (0, 1)


# ---------------------------------------------------------------- download
def make_zip(tmp_path, names=("hotdog/train/hotdog/0.png", "hotdog/test/hotdog/0.png")):
    buf = io.BytesIO()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with zipfile.ZipFile(buf, "w") as z:
        for name in names:
            z.writestr(name, png.getvalue())
    return buf.getvalue()


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1: files maps a path to (body, claimed length)."""
    files, requests = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body, length = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", files, requests
    httpd.shutdown()


def test_download_verify_extract_once(tmp_path, server):
    url, files, requests = server
    body = make_zip(tmp_path)
    files["/hotdog.zip"] = (body, len(body))
    sha1 = hashlib.sha1(body).hexdigest()
    folder = data.get_hotdog(str(tmp_path), url + "/hotdog.zip", sha1)
    assert os.path.isfile(os.path.join(folder, "train", "hotdog", "0.png"))
    assert data.get_hotdog(str(tmp_path), url + "/hotdog.zip", sha1) == folder
    assert requests == ["/hotdog.zip"]  # the second call did not download
    assert sorted(os.listdir(tmp_path)) == ["hotdog", "hotdog.zip"]


def test_checksum_mismatch_removes_the_file(tmp_path, server):
    url, files, _ = server
    files["/hotdog.zip"] = (b"junk", 4)
    with pytest.raises(UserError, match="wrong SHA-1 .* so it was removed"):
        data.get_hotdog(str(tmp_path), url + "/hotdog.zip", "0" * 40)
    assert os.listdir(tmp_path) == []
    (tmp_path / "hotdog.zip").write_bytes(b"put here by hand")  # as the offline advice says: kept aside
    with pytest.raises(UserError, match="so it was moved to .*hotdog.zip.bad; run again"):
        data.get_hotdog(str(tmp_path), url + "/hotdog.zip", "0" * 40)
    assert os.listdir(tmp_path) == ["hotdog.zip.bad"]


def test_truncated_download_leaves_nothing(tmp_path, server):
    url, files, _ = server
    body = make_zip(tmp_path)
    files["/hotdog.zip"] = (body[:100], len(body))
    with pytest.raises(UserError, match="cannot download"):
        data.get_hotdog(str(tmp_path), url + "/hotdog.zip", hashlib.sha1(body).hexdigest())
    assert os.listdir(tmp_path) == []


def test_no_network_says_where_to_put_the_zip(tmp_path):
    with pytest.raises(UserError, match=r"put it at .*hotdog\.zip"):
        data.get_hotdog(str(tmp_path), "http://127.0.0.1:9/hotdog.zip", "0" * 40)


def test_not_a_zip_and_escaping_paths_are_refused(tmp_path, server):
    url, files, _ = server
    for body, message in ((b"not a zip at all", "not a whole zip"),
                          (make_zip(tmp_path, ["../evil.png"]), "outside the data root")):
        root = tmp_path / message.replace(" ", "_")
        files["/hotdog.zip"] = (body, len(body))
        with pytest.raises(UserError, match=message):
            data.get_hotdog(str(root), url + "/hotdog.zip", hashlib.sha1(body).hexdigest())
        assert not os.path.exists(root / "hotdog") and not os.path.exists(tmp_path / "evil.png")


def test_interrupted_extraction_is_redone(tmp_path, server):
    url, files, _ = server
    body = make_zip(tmp_path)
    files["/hotdog.zip"] = (body, len(body))
    os.makedirs(tmp_path / "hotdog.part" / "train")  # what a killed run leaves
    folder = data.get_hotdog(str(tmp_path), url + "/hotdog.zip", hashlib.sha1(body).hexdigest())
    assert os.path.isfile(os.path.join(folder, "test", "hotdog", "0.png"))
    assert not os.path.exists(tmp_path / "hotdog.part")


def test_a_full_disk_while_extracting_is_one_line(tmp_path, server, monkeypatch):
    url, files, _ = server
    body = make_zip(tmp_path)
    files["/hotdog.zip"] = (body, len(body))
    monkeypatch.setattr(zipfile.ZipFile, "extract",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(UserError, match=r"cannot extract .*hotdog\.zip .*\(No space left on device\); free some space"):
        data.get_hotdog(str(tmp_path), url + "/hotdog.zip", hashlib.sha1(body).hexdigest())
    assert not os.path.exists(tmp_path / "hotdog.part") and not os.path.exists(tmp_path / "hotdog")


# ---------------------------------------------------------------- command line
def test_cli_pretrained_and_scratch(folder, tmp_path, capsys):
    for mode in ("--pretrained", "--scratch"):
        status, out, _ = run_cli(capsys, mode, "--data-dir", folder, "--epochs", 1, "--batch-size", 4,
                                 "--workers", 1, "--out", tmp_path / mode)
        assert status == 0, out
        assert "epoch 1: loss" in out and "examples/sec on cpu" in out
        metrics = json.load(open(tmp_path / mode / "metrics.json"))
        assert metrics["lr"] == {"--pretrained": 5e-5, "--scratch": 5e-4}[mode]
        assert len(metrics["history"]) == 1 and 0 <= metrics["test_acc"] <= 1
        assert f"test acc {metrics['test_acc']:.3f}" in out
        confusion = torch.tensor(metrics["confusion"])
        assert confusion.sum() == 4 and confusion.trace() / 4 == pytest.approx(metrics["test_acc"])
        assert (tmp_path / mode / "curves.png").stat().st_size > 0


def test_cli_as_a_user_runs_it(folder, tmp_path):
    """The real command in a fresh process, with loader worker utils."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "finetune.py"), "--pretrained",
                             "--data-dir", folder, "--epochs", "1", "--batch-size", "8",
                             "--workers", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "examples/sec on cpu" in result.stdout and (tmp_path / "model.pt").exists()


def test_compare_and_several_lrs(folder, tmp_path, capsys, compare_run):
    both, out = compare_run
    table = out.split("book")[-1]
    assert "pretrained" in table and "test acc 0.940" in table
    assert "scratch" in table and "test acc 0.850" in table
    assert (both / "pretrained" / "model.pt").exists() and (both / "scratch" / "model.pt").exists()
    status, out, _ = run_cli(capsys, "--scratch", "--lr", "1e-4", "1e-3", "--data-dir", folder,
                             "--epochs", 1, "--batch-size", 8, "--workers", 0, "--out", tmp_path / "lrs")
    assert status == 0 and "scratch-lr0.0001" in out and "scratch-lr0.001" in out
    assert json.load(open(tmp_path / "lrs" / "scratch-lr0.001" / "metrics.json"))["lr"] == 1e-3


def test_predict_matches_the_evaluation_loop(folder, tmp_path, capsys, scratch_run):
    run, _ = scratch_run
    ckpt = torch.load(run / "model.pt", weights_only=True)
    net = models.scratch_net(2)
    net.load_state_dict(ckpt["model"])
    _, test_set = datasets.image_folders(folder)
    probs, labels = evaluate(net, loaders.make_loaders(test_set, test_set, 4)[1], CPU)
    paths = [p for p, _ in test_set.samples]
    status, out, _ = run_cli(capsys, "--predict", *paths, "--model", run / "model.pt", "--precision", "fp32",
                             "--out", tmp_path / "predictions")
    assert status == 0
    for line, p in zip(out.splitlines(), probs):
        name, prob = line.split(": ")[1].split()
        assert name == ckpt["classes"][p.argmax()] and float(prob) == pytest.approx(p.max().item(), abs=1e-3)


def test_mistakes_are_the_misclassified_images(tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path / "d", train=4, test=4)
    for name in ("0.png", "1.png"):  # swap two test images per class: some mistakes are certain
        a, b = tmp_path / "d" / "test" / "hotdog" / name, tmp_path / "d" / "test" / "not-hotdog" / name
        a.rename(tmp_path / "swap.png"), b.rename(a), (tmp_path / "swap.png").rename(b)
    shown = {}
    real = pictures.grid
    monkeypatch.setattr(pictures, "grid", lambda rows, captions, path, scale: shown.update(
        images=sum(rows, []), captions=sum(captions, []), path=real(rows, captions, path, scale)))
    status, out, _ = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--precision", "fp32", "--out", tmp_path / "out")
    assert status == 0
    net = models.scratch_net(2)
    net.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True)["model"])
    _, test_set = datasets.image_folders(root)
    probs, labels = evaluate(net, loaders.make_loaders(test_set, test_set, 4)[1], CPU)
    wrong = (probs.argmax(1) != labels).nonzero().flatten().tolist()
    assert wrong and len(shown["images"]) == len(wrong)
    for image, i, caption in zip(shown["images"], wrong, shown["captions"]):
        assert torch.equal(image, test_set[i][0])
        assert caption.startswith(f"true {test_set.classes[labels[i]]}\npred {test_set.classes[1 - labels[i]]}")
    assert os.path.getsize(shown["path"]) > 0 and shown["path"].endswith("mistakes.png")
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    confusion = torch.tensor(metrics["confusion"])
    assert confusion.sum() == 8 and confusion.trace() == 8 - len(wrong)
    assert 1 - len(wrong) / 8 == pytest.approx(metrics["test_acc"])
    assert "confusion of epoch 1, the one best.pt keeps (rows: true class" in out


def test_a_finished_run_is_never_overwritten(folder, tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path, dirs_exist_ok=True)  # SCRATCH, run once into tmp_path
    argv = [*SCRATCH, "--data-dir", folder, "--out", tmp_path]
    before = (tmp_path / "model.pt").read_bytes()
    status, out, err = run_cli(capsys, *argv)  # the same command again: nothing left to do
    assert status == 0 and "scratch: finished its 1 epochs already" in out, err
    status, _, err = run_cli(capsys, *argv, "--lr", "1e-3", "--seed", 5)  # another run's options
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "was made with other options (--lr: the default there, 0.001 now; --seed: 0 there, 5 now)" in err
    assert (tmp_path / "model.pt").read_bytes() == before


def test_resume_refuses_another_architecture(folder, tmp_path, capsys, scratch_run):
    ckpt = torch.load(scratch_run[0] / "model.pt", weights_only=True)
    ckpt["model"] = torchvision.models.resnet34(num_classes=2).state_dict()
    torch.save(ckpt, tmp_path / "other.pt")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "other.pt", "--epochs", 2)
    assert status == 2 and "another architecture" in err


def test_show_samples(folder, tmp_path, capsys):
    status, out, _ = run_cli(capsys, "--show-samples", "--data-dir", folder, "--out", tmp_path)
    assert status == 0 and (tmp_path / "samples.png").stat().st_size > 0 and "samples.png" in out
    shutil.copytree(folder, tmp_path / "d")
    among = str(tmp_path / "d" / "train" / "hotdog")  # samples.png there would be trained on
    status, _, err = run_cli(capsys, "--show-samples", "--data-dir", tmp_path / "d", "--out", among)
    assert status == 2 and f"--out {among} lies in" in err and not os.path.exists(os.path.join(among, "samples.png"))


def test_resume_ends_with_the_same_weights(folder, tmp_path, capsys):
    common = ["--scratch", "--data-dir", folder, "--batch-size", 4, "--workers", 0, "--lr", "1e-3"]
    assert run_cli(capsys, *common, "--epochs", 2, "--out", tmp_path / "whole")[0] == 0
    assert run_cli(capsys, *common, "--epochs", 1, "--out", tmp_path / "cut")[0] == 0
    status, out, _ = run_cli(capsys, "--resume", tmp_path / "cut" / "model.pt", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out and "epoch 1:" not in out
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    for name, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert whole["history"][1]["loss"] == resumed["history"][1]["loss"]


def test_ctrl_c_saves_and_says_how_to_resume(folder, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "finetune.py"), "--scratch",
                             "--data-dir", folder, "--epochs", "50", "--batch-size", "8",
                             "--workers", "0", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even where the suite ignores it
    for line in proc.stdout:  # epoch 2's line comes after epoch 1's checkpoint, whatever the machine's speed
        if line.startswith("  epoch 2:"):
            break
    proc.send_signal(2)  # SIGINT, as Ctrl-C
    out, err = proc.communicate()
    assert proc.returncode == 130, err
    assert f"--resume {tmp_path / 'model.pt'}" in err and "Traceback" not in err
    assert torch.load(tmp_path / "model.pt", weights_only=True)["history"]


@pytest.mark.parametrize("mode", [["--predict", "test", "--model", "run"], ["--scratch", "--data-dir", "."]])
def test_output_read_no_more_stops_it_quietly(folder, tmp_path, scratch_run, mode):
    """`finetune.py ... | head -1`: where what it prints is read no more, it stops, with no
    traceback and the status of a tool stopped by SIGPIPE (128 + 13)."""
    argv = [{"test": os.path.join(folder, "test"), "run": scratch_run[0], ".": folder}.get(a, a) for a in mode]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "finetune.py"), *map(str, argv), "--workers", "0",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == "", err


def test_an_epoch_is_saved_before_its_line_is_printed(folder, tmp_path):
    """`| head -2`: the run stops at the line it cannot print, and the epoch that line reports is kept."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "finetune.py"), *map(str, SCRATCH), "--data-dir", folder,
                             "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("scratch: resnet18"):  # the run's header: epoch 1's line comes next
            break
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == "", err
    assert [m["epoch"] for m in torch.load(tmp_path / "model.pt", weights_only=True)["history"]] == [1]


@pytest.mark.parametrize("setup, argv, message", [
    (None, ["--data-dir", "{tmp}/nowhere"], "nowhere/train is not a folder"),
    ("no_test", ["--data-dir", "{tmp}/d"], "test is not a folder"),
    ("other_classes", ["--data-dir", "{tmp}/d"], "give both the same class folders"),
    ("empty_class", ["--data-dir", "{tmp}/d"], "put images in every class folder"),
    ("loose_images", ["--data-dir", "{tmp}/d"], r"d/train holds images \(0.png, ...\) but 0 class folder.*train/<class>/<image>"),
    ("one_class", ["--data-dir", "{tmp}/d"], r"1 class folder\(s\) \['hotdog'\]; the layout is train/<class>/<image>"),
    ("ok", ["--data-dir", "{tmp}/d", "--init-head-from-imagenet"], "no class is named like hot dog .* --init-head-from-imagenet"),
    ("ok", ["--data-dir", "{tmp}/d", "--weights", "{tmp}/none.pth"], "does not exist"),
    ("ok", ["--data-dir", "{tmp}/d", "--device", "cuda"], "no such device"),
    ("ok", ["--data-dir", "{tmp}/d", "--device", "cuda:7"], "no such device"),
    ("ok", ["--data-dir", "{tmp}/d", "--device", "gpu"], "--device gpu: this machine has no such device"),
    ("ok", ["--data-dir", "{tmp}/d", "--device", "xpu"], "--device xpu: this program computes on cpu, cuda .* or mps"),
    ("ok", ["--resume", "{tmp}/none.pt"], "does not exist"),
])
def test_bad_input_is_one_line(setup, argv, message, tmp_path, capsys):
    root = tmp_path / "d"
    if setup:
        write_folder(root, train=2, test=1)
    if setup == "no_test":
        shutil.rmtree(root / "test")
    if setup == "other_classes":
        os.rename(root / "test" / "hotdog", root / "test" / "pizza")
    if setup == "empty_class":
        os.makedirs(root / "train" / "pizza")
        os.makedirs(root / "test" / "pizza")
    if setup == "loose_images":
        for name in os.listdir(root / "train" / "hotdog"):
            os.rename(root / "train" / "hotdog" / name, root / "train" / name)
        shutil.rmtree(root / "train" / "hotdog")
        shutil.rmtree(root / "train" / "not-hotdog")
    if setup == "one_class":
        shutil.rmtree(root / "train" / "not-hotdog")
    if "--init-head-from-imagenet" in argv:
        os.rename(root / "train" / "hotdog", root / "train" / "sausage")
        os.rename(root / "test" / "hotdog", root / "test" / "sausage")
    if "cuda" in argv and torch.cuda.is_available() or "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    argv = [a.format(tmp=tmp_path) for a in argv]
    mode = [] if "--resume" in argv else ["--pretrained"]
    status, out, err = run_cli(capsys, *mode, *argv, "--epochs", 1, "--out", tmp_path / "out")
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    import re
    assert re.search(message, err), err


def test_bad_arguments_are_refused(capsys):
    for argv in (["--scratch", "--epochs", "0"], ["--scratch", "--lr", "-1"], ["--predict", "x.png"], []):
        with pytest.raises(SystemExit) as e:
            finetune.main(argv)
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_resume_refuses_another_class_set(folder, tmp_path, capsys, scratch_run):
    ckpt = torch.load(scratch_run[0] / "model.pt", weights_only=True)
    ckpt["args"]["data_dir"] = write_folder(tmp_path / "three", 1, 1, classes={"a": (0, 0, 0), "b": (1, 1, 1), "c": (2, 2, 2)})
    torch.save(ckpt, tmp_path / "other.pt")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "other.pt", "--epochs", 2)
    assert status == 2 and "trained on classes" in err


def test_batch_larger_than_the_training_set(folder, tmp_path, capsys):
    status, out, _ = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1,
                             "--batch-size", 1000, "--workers", 0, "--out", tmp_path)
    assert status == 0 and "epoch 1:" in out


def test_out_of_memory_names_the_batch_size(folder, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(train, "ch13_epochs", oom)
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--batch-size", 64,
                             "--out", tmp_path)
    assert status == 2 and "--batch-size 64" in err and "--batch-size 32" in err


def test_cifar10_through_the_same_dataset_function(tmp_path, capsys, monkeypatch):
    """Generated data in CIFAR-10's on-disk layout; torchvision checks the real files' MD5."""
    import pickle
    folder = tmp_path / "cifar-10-batches-py"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 4)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(range(n))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    status, out, _ = run_cli(capsys, "--pretrained", "--dataset", "cifar10", "--data-root", tmp_path,
                             "--epochs", 1, "--batch-size", 8, "--workers", 0, "--out", tmp_path / "out")
    assert status == 0 and "training on 10 images" in out
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert metrics["classes"] == [f"c{i}" for i in range(10)] and metrics["lr"] == 5e-4
    assert metrics["args"]["epochs"] == 1
    monkeypatch.undo()  # the real MD5 checks again
    (tmp_path / "placed").mkdir()  # an archive put there by hand, not CIFAR-10's; no network to fetch another
    (tmp_path / "placed" / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(UserError, match=r"cifar-10-python.tar.gz is not CIFAR-10's archive .*no network.*delete it"):
        datasets.cifar10(str(tmp_path / "placed"))


def test_pictures_are_optional(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    assert pictures.curves({"run": [{"epoch": 1, "loss": 1, "train_acc": 0, "test_acc": 0}]},
                                 str(tmp_path / "curves.png")) is None
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "curves.png").exists()


# ---------------------------------------------------------------- several processes
def ddp_worker(rank, root, out):
    """One of two gloo processes: train one epoch, save what it ended with and what it saw; then
    take one step on its half of a batch of 4 (ddp_step), and save that step."""
    store = f"file://{os.path.join(out, 'store')}"  # no port, which another test process could take first
    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    torch.manual_seed(0)
    net = models.scratch_net(2)
    train_iter, test_iter = loaders.make_loaders(*datasets.image_folders(root), batch_size=4)
    seen = list(train_iter.sampler)  # epoch 0's share, as train() will draw it
    epochs = one_epoch(net, train_iter, test_iter)
    torch.save({"model": net.state_dict(), "seen": seen, "test_acc": epochs[-1].metrics["test_acc"],
                "n": epochs[-1].metrics}, os.path.join(out, f"rank{rank}.pt"))
    torch.save(ddp_step(rank), os.path.join(out, f"step{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory):
    """ddp_worker's two processes, started once for the tests that read what they saved: (the
    folder of what they saved, their data folder)."""
    def make(out):
        root = write_folder(out / "d", train=4, test=3)  # 8 train images, 6 test images
        torch.multiprocessing.spawn(ddp_worker, (root, str(out)), nprocs=2)
        return root
    return made_once(tmp_path_factory, "two_processes", make)


def test_two_processes_agree(two_processes):
    out, root = two_processes
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), name
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert sorted(seen) == list(range(8))  # every training example once
    net = models.scratch_net(2)
    net.load_state_dict(ranks[0]["model"])
    _, test_set = datasets.image_folders(root)
    probs, labels = evaluate(net, loaders.make_loaders(test_set, test_set, 6)[1], CPU)
    single = (probs.argmax(1) == labels).float().mean().item()
    assert ranks[0]["test_acc"] == ranks[1]["test_acc"] == pytest.approx(single)


def one_step(net, X, y):
    """fc.weight's change after one train_epoch step on (X, y), with BatchNorm kept in eval mode
    so that the step does not depend on how the batch is split."""
    net.eval().train = lambda mode=True: net
    before = net.fc.weight.detach().clone()
    model = processes.parallel(net, [torch.device("cpu")])
    train_epoch(model, [(X, y)], torch.nn.CrossEntropyLoss(reduction="none"),
                torch.optim.SGD(net.parameters(), lr=1e-3), CPU)
    return net.fc.weight.detach() - before


def ddp_step(rank):
    """fc.weight's step in process rank of two, on its half of a batch of 4."""
    torch.manual_seed(0)
    X, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    torch.manual_seed(1)
    return one_step(models.scratch_net(2), X[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2])


def test_two_processes_sum_the_gradient_over_the_global_batch(two_processes):
    """Two processes of 2 examples each take the step one process takes on all 4: DDP's own
    averaging would halve it, and the book's learning rates assume the sum."""
    torch.manual_seed(0)
    X, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    torch.manual_seed(1)
    single = one_step(models.scratch_net(2), X, y)
    for rank in (0, 1):
        assert torch.allclose(torch.load(two_processes[0] / f"step{rank}.pt"), single, atol=1e-6)


@contextlib.contextmanager
def printed_by_processes(path):
    """stdout and stderr at the file-descriptor level, which child processes inherit, written to
    path.out and path.err while the block runs (capfd does this for one test, not for a fixture)."""
    saved = os.dup(1), os.dup(2)
    with open(f"{path}.out", "w") as out, open(f"{path}.err", "w") as err:
        for fd, file in ((1, out), (2, err)):
            (sys.stdout, sys.stderr)[fd - 1].flush()
            os.dup2(file.fileno(), fd)
        try:
            yield
        finally:
            for fd in (1, 2):
                (sys.stdout, sys.stderr)[fd - 1].flush()
                os.dup2(saved[fd - 1], fd)
                os.close(saved[fd - 1])


@pytest.fixture(scope="session")
def launched_run(tmp_path_factory):
    """`finetune.py --scratch --data-dir D` (one epoch, batch 8, --device cpu, the default loader
    workers) as `python finetune.py` starts it on a machine with 3 GPUs: through
    cli.on_all_gpus, here as 3 CPU processes, on 6 training images and 2 test images (fewer
    than the processes; and a batch of 8 does not divide by 3). Launched once for the tests that
    read it: (its folder, the exit status, what the processes printed on stdout, and on stderr)."""
    def make(where):
        root = write_folder(where / "data", train=3, test=1)
        argv = ["--scratch", "--data-dir", root, "--epochs", "1", "--batch-size", "8", "--out", where / "run",
                "--seed", 2**64 - 1]  # the largest: each process's seed + rank wraps round
        return launched(argv, where / "printed", processes=3)
    where, (status, printed, err) = made_once(tmp_path_factory, "launched_run", make)
    return where / "run", status, printed, err


def launched(argv, printed, processes=2):
    """finetune.py's argv in CPU processes (cli.on_all_gpus): the exit status, and what they
    printed on stdout and on stderr (in printed.out and printed.err)."""
    with printed_by_processes(printed):
        status = cli.on_all_gpus([*map(str, argv), "--device", "cpu"], processes,
                                 os.path.join(HERE, "finetune.py"))
    return status, open(f"{printed}.out").read(), open(f"{printed}.err").read()


def test_torchrun_command_line(launched_run):
    """torchrun's command line as cli.on_all_gpus gives it to torchrun's own parser (`torchrun
    --standalone --nproc_per_node=3 finetune.py ...`); the command typed, `python -m
    torch.distributed.run ...`, trains in the tests of torchrun's restarts below."""
    run, status, out, err = launched_run
    assert status == 0, err
    assert out.count("epoch 1:") == 1  # only process 0 prints
    assert json.load(open(run / "metrics.json"))["world_size"] == 3


def test_all_gpus_launcher_on_cpu_processes(launched_run):
    """The processes `python finetune.py` starts on a machine with several GPUs, here on the CPU."""
    run, status, _, err = launched_run
    assert status == 0, err
    metrics = json.load(open(run / "metrics.json"))
    cores = len(os.sched_getaffinity(0))
    assert metrics["world_size"] == 3 and metrics["args"]["workers"] == max(1, min(16, cores // 3))  # shared, at most 16


def test_a_process_killed_is_reported_in_one_line(capsys):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    failure = ProcessFailure(local_rank=1, pid=123, exitcode=-9, error_file="")
    assert cli.died(ChildFailedError("finetune.py", {1: failure})) == 1
    assert capsys.readouterr().err == ("error: process 1 was killed by SIGKILL (as the out-of-memory killer does: "
                                       "try a smaller --batch-size or fewer --workers)\n")


# ---------------------------------------------------------------- data as it really arrives
def add_junk(root):
    """What notebooks, macOS and zip files leave in a data folder."""
    for split in ("train", "test"):
        os.makedirs(root / split / ".ipynb_checkpoints")  # empty: once "Found no valid file"
        os.makedirs(root / split / "__MACOSX" / "hotdog")
        (root / split / "__MACOSX" / "hotdog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 apple double")
        (root / split / "hotdog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 apple double")
        (root / split / "hotdog" / ".DS_Store").write_bytes(b"junk")
        os.makedirs(root / split / "hotdog" / ".ipynb_checkpoints")
        Image.new("RGB", (8, 8)).save(root / split / "hotdog" / ".ipynb_checkpoints" / "0-checkpoint.png")


def test_hidden_entries_are_never_classes_or_images(tmp_path, capsys):
    root = tmp_path / "d"
    write_folder(root, train=3, test=2)
    add_junk(root)
    for cache_budget in (None, 0):
        train_set, test_set = datasets.image_folders(root, cache_budget)
        assert train_set.classes == test_set.classes == ["hotdog", "not-hotdog"]
        assert len(train_set) == 6 and len(test_set) == 4
        assert not any("/." in p or "__MACOSX" in p for p, _ in train_set.samples + test_set.samples)
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4,
                               "--workers", 0, "--out", tmp_path / "out")
    assert status == 0, err
    assert ".ipynb" not in out and len(json.load(open(tmp_path / "out" / "metrics.json"))["confusion"]) == 2
    assert run_cli(capsys, "--show-samples", "--data-dir", root, "--out", tmp_path / "samples")[0] == 0


@pytest.mark.parametrize("name", ["val", "valid", "validation"])
def test_val_folder_when_there_is_no_test_folder(name, tmp_path, capsys):
    root = tmp_path / "d"
    write_folder(root, train=2, test=3)
    os.rename(root / "test", root / name)
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4,
                               "--workers", 0, "--out", tmp_path / "out")
    assert status == 0, err
    assert f"testing on 6 in {name}/" in out
    assert torch.tensor(json.load(open(tmp_path / "out" / "metrics.json"))["confusion"]).sum() == 6


def test_the_books_loaders_refuse_test_classes_other_than_trains(tmp_path):
    """Label i is the i-th class folder of each: where test/'s are not train/'s, the test acc
    would score each test image against another class."""
    root = write_folder(tmp_path, train=1, test=1)
    os.rename(tmp_path / "test" / "not-hotdog", tmp_path / "test" / "pizza")
    with pytest.raises(UserError, match=r"train has classes \['hotdog', 'not-hotdog'\] but \S*test has \['hotdog', "
                                        r"'pizza'\]; give both the same class folders$"):
        data.load_data(4, root)
    os.rename(tmp_path / "test" / "pizza", tmp_path / "test" / "not-hotdog")
    os.rename(tmp_path / "train" / "hotdog", tmp_path / "train" / "caf\u00e9")
    os.rename(tmp_path / "test" / "hotdog", tmp_path / "test" / "cafe\u0301")  # one name, as macOS writes it: one class
    assert data.load_data(4, root)[1].dataset.classes == ["cafe\u0301", "not-hotdog"]


def test_test_folder_is_preferred_and_named(tmp_path, capsys):
    """The book's function evaluates test/ where val/ is there too; a run evaluates its epochs on
    val/ and tests on test/ once."""
    root = write_folder(tmp_path / "d", train=2, test=2)
    write_folder(tmp_path / "v", train=1, test=1)
    shutil.copytree(tmp_path / "v" / "test", tmp_path / "d" / "val")
    _, test_iter = data.load_data(4, root)
    assert os.path.basename(test_iter.dataset.root) == "test" and len(test_iter.dataset) == 4
    status, out, _ = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path / "run")
    assert status == 0 and "testing on 2 in val/, and once, at the end, 4 in test/" in out


def test_predict_folders_in_batches_with_a_csv(folder, tmp_path, capsys, scratch_run):
    run, _ = scratch_run
    photo_dir = tmp_path / "photo_dir"
    os.makedirs(photo_dir / "b" / ".ipynb_checkpoints")
    for path in (photo_dir / "z.png", photo_dir / "a.png", photo_dir / "b" / "c.png", photo_dir / "b" / ".ipynb_checkpoints" / "c.png"):
        Image.new("RGB", (50, 40), (220, 60, 30)).save(path)
    (photo_dir / "notes.txt").write_text("not an image")
    (photo_dir / "b" / "broken.png").write_bytes(b"\x89PNG broken")
    single = os.path.join(folder, "test", "not-hotdog", "0.png")
    status, out, err = run_cli(capsys, "--predict", single, photo_dir, "--model", run / "model.pt",
                               "--batch-size", 2, "--workers", 0, "--out", tmp_path / "pred")
    assert status == 1  # one image failed, the others were predicted
    assert "broken.png" in err and err.count("error:") == 1
    expected = [single, str(photo_dir / "a.png"), str(photo_dir / "b" / "c.png"), str(photo_dir / "z.png")]
    assert [line.split(": ")[0] for line in out.splitlines()] == expected
    import csv
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert [r["path"] for r in rows] == expected
    for row, line in zip(rows, out.splitlines()):
        probs = [float(row["hotdog"]), float(row["not-hotdog"])]
        assert sum(probs) == pytest.approx(1, abs=1e-3) and float(row["probability"]) == pytest.approx(max(probs))
        assert row["class"] == ["hotdog", "not-hotdog"][probs.index(max(probs))] == line.split()[1]
    assert rows[1]["hotdog"] == rows[3]["hotdog"]  # the same picture, in a different batch


def test_predict_finds_no_images(tmp_path, capsys, scratch_run):
    os.makedirs(tmp_path / "empty")
    status, _, err = run_cli(capsys, "--predict", tmp_path / "empty", "--model", scratch_run[0] / "model.pt")
    assert status == 2 and "found no images" in err


# ---------------------------------------------------------------- export
EXPORTED = """
import json, sys
sys.modules["torchvision"] = None  # torch alone: the file needs nothing else
import numpy as np, torch
from PIL import Image
about = {"classes": "", "input": ""}
model = torch.export.load(sys.argv[1], extra_files=about).module()
images = [torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) for path in sys.argv[2:]]
alone = [model(image[None])[0].tolist() for image in images]
batch = model(torch.stack(images[:-1])).tolist()  # the test images, all of one size
ours = [name for name in ("data", "finetune", "models", "train", "beyond") if name in sys.modules]
print(json.dumps(dict(about, alone=alone, batch=batch, ours=ours)))
"""


def decoded(path):
    """An image as decoded, the exported file's input: uint8 RGB, (3, height, width)."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def trained_to_export(root, folder, *mode):
    """A run of one epoch, its test images and a photo of another size, and --predict's
    probabilities for them in fp32."""
    assert finetune.main([*mode, "--data-dir", folder, "--epochs", "1", "--batch-size", "4",
                          "--workers", "0", "--out", str(root / "run")]) == 0
    paths = [p for p, _ in datasets.image_folders(folder)[1].samples] + [str(root / "photo.jpg")]
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(paths[-1])
    probs = torch.tensor([list(p.probabilities.values()) for p in predict.predict(root / "run", paths, precision="fp32",
                                                                                  workers=0)])
    assert probs[:, 0].max() - probs[:, 0].min() > 0.01  # images told apart, or the comparisons prove nothing
    return root / "run", paths, probs


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, folder):
    return trained_to_export(tmp_path_factory.mktemp("export"), folder, "--pretrained")


def test_export_pt2_loads_with_torch_alone_and_gives_predicts_probabilities(exported_run, tmp_path, capsys):
    run, paths, probs = exported_run
    status, out, err = run_cli(capsys, "--export", run)
    assert status == 0 and out == f"wrote {run / 'best.pt2'}\n", err
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", EXPORTED, run / "best.pt2", *paths], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    result = json.loads(result.stdout)
    assert result["ours"] == [] and json.loads(result["classes"]) == ["hotdog", "not-hotdog"]
    assert result["input"].startswith("images: uint8 RGB pixels as decoded, shape (batch, 3, height, width), any")
    torch.testing.assert_close(torch.tensor(result["alone"]), probs, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(result["batch"]), probs[:-1], rtol=0, atol=1e-4)


def test_export_onnx_under_onnxruntime_gives_predicts_probabilities(exported_run, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    run, paths, probs = exported_run
    status, out, err = run_cli(capsys, "--export", run / "best.pt", "--export-format", "onnx",
                               "--out", tmp_path / "hotdog.onnx")
    assert status == 0 and out == f"wrote {tmp_path / 'hotdog.onnx'}\n" and os.listdir(tmp_path) == ["hotdog.onnx"]
    session = onnxruntime.InferenceSession(tmp_path / "hotdog.onnx")
    about = session.get_modelmeta().custom_metadata_map
    assert json.loads(about["classes"]) == ["hotdog", "not-hotdog"] and "(batch, 3, height, width)" in about["input"]
    alone = [session.run(None, {"images": decoded(p)[None].numpy()})[0][0] for p in paths]
    batch = session.run(None, {"images": torch.stack([decoded(p) for p in paths[:-1]]).numpy()})[0]
    torch.testing.assert_close(torch.tensor(np.array(alone)), probs, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(batch), probs[:-1], rtol=0, atol=1e-4)


def test_export_of_another_family_gives_predicts_probabilities(folder, tmp_path):
    # convnext: LayerNorm, a resize to 236; mobilenet and efficientnet from random weights give
    # every image the same probabilities, which would prove nothing
    run, paths, probs = trained_to_export(tmp_path, folder, "--scratch", "--arch", "convnext_tiny")
    assert predict.export(run / "model.pt") == str(run / "model.pt2")  # named after the checkpoint
    extra = {"classes": "", "input": ""}
    model = torch.export.load(run / "model.pt2", extra_files=extra).module()
    torch.testing.assert_close(torch.cat([model(decoded(p)[None]) for p in paths]), probs, rtol=0, atol=1e-4)
    assert json.loads(extra["classes"]) == ["hotdog", "not-hotdog"] and "resized to 236x236 (bilinear" in extra["input"]
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(predict.export(run, format="onnx"))
    alone = np.concatenate([session.run(None, {"images": decoded(p)[None].numpy()})[0] for p in paths])
    torch.testing.assert_close(torch.tensor(alone), probs, rtol=0, atol=1e-4)


def test_export_bad_input_is_one_line_and_leaves_nothing(exported_run, tmp_path, capsys, monkeypatch):
    run, _, _ = exported_run
    best = (run / "best.pt").read_bytes()
    status, _, err = run_cli(capsys, "--export", run, "--out", run / "best.pt")
    assert status == 2 and "is not a .pt2 file; give --out a name that ends in .pt2" in err, err
    assert (run / "best.pt").read_bytes() == best
    status, _, err = run_cli(capsys, "--export", run, "--out", tmp_path / "net.onnx")  # pt2 by default
    assert status == 2 and err.endswith("net.onnx is not a .pt2 file; give --export-format onnx to export onnx\n"), err
    (tmp_path / "named.pt2").write_bytes(best)  # a checkpoint named as an export: never written over
    status, _, err = run_cli(capsys, "--export", tmp_path / "named.pt2")
    assert status == 2 and "is the checkpoint exported, which the export would write over; give --out" in err, err
    assert (tmp_path / "named.pt2").read_bytes() == best
    (tmp_path / "empty.pt").touch()
    (tmp_path / "truncated.pt").write_bytes((run / "best.pt").read_bytes()[:100_000])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    os.makedirs(tmp_path / "no-run")
    out = tmp_path / "out" / "x.pt2"
    for model, message in ((tmp_path / "empty.pt", "empty.pt is not a checkpoint of this program"),
                           (tmp_path / "truncated.pt", "truncated.pt is not a checkpoint of this program"),
                           (tmp_path / "other.pt", "other.pt is not a checkpoint of this program; give the model.pt"),
                           (tmp_path / "no-run", "no-run holds no model.pt; give the model.pt of a training run")):
        status, _, err = run_cli(capsys, "--export", model, "--out", out)
        assert status == 2 and err.strip().splitlines() == [err.strip()] and message in err, err
    status, _, err = run_cli(capsys, "--export", run, "--out", tmp_path / "empty.pt" / "x.pt2")
    assert status == 2 and f"cannot write in the folder {tmp_path / 'empty.pt'}" in err and "choose a folder" in err
    with monkeypatch.context() as m:
        full_disk(m, "x.pt2", at_call=1)
        status, _, err = run_cli(capsys, "--export", run, "--out", out)
    assert status == 2 and err == f"error: cannot write {out} (No space left on device); free some space there, " \
                                  "or write to another folder\n"
    for error in (RuntimeError("data-dependent\nx"), ImportError("data-dependent")):  # not onnx's to name
        with monkeypatch.context() as m:  # every torchvision classifier tried is captured: a failure simulated
            m.setattr(torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(error))
            status, _, err = run_cli(capsys, "--export", run, "--out", out)
        assert status == 2 and err == ("error: a resnet18 cannot be captured as pt2 (data-dependent); give "
                                       "--export-format onnx, or classify with --predict\n")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnx", None)
        status, _, err = run_cli(capsys, "--export", run, "--export-format", "onnx", "--out", out.with_suffix(".onnx"))
    assert status == 2 and err.startswith("error: --export-format onnx needs the packages onnx and onnxscript (")
    assert err.strip().endswith("; pip install onnx onnxscript")
    assert os.listdir(tmp_path / "out") == []  # nothing half-written
    with pytest.raises(SystemExit):
        cli.parse_args(["--pretrained", "--export-format", "onnx"])
    with pytest.raises(UserError, match="format=tar is not one this program exports; give format=pt2 or format=onnx"):
        predict.export(run, format="tar")


def test_cache_only_when_it_fits(folder, capsys):
    train_set, test_set = datasets.image_folders(folder)
    pixels = sum(3 * img.size[0] * img.size[1] for s in (train_set, test_set)
                 for img in (Image.open(p) for p, _ in s.samples))
    assert train_set.pixels.numel() + test_set.pixels.numel() == pixels  # the estimate is exact
    for i in range(len(test_set)):  # and each image sits where its header said
        assert torch.equal(test_set.image(i), v2.functional.pil_to_tensor(photos.load_rgb(test_set.samples[i][0])))
    capsys.readouterr()
    train_set, _ = datasets.image_folders(folder, cache_budget=pixels - 1)
    assert not isinstance(train_set, cache.DecodedImages)
    err = capsys.readouterr().err
    assert err.startswith("note: decoding images every epoch") and "--cache-gb" in err and len(err.splitlines()) == 1


def test_cache_budget_flag(folder, tmp_path, capsys):
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                               "--workers", 0, "--cache-gb", "0.000001", "--out", tmp_path)
    assert status == 0 and "note: decoding images every epoch" in err


def test_unwritable_out_is_one_line(folder, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path / "file" / "run")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot write in the folder {tmp_path / 'file' / 'run'}" in err and "choose a folder" in err


class HalfWritten:
    """A file on a disk that fills up halfway through the write."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, content):
        self.f.write(content[:len(content) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def full_disk(monkeypatch, name, at_call):
    """The at_call-th write of a file called name (through files.write_whole) finds the disk full."""
    calls = []

    def open_(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        calls.append(path) if path.endswith(name + ".part") else None
        return HalfWritten(f) if path.endswith(name + ".part") and len(calls) == at_call else f
    monkeypatch.setattr(files, "open", open_, raising=False)


def test_full_disk_keeps_the_last_whole_checkpoint(folder, tmp_path, capsys, monkeypatch):
    full_disk(monkeypatch, "model.pt", at_call=2)  # the second epoch's checkpoint
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 2, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot write {tmp_path / 'model.pt'} (No space left on device); free some space" in err
    assert len(torch.load(tmp_path / "model.pt", weights_only=True)["history"]) == 1
    assert not (tmp_path / "model.pt.part").exists()


def test_a_picture_that_cannot_be_written_loses_nothing_else(folder, tmp_path, capsys, monkeypatch):
    full_disk(monkeypatch, "curves.png", at_call=1)
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path)
    assert status == 2 and err.strip().splitlines() == [f"error: cannot write {tmp_path / 'curves.png'} "
                                                        "(No space left on device); free some space there, "
                                                        "or write to another folder"]
    assert json.load(open(tmp_path / "metrics.json"))["history"] and (tmp_path / "model.pt").exists()
    written = set(os.listdir(tmp_path))  # mistakes.png too, where the net made any
    assert {"metrics.json", "model.pt"} <= written and not {"curves.png", "curves.png.part"} & written


def test_download_progress_on_a_terminal_only(tmp_path, server, capsys, monkeypatch):
    url, files, _ = server
    body = make_zip(tmp_path) * 2
    files["/hotdog.zip"] = (body, len(body))
    download.download(url + "/hotdog.zip", str(tmp_path / "quiet.zip"))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    download.download(url + "/hotdog.zip", str(tmp_path / "hotdog.zip"), hashlib.sha1(body).hexdigest())
    err = capsys.readouterr().err
    assert "\r  hotdog.zip: 0.0 of 0.0 MB" in err and err.endswith("\r\033[K")


# ---------------------------------------------------------------- precision
def tiny_set():
    torch.manual_seed(0)
    X = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(16) % 2
    X[y == 1] //= 2  # darker images are class 1
    return X, y


def runtime(monkeypatch, dtype):
    """What make_runtime gives on a CPU whose fastest type is dtype."""
    monkeypatch.setattr(devices, "amp_dtype", lambda device: dtype)
    return make_runtime(torch.device("cpu"))


def test_bf16_learns_as_fp32_does(monkeypatch):
    """The same steps on a small set reach the same training accuracy in bf16 as in fp32."""
    X, y = tiny_set()
    curves = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        net = runtime(monkeypatch, dtype).place(models.scratch_net(2))
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, weight_decay=1e-3)
        loss = torch.nn.CrossEntropyLoss(reduction="none")
        curves[dtype] = [train_epoch(net, [(X, y)], loss, optimizer, runtime(monkeypatch, dtype))
                         for _ in range(12)]
    for fp32, bf16 in zip(curves[None], curves[torch.bfloat16]):
        assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.1, abs=0.05)
    assert curves[None][-1]["train_acc"] == curves[torch.bfloat16][-1]["train_acc"] == 1


def test_fp16_with_its_gradient_scaler_on_the_cpu(tmp_path, monkeypatch):
    """The path CUDA GPUs without bf16 take: a step happens, and the scaler's state goes through
    a checkpoint and back. Four batches of 4 small uint8 images, as a loader gives them: fp16 on
    the CPU is some 20x slower than fp32, too slow for images of 224 px."""
    fp16 = runtime(monkeypatch, torch.float16)
    net = models.scratch_net(2)
    before = net.fc.weight.detach().clone()
    X, y = tiny_set()
    batches = list(zip(X.split(4), y.split(4)))
    epochs = one_epoch(net, batches, batches, fp16)
    assert not torch.equal(net.fc.weight.detach(), before) and torch.isfinite(net.fc.weight).all()
    assert fp16.scaler.get_scale() > 0
    optimizer = train.fine_tuning_optimizer(net, 0.01)
    checkpoints.save(str(tmp_path), [epochs[-1].metrics], {"held_out": None},
              dict(model=net.state_dict(), optimizer=optimizer.state_dict(), scaler=fp16.scaler.state_dict()))
    resumed = runtime(monkeypatch, torch.float16)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoints.restore(ckpt, net, train.fine_tuning_optimizer(net, 0.01), resumed.scaler) == [epochs[-1].metrics]
    assert resumed.scaler.state_dict() == fp16.scaler.state_dict()


def test_precision_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    for caps, dtype in (({"amx_bf16": True}, torch.bfloat16), ({"avx512_bf16": True}, torch.bfloat16), ({}, None)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        assert make_runtime(cpu).dtype == dtype and make_runtime(cpu).memory_format == torch.channels_last
        assert make_runtime(cpu, "fp32").dtype is None
        assert make_runtime(cpu, "fp32").memory_format == torch.contiguous_format


def test_header_and_metrics_say_the_precision(folder, tmp_path, capsys, monkeypatch):
    for caps, said, dtype in (({}, "cpu, fp32, channels-last", "torch.float32"),
                              ({"avx512_bf16": True}, "cpu, bfloat16 autocast, channels-last", "torch.bfloat16")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        status, out, _ = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                                 "--workers", 0, "--out", tmp_path / dtype)
        metrics = json.load(open(tmp_path / dtype / "metrics.json"))
        assert status == 0 and f"lr 0.0005, {said}\n" in out and f"examples/sec on {said}\n" in out
        assert metrics["precision"] == dtype and metrics["memory_format"] == "torch.channels_last"


# ---------------------------------------------------------------- the book's calls, from Python and a notebook
def test_the_books_train_fine_tuning_trains_and_returns_the_history(folder, capsys):
    """§14.2's calls as the book writes them, data_dir apart: they train and return the history,
    and their loaders' worker processes end with the call."""
    import multiprocessing
    finetune_net = models.finetune_net()
    before, children = finetune_net.fc.weight.detach().clone(), set(multiprocessing.active_children())
    history = train.train_fine_tuning(finetune_net, 5e-5, data_dir=folder)
    assert set(multiprocessing.active_children()) <= children
    out = capsys.readouterr().out
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5]  # the book's 5 epochs
    assert not torch.equal(finetune_net.fc.weight.detach().cpu(), before)
    last_two = out.strip().splitlines()[-2:]  # the book's closing lines
    m = history[-1]
    assert "epoch 5: loss" in out and last_two[0] == f"loss {m['loss']:.3f}, train acc {m['train_acc']:.3f}, test acc {m['test_acc']:.3f}"
    assert last_two[1].endswith("examples/sec on cpu, " + str(devices.make_runtime()).split(", ", 1)[1])
    scratch_net = models.scratch_net()
    history = train.train_fine_tuning(scratch_net, 5e-4, 4, 1, param_group=False, data_dir=folder)
    assert len(history) == 1 and history[0]["examples"] == 8


def test_a_notebook_keeps_continues_and_predicts_a_run_in_three_calls(folder, tmp_path, capsys):
    """runs.train_runs keeps a run (model.pt after every epoch, metrics.json and the curves at
    the end); runs.resume continues it with more epochs, training only those (after a kernel
    restart too: all it needs is in the folder); predict.predict classifies a folder with it."""
    out = str(tmp_path / "run")
    states = torch.get_rng_state(), random.getstate()
    first = runs.train_runs("scratch", out, data_dir=folder, epochs=1, batch_size=4, workers=0, precision="fp32",
                            lr=5e-4)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]  # the caller's draws
    assert {"model.pt", "metrics.json", "curves.png"} <= set(os.listdir(out))
    capsys.readouterr()
    both = runs.resume(out, epochs=2).results[0]["history"]
    printed = capsys.readouterr().out
    assert [m["epoch"] for m in both] == [1, 2] and both[0] == first.results[0]["history"][0]
    assert "epoch 2:" in printed and "epoch 1:" not in printed
    assert json.load(open(os.path.join(out, "metrics.json")))["history"] == both
    assert runs.resume(out, epochs=2, lr=5e-4).results[0]["history"] == both  # the same lr, given as it began
    assert runs.resume(out, epochs=None).results[0]["history"] == both  # None: its own 2, not the default 5
    assert "epoch " not in capsys.readouterr().out
    test = os.path.join(folder, "test")
    state = torch.get_rng_state()
    predictions = predict.predict(out, [test], workers=1, precision="fp32")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's draws: predicting draws none of them
    assert [p.path for p in predictions] == photos.image_files(test)
    net = checkpoints.saved_net(torch.load(os.path.join(out, "best.pt"), weights_only=True))  # a folder: best.pt's epoch
    _, test_set = datasets.image_folders(folder)
    probs, _ = evaluate(net, loaders.make_loaders(test_set, test_set, 4)[1], CPU)
    for p, q in zip(predictions, probs):
        assert list(p.probabilities.values()) == pytest.approx(q.tolist(), abs=1e-5)
        assert p.label == test_set.classes[q.argmax()] and p.probability == pytest.approx(q.max().item(), abs=1e-5)


def test_whole_runs_from_python_return_their_results(folder, tmp_path, capsys):
    """runs.train_runs and runs.resume: the command line's runs, with keyword arguments."""
    out = str(tmp_path / "run")
    trained = runs.train_runs("scratch", out, data_dir=folder, epochs=1, batch_size=8, workers=0)
    assert trained.out == out and len(trained.results) == 1
    assert trained.results[0] == json.load(open(os.path.join(out, "metrics.json")))
    resumed = runs.resume(out, epochs=2)
    assert [m["epoch"] for m in resumed.results[0]["history"]] == [1, 2]
    for call, message in ((lambda: runs.train_runs("scratch", out, data_dir=folder, batch_sise=8), "batch_sise"),
                          (lambda: runs.resume(out, batch_size=4), "batch_size: 8 there, 4 now"),
                          (lambda: runs.resume(out, out=str(tmp_path / "elsewhere")), "continues in its own folder")):
        with pytest.raises(UserError, match=message):
            call()


def test_train_ch13_takes_the_books_float_loaders_and_normalises_once(folder):
    """The book's own loaders (ToTensor + Normalize) reach the net as they are; uint8 batches
    would be normalised on the device instead."""
    T = torchvision.transforms
    normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    test_augs = T.Compose([T.Resize([256, 256]), T.CenterCrop(224), T.ToTensor(), normalize])
    test_iter = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(os.path.join(folder, "test"),
                                                                             transform=test_augs), batch_size=4)
    net, seen = models.scratch_net(), []
    net.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().float()))
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    trainer = torch.optim.SGD(net.parameters(), lr=1e-4, weight_decay=0.001)
    history = train.train_ch13(net, test_iter, test_iter, loss, trainer, 1)  # the book's six arguments
    expected = torch.cat([X for X, _ in test_iter])
    assert len(history) == 1 and torch.allclose(torch.cat(seen[-1:]), expected)  # the evaluation's input
    assert torch.allclose(torch.cat(seen[:-1]), expected)  # the training's: the same, unshuffled


def test_the_python_callers_errors_name_arguments_and_the_cli_names_flags(capsys):
    with pytest.raises(UserError, match="device=gpu: this machine has no such device"):
        try_device("gpu")
    status, _, err = run_cli(capsys, "--scratch", "--device", "gpu")
    assert status == 2 and "error: --device gpu: this machine has no such device; give no --device" in err


def test_pictures_keep_the_callers_backend(tmp_path):
    import matplotlib
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        path = pictures.curves({"run": [{"epoch": 1, "loss": 1, "train_acc": 0, "test_acc": 0}]},
                                     str(tmp_path / "curves.png"))
        assert matplotlib.get_backend() == "pdf" and open(path, "rb").read(4) == b"\x89PNG"
    finally:
        matplotlib.use(before)


def test_the_notebook_runs_cell_by_cell_in_a_kernel(tmp_path, monkeypatch):
    """fine_tuning.ipynb, unchanged, in a real Jupyter kernel (no server). The download is
    replaced by what it would leave: a generated hot-dog set in ./data/hotdog of the kernel's
    working folder. A last cell, added here, reads matplotlib's backend."""
    import nbclient
    import nbformat
    nb = nbformat.read(os.path.join(HERE, "fine_tuning.ipynb"), as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)  # stored without outputs
    # 8 training images, the fewest that the cells showing 8 from each end (train_imgs[i],
    # train_imgs[-i - 1]) can index; 4 test images, as many as the last cell prints
    write_folder(tmp_path / "data" / "hotdog", train=4, test=2)
    monkeypatch.setenv("PYTHONPATH", HERE)
    nb.cells.append(nbformat.v4.new_code_cell("import matplotlib\nprint(matplotlib.get_backend())"))
    nbclient.NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()

    def outputs(source):
        cell = next(cell for cell in nb.cells if source in cell.source)
        text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs)
        return text, sum("image/png" in o.get("data", {}) for o in cell.outputs)
    text, shown_pictures = outputs("finetune_history = train.train_fine_tuning(finetune_net, 5e-5)")
    assert "epoch 5: loss" in text and "batch 1/1" in text and shown_pictures == 1  # curves redrawn in place
    assert outputs("pictures.show_images(hotdogs + not_hotdogs, 2, 8, scale=1.4)")[1] == 1
    assert "inline" in outputs("matplotlib.get_backend()")[0]
    text, _ = outputs("runs.resume('runs/kept', epochs=2)")
    assert "epoch 2: loss" in text and "epoch 1: loss" not in text  # continued, not trained again
    assert len(json.load(open(tmp_path / "runs" / "kept" / "metrics.json"))["history"]) == 2
    lines = outputs("predict.predict('runs/kept'")[0].splitlines()
    assert len(lines) == 4 and all(line.split()[1] in ("hotdog", "not-hotdog") for line in lines)
    assert not os.path.exists(os.path.join(HERE, "data", "hotdog", "train", "hotdog", "3.png"))  # the set's last


# ---------------------------------------------------------------- photos as devices write them
def sideways(upright, path):
    """The photo as a phone stores a portrait: pixels turned a quarter, the turn in the EXIF tag."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show
    upright.rotate(90, expand=True).save(path, exif=exif)


def test_every_reader_turns_photos_upright_and_scales_16_bits(tmp_path):
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8))
    sideways(upright, tmp_path / "sideways.png")
    grey = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "scan16.png")  # 16 bits a pixel
    assert Image.open(tmp_path / "scan16.png").mode == "I;16"
    Image.fromarray(grey).save(tmp_path / "scan8.png")
    upright.save(tmp_path / "anim.gif")
    assert np.array_equal(np.asarray(photos.load_rgb(str(tmp_path / "sideways.png"))), np.asarray(upright))
    assert np.array_equal(np.asarray(photos.load_rgb(str(tmp_path / "scan16.png"))),
                          np.asarray(photos.load_rgb(str(tmp_path / "scan8.png"))))
    assert photos.load_rgb(str(tmp_path / "anim.gif")).size == (40, 60)
    assert photos.image_files(str(tmp_path)) == [str(tmp_path / n) for n in
                                               ("anim.gif", "scan16.png", "scan8.png", "sideways.png")]


def test_sideways_and_16_bit_photos_predict_as_their_twins(tmp_path, capsys):
    """A net trained on upright 8-bit photos (decoded once, so the cache turns them too) gives
    the same predictions for the same photos stored sideways, and for a 16-bit twin."""
    root = write_folder(tmp_path / "d", train=3, test=2, size=(48, 32))
    photo = Image.open(tmp_path / "d" / "test" / "hotdog" / "0.png")
    sideways(photo, tmp_path / "d" / "train" / "hotdog" / "turned.png")
    train_set, _ = datasets.image_folders(root)
    turned = [i for i, (p, _) in enumerate(train_set.samples) if p.endswith("turned.png")][0]
    assert torch.equal(train_set.image(turned), v2.functional.pil_to_tensor(photo))
    status, _, _ = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4,
                           "--workers", 0, "--out", tmp_path / "run")
    grey = np.asarray(photo.convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    sideways(photo, tmp_path / "turned.png")
    photo.save(tmp_path / "upright.png")
    status, out, err = run_cli(capsys, "--predict", *(tmp_path / f"{n}.png" for n in ("upright", "turned", "grey8", "grey16")),
                               "--model", tmp_path / "run" / "model.pt", "--out", tmp_path / "pred")
    probs = [line.rsplit(" ", 2)[1:] for line in out.splitlines()]
    assert status == 0 and len(probs) == 4, err
    assert probs[0] == probs[1] and probs[2] == probs[3]


def test_what_cannot_be_read_is_named_once_with_what_to_do(tmp_path, capsys):
    root = write_folder(tmp_path / "d", train=3, test=2)
    (tmp_path / "d" / "train" / "hotdog" / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic not decodable")
    (tmp_path / "d" / "train" / "hotdog" / "broken.png").write_bytes(b"\x89PNG broken")
    for cache_budget in (None, 0):
        train_set, _ = datasets.image_folders(root, cache_budget)
        assert len(train_set) == 6
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: left out 2 file(s)")]
    assert len(notes) == 2 and "IMG_0001.heic" in notes[0] and "pip install pillow-heif" in notes[0]


def test_links_are_followed_but_no_folder_twice_and_system_entries_ignored(tmp_path, capsys):
    root = write_folder(tmp_path / "d", train=2, test=1)
    hotdog = tmp_path / "d" / "train" / "hotdog"
    os.symlink(hotdog, hotdog / "loop")  # a link back to its own folder
    os.symlink(hotdog / "0.png", hotdog / "link-to-0.png")  # the same file again
    write_folder(tmp_path / "elsewhere", train=1, test=0)
    os.symlink(tmp_path / "elsewhere" / "train" / "hotdog", hotdog / "more")  # a linked folder outside the data
    os.makedirs(tmp_path / "d" / "train" / "@eaDir")  # Synology's thumbnails
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / "@eaDir" / "thumb.png")
    (hotdog / "Thumbs.db").write_bytes(b"junk")
    (hotdog / "desktop.ini").write_text("[.ShellClassInfo]")
    train_set, _ = datasets.image_folders(root)
    assert train_set.classes == ["hotdog", "not-hotdog"]
    assert not photos.ignored("@home")  # a class of one's own, not a NAS box's folder
    assert sorted(os.path.relpath(p, hotdog) for p, _ in train_set.samples if "/hotdog/" in p) \
        == ["0.png", "1.png", "more/0.png"]
    folder = tmp_path / "photos"
    os.makedirs(folder)
    os.symlink(hotdog, folder / "linked")  # --predict follows linked folders too
    assert sorted(map(os.path.basename, photos.image_paths([str(folder), str(folder / "linked"), str(hotdog / "0.png")]))) \
        == ["0.png", "0.png", "1.png"]  # each file once (elsewhere's 0.png too), however often it is named


def test_class_names_from_a_mac_match_their_twins(tmp_path, capsys):
    import unicodedata
    root = write_folder(tmp_path / "d", train=2, test=1, classes={"café": (200, 0, 0), "tea": (0, 0, 200)})
    os.rename(tmp_path / "d" / "test" / "café", tmp_path / "d" / "test" / unicodedata.normalize("NFD", "café"))
    train_set, test_set = datasets.image_folders(root)
    assert train_set.classes == ["café"] + ["tea"] and test_set.targets == [0, 1]
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4,
                             "--workers", 0, "--out", tmp_path / "out")
    assert status == 0, err
    assert json.load(open(tmp_path / "out" / "metrics.json"))["classes"] == ["café", "tea"]


def test_the_hot_dog_row_goes_to_the_class_named_like_hot_dog(torch_home):
    assert [models.hotdog_class(c) for c in (["apple", "Hot_Dog"], ["HOTDOG", "x"], ["a", "hot dogs"])] == [1, 0, 1]
    with pytest.raises(UserError, match="no class is named like hot dog"):
        models.hotdog_class(["pizza", "salad"])
    fc = models.finetune_net(3, hotdog_class=1).fc
    w = torch_home["fc.weight"]
    assert torch.equal(fc.weight[1], w[934]) and torch.allclose(fc.weight[0], fc.weight[2])


def test_output_folder_checked_first_and_none_left_by_an_early_failure(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "file" / "x")
    assert status == 2 and "cannot write in the folder" in err  # not the missing data: the folder comes first
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "new" / "run")
    assert status == 2 and "nowhere/train is not a folder" in err
    assert not os.path.exists(tmp_path / "new")  # nor the folder made for it


def test_numbers_and_very_large_photos(folder, tmp_path, capsys, monkeypatch, scratch_run):
    with pytest.raises(SystemExit):
        cli.parse_args(["--scratch", "--workers", "-1"])
    assert "--workers: give a whole number, 0 or more, not -1" in capsys.readouterr().err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    photo = os.path.join(folder, "test", "hotdog", "0.png")  # 40 x 48 pixels
    status, out, err = run_cli(capsys, "--predict", photo, "--model", scratch_run[0] / "model.pt",
                               "--out", tmp_path, "--max-megapixels", 0.001, "--workers", 0)
    assert status == 1 and "--max-megapixels" in err and not out
    status, out, _ = run_cli(capsys, "--predict", photo, "--model", scratch_run[0] / "model.pt",
                             "--out", tmp_path, "--max-megapixels", 0.002)
    assert status == 0 and out.startswith(photo)


# ---------------------------------------------------------------- a folder of class folders, split
def class_folders_alone(root, counts=(10, 7, 3)):
    """photos/<class>/<image> with no train/ or test/: three classes of different sizes."""
    for c, n in enumerate(counts):
        write_folder(root / "tmp", train=n, test=0, classes={f"class{c}": (80 * c, 60, 200 - 80 * c)}, seed=c)
        os.rename(root / "tmp" / "train" / f"class{c}", root / f"class{c}")
        shutil.rmtree(root / "tmp")
    return str(root)


def test_class_folders_alone_are_split_by_class_reproducibly(tmp_path):
    root = class_folders_alone(tmp_path / "photos")
    train_set, test_set = datasets.image_folders(root, val_split=0.2, seed=0)
    held = lambda test: [sum(t == c for t in test.targets) for c in range(3)]
    assert held(test_set) == [2, 1, 1] and len(train_set) + len(test_set) == 20  # round(0.2 n), at least 1
    assert not {p for p, _ in train_set.samples} & {p for p, _ in test_set.samples}
    assert test_set.transform is data.test_augs and train_set.transform is data.train_augs
    again = datasets.image_folders(root, val_split=0.2, seed=0)[1]
    other = datasets.image_folders(root, val_split=0.2, seed=1)[1]
    assert again.samples == test_set.samples and other.samples != test_set.samples
    assert datasets.image_folders(root, val_split=0.5)[1].targets.count(0) == 5
    reused = datasets.image_folders(root, held_out=test_set.held_out, seed=1)[1]
    assert reused.samples == test_set.samples  # a resumed run holds out what it held out before


def test_a_split_run_says_so_writes_the_split_and_resumes_it(tmp_path, capsys):
    root = class_folders_alone(tmp_path / "photos")
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4,
                               "--workers", 0, "--val-split", 0.25, "--seed", 3, "--out", tmp_path / "run")
    assert status == 0, err
    assert "training on 15 images, testing on 5 of 20 images, split 0.25 by class, seed 3" in out
    held_out = (tmp_path / "run" / "held_out.txt").read_text().splitlines()
    assert len(held_out) == 5 and all(os.path.exists(os.path.join(root, p)) for p in held_out)
    assert torch.tensor(json.load(open(tmp_path / "run" / "metrics.json"))["confusion"]).sum() == 5
    Image.new("RGB", (40, 48)).save(tmp_path / "photos" / "class0" / "new.png")  # the folder grows
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run" / "model.pt", "--epochs", 2)
    assert status == 0, err
    assert "training on 16 images, testing on 5 of 21 images" in out
    assert (tmp_path / "run" / "held_out.txt").read_text().splitlines() == held_out
    book = write_folder(tmp_path / "book", train=2, test=1, classes={f"class{c}": (0, 0, 0) for c in range(3)})
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 3, "--data-dir", book)
    assert status == 2 and "was tested on images held out of class folders alone, and the data folder now holds " \
        "train/ and test/" in err, err  # else tested on other images, and trained on some it held out
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", book, "--epochs", 1, "--batch-size", 4,
                             "--workers", 0, "--out", tmp_path / "run2")
    assert status == 0, err
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run2", "--epochs", 2, "--data-dir", root)
    assert status == 2 and "was tested on a test folder, and the data folder now holds class folders alone" in err, err


def test_train_and_class_folders_together_is_one_line(tmp_path, capsys):
    """With train/ and test/ the book's layout is plain, and any other folder is left unused (and
    said so); train/ beside class folders, with no test/ or val/, is ambiguous."""
    root = write_folder(tmp_path / "d", train=2, test=1)
    os.makedirs(tmp_path / "d" / "predict" / "x")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "predict" / "x" / "0.png")
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4,
                               "--workers", 0, "--out", tmp_path / "out")
    assert status == 0 and "testing on 2 in test/ (predict/ left unused)" in out, err
    shutil.rmtree(tmp_path / "d" / "test")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--out", tmp_path / "out2")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "holds both ['train'] and class folders ['predict']" in err
    with pytest.raises(SystemExit):
        cli.parse_args(["--scratch", "--val-split", "1"])


# ---------------------------------------------------------------- other architectures
ARCHS = ["mobilenet_v3_small", "densenet121"]  # head in classifier[-1]; head as classifier itself


@pytest.fixture(scope="session")
def arch_weights(torch_home):
    """Stand-in ImageNet weights for other architectures, where torchvision caches their defaults."""
    states = {}
    for arch in ARCHS:
        torch.manual_seed(7)
        states[arch] = torchvision.models.get_model(arch).state_dict()
        torch.save(states[arch], os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", archs.weights_name(arch)))
    return states


def check_recipe_groups(monkeypatch, net):
    _, optimizer = recipe_optimizer(monkeypatch, net, 0.1)
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(net.fc.weight), id(net.fc.bias)}
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())  # each exactly once


@pytest.mark.parametrize("arch", ARCHS)
def test_any_arch_fine_tunes_from_its_cached_weights_with_the_books_groups(arch, arch_weights, monkeypatch):
    net = models.finetune_net(3, arch=arch)
    body = {k.removeprefix("body."): v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    saved = arch_weights[arch]
    assert all(torch.equal(body[k], saved[k]) for k in body if k in saved) and len(body) == len(saved) - 2
    assert net.fc.out_features == 3 and net.fc.weight.abs().max() <= (6 / (net.fc.in_features + 3)) ** 0.5
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


def test_arch_on_the_command_line(folder, tmp_path, capsys, arch_weights):
    run = tmp_path / "run"
    status, out, err = run_cli(capsys, "--pretrained", "--arch", "mobilenet_v3_small", "--data-dir", folder,
                               "--epochs", 1, "--batch-size", 8, "--workers", 0, "--out", run)
    assert status == 0, err
    assert "pretrained: mobilenet_v3_small at 224 px (resized to 256, bilinear), training on 8 images" in out
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["arch"] == "mobilenet_v3_small" and ckpt["transform"]["interpolation"] == "bilinear"
    status, out, err = run_cli(capsys, "--predict", os.path.join(folder, "test"), "--model", run / "model.pt",
                               "--out", tmp_path, "--workers", 0)
    probs, labels = evaluate(checkpoints.saved_net(ckpt), loaders.make_loaders(*datasets.image_folders(folder), 4)[1], CPU)
    assert status == 0 and [line.split(": ")[1].split()[0] for line in out.splitlines()] \
        == [ckpt["classes"][p.argmax()] for p in probs]
    status, out, err = run_cli(capsys, "--resume", run / "model.pt", "--epochs", 2, "--workers", 0)
    assert status == 0 and "epoch 2:" in out, err
    for argv, message in ((["--predict", folder, "--model", run / "model.pt", "--arch", "resnet18"],
                           "holds a mobilenet_v3_small, not a resnet18; leave --arch out"),
                          (["--scratch", "--arch", "resnet19", "--data-dir", folder, "--out", tmp_path / "x"],
                           "--arch resnet19 is not one of torchvision's ImageNet classifiers; "
                           "torchvision.models.list_models")):
        status, _, err = run_cli(capsys, *argv)
        assert status == 2 and err.strip().splitlines() == [err.strip()] and message in err


def test_each_arch_gets_the_augmentations_its_weights_were_trained_with(folder):
    options = runs.settled("scratch", dict(data_dir=folder, arch="swin_t", workers=0))
    train_set, test_set = runs.load_sets(options)
    crop, = [t for t in train_set.transform.transforms if isinstance(t, v2.RandomResizedCrop)]
    resize, = [t for t in test_set.transform.transforms if isinstance(t, v2.Resize)]
    assert crop.size == (224, 224) and resize.size == [232, 232]
    assert crop.interpolation == resize.interpolation == v2.InterpolationMode.BICUBIC
    assert test_set[0][0].shape == (3, 224, 224)


# ---------------------------------------------------------------- torchrun's restarts, many processes
def torchrun(*argv, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # a free port, torchrun's
            f"--max-restarts={restarts}", os.path.join(HERE, "finetune.py"), *map(str, argv)]


def children(pid):
    return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def test_torchrun_restarts_a_killed_worker_and_the_run_finishes(folder, tmp_path):
    """One worker killed after epoch 1: torchrun restarts both, and they continue from the
    checkpoint, in the default folder (runs/<mode>-<time>: the same for every restart of one
    job). A run given --out differs only in that its folder is the one named; the checkpoint it
    continues is found and restored as here."""
    argv = ["--scratch", "--data-dir", folder, "--epochs", 3, "--batch-size", 8, "--workers", 0, "--device", "cpu"]
    job = subprocess.Popen(torchrun(*argv, restarts=1), cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = None
    while job.poll() is None and checkpoint is None:  # model.pt appears whole (a temporary name, then renamed)
        found = [os.path.join(root, "model.pt") for root, _, names in os.walk(tmp_path) if "model.pt" in names]
        if found:  # epoch 1 is saved, and epochs 2 and 3 are still to train
            checkpoint = found[0]
            os.kill(children(job.pid)[-1], signal.SIGKILL)
        time.sleep(0.02)
    out_text, err = job.communicate(timeout=300)
    assert checkpoint and job.returncode == 0, err
    assert torch.load(checkpoint, weights_only=True)["history"]  # a whole checkpoint, epoch 1's or later
    history = json.load(open(os.path.join(os.path.dirname(checkpoint), "metrics.json")))["history"]
    assert [m["epoch"] for m in history] == [1, 2, 3] and out_text.count("epoch 1:") == 1


def test_few_test_images_many_processes_and_a_batch_that_does_not_divide(launched_run):
    run, status, out, err = launched_run  # 2 test images for 3 processes, a batch of 8
    assert status == 0, err
    assert "x 3 processes, batch 2 each, 6 in all (not 8)" in out
    metrics = json.load(open(run / "metrics.json"))
    assert torch.tensor(metrics["confusion"]).sum() == 2 and metrics["world_size"] == 3


def test_an_error_under_torchrun_is_said_once(tmp_path):
    status, _, err = launched(["--scratch", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run"],
                              tmp_path / "printed")
    assert status != 0  # 2 from the process that met it, or 1 from one whose partner stopped: whichever torchrun saw first
    assert [line for line in err.splitlines() if "error: " in line] \
        == [f"error: {tmp_path / 'nowhere' / 'train'} is not a folder; the data folder needs train/ and test/ "
            "(or val/), each with one subfolder of images per class, or only the class folders, which runs.train_runs "
            "and the command line split"]
    assert "[rank" not in err and "Traceback" not in err  # no process's traceback


def test_predict_under_torchrun_writes_once(folder, tmp_path, scratch_run):
    status, out, err = launched(["--predict", os.path.join(folder, "test"), "--model", scratch_run[0] / "model.pt",
                                 "--out", tmp_path / "pred", "--workers", 0], tmp_path / "printed")
    assert status == 0, err
    assert len(out.splitlines()) == 4 and err.count("wrote ") == 1


def test_a_folder_holds_one_run_or_the_runs_of_one_plan(folder, tmp_path, capsys, scratch_run, compare_run):
    """A --compare (or several lrs) into a single run's folder, or a single run into a
    --compare's, is refused before any data is read: each would write its curves.png over the
    other's, and resume would find the wrong model.pt. So is a run of the other mode."""
    shutil.copytree(scratch_run[0], tmp_path / "one")
    shutil.copytree(compare_run[0], tmp_path / "both")
    before = {name: (tmp_path / name / "curves.png").read_bytes() for name in ("one", "both")}
    for into, argv in (("one", ["--compare"]), ("one", ["--scratch", "--lr", "1e-3", "2e-3"]), ("both", ["--scratch"])):
        status, out, err = run_cli(capsys, *argv, "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                                   "--workers", 0, "--out", tmp_path / into)
        assert status == 2 and f"--out {tmp_path / into} holds another run" in err and "data ready" not in out, err
    status, out, err = run_cli(capsys, "--pretrained", "--data-dir", folder, "--epochs", 1, "--workers", 0,
                               "--out", tmp_path / "one")
    assert status == 2 and "--compare: scratch there, pretrained now" in err and "data ready" not in out, err
    assert {name: (tmp_path / name / "curves.png").read_bytes() for name in ("one", "both")} == before
    assert sorted(os.listdir(tmp_path / "both")) == sorted(os.listdir(compare_run[0]))


def test_the_same_command_from_another_folder_continues_the_run(folder, tmp_path, capsys, monkeypatch, scratch_run):
    """The default data_root, ./data, is another folder from another working folder, and where
    downloads go changes no data: the run is found finished, not refused."""
    shutil.copytree(scratch_run[0], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(capsys, *SCRATCH, "--data-dir", folder, "--out", tmp_path / "run")
    assert status == 0 and "scratch: finished its 1 epochs already" in out, err


def test_a_pipe_named_like_an_image_in_a_folder_is_skipped(tmp_path):
    """Opening a pipe no one writes to would wait for ever: in a folder, one named like an image is
    no image. Named on the command line (--predict <(curl ...)), it is read."""
    photo_dir = tmp_path / "photo_dir"
    photo_dir.mkdir()
    os.mkfifo(photo_dir / "x.png")
    Image.new("RGB", (8, 8)).save(photo_dir / "y.png")
    assert photos.image_files(str(photo_dir)) == [str(photo_dir / "y.png")]
    assert photos.image_paths([str(photo_dir / "x.png")]) == [str(photo_dir / "x.png")]


def test_names_that_are_not_utf8(folder, tmp_path, capsys, scratch_run):
    """Linux names are bytes: a photo whose name is not UTF-8 is predicted, shown with the odd
    byte escaped, and written to predictions.csv and held_out.txt as the disk has it; a class
    folder so named is refused in one line (tables, pictures and files show class names). So
    are control characters: a newline in a name is shown as \\n, never as a line of its own."""
    photo_dir = os.fsencode(tmp_path / "photo_dir")
    os.mkdir(photo_dir)
    shutil.copy(os.path.join(folder, "test", "hotdog", "0.png"), photo_dir + b"/bad\xff.png")
    status, out, err = run_cli(capsys, "--predict", os.fsdecode(photo_dir), "--model", scratch_run[0], "--out", tmp_path,
                               "--workers", 0)
    assert status == 0 and out.startswith(f"{tmp_path / 'photo_dir'}/bad\\xff.png: "), err
    assert photo_dir + b"/bad\xff.png," in (tmp_path / "predictions.csv").read_bytes()
    checkpoints.save(str(tmp_path), [], dict(held_out=[os.fsdecode(b"hotdog/bad\xff.png")]), {})
    assert (tmp_path / "held_out.txt").read_bytes() == b"hotdog/bad\xff.png\n"
    os.rename(photo_dir, photo_dir + b"/../not\xffhot")
    shutil.copytree(os.path.join(folder, "train", "hotdog"), tmp_path / "hotdog")
    with pytest.raises(UserError, match=r"^the class folder .*/not\\xffhot has a name that is not UTF-8 text, or holds "
                                        r"a control character \(a newline, a tab\); rename it$"):
        datasets.image_folders(str(tmp_path))
    os.rename(os.fsencode(tmp_path / "not") + b"\xffhot", tmp_path / "not\nhot")  # a newline would print a line of its own
    with pytest.raises(UserError, match=r"^the class folder .*/not\\nhot has a name that is not UTF-8 text, or holds"):
        datasets.image_folders(str(tmp_path))
    os.mkdir(tmp_path / "more")
    shutil.copy(os.path.join(folder, "test", "hotdog", "0.png"), tmp_path / "more" / "two\nlines.png")
    status, out, err = run_cli(capsys, "--predict", tmp_path / "more", "--model", scratch_run[0], "--out", tmp_path,
                               "--workers", 0)
    assert status == 0 and out.startswith(f"{tmp_path / 'more'}/two\\nlines.png: ") and len(out.splitlines()) == 1, out


def test_a_continued_runs_missing_data_and_damaged_best_pt_are_named_with_their_fix(tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    ckpt["args"]["data_dir"] = str(tmp_path / "moved")
    torch.save(ckpt, tmp_path / "run" / "model.pt")
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2)
    assert status == 2 and "data ready" not in out, err
    assert err == f"error: --data-dir {tmp_path / 'moved'}, the run's data folder, is not a folder; " \
                  "give --data-dir where it is now\n"
    (tmp_path / "run" / "best.pt").write_bytes((tmp_path / "run" / "best.pt").read_bytes()[:1000])
    status, out, err = run_cli(capsys, "--predict", tmp_path, "--model", tmp_path / "run", "--out", tmp_path / "p")
    assert status == 2 and err == f"error: {tmp_path / 'run' / 'best.pt'} is not a checkpoint of this program; put back " \
                                  "a whole copy, or delete it to keep the run's last epoch, its model.pt, in its place\n"
    os.replace(tmp_path / "run" / "best.pt", tmp_path / "best.pt")  # not a run's: no run's epoch takes its place
    with pytest.raises(UserError, match="best.pt is not a checkpoint of this program; give the model.pt of a training run$"):
        checkpoints.load_checkpoint(str(tmp_path / "best.pt"))


def test_a_folder_of_several_runs_names_them_and_a_copy_inside_a_run_never_stands_in(tmp_path, capsys, scratch_run,
                                                                                       compare_run):
    """--predict, --export and --resume never pick one of several runs silently: a --compare's
    folder predicts with neither, and a folder of two trainings continues neither. A run's own
    model.pt comes before a copy in a folder inside it (backup/ sorts before model.pt)."""
    for name in ("a-run", "b-run"):
        shutil.copytree(scratch_run[0], tmp_path / "runs" / name)
    for argv in (["--predict", tmp_path, "--model", compare_run[0], "--out", tmp_path / "p"],
                 ["--export", compare_run[0], "--out", tmp_path / "best.pt2"],
                 ["--resume", tmp_path / "runs", "--epochs", 2]):
        status, out, err = run_cli(capsys, *argv)
        assert status == 2 and " holds several runs (" in err and "give the folder of one of them" in err, err
    run = tmp_path / "runs" / "a-run"
    (run / "backup").mkdir()
    shutil.copy(run / "model.pt", run / "backup")
    assert checkpoints.checkpoint_in(run) == str(run / "model.pt") and checkpoints.checkpoints_in(run) == [str(run / "model.pt")]
    assert checkpoints.kept_in(run) == str(run / "best.pt")
    os.replace(run / "best.pt", run / "backup" / "best.pt")  # a run begun before best.pt: its model.pt predicts
    assert checkpoints.kept_in(run) == str(run / "model.pt")
    shutil.copytree(compare_run[0], tmp_path / "both")
    os.remove(tmp_path / "both" / "pretrained" / "best.pt")  # one best.pt among several runs names no run either
    with pytest.raises(UserError, match=r" holds several runs \(pretrained, scratch\); give the folder of one of them$"):
        checkpoints.kept_in(tmp_path / "both")
    shutil.copytree(scratch_run[0], tmp_path / "both" / "zzz")  # a compare's folder, and another training's run
    with pytest.raises(UserError, match=r" holds several runs \(pretrained, scratch, zzz\); give the folder of one of"):
        runs.resume(tmp_path / "both")
    for name in ("pretrained", "scratch", "zzz"):  # runs that keep their best.pt alone: the folder of one finds it
        os.remove(tmp_path / "both" / name / "model.pt")
    shutil.rmtree(tmp_path / "both" / "pretrained")
    shutil.move(tmp_path / "both" / "zzz", tmp_path / "zzz")
    assert checkpoints.kept_in(tmp_path / "both") == str(tmp_path / "both" / "scratch" / "best.pt")


def test_resume_finishes_every_run_of_a_compare(folder, tmp_path, capsys, compare_run):
    shutil.copytree(compare_run[0], tmp_path / "both")  # --compare, one epoch, batch 8
    shutil.rmtree(tmp_path / "both" / "scratch")  # as if stopped before scratch's first epoch
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both")
    assert status == 0, err
    assert "pretrained: finished its 1 epochs already" in out and "scratch: resnet18" in out
    assert "pretrained " in out.split("\nrun ")[1] and "scratch " in out.split("\nrun ")[1]  # the table
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both" / "scratch" / "model.pt", "--epochs", 2)
    assert status == 0 and out.count("epoch 2:") == 1 and "scratch: resnet18" in out, err  # the run named, alone
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both" / "scratch", "--epochs", 3)
    assert status == 0 and out.count("epoch 3:") == 1 and "pretrained" not in out, err  # its folder: that run alone
    assert [m["epoch"] for m in json.load(open(tmp_path / "both" / "pretrained" / "metrics.json"))["history"]] == [1]
    status, out, err = run_cli(capsys, "--resume", tmp_path / "both", "--epochs", 2)
    assert status == 0 and out.count("epoch 2:") == 1 and "pretrained: resnet18" in out, err  # the folder: every run
    assert [m["epoch"] for m in json.load(open(tmp_path / "both" / "pretrained" / "metrics.json"))["history"]] == [1, 2]


def test_resume_refuses_other_options_and_stores_absolute_paths(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folder, tmp_path / "d")
    assert run_cli(capsys, "--scratch", "--data-dir", "d", "--epochs", 1, "--batch-size", 8, "--workers", 0,
                   "--out", "run")[0] == 0
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert ckpt["args"]["data_dir"] == str(tmp_path / "d") and ckpt["args"]["out"] == str(tmp_path / "run")
    status, _, err = run_cli(capsys, "--resume", "run", "--epochs", 2, "--batch-size", 4, "--precision", "fp32")
    assert status == 2 and err.strip() == (f"error: {tmp_path / 'run' / 'model.pt'} was made with other options "
                                           "(--batch-size: 8 there, 4 now; --precision: amp there, fp32 now); "
                                           "continue it with the same, or train a new run in another --out")
    status, _, err = run_cli(capsys, "--resume", "run", "--batch-size", 128)  # typed, though the default
    assert status == 2 and "--batch-size: 8 there, 128 now" in err
    monkeypatch.chdir(folder)  # from another folder, with options that may change
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2, "--workers", 1)
    assert status == 0 and "epoch 2:" in out, err


def test_a_second_run_on_the_same_folder_is_refused(folder, tmp_path, capsys):
    import fcntl
    os.makedirs(tmp_path / "run")
    with open(tmp_path / "run" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a run writing there now
        status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--out", tmp_path / "run")
    assert status == 2 and f"another run is writing to {tmp_path / 'run'}" in err


def test_a_cpu_run_resumes_on_the_cpu_on_a_machine_with_gpus(folder, tmp_path, capsys, monkeypatch):
    assert run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1, "--batch-size", 8, "--workers", 0,
                   "--device", "cpu", "--out", tmp_path)[0] == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(cli, "on_all_gpus", lambda *a: pytest.fail("a process per GPU for a --device cpu run"))
    status, out, err = run_cli(capsys, "--resume", tmp_path / "model.pt", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out, err


# ---------------------------------------------------------------- the GPU paths, checked on the CPU
def test_a_checkpoint_from_a_machine_with_more_gpus_resumes(tmp_path, monkeypatch):
    """Older checkpoints held every GPU's random-number state, and taking 8 back on a machine
    with fewer raised IndexError. CUDA is simulated: is_available says yes, and restoring
    GPU states fails as it does with fewer GPUs."""
    net = models.scratch_net(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    old = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {}, "history": [{"epoch": 1}],
           "rng": {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
                   "cuda": [torch.cuda.default_generators[0].get_state() if torch.cuda.is_available()
                            else torch.get_rng_state()] * 8}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert len(checkpoints.restore(old, net, optimizer, torch.amp.GradScaler("cpu", enabled=False))) == 1
    checkpoints.save(str(tmp_path), [{"epoch": 1, "test_acc": 0.5}], {"held_out": None}, {"model": net.state_dict()})
    assert [set(state) for state in torch.load(tmp_path / "model.pt", weights_only=True)["rng"]] == [{"torch", "python"}]


def test_each_process_draws_its_own_augmentations(launched_run):
    """Three processes, with loader workers (the default: at least one each): their random-number
    states, from which the loader seeds its workers, differ (the same seed once gave every
    process the same crops). From the largest seed too: seed + rank wraps round to torch's seeds."""
    run, status, _, err = launched_run
    assert status == 0, err
    assert json.load(open(run / "metrics.json"))["args"]["workers"] >= 1
    assert json.load(open(run / "metrics.json"))["args"]["seed"] == 2**64 - 1
    states = [state["torch"] for state in torch.load(run / "model.pt", weights_only=False)["rng"]]
    assert len(states) == 3 and all(not torch.equal(a, b) for a, b in itertools.combinations(states, 2))


def test_no_tensor_from_a_list_per_batch(monkeypatch):
    """A mean and std given as lists are copied to the device on every call, and on CUDA each
    copy waits for the GPU (pytorch/pytorch#120996): normalize builds them there once."""
    X = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    data.normalize(X)  # the device's first batch
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda data, *a, **k: pytest.fail("a tensor from a list")
                        if isinstance(data, (list, tuple)) else real(data, *a, **k))
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("a tensor from a list"))
    assert torch.allclose(data.normalize(X)[0, :, 0, 0], (1 - real(data.MEAN)) / real(data.STD))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_per_batch_on_cuda():
    runtime = make_runtime(torch.device("cuda"))
    net = runtime.place(models.scratch_net(2))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    batch = [(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8).pin_memory(), torch.tensor([0, 1, 0, 1]))]
    train_epoch(net, batch * 2, torch.nn.CrossEntropyLoss(reduction="none"), optimizer, runtime)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        net.train()
        for X, y in batch:
            X, y = runtime.input(X), y.to(runtime.device, non_blocking=True)
            with runtime.autocast():
                losses = torch.nn.functional.cross_entropy(net(X), y, reduction="none")
            optimizer.zero_grad()
            runtime.scaler.scale(losses.sum()).backward()
            runtime.scaler.step(optimizer)
            runtime.scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_named_gpu_is_made_current_and_macs_run_one_process(monkeypatch):
    current = []

    def set_device(device):  # a CUDA machine, simulated; torch refuses a device without an index
        if device.index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer")
        current.append(device)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert processes.join_processes(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert processes.join_processes(torch.device("cuda")) == torch.device("cuda")  # --device cuda: the current one
    assert current == [torch.device("cuda", 1)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="gloo cannot carry MPS tensors"):
        processes.join_processes(torch.device("mps"))


def test_fp32_is_the_books_arithmetic_without_tf32_while_it_computes_alone(folder):
    """cuDNN's flags hold for the whole process: a call sets them while it computes (autotuning;
    in fp32, no TF32), and the caller has its own back after it, a refused call included."""
    cudnn = torch.backends.cudnn
    before = cudnn.benchmark, cudnn.conv.fp32_precision
    cudnn.benchmark, cudnn.conv.fp32_precision = False, "tf32"  # PyTorch's defaults
    try:
        for precision, inside in (("fp32", (True, "ieee")), ("amp", (True, "tf32"))):
            seen, net = set(), models.scratch_net()
            net.register_forward_pre_hook(lambda *_: seen.add((cudnn.benchmark, cudnn.conv.fp32_precision)))
            train.train_fine_tuning(net, 5e-4, 4, 1, False, data_dir=folder, precision=precision)
            assert seen == {inside} and (cudnn.benchmark, cudnn.conv.fp32_precision) == (False, "tf32")
            with pytest.raises(UserError):
                train.train_fine_tuning(net, 5e-4, data_dir=folder + "/none", precision=precision)
            assert (cudnn.benchmark, cudnn.conv.fp32_precision) == (False, "tf32")
        assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's default: fp32 matrix products
    finally:
        cudnn.benchmark, cudnn.conv.fp32_precision = before


def test_a_runs_image_limit_is_its_own(folder, tmp_path):
    """max_megapixels holds for the call alone, and in the loader workers it forks; after it,
    the process reads images as before, the caller's own Image.open included."""
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(UserError, match=r"none of the 8 images can be read.* with beyond.photos.megapixels_limit\(N\)\)$"):
        runs.train_runs("scratch", str(tmp_path / "run"), data_dir=folder, max_megapixels=0.001, workers=0)
    assert Image.MAX_IMAGE_PIXELS == before
    Image.open(os.path.join(folder, "train", "hotdog", "0.png")).load()
    limits = type("Limits", (torch.utils.data.Dataset,), dict(__len__=lambda self: 1,
                                                              __getitem__=lambda self, i: Image.MAX_IMAGE_PIXELS))
    with photos.megapixels_limit(5):
        assert list(torch.utils.data.DataLoader(limits(), num_workers=1)) == [torch.tensor([5 * 10**6])]
    assert Image.MAX_IMAGE_PIXELS == before


# ---------------------------------------------------------------- nothing silently wrong
def test_a_split_is_reused_only_from_a_run_that_began(tmp_path, capsys):
    """A run that stopped before its first epoch ended leaves no split behind: the next run on
    that folder splits as it is told. A begun run's split lives in its checkpoint."""
    root = class_folders_alone(tmp_path / "flat", counts=(6, 6))
    argv = ["--data-dir", root, "--epochs", 1, "--batch-size", 4, "--workers", 0, "--out", tmp_path / "run"]
    status, _, err = run_cli(capsys, "--pretrained", "--weights", tmp_path / "none.pth", *argv)
    assert status == 2 and "does not exist" in err and not (tmp_path / "run" / "held_out.txt").exists()
    status, out, err = run_cli(capsys, "--scratch", "--val-split", 0.5, *argv)
    assert status == 0 and "testing on 6 of 12 images, split 0.5" in out, err
    held_out = (tmp_path / "run" / "held_out.txt").read_text().splitlines()
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["held_out"] == held_out and len(held_out) == 6


def test_a_link_back_up_labels_each_image_once_by_its_own_folder(tmp_path, capsys):
    root = write_folder(tmp_path / "d", train=2, test=1)
    os.symlink("..", tmp_path / "d" / "train" / "hotdog" / "loop")  # hotdog/loop/not-hotdog/...
    (tmp_path / "d" / "train" / "not-hotdog" / "broken.png").write_bytes(b"\x89PNG broken")
    train_set, _ = datasets.image_folders(root)
    assert len({os.path.realpath(p) for p, _ in train_set.samples}) == len(train_set) == 4
    for path, target in train_set.samples:
        assert os.path.basename(os.path.dirname(os.path.realpath(path))) == train_set.classes[target], path
    notes = [line for line in capsys.readouterr().err.splitlines() if "left out" in line]
    assert len(notes) == 1 and "left out 1 file(s)" in notes[0]


def test_a_link_never_brings_in_another_splits_or_classs_images(tmp_path, capsys):
    """A link back up from train/hotdog reaches test/ and train/not-hotdog: each image stays in
    the split and class whose folder holds it. A class folder that is a link to another class's
    folder, or to a folder elsewhere in the data folder, is one line."""
    root = write_folder(tmp_path / "d", train=4, test=2)
    os.symlink("../..", tmp_path / "d" / "train" / "hotdog" / "up")
    argv = ["--data-dir", root, "--epochs", 1, "--batch-size", 4, "--workers", 0, "--out", tmp_path / "out"]
    status, out, err = run_cli(capsys, "--scratch", *argv)
    assert status == 0 and "training on 8 images, testing on 4 in test/" in out, err
    for split, folder in zip(("train", "test"), datasets.image_folders(root)):
        for path, target in folder.samples:
            assert os.path.dirname(os.path.realpath(path)) == str(tmp_path / "d" / split / folder.classes[target])
    os.symlink("test", tmp_path / "d" / "val")  # val/hotdog is test/hotdog
    with pytest.raises(UserError, match="val/hotdog is a link to .*test/hotdog"):
        datasets.image_folders(root)
    os.remove(tmp_path / "d" / "val")
    shutil.rmtree(tmp_path / "d" / "train" / "not-hotdog")
    os.symlink("hotdog", tmp_path / "d" / "train" / "not-hotdog")
    status, _, err = run_cli(capsys, "--scratch", *argv)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "train/not-hotdog is a link to" in err and "a folder of its own" in err


def test_twin_class_folders_are_one_class(tmp_path, capsys):
    """café written by a Mac (NFD) beside café written elsewhere (NFC): one class, both folders' images."""
    import unicodedata
    root = write_folder(tmp_path / "d", train=2, test=1, classes={"café": (200, 0, 0), "tea": (0, 0, 200)})
    for split in ("train", "test"):
        twin = tmp_path / "d" / split / unicodedata.normalize("NFD", "café")
        os.makedirs(twin)
        Image.new("RGB", (40, 48), (200, 0, 0)).save(twin / "mac.png")
    train_set, test_set = datasets.image_folders(root)
    assert train_set.targets == [0, 0, 0, 1, 1] and test_set.targets == [0, 0, 1]
    assert [unicodedata.normalize("NFC", c) for c in train_set.classes] == ["café", "tea"]
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4,
                             "--workers", 0, "--out", tmp_path / "out")
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert status == 0 and len(metrics["classes"]) == 2 and torch.tensor(metrics["confusion"]).sum() == 3, err


def test_resume_refuses_another_out_and_takes_the_recipes_lr_typed(tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path / "run")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--out", tmp_path / "new", "--epochs", 2)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "continues in its own folder" in err
    assert "leave --out out" in err and not (tmp_path / "new").exists()
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--lr", "5e-4", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out, err  # the recipe's 5e-4, which the run began with


def test_a_class_with_no_readable_image_is_refused(tmp_path, capsys):
    root = write_folder(tmp_path / "d", train=2, test=1)
    for split in ("train", "test"):
        os.makedirs(tmp_path / "d" / split / "pizza")
        (tmp_path / "d" / split / "pizza" / "0.png").write_bytes(b"\x89PNG broken")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--out", tmp_path / "out")
    assert status == 2 and "train/pizza holds no image that can be read" in err.strip().splitlines()[-1]


def test_an_empty_checkpoint_and_missing_data_for_samples_are_one_line(folder, tmp_path, capsys):
    (tmp_path / "e.pt").touch()
    for argv, message in ((["--resume", tmp_path / "e.pt"], "e.pt is not a checkpoint of this program"),
                          (["--predict", folder, "--model", tmp_path / "e.pt"], "e.pt is not a checkpoint of this program"),
                          (["--show-samples", "--data-dir", tmp_path / "missing", "--out", tmp_path / "ss"],
                           "missing/train is not a folder")):
        status, _, err = run_cli(capsys, *argv)
        assert status == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert message in err
    assert not (tmp_path / "ss").exists()


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_a_truncated_image_is_left_out_with_a_note(cache, tmp_path, capsys):
    root = write_folder(tmp_path / "d", train=3, test=1)
    rng = np.random.default_rng(0)
    cut = tmp_path / "d" / "train" / "hotdog" / "cut.png"
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:20000])  # the header whole, the pixels cut short
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4,
                               "--workers", 0, *cache, "--out", tmp_path / "out")
    assert status == 0 and "epoch 1:" in out, err
    assert "note: left out" in err and "cut.png" in err


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_a_class_whose_only_training_image_is_cut_short_is_refused(cache, tmp_path, capsys):
    """The header is whole, so the image is found; its pixels are not, so it is left out, where
    it is decoded (once, or in the epoch that meets it): then hotdog has no image to learn from."""
    root = write_folder(tmp_path / "d", train=6, test=2)
    for path in (tmp_path / "d" / "train" / "hotdog").iterdir():
        path.unlink()
    cut = tmp_path / "d" / "train" / "hotdog" / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:20000])
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4, "--workers", 0,
                               "--class-weights", "balanced", *cache, "--out", tmp_path / "out")
    error = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert status == 2 and len(error) == 1 and "hotdog" in error[0] and "can be read" in error[0], err
    assert "epoch 1:" not in out and not (tmp_path / "out" / "metrics.json").exists()


def test_an_image_cut_short_is_named_once_by_all_loader_workers(tmp_path, capfd):
    """With --no-cache each worker process reads some of the images, every epoch: the note that
    leaves a file out is said once, whichever worker meets it, however often (capfd: the
    workers write to the process's stderr, not to pytest's sys.stderr)."""
    root = write_folder(tmp_path / "d", train=3, test=2)
    cut = tmp_path / "d" / "train" / "hotdog" / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:20000])
    status, out, err = run_cli(capfd, "--scratch", "--data-dir", root, "--epochs", 3, "--batch-size", 4,
                               "--workers", 2, "--no-cache", "--out", tmp_path / "out")
    assert status == 0 and "epoch 3:" in out, err
    assert len([line for line in err.splitlines() if line.startswith("note: left out") and "cut.png" in line]) == 1, err


def test_a_class_no_loader_worker_can_read_is_one_line_from_python_too(tmp_path):
    """Every image of a class cut short after a whole header: the worker that finds none left
    raises a UserError, which the DataLoader raises again with the worker's traceback as its
    message; the caller gets the worker's one line."""
    root = write_folder(tmp_path / "d", train=2, test=1)
    for path in (tmp_path / "d" / "train" / "hotdog").iterdir():
        path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError) as e:
        runs.train_runs("scratch", str(tmp_path / "run"), data_dir=root, epochs=1, batch_size=4, workers=1, cache_gb=0)
    assert str(e.value) == "no image of class hotdog can be read now; put readable images in its folder"


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


def test_a_runs_folder_inside_the_data_is_never_read_as_data(tmp_path, capsys):
    """--out among the class folders would be a class (and its pictures images): one line, and
    nothing left behind; beside train/ and test/ it is a folder left unused, as any other."""
    root = class_folders_alone(tmp_path / "photos", counts=(4, 4))
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4,
                             "--workers", 0, "--out", tmp_path / "photos" / "run2")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {tmp_path / 'photos' / 'run2'} lies in {root}" in err and "choose an --out outside it" in err
    assert sorted(os.listdir(root)) == ["class0", "class1"]
    book = write_folder(tmp_path / "book", train=2, test=1)
    with pytest.raises(UserError, match="train, whose folders are read as classes"):
        datasets.image_folders(book, out=str(tmp_path / "book" / "train" / "run"))
    assert len(datasets.image_folders(book, out=str(tmp_path / "book" / "runs" / "run"))[0]) == 4


def test_resume_with_the_data_folder_moved(folder, tmp_path, capsys):
    """--resume RUN --data-dir NEW continues where NEW holds the same classes (a split folder
    holds out the same images); where not, one line names the difference. The same command
    again with NEW is refused: it names another data folder, which may hold other images."""
    shutil.copytree(folder, tmp_path / "d")
    argv = ["--epochs", 1, "--batch-size", 4, "--workers", 0]
    assert run_cli(capsys, "--scratch", "--data-dir", tmp_path / "d", *argv, "--out", tmp_path / "run")[0] == 0
    os.symlink(tmp_path / "d", tmp_path / "link")  # the same folder, through a link: the same command
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "link", *argv, "--out", tmp_path / "run")
    assert status == 0 and "finished its 1 epochs already" in out, err
    os.rename(tmp_path / "d", tmp_path / "moved")
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "moved", *argv, "--out", tmp_path / "run")
    assert status == 2 and f"(--data-dir: {tmp_path / 'd'} there, {tmp_path / 'moved'} now); continue it with the same " \
        "(a data folder moved: resume the run with --data-dir where it is now), or train" in err, err
    status, out, err = run_cli(capsys, "--resume", tmp_path / "run", "--data-dir", tmp_path / "moved", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out, err
    assert json.load(open(tmp_path / "run" / "metrics.json"))["args"]["data_dir"] == str(tmp_path / "moved")
    three = write_folder(tmp_path / "three", 1, 1, classes={"a": (0, 0, 0), "b": (1, 1, 1), "c": (2, 2, 2)})
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--data-dir", three, "--epochs", 3)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "was trained on classes ['hotdog', 'not-hotdog'], not ['a', 'b', 'c']" in err
    flat = class_folders_alone(tmp_path / "flat", counts=(5, 5))
    assert run_cli(capsys, "--scratch", "--data-dir", flat, *argv, "--out", tmp_path / "split")[0] == 0
    held_out = (tmp_path / "split" / "held_out.txt").read_text()
    os.rename(flat, tmp_path / "flat2")
    status, out, err = run_cli(capsys, "--resume", tmp_path / "split", "--data-dir", tmp_path / "flat2", "--epochs", 2)
    assert status == 0 and "testing on 2 of 10 images" in out, err
    assert (tmp_path / "split" / "held_out.txt").read_text() == held_out
    for path in held_out.splitlines():  # the images it held out are gone
        os.remove(tmp_path / "flat2" / path)
    status, _, err = run_cli(capsys, "--resume", tmp_path / "split", "--data-dir", tmp_path / "flat2", "--epochs", 3)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "held out for testing" in err, err


def test_a_best_pt_without_its_model_pt_is_trained_over_only_by_its_own_run(folder, tmp_path, capsys, scratch_run):
    """A run's folder that holds best.pt alone (its model.pt deleted, or best.pt copied in to
    predict): a run with other options would write over it, so it is refused; the same run (one
    stopped between writing best.pt and model.pt) trains again."""
    shutil.copytree(scratch_run[0], tmp_path / "run")
    os.remove(tmp_path / "run" / "model.pt")
    before = {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(tmp_path / "run")}
    status, _, err = run_cli(capsys, *SCRATCH, "--data-dir", folder, "--seed", 5, "--out", tmp_path / "run")
    assert status == 2 and err.startswith(f"error: {tmp_path / 'run' / 'best.pt'} was made with other options "
                                          "(--seed: 0 there, 5 now); continue it with the same, or train"), err
    assert {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(tmp_path / "run")} == before
    status, out, err = run_cli(capsys, *SCRATCH, "--data-dir", folder, "--out", tmp_path / "run")
    assert status == 0 and "epoch 1:" in out and (tmp_path / "run" / "model.pt").exists(), err


def test_a_run_continues_without_the_val_split_it_never_read(folder, tmp_path, capsys, scratch_run):
    """A run begun with --val-split on train/ and test/ (taken before such a split was refused)
    continues without it: it split nothing, so the split is no change."""
    shutil.copytree(scratch_run[0], tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    ckpt["args"]["val_split"] = 0.3
    torch.save(ckpt, tmp_path / "run" / "model.pt")
    status, out, err = run_cli(capsys, *SCRATCH[:2], 2, *SCRATCH[3:], "--data-dir", folder, "--out", tmp_path / "run")
    assert status == 0 and "epoch 2:" in out, err


def test_val_added_or_removed_between_runs_names_the_change_and_the_fix(folder, tmp_path, capsys):
    shutil.copytree(folder, tmp_path / "d")
    argv = ["--data-dir", tmp_path / "d", "--epochs", 1, "--batch-size", 4, "--workers", 0]
    assert run_cli(capsys, "--scratch", *argv, "--out", tmp_path / "run")[0] == 0
    shutil.copytree(tmp_path / "d" / "test", tmp_path / "d" / "val")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run", "--epochs", 2)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"was trained with no val/ beside test/, and {tmp_path / 'd'} now holds val/" in err
    assert "move it out of the data folder to continue the run, or train a new one in another --out" in err
    assert run_cli(capsys, "--scratch", *argv, "--out", tmp_path / "run2")[0] == 0
    shutil.rmtree(tmp_path / "d" / "val")
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run2", "--epochs", 2)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "chose its epochs on val/ and kept test/ for a final test" in err and "put them back" in err


def test_ctrl_c_in_a_compare_says_how_to_resume_both_runs(folder, tmp_path, capsys, monkeypatch):
    """Ctrl-C in either run of a --compare, or while drawing their curves, names the folder;
    before a run's first epoch, that there is nothing to resume (its folder is gone)."""
    real = train.fine_tuning_optimizer

    def stopped_in_scratch(net, lr, *args, **kwargs):
        if lr == 5e-4:  # the scratch run, after pretrained finished
            raise KeyboardInterrupt
        return real(net, lr, *args, **kwargs)
    monkeypatch.setattr(train, "fine_tuning_optimizer", stopped_in_scratch)
    status, _, err = run_cli(capsys, "--compare", "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path / "both")
    assert status == 130 and f"--resume {tmp_path / 'both'}\n" in err, err

    def ctrl_c_after_an_epoch(history, *args):
        if history:  # asked after each epoch, once it is saved
            raise KeyboardInterrupt
        return False
    monkeypatch.setattr(runs, "stalled", ctrl_c_after_an_epoch)
    status, _, err = run_cli(capsys, "--compare", "--data-dir", folder, "--epochs", 2, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path / "again")  # Ctrl-C in pretrained, after epoch 1
    assert status == 130 and f"--resume {tmp_path / 'again'}\n" in err, err  # the folder: both runs continue
    monkeypatch.undo()
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "fine_tuning_optimizer", ctrl_c)
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path / "none")  # before its first epoch
    assert status == 130 and "no epoch had finished, so there is nothing to resume" in err, err
    assert not (tmp_path / "none").exists()
    monkeypatch.undo()
    real_curves = pictures.curves

    def stopped_in_the_combined_curves(histories, path=None):
        if len(histories) > 1:  # every run finished
            raise KeyboardInterrupt
        return real_curves(histories, path)
    monkeypatch.setattr(pictures, "curves", stopped_in_the_combined_curves)
    status, _, err = run_cli(capsys, "--compare", "--data-dir", folder, "--epochs", 1, "--batch-size", 8,
                             "--workers", 0, "--out", tmp_path / "drawn")
    assert status == 130 and f"--resume {tmp_path / 'drawn'}\n" in err, err
    monkeypatch.setattr(predict, "predict", ctrl_c)  # no training: nothing to continue, nothing said of it
    assert run_cli(capsys, "--predict", folder, "--model", tmp_path / "drawn")[:3:2] == (130, "\ninterrupted\n")


def test_predict_names_missing_files_leaves_nothing_for_no_images_and_takes_a_folder(tmp_path, capsys, scratch_run):
    status, _, err = run_cli(capsys, "--predict", tmp_path / "nope.jpg", "--model", scratch_run[0], "--workers", 0,
                             "--out", tmp_path / "p1")
    assert status == 1 and "nope.jpg does not exist; check the path" in err and "wrote no predictions.csv" in err
    assert not (tmp_path / "p1" / "predictions.csv").exists()  # nothing predicted: an earlier one would stay
    os.makedirs(tmp_path / "empty")
    status, _, err = run_cli(capsys, "--predict", tmp_path / "empty", "--model", scratch_run[0], "--out", tmp_path / "p2")
    assert status == 2 and "found no images" in err and not (tmp_path / "p2").exists()


def test_downloads_offline_leave_no_folder_and_a_headless_arch_is_refused_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(UserError, match="cannot download"):
        datasets.cifar10(str(tmp_path / "new" / "root"))
    assert not (tmp_path / "new").exists()
    status, _, err = run_cli(capsys, "--scratch", "--arch", "squeezenet1_0", "--data-dir", tmp_path / "nowhere")
    assert status == 2 and "SqueezeNet does not end in a Linear layer" in err and "--arch" in err


def test_the_python_calls_check_what_they_are_given(folder, tmp_path):
    """A list of batches for train_ch13; a net sized for other classes; an unknown precision;
    the book's height x width x channel float images and a short list of titles."""
    X, y = tiny_set()
    net = models.scratch_net()
    history = train.train_ch13(net, [(X, y)], [(X, y)], torch.nn.CrossEntropyLoss(reduction="none"),
                               torch.optim.SGD(net.parameters(), lr=1e-3), 1, "cpu")
    assert len(history) == 1
    three = write_folder(tmp_path / "three", 1, 1, classes={"a": (0, 0, 0), "b": (90, 90, 90), "c": (200, 200, 200)})
    for net, classes in ((models.finetune_net(), 3), (models.scratch_net(3), 2)):
        with pytest.raises(UserError, match=rf"the net has {net.fc.out_features} outputs .* the data has {classes} classes"):
            train.train_fine_tuning(net, 5e-5, data_dir=three if classes == 3 else folder)
    with pytest.raises(UserError, match='precision=fp16 is not one this program computes in; give "amp" or "fp32"'):
        devices.make_runtime("cpu", "fp16")
    imgs = [torch.rand(20, 30, 3), torch.rand(20, 30, 3)]  # the book's: height x width x channels, floats
    assert pictures.show_images(imgs, 1, 2, titles=["one"], path=str(tmp_path / "grid.png")) == str(tmp_path / "grid.png")


class OwnNet(torch.nn.Module):
    """A net of one's own, the book's resnet18 inside it: it has no .fc."""

    def __init__(self):
        super().__init__()
        self.body = models.scratch_net()

    def forward(self, X):
        return self.body(X)


def test_the_python_calls_take_a_net_without_fc_and_refuse_what_they_cannot_use(folder, tmp_path):
    """The book's train_fine_tuning trains any net with param_group=False, and with param_group
    names the missing net.fc; train_ch13 needs batches to train and to test on; prediction takes
    paths, a batch size of 1 or more, and says what an empty list holds; out= is a path. Each in one line."""
    assert len(train.train_fine_tuning(OwnNet(), 5e-4, 4, 1, param_group=False, data_dir=folder)) == 1
    with pytest.raises(UserError, match=r"^param_group=True trains net.fc .* this OwnNet has no .fc; give param_group=False"):
        train.train_fine_tuning(OwnNet(), 5e-4, 4, 1, data_dir=folder)
    X, y = tiny_set()
    net, loss = models.scratch_net(), torch.nn.CrossEntropyLoss(reduction="none")
    for train_iter, test_iter, empty in (([], [(X, y)], "train_iter"), ([(X, y)], [], "test_iter")):
        with pytest.raises(UserError, match=f"^{empty} gives no batches"):
            train.train_ch13(net, train_iter, test_iter, loss, torch.optim.SGD(net.parameters(), lr=1e-3), 1, "cpu")
    runs.train_runs("scratch", str(tmp_path / "run"), data_dir=folder, epochs=1, batch_size=4, workers=0)
    photo = os.path.join(folder, "test", "hotdog", "0.png")
    for images_, message in ((None, "images=None is not a path"), (Image.open(photo), "images=<PIL.*is not a path"),
                             ([photo, Image.open(photo)], r"images=\['.*is not a path or a list of paths")):
        with pytest.raises(UserError, match=f"^{message}"):
            predict.predict(str(tmp_path / "run"), images_, workers=0)
    with pytest.raises(UserError, match="^batch_size=0 is not a whole number, 1 or more"):
        predict.predict(str(tmp_path / "run"), [photo], batch_size=0, workers=0)
    with pytest.raises(UserError, match="^found no images in an empty list; give image files"):
        predict.predict(str(tmp_path / "run"), [], workers=0)
    for call in (lambda: predict.predict(None, [photo]), lambda: runs.resume(None), lambda: predict.export(5)):
        with pytest.raises(UserError, match="^(None|5) is not a path; give the model.pt of a training run"):
            call()
    run = str(tmp_path / "run")  # out= as well, checked before anything is read or trained
    for call in (lambda: predict.predict(run, [photo], out=5), lambda: runs.resume(run, out=5),
                 lambda: predict.export(run, 5), lambda: runs.train_runs("scratch", 5, data_dir=folder)):
        with pytest.raises(UserError, match="^out=5 is not a non-empty text; give a non-empty text"):
            call()
    assert len(predict.predict(str(tmp_path / "run"), (p for p in [photo]), workers=0)) == 1  # any iterable of paths


# ---------------------------------------------------------------- a model to trust: best epoch, stopping, phases, weights
def test_two_phases_keep_the_features_fixed_then_train_them(folder, tmp_path, capsys, torch_home, monkeypatch):
    argv = ["--pretrained", "--data-dir", folder, "--batch-size", 4, "--workers", 0, "--lr", "1e-2"]
    status, out, err = run_cli(capsys, *argv, "--freeze-epochs", 2, "--epochs", 2, "--out", tmp_path / "frozen")
    assert status == 0 and "the output layer alone in the first 2 of 2 epochs" in out, err
    state = torch.load(tmp_path / "frozen" / "model.pt", weights_only=True)["model"]
    features = [k for k in torch_home if not k.startswith("fc.")]
    assert any("running_mean" in k for k in features) and any(k.endswith("num_batches_tracked") for k in features)
    assert all(torch.equal(state[k], torch_home[k]) for k in features)  # weights and BatchNorm statistics
    assert not torch.equal(state["fc.weight"], models.finetune_net().fc.weight)
    status, _, err = run_cli(capsys, *argv, "--freeze-epochs", 1, "--epochs", 2, "--out", tmp_path / "whole")
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert status == 0 and not all(torch.equal(whole["model"][k], torch_home[k]) for k in features), err
    status, _, err = run_cli(capsys, *argv, "--freeze-epochs", 1, "--epochs", 1, "--out", tmp_path / "cut")
    with monkeypatch.context() as m:  # the checkpoint replaces every weight: continuing reads no ImageNet weights
        m.setattr(models, "pretrained_net", lambda *a: pytest.fail("the ImageNet weights were read"))
        status, out, err = run_cli(capsys, "--resume", tmp_path / "cut", "--epochs", 2)
    cut = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert status == 0 and "epoch 2:" in out and "epoch 1:" not in out, err
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])  # continued across the phases
    assert json.load(open(tmp_path / "cut" / "metrics.json"))["args"]["freeze_epochs"] == 1


def plateau(monkeypatch, accuracies):
    """Each evaluation's accuracy taken from accuracies, in turn."""
    turn = iter(accuracies)
    monkeypatch.setattr(train, "accuracy", lambda probs, labels: next(turn))


def test_patience_stops_and_best_pt_keeps_the_epoch_metrics_names(folder, tmp_path, capsys, monkeypatch):
    plateau(monkeypatch, [0.5, 0.75, 0.75, 0.5, 1.0, 1.0])
    argv = ["--scratch", "--data-dir", folder, "--epochs", 6, "--patience", 2, "--batch-size", 8, "--workers", 0,
            "--out", tmp_path / "run"]
    status, out, err = run_cli(capsys, *argv)
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert status == 0 and [m["epoch"] for m in metrics["history"]] == [1, 2, 3, 4], err
    assert "stopped early after epoch 4: no better test acc in 2 epochs" in out
    assert metrics["kept"]["epoch"] == 2 and metrics["kept"]["optimistic"]  # the first of the two best
    assert len([line for line in out.splitlines() if "chosen on the set its accuracy is measured on" in line]) == 1
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["history"][-1]["epoch"] == 2 and best["history"][-1]["test_acc"] == 0.75
    status, out, _ = run_cli(capsys, *argv)  # the same command again: it stopped, so it is finished
    assert status == 0 and "scratch: finished its 4 epochs already" in out and "epoch 5:" not in out
    status, out, _ = run_cli(capsys, "--predict", os.path.join(folder, "test"), "--model", tmp_path / "run" / "best.pt",
                             "--workers", 0, "--out", tmp_path)
    assert status == 0 and len(out.splitlines()) == 4


def test_with_val_and_test_the_epoch_is_chosen_on_val_and_test_is_evaluated_once(tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path / "d", train=3, test=2)
    shutil.copytree(tmp_path / "d" / "test", tmp_path / "d" / "val")
    seen = []
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda net, loader, runtime: seen.append(
        os.path.basename(loader.dataset.root)) or real(net, loader, runtime))
    plateau(monkeypatch, [0.5, 1.0, 0.5])  # epoch 2 the best: no evaluation again for the figures of an earlier one
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 2, "--batch-size", 4,
                               "--workers", 0, "--out", tmp_path / "run")
    assert status == 0, err
    assert "testing on 4 in val/, and once, at the end, 4 in test/" in out
    assert seen == ["val", "val", "test"]  # every epoch on val/, test/ once
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    final = metrics["final_test"]
    assert final["split"] == "test/" and final["epoch"] == metrics["kept"]["epoch"] and not metrics["kept"]["optimistic"]
    assert sum(map(sum, final["confusion"])) == 4 and "test/, once, with epoch" in out
    assert "optimistic" not in out


def test_balanced_class_weights_change_the_loss_as_the_formula_says(tmp_path, capsys, monkeypatch):
    targets = [0] * 6 + [1] * 2
    weights = runs.loss_weights("balanced", type("Set", (), {"targets": targets, "classes": ["a", "b"]}), "cpu")
    assert weights.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])  # n / (classes x n_class)
    class Captured(Exception):
        pass

    def capture(net, train_iter, test_iter, loss, *a):
        losses.append(loss)
        raise Captured
    losses = []
    with monkeypatch.context() as patched:  # the loss a run hands to the book's loop
        patched.setattr(train, "ch13_epochs", capture)
        patched.setattr(runs, "loss_weights", lambda *a: weights)
        with pytest.raises(Captured):
            runs.train_runs("scratch", str(tmp_path / "w"), data_dir=write_folder(tmp_path / "w8"), epochs=1, workers=0)
    loss = losses[0]
    pred, y = torch.randn(8, 2), torch.tensor(targets)
    plain = torch.nn.functional.cross_entropy(pred, y, reduction="none")
    assert loss(pred, y).sum().item() == pytest.approx((weights[y] * plain).sum().item())
    root = write_folder(tmp_path / "d", train=1, test=1)
    for i in range(1, 4):
        shutil.copy(tmp_path / "d" / "train" / "hotdog" / "0.png", tmp_path / "d" / "train" / "hotdog" / f"x{i}.png")
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--class-weights", "balanced", "--epochs", 1,
                               "--batch-size", 4, "--workers", 0, "--out", tmp_path / "run")
    assert status == 0 and "class weights balanced (0.62, 2.50)" in out, err
    assert json.load(open(tmp_path / "run" / "metrics.json"))["args"]["class_weights"] == "balanced"


def test_per_class_figures_match_a_hand_count(scratch_run):
    labels, preds = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])
    result = figures.figures(torch.nn.functional.one_hot(preds, 3).float(), labels, ["a", "b", "c"])
    assert result["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    a, b, c = (result["per_class"][name] for name in "abc")
    assert (a["precision"], a["recall"], a["count"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert a["f1"] == pytest.approx(2 * (2 / 3) / (1 + 2 / 3)) and result["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    run, out = scratch_run
    metrics = json.load(open(run / "metrics.json"))
    assert set(metrics["per_class"]) == {"hotdog", "not-hotdog"}
    assert sum(f["count"] for f in metrics["per_class"].values()) == 4 and "balanced accuracy" in out


def test_runs_of_either_kind_continue_only_as_they_began_and_flags_stay_apart_from_paths(folder, tmp_path, capsys,
                                                                                          monkeypatch):
    old = tmp_path / "python"  # what train_fine_tuning(..., out=) once kept: no mode among its options
    os.makedirs(old)
    torch.save({"model": models.scratch_net().state_dict(), "history": [{"epoch": 1}], "args": {"learning_rate": 5e-4},
                "arch": None, "classes": ["hotdog", "not-hotdog"],
                "transform": dict(resize=256, crop=224, interpolation="bilinear", mean=data.MEAN, std=data.STD)},
               old / "model.pt")
    status, _, err = run_cli(capsys, "--resume", old, "--epochs", 2)
    assert status == 2 and "older train.train_fine_tuning" in err and len(err.strip().splitlines()) == 1
    assert len(predict.predict(old, [os.path.join(folder, "test")], workers=0, arch="resnet18")) == 4  # it still predicts
    for argv in (["--scratch", "--model", "x.pt"], ["--resume", "run", "--model", "x.pt"]):
        with pytest.raises(SystemExit):
            finetune.main(argv)
        assert "--model goes with --predict" in capsys.readouterr().err
    status, _, err = run_cli(capsys, "--scratch", "--freeze", "--data-dir", folder, "--out", tmp_path / "x")
    assert status == 2 and "--freeze changes the pretrained net" in err
    monkeypatch.chdir(tmp_path)  # a failed first run leaves no run folder behind, and a path keeps its = signs
    status, _, err = run_cli(capsys, "--scratch", "--data-dir", tmp_path / "lr=0.1")
    assert status == 2 and f"{tmp_path / 'lr=0.1' / 'train'} is not a folder" in err
    assert not os.path.exists("runs")  # nor the runs/ made for it


def test_a_run_continued_past_its_metrics_reports_its_checkpoint(folder, tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path, dirs_exist_ok=True)  # SCRATCH, one epoch, into tmp_path
    argv = [*SCRATCH, "--data-dir", folder, "--out", tmp_path]
    metrics = (tmp_path / "metrics.json").read_text()
    assert run_cli(capsys, *argv, "--epochs", 2)[0] == 0
    (tmp_path / "metrics.json").write_text(metrics)  # as if stopped after epoch 2's checkpoint
    trained = runs.resume(str(tmp_path), epochs=2)
    assert [m["epoch"] for m in trained.results[0]["history"]] == [1, 2]


def test_the_extras_keep_their_promises_at_the_edges(folder, tmp_path, capsys, monkeypatch):
    """--freeze stays frozen after a first phase; patience counts from the second phase; the
    final test is made up after Ctrl-C in it; best.pt is not continued; the options a Python
    caller gives are checked first."""
    net = models.freeze_features(models.finetune_net())
    with phases.features_frozen(net):
        assert not any(p.requires_grad for p in net.parameters() if p is not net.fc.weight and p is not net.fc.bias)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    flat = [{"epoch": e, "test_acc": 0.5} for e in range(1, 5)]
    assert runs.stalled(flat, 2) and not runs.stalled(flat, 2, frozen=3) and runs.stalled(flat + [dict(epoch=5, test_acc=0.5)], 2, 3)
    root = write_folder(tmp_path / "d", train=2, test=1)
    shutil.copytree(tmp_path / "d" / "test", tmp_path / "d" / "val")
    real = runs.final_test
    monkeypatch.setattr(runs, "final_test", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = ["--scratch", "--data-dir", root, "--epochs", 1, "--batch-size", 4, "--workers", 0, "--out", tmp_path / "run"]
    assert run_cli(capsys, *argv)[0] == 130
    monkeypatch.setattr(runs, "final_test", real)
    status, out, err = run_cli(capsys, *argv)
    assert status == 0 and "finished its 1 epochs already" in out and "test/, once, with epoch 1" in out, err
    assert json.load(open(tmp_path / "run" / "metrics.json"))["final_test"]["split"] == "test/"
    status, _, err = run_cli(capsys, "--resume", tmp_path / "run" / "best.pt", "--epochs", 2)
    assert status == 2 and "is the epoch a run kept, for prediction" in err
    for given, message in ((dict(class_weights="balance"), "class_weights='balance' is not one of 'balanced'"),
                           (dict(class_weights="balanced", dummy=True), "needs labelled images"),
                           (dict(patience=-1), "patience=-1 is not a whole number, 1 or more")):
        with pytest.raises(UserError, match=message):
            runs.train_runs("scratch", str(tmp_path / "never"), **given)
    assert len(predict.predict(tmp_path / "run", os.path.join(folder, "test", "hotdog", "0.png"), workers=0)) == 1
    train_iter, test_iter = data.load_data(4, root)  # the book's call: train/ and test/, whatever else is there
    assert os.path.basename(test_iter.dataset.root) == "test"


def test_options_are_checked_once_by_one_rule_from_python_and_the_command_line(tmp_path, capsys, monkeypatch):
    """Every option a Python caller gets wrong is one UserError naming it, before any data is
    read; the command line's flags pass through the same rule (options.OPTIONS, options.checked)."""
    monkeypatch.setattr(datasets, "datasets", lambda *a, **k: pytest.fail("data read before the options were checked"))
    bad = [("epochs", 0), ("epochs", "1"), ("epochs", 1.5), ("epochs", -1), ("lr", -1), ("lr", "5e-5"), ("lr", [5e-5, 0]), ("lr", [None]),
           ("batch_size", "4"), ("seed", "1"), ("dataset", "x"), ("workers", -1), ("freeze_epochs", None),
           ("device", torch.device("cpu")), ("val_split", 2), ("freeze", "no"), ("patience", 0), ("cache_gb", -1),
           ("max_megapixels", 0), ("precision", "fp16"), ("class_weights", "yes"), ("dummy", 1),
           ("lr", float("inf")), ("max_megapixels", float("inf")), ("cache_gb", float("inf")), ("seed", 2**70),
           ("batch_size", 2**63), ("data_dir", ""), ("arch", ""), ("epochs", np.float64(2))]
    for name, value in bad:
        with pytest.raises(UserError, match="^" + re.escape(f"{name}={value[-1] if name == 'lr' and isinstance(value, list) else value!r} is not")):
            runs.train_runs("scratch", str(tmp_path / "never"), **{name: value})
        with pytest.raises(UserError, match=f"^{name}="):
            runs.resume(str(tmp_path / "never"), **{name: value})
    for name, text in (("epochs", "0"), ("epochs", "1.5"), ("lr", "-1"), ("val_split", "2"), ("workers", "-1"),
                       ("patience", "0"), ("dataset", "x"), ("precision", "fp16"), ("seed", "x"), ("max_megapixels", "0")):
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit):
            cli.parse_args(["--scratch", flag, text])
        err = capsys.readouterr().err
        assert f"argument {flag}: give {options.takes(*options.OPTIONS[name][1:])}, not {text}" in err, err
    for name, text, value in (("val_split", "0.5", 0.5), ("epochs", "3", 3), ("lr", "5e-5", 5e-5), ("seed", "-1", -1),
                              ("precision", "fp32", "fp32"), ("freeze_epochs", "0", 0)):
        typed = getattr(cli.parse_args(["--scratch", "--" + name.replace("_", "-"), text]), name)
        assert typed == ([value] if name == "lr" else value) and options.checked(name, value) == value
    with pytest.raises(UserError, match=re.escape("lr=[5e-05, 5e-05] names two runs alike; give each learning rate once")):
        runs.train_runs("pretrained", str(tmp_path / "never"), lr=[5e-5, 5e-5])  # one folder for both
    assert options.checked("data_dir", tmp_path) == str(tmp_path)  # a path object is a path
    for name, value in (("epochs", np.int64(3)), ("lr", np.float32(0.5)), ("lr", [np.float64(1e-3), 2])):
        typed = options.checked(name, value)  # numpy's numbers, as Python's (metrics.json, a checkpoint's args)
        assert typed == value and {type(v) for v in (typed if isinstance(typed, list) else [typed])} == {options.OPTIONS[name][1]}
    with pytest.raises(UserError, match="^out='' is not a non-empty text; give a non-empty text$"):
        options.checked("out", "")
    assert sorted(cli.HELP) == sorted(options.OPTIONS)  # every option has its flag
    with pytest.raises(UserError, match=r"^resume takes out= and the options \['dataset', .*\], not \['epoch'\]$"):
        runs.resume(str(tmp_path / "never"), epoch=2)


def test_options_that_would_be_ignored_are_refused(folder, tmp_path, capsys):
    """An option the mode does not read, or one that another option makes unread, is refused in
    one line, never silently ignored."""
    for argv, message in ((["--predict", "x.png", "--model", "m", "--epochs", 3], "--epochs does not apply to --predict, "
                           "which reads --arch, --batch-size, --device, --max-megapixels, --model, --out, --precision, --workers"),
                          (["--export", "m", "--device", "cuda"], "--device does not apply to --export"),
                          (["--show-samples", "--dummy"], "--dummy does not apply to --show-samples")):
        with pytest.raises(SystemExit):
            cli.parse_args([str(a) for a in argv])
        assert message in capsys.readouterr().err
    for given, message in ((dict(dummy=True, data_dir=str(tmp_path)), "^data_dir= and dummy= each name the data to "
                            "train on; give one of them$"), (dict(dummy=True, dataset="cifar10"), "^dummy= and dataset= each"),
                           (dict(freeze=True, freeze_epochs=1), "^freeze= trains the output layer alone in every epoch"),
                           (dict(dummy=True, data_root=str(tmp_path)), "^data_root= is where the hot-dog set and CIFAR-10 "
                            "are downloaded, and dummy= downloads nothing; leave data_root= out$"),
                           (dict(data_dir=folder, val_split=0.5), f"^val_split= splits a data_dir= of class folders "
                            f"alone, and {folder} is not one; leave val_split= out$"),
                           (dict(val_split=0.5), "^val_split= .*, and the hotdog set is not one"),
                           (dict(dummy=True, val_split=0.5), "^val_split= .*, and dummy data is not one")):
        with pytest.raises(UserError, match=message):
            runs.train_runs("pretrained", str(tmp_path / "never"), **given)
    began = dict(freeze=True, freeze_epochs=1)  # a run begun before these were refused still resumes
    assert runs.settled("pretrained", began, list(began))["freeze"]
    options.refuse_unread({**options.DEFAULTS, "dummy": True, "data_dir": "x"}, set())  # as such a run began: taken
    with pytest.raises(UserError, match="^data_dir= and dummy= each name the data"):  # data_dir= given anew: refused
        options.refuse_unread({**options.DEFAULTS, "dummy": True, "data_dir": "x"}, {"data_dir"})
    status, _, err = run_cli(capsys, "--show-samples", "--data-dir", tmp_path, "--data-root", tmp_path, "--out", tmp_path)
    assert status == 2 and "--data-root is where the hot-dog set and CIFAR-10 are downloaded, and --data-dir" in err
    with pytest.raises(SystemExit):
        cli.parse_args(["--predict", "x.png", "--model", "m", "--no-cache"])
    assert "--cache-gb or --no-cache does not apply to --predict" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--scratch", "--data-dir", ""])
    assert "argument --data-dir: give a non-empty text, not ''" in capsys.readouterr().err


def test_every_classifier_with_one_linear_head_is_taken_and_the_others_refused_in_one_line():
    """check_arch builds each arch on the meta device; regnets, which cannot be built there, are
    built for real rather than crash; an arch without one Linear output layer is one line."""
    assert archs.check_arch("regnet_x_400mf") == "regnet_x_400mf"
    with pytest.raises(UserError, match="^SqueezeNet does not end in a Linear layer.*choose another arch="):
        archs.check_arch("squeezenet1_0")


# ---------------------------------------------------------------- the recipe held to the book: each statement has a test that fails without it
def book_augs():
    """§14.2.2.1's augmentations as the book writes them: torchvision's PIL transforms, ToTensor
    and Normalize with ImageNet's statistics."""
    T = torchvision.transforms
    normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return (T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize]),
            T.Compose([T.Resize([256, 256]), T.CenterCrop(224), T.ToTensor(), normalize]))


def test_augmentations_are_the_books_to_one_grey_level():
    """train_augs and test_augs, then normalize on the batch, give the book's images within one grey
    level, with the same random draws (the crop's place and size, the flip), for the book's call
    (data.train_augs) and for a run (at resnet18's sizes, which are the book's)."""
    book_train, book_test = book_augs()
    sizes = archs.preprocessing("resnet18")
    assert sizes == dict(resize=256, crop=224, interpolation="bilinear")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8))  # not square
    one_grey = 1.5 / 255 / 0.224

    def ours(augs):
        return data.normalize(augs(photo)[None])[0]
    for train_augs in (data.train_augs, data.make_train_augs(sizes["crop"], sizes["interpolation"])):
        for seed in range(8):
            torch.manual_seed(seed)
            expected = book_train(photo)
            torch.manual_seed(seed)
            assert (ours(train_augs) - expected).abs().max() < one_grey, seed
    for test_augs in (data.test_augs, data.make_test_augs(sizes["resize"], sizes["crop"], sizes["interpolation"])):
        assert (ours(test_augs) - book_test(photo)).abs().max() < one_grey


def test_the_training_loader_is_shuffled_and_the_test_loader_is_not(folder):
    """The book's train_iter is shuffled (shuffle=True) and its test_iter is not: in the book's
    call (data.load_data) and in a run's loaders (loaders.make_loaders)."""
    def order(loader):
        return [i for batch in loader.batch_sampler for i in batch]
    torch.manual_seed(0)
    for train_iter, test_iter in (data.load_data(4, folder), loaders.make_loaders(*datasets.image_folders(folder), 4)):
        orders = [order(train_iter) for _ in range(3)]
        assert all(sorted(o) == list(range(8)) for o in orders) and any(o != list(range(8)) for o in orders)
        assert order(test_iter) == list(range(4))


def test_restore_puts_back_the_weights_the_optimizer_and_the_random_numbers(tmp_path):
    """What checkpoints.save keeps, checkpoints.restore puts back into a fresh net and optimizer: the weights,
    the optimizer's state (the book's SGD keeps none, so momentum stands in here for any that
    does) and the random numbers that draw the next crops and shuffles."""
    import random
    torch.manual_seed(0)
    net = models.scratch_net(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    history = [{"epoch": 1, "test_acc": 0.5}]
    checkpoints.save(str(tmp_path), history, {"held_out": None},
              dict(model=net.state_dict(), optimizer=optimizer.state_dict(), scaler={}))
    draws = torch.rand(3), random.random()  # what comes next, after the save
    torch.manual_seed(1)
    fresh = models.scratch_net(2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoints.restore(ckpt, fresh, fresh_optimizer, torch.amp.GradScaler("cpu", enabled=False)) == history
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1]
    assert all(torch.equal(value, fresh.state_dict()[name]) for name, value in net.state_dict().items())
    momentum = [optimizer.state[p]["momentum_buffer"] for p in net.parameters()]
    assert all(torch.equal(m, fresh_optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, fresh.parameters()))


def test_evaluate_uses_the_nets_evaluation_mode():
    """§7.6's evaluate_accuracy_gpu sets net.eval(): BatchNorm normalises with its running
    statistics, not the test batch's, and leaves them as they were."""
    torch.manual_seed(0)
    net = models.scratch_net(2).train()  # as an epoch of training leaves it
    X, y = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    before = {name: value.clone() for name, value in net.state_dict().items()}
    probs, labels = evaluate(net, [(X, y)], CPU)
    assert all(torch.equal(value, before[name]) for name, value in net.state_dict().items())
    with torch.no_grad():
        assert torch.allclose(probs, torch.softmax(net.eval()(data.normalize(X)), 1), atol=1e-6)


# ---------------------------------------------------------------- the docs' code blocks, run
TINY = "--epochs 1 --batch-size 4 --workers 0"

# Every fenced block of README.md and docs/*.md, by its first line (spaces collapsed), and what
# the test does with it: a list of changes (each must apply) after which it runs here, offline, on
# a generated set in a fresh folder; ("output", block) for an example of what a block prints,
# compared line by line, figures aside; ("files", block) for a run's folder, compared with the
# files that block's run wrote; or, in words, why it cannot run here.
DOC_BLOCKS = {
    "pip install -r requirements.txt && python finetune.py --pretrained": [
        ("pip install -r requirements.txt && ", ""),  # installing needs the network
        ("--pretrained\n", f"--pretrained {TINY}\n"),
        ("pip install -r requirements.txt pytest pytest-xdist matplotlib nbclient ipykernel onnx onnxscript "
         "onnxruntime && python -m pytest -q -n 2 test_finetune.py\n", "")],  # the network, and this suite itself
    "data ready in 9.8 s": ("output", "pip install -r requirements.txt && python finetune.py --pretrained"),
    "import models, train": [("train_fine_tuning(finetune_net, 5e-5)", "train_fine_tuning(finetune_net, 5e-5, num_epochs=1)"),
                                     ("param_group=False)", "param_group=False, num_epochs=1)")],
    "from beyond import predict, runs": [("epochs=5)", "epochs=1, batch_size=4, workers=0)"), ("epochs=8)", "epochs=2)")],
    "run loss train acc test acc ex/sec book": ("output", "--compare"),
    "runs/pretrained-20261123-101500/": ("files", "pip install -r requirements.txt && python finetune.py --pretrained"),
    "python finetune.py --predict photo1.jpg holiday/ --model runs/pretrained-.../model.pt --out predictions":
        [("runs/pretrained-...", "{run}")],  # the run of the README's first command
    "python finetune.py --resume runs/pretrained-.../model.pt": [("runs/pretrained-...", "{run}")],
    "torchrun --nproc_per_node=4 finetune.py --pretrained # 4 GPUs (or 4 CPU processes)":
        "4 processes, then 8 on each of 2 machines; test_torchrun_command_line runs torchrun (as cli.on_all_gpus "
        "starts it) with 2 CPU processes",
    "torchrun --nproc_per_node=4 --max-restarts=3 finetune.py --pretrained":
        "4 GPUs; test_torchrun_restarts_a_killed_worker_and_the_run_finishes runs it with 2 CPU processes",
    "torchrun --nnodes=2 --nproc_per_node=8 --max-restarts=3 --rdzv-id=hotdog-1 \\": "2 machines of 8 GPUs",
    "python -m beyond.benchmark --data-dir data/hotdog # or --dummy: no data needed":
        [("data/hotdog", "data/hotdog --batch-size 4 --batches 1 --workers 0")],
    "python finetune.py --export runs/pretrained-... # runs/pretrained-.../best.pt2": [("runs/pretrained-...", "{run}")],
    "import json": [('"best.', '"{run}/best.'), ("photo.jpg", "photo1.jpg")],  # with torch alone, and with onnxruntime
    '"""--predict against the exported files, on the same photos and CPU: images/sec, photo files in,':
        "speed.py, a measurement taken by hand: rounds of timing on a folder of photos, minutes long",
    "DIR/train/<class>/<image> the book's: its own test set":
        "the two layouts of a data folder, not a command; photos/ here is the first",
}


def doc_blocks():
    """The fenced blocks of README.md, then docs/*.md: (first line with spaces collapsed, language, text)."""
    names = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(HERE, "docs")) if n.endswith(".md"))
    for name in names:
        text = open(os.path.join(HERE, name), encoding="utf-8").read()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            yield " ".join(match[2].splitlines()[0].split()), match[1], match[2]


def changed(text, changes, run):
    for old, new in changes:
        assert old in text, f"the change {old!r} no longer applies to the block {text.splitlines()[0]!r}"
        text = text.replace(old, new.replace("{run}", run or ""))
    return text


def run_block(text, language, monkeypatch):
    """A Python block, or a shell block's commands (python finetune.py, python benchmark.py), in this process."""
    if language == "python":
        return exec(compile(text, "block", "exec"), {})
    import shlex
    from beyond import benchmark
    for line in text.replace("\\\n", " ").splitlines():
        for command in filter(None, map(str.strip, line.split("&&"))):
            python, program, *argv = shlex.split(command, comments=True)
            if program == "-m":
                program, *argv = argv
            assert python == "python" and program in ("finetune.py", "beyond.benchmark"), command
            if program == "finetune.py":
                assert finetune.main(argv) == 0, command
            else:
                monkeypatch.setattr(sys, "argv", [program, *argv])
                benchmark.main()


def printed_like(example, printed):
    """Whether every line of an example of output, its figures (and the letters standing for
    them: L, A, T...), the device and a closing "..." aside, is a line that was printed."""
    variable = r"(\.\.\.|cuda, bfloat16 autocast, channels-last|\b[A-Z]\b|\d+(?:\.\d+)?|\s+)"
    patterns = {r"...": ".*", "cuda, bfloat16 autocast, channels-last": ".+"}
    for line in example.splitlines():
        if line.strip() == "...":
            continue
        parts = re.split(variable, line.strip())  # the variable parts at odd places
        pattern = "".join(re.escape(p) if i % 2 == 0 else patterns.get(p, r"\s+" if p.isspace() else r"[-+.e\d]+")
                          for i, p in enumerate(parts))
        if not any(re.fullmatch(pattern, shown.strip()) for shown in printed.splitlines()):
            return line
    return None


def test_every_doc_block_is_run_or_listed_with_why_not():
    found = [first for first, _, _ in doc_blocks()]
    assert sorted(set(found) - set(DOC_BLOCKS)) == [], "a new block: add it to DOC_BLOCKS"
    assert sorted(set(DOC_BLOCKS) - set(found)) == [], "a block gone or changed: update DOC_BLOCKS"


def test_the_docs_blocks_run_as_written(folder, tmp_path, capsys, monkeypatch, compare_run):
    """In a fresh folder holding what the blocks name (the hot-dog set where its download puts it,
    photos/, holiday/, photo1.jpg), each block runs in reading order with its listed changes, as
    a reader following the docs would; the examples of output and of a run's folder match."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folder, "data/hotdog")  # found there, so nothing is downloaded
    shutil.copytree(folder, "photos")
    os.makedirs("holiday")
    for name in ("holiday/beach.png", "holiday/hotdog.jpg", "photo1.jpg"):
        Image.new("RGB", (50, 40), (220, 60, 30)).save(name)
    printed, run = {"--compare": compare_run[1]}, None
    for first, language, text in doc_blocks():
        how = DOC_BLOCKS[first]
        if isinstance(how, list):
            run_block(changed(text, how, run), language, monkeypatch)
            printed[first] = capsys.readouterr().out
            run = run or next(iter(sorted(map(str, (tmp_path / "runs").glob("pretrained-*")))), None)
        elif how[0] == "output":
            assert printed_like(text, printed[how[1]]) is None, f"{printed_like(text, printed[how[1]])!r} is not printed"
        elif how[0] == "files":
            listed = {line.split()[0] for line in text.splitlines()[1:]}
            assert set(os.listdir(run)) <= listed, f"{sorted(set(os.listdir(run)) - listed)} not in {first}"
    assert len(os.listdir(tmp_path / "runs" / "mine")) and os.path.exists(os.path.join(run, "model.pt"))
    assert (tmp_path / "predictions" / "predictions.csv").exists()


def test_every_command_the_docs_name_is_one_the_command_line_takes():
    """The commands named in the docs' text and tables (`python finetune.py ...`) parse, their
    placeholders (DIR, IMG.jpg, runs/...) taken as the paths they stand for."""
    names = ["README.md"] + [os.path.join("docs", n) for n in os.listdir(os.path.join(HERE, "docs")) if n.endswith(".md")]
    text = "".join(open(os.path.join(HERE, name), encoding="utf-8").read() for name in names)
    commands = set(re.findall(r"`python finetune\.py ([^`]+)`", text))
    assert len(commands) > 10
    for command in commands:
        cli.parse_args(command.split())


# ---------------------------------------------------------------- a run's folder tells the truth
def judged(monkeypatch, rights):
    """Each evaluation's predictions all right or all wrong, as rights says in turn."""
    turn = iter(rights)

    def evaluate(net, loader, runtime):
        labels = torch.as_tensor(loader.dataset.targets)
        return torch.nn.functional.one_hot(labels if next(turn) else 1 - labels, 2).float(), labels
    monkeypatch.setattr(train, "evaluate", evaluate)


def test_best_pt_says_what_it_is_under_any_name(tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path, dirs_exist_ok=True)  # SCRATCH, one epoch, into tmp_path
    shutil.copy(tmp_path / "best.pt", tmp_path / "epoch1.pt")
    os.symlink(tmp_path / "best.pt", tmp_path / "link.pt")
    before = (tmp_path / "model.pt").read_bytes()
    for named in (f"{tmp_path / 'best.pt'}/", tmp_path / "epoch1.pt", tmp_path / "link.pt"):
        status, _, err = run_cli(capsys, "--resume", named, "--epochs", 2)
        assert status == 2 and "is the epoch a run kept, for prediction" in err, (named, err)
    assert checkpoints.load_checkpoint(checkpoints.kept_in(f"{tmp_path / 'best.pt'}/"))["is_best"]  # as --predict, --export read it
    old = torch.load(tmp_path / "model.pt", weights_only=True)  # written before checkpoints said what they are
    del old["is_best"]
    torch.save(old, tmp_path / "best.pt")
    assert run_cli(capsys, "--resume", tmp_path / "best.pt", "--epochs", 2)[0] == 2  # by its name
    assert (tmp_path / "model.pt").read_bytes() == before
    torch.save(old, tmp_path / "model.pt")
    status, out, err = run_cli(capsys, "--resume", tmp_path / "model.pt", "--epochs", 2)
    assert status == 0 and "epoch 2:" in out, err


def test_a_model_pt_copied_alone_keeps_and_tests_an_epoch_it_has(tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path / "d", train=2, test=1)
    shutil.copytree(tmp_path / "d" / "test", tmp_path / "d" / "val")
    argv = ["--data-dir", root, "--batch-size", 4, "--workers", 0]
    plateau(monkeypatch, [1.0, 1.0])  # epoch 1 on val/, then the final test
    assert run_cli(capsys, "--scratch", *argv, "--epochs", 1, "--out", tmp_path / "a")[0] == 0
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")
    plateau(monkeypatch, [0.5, 0.75, 0.5])  # epochs 2 and 3, then the final test
    status, out, err = run_cli(capsys, "--resume", tmp_path / "b" / "model.pt", "--epochs", 3)
    metrics = json.load(open(tmp_path / "b" / "metrics.json"))
    best = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert status == 0 and metrics["kept"]["epoch"] == metrics["final_test"]["epoch"] == 1, err
    assert best["history"][-1]["epoch"] == 1 and "best.pt keeps epoch 1" in out and "with epoch 1's weights" in out
    first = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(best["model"][k], first[k]) for k in first)
    read, load = [], checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path: read.append(os.path.basename(path)) or load(path))
    os.makedirs(tmp_path / "c")
    shutil.copy(tmp_path / "b" / "best.pt", tmp_path / "c")  # best.pt alone, copied to predict elsewhere
    for model in (tmp_path / "b", tmp_path / "b" / "model.pt", tmp_path / "c"):  # a folder: the epoch it keeps
        predict.predict(model, os.path.join(root, "test"), workers=0)
    assert read == ["best.pt", "model.pt", "best.pt"]


def test_a_finished_run_writes_again_the_results_it_lacks(folder, tmp_path, capsys, scratch_run):
    shutil.copytree(scratch_run[0], tmp_path, dirs_exist_ok=True)  # SCRATCH, one epoch, into tmp_path
    argv = [*SCRATCH, "--data-dir", folder, "--out", tmp_path]
    written = json.load(open(tmp_path / "metrics.json"))
    for name in ("metrics.json", "curves.png"):  # as if the run had stopped after its last model.pt
        os.remove(tmp_path / name)
    status, out, err = run_cli(capsys, *argv)
    assert status == 0 and "finished its 1 epochs already" in out and "balanced accuracy" in out, err
    again = json.load(open(tmp_path / "metrics.json"))
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert again["per_class"] == written["per_class"] and again["history"] == written["history"]
    for damaged in ('{"history": [', '{"history": [1]}'):  # by hand: not JSON, or not this run's
        (tmp_path / "metrics.json").write_text(damaged)
        status, _, err = run_cli(capsys, *argv)
        assert status == 0 and json.load(open(tmp_path / "metrics.json"))["history"] == written["history"], err


def test_a_continued_run_without_mistakes_shows_none(folder, tmp_path, capsys, monkeypatch):
    argv = ["--scratch", "--data-dir", folder, "--batch-size", 8, "--workers", 0, "--out", tmp_path]
    read, load = [], checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path: read.append(os.path.basename(path)) or load(path))
    judged(monkeypatch, [False])
    assert run_cli(capsys, *argv, "--epochs", 1)[0] == 0 and (tmp_path / "mistakes.png").exists()
    assert read == []  # the last epoch is the one best.pt keeps: its figures are known without reading it back
    judged(monkeypatch, [True])
    status, _, err = run_cli(capsys, *argv, "--epochs", 2)
    assert status == 0 and not (tmp_path / "mistakes.png").exists(), err
    assert read == ["model.pt", "best.pt"]  # continued: each read once, best.pt for the epoch it keeps
    assert json.load(open(tmp_path / "metrics.json"))["balanced_accuracy"] == 1.0


def test_a_diverging_run_writes_strict_json(folder, tmp_path, capsys, monkeypatch):
    """...and its NaN outputs predict nothing: never right (argmax would call them class 0, here
    half the test set), in no column of the confusion matrix, each in mistakes.png, and refused by --predict."""
    argv = ["--compare", "--data-dir", folder, "--epochs", 2, "--lr", "1e8", "--precision", "fp32",
            "--batch-size", 4, "--workers", 0, "--out", tmp_path]
    captions = []
    monkeypatch.setattr(pictures, "grid", lambda rows, texts, path, scale: captions.append(sum(texts, [])))
    assert run_cli(capsys, *argv)[0] == 0
    assert [len(texts) for texts in captions] == [4, 4]  # the 4 test images, in both runs
    assert all(text.endswith("\npred nothing (NaN)") for texts in captions for text in texts), captions
    losses = []
    for name in ("pretrained", "scratch"):
        text = (tmp_path / name / "metrics.json").read_text()
        metrics = json.loads(text, parse_constant=lambda word: pytest.fail(f"{word} in metrics.json"))
        losses += [m["loss"] for m in metrics["history"]]
        assert [m["test_acc"] for m in metrics["history"]] == [0, 0] and metrics["balanced_accuracy"] == 0
        assert metrics["confusion"] == [[0, 0], [0, 0]] and [c["count"] for c in metrics["per_class"].values()] == [2, 2]
    assert None in losses  # a run diverged
    status, out, err = run_cli(capsys, *argv)  # finished: the results read back, and the table printed
    assert status == 0 and "nan" in out.split("book")[-1], err
    status, out, err = run_cli(capsys, "--predict", folder, "--model", tmp_path / "scratch", "--out", tmp_path / "p")
    dtype = devices.amp_dtype(torch.device("cpu"))  # where autocast runs, its type may have overflowed
    overflow = f", or its {dtype} arithmetic overflowed: try the precision fp32" if dtype else ""
    assert status == 2 and err.endswith("best.pt gives outputs that are not numbers (NaN) for every image: its training "
                                        f"diverged, and should be trained again with a lower lr{overflow}\n"), err


def test_an_image_the_net_gives_nan_for_is_named_and_left_out(folder, tmp_path, capsys, monkeypatch, scratch_run):
    """NaN for one image (an overflow in fp16, say) leaves that image out, named; the others are predicted."""
    evaluate = train.evaluate

    def nan_first(*args):
        probs, index = evaluate(*args)
        probs[index == 0] = float("nan")
        return probs, index
    monkeypatch.setattr(train, "evaluate", nan_first)
    photo_dir = os.path.join(folder, "test", "hotdog")
    status, out, err = run_cli(capsys, "--predict", photo_dir, "--model", scratch_run[0], "--out", tmp_path, "--workers", 0)
    first, *others = photos.image_files(photo_dir)
    dtype = devices.amp_dtype(torch.device("cpu"))  # where autocast runs, its type may have overflowed
    overflow = f", or its {dtype} arithmetic overflowed: try the precision fp32" if dtype else ""
    assert status == 1 and f"error: {first}: the net's outputs are not numbers (NaN){overflow}\n" in err, err
    assert [line.split(":")[0] for line in out.splitlines()] == others and len(others) >= 1


def test_a_compares_scratch_run_says_it_stopped_and_records_what_it_used(folder, tmp_path, capsys, monkeypatch):
    plateau(monkeypatch, [0.5] * 5)  # 3 pretrained epochs, 2 scratch
    status, out, err = run_cli(capsys, "--compare", "--data-dir", folder, "--freeze-epochs", 5, "--patience", 1,
                               "--epochs", 3, "--batch-size", 8, "--workers", 0, "--out", tmp_path)
    assert status == 0, err
    assert "the output layer alone in the first 3 of 3 epochs" in out and "first 5" not in out
    assert "scratch: stopped early after epoch 2: no better test acc in 1 epochs" in out
    used = [json.load(open(tmp_path / name / "metrics.json"))["args"]["freeze_epochs"] for name in ("pretrained", "scratch")]
    assert used == [5, 0]
    status, out, err = run_cli(capsys, "--resume", tmp_path, "--epochs", 3)  # each run continues as it began
    assert status == 0 and out.count("already") == 2, err


def test_the_figures_are_those_of_the_epoch_kept_and_the_note_names_no_test_set(tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path / "d", train=2, test=2)
    os.rename(tmp_path / "d" / "test", tmp_path / "d" / "val")  # train/ and val/ alone
    judged(monkeypatch, [True, False, True])  # epoch 1 right, epoch 2 wrong, then best.pt's epoch again
    status, out, err = run_cli(capsys, "--scratch", "--data-dir", root, "--epochs", 2, "--batch-size", 4,
                               "--workers", 0, "--out", tmp_path / "run")
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert status == 0 and metrics["test_acc"] == 0 and metrics["kept"]["epoch"] == metrics["figures_epoch"] == 1, err
    assert metrics["balanced_accuracy"] == 1 and torch.tensor(metrics["confusion"]).trace() == 4
    assert "confusion of epoch 1, the one best.pt keeps" in out and "balanced accuracy 1.000" in out
    assert "test set" not in out and "chosen on the set its accuracy is measured on" in out
