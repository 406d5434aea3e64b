"""Continual learning across domains (issue 7): how much each model forgets, trained on domains in sequence.

Every model trains on the same schedule of domains (``steps_per_stage`` batches each, no replay), with the same
batches, tokens and seed, under ``callbacks.DomainSwitcher``, which records the matrix ``R[i][j]`` of validation
bits per byte on domain ``j`` after stage ``i`` (and before training) and tells the module of each switch
(``on_domain_switch``). The models: ``PragnosiaLM`` as ``configs/continual.yaml`` trains it (``experts_per_domain:
8``, :mod:`pragnosia_pl.consolidation`) and the same config without consolidation (``experts_per_domain: null``),
each a ``pragnosia_variants`` entry of overrides on the config's model section; ``GlobalMoE`` and ``DenseLM``
(naive sequential fine-tuning); and a joint ``PragnosiaLM`` without consolidation trained on all domains mixed for
the same number of steps (a reference; its matrix rows are points of one mixed run, so it has no forgetting
figures).

Per model: the matrix, average final bpb, BWT, average forgetting, plasticity (bpb on each domain right after
its own stage), FWT. Against ``GlobalMoE`` (issue 7's goals): forgetting ≤ 5% of its forgetting, final average
bpb ≤ 0.8 × its own, and plasticity within 10% of its plasticity on every domain.

The report, ``continual.json``, holds every number, the config, the machine, the date and the command;
``README.md`` and the heat maps are written from it, so text and numbers cannot drift.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.recipes import method_options, shared_options, text_domains
from bench.report import load_average, markdown_table, page_header, pyplot, report_header, run_lines

BASELINES = ("global_moe", "dense", "joint")
LICENSES_DIR = "/usr/share/common-licenses"
GOALS = {"forgetting_ratio": 0.05, "final_ratio": 0.8, "plasticity_ratio": 1.10}
RECIPE_FILE = "continual.yaml"

# Each variant overrides the model section of configs/continual.yaml (its method options: bench.recipes).
PLAIN = "experts_per_domain: null"
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    PLAIN: {"experts_per_domain": None},  # one set of experts and shared parts: DESIGN §3 as written
    "experts_per_domain: 8": {},  # the config as shipped
}


def default_domains() -> dict[str, str]:
    """Stdlib code, stdlib docs, and the common licenses where the machine has them (Debian/Ubuntu)."""
    domains = {"code": "stdlib-code", "docs": "stdlib-docs"}
    if os.path.isdir(LICENSES_DIR):
        domains["licenses"] = "licenses"
    return domains


@dataclass
class ContinualConfig:
    """One continual-learning benchmark: the domains and schedule, the shared shape, and which models run.

    Args:
        domains: name -> ``data.domains`` value (preset, path, glob or list).
        schedule: the domains in training order (default: the order of ``domains``); at least two stages.
        steps_per_stage: training batches on each stage's domain.
        batches_per_epoch: batches in a Lightning epoch (``limit_train_batches``); divides ``steps_per_stage``
            and may not exceed a domain's training batches.
        pragnosia_variants: label -> the overrides of ``configs/continual.yaml``'s model section, of each variant
            that runs.
        baselines: which of ``global_moe``, ``dense``, ``joint`` run.
        joint_variant: the ``pragnosia_variants`` entry whose options the joint model uses, without consolidation
            (``None``: the config's).
        val_batches: ``limit_val_batches`` of each evaluation (1.0: the whole validation split of each domain).
        threads: torch CPU threads (``None``: torch's default); one by default, as the quality benchmark.

    Raises:
        ValueError: on an unknown domain, baseline or size; the message names the field.
    """

    domains: dict[str, Any] = field(default_factory=default_domains)
    schedule: list[str] | None = None
    steps_per_stage: int = 300
    batches_per_epoch: int = 100
    d_model: int = 64
    n_shared_layers: int = 2
    n_heads: int = 4
    num_experts: int = 32
    num_active_experts: int = 2
    block_size: int = 128
    batch_size: int = 16
    max_bytes_per_domain: int | None = 1_000_000
    lr: float = 1e-3
    store: str = "host"
    pragnosia_variants: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_VARIANTS))
    baselines: tuple[str, ...] = BASELINES
    joint_variant: str | None = PLAIN
    val_batches: float = 1.0
    seed: int = 0
    threads: int | None = 1
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.schedule = list(self.domains) if self.schedule is None else list(self.schedule)
        self.baselines = tuple(self.baselines)
        unknown = sorted(set(self.schedule) - set(self.domains))
        if unknown:
            raise ValueError(f"schedule names {unknown}, which are not among domains {list(self.domains)}")
        if len(self.schedule) < 2:
            raise ValueError(f"schedule ({self.schedule}) needs at least two stages to measure forgetting")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"baselines ({', '.join(bad)}) must be among: {', '.join(BASELINES)}")
        for key in ("steps_per_stage", "batches_per_epoch", "d_model", "num_experts", "batch_size", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} ({getattr(self, key)}) must be ≥ 1")
        if self.steps_per_stage % self.batches_per_epoch:
            raise ValueError(
                f"steps_per_stage ({self.steps_per_stage}) must be a multiple of batches_per_epoch "
                f"({self.batches_per_epoch})"
            )
        if self.joint_variant is not None and self.joint_variant not in self.pragnosia_variants:
            raise ValueError(
                f"joint_variant ({self.joint_variant!r}) must be one of pragnosia_variants "
                f"{list(self.pragnosia_variants)} or null"
            )

    @property
    def epochs_per_stage(self) -> int:
        return self.steps_per_stage // self.batches_per_epoch

    @classmethod
    def quick(cls, **overrides: Any) -> ContinualConfig:
        """A tiny run (seconds): width 16, one trunk layer, n=8, 4 steps per stage, two variants (m = 2)."""
        options: dict[str, Any] = dict(
            d_model=16,
            n_shared_layers=1,
            n_heads=2,
            num_experts=8,
            block_size=32,
            batch_size=4,
            steps_per_stage=4,
            batches_per_epoch=2,
            max_bytes_per_domain=20_000,
            val_batches=2,
            pragnosia_variants={
                PLAIN: {"experts_per_domain": None},
                "experts_per_domain: 2": {"experts_per_domain": 2},
            },
        )
        options.update(overrides)
        return cls(**options)


@dataclass
class RunPlan:
    """One model of the benchmark: ``kind`` (``pragnosia`` or a baseline) and, for PragnosiaLM, its variant."""

    kind: str
    variant: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "pragnosia":
            return f"PragnosiaLM ({self.variant})"
        if self.kind == "joint":
            return "PragnosiaLM joint (all domains mixed, reference)"
        return {"global_moe": "GlobalMoE (naive sequential)", "dense": "DenseLM (naive sequential)"}[self.kind]

    @property
    def slug(self) -> str:
        if self.kind != "pragnosia":
            return self.kind
        return "pragnosia_" + re.sub(r"[^a-z0-9]+", "_", self.variant.lower()).strip("_")


def plan_runs(config: ContinualConfig) -> list[RunPlan]:
    """GlobalMoE first (every goal is relative to it), the PragnosiaLM variants, then DenseLM and the joint model."""
    runs = [RunPlan("global_moe")] if "global_moe" in config.baselines else []
    runs += [RunPlan("pragnosia", name) for name in config.pragnosia_variants]
    runs += [RunPlan(kind) for kind in ("dense", "joint") if kind in config.baselines]
    return runs


def pragnosia_options(config: ContinualConfig, plan: RunPlan) -> dict[str, Any]:
    """``PragnosiaLM``'s method options of ``plan``: ``configs/continual.yaml``'s, with the variant's overrides (the
    joint model: ``joint_variant``'s, without consolidation)."""
    variant = plan.variant if plan.kind == "pragnosia" else config.joint_variant
    options = {**method_options(RECIPE_FILE), **config.pragnosia_variants.get(variant, {})}
    if plan.kind == "joint":
        options["experts_per_domain"] = None  # one mixed stage: nothing to consolidate
    return options


def build_model(config: ContinualConfig, plan: RunPlan, store_dir: str):
    """The LightningModule of ``plan`` (seed the RNG first: every model starts from the same trunk)."""
    from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM

    common = shared_options(config)
    if plan.kind == "dense":
        return DenseLM(**common)
    if plan.kind == "global_moe":
        return GlobalMoE(**common, num_experts=config.num_experts)
    options = pragnosia_options(config, plan)
    return PragnosiaLM(**common, **options, num_experts=config.num_experts, store=config.store, store_dir=store_dir)


def make_datamodule(config: ContinualConfig, mixed: bool = False):
    """``TextDomains`` over ``config.domains``; ``mixed``: one whose ``set_domain`` keeps every domain active."""
    from pragnosia_pl import TextDomains

    class MixedDomains(TextDomains):
        """Trains on all domains whatever ``set_domain`` asks: the joint reference under the same schedule."""

        def set_domain(self, name: str | None) -> None:
            super().set_domain(None)

    data = text_domains(config, MixedDomains if mixed else None)
    smallest = min(data.num_tokens(d) // (config.block_size * config.batch_size) for d in config.schedule)
    if smallest < config.batches_per_epoch:
        raise ValueError(
            f"batches_per_epoch ({config.batches_per_epoch}) exceeds the {smallest} training batches of the smallest "
            "domain: lower it (stages then last more epochs) or raise max_bytes_per_domain"
        )
    return data


def train_model(
    config: ContinualConfig,
    plan: RunPlan,
    data,
    run_dir: str | Path,
    work_dir: str | Path,
    stop_after_stage: int | None = None,
    ckpt_path: str | None = None,
) -> dict[str, Any]:
    """Train ``plan`` through the schedule (or its first ``stop_after_stage`` stages); return its figures.

    The DomainSwitcher report (``continual.json/md/png``) goes to ``run_dir``; the expert store and the
    checkpoints (``work_dir/checkpoints/last.ckpt``, one per epoch) to ``work_dir``. ``ckpt_path`` resumes.
    """
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks import DomainSwitcher

    seed_everything(config.seed, verbose=False)
    work_dir, run_dir = Path(work_dir), Path(run_dir)
    model = build_model(config, plan, str(work_dir / "store"))
    schedule = [{"domain": domain, "epochs": config.epochs_per_stage} for domain in config.schedule]
    switcher = DomainSwitcher(schedule, out_dir=str(run_dir))
    stages = len(schedule) if stop_after_stage is None else stop_after_stage
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(work_dir),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=stages * config.epochs_per_stage,
        limit_train_batches=config.batches_per_epoch,
        limit_val_batches=config.val_batches,
        check_val_every_n_epoch=config.epochs_per_stage,
        callbacks=[switcher, ModelCheckpoint(dirpath=str(work_dir / "checkpoints"), save_last=True)],
    )
    started = time.perf_counter()
    if ckpt_path is None:
        trainer.validate(model, datamodule=data, verbose=False)  # the row before training, for FWT
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    result = figures_of(plan, switcher)
    result["wall_s"] = time.perf_counter() - started
    result["steps"] = trainer.global_step
    if plan.kind in ("pragnosia", "joint"):
        result["options"] = pragnosia_options(config, plan)
        if model.consolidation is not None:
            result["consolidation"] = model.consolidation.summary()
        model.experts().flush()
        model.store.close()
    return result


def figures_of(plan: RunPlan, switcher) -> dict[str, Any]:
    """The matrices and figures a finished ``DomainSwitcher`` holds, plasticity included, JSON-ready."""
    stage_domains = [stage.domain for stage in switcher.schedule[: switcher.stage]]
    figures = switcher.figures()
    result: dict[str, Any] = {
        "label": plan.label,
        "kind": plan.kind,
        "variant": plan.variant,
        "slug": plan.slug,
        "domains": list(switcher.domains),
        "stages": stage_domains,
    }
    for name, matrix, initial in (
        ("loss", switcher.loss_matrix, switcher.initial_loss),
        ("bpb", switcher.bpb_matrix, switcher.initial_bpb),
    ):
        if name not in figures:
            continue
        columns = [switcher.domains.index(domain) for domain in stage_domains]
        result[name] = {
            "initial": initial,
            "matrix": matrix,
            "figures": figures[name]._asdict(),
            "plasticity": [matrix[i][c] for i, c in enumerate(columns)],
            "final": dict(zip(switcher.domains, matrix[-1])),
        }
    return result


def continual_goals(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per PragnosiaLM variant, issue 7's three goals against GlobalMoE (bits per byte)."""
    reference = next((r for r in results if r["kind"] == "global_moe"), None)
    if reference is None:
        return {}
    ref = reference["bpb"]
    goals = {}
    for r in results:
        if r["kind"] != "pragnosia":
            continue
        bpb = r["bpb"]
        forgetting, ref_forgetting = bpb["figures"]["forgetting"], ref["figures"]["forgetting"]
        forgetting_ratio = forgetting / ref_forgetting if ref_forgetting > 0 else math.nan
        final_ratio = bpb["figures"]["average_final"] / ref["figures"]["average_final"]
        plasticity_ratios = [mine / theirs for mine, theirs in zip(bpb["plasticity"], ref["plasticity"])]
        goals[r["variant"]] = {
            "forgetting": forgetting,
            "forgetting_ratio": forgetting_ratio,
            "forgetting_ok": forgetting <= GOALS["forgetting_ratio"] * max(ref_forgetting, 0.0),
            "final_ratio": final_ratio,
            "final_ok": final_ratio <= GOALS["final_ratio"],
            "plasticity_ratios": plasticity_ratios,
            "plasticity_ok": all(ratio <= GOALS["plasticity_ratio"] for ratio in plasticity_ratios),
        }
    return goals


def run_continual(config: ContinualConfig, out_dir: str | Path, command: str = "", log=print) -> dict[str, Any]:
    """Run every model; write ``continual.json``, then ``README.md`` and ``heatmaps.png`` from it, and
    ``<model>/continual.*`` (each model's ``DomainSwitcher`` report)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started, load = time.time(), load_average()
    results = []
    with tempfile.TemporaryDirectory(prefix="pragnosia-continual-") as root:
        data = make_datamodule(config)
        for plan in plan_runs(config):
            log(f"continual: training {plan.label}")
            run_data = make_datamodule(config, mixed=True) if plan.kind == "joint" else data
            with tempfile.TemporaryDirectory(dir=root) as work_dir:
                result = train_model(config, plan, run_data, out / plan.slug, work_dir)
            figures = result["bpb"]["figures"]
            log(
                f"continual: {plan.label}: final avg bpb {figures['average_final']:.3f}, forgetting "
                f"{figures['forgetting']:+.3f}, plasticity {[round(v, 3) for v in result['bpb']['plasticity']]}, "
                f"{result['wall_s']:.0f} s"
            )
            results.append(result)
        summary = data.summary()
    report = {
        **report_header("continual", started, config, command=command, load=load),
        "recipe": method_options(RECIPE_FILE),
        "tokens_per_model": config.steps_per_stage * len(config.schedule) * config.batch_size * config.block_size,
        "data": summary,
        "runs": results,
        "goals": continual_goals(results),
    }
    write_report(report, out)
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    """``continual.json`` (written first, atomically), then ``README.md`` and ``heatmaps.png`` from it."""
    path = out / "continual.json"
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    partial.replace(path)
    report = json.loads(path.read_text())
    (out / "README.md").write_text(markdown(report))
    plot_heatmaps(report["runs"], out / "heatmaps.png")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def markdown(report: dict[str, Any]) -> str:
    """The results page: every number from ``report`` (``continual.json``)."""
    config, recipe = report["config"], report["recipe"]
    schedule = config["schedule"]
    lines = [
        *page_header(
            "Continual learning: domains in sequence, no replay (issue 7)",
            "scripts/bench_continual.py",
            ["continual.json"],
        ),
        *run_lines(report),
        f"- {report['wall_minutes']:.0f} min wall in all. Schedule {' → '.join(schedule)}, "
        f"{config['steps_per_stage']} steps each ({report['tokens_per_model']:,} tokens per model), batch "
        f"{config['batch_size']} × {config['block_size']} bytes, seed {config['seed']}; every model d = "
        f"{config['d_model']}, {config['n_shared_layers']} trunk layers, k = {config['num_active_experts']}, n = "
        f"{config['num_experts']}, shared AdamW lr {config['lr']}.",
        f"- PragnosiaLM: `configs/{RECIPE_FILE}`'s model section ({_options(recipe)}) with each variant's "
        f"overrides, {config['store']} store; the joint reference is the `{config['joint_variant']}` variant on all "
        "domains mixed.",
        "- Data: "
        + ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB" for k, v in report["data"].items())
        + f" (max_bytes_per_domain {config['max_bytes_per_domain']}); evaluation: held-out blocks of every domain.",
        "",
        "All figures in bits per byte. Plasticity: bpb on each domain right after its own stage. Forgetting: mean "
        "over the domains before the last of (final bpb − best bpb after an earlier stage); BWT: mean of "
        "(bpb after the domain's stage − final bpb), negative is forgetting.",
        "",
    ]
    header = ["model", "final avg bpb", "avg forgetting", "BWT", f"plasticity ({', '.join(schedule)})"]
    header += [f"final ({', '.join(report['runs'][0]['domains'])})", "wall s"]
    rows = []
    for r in report["runs"]:
        bpb = r["bpb"]
        figures = bpb["figures"]
        mixed = r["kind"] == "joint"
        rows.append(
            [
                r["label"],
                f"{figures['average_final']:.3f}",
                "—" if mixed else f"{figures['forgetting']:+.3f}",
                "—" if mixed else f"{figures['bwt']:+.3f}",
                "—" if mixed else ", ".join(f"{v:.3f}" for v in bpb["plasticity"]),
                ", ".join(f"{v:.3f}" for v in bpb["final"].values()),
                f"{r['wall_s']:.0f}",
            ]
        )
    lines += markdown_table(header, rows, align="lrrrllr")
    goals = report["goals"]
    if goals:
        lines += [
            "",
            f"Goals against GlobalMoE: forgetting ≤ {GOALS['forgetting_ratio']:.0%} of its forgetting, final avg bpb "
            f"≤ {GOALS['final_ratio']} × its, plasticity ≤ {GOALS['plasticity_ratio']} × its on every domain.",
            "",
        ]
        header = ["PragnosiaLM variant", "forgetting / GlobalMoE's", "final / GlobalMoE's", "plasticity / GlobalMoE's"]
        rows = [
            [
                variant,
                f"{goal['forgetting_ratio']:+.3f} {_mark(goal['forgetting_ok'])}",
                f"{goal['final_ratio']:.3f} {_mark(goal['final_ok'])}",
                ", ".join(f"{v:.3f}" for v in goal["plasticity_ratios"]) + f" {_mark(goal['plasticity_ok'])}",
            ]
            for variant, goal in goals.items()
        ]
        lines += markdown_table(header, rows)
    lines += ["", "PragnosiaLM variants (overrides of the config's model section):", ""]
    lines += [f"- {variant}: `{json.dumps(options)}`" for variant, options in config["pragnosia_variants"].items()]
    for r in report["runs"]:
        if "consolidation" in r:
            domains = "; ".join(
                f"{stage}: experts {domain['experts']}"
                for stage, domain in zip(r["stages"], r["consolidation"]["domains"])
            )
            lines += ["", f"{r['label']}: each domain's protected experts ({domains})."]
    lines += ["", "Heat maps: `heatmaps.png` (bpb, every model); per model: `<model>/continual.{json,md,png}`.", ""]
    return "\n".join(lines)


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{key} {json.dumps(value)}" for key, value in options.items())


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def plot_heatmaps(results: list[dict[str, Any]], path: Path) -> None:
    """One bpb heat map per model (rows: before training, after each stage; columns: evaluated domain)."""
    plt = pyplot()
    columns = min(3, len(results))
    rows_of_panels = math.ceil(len(results) / columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4.6 * columns, 3.4 * rows_of_panels), squeeze=False)
    values = [v for r in results for row in r["bpb"]["matrix"] for v in row]
    vmin, vmax = min(values), max(values)
    for ax, r in zip(axes.flat, results):
        bpb = r["bpb"]
        matrix = ([bpb["initial"]] if bpb["initial"] else []) + bpb["matrix"]
        labels = (["before"] if bpb["initial"] else []) + [f"after {d}" for d in r["stages"]]
        image = ax.imshow(matrix, cmap="viridis_r", aspect="auto", vmin=vmin, vmax=max(vmax, vmin + 1e-6))
        ax.set_xticks(range(len(r["domains"])), labels=r["domains"])
        ax.set_yticks(range(len(matrix)), labels=labels)
        ax.set_title(r["label"], fontsize=8)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if image.norm(value) < 0.5 else "white",
                )
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    fig.suptitle("validation bits per byte (lower is better; 'before' row clipped to the colour scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
