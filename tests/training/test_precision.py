"""training/precision: device, dtype and CUDA backend choices. The CUDA decisions are pure functions of what
they are given (spec, compute capability, ranks, GPU count), so they are tested here on a CPU."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from helpers import PROJECT_ROOT

from pipeline.data.loader import resolve_eval_batch_size, resolve_workers
from pipeline.errors import PipelineError
from pipeline.training import precision
from pipeline.training.precision import (
    backend_settings,
    choose_device,
    choose_precision,
    configure_backends,
    cpu_supports_bf16,
    cuda_supports_bf16,
    evaluation_device,
    resolve_device,
    resolve_precision,
)

CPU = torch.device("cpu")


def test_precision_and_device_resolution_on_cpu():
    gpu = torch.device("cuda", 0)
    assert resolve_precision("fp32", CPU).dtype is None
    fp16 = resolve_precision("fp16", CPU)
    assert fp16.dtype is torch.float16 and fp16.needs_scaler and fp16.grad_scaler().is_enabled()
    assert not resolve_precision("bf16", CPU).needs_scaler
    assert resolve_precision("auto", CPU).name == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(PipelineError, match="train.device"):
            resolve_device("cuda:0")
    assert resolve_workers(None, CPU) == 0 and resolve_workers(3, CPU) == 3
    assert resolve_eval_batch_size(None, 32, CPU) == 16 and resolve_eval_batch_size(None, 32, gpu) == 64
    assert resolve_eval_batch_size(7, 32, CPU) == 7 and resolve_eval_batch_size(7, 32, gpu) == 7


@pytest.mark.parametrize(
    ("capability", "native"),
    [((6, 1), False), ((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)],
)
def test_only_ampere_and_later_gpus_count_as_native_bf16(capability, native):
    """V100 (7.0) and T4 (7.5) run bf16 emulated (torch.cuda.is_bf16_supported() says True there)."""
    assert cuda_supports_bf16(capability) is native


@pytest.mark.parametrize(
    ("spec", "device_type", "native", "chosen"),
    [
        ("auto", "cuda", True, "bf16"),  # A100, H100
        ("auto", "cuda", False, "fp16"),  # V100, T4: fp16 with a GradScaler, not emulated bf16
        ("auto", "cpu", True, "bf16"),
        ("auto", "cpu", False, "fp32"),
        ("fp32", "cuda", True, "fp32"),
        ("bf16", "cuda", False, "bf16"),  # asked for explicitly: kept (with a warning)
        ("fp16", "cpu", False, "fp16"),
    ],
)
def test_precision_choice(spec, device_type, native, chosen):
    assert choose_precision(spec, device_type, native) == chosen


@pytest.mark.parametrize("native", [False, True])
def test_an_explicit_bf16_warns_only_where_it_is_emulated(native, caplog, monkeypatch):
    # the CPU's answer is fixed both ways, so both branches run on any CPU
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.precision"):
        assert resolve_precision("bf16", CPU).name == "bf16"
    warned = "bf16 is emulated on this CPU" in caplog.text and "auto picks fp32" in caplog.text
    assert warned is not native


@pytest.mark.parametrize(
    ("spec", "local_rank", "world_size", "gpus", "expected"),
    [
        ("auto", 0, 1, 0, "cpu"),
        ("auto", 1, 2, 0, "cpu"),  # CPU processes under torchrun (gloo)
        ("auto", 0, 1, 2, "cuda:0"),
        ("auto", 1, 2, 2, "cuda:1"),  # one GPU per process: the local rank's
        ("cuda", 3, 8, 4, "cuda:3"),  # 2 machines x 4 GPUs: global rank 7 has local rank 3
        ("cuda:1", 0, 1, 2, "cuda:1"),  # one process may pick its GPU
        ("cpu", 1, 2, 4, "cpu"),
    ],
)
def test_each_process_gets_the_device_of_its_local_rank(spec, local_rank, world_size, gpus, expected):
    assert choose_device(spec, local_rank, world_size, gpus) == torch.device(expected)


@pytest.mark.parametrize(
    ("spec", "local_rank", "world_size", "gpus", "message"),
    [
        ("cuda:1", 1, 2, 2, "cuda:1 would put all 2 processes on one GPU; use cuda or auto"),
        ("cuda:0", 0, 4, 4, "cuda:0 would put all 4 processes on one GPU"),
        ("cuda", 2, 4, 2, "process with local rank 2 needs GPU 2, but 2 are visible"),
        ("cuda:3", 0, 1, 2, "cuda:3 needs GPU 3, but 2 are visible"),
        ("cuda", 0, 1, 0, "needs GPU 0, but 0 are visible"),
        ("tpu", 0, 1, 0, "expected auto | cpu | cuda | cuda:N, got 'tpu'"),
        ("gpu0", 0, 1, 0, "expected auto | cpu | cuda | cuda:N, got 'gpu0'"),
    ],
)
def test_device_specs_that_cannot_work_are_refused_in_one_line(spec, local_rank, world_size, gpus, message):
    with pytest.raises(PipelineError, match="^train.device: ") as caught:
        choose_device(spec, local_rank, world_size, gpus)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "gpus", "expected"),
    [
        ("auto", 0, "cpu"),
        ("cuda:1", 0, "cpu"),  # trained on a GPU machine, evaluated on one without
        ("auto", 2, "cuda:0"),
        ("cuda:1", 2, "cuda:1"),
        ("cpu", 2, "cpu"),
    ],
)
def test_evaluate_runs_on_the_train_device_where_there_is_a_gpu(spec, gpus, expected):
    assert evaluation_device(spec, gpus) == torch.device(expected)


def test_cuda_backends_are_set_deliberately_and_the_cpu_is_left_alone():
    assert backend_settings("cpu", tf32=True) == {} and backend_settings("cpu", tf32=False) == {}
    train = backend_settings("cuda", tf32=True)
    assert train == {"cudnn_benchmark": True, "matmul_precision": "high", "cudnn_tf32": True}
    evaluate = backend_settings("cuda", tf32=False)
    assert evaluate == {"cudnn_benchmark": True, "matmul_precision": "highest", "cudnn_tf32": False}


@pytest.fixture
def restore_backends():
    benchmark, matmul, cudnn_tf32 = (
        torch.backends.cudnn.benchmark,
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.backends.cudnn.benchmark = benchmark
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


@pytest.mark.usefixtures("restore_backends")
@pytest.mark.parametrize("tf32", [True, False])
def test_configure_backends_sets_torchs_switches_for_a_cuda_device(tf32):
    """The switches are process-wide flags, so setting them needs no GPU (the device is only described).
    Every way torch reads them must agree and not raise (torch.compile reads the matmul precision)."""
    torch.backends.cudnn.benchmark = False
    assert configure_backends(CPU, tf32) == {} and torch.backends.cudnn.benchmark is False
    configure_backends(torch.device("cuda", 1), tf32)
    assert torch.backends.cudnn.benchmark is True
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")


def test_flush_denormals_reaches_the_intra_op_threads_started_after_it():
    """A head's AdamW step on subnormal squared gradients took 4.7 ms instead of 1 ms: flushed, they are 0 on
    the calling thread and on torch's 2 intra-op threads (a new process: its threads start after the call)."""
    code = (
        "import torch; from pipeline.training.precision import flush_denormals; "
        "print(flush_denormals()); torch.set_num_threads(2); "
        "x = torch.full((1_000_000,), 1e-39) * 1.0; print(int((x == 0).sum()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    supported, zeros = done.stdout.split()
    assert supported == "True" and int(zeros) == 1_000_000, done.stderr  # unflushed: 1e-39 * 1.0 is 1e-39
