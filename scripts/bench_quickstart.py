"""The quickstart run for PragnosiaLM, GlobalMoE and DenseLM: wall time, tokens/s, val bpb before and after.

    python scripts/bench_quickstart.py [--config configs/quickstart.yaml] [--models pragnosia global dense]
        [--max-steps N] [--out scripts/results/quickstart]
    python scripts/bench_quickstart.py --report-only   # re-render scripts/results/quickstart/README.md only

Each model trains on the config's data, trainer settings and seed; GlobalMoE and DenseLM keep the keys of
``model.init_args`` they accept (same widths and active parameters). Writes ``quickstart.json`` and ``.md``, then
re-renders the results page of OUT if it is one.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import pages  # noqa: E402
from bench.quickstart import MODELS, run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("scripts/results/quickstart"))
    parser.add_argument("--report-only", action="store_true", help="re-render OUT's results page only; run nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        print(pages.write(args.out))
        return
    config = yaml.safe_load(args.config.read_text())
    if args.max_steps:
        config["trainer"]["max_steps"] = args.max_steps
    command = shlex.join(["python", "scripts/bench_quickstart.py", *(sys.argv[1:] if argv is None else argv)])
    run(config, args.models, args.out, command)
    print((args.out / "quickstart.md").read_text())
    if pages.page_folder(args.out) is not None:
        print(f"wrote {pages.write(pages.page_folder(args.out))}")


if __name__ == "__main__":
    main()
