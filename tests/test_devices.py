"""Devices and precision (beyond.devices): which device, bf16 and fp16 as a CPU can take them,
and the GPU paths as far as a CPU can check them."""
import json
import re

import pytest
import torch

import data
import models
import train
from beyond import UserError, checkpoints, devices
from beyond.devices import make_runtime, try_device
from train import train_epoch

from conftest import one_epoch, run_cli, tiny_set


# ---------------------------------------------------------------- devices
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


def test_the_cpu_named_twice_is_refused_before_the_data(folder, tmp_path, monkeypatch):
    """nn.DataParallel splits a batch among GPUs: the CPU twice (or one GPU twice) would run it
    on the CPU in fp16, DataParallel's type."""
    for named in (["cpu", "cpu"], [torch.device("cpu"), "cpu"]):
        with pytest.raises(UserError,
                           match=r"devices=\['cpu', 'cpu'\]: nn.DataParallel .* give one device"):
            train.train_fine_tuning(models.scratch_net(), 5e-4, 4, 1, False,
                                    data_dir=str(tmp_path / "none"), devices=named)
    # its keyword; a GPU's number is a GPU (torch.device(0) is cuda:0), never "none given"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    missing, no_name = ": this machine has no such device; give no devices= ", " is not a device's"
    for named, shown, message in (("gpu", "gpu", no_name), (0, "0", missing), (1, "1", missing),
                                  ([0], "0", missing), ({"cuda:1"}, "cuda:1", missing),
                                  (1.5, "1.5", no_name), (True, "True", no_name)):
        with pytest.raises(UserError, match=f"^devices={re.escape(shown + message)}"):
            train.train_fine_tuning(models.scratch_net(), 5e-4, data_dir=str(tmp_path / "none"),
                                    devices=named)
    assert make_runtime([]).device == make_runtime().device  # the book's try_all_gpus on a CPU
    cpu = [torch.device("cpu")]  # several named in any collection but a text
    assert make_runtime({"cpu"}).devices == make_runtime(iter(["cpu"])).devices == cpu


def test_the_books_call_trains_on_the_devices_of_a_generator(folder, monkeypatch):
    """A generator is read once: train_fine_tuning checks the devices and hands train_ch13 the
    list, not the generator used up, which would read as none given (all GPUs)."""
    def all_gpus():
        raise AssertionError("train_ch13 was given no devices")
    monkeypatch.setattr(devices, "try_all_gpus", all_gpus)
    history = train.train_fine_tuning(models.scratch_net(), 5e-4, 4, 1, False, data_dir=folder,
                                      devices=(name for name in ["cpu"]))
    assert len(history) == 1


# ---------------------------------------------------------------- precision
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
              dict(model=net.state_dict(), optimizer=optimizer.state_dict(),
                   scaler=fp16.scaler.state_dict()))
    resumed = runtime(monkeypatch, torch.float16)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoints.restore(ckpt, net, train.fine_tuning_optimizer(net, 0.01),
                               resumed.scaler) == [epochs[-1].metrics]
    assert resumed.scaler.state_dict() == fp16.scaler.state_dict()


def test_precision_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    for caps, dtype in (({"amx_bf16": True}, torch.bfloat16),
                        ({"avx512_bf16": True}, torch.bfloat16), ({}, None)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        assert (make_runtime(cpu).dtype == dtype
                and make_runtime(cpu).memory_format == torch.channels_last)
        assert make_runtime(cpu, "fp32").dtype is None
        assert make_runtime(cpu, "fp32").memory_format == torch.contiguous_format


def test_header_and_metrics_say_the_precision(folder, tmp_path, capsys, monkeypatch):
    for caps, said, dtype in (({}, "cpu, fp32, channels-last", "torch.float32"),
                              ({"avx512_bf16": True}, "cpu, bfloat16 autocast, channels-last",
                               "torch.bfloat16")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        status, out, _ = run_cli(capsys, "--scratch", "--data-dir", folder, "--epochs", 1,
                                 "--batch-size", 8, "--workers", 0, "--out", tmp_path / dtype)
        metrics = json.load(open(tmp_path / dtype / "metrics.json"))
        assert status == 0 and f"lr 0.0005, {said}\n" in out and f"examples/sec on {said}\n" in out
        assert metrics["precision"] == dtype and metrics["memory_format"] == "torch.channels_last"


def test_fp32_is_plain_fp32_without_tf32_while_it_computes_alone(folder):
    """cuDNN's flags hold for the whole process: a call sets them while it computes (autotuning;
    in fp32, no TF32), and the caller has its own back after it, a refused call included."""
    cudnn = torch.backends.cudnn
    before = cudnn.benchmark, cudnn.conv.fp32_precision
    cudnn.benchmark, cudnn.conv.fp32_precision = False, "tf32"  # PyTorch's defaults
    try:
        for precision, inside in (("fp32", (True, "ieee")), ("amp", (True, "tf32"))):
            seen, net = set(), models.scratch_net()
            net.register_forward_pre_hook(lambda *_: seen.add((cudnn.benchmark,
                                                               cudnn.conv.fp32_precision)))
            train.train_fine_tuning(net, 5e-4, 4, 1, False, data_dir=folder, precision=precision)
            assert (seen == {inside}
                    and (cudnn.benchmark, cudnn.conv.fp32_precision) == (False, "tf32"))
            with pytest.raises(UserError):
                train.train_fine_tuning(net, 5e-4, data_dir=folder + "/none", precision=precision)
            assert (cudnn.benchmark, cudnn.conv.fp32_precision) == (False, "tf32")
        assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's default: fp32 matrix products
    finally:
        cudnn.benchmark, cudnn.conv.fp32_precision = before


# --------------------------------------------------------------- the GPU paths, checked on the CPU
def test_no_tensor_from_a_list_per_batch(monkeypatch):
    """A mean and std given as lists are copied to the device on every call, and on CUDA each
    copy waits for the GPU (pytorch/pytorch#120996): normalize_batch builds them there once."""
    X = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    data.normalize_batch(X)  # the device's first batch
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor",
                        lambda data, *a, **k: pytest.fail("a tensor from a list")
                        if isinstance(data, (list, tuple)) else real(data, *a, **k))
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("a tensor from a list"))
    expected = (1 - real(data.MEAN)) / real(data.STD)
    assert torch.allclose(data.normalize_batch(X)[0, :, 0, 0], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_per_batch_on_cuda():
    runtime = make_runtime(torch.device("cuda"))
    net = runtime.place(models.scratch_net(2))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    batch = [(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8).pin_memory(),
              torch.tensor([0, 1, 0, 1]))]
    # warm up
    train_epoch(net, batch * 2, torch.nn.CrossEntropyLoss(reduction="none"), optimizer, runtime)
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
