"""quantize stage, INT8 on other CPUs: each format run by ONNX Runtime as on an AVX2-only CPU without VNNI
(`qemu-x86_64 -cpu Haswell`, Debian's qemu-user, which ./run.sh test installs when run as root) against
the exact integer result (the same QDQ graph run unfused, in float). A 1x1 convolution over 64 channels of
large activations and weights makes every int16 pair of u8 x s8 products overflow: the portable formats
must still be exact there, and u8s8 must not (else this model would not tell them apart)."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.config import QuantizeParams
from pipeline.serving import onnx_runtime as rt
from pipeline.stages.quantize import int8

QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(
    QEMU is None or platform.machine() != "x86_64",
    reason="needs x86_64 and qemu-x86_64: `apt-get install -y qemu-user` (./run.sh test does it as root)",
)
CHANNELS = 64
# Runs in the emulated CPU: the quantized models' logits on the saved inputs.
_RUN = """
import sys, numpy as np, onnxruntime as ort
inputs = np.load(sys.argv[1])
for model in sys.argv[2:]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    np.save(model + ".haswell.npy", sess.run(None, {"input": inputs})[0])
"""


@pytest.fixture(scope="module")
def on_haswell(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    """format -> the logits of the model below, quantized: exact, on this CPU, and under an AVX2-only
    Haswell CPU model."""
    folder = tmp_path_factory.mktemp("cpus")
    rng = np.random.default_rng(0)
    fp32 = _saturating_model(folder / "fp32.onnx", rng)
    inputs = rng.uniform(0.6, 1.0, (8, CHANNELS, 4, 4)).astype(np.float32)
    np.save(folder / "inputs.npy", inputs)
    prepared = int8.prepare(fp32, folder / "prepared.onnx", [])
    models = {
        fmt: int8.quantize_onnx(prepared, folder / f"{fmt}.onnx", inputs, fmt, QuantizeParams())
        for fmt in int8.FORMATS
    }
    (folder / "run.py").write_text(_RUN)
    subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, str(folder / "run.py"), str(folder / "inputs.npy")]
        + [str(path) for path in models.values()],
        check=True,
        capture_output=True,
    )
    return {
        fmt: {
            "exact": rt.logits(rt.session(path, optimize=False), inputs),
            "here": rt.logits(rt.session(path), inputs),
            "haswell": np.load(f"{path}.haswell.npy"),
        }
        for fmt, path in models.items()
    }


def _saturating_model(path: Path, rng: np.random.Generator) -> Path:
    """input (N, 64, 4, 4) -> 1x1 Conv to 16 -> Relu -> depthwise 3x3 Conv -> GlobalAveragePool -> Gemm -> 4
    logits; positive weights in [0.5, 1], so the quantized values sit near the top of their ranges."""

    def weight(name: str, *shape: int, low: float = 0.5) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.uniform(low, 1.0, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", [rt.INPUT_NAME, "pw_w", "pw_b"], ["pw"]),
        helper.make_node("Relu", ["pw"], ["relu"]),
        helper.make_node("Conv", ["relu", "dw_w", "dw_b"], ["dw"], pads=[1, 1, 1, 1], group=16),
        helper.make_node("GlobalAveragePool", ["dw"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [rt.OUTPUT_NAME], transB=1),
    ]
    inits = [
        *(
            weight("pw_w", 16, CHANNELS, 1, 1),
            weight("pw_b", 16),
            weight("dw_w", 16, 1, 3, 3),
            weight("dw_b", 16),
        ),
        *(weight("fc_w", 4, 16, low=-1.0), weight("fc_b", 4)),
    ]
    graph = helper.make_graph(
        nodes,
        "saturating",
        [helper.make_tensor_value_info(rt.INPUT_NAME, TensorProto.FLOAT, ["batch", CHANNELS, 4, 4])],
        [helper.make_tensor_value_info(rt.OUTPUT_NAME, TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _error(exact: np.ndarray, got: np.ndarray) -> float:
    """Largest difference from the exact logits, as a share of their largest magnitude."""
    return float(np.abs(got - exact).max() / np.abs(exact).max())


@pytest.mark.parametrize("fmt", sorted(rt.PORTABLE_INT8))
def test_portable_formats_are_exact_without_vnni_and_the_same_as_here(on_haswell, fmt):
    logits = on_haswell[fmt]
    assert _error(logits["exact"], logits["haswell"]) < 1e-4
    assert np.array_equal(logits["here"], logits["haswell"])


@pytest.mark.parametrize("fmt", sorted(set(int8.FORMATS) - rt.PORTABLE_INT8))
def test_the_other_formats_saturate_without_vnni_so_the_model_tells_them_apart(on_haswell, fmt):
    logits = on_haswell[fmt]
    assert _error(logits["exact"], logits["haswell"]) > 0.05
