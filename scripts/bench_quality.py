#!/usr/bin/env python
"""Quality benchmark (issue 6): PragnosiaLM vs GlobalMoE vs DenseLM, final val bpb and learning curves.

python scripts/bench_quality.py                      # full run, writes scripts/results/quality/
python scripts/bench_quality.py --quick --out /tmp/q # seconds: tiny widths, 20 steps, n=8
python scripts/bench_quality.py --num-experts 8 --steps 600 --pragnosia '{"local_lr": 0.1}'
python scripts/bench_quality.py --report-only          # re-render scripts/results/quality/README.md, run nothing

The plain PragnosiaLM run is configs/quickstart.yaml's model; the presets (--variants exact bounded local) are
configs/streamed.yaml and configs/bounded.yaml with the overrides listed in bench/quality.py PRESETS. A run into a
folder of scripts/results/quality re-renders that page from the JSON there.
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

from bench import pages  # noqa: E402
from bench.quality import (  # noqa: E402
    MODEL_KINDS,
    PRESET_VARIANTS,
    QualityConfig,
    parse_variants,
    run_quality,
)
from bench.recipes import given  # noqa: E402


def variants_or_exit(items: list[str], parser: argparse.ArgumentParser) -> dict:
    try:
        return parse_variants(items)
    except ValueError as error:
        parser.error(str(error))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny widths, 20 steps, one n (what the test runs)")
    parser.add_argument("--out", default="scripts/results/quality", help="output folder")
    parser.add_argument("--num-experts", type=int, nargs="+", help="n values (default 8 32)")
    parser.add_argument("--models", nargs="+", choices=MODEL_KINDS, help="which models run (default all)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--max-bytes-per-domain", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--time-budget-min", type=float, help="cut steps to fit this many minutes (0: no cut)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PragnosiaLM run (variants only)")
    parser.add_argument("--accelerator", help="Lightning accelerator of every run (default cpu; gpu to use a GPU)")
    parser.add_argument("--pragnosia", type=json.loads, help="extra PragnosiaLM kwargs as JSON")
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME_OR_JSON",
        help=f"more PragnosiaLM runs: preset names ({', '.join(PRESET_VARIANTS)}) and/or JSON "
        '{name: kwargs} objects, e.g. bounded \'{"adam": {"expert_optimizer": "adam"}}\'; '
        "default: exact local",
    )
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--n-shared-layers", type=int, help="transformer blocks")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--domains", type=json.loads, help='JSON {name: preset or files}, e.g. {"code": "python-code"}')
    parser.add_argument("--store", help="every PragnosiaLM's store (default host)")
    parser.add_argument("--expert-layers", choices=("top", "every_other", "every"), help="every model's placement")
    parser.add_argument("--warmup-steps", type=int, help="warmup then cosine to the last step (default: constant lr)")
    parser.add_argument("--report-only", action="store_true", help="re-render OUT's results page only; run nothing")
    args = parser.parse_args()
    if args.report_only:
        print(pages.write(Path(args.out)))
        return
    overrides = given(
        num_experts=args.num_experts,
        models=args.models,
        steps=args.steps,
        eval_every=args.eval_every,
        max_bytes_per_domain=args.max_bytes_per_domain,
        seed=args.seed,
        pragnosia=args.pragnosia,
        variants=args.variants and variants_or_exit(args.variants, parser),
        accelerator=args.accelerator,
        d_model=args.d_model,
        n_shared_layers=args.n_shared_layers,
        batch_size=args.batch_size,
        domains=args.domains,
        store=args.store,
        expert_layers=args.expert_layers,
        warmup_steps=args.warmup_steps,
    )
    if args.no_plain:
        overrides["plain"] = False
    if args.time_budget_min is not None:
        overrides["time_budget_min"] = args.time_budget_min or None
    config = QualityConfig.quick(**overrides) if args.quick else QualityConfig(**overrides)
    command = shlex.join(["python", "scripts/bench_quality.py", *sys.argv[1:]])
    report = run_quality(config, args.out, command=command)
    print(open(os.path.join(args.out, "quality.md")).read())
    page = pages.page_folder(Path(args.out))
    if page is not None:
        print(f"wrote {pages.write(page)}")
    if not report["runs"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
