"""Where the models live: the compute device and dtype, and moving modules on and off it.

The official single-GPU memory rules: the text encoder stays on the CPU; each DiT and the VAE
sit on the compute device only while they are used (`resident`), and of two experts only the
active one is ever there (`Experts.activate`). With `offload=False` everything stays on the
device.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch

from .errors import InputError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The compute device: CUDA when present (None), else CPU; or the one asked for."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device= {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device= {device!r} asked for, but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device= {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise InputError(f"unsupported device= {device!r}; use cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The DiT compute dtype: bfloat16 on CUDA, float32 on CPU, unless asked otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"unsupported dtype= {dtype}; use fp32, bf16 or fp16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype= {dtype!r}; use fp32, bf16 or fp16") from None


class Experts:
    """The DiT(s) of a model, the rule that picks one per step, and where they live.

    models[0] is the single DiT or the high-noise expert, models[1] the low-noise expert; the
    high-noise one runs while t >= boundary·1000. `guidance` follows the official order:
    a float, or (low-noise, high-noise). With `offload`, only the active expert sits on the
    device; the other is moved back to the CPU first.
    """

    def __init__(self, models: Sequence[torch.nn.Module], guidance: float | tuple[float, float],
                 boundary: float | None, device: torch.device, offload: bool = True,
                 num_train_timesteps: int = 1000):
        if not 1 <= len(models) <= 2:
            raise ValueError("one DiT or two experts")
        if len(models) == 2 and boundary is None:
            raise ValueError("two experts need a boundary")
        self.models = list(models)
        low, high = guidance if isinstance(guidance, tuple) else (guidance, guidance)
        self.scales = [float(high), float(low)][: len(self.models)]
        self.boundary_t = None if boundary is None else boundary * num_train_timesteps
        self.device = device
        self.offload = offload

    def pick(self, t: int) -> int:
        if len(self.models) == 1 or t >= self.boundary_t:
            return 0
        return 1

    def name(self, k: int) -> Optional[str]:
        return None if len(self.models) == 1 else ("high", "low")[k]

    def activate(self, k: int) -> torch.nn.Module:
        """Expert k on the device (the other one moved off first, so both never share it)."""
        if self.device.type != "cpu":
            if self.offload:
                for j, m in enumerate(self.models):
                    if j != k:
                        move(m, torch.device("cpu"))
            move(self.models[k], self.device)
        return self.models[k]

    def release(self) -> None:
        """After sampling: every DiT back to the CPU (offload) and the device cache freed."""
        if self.device.type != "cpu" and self.offload:
            for m in self.models:
                move(m, torch.device("cpu"))
            empty_cache(self.device)


def module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def move(module: Any, device: torch.device) -> None:
    if module is not None and module_device(module) != device:
        module.to(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def resident(module: Any, device: torch.device, offload: bool) -> Iterator[Any]:
    """Keep `module` on `device` for a block; back to the CPU afterwards when offloading."""
    move(module, device)
    try:
        yield module
    finally:
        if offload and device.type != "cpu":
            move(module, torch.device("cpu"))
            empty_cache(device)


__all__ = ["Experts", "empty_cache", "module_device", "move", "resident", "resolve_device", "resolve_dtype"]
