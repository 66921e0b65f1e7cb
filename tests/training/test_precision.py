"""training/precision: device and dtype resolution (the CUDA decisions tested on CPU)."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.loader import resolve_eval_batch_size, resolve_workers
from pipeline.errors import PipelineError
from pipeline.training.precision import resolve_device, resolve_precision


def test_precision_and_device_resolution_on_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("fp32", cpu).dtype is None
    fp16 = resolve_precision("fp16", cpu)
    assert fp16.dtype is torch.float16 and fp16.needs_scaler and fp16.grad_scaler().is_enabled()
    assert not resolve_precision("bf16", cpu).needs_scaler
    assert resolve_precision("auto", cpu).name in {"bf16", "fp32"}
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(PipelineError, match="train.device"):
            resolve_device("cuda:0")
    assert resolve_workers(None, cpu) == 0 and resolve_workers(3, cpu) == 3
    assert resolve_eval_batch_size(None, 32, cpu) == 16 and resolve_eval_batch_size(None, 32, gpu) == 64
    assert resolve_eval_batch_size(7, 32, cpu) == 7 and resolve_eval_batch_size(7, 32, gpu) == 7
