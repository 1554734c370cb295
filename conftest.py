"""What the tests share, in test_finetune.py and tests/: a generated data folder, stand-in
ImageNet weights, runs trained once for every test process, and the helpers tests import
(`from conftest import write_folder`)."""
import os

# One of several test processes (pytest-xdist's workers): torch's arithmetic in one thread each, set
# before torch starts its pool and inherited by the processes tests start, unless set already. Each
# process's threads would run, and spin waiting, on every core, and the processes slow each other:
# on a 2-core Intel Xeon with AMX, `-n 2` took 7 min 29 s with torch's threads, 2 min 55 s with one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tests compute on the CPU on every machine: their figures and exact comparisons are the CPU's.
# CUDA's GPUs are hidden before torch starts, from the processes tests start too, unless named
# (CUDA_VISIBLE_DEVICES=0 runs the GPU's own tests: test_devices.py -k cuda); MPS in this process.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import contextlib
import errno
import fcntl
import http.server
import io
import json
import shutil
import threading

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data
import finetune
import train
from beyond import files
from beyond.devices import make_runtime


torch.backends.mps.is_available = lambda: False
CPU = make_runtime(torch.device("cpu"), "fp32")
HERE = os.path.dirname(os.path.abspath(__file__))
COLOURS = {"hotdog": (220, 60, 30), "not-hotdog": (30, 60, 220)}


# ---------------------------------------------------------------- data and weights
def write_folder(root, train=4, test=2, size=(40, 48), classes=COLOURS, seed=0):
    """An ImageFolder with train/ and test/ of plain noisy colours, one colour per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for name, colour in classes.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 20, size + (3,)), 0, 255)
                path = os.path.join(root, split, name, f"{i}.png")
                Image.fromarray(img.astype(np.uint8)).save(path)
    return str(root)


def sideways(upright, path):
    """The photo as a phone stores a portrait: pixels turned a quarter, the turn in the EXIF tag."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show
    upright.rotate(90, expand=True).save(path, exif=exif)


def add_junk(root):
    """What notebooks, macOS and zip files leave in a data folder."""
    for split in ("train", "test"):
        os.makedirs(root / split / ".ipynb_checkpoints")  # empty: once "Found no valid file"
        os.makedirs(root / split / "__MACOSX" / "hotdog")
        apple_double = b"\x00\x05\x16\x07 apple double"
        (root / split / "__MACOSX" / "hotdog" / "._0.png").write_bytes(apple_double)
        (root / split / "hotdog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 apple double")
        (root / split / "hotdog" / ".DS_Store").write_bytes(b"junk")
        os.makedirs(root / split / "hotdog" / ".ipynb_checkpoints")
        Image.new("RGB",
                  (8, 8)).save(root / split / "hotdog" / ".ipynb_checkpoints" / "0-checkpoint.png")


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


def class_folders_alone(root, counts=(10, 7, 3)):
    """photos/<class>/<image> with no train/ or test/: three classes of different sizes."""
    for c, n in enumerate(counts):
        write_folder(root / "tmp", train=n, test=0,
                     classes={f"class{c}": (80 * c, 60, 200 - 80 * c)}, seed=c)
        os.rename(root / "tmp" / "train" / f"class{c}", root / f"class{c}")
        shutil.rmtree(root / "tmp")
    return str(root)


# ----------------------------------------------------------- runs made once for every test process
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
    """A command line's run, trained once for every test that reads it (made_once): its folder,
    and what it printed."""
    def make(where):
        with contextlib.redirect_stdout(io.StringIO()) as printed, \
                contextlib.redirect_stderr(io.StringIO()) as err:
            argv_out = [str(a) for a in (*argv, "--out", where / "run")]
            assert finetune.main(argv_out) == 0, err.getvalue()
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
    return trained_once(tmp_path_factory, "compare_run", "--compare", "--data-dir", folder,
                        "--epochs", 1, "--batch-size", 8, "--workers", 0)


# ---------------------------------------------------------------- helpers
def run_cli(capsys, *argv):
    """finetune.py's main in this process: (exit status, stdout, stderr)."""
    status = finetune.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_epoch(net, train_iter, test_iter, runtime=CPU, lr=0.01):
    """The book's loop for one epoch, with the recipe's summed loss and optimizer: its Epochs."""
    loss = train.fine_tuning_loss()
    return list(train.ch13_epochs(net, train_iter, test_iter, loss,
                                  train.fine_tuning_optimizer(net, lr), range(1), runtime))


def recipe_optimizer(monkeypatch, net, lr, param_group=True):
    """The loss and optimizer that the book's train_fine_tuning hands to train_ch13."""
    classes = [str(c) for c in range(net.fc.out_features)]
    loader = type("Loader", (), {"dataset": type("Set", (), {"classes": classes})})
    monkeypatch.setattr(data, "load_data", lambda *a, **k: (loader, loader))
    monkeypatch.setattr(train, "train_ch13", lambda net, train_iter, test_iter, loss, optimizer,
                        *a, **k: (loss, optimizer))
    return train.train_fine_tuning(net, lr, param_group=param_group)


def tiny_set():
    torch.manual_seed(0)
    X = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(16) % 2
    X[y == 1] //= 2  # darker images are class 1
    return X, y


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
    """The at_call-th write of a file called name (through files.write_whole) finds the disk
    full."""
    calls = []

    def open_(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        calls.append(path) if path.endswith(name + ".part") else None
        return HalfWritten(f) if path.endswith(name + ".part") and len(calls) == at_call else f
    monkeypatch.setattr(files, "open", open_, raising=False)


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
