"""Every option defined once and checked once (beyond.options), from Python and from the command
line; an option that would be ignored is refused."""
import re

import numpy as np
import pytest
import torch

import data
import models
import train
from beyond import UserError, cli, datasets, options, quoted, runs

from conftest import run_cli


def test_options_are_checked_once_by_one_rule_from_python_and_the_command_line(
        tmp_path, capsys, monkeypatch):
    """Every option a Python caller gets wrong is one UserError naming it, before any data is
    read; the command line's flags pass through the same rule (options.OPTIONS, options.checked)."""
    monkeypatch.setattr(datasets, "datasets",
                        lambda *a, **k: pytest.fail("data read before the options were checked"))
    bad = [("epochs", 0), ("epochs", "1"), ("epochs", 1.5), ("epochs", -1), ("lr", -1),
           ("lr", "5e-5"), ("lr", [5e-5, 0]), ("lr", [None]), ("batch_size", "4"), ("seed", "1"),
           ("dataset", "x"), ("workers", -1), ("freeze_epochs", None),
           ("device", torch.device), ("val_split", 2), ("freeze", "no"), ("patience", 0),
           ("cache_gb", -1), ("max_megapixels", 0), ("precision", "fp16"),
           ("class_weights", "yes"), ("dummy", 1), ("dummy", np.int64(1)), ("lr", float("inf")),
           ("max_megapixels", float("inf")), ("max_megapixels", 1e303), ("cache_gb", float("inf")),
           ("seed", 2**70),
           ("batch_size", 2**63), ("data_dir", ""), ("arch", ""), ("epochs", np.float64(2))]
    for name, value in bad:
        shown = value[-1] if name == 'lr' and isinstance(value, list) else value
        with pytest.raises(UserError, match="^" + re.escape(f"{name}={shown!r} is not")):
            runs.train_runs("scratch", str(tmp_path / "never"), **{name: value})
        with pytest.raises(UserError, match=f"^{name}="):
            runs.resume(str(tmp_path / "never"), **{name: value})
    with pytest.raises(UserError) as e:  # an array's repr, on one line and cut short
        runs.train_runs("scratch", str(tmp_path / "never"), seed=np.zeros((30, 30)))
    takes = re.escape("is not a whole number, from -2**63 to 2**64 - 1; give a whole number")
    assert re.fullmatch(r"seed=array\(\[\[0\., 0\.,[ 0.,]*\.\.\. " + takes + ".*", str(e.value))
    assert quoted(10**400) == "1" + "0" * 76 + "..."  # cut short, and saying so
    (tmp_path / "A").mkdir()  # beside "A\n", which a message shows as such, on one line
    for control, as_shown in (("\n", "\\n"), ("\r", "\\r")):  # a new line, or back to its start
        with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'A'}{as_shown} does not ")):
            runs.resume(str(tmp_path / ("A" + control)))
    for name, text in (("epochs", "0"), ("epochs", "1.5"), ("lr", "-1"), ("val_split", "2"),
                       ("workers", "-1"), ("patience", "0"), ("dataset", "x"),
                       ("precision", "fp16"), ("seed", "x"), ("max_megapixels", "0"),
                       ("max_megapixels", "1e303")):
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit):
            cli.parse_args(["--scratch", flag, text])
        err = capsys.readouterr().err
        takes = options.takes(*options.OPTIONS[name][1:])
        assert f"argument {flag}: give {takes}, not {text}" in err, err
    for name, text, value in (("val_split", "0.5", 0.5), ("epochs", "3", 3), ("lr", "5e-5", 5e-5),
                              ("seed", "-1", -1), ("precision", "fp32", "fp32"),
                              ("freeze_epochs", "0", 0)):
        typed = getattr(cli.parse_args(["--scratch", "--" + name.replace("_", "-"), text]), name)
        assert typed == ([value] if name == "lr" else value)
        assert options.checked(name, value) == value
    message = "names two runs alike (a run's folder shows its lr to 6 digits); give learning rates"
    for lrs in ([5e-5, 5e-5], [5e-5, 5.0000001e-5]):  # one folder for both
        with pytest.raises(UserError, match=re.escape(f"lr={lrs} {message}")):
            runs.train_runs("pretrained", str(tmp_path / "never"), lr=lrs)
    assert options.checked("data_dir", tmp_path) == str(tmp_path)  # a path object is a path
    for name, value in (("epochs", np.int64(3)), ("lr", np.float32(0.5)),
                        ("lr", [np.float64(1e-3), 2])):
        # numpy's numbers, as Python's (metrics.json, a checkpoint's args)
        typed = options.checked(name, value)
        types = {type(v) for v in (typed if isinstance(typed, list) else [typed])}
        assert typed == value and types == {options.OPTIONS[name][1]}
    assert options.checked("lr", (1e-3, 2e-3)) == [1e-3, 2e-3]  # a tuple, as a list
    assert options.checked("freeze", np.True_) is True  # numpy's too
    assert options.checked("device", torch.device("cuda", 1)) == "cuda:1"  # as predict takes it
    with pytest.raises(UserError, match="^out='' is not a non-empty text; give a non-empty text$"):
        options.checked("out", "")
    assert sorted(cli.HELP) == sorted(options.OPTIONS)  # every option has its flag
    with pytest.raises(UserError, match=r"^resume takes out= and the options \['dataset', .*\], "
                                        r"not \['epoch'\]$"):
        runs.resume(str(tmp_path / "never"), epoch=2)


def test_numpys_text_is_saved_as_pythons(folder, tmp_path):
    """NumPy's text, as the mode and as options, goes into a checkpoint as Python's, which
    torch.load(weights_only=True) reads back (it refuses NumPy's objects)."""
    out = np.str_(tmp_path / "run")
    runs.train_runs(np.str_("scratch"), out, data_dir=np.str_(folder), epochs=1, batch_size=4,
                    workers=0, precision=np.str_("fp32"), device=np.str_("cpu"))
    assert len(runs.resume(out, epochs=2, device=np.str_("cpu")).results[0]["history"]) == 2


def test_a_runs_defaults_are_the_books():
    """Batch 128, 5 epochs, lr 5e-5 fine-tuned with fc at 10x, 5e-4 from scratch (§14.2.2.3)."""
    settled = runs.settled("compare", {})
    planned = runs.plan_runs("compare", settled, "out")
    assert settled["batch_size"] == 128 and settled["epochs"] == 5
    assert [(run.mode, run.lr) for run in planned] == [("pretrained", 5e-5), ("scratch", 5e-4)]
    assert [runs.RECIPES[run.mode]["param_group"] for run in planned] == [True, False]
    assert not settled["no_param_group"]


def test_options_that_would_be_ignored_are_refused(folder, tmp_path, capsys):
    """An option the mode does not read, or one that another option makes unread, is refused in
    one line, never silently ignored."""
    for argv, message in ((["--predict", "x.png", "--model", "m", "--epochs", 3],
                           "--epochs does not apply to --predict, which reads --arch, "
                           "--batch-size, --device, --max-megapixels, --model, --out, "
                           "--precision, --workers"),
                          (["--export", "m", "--device", "cuda"],
                           "--device does not apply to --export"),
                          (["--show-samples", "--dummy"],
                           "--dummy does not apply to --show-samples")):
        with pytest.raises(SystemExit):
            cli.parse_args([str(a) for a in argv])
        assert message in capsys.readouterr().err
    for given, message in (
            (dict(dummy=True, data_dir=str(tmp_path)),
             "^data_dir= and dummy= each name the data to train on; give one of them$"),
            (dict(dummy=True, dataset="cifar10"), "^dummy= and dataset= each"),
            (dict(freeze=True, freeze_epochs=1),
             "^freeze= trains the output layer alone in every epoch"),
            (dict(dummy=True, data_root=str(tmp_path)),
             "^data_root= is where the hot-dog set and CIFAR-10 are downloaded, and dummy= "
             "downloads nothing; leave data_root= out$"),
            (dict(data_dir=folder, val_split=0.5),
             f"^val_split= splits a data_dir= of class folders alone, and {folder} is not one; "
             "leave val_split= out$"),
            (dict(val_split=0.5), "^val_split= .*, and the hotdog set is not one"),
            (dict(dummy=True, val_split=0.5), "^val_split= .*, and dummy data is not one"),
            (dict(dummy=True, init_head_from_imagenet=True),  # no class folders to rename
             "^init_head_from_imagenet= starts the class named like hot dog, and dummy data has "
             "none; leave init_head_from_imagenet= out$"),
            (dict(dataset="cifar10", init_head_from_imagenet=True), ", and the cifar10 set has")):
        with pytest.raises(UserError, match=message):
            runs.train_runs("pretrained", str(tmp_path / "never"), **given)
    # a run begun before these were refused still resumes
    began = dict(freeze=True, freeze_epochs=1)
    assert runs.settled("pretrained", began, list(began))["freeze"]
    # as such a run began: taken
    options.refuse_unread({**options.DEFAULTS, "dummy": True, "data_dir": "x"}, set())
    # data_dir= given anew: refused
    with pytest.raises(UserError, match="^data_dir= and dummy= each name the data"):
        options.refuse_unread({**options.DEFAULTS, "dummy": True, "data_dir": "x"}, {"data_dir"})
    with pytest.raises(SystemExit):
        cli.parse_args(["--predict", "x.png", "--model", "m", "--no-cache"])
    assert "--cache-gb or --no-cache does not apply to --predict" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--scratch", "--data-dir", ""])
    assert "argument --data-dir: give a non-empty text, not ''" in capsys.readouterr().err


def test_two_flags_for_one_option_and_a_cache_past_a_float_are_one_line(capsys):
    for argv, message in ((["--no-cache", "--cache-gb", "5"], "--no-cache and --cache-gb each set"),
                          (["--lr", "1e39"], "give a number, from 1e-37 to below 1e37"),
                          (["--lr", "1e-320"], "from 1e-37 to below 1e37, not 1e-320"),
                          (["--cache-gb", "1e300"], "give a number, 0 or more, below 2**33")):
        with pytest.raises(SystemExit) as e:
            run_cli(capsys, "--scratch", *argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err.strip().splitlines()[-1], err
    with pytest.raises(UserError, match=r"cache_gb=1e\+300 is not a number, 0 or more, below"):
        runs.train_runs("scratch", None, cache_gb=1e300)


def test_the_books_calls_take_numpys_numbers_and_refuse_others_in_one_line(folder, capsys):
    history = train.train_fine_tuning(models.scratch_net(), 5e-4, batch_size=np.int64(8),
                                      num_epochs=np.int64(1), data_dir=folder)
    assert len(history) == 1
    for kwargs, message in ((dict(batch_size=4.0), "batch_size=4.0 is not a whole number, 1 or"),
                            (dict(num_epochs=2.0), "num_epochs=2.0 is not a whole number, 1 or"),
                            (dict(batch_size=0), "batch_size=0 is not a whole number, 1 or more")):
        with pytest.raises(UserError, match=message):
            train.train_fine_tuning(models.scratch_net(), 5e-4, **{"num_epochs": 1, **kwargs},
                                    data_dir=folder)
    for data_dir in ("", b"data", 42):  # "" is no folder, not the hot-dog set
        with pytest.raises(UserError, match=f"^data_dir={data_dir or repr(data_dir)} is not a "):
            data.load_data(4, data_dir)
    for lr in ("5e-4", -1, 0, float("nan"), 10**400, True, 1e37):
        with pytest.raises(UserError, match=re.escape(f"learning_rate={quoted(lr)} is not a num")):
            train.train_fine_tuning(models.scratch_net(), lr, 4, 1, data_dir=folder)
    assert train.fine_tuning_optimizer(models.scratch_net(), np.float32(0.5)).defaults["lr"] == 0.5
    one = [(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(UserError, match="^train_iter gives no batches; give it a data set"):
        train.train_ch13(models.scratch_net(), (batch for batch in []), one, None, None, 1)
    net = models.scratch_net()  # an empty generator to test on: found after the epoch
    with pytest.raises(UserError, match="^test_iter gives no batches; give it a data set"):
        train.train_ch13(net, one, (batch for batch in []), train.fine_tuning_loss(),
                         train.fine_tuning_optimizer(net, 1e-3), 1, "cpu")
    for param in net.parameters():  # exercise 3 as the book writes it: fc frozen too
        param.requires_grad = False
    with pytest.raises(UserError, match=r"^no parameter of the net requires grad, .*exercise 3"):
        train.train_ch13(net, one, one, train.fine_tuning_loss(),
                         train.fine_tuning_optimizer(net, 1e-3), 1, "cpu")


def test_a_runs_weights_are_named_by_its_option(folder, tmp_path):
    """weights=, as train_runs and models.finetune_net name the file, never another keyword."""
    with pytest.raises(UserError, match=r"^weights=\S*none\.pth does not exist; give resnet18"):
        runs.train_runs("pretrained", tmp_path / "run", data_dir=folder, epochs=1, batch_size=4,
                        workers=0, weights=str(tmp_path / "none.pth"))
