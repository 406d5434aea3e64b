#!/usr/bin/env python
"""Continual-learning benchmark (issue 7): domains in sequence, forgetting of PragnosiaLM variants vs baselines.

python scripts/bench_continual.py                       # full run, writes scripts/results/continual/
python scripts/bench_continual.py --quick --out /tmp/c  # seconds: tiny widths, 4 steps per stage
python scripts/bench_continual.py --variants "experts_per_domain: 8" --baselines global_moe
python scripts/bench_continual.py --variant-json '{"m=4": {"experts_per_domain": 4}}'
python scripts/bench_continual.py --report-only          # re-render README.md and heatmaps.png from the JSON

Writes continual.json, then README.md (the results page) and heatmaps.png from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.continual import BASELINES, ContinualConfig, run_continual, write_report  # noqa: E402
from bench.recipes import given  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny widths, 4 steps per stage (what the test runs)")
    parser.add_argument("--out", default="scripts/results/continual", help="output folder")
    parser.add_argument("--report-only", action="store_true", help="only re-render the page from OUT/continual.json")
    parser.add_argument(
        "--variants", nargs="*", help="PragnosiaLM variants, by label (default: all; none: only --variant-json)"
    )
    parser.add_argument(
        "--variant-json", type=json.loads, help="extra variants: {label: overrides of configs/continual.yaml's model}"
    )
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, help="baselines to run (default: all)")
    parser.add_argument("--schedule", nargs="+", help="domains in training order (default: every domain once)")
    parser.add_argument("--steps-per-stage", type=int)
    parser.add_argument("--batches-per-epoch", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--num-experts", type=int)
    parser.add_argument("--max-bytes-per-domain", type=int)
    parser.add_argument("--seed", type=int)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(json.loads(Path(args.out, "continual.json").read_text()), Path(args.out))
        return
    overrides = given(
        baselines=args.baselines,
        schedule=args.schedule,
        steps_per_stage=args.steps_per_stage,
        batches_per_epoch=args.batches_per_epoch,
        d_model=args.d_model,
        num_experts=args.num_experts,
        max_bytes_per_domain=args.max_bytes_per_domain,
        seed=args.seed,
    )
    config = ContinualConfig.quick(**overrides) if args.quick else ContinualConfig(**overrides)
    variants = dict(config.pragnosia_variants)
    if args.variants is not None:
        missing = [name for name in args.variants if name not in variants]
        if missing:
            parser.error(f"unknown --variants {missing}; known: {list(variants)}")
        variants = {name: variants[name] for name in args.variants}
    variants.update(args.variant_json or {})
    config.pragnosia_variants = variants
    if config.joint_variant not in variants:
        config.joint_variant = None
    run_continual(config, args.out, command=shlex.join(["python", "scripts/bench_continual.py", *argv]))
    print(Path(args.out, "README.md").read_text())


if __name__ == "__main__":
    main()
