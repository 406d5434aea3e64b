"""The quickstart run for PragnosiaLM, GlobalMoE and DenseLM: wall time, tokens/s, val bpb before and after.

    python scripts/bench_quickstart.py [--config configs/quickstart.yaml] [--models pragnosia global dense]
        [--max-steps N] [--out scripts/results/quickstart]

Each model trains on the config's data, trainer settings and seed; GlobalMoE and DenseLM keep the keys of
``model.init_args`` they accept (same widths and active parameters). Writes ``quickstart.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import yaml

from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM
from pragnosia_pl.cli import run_cli

MODELS = {"pragnosia": PragnosiaLM, "global": GlobalMoE, "dense": DenseLM}


def model_config(config: dict, model_class: type) -> dict:
    accepted = inspect.signature(model_class.__init__).parameters
    init_args = {k: v for k, v in config["model"]["init_args"].items() if k in accepted}
    return {"class_path": f"pragnosia_pl.{model_class.__name__}", "init_args": init_args}


def run(config: dict, name: str, out: Path) -> dict:
    config = json.loads(json.dumps(config))
    config["model"] = model_config(config, MODELS[name])
    root = str(out / name)
    config["trainer"]["default_root_dir"] = root
    config["trainer"]["logger"]["init_args"]["save_dir"] = root
    cli = run_cli(args=config, run=False)
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    steps = cli.trainer.global_step
    tokens = steps * cli.datamodule.hparams.batch_size * cli.datamodule.hparams.block_size
    return {
        "model": MODELS[name].__name__,
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "val_bpb_before": before["val/bpb"],
        "val_bpb_after": after["val/bpb"],
        "per_domain_after": {k: v for k, v in after.items() if k.startswith("val/bpb/")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("scripts/results/quickstart"))
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    if args.max_steps:
        config["trainer"]["max_steps"] = args.max_steps
    results = [run(config, name, args.out) for name in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quickstart.json").write_text(json.dumps(results, indent=2))
    lines = [
        "| model | steps | wall time (s) | tokens/s | val bpb before | val bpb after | after, per domain |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        domains = ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in r["per_domain_after"].items())
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['seconds']:.0f} | {r['tokens_per_s']:,.0f} "
            f"| {r['val_bpb_before']:.2f} | {r['val_bpb_after']:.2f} | {domains} |"
        )
    (args.out / "quickstart.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
