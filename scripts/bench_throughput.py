#!/usr/bin/env python
"""Throughput benchmark (issue 6): training tokens/s per expert store and cache size, and GlobalMoE.

python scripts/bench_throughput.py                      # full run, writes scripts/results/throughput/
python scripts/bench_throughput.py --quick --out /tmp/t # seconds: tiny widths, n=8
python scripts/bench_throughput.py --profile 64 disk 2  # torch.profiler table of one contender's steps, and its JSON
python scripts/bench_throughput.py --report-only        # re-render scripts/results/throughput/README.md, run nothing

A run (or a profile) into a results page's folder, or a folder inside one, re-renders that page from its JSON.
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
from bench.recipes import given  # noqa: E402
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
        help="profile one PragnosiaLM contender instead: OUT/profile_nN_STORE_cacheCACHE.{txt,json}",
    )
    parser.add_argument("--report-only", action="store_true", help="re-render OUT's results page only; run nothing")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        print(pages.write(out))
        return
    command = shlex.join(["python", "scripts/bench_throughput.py", *sys.argv[1:]])
    overrides = given(
        num_experts=args.num_experts,
        stores=args.stores,
        cache_factors=args.cache_factors,
        rounds=args.rounds,
        window_steps=args.window_steps,
    )
    if args.threads is not None:
        overrides["threads"] = args.threads or None
    config = ThroughputConfig.quick(**overrides) if args.quick else ThroughputConfig(**overrides)
    if args.profile:
        n, store, cache = args.profile
        table, report = profile_step(config, int(n), store, int(cache), command=command)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_n{n}_{store}_cache{cache}.txt").write_text(table + "\n")
        (out / f"profile_n{n}_{store}_cache{cache}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(table)
    else:
        run_throughput(config, out, command=command)
        print((out / "throughput.md").read_text())
    page = pages.page_folder(out)
    if page is not None:
        print(f"wrote {pages.write(page)}")


if __name__ == "__main__":
    main()
