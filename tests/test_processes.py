"""Several processes (beyond.processes): two gloo processes as one, torchrun and its restarts,
and the processes `python finetune.py` starts on a machine with several GPUs, here on the CPU."""
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import models
from beyond import UserError, cli, datasets, loaders, processes
from train import evaluate, train_epoch

from conftest import CPU, HERE, made_once, one_epoch, write_folder


# ---------------------------------------------------------------- two processes, as one
def ddp_worker(rank, root, out):
    """One of two gloo processes: train one epoch, save what it ended with and what it saw; then
    take one step on its half of a batch of 4 (ddp_step), and save that step."""
    # no port, which another test process could take first
    store = f"file://{os.path.join(out, 'store')}"
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


# --------------------------------------------------------------- one process per GPU, and torchrun
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
        argv = ["--scratch", "--data-dir", root, "--epochs", "1", "--batch-size", "8",
                "--out", where / "run",
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
    # shared, at most 16
    assert metrics["world_size"] == 3 and metrics["args"]["workers"] == max(1, min(16, cores // 3))


def test_few_test_images_many_processes_and_a_batch_that_does_not_divide(launched_run):
    run, status, out, err = launched_run  # 2 test images for 3 processes, a batch of 8
    assert status == 0, err
    assert "x 3 processes, batch 2 each, 6 in all (not 8)" in out
    metrics = json.load(open(run / "metrics.json"))
    assert torch.tensor(metrics["confusion"]).sum() == 2 and metrics["world_size"] == 3


def test_each_process_draws_its_own_augmentations(launched_run):
    """Three processes, with loader workers (the default: at least one each): their random-number
    states, from which the loader seeds its workers, differ (the same seed once gave every
    process the same crops). From the largest seed too: seed + rank wraps round to torch's seeds."""
    run, status, _, err = launched_run
    assert status == 0, err
    assert json.load(open(run / "metrics.json"))["args"]["workers"] >= 1
    assert json.load(open(run / "metrics.json"))["args"]["seed"] == 2**64 - 1
    states = [state["torch"] for state in torch.load(run / "model.pt", weights_only=False)["rng"]]
    assert (len(states) == 3
            and all(not torch.equal(a, b) for a, b in itertools.combinations(states, 2)))


def test_a_process_killed_is_reported_in_one_line(capsys):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    failure = ProcessFailure(local_rank=1, pid=123, exitcode=-9, error_file="")
    assert cli.died(ChildFailedError("finetune.py", {1: failure})) == 1
    assert capsys.readouterr().err == ("error: process 1 was killed by SIGKILL (as the "
                                       "out-of-memory killer does: try a smaller --batch-size or "
                                       "fewer --workers)\n")


def test_the_named_gpu_is_made_current_and_macs_run_one_process(monkeypatch):
    current = []

    def set_device(device):  # a CUDA machine, simulated; torch refuses a device without an index
        if device.index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer")
        current.append(device)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert processes.join_processes(torch.device("cuda", 1)) == torch.device("cuda", 1)
    # --device cuda: the current one
    assert processes.join_processes(torch.device("cuda")) == torch.device("cuda")
    assert current == [torch.device("cuda", 1)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="gloo cannot carry MPS tensors"):
        processes.join_processes(torch.device("mps"))


# ------------------------------------------------------- torchrun's restarts, an error, prediction
def torchrun(*argv, restarts=0):
    # a free port, torchrun's
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", os.path.join(HERE, "finetune.py"), *map(str, argv)]


def children(pid):
    return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def test_torchrun_restarts_a_killed_worker_and_the_run_finishes(folder, tmp_path):
    """One worker killed after epoch 1: torchrun restarts both, and they continue from the
    checkpoint, in the default folder (runs/<mode>-<time>: the same for every restart of one
    job). A run given --out differs only in that its folder is the one named; the checkpoint it
    continues is found and restored as here."""
    argv = ["--scratch", "--data-dir", folder, "--epochs", 3, "--batch-size", 8, "--workers", 0,
            "--device", "cpu"]
    job = subprocess.Popen(torchrun(*argv, restarts=1), cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = None
    # model.pt appears whole (a temporary name, then renamed)
    while job.poll() is None and checkpoint is None:
        found = [os.path.join(root, "model.pt") for root, _, names in os.walk(tmp_path)
                 if "model.pt" in names]
        if found:  # epoch 1 is saved, and epochs 2 and 3 are still to train
            checkpoint = found[0]
            os.kill(children(job.pid)[-1], signal.SIGKILL)
        time.sleep(0.02)
    out_text, err = job.communicate(timeout=300)
    assert checkpoint and job.returncode == 0, err
    # a whole checkpoint, epoch 1's or later
    assert torch.load(checkpoint, weights_only=True)["history"]
    history = json.load(open(os.path.join(os.path.dirname(checkpoint), "metrics.json")))["history"]
    assert [m["epoch"] for m in history] == [1, 2, 3] and out_text.count("epoch 1:") == 1


def test_an_error_under_torchrun_is_said_once(tmp_path):
    status, _, err = launched(["--scratch", "--data-dir", tmp_path / "nowhere",
                               "--out", tmp_path / "run"], tmp_path / "printed")
    # 2 from the process that met it, or 1 from one whose partner stopped: whichever torchrun saw
    # first
    assert status != 0
    assert [line for line in err.splitlines() if "error: " in line] \
        == [f"error: --data-dir {tmp_path / 'nowhere'} is not a folder; give the folder that holds "
            "your data"]
    assert "[rank" not in err and "Traceback" not in err  # no process's traceback
    status, _, err = launched(["--scratch", "--epochs", 0], tmp_path / "flags")  # argparse's
    assert status == 2 and err.count("usage: ") == 1 and err.count("error: ") == 1, err


def test_predict_under_torchrun_writes_once(folder, tmp_path, scratch_run):
    status, out, err = launched(["--predict", os.path.join(folder, "test"),
                                 "--model", scratch_run[0] / "model.pt",
                                 "--out", tmp_path / "pred", "--workers", 0], tmp_path / "printed")
    assert status == 0, err
    assert len(out.splitlines()) == 4 and err.count("wrote ") == 1
