"""Device and mixed precision from params: `device: auto|cpu|cuda|cuda:N`, `precision: auto|fp32|bf16|fp16`.

auto precision = bf16 autocast where the hardware computes bf16 natively, else fp16 with a GradScaler on a GPU
and fp32 on a CPU (emulated bf16 is slower than either). Native bf16 on CUDA means compute capability 8.0 or
more (Ampere onwards); V100 (7.0) and T4 (7.5) emulate it, so they get fp16. On a CPU: oneDNN with AVX512-BF16
or AMX. Every decision is a pure function of what it is given (spec, capability, ranks), tested on CPU.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores; earlier GPUs emulate bf16 in fp32 units
_DEVICE_HINT = "expected auto | cpu | cuda | cuda:N"


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


def choose_device(spec: str, local_rank: int, world_size: int, gpu_count: int) -> torch.device:
    """The device of the process with `local_rank` (its index on its machine) among `world_size` processes.

    auto and cuda give each process the GPU of its local rank (torchrun's one-process-per-GPU convention);
    an explicit cuda:N is for one process only: with several it would put them all on GPU N.
    """
    if spec == "auto":
        spec = "cuda" if gpu_count else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if spec == "cuda" else spec)
    except RuntimeError:
        raise PipelineError(f"train.device: {_DEVICE_HINT}, got {spec!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise PipelineError(f"train.device: {_DEVICE_HINT}, got {spec!r}")
    if device.type == "cuda" and spec != "cuda" and world_size > 1:
        raise PipelineError(
            f"train.device: {spec} would put all {world_size} processes on one GPU; use cuda or auto (each "
            "process takes the GPU of its local rank) and pick the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if device.type == "cuda" and device.index >= gpu_count:
        who = f"process with local rank {local_rank}" if spec == "cuda" else spec
        raise PipelineError(
            f"train.device: {who} needs GPU {device.index}, but {gpu_count} are visible on this machine; "
            "use fewer processes (train.nproc_per_node), another GPU, or cpu"
        )
    return device


def visible_gpus() -> int:
    """CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """`choose_device` on this machine's visible GPUs."""
    return choose_device(spec, local_rank, world_size, visible_gpus())


def evaluation_device(spec: str, gpu_count: int) -> torch.device:
    """Where a single process evaluates with the train stage's `device` spec: that device when the machine
    has GPUs (a model trained on a GPU machine can still be evaluated on one without), else the CPU."""
    return choose_device(spec, 0, 1, gpu_count) if gpu_count else torch.device("cpu")


def cpu_supports_bf16() -> bool:
    """Native bf16 matmul/conv on this CPU (oneDNN with AVX512-BF16 or AMX)."""
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return bool(torch.backends.mkldnn.is_available() and native)


def cuda_supports_bf16(capability: tuple[int, int]) -> bool:
    """Native bf16 on a CUDA GPU of this compute capability. Not `torch.cuda.is_bf16_supported()`, which by
    default also counts emulation (True on a V100) and asks about the current device, not the one chosen."""
    return tuple(capability) >= _NATIVE_BF16_CAPABILITY


def choose_precision(spec: str, device_type: str, native_bf16: bool) -> str:
    """fp32 | bf16 | fp16 for `spec` on a device of `device_type` that does (not) compute bf16 natively."""
    if spec != "auto":
        return spec
    if native_bf16:
        return "bf16"
    return "fp16" if device_type == "cuda" else "fp32"


def resolve_precision(spec: str, device: torch.device) -> Precision:
    native = _native_bf16(device)
    name = choose_precision(spec, device.type, native)
    if name == "bf16" and not native:
        log.warning(
            "train.precision: bf16 is emulated on %s and slow; auto picks %s there",
            _describe(device),
            choose_precision("auto", device.type, False),
        )
    return Precision(device, _DTYPES[name])


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return cuda_supports_bf16(torch.cuda.get_device_capability(device))
    return cpu_supports_bf16()


def device_tag(device: torch.device) -> str:
    """What computed a result, for cache keys: `cpu`, or the GPU model (same model, same numbers)."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return "this CPU"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"


def backend_settings(device_type: str, tf32: bool) -> dict[str, object]:
    """CUDA library switches, chosen rather than inherited. cudnn.benchmark: inputs keep one size (the crop),
    so the fastest convolution algorithm is found once per shape. TF32 (Ampere+; ignored earlier): fp32
    matmuls and convolutions on tensor cores with a 10-bit mantissa; training allows it, evaluation does not
    (its figures should be those of the fp32 export). Nothing to set on a CPU."""
    if device_type != "cuda":
        return {}
    return {"cudnn_benchmark": True, "matmul_precision": "high" if tf32 else "highest", "cudnn_tf32": tf32}


def configure_backends(device: torch.device, tf32: bool) -> dict[str, object]:
    """Apply `backend_settings` for `device` (process-wide); returns what was set. Through the API whose
    state every reader agrees on: torch 2.9+'s per-backend `fp32_precision` alone leaves
    `torch.get_float32_matmul_precision()` (read by torch.compile) raising about mixed APIs."""
    settings = backend_settings(device.type, tf32)
    if settings:
        torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
        torch.set_float32_matmul_precision(settings["matmul_precision"])
        torch.backends.cudnn.allow_tf32 = settings["cudnn_tf32"]
    return settings


def flush_denormals() -> bool:
    """Treat subnormal floats as zero on this CPU thread (x86's FTZ and DAZ; True where supported), and so on
    every intra-op thread torch starts after it (a new thread inherits the mode): call it before torch's first
    parallel operation. AdamW's squared gradients of a head's rarely-seen classes fall below float32's normal
    range (1.2e-38), where the CPU takes a slow path per value: a million images of 1,000 classes, fused
    AdamW's step on the 1.28 M head weights took 4.7 ms instead of 1 ms. Their size at flushing is below
    anything an update can show."""
    return torch.set_flush_denormal(True)
