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

import shutil
from pathlib import Path
from typing import Any

from benchmarks._common import (
    ARM_FIGURES,
    SMOKE_PARAMS,
    Options,
    ensure_debian_package,
    judge_arms,
    machine,
    prepare_splits,
    project_params,
    result,
    run_arms,
    slug,
    timed,
    workdir,
)
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
            runs = run_arms(root / name, base, chosen, seeds)
            counts = {key: split[key] for key in ("train", "val", "test")}
            counts["classes"] = len(read_json(base.paths.details("split"))["classes"])
            sets[name] = judge_arms(runs) | {"split": counts, "prepare_seconds": seconds}
    ratios = {
        f"{name}: {arm} minus default, {figure}": judged["gains"][arm][figure]["median"]
        for name, judged in sets.items()
        for arm in chosen
        if arm != "default"
        for figure in ARM_FIGURES
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
        folder = target / slug(group)
        folder.mkdir(parents=True, exist_ok=True)
        for text in emoji:
            canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
            canvas.save(folder / ("-".join(f"{ord(c):x}" for c in text) + ".png"))
    return target
