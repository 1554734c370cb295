"""python -m beyond.benchmark and beyond.digits: bad input is one line, as the command line says
it, and the figures cover no more batches than the data holds."""
import sys

import pytest

from beyond import benchmark, digits

from conftest import write_folder


@pytest.mark.parametrize("argv, message", [
    (["--batches", "-1"], "--batches -1 is not a whole number, 1 or more"),
    (["--batch-size", "0"], "--batch-size 0 is not a whole number, 1 or more"),
    (["--data-dir", "{tmp}/nowhere"], "nowhere is not a folder; give the folder that holds")])
def test_bad_input_is_one_line(argv, message, tmp_path, monkeypatch, capsys):
    root = write_folder(tmp_path / "d", train=2, test=1)
    argv = [a.format(tmp=tmp_path) for a in argv]
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--data-dir", root, "--workers", "0", *argv])
    with pytest.raises(SystemExit) as e:
        benchmark.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.strip().splitlines()[-1], err


def test_no_more_batches_than_the_data_holds(tmp_path, monkeypatch, capsys):
    root = write_folder(tmp_path / "d", train=4, test=1)  # 8 images: 2 batches of 4
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--data-dir", root, "--workers", "0",
                                      "--batches", "100", "--batch-size", "4", "--device", "cpu"])
    benchmark.main()
    out = capsys.readouterr().out
    assert "batch 4, 0 workers" in out and "2 batches per measurement" in out, out
    sys.argv[sys.argv.index("--batch-size") + 1] = "100"  # the batch it measures, not the asked
    benchmark.main()
    out = capsys.readouterr().out
    assert "batch 8 (--batch-size 100: the data holds fewer), 0 workers" in out, out


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds 0 is below 1; give 1 or more"),
    (["--epochs", "1"], "--epochs 1 is below 2 (one epoch warms up, and one is the cosine's)"),
    (["--out", "{tmp}"], "is not a new folder; give the name of one"),  # its digits would mix
    (["--out", ""], "--out '' is not a new folder; give the name of one")])
def test_digits_bad_input_is_one_line_before_any_work(argv, message, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.setattr(digits, "measure", lambda args: pytest.fail("measured"))
    monkeypatch.setattr(sys, "argv", ["digits.py", "--out", str(tmp_path / "new"),
                                      *[a.format(tmp=tmp_path) for a in argv]])
    with pytest.raises(SystemExit) as e:
        digits.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.strip().splitlines()[-1], err


def ctrl_c(*args):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv, message", [
    (["--per-class", "150", "--test-per-class", "100"], "250 images of each of digits 5 to 9 "
     "(--per-class and --test-per-class) are more than scikit-learn holds of the fewest of them, "
     "174; give fewer"),
    (["--pretrain-per-class", "200"], "200 images of each of digits 0 to 4 (--pretrain-per-class) "
     "are more than scikit-learn holds of the fewest of them, 177; give fewer")])
def test_digits_more_than_scikit_learn_holds_is_one_line_before_training(
        argv, message, tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(digits, "pretrained_weights", lambda *args: pytest.fail("trained"))
    monkeypatch.setattr(sys, "argv", ["digits.py", "--out", str(tmp_path / "new"), *argv])
    with pytest.raises(SystemExit) as e:
        digits.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1].endswith(message), err


@pytest.mark.parametrize("case", ["no scikit-learn", "a file in --out", "Ctrl-C"])
def test_digits_stops_in_one_line(case, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    out = tmp_path / ("afile/digits" if case == "a file in --out" else "digits")
    if case == "no scikit-learn":  # also where another test imported it
        for name in ("sklearn", "sklearn.datasets"):
            monkeypatch.setitem(sys.modules, name, None)
    elif case == "a file in --out":
        pytest.importorskip("sklearn")
    else:
        monkeypatch.setattr(digits, "measure", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["digits.py", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        digits.main()
    err = capsys.readouterr().err.strip()
    ending = {"no scikit-learn": "pip install scikit-learn",
              "Ctrl-C": f"interrupted; to measure again, give a new --out, or remove {out}",
              "a file in --out": "a file stands where a folder would be; choose another folder"}
    assert e.value.code == (130 if case == "Ctrl-C" else 2), err
    assert err.splitlines()[-1].endswith(ending[case]) and "Traceback" not in err, err
