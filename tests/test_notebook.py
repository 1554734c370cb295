"""From Python and a notebook: fine_tuning.ipynb in a Jupyter kernel, a run kept, continued and
predicted with in three calls, and the Python calls' checks of what they are given."""
import json
import os
import random

import pytest
import torch
from PIL import Image

import models
import train
from beyond import (UserError, checkpoints, datasets, devices, loaders, photos, pictures, predict,
                    runs)
from train import evaluate

from conftest import CPU, HERE, tiny_set, write_folder


# ---------------------------------------------------------------- a notebook
def test_the_notebook_runs_cell_by_cell_in_a_kernel(tmp_path, monkeypatch):
    """fine_tuning.ipynb, unchanged, in a real Jupyter kernel (no server). The download is
    replaced by what it would leave: a generated hot-dog set in ./data/hotdog of the kernel's
    working folder. A last cell, added here, reads matplotlib's backend."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    for package in ("ipykernel", "matplotlib"):  # the kernel, and the pictures the cells show
        pytest.importorskip(package)
    nb = nbformat.read(os.path.join(HERE, "fine_tuning.ipynb"), as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    # stored without outputs
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    # 8 training images, the fewest that the cells showing 8 from each end (train_imgs[i],
    # train_imgs[-i - 1]) can index; 4 test images, as many as the last cell prints
    write_folder(tmp_path / "data" / "hotdog", train=4, test=2)
    monkeypatch.setenv("PYTHONPATH", HERE)
    nb.cells.append(nbformat.v4.new_code_cell("import matplotlib\nprint(matplotlib.get_backend())"))
    nbclient.NotebookClient(nb, timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    def outputs(source):
        cell = next(cell for cell in nb.cells if source in cell.source)
        text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                       for o in cell.outputs)
        return text, sum("image/png" in o.get("data", {}) for o in cell.outputs)
    text, shown_pictures = outputs("finetune_history = train.train_fine_tuning(finetune_net, 5e-5)")
    # curves redrawn in place
    assert "epoch 5: loss" in text and "batch 1/1" in text and shown_pictures == 1
    assert outputs("pictures.show_images(hotdogs + not_hotdogs, 2, 8, scale=1.4)")[1] == 1
    assert "inline" in outputs("matplotlib.get_backend()")[0]
    text, _ = outputs("runs.resume('runs/kept', epochs=2)")
    assert "epoch 2: loss" in text and "epoch 1: loss" not in text  # continued, not trained again
    assert len(json.load(open(tmp_path / "runs" / "kept" / "metrics.json"))["history"]) == 2
    lines = outputs("predict.predict('runs/kept'")[0].splitlines()
    assert len(lines) == 4 and all(line.split()[1] in ("hotdog", "not-hotdog") for line in lines)
    # the set's last
    assert not os.path.exists(os.path.join(HERE, "data", "hotdog", "train", "hotdog", "3.png"))


def test_a_notebook_keeps_continues_and_predicts_a_run_in_three_calls(folder, tmp_path, capsys):
    """runs.train_runs keeps a run (model.pt after every epoch, metrics.json and the curves at
    the end); runs.resume continues it with more epochs, training only those (after a kernel
    restart too: all it needs is in the folder); predict.predict classifies a folder with it."""
    pytest.importorskip("matplotlib")  # the pictures it checks
    out = str(tmp_path / "run")
    states = torch.get_rng_state(), random.getstate()
    first = runs.train_runs("scratch", out, data_dir=folder, epochs=1, batch_size=4, workers=0,
                            precision="fp32", lr=5e-4)
    # the caller's draws
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert {"model.pt", "metrics.json", "curves.png"} <= set(os.listdir(out))
    capsys.readouterr()
    both = runs.resume(out, epochs=2).results[0]["history"]
    printed = capsys.readouterr().out
    assert [m["epoch"] for m in both] == [1, 2] and both[0] == first.results[0]["history"][0]
    assert "epoch 2:" in printed and "epoch 1:" not in printed
    assert json.load(open(os.path.join(out, "metrics.json")))["history"] == both
    # the same lr, given as it began
    assert runs.resume(out, epochs=2, lr=5e-4).results[0]["history"] == both
    # None: its own 2, not the default 5
    assert runs.resume(out, epochs=None).results[0]["history"] == both
    assert "epoch " not in capsys.readouterr().out
    test = os.path.join(folder, "test")
    state = torch.get_rng_state()
    predictions = predict.predict(out, [test], workers=1, precision="fp32")
    # the caller's draws: predicting draws none of them
    assert torch.equal(torch.get_rng_state(), state)
    assert [p.path for p in predictions] == photos.image_files(test)
    # a folder: best.pt's epoch
    net = checkpoints.saved_net(torch.load(os.path.join(out, "best.pt"), weights_only=True))
    _, test_set = datasets.image_folders(folder)
    probs, _ = evaluate(net, loaders.make_loaders(test_set, test_set, 4)[1], CPU)
    for p, q in zip(predictions, probs):
        assert list(p.probabilities.values()) == pytest.approx(q.tolist(), abs=1e-5)
        assert (p.label == test_set.classes[q.argmax()]
                and p.probability == pytest.approx(q.max().item(), abs=1e-5))


# ---------------------------------------------------------------- the Python calls
def test_whole_runs_from_python_return_their_results(folder, tmp_path, capsys):
    """runs.train_runs and runs.resume: the command line's runs, with keyword arguments."""
    out = str(tmp_path / "run")
    trained = runs.train_runs("scratch", out, data_dir=folder, epochs=1, batch_size=8, workers=0)
    assert trained.out == out and len(trained.results) == 1
    assert trained.results[0] == json.load(open(os.path.join(out, "metrics.json")))
    resumed = runs.resume(out, epochs=2)
    assert [m["epoch"] for m in resumed.results[0]["history"]] == [1, 2]
    for call, message in ((lambda: runs.train_runs("scratch", out, data_dir=folder, batch_sise=8),
                           "batch_sise"),
                          (lambda: runs.resume(out, batch_size=4), "batch_size: 8 there, 4 now"),
                          (lambda: runs.resume(out, out=str(tmp_path / "elsewhere")),
                           "continues in its own folder")):
        with pytest.raises(UserError, match=message):
            call()


def test_the_python_calls_check_what_they_are_given(folder, tmp_path):
    """A list of batches for train_ch13; a net sized for other classes, or the function that makes
    it; an unknown precision; the book's height x width x channel float images and a short list
    of titles."""
    X, y = tiny_set()
    net = models.scratch_net()
    history = train.train_ch13(net, [(X, y)], [(X, y)], torch.nn.CrossEntropyLoss(reduction="none"),
                               torch.optim.SGD(net.parameters(), lr=1e-3), 1, "cpu")
    assert len(history) == 1
    three = write_folder(tmp_path / "three", 1, 1,
                         classes={"a": (0, 0, 0), "b": (90, 90, 90), "c": (200, 200, 200)})
    for net, classes in ((models.finetune_net(), 3), (models.scratch_net(3), 2)):
        with pytest.raises(UserError,
                           match=rf"the net has {net.fc.out_features} outputs .* the data has "
                                 rf"{classes} classes"):
            train.train_fine_tuning(net, 5e-5, data_dir=three if classes == 3 else folder)
    with pytest.raises(UserError, match=r"a function, not a torch nn.Module; give a net, such as "
                                        r"models.finetune_net\(\) \(called"):
        train.train_fine_tuning(models.finetune_net, 5e-5, data_dir=folder)  # not called
    with pytest.raises(UserError,
                       match='precision=fp16 is not one this program computes in; give "amp" or '
                             '"fp32"'):
        devices.make_runtime("cpu", "fp16")
    pytest.importorskip("matplotlib")  # the picture it draws
    # the book's: height x width x channels, floats
    imgs = [torch.rand(20, 30, 3), torch.rand(20, 30, 3)]
    assert pictures.show_images(imgs, 1, 2, titles=["one"],
                                path=str(tmp_path / "grid.png")) == str(tmp_path / "grid.png")


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
    paths, a batch size of 1 or more, and says what an empty list holds; out= is a path. Each in
    one line."""
    assert len(train.train_fine_tuning(OwnNet(), 5e-4, 4, 1, param_group=False,
                                       data_dir=folder)) == 1
    with pytest.raises(UserError,
                       match=r"^param_group=True trains net.fc .* this OwnNet has no .fc; give "
                             r"param_group=False"):
        train.train_fine_tuning(OwnNet(), 5e-4, 4, 1, data_dir=folder)
    X, y = tiny_set()
    net, loss = models.scratch_net(), torch.nn.CrossEntropyLoss(reduction="none")
    for train_iter, test_iter, empty in (([], [(X, y)], "train_iter"), ([(X, y)], [], "test_iter")):
        with pytest.raises(UserError, match=f"^{empty} gives no batches"):
            train.train_ch13(net, train_iter, test_iter, loss,
                             torch.optim.SGD(net.parameters(), lr=1e-3), 1, "cpu")
    runs.train_runs("scratch", str(tmp_path / "run"), data_dir=folder, epochs=1, batch_size=4,
                    workers=0)
    photo = os.path.join(folder, "test", "hotdog", "0.png")
    for images_, message in ((None, "images=None is not a path"),
                             (Image.open(photo), "images=<PIL.*is not a path"),
                             ([photo, Image.open(photo)],
                              r"images=\['.*is not a path or a list of paths"),
                             ([photo, ""], r"images=\['.*is not a path or a list of paths")):
        with pytest.raises(UserError, match=f"^{message}"):
            predict.predict(str(tmp_path / "run"), images_, workers=0)
    with pytest.raises(UserError, match="^batch_size=0 is not a whole number, 1 or more"):
        predict.predict(str(tmp_path / "run"), [photo], batch_size=0, workers=0)
    with pytest.raises(UserError, match="^found no images in an empty list; give image files"):
        predict.predict(str(tmp_path / "run"), [], workers=0)
    for call in (lambda: predict.predict(None, [photo]), lambda: runs.resume(None),
                 lambda: predict.export(5), lambda: runs.resume(""), lambda: predict.export("")):
        with pytest.raises(UserError,  # "": no path, not the working folder
                           match="^(None|5|'') is not a path; give the model.pt of a training run"):
            call()
    run = str(tmp_path / "run")  # out= as well, checked before anything is read or trained
    for call in (lambda: predict.predict(run, [photo], out=5), lambda: runs.resume(run, out=5),
                 lambda: predict.export(run, 5),
                 lambda: runs.train_runs("scratch", 5, data_dir=folder)):
        with pytest.raises(UserError,
                           match="^out=5 is not a non-empty text; give a non-empty text"):
            call()
    # any iterable of paths
    assert len(predict.predict(str(tmp_path / "run"), (p for p in [photo]), workers=0)) == 1
