"""Validation bpb, tokens/s and per-step peak memory against the number of experts (issue 16).

    python scripts/bench_scaling.py                      # n = 8, 64, 512, 4096 on CPU (60-100 min, resumable)
    python scripts/bench_scaling.py --accelerator gpu    # d = 512, GlobalMoE up to n = 4096
    python scripts/bench_scaling.py --quick --out /tmp/scaling   # seconds (what the test runs)
    python scripts/bench_scaling.py --estimate 12        # time each run for 12 steps, print the predicted minutes

Writes OUT/scaling.json, OUT/README.md (its table), OUT/scaling.png and OUT/curves.png; a run already in
OUT/scaling.json is skipped, so the same command resumes an interrupted benchmark.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.recipes import given  # noqa: E402
from bench.scaling import MODELS, ScalingConfig, estimate, run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", help="n values (default 8 64 512 4096)")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: all")
    parser.add_argument("--global-moe-max", type=int, help="largest n for GlobalMoE (default 512; gpu: 4096)")
    parser.add_argument("--steps", type=int, help="training steps of every run")
    parser.add_argument("--eval-every", type=int, help="steps between validations")
    parser.add_argument("--limit-val-batches", type=int, help="validation batches (a fixed set)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--data", help="the domain's text: a TextDomains preset, path or glob (default python-code)")
    parser.add_argument("--max-bytes", type=int, help="bytes of data read (default 16,000,000; 0: all)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per run (default 1)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="gpu: the d = 512 size")
    parser.add_argument("--out", type=Path, help="default scripts/results/scaling (quick: required)")
    parser.add_argument("--quick", action="store_true", help="width 16, n = 8 and 64, 6 steps (for tests)")
    parser.add_argument("--estimate", type=int, metavar="STEPS", help="probe each run for STEPS steps and exit")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick needs --out (it would overwrite the real results)")

    changes = given(
        num_experts=args.experts,
        models=args.models,
        global_moe_max=args.global_moe_max,
        steps=args.steps,
        eval_every=args.eval_every,
        limit_val_batches=args.limit_val_batches,
        batch_size=args.batch_size,
        block_size=args.block_size,
        threads=args.threads,
        seed=args.seed,
    )
    if args.data is not None:
        changes["domains"] = {"code": args.data}
    if args.max_bytes is not None:
        changes["max_bytes_per_domain"] = args.max_bytes or None
    if args.quick:
        config = ScalingConfig.quick(accelerator=args.accelerator, **changes)
    elif args.accelerator == "gpu":
        config = ScalingConfig.gpu(**changes)
    else:
        config = ScalingConfig(**changes)
    out = args.out or Path(__file__).resolve().parent / "results" / "scaling"
    if args.estimate:
        result = estimate(config, args.estimate)
        print(json.dumps(result, indent=2))
        print(f"estimated total: {result['total_minutes']:.0f} min")
        return
    run(config, out, command=shlex.join(["python", "scripts/bench_scaling.py", *argv]))
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
