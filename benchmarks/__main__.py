"""`python -m benchmarks <name> [--smoke] [--out DIR] [--data DIR] [--repeats N] [--set key=value ...]
[--sizes N,N,...] [--arms NAME,...]`.

Each benchmark module has `SETTINGS` ({"full": ..., "smoke": ...}) and `run(opts) -> result payload`; this
file only parses the options, runs it and writes `<out>/<name>.json`. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from typing import Any

import yaml

from benchmarks._common import DEFAULT_DATA, RESULTS_DIR, Options, write_result

BENCHMARKS = (
    "train_throughput",
    "linear_probe",
    "inference",
    "ingest",
    "ingest_photos",
    "fashion_mnist",
    "transfer_vs_scratch",
    "pipeline_overhead",
    "openvino_vs_ort",
    "distill",
    "audit_label_noise",
    "audit_near_duplicates",
    "audit_scale",
    "scale",
    "trust",
    "int8_cpus",
    "multilabel",
    "colour_recipe",
    "budget_recipe",
)


def run(name: str, opts: Options, **extra: Any) -> Path:
    """Run benchmark `name` and write its result; returns the result file. `extra`: options only that
    benchmark takes (`sizes` for scale)."""
    module = importlib.import_module(f"benchmarks.{name}")
    return write_result(opts.out_dir, module.run(opts, **extra))


def _sizes(text: str) -> list[int]:
    """'10000,100000' -> [10000, 100000]."""
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected image counts, e.g. 10000,100000") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive image counts, e.g. 10000,100000")
    return sizes


_ARMED = ("colour_recipe", "budget_recipe")  # the benchmarks that compare arms (`--arms`)


def _arms(name: str, text: str) -> list[str]:
    """'trivial augment,crop_pct: 1.0' -> benchmark `name`'s arms of those names."""
    arms_of = importlib.import_module(f"benchmarks.{name}").ARMS
    arms = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [arm for arm in arms if arm not in arms_of]
    if unknown or not arms:
        raise SystemExit(f"--arms {text!r}: expected arms of {name} among {', '.join(arms_of)}")
    return arms


def _overrides(pairs: list[str]) -> dict[str, Any]:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected key=value, e.g. --set train.epochs=3")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument(
        "--smoke", action="store_true", help="seconds-long run on tiny data (keeps it working)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="Fashion-MNIST PNG root with train/ and test/ (made when missing)")  # fmt: skip
    parser.add_argument("--repeats", type=int, help="repeats (default: the benchmark's own)")
    parser.add_argument("--workdir", type=Path, help="keep the benchmark's project folder under DIR")
    parser.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override (value read as YAML), as `dvc exp run -S`")  # fmt: skip
    parser.add_argument("--project", type=Path,
                        help="pipeline_overhead, int8_cpus: measure this reproduced DVC project")  # fmt: skip
    parser.add_argument("--sizes", type=_sizes, help="scale only: image counts, e.g. 10000,100000")
    parser.add_argument("--arms", help=f"{', '.join(_ARMED)} only: the arms to run besides `default`, "
                        "comma-separated (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.sizes and args.name != "scale":
        parser.error("--sizes is an option of the scale benchmark only")
    if args.arms and args.name not in _ARMED:
        parser.error(f"--arms is an option of the {' and '.join(_ARMED)} benchmarks only")
    arms = _arms(args.name, args.arms) if args.arms else None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = Options(
        args.smoke, args.out, args.data, args.repeats, args.workdir, _overrides(args.overrides), args.project
    )
    extra = {key: value for key, value in (("sizes", args.sizes), ("arms", arms)) if value}
    print(f"{args.name}: {run(args.name, opts, **extra)}")


if __name__ == "__main__":
    main()
