"""Train an expert store larger than the machine's RAM from the disk, and measure it (issue 16).

    python scripts/bench_beyond_ram.py                    # 2,816 experts × 12.6 MB = 33.1 GiB (needs ~45 GB free)
    python scripts/bench_beyond_ram.py --quick --out /tmp/beyond_ram   # seconds (what the test runs)
    python scripts/bench_beyond_ram.py --store-bound      # issue 25: host vs direct vs direct + a 1 GiB host tier

Writes OUT/beyond_ram.json and OUT/README.md (from the JSON); the store goes to --store-dir (default OUT/store) and
is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.beyond_ram import (  # noqa: E402
    BeyondRamConfig,
    StoreBoundConfig,
    run,
    run_store_bound,
    write_page,
    write_store_bound_page,
)
from bench.recipes import given  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None  # tests call main(argv) and keep their own allocator
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, help="number of experts (default 2816)")
    parser.add_argument("--expert-hidden", type=int, help="expert width (default 4096)")
    parser.add_argument("--steps", type=int, help="training steps (default 60; --store-bound: per round, 2)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 16)")
    parser.add_argument("--objective", choices=["exact", "local"])
    parser.add_argument("--store-dir", help="where the store and the disk probe go (default OUT/store)")
    parser.add_argument("--probe-gib", type=float, help="size of the disk-speed probe file (default 8)")
    parser.add_argument("--keep-store", action="store_true", help="do not delete the store at the end")
    parser.add_argument("--out", type=Path, help="default scripts/results/beyond_ram (quick: required)")
    parser.add_argument("--quick", action="store_true", help="a tiny store, 3 steps (for tests)")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (by default the run restarts with MALLOC_MMAP_THRESHOLD_=1048576, "
        "so that freed activation buffers go back to the system)",
    )
    parser.add_argument("--report-only", action="store_true", help="re-render OUT/README.md from its JSON")
    parser.add_argument(
        "--store-bound",
        action="store_true",
        help="the store-bound step instead (issue 25): n = 256 (default), exact, every store of --stores in turn on "
        "the same random bytes; OUT defaults to scripts/results/store_bound",
    )
    parser.add_argument("--stores", nargs="+", choices=["host", "direct", "direct+tier"], help="--store-bound only")
    parser.add_argument("--tier-gib", type=float, help="--store-bound: the host tier of direct+tier (default 1)")
    parser.add_argument("--warmup-steps", type=int, help="--store-bound: steps not counted (default 2)")
    parser.add_argument("--rounds", type=int, help="--store-bound: rounds of --steps per store, in turn (default 3)")
    args = parser.parse_args(argv)
    if args.store_bound:
        store_bound(parser, args, argv)
        return
    out = args.out or Path(__file__).resolve().parent / "results" / "beyond_ram"
    if args.report_only:
        write_page(out)
        return
    if not args.default_malloc and "MALLOC_MMAP_THRESHOLD_" not in os.environ and from_command_line:
        # glibc reads it at start-up: run again with it set
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
        os.execve(sys.executable, [sys.executable, __file__, *argv], env)
    if args.quick and args.out is None:
        parser.error("--quick needs --out (it would overwrite the real results)")
    changes = given(
        num_experts=args.experts,
        expert_hidden=args.expert_hidden,
        steps=args.steps,
        batch_size=args.batch_size,
        objective=args.objective,
        store_dir=args.store_dir,
        probe_bytes=None if args.probe_gib is None else int(args.probe_gib * 2**30),
        keep_store=args.keep_store or None,
    )
    config = BeyondRamConfig.quick(**changes) if args.quick else BeyondRamConfig(**changes)
    store_dir = Path(config.store_dir) if config.store_dir else out / "store"
    needed = config.num_experts * (3 * (2 * config.d_model * config.expert_hidden + config.expert_hidden))
    needed = needed * 4 + config.probe_bytes
    store_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store_dir).free
    if free < needed * 1.1:
        parser.error(
            f"{store_dir} has {free / 1e9:.1f} GB free; the store and the probe need about {needed / 1e9:.1f} GB"
        )
    run(config, out, command=shlex.join(["python", "scripts/bench_beyond_ram.py", *argv]))


def store_bound(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    out = args.out or Path(__file__).resolve().parent / "results" / "store_bound"
    if args.report_only:
        write_store_bound_page(out)
        return
    if args.quick and args.out is None:
        parser.error("--quick needs --out (it would overwrite the real results)")
    changes = given(
        num_experts=args.experts,
        expert_hidden=args.expert_hidden,
        steps=args.steps,
        batch_size=args.batch_size,
        store_dir=args.store_dir,
        stores=None if args.stores is None else tuple(args.stores),
        host_tier_bytes=None if args.tier_gib is None else int(args.tier_gib * 2**30),
        warmup_steps=args.warmup_steps,
        rounds=args.rounds,
    )
    config = StoreBoundConfig.quick(**changes) if args.quick else StoreBoundConfig(**changes)
    run_store_bound(config, out, command=shlex.join(["python", "scripts/bench_beyond_ram.py", *argv]))


if __name__ == "__main__":
    main()
