"""Peak memory per training step against the number of experts: PragnosiaLM (flat) vs GlobalMoE (growing).

    python scripts/prove_constant_memory.py [--experts 8 16 ... 1024] [--steps 50] [--warmup 10] [--out DIR]
        [--store disk|host] [--baseline-max-experts N] [--batch-size B] [--per-token] [--pragnosia JSON] [--quick]
    python scripts/prove_constant_memory.py --report-only [--out scripts/results/constant_memory]

Each configuration runs in its own process. Writes DIR/constant_memory.{json,md,png}; exit code 0 only when
every check passes (CV < 2% within runs, max/min of mean memory across n ≤ 1.05, model memory ≤ 1.2 × the
analytic floor, baseline growing with n). Then re-renders the results page of DIR, or of the page folder DIR is
in (constant_memory, store_memory, gpu), from the JSON there; --report-only does only that.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import pages  # noqa: E402
from bench.constant_memory import RunSpec, markdown, run_isolated, write_report  # noqa: E402
from bench.report import load_average  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("scripts/results/constant_memory"))
    parser.add_argument("--store", choices=["disk", "host"], default=None, help="default: disk on CPU, host on CUDA")
    parser.add_argument("--baseline-max-experts", type=int, default=256, help="largest n for GlobalMoE (0: none)")
    parser.add_argument(
        "--malloc-trim-threshold",
        type=int,
        default=4 * 2**20,
        help="glibc MALLOC_TRIM_THRESHOLD_ for each run, in bytes (-1: the allocator's default)",
    )
    parser.add_argument("--router", choices=["product", "flat"], default="product", help="PragnosiaLM's router")
    parser.add_argument(
        "--per-token",
        action="store_true",
        help="PragnosiaLM routes each token to its own top-k of all n experts (expert_slots = n), "
        "streamed through --expert-cache slots",
    )
    parser.add_argument("--expert-cache", type=int, default=2, help="PragnosiaLM's device slots (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences of 128 bytes per step (default 16)")
    parser.add_argument("--pragnosia", type=json.loads, default={}, help="further PragnosiaLM kwargs as JSON")
    parser.add_argument("--precision", default="32-true", help="trainer.precision of every run (e.g. bf16-mixed)")
    parser.add_argument("--quick", action="store_true", help="tiny widths, few steps, two n (for tests)")
    parser.add_argument("--report-only", action="store_true", help="re-render the results page only; run nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        print(pages.write(args.out))
        return 0
    if min(args.experts) < 2:
        parser.error("--experts: every n must be ≥ 2 (k = 2)")

    import torch

    store = args.store or ("host" if torch.cuda.is_available() else "disk")
    trim = None if args.malloc_trim_threshold < 0 else args.malloc_trim_threshold
    shared = dict(
        steps=args.steps,
        warmup=args.warmup,
        store=store,
        malloc_trim_threshold=trim,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    if args.quick:
        shared.update(d_model=32, n_shared_layers=1, n_heads=2, batch_size=4, block_size=32, max_bytes=200_000)
    pragnosia = {"expert_slots": None, **args.pragnosia} if args.per_token else args.pragnosia
    ours = dict(router=args.router, expert_cache=args.expert_cache, pragnosia=pragnosia)
    specs = [RunSpec("pragnosia", n, **ours, **shared) for n in sorted(args.experts)]
    specs += [RunSpec("global", n, **shared) for n in sorted(args.experts) if n <= args.baseline_max_experts]

    command = shlex.join(["python", "scripts/prove_constant_memory.py", *(sys.argv[1:] if argv is None else argv)])
    started, load = time.time(), load_average()
    runs = []
    with tqdm(specs, desc="constant-memory runs", unit="run", file=sys.stdout) as bar:
        for spec in bar:
            bar.set_postfix_str(f"{spec.model} n={spec.num_experts}")
            start = time.perf_counter()
            result = run_isolated(spec)
            runs.append(result)
            tqdm.write(
                f"{spec.model:>9} n={spec.num_experts:<5} mean peak {result.summary['mean_bytes'] / 2**20:8.1f} "
                f"MiB  cv {100 * result.summary['cv']:.2f}%  ({time.perf_counter() - start:.0f} s)"
            )
    report = write_report(runs, args.out, command, started, load)
    print(markdown(report))
    print(f"wrote {args.out}/constant_memory.json, .md and .png")
    page = pages.page_folder(args.out)
    if page is not None:
        pages.write(page)
        print(f"wrote {page}/README.md")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
