"""colour_recipe: the default training recipe, and the changes to it that could matter, on colour images
unlike ImageNet's photos: two sets assembled from images that ship in Debian packages, through the real stages
(ingest -> validate -> split once per set, then train -> evaluate for each arm and seed).

The sets (full mode):
- `oxygen_icons`: the 128 px PNG icons of `oxygen-icon-theme`, labelled by their context folder (actions,
  apps, categories, devices, mimetypes, places, status); links are copied as files, and validate drops the
  copies.
- `noto_emoji`: every fully-qualified emoji of Unicode's `emoji-test.txt` (`unicode-data`) without skin-tone
  variants, drawn from `fonts-noto-color-emoji` (its 136 x 128 colour bitmaps, RGBA), labelled by its Unicode
  group; the Flags group is left out (a rectangle per flag: no test of the recipe) and Component has none.
Smoke mode uses the given Fashion-MNIST stand-in's train folder as one set.

Each arm is params.yaml plus its overrides; every arm trains with the same seeds (`base.seed`) on the same
split, so the arm's gain over `default` is paired per seed. An arm's gain counts only when it is larger than
the noise: the largest spread (max - min over the seeds) of the default's figure on that set. `--arms` runs
some of the arms (the default always runs).
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path
from typing import Any

from benchmarks._common import (
    SMOKE_PARAMS,
    Options,
    ensure_debian_package,
    machine,
    median,
    prepare_splits,
    project_params,
    result,
    seeded_run,
    summary,
    timed,
    workdir,
)
from pipeline.config import Params
from pipeline.io import read_json

NAME = "colour_recipe"
OXYGEN = Path("/usr/share/icons/oxygen/base/128x128")
OXYGEN_CONTEXTS = ("actions", "apps", "categories", "devices", "mimetypes", "places", "status")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_STRIKE = 109  # px: the font's only bitmap size (CBDT), drawn 136 x 128
_SKIN_TONES = range(0x1F3FB, 0x1F400)
ARMS = {
    "default": {},
    # acting on the train/val gap
    "on_overfit: stop": {"train.on_overfit": "stop"},
    "on_overfit: restore": {"train.on_overfit": "restore"},
    # augmentation, regularisation, resolution (framing), unfreezing
    "trivial augment": {"train.augment.auto_augment": "trivial"},
    "mixup 0.2 / cutmix 1.0": {"train.augment.mixup_alpha": 0.2, "train.augment.cutmix_alpha": 1.0},
    "crop_pct: 1.0": {"model.crop_pct": 1.0},  # the whole frame at evaluation: icons are framed tight
    "all blocks train": {"train.trainable_blocks": None},
}
SEEDS = (42, 7, 123)
FIGURES = ("accuracy", "f1_macro")
SETTINGS = {
    "full": {"datasets": ["oxygen_icons", "noto_emoji"], "repeats": 2, "params": {}},
    "smoke": {
        "datasets": ["smoke"],
        "repeats": 2,
        "params": {**SMOKE_PARAMS, "train.epochs": 3, "train.progressive_head_epochs": 1},
    },
}


def run(opts: Options, arms: list[str] | None = None) -> dict[str, Any]:
    """`arms`: the arms to run (`--arms`; `default` always runs, as every other arm is compared with it)."""
    started, settings = machine(), opts.settings(SETTINGS)
    chosen = {arm: ARMS[arm] for arm in ARMS if arm == "default" or arms is None or arm in arms}
    seeds = [SEEDS[k % len(SEEDS)] for k in range(settings["repeats"])]
    sets: dict[str, Any] = {}
    with workdir(opts, NAME) as root:
        for name in settings["datasets"]:
            images = _dataset(name, opts, root / "data" / name)
            base = project_params(root / name, {"paths.data_root": str(images), **settings["params"]})
            seconds, split = timed(lambda base=base: prepare_splits(base))
            runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in chosen}
            for seed in seeds:
                for arm, overrides in chosen.items():  # arms alternate, so a slow spell hits all of them
                    runs[arm].append(_train_and_evaluate(root / name, base, arm, overrides, seed))
            counts = {key: split[key] for key in ("train", "val", "test")}
            counts["classes"] = len(read_json(base.paths.details("split"))["classes"])
            sets[name] = _judge(runs) | {"split": counts, "prepare_seconds": seconds}
    ratios = {
        f"{name}: {arm} minus default, {figure}": judged["gains"][arm][figure]["median"]
        for name, judged in sets.items()
        for arm in chosen
        if arm != "default"
        for figure in FIGURES
    }
    recipe = {"overrides": settings["params"], "seeds": seeds, "arms": chosen}
    return result(NAME, opts, started, settings, sets, ratios, {}, recipe=recipe)


def _dataset(name: str, opts: Options, target: Path) -> Path:
    if name == "smoke":
        return Path(opts.data) / "train"
    if name == "oxygen_icons":
        return oxygen_icons(target)
    if name == "noto_emoji":
        return noto_emoji(target)
    raise SystemExit(f"colour_recipe: unknown dataset {name!r}; expected oxygen_icons or noto_emoji")


def oxygen_icons(target: Path) -> Path:
    """<target>/<context>/<icon>.png from the Oxygen theme's 128 px icons (links copied as files)."""
    ensure_debian_package(OXYGEN, "oxygen-icon-theme")
    for context in OXYGEN_CONTEXTS:
        (target / context).mkdir(parents=True, exist_ok=True)
        for icon in sorted((OXYGEN / context).glob("*.png")):
            if icon.resolve().is_file():
                shutil.copyfile(icon, target / context / icon.name)
    return target


def emoji_groups(test_file: Path = EMOJI_TEST) -> dict[str, list[str]]:
    """Unicode group -> its fully-qualified emoji without skin tones, in the file's order."""
    groups: dict[str, list[str]] = {}
    group = ""
    for line in test_file.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and ";" in line:
            codes, rest = line.split(";", 1)
            points = [int(code, 16) for code in codes.split()]
            if rest.split("#")[0].strip() == "fully-qualified" and not any(p in _SKIN_TONES for p in points):
                groups.setdefault(group, []).append("".join(map(chr, points)))
    return groups


def noto_emoji(target: Path, exclude: tuple[str, ...] = ("Flags", "Component")) -> Path:
    """<target>/<group>/<code points>.png: each emoji drawn from Noto Color Emoji on a transparent 136 x 128
    canvas; groups named in lower case with `_` (smileys_emotion, animals_nature, ...)."""
    from PIL import Image, ImageDraw, ImageFont

    ensure_debian_package(EMOJI_TEST, "unicode-data")
    font = ImageFont.truetype(str(ensure_debian_package(EMOJI_FONT, "fonts-noto-color-emoji")), EMOJI_STRIKE)
    for group, emoji in emoji_groups().items():
        if group in exclude:
            continue
        folder = target / _slug(group)
        folder.mkdir(parents=True, exist_ok=True)
        for text in emoji:
            canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
            canvas.save(folder / ("-".join(f"{ord(c):x}" for c in text) + ".png"))
    return target


def _train_and_evaluate(
    root: Path, base: Params, arm: str, overrides: dict[str, Any], seed: int
) -> dict[str, Any]:
    """One seeded run of the train and evaluate stages (`seeded_run`) and its figures."""
    params, train_seconds, evaluate_seconds = seeded_run(root, base, _slug(arm), overrides, seed)
    metrics = read_json(params.paths.metrics("evaluate"))
    trained = read_json(params.paths.metrics("train"))
    curves = _curves(params.paths.live_dir)
    best = trained["best_epoch"] - 1
    return {
        "arm": arm,
        "seed": seed,
        **{key: metrics[key] for key in FIGURES},
        "best_val_acc": trained["best_val_acc"],
        "best_epoch": trained["best_epoch"],
        "epochs_run": trained["epochs_run"],
        "gap_at_best": curves["train_acc"][best] - curves["val_acc"][best],
        "largest_gap": max(t - v for t, v in zip(curves["train_acc"], curves["val_acc"], strict=True)),
        "train_seconds": train_seconds,
        "evaluate_seconds": evaluate_seconds,
    }


def _slug(name: str) -> str:
    """'Smileys & Emotion' -> 'smileys_emotion'; 'crop_pct: 1.0' -> 'crop_pct_1_0'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _curves(live_dir: Path) -> dict[str, list[float]]:
    """Train and val accuracy per epoch, from dvclive's plots."""
    curves = {}
    for split in ("train", "val"):
        with (live_dir / "plots" / "metrics" / split / "acc.tsv").open(newline="") as handle:
            curves[f"{split}_acc"] = [float(row["acc"]) for row in csv.DictReader(handle, delimiter="\t")]
    return curves


def _judge(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: every figure's summary; per arm but the default: its paired gains over the default (same seed)
    and whether their median is larger than the noise (the default's largest spread between seeds)."""
    default = runs["default"]
    noise = {key: max(r[key] for r in default) - min(r[key] for r in default) for key in FIGURES}
    gains: dict[str, Any] = {}
    for arm, rows in runs.items():
        if arm == "default":
            continue
        gains[arm] = {}
        for key in FIGURES:
            paired = [r[key] - d[key] for r, d in zip(rows, default, strict=True)]
            gains[arm][key] = {
                "median": median(paired),
                "runs": paired,
                "beyond_noise": bool(median(paired) > noise[key] and min(paired) > 0),
            }
    keys = (*FIGURES, "gap_at_best", "largest_gap", "epochs_run", "train_seconds")
    return {
        "runs": runs,
        "summary": {arm: {k: summary([r[k] for r in rows]) for k in keys} for arm, rows in runs.items()},
        "noise": noise,
        "gains": gains,
    }
