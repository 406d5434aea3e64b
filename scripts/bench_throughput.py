#!/usr/bin/env python
"""Throughput benchmark (issue 6): training tokens/s per expert store and cache size, and GlobalMoE.

python scripts/bench_throughput.py                      # full run, writes scripts/results/throughput/
python scripts/bench_throughput.py --quick --out /tmp/t # seconds: tiny widths, n=8
python scripts/bench_throughput.py --profile 64 disk 2  # torch.profiler table of one contender's steps
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.throughput import (  # noqa: E402
    STORE_KINDS,
    ThroughputConfig,
    profile_step,
    run_throughput,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny widths, n=8, one timed round (what the test runs)")
    parser.add_argument("--out", default="scripts/results/throughput", help="output folder")
    parser.add_argument("--num-experts", type=int, nargs="+", help="n values (default 8 64 512)")
    parser.add_argument("--stores", nargs="+", choices=STORE_KINDS)
    parser.add_argument("--cache-factors", type=int, nargs="+", help="expert_cache as multiples of S (default 1 4)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--window-steps", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1; 0: torch's default)")
    parser.add_argument(
        "--profile",
        nargs=3,
        metavar=("N", "STORE", "CACHE"),
        help="print a torch.profiler table of one PragnosiaLM contender instead",
    )
    args = parser.parse_args()
    overrides = {
        key: value
        for key, value in dict(
            num_experts=args.num_experts,
            stores=args.stores,
            cache_factors=args.cache_factors,
            rounds=args.rounds,
            window_steps=args.window_steps,
        ).items()
        if value is not None
    }
    if args.threads is not None:
        overrides["threads"] = args.threads or None
    config = ThroughputConfig.quick(**overrides) if args.quick else ThroughputConfig(**overrides)
    if args.profile:
        n, store, cache = args.profile
        print(profile_step(config, int(n), store, int(cache)))
        return
    run_throughput(config, args.out)
    print(open(os.path.join(args.out, "throughput.md")).read())


if __name__ == "__main__":
    main()
