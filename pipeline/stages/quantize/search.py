"""Sensitivity search: the few nodes whose quantization costs most, found on val images and left in FP32.

Only nodes ONNX Runtime then really runs in FP32 are tried: at load time it quantizes the weights of a Conv or
Gemm left in FP32 between a DequantizeLinear and a QuantizeLinear itself, per tensor in 8 bits
(`ort_runs_in_fp32`), which is neither FP32 nor portable. In an ImageNet CNN that leaves the stem convolution,
the one the 7-bit weights hurt most (3 input channels: cheap in FP32). The search quantizes the model once per
weighted node (about a second each for lite0 on 2 cores), whatever the size of the data set.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from scipy.special import log_softmax

from pipeline.config import QuantizeParams
from pipeline.data.sampling import stratified_sample
from pipeline.serving import onnx_runtime as rt
from pipeline.stages.quantize.int8 import WEIGHTED_OPS, quantize_onnx, weighted_nodes

log = logging.getLogger(__name__)

_MIN_GAIN = 0.1  # the search adds a node only if it lowers the divergence from FP32 by at least this share

# ... and stops below this mean KL divergence (nats): softmaxes this close flip top-1 classes only at ties
_NEGLIGIBLE = 1e-4


def quantize_searched(
    prepared: Path,
    target: Path,
    calibration: np.ndarray | None,
    fmt: str,
    q: QuantizeParams,
    probe: tuple,
    cache: Path,
    search: bool = True,
) -> tuple[list[str], dict]:
    """Quantize `prepared` as `fmt` into `target`, with the nodes the search finds on the `probe` (val
    inputs, FP32's logits) left in FP32 when `search` and `q.sensitivity_max_nodes` ask for one (its trials
    go to trial.onnx beside `target`; `cache`: the activation ranges, see `quantize_onnx`). Returns the nodes
    and what the search measured (empty without a search)."""

    def quantized(nodes: Sequence[str], path: Path = target.parent / "trial.onnx") -> Path:
        return quantize_onnx(prepared, path, calibration, fmt, q, fp32_nodes=nodes, cache=cache)

    nodes, found = (
        search_fp32_nodes(
            quantized, weighted_nodes(prepared, q.exclude_nodes), probe, q.sensitivity_max_nodes
        )
        if search and q.sensitivity_max_nodes
        else ([], {})
    )
    quantized(nodes, target)
    return nodes, found


def search_fp32_nodes(
    quantized: Callable[[Sequence[str]], Path], nodes: list[str], probe: tuple, most: int
) -> tuple[list[str], dict]:
    """The nodes whose quantization costs most, to leave in FP32: each of `nodes` is left alone in FP32 in
    turn and scored by how far the INT8 model's softmax then is from FP32's on the `probe` (val inputs, FP32's
    logits; mean KL divergence); the best are added in that order while each lowers the divergence by at least
    `_MIN_GAIN` of what is left, up to `most`, and none once it is `_NEGLIGIBLE`. Returns the nodes and what
    the search measured."""
    inputs, reference = probe

    def divergence(fp32_nodes: Sequence[str]) -> float:
        return kl_divergence(reference, rt.logits(rt.session(quantized(fp32_nodes)), inputs))

    def alone_in_fp32(node: str) -> float | None:
        """The divergence with `node` alone in FP32; None where ONNX Runtime would not run it in FP32."""
        trial = quantized([node])
        if not ort_runs_in_fp32(trial, node):
            return None
        return kl_divergence(reference, rt.logits(rt.session(trial), inputs))

    everything = divergence([])
    scored = {node: alone_in_fp32(node) for node in nodes} if everything >= _NEGLIGIBLE else {}
    alone = {node: score for node, score in scored.items() if score is not None}
    chosen: list[str] = []
    current = everything
    for node in sorted(alone, key=alone.get)[:most]:
        trial = divergence([*chosen, node]) if chosen else alone[node]
        if current < _NEGLIGIBLE or trial > (1.0 - _MIN_GAIN) * current:
            break
        chosen.append(node)
        current = trial
    log.info(
        "sensitivity search: %d nodes tried on %d val images; left in FP32: %s (divergence %.4g -> %.4g)",
        len(alone),
        len(inputs),
        ", ".join(chosen) or "none",
        everything,
        current,
    )
    return chosen, {
        "val_images": len(inputs),
        "nodes_tried": len(alone),
        "nodes_ort_requantizes": len(scored) - len(alone),
        "divergence_all_int8": everything,
        "divergence": current,
    }


def ort_runs_in_fp32(model: Path, name: str) -> bool:
    """Whether ONNX Runtime runs node `name` of a quantized model in FP32, read from the graph its
    optimisations leave (those that choose INT8 kernels; the layout ones after them keep the types). It
    quantizes the weights of a Conv or Gemm left in FP32 between a DequantizeLinear and a QuantizeLinear
    itself (WeightBiasQuantization, per tensor, all 8 bits): leaving such a node out of quantization changes
    its weights' precision, not its type, and a node fused under another name is not FP32 either."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="ort-graph-") as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return any(node.name == name and node.op_type in WEIGHTED_OPS for node in graph.node)


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL divergence of softmax(logits) from softmax(reference), per image, in nats."""
    ref, other = (log_softmax(np.asarray(z, dtype=np.float64), axis=1) for z in (reference, logits))
    return float(np.mean(np.sum(np.exp(ref) * (ref - other), axis=1)))


def search_probe(
    inputs: np.ndarray, labels: np.ndarray, fp32_logits: np.ndarray, q: QuantizeParams, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The search's images: a stratified sample of at most `q.sensitivity_images` val inputs, and FP32's
    logits on them (taken from `fp32_logits`, FP32's on all of `inputs`)."""
    chosen = stratified_sample(labels, q.sensitivity_images, seed)
    return inputs[chosen], fp32_logits[chosen]
