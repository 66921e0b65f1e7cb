"""audit_near_duplicates: 300 altered copies of Fashion-MNIST test images added to a 6,000-image train
subset (JPEG re-encode at quality 60-90, resize by up to +/-15%, a 90% crop, brightness +/-5-10%, horizontal
flip; one alteration per copy, in turn), then the real ingest -> validate -> audit stages: recall of the
injected (copy, original) pairs (same near-duplicate group), the other pairs flagged per 1,000 images, and the
audit's cost per 1,000 images with a cold (empty) and a warm (filled) cache folder. Three draws of the data
(seeds 42, 7, 123; one in smoke mode), pooled: the defaults were chosen on the first, the others are held out.

The data is written as a pre-split folder (train/ with the copies, val/ with the originals), so every found
copy is also a group across given splits: leakage, as the audit reports it (`cross_split_groups`).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageOps

from benchmarks._common import (
    SMOKE_PARAMS,
    Options,
    class_files,
    ensure_fashion_mnist,
    machine,
    project_params,
    result,
    summary,
    target,
    timed,
    workdir,
)
from pipeline.config import Params
from pipeline.io import read_json
from pipeline.stages import audit, ingest, validate
from pipeline.stages.audit import checks

NAME = "audit_near_duplicates"
ALTERATIONS = ("jpeg", "resize", "crop", "brightness", "flip")
_COMMON = {"validate.severity.split_leakage": "warning", "audit.label_issues": "off", "audit.drift": False}
SETTINGS = {
    "full": {
        "repeats": 1,
        "train_per_class": 600,
        "test_per_class": 100,
        "copies": 300,
        # The audit's defaults were chosen on seed 42's data; 7 and 123 are data they never saw.
        "seeds": (42, 7, 123),
        "params": _COMMON,
    },
    "smoke": {
        "repeats": 1,
        "train_per_class": 6,
        "test_per_class": 4,
        "copies": 5,
        "seeds": (42,),
        "params": {**_COMMON, **SMOKE_PARAMS},
    },
}


def alter(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One alteration of `image` and the file suffix to save it with (never byte-identical to the source)."""
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(60, 91)))
        return Image.open(io.BytesIO(buffer.getvalue())), ".jpg"
    if kind == "resize":
        factor = rng.choice([-1, 1]) * rng.uniform(0.05, 0.15) + 1
        side = max(8, round(image.width * factor))
        return image.resize((side, side), Image.Resampling.BICUBIC), ".png"
    if kind == "crop":
        side = round(0.9 * image.width)
        left, top = (int(v) for v in rng.integers(0, image.width - side + 1, size=2))
        return image.crop((left, top, left + side, top + side)), ".png"
    if kind == "brightness":
        factor = rng.choice([-1, 1]) * rng.uniform(0.05, 0.10) + 1
        return ImageEnhance.Brightness(image).enhance(factor), ".png"
    return ImageOps.mirror(image), ".png"


def build_data(source: Path, target_root: Path, settings: dict, seed: int) -> list[tuple[str, str, str]]:
    """Copy a class-stratified subset of `source` (train/, test/) to `target_root` (train/, val/) and add the
    altered copies of the test images to train/; returns (copy path, original path, alteration) relative to
    `target_root`."""
    rng = np.random.default_rng(seed)
    originals = []
    for split, per_class in (("train", settings["train_per_class"]), ("test", settings["test_per_class"])):
        given = "val" if split == "test" else split  # train/ and val/: a pre-split folder to ingest
        for label, names in class_files(source / split).items():
            for name in rng.permutation(names)[:per_class]:
                relative = f"{given}/{label}/{name}"
                (target_root / given / label).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / split / label / name, target_root / relative)
                if split == "test":
                    originals.append(relative)
    injected = []
    for n, index in enumerate(rng.permutation(len(originals))[: settings["copies"]]):
        original, kind = originals[index], ALTERATIONS[n % len(ALTERATIONS)]
        image, suffix = alter(Image.open(target_root / original), kind, rng)
        label = original.split("/")[1]
        copy = f"train/{label}/copy{n:04d}_{kind}{suffix}"
        image.save(target_root / copy)
        injected.append((copy, original, kind))
    return injected


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    source = opts.data if opts.smoke else ensure_fashion_mnist(opts.data)
    seconds: dict[str, list[float]] = {"cold": [], "warm": []}
    by_seed = {}
    with workdir(opts, NAME) as root:
        for n, seed in enumerate(settings["seeds"]):  # the first seed's data is also timed
            project = root / f"seed{seed}"
            injected = build_data(Path(source), project / "data", settings, seed=seed)
            params = project_params(project, {"paths.data_root": str(project / "data"), **settings["params"]})
            ingest.run(params)
            validate.run(params)
            for _ in range(settings["repeats"] if n == 0 else 1):
                shutil.rmtree(params.paths.cache_dir, ignore_errors=True)
                for key in ("cold", "warm"):
                    taken = timed(lambda: audit.run(params))[0]  # noqa: B023 (called at once)
                    seconds[key] += [taken] if n == 0 else []
            table = pd.read_csv(params.paths.audit_table, dtype=str, keep_default_na=False)
            pairs = _pairs(params, table)
            approximate_groups = checks.group_ids(table["sha256"].tolist(), pairs["approximate"])
            by_seed[seed] = {
                "images": len(table),
                "classes": int(table["label"].nunique()),
                "given_splits": sorted(table["split"].unique()),
                "cross_split_groups": read_json(params.paths.metrics("audit"))["cross_split_groups"],
                **_score(table, table["group"].tolist(), pairs["exact"], injected),
                "approximate_search": _score(table, approximate_groups, pairs["approximate"], injected),
            }
    images = sum(figures["images"] for figures in by_seed.values())
    recall, extra = _pooled(list(by_seed.values()), images)
    ann_recall, ann_extra = _pooled([figures["approximate_search"] for figures in by_seed.values()], images)
    timed_images = by_seed[settings["seeds"][0]]["images"]
    per_1000 = {key: {**summary(values), "per_1000_images": 1000 * min(values) / timed_images}
                for key, values in seconds.items()}  # fmt: skip
    results = {
        "recall": recall,
        "extra_pairs_per_1000_images": extra,
        "approximate_search": {"recall": ann_recall, "extra_pairs_per_1000_images": ann_extra},
        "seconds": per_1000,
        "by_seed": by_seed,
    }
    ratios = {
        "recall": recall,
        "extra_pairs_per_1000_images": extra,
        "cold_vs_warm": per_1000["cold"]["median"] / per_1000["warm"]["median"],
        "approximate_search_recall": ann_recall,
        "approximate_search_extra_pairs_per_1000_images": ann_extra,
    }
    targets = {
        "recall": target(recall, ">=", 0.95),
        "extra_pairs_per_1000_images": target(extra, "<=", 1.0),
    }
    settings.update(alterations=ALTERATIONS, audit=params.audit.model_dump(), model=params.model.model_dump())
    return result(NAME, opts, started, settings, results, ratios, targets)


def _pairs(params: Params, table: pd.DataFrame) -> dict[str, checks.Pairs]:
    """The pairs the audit's rule flags, on its (now cached) embeddings: as the audit found them (all pairs
    compared, below checks.ANN_ABOVE images), and by the approximate search larger sets get."""
    files = [params.paths.data_root / path for path in table["path"]]
    embeddings = audit.embed(
        table, files, params.model, params.features, params.paths.cache_dir, params.base.seed
    )
    return {
        "exact": checks.near_duplicate_pairs(embeddings, files, params.audit),
        "approximate": checks.near_duplicate_pairs(embeddings, files, params.audit, ann_above=0),
    }


def _pooled(scores: list[dict], images: int) -> tuple[float, float]:
    """Recall over all the seeds' injected pairs, and their other flagged pairs per 1,000 images."""
    hits = sum(figures["recall"] * figures["injected_pairs"] for figures in scores)
    recall = hits / sum(figures["injected_pairs"] for figures in scores)
    return recall, 1000 * sum(figures["extra_pairs"] for figures in scores) / images


def _score(
    table: pd.DataFrame, groups: list[str], pairs: checks.Pairs, injected: list[tuple[str, str, str]]
) -> dict:
    """Recall of the injected pairs (same group in `groups`, one per row of `table`), per alteration; the
    other flagged pairs."""
    group = dict(zip(table["path"], groups, strict=True))
    found = {kind: [group[c] == group[o] for c, o, k in injected if k == kind] for kind in ALTERATIONS}
    paths = table["path"].tolist()
    wanted = {frozenset((c, o)) for c, o, _ in injected}
    extra = [p for p in pairs if frozenset((paths[p.first], paths[p.second])) not in wanted]
    hits = sum(sum(v) for v in found.values())
    return {
        "injected_pairs": len(injected),
        "recall": hits / max(1, len(injected)),
        "recall_by_alteration": {kind: float(np.mean(v)) if v else None for kind, v in found.items()},
        "flagged_pairs": len(pairs),
        "extra_pairs": len(extra),
        "extra_examples": [
            {
                "first": paths[p.first],
                "second": paths[p.second],
                "similarity": round(p.similarity, 4),
                "correlation": None if p.correlation is None else round(p.correlation, 4),
            }
            for p in extra[:20]
        ],  # fmt: skip
    }
