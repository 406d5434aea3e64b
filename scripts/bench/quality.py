"""How good: validation bits per byte of ``PragnosiaLM`` against ``GlobalMoE`` and ``DenseLM`` (issue 6).

Every model is trained on the same mixed domains, batches, number of tokens and seed, with the same trunk
and the same active parameters per token (k experts of the MoEs, one FFN k times as wide for the dense
model). Validation runs every ``eval_every`` steps and gives each model a learning curve; the final point is
the full validation set of every domain.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.recipes import method_options, record_bpb, shared_options, text_domains
from bench.report import load_average, markdown_table, pyplot, report_header

MODEL_KINDS = ("pragnosia", "global_moe", "dense")
# Every PragnosiaLM recipe of the benchmark: name -> (config file, overrides, why each override).
PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "quickstart": ("quickstart.yaml", {}, ""),
    "exact": ("streamed.yaml", {}, ""),
    "bounded": ("bounded.yaml", {}, ""),
    "local": (
        "streamed.yaml",
        {"objective": "local"},
        "[exact] with the seed's local rule: what local learning costs at the same routing, cache and optimizer",
    ),
}
# GlobalMoE takes the recipes' router (configs/streamed.yaml's): with the same seed it is then the model the exact
# recipe trains, update for update.
GLOBAL_MOE_ROUTER = method_options("streamed.yaml")["router"]


def preset(name: str) -> dict[str, Any]:
    """The ``PragnosiaLM`` keyword arguments of preset ``name``: its config's method, plus its documented overrides."""
    config_file, overrides, _ = PRESETS[name]
    return {**method_options(config_file), **overrides}


# Named variants for `bench_quality.py --variants NAME ...` (the plain run is the quickstart preset).
PRESET_VARIANTS = {name: preset(name) for name in ("exact", "bounded", "local")}


def parse_variants(items: list[str]) -> dict[str, dict[str, Any]]:
    """``bench_quality.py --variants`` items, each a preset name of :data:`PRESET_VARIANTS` or a JSON object
    ``{name: kwargs}``, merged in order.

    Raises:
        ValueError: an item is neither, naming it and the presets.
    """
    variants: dict[str, dict[str, Any]] = {}
    for item in items:
        if item in PRESET_VARIANTS:
            variants[item] = dict(PRESET_VARIANTS[item])
            continue
        try:
            parsed = json.loads(item)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
            raise ValueError(
                f"--variants: {item!r} is neither a preset ({', '.join(PRESET_VARIANTS)}) nor a JSON object "
                "{name: {PragnosiaLM kwargs}}"
            )
        variants.update(parsed)
    return variants


@dataclass
class QualityConfig:
    """One quality benchmark: the shared shape, data and schedule, and which models run.

    Args:
        num_experts: n of the two MoEs; one ``PragnosiaLM`` and one ``GlobalMoE`` run per value.
        models: which of ``pragnosia``, ``global_moe``, ``dense`` run (the dense model runs once).
        steps: training steps of every model (batches of ``batch_size × block_size`` tokens).
        eval_every: steps between two points of the learning curve.
        max_bytes_per_domain: bytes read from each domain (``data.max_bytes_per_domain``).
        time_budget_min: if set, a probe measures steps/s first and ``steps`` is cut so that all runs fit
            (the JSON records the cut); ``None`` runs ``steps`` as asked.
        threads: torch CPU threads (``None``: torch's default). One by default: on a machine shared with other
            jobs, OpenMP threads that wait for a descheduled sibling make steps up to 100× slower.
        plain: run the plain ``PragnosiaLM`` (the ``quickstart`` preset, no variant) too.
        accelerator: Lightning accelerator of every run (``cpu`` by default, so figures from different machines
            compare; ``gpu`` or ``auto`` trains on a GPU).
        store: where every PragnosiaLM keeps its experts (over the configs' ``store``).
        pragnosia: extra ``PragnosiaLM`` keyword arguments of every PragnosiaLM run, over the quickstart preset.
        expert_layers: where every model's expert layers sit (``top``, ``every_other``, ``every``; the dense
            model's FFNs of the same active width sit there too); a variant may set its own.
        warmup_steps: ``None``: a constant learning rate; else every model warms up over this many steps, then
            decays by a cosine to 0.1x at the run's last step (``pragnosia_pl.WarmupCosine``).
        variants: further PragnosiaLM runs per n, by name, each with its own keyword arguments on top of
            ``pragnosia``; the plain run too unless ``plain`` is false. Default: the ``exact`` and ``local``
            presets (:data:`PRESETS`: a shipped config and its documented overrides). A variant's
            ``"local_target": "output"`` trains the local target the design notes weigh against the shipped one.

    Raises:
        ValueError: on an unknown model kind or a non-positive size.
    """

    num_experts: tuple[int, ...] = (8, 32)
    models: tuple[str, ...] = MODEL_KINDS
    d_model: int = 128
    n_shared_layers: int = 2
    n_heads: int = 4
    num_active_experts: int = 2
    block_size: int = 128
    batch_size: int = 16
    steps: int = 1500
    eval_every: int = 250
    max_bytes_per_domain: int | None = 1_000_000
    domains: dict[str, str] = field(default_factory=lambda: {"code": "stdlib-code", "prose": "stdlib-docs"})
    lr: float = 1e-3
    store: str = "host"
    pragnosia: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {name: PRESET_VARIANTS[name] for name in ("exact", "local")}
    )
    seed: int = 0
    time_budget_min: float | None = 45.0
    probe_steps: int = 12
    threads: int | None = 1
    cache_dir: str | None = None
    accelerator: str = "cpu"
    plain: bool = True
    expert_layers: str = "top"
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        self.num_experts = tuple(self.num_experts)
        self.models = tuple(self.models)
        unknown = [m for m in self.models if m not in MODEL_KINDS]
        if unknown or not self.models:
            raise ValueError(f"models ({', '.join(unknown) or 'empty'}) must be among: {', '.join(MODEL_KINDS)}")
        for key in ("d_model", "steps", "eval_every", "batch_size", "block_size", "num_active_experts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} ({getattr(self, key)}) must be ≥ 1")
        slots = preset("quickstart")["expert_slots"]
        if not self.num_experts or min(self.num_experts) < slots:
            raise ValueError(f"num_experts {self.num_experts} must each be ≥ expert_slots ({slots})")

    @classmethod
    def quick(cls, **overrides: Any) -> QualityConfig:
        """A tiny run (seconds): width 32, one trunk layer, one n, 20 steps."""
        options: dict[str, Any] = dict(
            num_experts=(8,),
            d_model=32,
            n_shared_layers=1,
            n_heads=2,
            block_size=32,
            batch_size=8,
            steps=20,
            eval_every=10,
            max_bytes_per_domain=60_000,
            time_budget_min=None,
        )
        options.update(overrides)
        return cls(**options)


@dataclass
class RunPlan:
    """One model of the benchmark: ``kind`` at ``num_experts`` (``None`` for the dense model), and for
    ``PragnosiaLM`` the name of a variant (``""``: the plain configuration)."""

    kind: str
    num_experts: int | None
    variant: str = ""

    @property
    def label(self) -> str:
        name = {"pragnosia": "PragnosiaLM", "global_moe": "GlobalMoE", "dense": "DenseLM"}[self.kind]
        label = name if self.num_experts is None else f"{name} n={self.num_experts}"
        return f"{label} [{self.variant}]" if self.variant else label

    @property
    def slug(self) -> str:
        slug = self.kind if self.num_experts is None else f"{self.kind}_n{self.num_experts}"
        return f"{slug}_{self.variant}" if self.variant else slug


def plan_runs(config: QualityConfig) -> list[RunPlan]:
    """The runs of ``config``: the two MoEs per n (interleaved, so a cut run still compares them), then dense."""
    runs = []
    for n in config.num_experts:
        if "pragnosia" in config.models:
            runs += [RunPlan("pragnosia", n)] if config.plain else []
            runs += [RunPlan("pragnosia", n, name) for name in config.variants]
        if "global_moe" in config.models:
            runs.append(RunPlan("global_moe", n))
    if "dense" in config.models:
        runs.append(RunPlan("dense", None))
    return runs


def build_model(config: QualityConfig, plan: RunPlan, store_dir: str):
    """The LightningModule of ``plan`` (seed the RNG first: every model starts from the same trunk)."""
    from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM

    common = {**shared_options(config), "expert_layers": config.expert_layers}
    if plan.kind == "dense":
        return DenseLM(**common)
    if plan.kind == "global_moe":
        return GlobalMoE(**common, num_experts=plan.num_experts, router=GLOBAL_MOE_ROUTER)
    options = {**common, **preset("quickstart"), **config.pragnosia, **config.variants.get(plan.variant, {})}
    options.update(num_experts=plan.num_experts, store=config.store, store_dir=store_dir)
    if options.pop("local_target", "residual") == "output":
        return _OutputTarget(**options)
    return PragnosiaLM(**options)


def _output_target_class():
    from pragnosia_pl import PragnosiaLM

    class OutputTarget(PragnosiaLM):
        """The local target considered against the shipped one (design notes, issue 22): each expert's output
        alone predicts the next token, ``CE(head(norm(o_e)), y_e)``, instead of the stream it is added to."""

        def local_loss(self, h_e, expert_out, targets_e):
            import torch.nn.functional as F

            return F.cross_entropy(self.backbone.detached_logits(expert_out), targets_e)

    return OutputTarget


def _OutputTarget(**options):  # noqa: N802 (a class, built on first use: pragnosia_pl is imported lazily here)
    return _output_target_class()(**options)


def parameter_counts(model) -> dict[str, int]:
    """``total`` parameters (every expert included) and ``active`` ones (what one token uses)."""
    from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM

    shared = sum(p.numel() for p in model.parameters())
    if isinstance(model, PragnosiaLM):
        expert, layers = model.layout.num_params, len(model.routers)
        return {
            "active": shared + layers * model.hparams.num_active_experts * expert,
            "total": shared + layers * model.hparams.num_experts * expert,
        }
    if isinstance(model, GlobalMoE):
        expert, layers = sum(p.numel() for p in model.experts[0].parameters()), len(model.routers)
        non_expert = shared - layers * model.hparams.num_experts * expert
        return {"active": non_expert + layers * model.hparams.num_active_experts * expert, "total": shared}
    assert isinstance(model, DenseLM)
    return {"active": shared, "total": shared}


def _curve_recorder():
    from lightning.pytorch import Callback

    class CurveRecorder(Callback):
        """Keeps the ``val/bpb*`` metrics of every validation and the time spent in training steps (after two)."""

        def __init__(self) -> None:
            self.points: list[dict[str, float]] = []
            self.train_seconds = 0.0
            self.train_steps = 0
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step > 2:  # the first steps allocate optimizer state and materialize experts
                self.train_seconds += time.perf_counter() - self._start
                self.train_steps += 1

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            record_bpb(self.points, trainer)

    return CurveRecorder()


def _trainer(root: str, steps: int, eval_every: int | None, callbacks: list, accelerator: str = "cpu"):
    from lightning.pytorch import Trainer

    validate = eval_every is not None
    return Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if validate else 0,
        val_check_interval=eval_every if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        callbacks=callbacks,
    )


def train_one(config: QualityConfig, plan: RunPlan, data, steps: int, root: str, validate: bool = True) -> dict:
    """Train ``plan`` for ``steps`` steps on ``data``; return its curve, final metrics and speed."""
    from lightning.pytorch import seed_everything

    from pragnosia_pl import with_warmup_cosine

    seed_everything(config.seed, verbose=False)
    model = build_model(config, plan, str(Path(root) / "store"))
    if config.warmup_steps is not None:
        with_warmup_cosine(model, min(config.warmup_steps, steps // 10), steps)
    recorder = _curve_recorder()
    eval_every = min(config.eval_every, steps) if validate else None
    trainer = _trainer(root, steps, eval_every, [recorder], config.accelerator)
    trainer.fit(model, datamodule=data)
    result: dict[str, Any] = {
        "label": plan.label,
        "slug": plan.slug,
        "kind": plan.kind,
        "num_experts": plan.num_experts,
        "variant": plan.variant,
        "steps": trainer.global_step,
        "params": parameter_counts(model),
        "train_seconds": recorder.train_seconds,
        "steps_per_s": recorder.train_steps / recorder.train_seconds if recorder.train_seconds else math.nan,
    }
    if validate:
        if not recorder.points or recorder.points[-1]["step"] != trainer.global_step:
            trainer.validate(model, datamodule=data, verbose=False)
        result["curve"] = recorder.points
        result["final"] = {k: v for k, v in recorder.points[-1].items() if k != "step"}
    if plan.kind == "pragnosia":
        result["experts_used"] = len(model.usage)
        total = sum(model.usage.values())
        probs = [count / total for count in model.usage.values()]
        result["usage_entropy_bits"] = -sum(p * math.log2(p) for p in probs)
        model.experts().flush()
        model.store.close()
    return result


def make_datamodule(config: QualityConfig):
    return text_domains(config)


def probe_steps_per_s(config: QualityConfig, runs: list[RunPlan], data, root: str) -> dict[str, float]:
    """Measured training steps/s of each run (a short run each, first two steps discarded)."""
    speeds = {}
    for plan in runs:
        with tempfile.TemporaryDirectory(dir=root) as run_root:
            result = train_one(config, plan, data, config.probe_steps, run_root, validate=False)
        speeds[plan.slug] = result["steps_per_s"]
    return speeds


def fit_budget(
    steps: int, eval_every: int, steps_per_s: dict[str, float], minutes: float, overhead: float = 1.15
) -> tuple[int, dict[str, Any]]:
    """Steps every run can take within ``minutes`` in all (a multiple of ``eval_every``), and the estimate.

    ``overhead`` covers validation and Trainer set-up on top of the training steps (about 15% at d=128).
    """
    seconds = overhead * sum(steps / speed for speed in steps_per_s.values())
    run = steps
    if seconds > 60 * minutes:
        run = max(eval_every, int(steps * 60 * minutes / seconds) // eval_every * eval_every)
    budget = {
        "minutes": minutes,
        "probe_steps_per_s": steps_per_s,
        "estimated_minutes": seconds / 60,
        "steps_requested": steps,
        "steps_run": run,
    }
    return run, budget


def run_quality(config: QualityConfig, out_dir: str | Path, log=print, command: str = "") -> dict:
    """Run the benchmark and write ``quality.json``, ``quality.md``, ``curves.png`` and ``curve_<run>.png``."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    runs = plan_runs(config)
    started, load = time.time(), load_average()
    with tempfile.TemporaryDirectory(prefix="pragnosia-quality-") as root:
        data = make_datamodule(config)
        steps, budget = config.steps, None
        if config.time_budget_min is not None:
            speeds = probe_steps_per_s(config, runs, data, root)
            steps, budget = fit_budget(config.steps, config.eval_every, speeds, config.time_budget_min)
            if steps != config.steps:
                log(
                    f"quality: {budget['estimated_minutes']:.0f} min estimated for {config.steps} steps; "
                    f"cut to {steps} steps"
                )
        results = []
        for plan in runs:
            log(f"quality: training {plan.label} for {steps} steps")
            with tempfile.TemporaryDirectory(dir=root) as run_root:
                result = train_one(config, plan, data, steps, run_root)
            log(f"quality: {plan.label}: val bpb {result['final']['val/bpb']:.3f}")
            results.append(result)
            partial = {**report_header("quality", started, config, command, load), "steps": steps, "runs": results}
            (out / "quality.partial.json").write_text(json.dumps(partial, indent=2) + "\n")  # kept if a run dies
        summary = data.summary()
    report = {
        **report_header("quality", started, config, command, load),
        "steps": steps,
        "tokens_per_model": steps * config.batch_size * config.block_size,
        "time_budget": budget,
        "data": summary,
        "runs": results,
        "goals": quality_goals(results),
    }
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quality.md").write_text(quality_markdown(report))
    plot_curves(results, out)
    return report


def quality_goals(results: list[dict]) -> dict[str, dict[str, Any]]:
    """Per PragnosiaLM run: its final val bpb ≤ GlobalMoE's at the same n, and < DenseLM's."""
    final = {(r["kind"], r["num_experts"]): r["final"]["val/bpb"] for r in results if "final" in r}
    dense = final.get(("dense", None))
    goals = {}
    for r in results:
        if r["kind"] != "pragnosia" or "final" not in r:
            continue
        n, bpb = r["num_experts"], r["final"]["val/bpb"]
        moe = final.get(("global_moe", n))
        goals[r["label"].removeprefix("PragnosiaLM ")] = {
            "pragnosia": bpb,
            "global_moe": moe,
            "dense": dense,
            "le_global_moe": None if moe is None else bpb <= moe,
            "lt_dense": None if dense is None else bpb < dense,
        }
    return goals


def quality_markdown(report: dict) -> str:
    config = report["config"]
    domains = list(config["domains"])
    lines = [
        "# Quality: local learning against global backpropagation",
        "",
        f"{report['machine']}, {report['date']}; {report['wall_minutes']:.0f} min wall.",
        "",
        f"d={config['d_model']}, {config['n_shared_layers']} trunk layers, k={config['num_active_experts']}, "
        f"batch {config['batch_size']}×{config['block_size']} bytes, "
        f"{report['steps']} steps ({report['tokens_per_model']:,} tokens per model), seed {config['seed']}; "
        f"PragnosiaLM: configs/quickstart.yaml, store {config['store']}"
        + (f", {config['pragnosia']}" if config["pragnosia"] else "")
        + f"; shared AdamW lr {config['lr']}.",
        *[f"Variant [{name}]: {kwargs}." for name, kwargs in config["variants"].items()],
        "Data: "
        + ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB" for k, v in report["data"].items())
        + f" (max_bytes_per_domain={config['max_bytes_per_domain']}), mixed; val = held-out blocks of each domain.",
    ]
    budget = report.get("time_budget")
    if budget and budget["steps_run"] != budget["steps_requested"]:
        lines.append(
            f"Steps cut from {budget['steps_requested']} to {budget['steps_run']} to fit a "
            f"{budget['minutes']:.0f}-minute budget ({budget['estimated_minutes']:.0f} min estimated)."
        )
    header = ["model", "active params", "total params", "val bpb", *(f"bpb {d}" for d in domains), "train steps/s"]
    rows = [
        [
            r["label"],
            f"{r['params']['active']:,}",
            f"{r['params']['total']:,}",
            f"{r['final']['val/bpb']:.3f}",
            *(f"{r['final'].get(f'val/bpb/{d}', math.nan):.3f}" for d in domains),
            f"{r['steps_per_s']:.1f}",
        ]
        for r in report["runs"]
    ]
    lines += ["", *markdown_table(header, rows)]
    lines += ["", "Goals (final val bpb, all domains):", ""]
    for n, goal in report["goals"].items():

        def mark(ok):
            return "n/a" if ok is None else ("yes" if ok else "**no**")

        lines.append(
            f"- {n}: PragnosiaLM {goal['pragnosia']:.3f} ≤ GlobalMoE {_fmt(goal['global_moe'])}: "
            f"{mark(goal['le_global_moe'])}; < DenseLM {_fmt(goal['dense'])}: {mark(goal['lt_dense'])}"
        )
    lines += ["", "Learning curves: `curves.png` (all models), `curve_<model>.png` (per domain).", ""]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_curves(results: list[dict], out: Path) -> None:
    """``curves.png``: val bpb vs step for every model; ``curve_<slug>.png``: one model, per domain."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        steps = [p["step"] for p in r["curve"]]
        ax.plot(steps, [p["val/bpb"] for p in r["curve"]], marker=".", label=r["label"])
    ax.set(xlabel="training step", ylabel="val bits per byte", title="Validation bpb (all domains)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    for r in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [p["step"] for p in r["curve"]]
        for key in sorted({k for p in r["curve"] for k in p if k.startswith("val/bpb")}):
            name = "all" if key == "val/bpb" else key.rsplit("/", 1)[-1]
            ax.plot(steps, [p.get(key, math.nan) for p in r["curve"]], marker=".", label=name)
        ax.set(xlabel="training step", ylabel="val bits per byte", title=r["label"])
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"curve_{r['slug']}.png", dpi=110)
        plt.close(fig)
