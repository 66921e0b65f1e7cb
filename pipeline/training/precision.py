"""Device and mixed precision from params: `device: auto|cpu|cuda|cuda:N`, `precision: auto|fp32|bf16|fp16`.

auto precision = bf16 autocast on CUDA GPUs that support it, else fp16 with a GradScaler; on CPU, bf16
autocast where the CPU computes bf16 natively (AVX512-BF16 or AMX), else fp32 (emulated bf16 is slower).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = plain fp32

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.dtype is torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.needs_scaler)


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` = this process's GPU when CUDA is available (its local rank under torchrun), else the CPU."""
    if spec == "auto":
        spec = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif spec == "cuda":
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise PipelineError(f"train.device: expected auto | cpu | cuda | cuda:N, got {spec!r}") from None
    if device.type == "cuda" and not (
        torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    ):
        raise PipelineError(f"train.device: {spec} is not available on this machine; use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise PipelineError(f"train.device: expected auto | cpu | cuda | cuda:N, got {spec!r}")
    return device


def cpu_supports_bf16() -> bool:
    """Native bf16 matmul/conv on this CPU (oneDNN with AVX512-BF16 or AMX)."""
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return bool(torch.backends.mkldnn.is_available() and native)


def resolve_precision(spec: str, device: torch.device) -> Precision:
    if spec == "auto":
        if device.type == "cuda":
            spec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            spec = "bf16" if cpu_supports_bf16() else "fp32"
    if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PipelineError(f"train.precision: {device} does not support bf16; use auto or fp16")
    return Precision(device, _DTYPES[spec])
