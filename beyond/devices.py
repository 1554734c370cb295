"""Where the arithmetic runs (the book's try_gpu and try_all_gpus), and in what precision."""
import contextlib
from collections.abc import Iterable

import torch

from beyond import UserError


def try_device(name=None, keyword="device"):
    """The device named, else CUDA, else MPS, else the CPU (the book's try_gpu, §6.7)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available()
                            else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)  # raises for a name torch does not know, such as "gpu"
    except (RuntimeError, TypeError):  # TypeError: neither a name nor a GPU's number (1.5, True)
        raise UserError(f"{keyword}={name} is not a device's name; give cpu, cuda (cuda:N) or "
                        f"mps, or no {keyword}= to use the best one there is") from None
    missing = (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
               or device.type == "mps" and not torch.backends.mps.is_available())
    if not missing and device.type not in ("cpu", "cuda", "mps"):  # xpu, meta: not this program's
        raise UserError(f"{keyword}={name}: this program computes on cpu, cuda (cuda:N) or mps; "
                        "give one of those")
    if missing:
        raise UserError(f"{keyword}={name}: this machine has no such device; give no {keyword}= "
                        "to use the best one there is")
    return device


def try_all_gpus():
    """Every GPU (the book's try_all_gpus), else the best device, not the book's empty list."""
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [try_device()]


class Runtime:
    """The devices and their arithmetic: "amp" on CUDA and the CPU, else the book's fp32; asked:
    the devices given, in a list to give again (a generator is read once), or None."""

    def __init__(self, devices, precision, asked=None):
        self.devices, self.device, self.asked = devices, devices[0], asked  # [0] holds the net
        amp = precision == "amp" and self.device.type in ("cuda", "cpu")
        self.fp32 = precision == "fp32"  # asked for: no TF32 either
        # several devices are GPUs, where nn.DataParallel's threads autocast to fp16
        self.dtype = (torch.float16 if len(devices) > 1 else amp_dtype(devices[0])) if amp else None
        self.memory_format = torch.channels_last if amp else torch.contiguous_format
        # GradScaler's first scale suits a mean loss; the book's sums 128, so fp16 would overflow
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**16 / 128,
                                           enabled=self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    @contextlib.contextmanager
    def cudnn_flags(self):
        """cuDNN's process-wide flags for the block: autotuning on, and in fp32 no TF32."""
        cudnn = torch.backends.cudnn
        before = cudnn.benchmark, cudnn.conv.fp32_precision  # TF32's setting from torch 2.9 on
        cudnn.benchmark, cudnn.conv.fp32_precision = True, "ieee" if self.fp32 else before[1]
        try:
            yield
        finally:
            cudnn.benchmark, cudnn.conv.fp32_precision = before

    def place(self, net):
        return net.to(self.device, memory_format=self.memory_format)

    def input(self, X):
        X = X.to(self.device, non_blocking=self.device.type == "cuda")  # pinned memory only there
        return X.contiguous(memory_format=self.memory_format)

    def target(self, y):
        return y.to(self.device, non_blocking=self.device.type == "cuda")

    def __str__(self):
        more = f" and {len(self.devices) - 1} more" if len(self.devices) > 1 else ""
        dtype = "fp32" if self.dtype is None else str(self.dtype)[6:] + " autocast"
        last = ", channels-last" if self.memory_format == torch.channels_last else ""
        return f"{self.device}{more}, {dtype}{last}"


def make_runtime(devices=None, precision="amp"):
    """The Runtime for a device (a name, a torch.device, or a GPU's number, as torch.device takes)
    or a list of GPUs (default, or an empty one: all GPUs, else the best device)."""
    if precision not in ("amp", "fp32"):
        raise UserError(f"precision={precision} is not one this program computes in; "
                        "give \"amp\" or \"fp32\"")
    names = ([] if devices is None else list(devices) if isinstance(devices, Iterable)
             and not isinstance(devices, str) else [devices])
    devices = [try_device(name, "devices") for name in names] or try_all_gpus()
    if len(devices) > 1 and (len(set(devices)) < len(devices)
                             or any(d.type != "cuda" for d in devices)):
        raise UserError(f"devices={[str(d) for d in devices]}: nn.DataParallel splits a batch "
                        "among different GPUs only; give one device (devices=\"cpu\": one CPU "
                        "computes on all its cores)")
    return Runtime(devices, precision, names or None)


def amp_dtype(device):
    """bf16 where the device has it natively, else fp16 on GPUs and None (fp32) on CPUs."""
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False)
                else torch.float16)
    cpu = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return torch.bfloat16 if cpu.get("amx_bf16") or cpu.get("avx512_bf16") else None
