"""Step time and store reads of the engine's recipes against GlobalMoE and DenseLM (issue 15).

    python scripts/bench_engine.py [--experts 8 64 512 4096] [--rounds 3] [--out scripts/results/engine] [--quick]
    python scripts/bench_engine.py --precisions 32-true bf16-mixed   # every recipe at both, in the same rounds
    python scripts/bench_engine.py --report-only --out scripts/results/engine/batch64   # re-render a page

Writes OUT/engine.json, OUT/README.md (the table) and OUT/step_time.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.engine import DEFAULT_RECIPES, PRECISIONS, RECIPES, EngineBenchConfig, run, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 512, 4096])
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=list(RECIPES))
    parser.add_argument("--global-moe-max", type=int, default=512, help="largest n for GlobalMoE")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["32-true"],
        choices=PRECISIONS,
        help="Trainer precisions every contender runs at, interleaved in the same rounds",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=None, help="model.micro_batch of every PragnosiaLM")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-before", type=int, default=60, help="steps each contender trains before timing")
    parser.add_argument("--window-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--router",
        choices=["product", "flat"],
        default=None,
        help="every model's router (default: the configs'; GlobalMoE takes configs/streamed.yaml's)",
    )
    parser.add_argument("--out", type=Path, default=Path("scripts/results/engine"))
    parser.add_argument("--quick", action="store_true", help="tiny widths, n = 8, one round (for tests)")
    parser.add_argument("--report-only", action="store_true", help="re-render OUT's page from OUT/engine.json")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(json.loads((args.out / "engine.json").read_text()), args.out)
        print((args.out / "README.md").read_text())
        return
    options = dict(
        num_experts=tuple(args.experts),
        recipes=tuple(args.recipes),
        global_moe_max=args.global_moe_max,
        precisions=tuple(args.precisions),
        batch_size=args.batch_size,
        rounds=args.rounds,
        train_before=args.train_before,
        window_steps=args.window_steps,
        threads=args.threads,
        overrides={
            **({} if args.router is None else {"router": args.router}),
            **({} if args.micro_batch is None else {"micro_batch": args.micro_batch}),
        },
    )
    if args.quick:
        options.update(
            num_experts=(8,),
            rounds=1,
            window_steps=2,
            warmup_rounds=0,
            train_before=2,
            batch_size=2,
            block_size=32,
            max_bytes_per_domain=60_000,
            overrides={**options["overrides"], "d_model": 16, "n_heads": 2, "n_shared_layers": 1},
        )
    command = shlex.join(["python", "scripts/bench_engine.py", *(sys.argv[1:] if argv is None else argv)])
    run(EngineBenchConfig(**options), args.out, command=command)
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
