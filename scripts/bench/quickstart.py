"""The quickstart run for PragnosiaLM, GlobalMoE and DenseLM: wall time, tokens/s, val bpb before and after.

Each model trains on the config's data, trainer settings and seed; GlobalMoE and DenseLM keep the keys of
``model.init_args`` they accept (same widths and active parameters).
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

from bench.report import load_average, markdown_table, provenance

MODELS = ("pragnosia", "global", "dense")


def model_classes() -> dict[str, type]:
    from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM

    return {"pragnosia": PragnosiaLM, "global": GlobalMoE, "dense": DenseLM}


def model_config(config: dict, model_class: type) -> dict:
    accepted = inspect.signature(model_class.__init__).parameters
    init_args = {k: v for k, v in config["model"]["init_args"].items() if k in accepted}
    return {"class_path": f"pragnosia_pl.{model_class.__name__}", "init_args": init_args}


def train(config: dict, name: str, out: Path) -> dict[str, Any]:
    """Train model ``name`` on the config; its steps, wall time, tokens/s and val bpb before and after."""
    from pragnosia_pl.cli import run_cli

    model_class = model_classes()[name]
    config = json.loads(json.dumps(config))
    config["model"] = model_config(config, model_class)
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
        "model": model_class.__name__,
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "val_bpb_before": before["val/bpb"],
        "val_bpb_after": after["val/bpb"],
        "per_domain_after": {k: v for k, v in after.items() if k.startswith("val/bpb/")},
    }


def run(config: dict, models: list[str], out: Path, command: str = "") -> dict[str, Any]:
    """Train every model of ``models`` and write ``quickstart.json`` and ``quickstart.md`` to ``out``."""
    started, load = time.time(), load_average()
    results = [train(config, name, out) for name in models]
    report = {
        "benchmark": "quickstart",
        **provenance(command, load),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "config": config,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quickstart.md").write_text("\n".join(markdown(report)) + "\n")
    return report


def markdown(report: dict[str, Any]) -> list[str]:
    """The config's shape and data, and one row per model."""
    config = report["config"]
    data, trainer = config["data"]["init_args"], config["trainer"]
    domains = ", ".join(f"{name} ({source})" for name, source in data["domains"].items())
    rows = []
    for r in report["results"]:
        domains_after = ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in r["per_domain_after"].items())
        rows.append(
            [r["model"], r["steps"], f"{r['seconds']:.0f}", f"{r['tokens_per_s']:,.0f}"]
            + [f"{r['val_bpb_before']:.2f}", f"{r['val_bpb_after']:.2f}", domains_after]
        )
    header = ["model", "steps", "wall time (s)", "tokens/s", "val bpb before", "val bpb after", "after, per domain"]
    return [
        f"`configs/quickstart.yaml` as run: {trainer['max_steps']} steps of {data['batch_size']} × "
        f"{data['block_size']} bytes, domains {domains} mixed, at most {data['max_bytes_per_domain']:,} bytes each; "
        f"validation on {trainer['limit_val_batches']} held-out batches of each domain; seed "
        f"{config.get('seed_everything')}; one run per model.",
        "",
        *markdown_table(header, rows, align="lrrrrrl"),
    ]
