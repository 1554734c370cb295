"""The docs' code blocks, run: every fenced block of README.md and docs/*.md runs as written
(with fewer epochs and smaller batches) or is listed with why it cannot run here, and every
command the docs name is one the command line takes."""
import os
import re
import shutil
import sys

import pytest
from PIL import Image

import finetune
from beyond import cli

from conftest import HERE


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
        ("pip install -r requirements.txt pytest pytest-xdist matplotlib nbclient ipykernel onnx "
         "onnxscript onnxruntime tensorboard && python -m pytest -q -n 2\n", "")],  # this suite
    "data ready in 9.8 s":
        ("output", "pip install -r requirements.txt && python finetune.py --pretrained"),
    "import models, train":
        [("train_fine_tuning(finetune_net, 5e-5)",
          "train_fine_tuning(finetune_net, 5e-5, num_epochs=1)"),
         ("param_group=False)", "param_group=False, num_epochs=1)")],
    "from beyond import predict, runs":
        [("epochs=5)", "epochs=1, batch_size=4, workers=0)"), ("epochs=8)", "epochs=2)")],
    "run loss train acc test acc ex/sec book": ("output", "--compare"),
    "runs/pretrained-20261123-101500/":
        ("files", "pip install -r requirements.txt && python finetune.py --pretrained"),
    "python finetune.py --predict photo1.jpg holiday/ --model runs/pretrained-.../model.pt "
    "--out predictions":
        [("runs/pretrained-...", "{run}")],  # the run of the README's first command
    "python finetune.py --resume runs/pretrained-.../model.pt": [("runs/pretrained-...", "{run}")],
    "torchrun --nproc_per_node=4 finetune.py --pretrained # 4 GPUs (or 4 CPU processes)":
        "4 processes, then 8 on each of 2 machines; test_torchrun_command_line runs torchrun (as "
        "cli.on_all_gpus starts it) with 2 CPU processes",
    "torchrun --nproc_per_node=4 --max-restarts=3 finetune.py --pretrained":
        "4 GPUs; test_torchrun_restarts_a_killed_worker_and_the_run_finishes runs it with 2 CPU "
        "processes",
    "torchrun --nnodes=2 --nproc_per_node=8 --max-restarts=3 --rdzv-id=hotdog-1 \\":
        "2 machines of 8 GPUs",
    "python -m beyond.benchmark --data-dir data/hotdog # or --dummy: no data needed":
        [("data/hotdog", "data/hotdog --batch-size 4 --batches 1 --workers 0")],
    "python finetune.py --export runs/pretrained-... # runs/pretrained-.../best.pt2":
        [("runs/pretrained-...", "{run}")],
    "# read a photo as --predict does (beyond.photos.upright_rgb and eight_bits)": [],
    # with torch alone, and with onnxruntime (upright_rgb from the block before)
    "import json": [('"best.', '"{run}/best.'), ("photo.jpg", "photo1.jpg")],
    '"""--predict against the exported files, on the same photos and CPU: images/sec, photo files '
    'in,':
        "speed.py, a measurement taken by hand: rounds of timing on a folder of photos, minutes "
        "long",
    "DIR/train/<class>/<image> the book's: its own test set":
        "the two layouts of a data folder, not a command; photos/ here is the first",
}


def doc_blocks():
    """The fenced blocks of README.md, then docs/*.md: (first line with spaces collapsed,
    language, text, page)."""
    names = ["README.md"] + sorted(os.path.join("docs", n)
                                   for n in os.listdir(os.path.join(HERE, "docs"))
                                   if n.endswith(".md"))
    for name in names:
        text = open(os.path.join(HERE, name), encoding="utf-8").read()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            yield " ".join(match[2].splitlines()[0].split()), match[1], match[2], name


def changed(text, changes, run):
    for old, new in changes:
        assert old in text, (f"the change {old!r} no longer applies to the block "
                             f"{text.splitlines()[0]!r}")
        text = text.replace(old, new.replace("{run}", run or ""))
    return text


def run_block(text, language, monkeypatch, scope):
    """A Python block in scope, which its page's blocks before it filled (a reader follows a page
    in one notebook), or a shell block's commands (python finetune.py, python -m
    beyond.benchmark), in this process."""
    if language == "python":
        return exec(compile(text, "block", "exec"), scope)
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
        pattern = "".join(re.escape(p) if i % 2 == 0
                          else patterns.get(p, r"\s+" if p.isspace() else r"[-+.e\d]+")
                          for i, p in enumerate(parts))
        if not any(re.fullmatch(pattern, shown.strip()) for shown in printed.splitlines()):
            return line
    return None


def test_every_doc_block_is_run_or_listed_with_why_not():
    found = [first for first, *_ in doc_blocks()]
    assert sorted(set(found) - set(DOC_BLOCKS)) == [], "a new block: add it to DOC_BLOCKS"
    assert sorted(set(DOC_BLOCKS) - set(found)) == [], "a block gone or changed: update DOC_BLOCKS"


def test_the_docs_blocks_run_as_written(folder, tmp_path, capsys, monkeypatch, compare_run):
    """In a fresh folder holding what the blocks name (the hot-dog set where its download puts it,
    photos/, holiday/, photo1.jpg), each block runs in reading order with its listed changes, as
    a reader following the docs would; the examples of output and of a run's folder match."""
    for package in ("onnx", "onnxscript", "onnxruntime"):  # the blocks that export to onnx, run it
        pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folder, "data/hotdog")  # found there, so nothing is downloaded
    shutil.copytree(folder, "photos")
    os.makedirs("holiday")
    for name in ("holiday/beach.png", "holiday/hotdog.jpg", "photo1.jpg"):
        Image.new("RGB", (50, 40), (220, 60, 30)).save(name)
    printed, run, scopes = {"--compare": compare_run[1]}, None, {}
    for first, language, text, page in doc_blocks():
        how = DOC_BLOCKS[first]
        if isinstance(how, list):
            run_block(changed(text, how, run), language, monkeypatch, scopes.setdefault(page, {}))
            printed[first] = capsys.readouterr().out
            run = run or next(iter(sorted(map(str, (tmp_path / "runs").glob("pretrained-*")))),
                              None)
        elif how[0] == "output":
            missing = printed_like(text, printed[how[1]])
            assert missing is None, f"{missing!r} is not printed"
        elif how[0] == "files":
            listed = {line.split()[0] for line in text.splitlines()[1:]}
            assert set(os.listdir(run)) <= listed, (f"{sorted(set(os.listdir(run)) - listed)} "
                                                    f"not in {first}")
    assert (len(os.listdir(tmp_path / "runs" / "mine"))
            and os.path.exists(os.path.join(run, "model.pt")))
    assert (tmp_path / "predictions" / "predictions.csv").exists()


def test_every_command_the_docs_name_is_one_the_command_line_takes():
    """The commands named in the docs' text and tables (`python finetune.py ...`) parse, their
    placeholders (DIR, IMG.jpg, runs/...) taken as the paths they stand for."""
    names = ["README.md"] + [os.path.join("docs", n) for n in os.listdir(os.path.join(HERE, "docs"))
                             if n.endswith(".md")]
    text = "".join(open(os.path.join(HERE, name), encoding="utf-8").read() for name in names)
    commands = set(re.findall(r"`python finetune\.py ([^`]+)`", text))
    assert len(commands) > 10
    for command in commands:
        cli.parse_args(command.split())
