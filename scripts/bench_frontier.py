"""What a fixed memory buys (issue 23): val bpb against peak memory and wall time, at equal tokens and schedule.

    python scripts/bench_frontier.py                     # the CPU set: T = 25 M tokens (resumable over sessions)
    python scripts/bench_frontier.py --accelerator gpu   # d = 512, T = 201 M tokens, GlobalMoE up to n = 4096
    python scripts/bench_frontier.py --quick --out /tmp/frontier   # seconds (what the test runs)
    python scripts/bench_frontier.py --estimate 6        # time each run for 6 steps, print the predicted minutes
    python scripts/bench_frontier.py --report-only       # re-render OUT's page and plots from OUT/frontier.json

Writes OUT/frontier.json, OUT/README.md (its table and goals), OUT/frontier.png and OUT/curves.png. A finished run
is never run again; a run stopped midway (a session's end, --timeout-min, a crash) continues from its last
checkpoint under OUT/.runs/ when the same command runs again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.frontier import FrontierConfig, estimate, run  # noqa: E402
from bench.frontier_page import MODELS, write_report  # noqa: E402
from bench.recipes import given  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", help="n of exact (default 8 64 512 4096)")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: all")
    parser.add_argument("--global-moe-max", type=int, help="largest n for GlobalMoE (default 512; gpu: 4096)")
    parser.add_argument("--local-experts", type=int, nargs="+", help="n of local (default 64 512)")
    parser.add_argument("--dense-widths", type=int, nargs="+", help="d_model of each DenseLM (default 128 192 256)")
    parser.add_argument("--granularity", type=int, help="G of the fine-grained recipe (default 8)")
    parser.add_argument("--fine-experts", type=int, help="its n (default: the largest n × G, at most 65,536)")
    parser.add_argument("--steps", type=int, help="training steps of every run (default 763: 25 M tokens)")
    parser.add_argument("--lr-warmup-steps", type=int, help="warmup steps before the cosine (default 40)")
    parser.add_argument("--eval-every", type=int, help="steps between validations")
    parser.add_argument("--limit-val-batches", type=int, help="validation batches (a fixed set)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--checkpoint-every", type=int, help="steps between a run's checkpoints (default 50)")
    parser.add_argument("--data", help="the domain's text: a TextDomains preset, path or glob (default python-code)")
    parser.add_argument("--max-bytes", type=int, help="bytes of data read (default 32,000,000; 0: all)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per run (default 1)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--parallel", type=int, help="runs at a time, each its own process (default 1)")
    parser.add_argument("--timeout-min", type=float, help="stop a run after this many minutes (it resumes later)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="gpu: the d = 512 size")
    parser.add_argument("--out", type=Path, help="default scripts/results/frontier (quick: required)")
    parser.add_argument("--quick", action="store_true", help="width 16, n = 8 and 64, 6 steps (for tests)")
    parser.add_argument("--estimate", type=int, metavar="STEPS", help="probe each run for STEPS steps and exit")
    parser.add_argument("--report-only", action="store_true", help="re-render OUT's page and plots; run nothing")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick needs --out (it would overwrite the real results)")
    out = args.out or Path(__file__).resolve().parent / "results" / "frontier"
    if args.report_only:
        write_report(json.loads((out / "frontier.json").read_text()), out)
        print((out / "README.md").read_text())
        return

    changes = given(
        num_experts=args.experts,
        models=args.models,
        global_moe_max=args.global_moe_max,
        local_num_experts=args.local_experts,
        dense_widths=args.dense_widths,
        granularity=args.granularity,
        fine_num_experts=args.fine_experts,
        steps=args.steps,
        lr_warmup_steps=args.lr_warmup_steps,
        eval_every=args.eval_every,
        limit_val_batches=args.limit_val_batches,
        batch_size=args.batch_size,
        block_size=args.block_size,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
        seed=args.seed,
        timeout_s=None if args.timeout_min is None else 60 * args.timeout_min,
        parallel=args.parallel,
    )
    if args.data is not None:
        changes["domains"] = {"code": args.data}
    if args.max_bytes is not None:
        changes["max_bytes_per_domain"] = args.max_bytes or None
    if args.quick:
        config = FrontierConfig.quick(accelerator=args.accelerator, **changes)
    elif args.accelerator == "gpu":
        config = FrontierConfig.gpu(**changes)
    else:
        config = FrontierConfig(**changes)
    if args.estimate:
        result = estimate(config, args.estimate)
        print(json.dumps(result, indent=2))
        print(f"estimated total: {result['total_minutes']:.0f} min")
        return
    run(config, out, command=shlex.join(["python", "scripts/bench_frontier.py", *argv]))
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
