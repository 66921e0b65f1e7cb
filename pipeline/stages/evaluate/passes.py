"""The evaluate stage's passes over images, shared by its single-label and label-set (`label_sets`) paths:
the model's logits and pooled features of a split, memory-mapped in a scratch folder, decoded as predict
decodes; and the small helpers both write with."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.format import open_memmap
from PIL import Image

from pipeline.config import EvaluateParams
from pipeline.data.shards import release
from pipeline.errors import PipelineError
from pipeline.models import TrainedModel
from pipeline.preprocess import open_rgb, preprocess_file
from pipeline.progress import progress
from pipeline.serving import unknown

_THUMBNAIL_SIDE = 160


@dataclass(frozen=True)
class Outputs:
    """The model's outputs on one split, memory-mapped in the stage's scratch folder: logits per view and the
    first view's pooled backbone features, which the head maps to logits (the test split's are 2.7 GB at a
    million images of 1,000 classes)."""

    logits: np.ndarray  # (V, N, K) float32
    features: np.ndarray  # (N, C) float32

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(V, b, K) logits and (b, C) features of rows start:stop, in memory; the mapped pages let go."""
        logits, features = np.array(self.logits[:, start:stop]), np.array(self.features[start:stop])
        release(self.logits, self.features)
        return logits, features


_WHY_NEEDED = {
    "test": "there is nothing to evaluate; set split.test > 0 (or split.carve_test_from for pre-split data)",
    "val": "the temperature cannot be fitted; set split.val > 0",
}


def split_rows(splits: pd.DataFrame, split: str, source: Path) -> pd.DataFrame:
    """One split's rows sorted by path; a clear error when it has none."""
    rows = splits[splits["split"] == split].sort_values("path", kind="stable").reset_index(drop=True)
    if rows.empty:
        raise PipelineError(
            f"{source}: the {split} split has no rows, so {_WHY_NEEDED[split]}, and re-run `dvc repro split`"
        )
    return rows


def outputs(
    trained: TrainedModel,
    data_root: Path,
    files: pd.Series,
    cfg: EvaluateParams,
    tta: bool,
    folder: Path,
    desc: str,
) -> Outputs:
    """fp32 logits (V, N, K) of the model (in eval mode, on its device), V = 2 with TTA (the image and its
    horizontal flip), else 1; and the unflipped images' pooled features (N, C), which the head maps to logits
    and the ONNX export outputs next to them. Written batch by batch to .npy files in `folder`, memory-mapped.
    """
    model = trained.model
    device = next(model.parameters()).device
    files = list(files)
    folder.mkdir(parents=True, exist_ok=True)
    logits = features = np.zeros((0, 0))  # allocated at the first batch, when their widths are known
    with torch.inference_mode(), progress(desc, len(files), "img") as bar:
        for start, images in _decoded(data_root, files, cfg.batch_size, trained.data_config):
            rows = slice(start, start + len(images))
            batch = torch.from_numpy(images).to(device)
            pooled = model.forward_features(batch)
            head = model.head(pooled)
            if start == 0:
                shape = (2 if tta else 1, len(files), head.shape[1])
                logits = open_memmap(folder / "logits.npy", "w+", np.float32, shape)
                features = open_memmap(
                    folder / "features.npy", "w+", np.float32, (len(files), pooled.shape[1])
                )
            features[rows] = pooled.cpu().numpy()
            logits[0, rows] = head.cpu().numpy()
            if tta:
                logits[1, rows] = model(torch.flip(batch, dims=[3])).cpu().numpy()  # (B, C, H, W): flip W
            release(logits, features)
            bar.update(len(images))
    return Outputs(logits, features)


def _decoded(
    data_root: Path, files: list[str], batch_size: int, data_config: dict
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (B, 3, H, W) float32 batch) of `files` preprocessed as predict does, the next batch
    decoded on a thread while the model runs on this one (Pillow and numpy let go of the GIL): the scale
    benchmark's 32 px PNGs, one torch thread, 2-core Xeon: 530 -> 642 img/s."""

    def load(start: int) -> np.ndarray:
        return np.stack([_load(data_root, f, data_config) for f in files[start : start + batch_size]])

    starts = range(0, len(files), batch_size)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, starts[0]) if starts else None
        for i, start in enumerate(starts):
            images = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(load, starts[i + 1])
            yield start, images


def bank_of(detector: unknown.Detector, width: int) -> np.ndarray:
    """The kNN bank to ship (float16, unit rows); an empty (0, C) one for the detectors that need none."""
    return detector.bank if detector.bank is not None else np.zeros((0, width), dtype=np.float16)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _load(data_root: Path, relative: str, data_config: dict) -> np.ndarray:
    path = Path(data_root) / relative
    try:
        return preprocess_file(path, data_config)
    except OSError as exc:
        raise PipelineError(
            f"{path}: cannot read this image listed in the splits file ({exc}); "
            "the data changed since ingest: re-run the pipeline from ingest (dvc repro)"
        ) from None


def thumbnail(path: Path) -> Image.Image:
    image = open_rgb(path)
    image.thumbnail((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE))
    return image
