"""Does capacity pay? Validation bpb, tokens/s and per-step peak memory against the number of experts (issue 16).

For every n of ``num_experts``, the ``exact`` and the ``local`` objective of ``PragnosiaLM`` (no cap on the experts
of a step, 8 device slots, disk store, Adam experts at the shared lr), ``GlobalMoE`` where every expert fits
(n ≤ ``global_moe_max``), and ``DenseLM`` once (it has no n). Every run sees the same batches (same seed, batch and
steps: equal tokens), has the same active parameters (k experts of the same width; the dense FFN k times as wide),
starts from the same weights (experts from ``(seed, e)``), and gets the same shared AdamW, schedule and
``grad_clip``. Widths, k, lr, router and balance term are ``configs/streamed.yaml``'s model section: the config
stays the single source of the recipe; ``GlobalMoE`` takes its router, so it is the model ``exact`` trains, update
for update.

Each run is a process of its own (:func:`run_isolated`), so the per-step peak memory of one run (RSS with the
disk store on CPU, ``torch.cuda.max_memory_allocated`` on a GPU, both read by ``callbacks.MemoryMonitor``) is
not polluted by another's. Validation runs every ``eval_every`` steps on a fixed set (the first
``limit_val_batches`` batches of the held-out files), which gives each run a learning curve; the last point is the
final bpb. tokens/s counts training steps only, after ``warmup_steps``.

The report, ``scaling.json``, is rewritten after every run and holds every number, the config, the machine, the
date and the command; ``README.md`` and the plots are written from it, so text and numbers cannot drift. A run
whose result is in the JSON is skipped: a crash or an interrupt loses nothing, the same command resumes.

Default size and time (this 2-core machine, shared with other jobs; one torch thread per run): 12 runs, each 400
steps of 16 × 128 bytes (819,200 tokens) on 16 MB of ``python-code``, validated every 100 steps on 16 batches
(32,768 bytes). Estimated 60-100 minutes in all, from smoke runs (2026-12-01):

- ``--estimate 12`` (12 steps per run, isolated as the real runs): 0.25-0.40 s per step for every run at n ≤ 512
  and DenseLM, 0.72 s at n = 4,096; 4-7 s of set-up and 1.2-3 s per validation per run. At 400 steps: about
  2.5 min per run at n ≤ 64, 3 min at n = 512, 5 min at n = 4,096 (35 min in all), an under-estimate, because
- step time grows as the balance term spreads the routing over more experts (the first steps collapse onto a
  few): 120-step runs at n = 4,096 took, per 20 steps, 0.74 → 0.96 → 1.43 → 1.82 → 1.94 → 2.45 s per step
  (``exact``) and 0.69 → 1.21 → 1.31 → 3.06 → 3.38 → 4.09 s (``local``), still rising. Taking 3-6 s per step after
  step 120: 17-31 min (``exact``) and 19-33 min (``local``) at n = 4,096; the n = 512 runs 3-7 min each (≤ 1 s per
  step); the 8 others about 2.3 min each.

The two n = 4,096 runs are most of the time. Resuming makes an overrun harmless: stop it and run the same command.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from bench import report
from bench.recipes import step_recorder, text_domains

SCRIPTS = Path(__file__).resolve().parents[1]
ROOT = SCRIPTS.parent
CONFIGS = ROOT / "configs"
RECIPE_FILE = "streamed.yaml"
MODELS = ("exact", "local", "global_moe", "dense")
LABELS = {"exact": "PragnosiaLM exact", "local": "PragnosiaLM local", "global_moe": "GlobalMoE", "dense": "DenseLM"}
# Both objectives run the same streamed recipe (DESIGN §3): each token its own top-k of all n, the touched experts
# through 8 device slots, records on disk, Adam experts at the shared lr (local_lr is set to lr in build_model).
RUN_CHOICES = ("num_experts", "models", "global_moe_max")
STREAMED = {"expert_slots": None, "expert_cache": 8, "store": "disk", "expert_optimizer": "adam"}


@dataclass
class ScalingConfig:
    """One scaling benchmark.

    Args:
        num_experts: the n values; ``exact`` and ``local`` run at each, ``GlobalMoE`` at those ≤ ``global_moe_max``.
        models: which of ``exact``, ``local``, ``global_moe``, ``dense`` run (``dense`` once).
        global_moe_max: largest n of ``GlobalMoE`` (every expert resident with its Adam state).
        steps: training steps of every run (``batch_size × block_size`` tokens each).
        eval_every: steps between two validations (the learning curve); the last step is always validated.
        limit_val_batches: validation batches (a fixed set: the first ones of the held-out files).
        batch_size, block_size: the batch (sequences × bytes).
        domains: ``TextDomains`` domains; default every ``.py`` file of the interpreter (split by file).
        max_bytes_per_domain: bytes read of each domain (``None``: all).
        overrides: ``PragnosiaLM``/``GlobalMoE``/``DenseLM`` keyword arguments over ``configs/streamed.yaml``'s model
            section, for every model (widths: ``d_model``, ``n_heads``, ``n_shared_layers``, ``expert_hidden``).
        warmup_steps: first steps left out of tokens/s and of the memory summary (optimizer state, first reads).
        threads: torch CPU threads of each run.
        accelerator: ``cpu`` or ``gpu`` (Lightning's accelerator of every run).
        timeout_s: longest a run may take before it is stopped.

    Raises:
        ValueError: on an unknown model or accelerator, or a size that does not fit.
    """

    num_experts: tuple[int, ...] = (8, 64, 512, 4096)
    models: tuple[str, ...] = MODELS
    global_moe_max: int = 512
    steps: int = 400
    eval_every: int = 100
    limit_val_batches: int = 16
    batch_size: int = 16
    block_size: int = 128
    domains: dict[str, str] = field(default_factory=lambda: {"code": "python-code"})
    max_bytes_per_domain: int | None = 16_000_000
    overrides: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 5
    seed: int = 0
    threads: int = 1
    accelerator: Literal["cpu", "gpu"] = "cpu"
    cache_dir: str | None = None
    timeout_s: float = 4 * 3600

    def __post_init__(self) -> None:
        self.num_experts = tuple(sorted(set(self.num_experts)))
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"models ({', '.join(unknown) or 'empty'}) must be among: {', '.join(MODELS)}")
        self.models = tuple(m for m in MODELS if m in self.models)  # canonical order
        if self.accelerator not in ("cpu", "gpu"):
            raise ValueError(f"accelerator ({self.accelerator!r}) must be one of: cpu, gpu")
        for key in ("steps", "eval_every", "limit_val_batches", "batch_size", "block_size", "threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} ({getattr(self, key)}) must be ≥ 1")
        k = self.recipe()["num_active_experts"]
        if not self.num_experts or self.num_experts[0] < k:
            raise ValueError(f"num_experts {self.num_experts} must each be ≥ num_active_experts ({k})")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be in [0, steps ({self.steps}))")

    def recipe(self) -> dict[str, Any]:
        """``configs/streamed.yaml``'s ``model.init_args`` with :attr:`overrides` on top."""
        options = yaml.safe_load((CONFIGS / RECIPE_FILE).read_text())["model"]["init_args"]
        return {**options, **self.overrides}

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    @classmethod
    def quick(cls, **changes: Any) -> ScalingConfig:
        """Seconds per run: width 16, one trunk layer, n ∈ {8, 64}, 6 steps of 4 × 32 bytes, one small file."""
        options: dict[str, Any] = dict(
            num_experts=(8, 64),
            steps=6,
            eval_every=3,
            limit_val_batches=2,
            batch_size=4,
            block_size=32,
            domains={"prose": "stdlib-docs"},
            max_bytes_per_domain=60_000,
            overrides={"d_model": 16, "n_heads": 2, "n_shared_layers": 1},
            warmup_steps=2,
            timeout_s=300,
        )
        return cls(**{**options, **changes})

    @classmethod
    def gpu(cls, **changes: Any) -> ScalingConfig:
        """A GPU session's size (not yet measured): d = 512 with experts d → 512 → d, so a record with its Adam
        state is 6.3 MB and n = 4,096 stores 26 GB (a 4d-wide expert would need 103 GB of disk); every n of
        ``GlobalMoE`` fits an H200; batches of 32 × 256 bytes."""
        options: dict[str, Any] = dict(
            accelerator="gpu",
            global_moe_max=4096,
            steps=3000,
            eval_every=500,
            batch_size=32,
            block_size=256,
            max_bytes_per_domain=None,
            overrides={"d_model": 512, "n_heads": 8, "expert_hidden": 512},
        )
        return cls(**{**options, **changes})


class RunPlan(NamedTuple):
    """One run: ``model`` of :data:`MODELS` at ``num_experts`` (``None`` for the dense model)."""

    model: str
    num_experts: int | None

    @property
    def slug(self) -> str:
        return self.model if self.num_experts is None else f"{self.model}_n{self.num_experts}"

    @property
    def label(self) -> str:
        return LABELS[self.model] if self.num_experts is None else f"{LABELS[self.model]} n={self.num_experts}"


def plan_runs(config: ScalingConfig) -> list[RunPlan]:
    """The dense model first (the n-independent reference), then each n's models, n ascending: a benchmark cut
    short still has every model at the small n."""
    runs = [RunPlan("dense", None)] if "dense" in config.models else []
    for n in config.num_experts:
        runs += [RunPlan(m, n) for m in ("exact", "local") if m in config.models]
        if "global_moe" in config.models and n <= config.global_moe_max:
            runs.append(RunPlan("global_moe", n))
    return runs


def build_model(config: ScalingConfig, plan: RunPlan, store_dir: str):
    """The LightningModule of ``plan``; every model from the same recipe, seed and clipping."""
    from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM

    recipe = config.recipe()
    shared_keys = ("d_model", "n_shared_layers", "n_heads", "num_active_experts", "expert_hidden", "lr")
    common = {k: recipe[k] for k in (*shared_keys, "grad_clip") if k in recipe}
    common.update(seed=config.seed)
    if plan.model == "dense":
        return DenseLM(**common)
    moe = {k: recipe[k] for k in ("router", "balance_coef") if k in recipe}
    if plan.model == "global_moe":
        return GlobalMoE(**common, **moe, num_experts=plan.num_experts)
    options = {**recipe, **common, **STREAMED, "objective": plan.model, "local_lr": recipe["lr"]}
    options.update(num_experts=plan.num_experts, store_dir=store_dir)
    return PragnosiaLM(**options)


def parameter_counts(model) -> dict[str, int]:
    """``active`` parameters (what one token uses) and ``total`` ones (every expert)."""
    from pragnosia_pl import GlobalMoE, PragnosiaLM

    shared = sum(p.numel() for p in model.parameters())
    if isinstance(model, PragnosiaLM):
        k, n, expert = model.hparams.num_active_experts, model.hparams.num_experts, model.layout.num_params
        return {"active": shared + k * expert, "total": shared + n * expert}
    if isinstance(model, GlobalMoE):
        k, n = model.hparams.num_active_experts, model.hparams.num_experts
        expert = sum(p.numel() for p in model.experts[0].parameters())
        return {"active": shared - (n - k) * expert, "total": shared}
    return {"active": shared, "total": shared}


def _summary_mib(values: list[float]) -> dict[str, float]:
    return {"median_mib": statistics.median(values) / 2**20, "max_mib": max(values) / 2**20}


def train_run(config: ScalingConfig, plan: RunPlan, root: str) -> dict[str, Any]:
    """Train ``plan`` in this process and measure it (what one isolated process of :func:`run_isolated` does)."""
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from callbacks import MemoryMonitor
    from pragnosia_pl import PragnosiaLM

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    seed_everything(config.seed, verbose=False)
    data = text_domains(config)
    model = build_model(config, plan, str(Path(root) / "store"))
    monitor, recorder = MemoryMonitor(), step_recorder(config.tokens_per_step)
    setup_seconds = time.perf_counter() - started
    trainer = Trainer(
        accelerator=config.accelerator,
        devices=1,
        max_steps=config.steps,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=config.limit_val_batches,
        val_check_interval=min(config.eval_every, config.steps),
        check_val_every_n_epoch=None,
        callbacks=[monitor, recorder],
    )
    trainer.fit(model, datamodule=data)
    if not recorder.curve or recorder.curve[-1]["step"] != trainer.global_step:
        trainer.validate(model, datamodule=data, verbose=False)
    timed = recorder.step_seconds[config.warmup_steps :]
    history = monitor.history[config.warmup_steps :]
    result: dict[str, Any] = {
        "model": plan.model,
        "num_experts": plan.num_experts,
        "label": plan.label,
        "steps": trainer.global_step,
        "tokens": trainer.global_step * config.tokens_per_step,
        "final_bpb": recorder.curve[-1]["val/bpb"],
        "curve": recorder.curve,
        "tokens_per_s": len(timed) * config.tokens_per_step / sum(timed),
        "step_seconds_median": statistics.median(timed),
        "step_seconds": recorder.step_seconds,
        "validation_seconds": recorder.validation_seconds,
        "setup_seconds": setup_seconds,
        "params": parameter_counts(model),
        "wall_seconds": time.perf_counter() - started,
        "data": data.summary(),
    }
    for key in ("peak_rss_bytes", "cuda_peak_bytes"):
        if history and key in history[0]:
            result[key.removesuffix("_bytes")] = _summary_mib([row[key] for row in history])
    result["memory_metric"] = "cuda_peak" if "cuda_peak" in result else "peak_rss"
    if isinstance(model, PragnosiaLM):
        stats = monitor.history
        timed_steps = len(stats) - config.warmup_steps
        before = stats[config.warmup_steps - 1] if config.warmup_steps else {"store_reads": 0, "expert_updates": 0}
        result["touched_per_step"] = (stats[-1]["expert_updates"] - before["expert_updates"]) / timed_steps
        updates = [0.0] + [row["expert_updates"] for row in stats]
        result["touched_by_step"] = [after - before for before, after in zip(updates, updates[1:])]
        result["reads_per_step"] = (stats[-1]["store_reads"] - before["store_reads"]) / timed_steps
        result["experts_used"] = len(model.usage)
        model.experts().flush()
        model.store.close()
    return result


def run_isolated(config: ScalingConfig, plan: RunPlan) -> dict[str, Any]:
    """Run ``plan`` in a fresh Python process (this module's ``__main__``) and return its result.

    Raises:
        RuntimeError: the run failed, with the end of its output.
    """
    with tempfile.TemporaryDirectory(prefix="pragnosia-scaling-") as root:
        out = Path(root) / "result.json"
        command = [sys.executable, "-m", "bench.scaling", json.dumps(asdict(config)), json.dumps(plan), str(out)]
        path = [str(SCRIPTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        # glibc's fixed trim threshold makes RSS follow the live tensors (see constant_memory.run_isolated)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(path),
            HF_DATASETS_OFFLINE="1",
            PYTHONWARNINGS="ignore",
            MALLOC_TRIM_THRESHOLD_=str(4 * 2**20),
            OMP_NUM_THREADS=str(config.threads),
        )
        done = subprocess.run(command, capture_output=True, text=True, timeout=config.timeout_s, env=env, cwd=root)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"scaling: {plan.label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def machine_description(config: ScalingConfig) -> str:
    import torch

    gpu = config.accelerator == "gpu" and torch.cuda.is_available()
    torch.set_num_threads(config.threads)
    return report.machine_description(torch.cuda.get_device_name() if gpu else "")


def load_report(config: ScalingConfig, path: Path, command: str) -> dict[str, Any]:
    """The report at ``path`` to resume, or a new one.

    Raises:
        ValueError: the report there was written with another config (mixing them would not be a comparison).
    """
    wanted = json.loads(json.dumps(asdict(config)))
    if path.is_file():
        report = json.loads(path.read_text())
        # num_experts, models and global_moe_max only choose which runs there are: a run's result does not depend
        # on them, so a report may gain runs (a larger n, another model) under the union of the choices.
        keys = sorted(k for k in wanted if k not in RUN_CHOICES and report["config"].get(k) != wanted[k])
        if keys:
            raise ValueError(
                f"{path} holds runs of another config (differs in: {', '.join(keys)}); resume with the same "
                "options, or give another --out"
            )
        old = report["config"]
        report["config"] = {
            **wanted,
            "num_experts": sorted(set(old["num_experts"]) | set(wanted["num_experts"])),
            "models": [m for m in MODELS if m in old["models"] or m in wanted["models"]],
            "global_moe_max": max(old["global_moe_max"], wanted["global_moe_max"]),
        }
        report.setdefault("commands", []).append(command)
        return report
    return {
        "benchmark": "scaling",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_description(config),
        "command": command,
        "commands": [command],
        "config": wanted,
        "recipe": config.recipe(),
        "runs": {},
    }


def run(config: ScalingConfig, out: Path, command: str = "", log=print) -> dict[str, Any]:
    """Run every missing run of ``config`` (each in its own process) and write the report after each one."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaling.json"
    report = load_report(config, path, command)
    plans = plan_runs(config)
    todo = [plan for plan in plans if plan.slug not in report["runs"]]
    if len(todo) < len(plans):
        log(f"scaling: resuming {path}: {len(plans) - len(todo)} of {len(plans)} runs done")
    with tqdm(total=len(plans), initial=len(plans) - len(todo), desc="scaling", unit="run") as bar:
        for plan in todo:
            bar.set_postfix_str(plan.label)
            result = run_isolated(config, plan)
            report["runs"][plan.slug] = result
            report["updated"] = time.strftime("%Y-%m-%d %H:%M")
            write_report(report, out)
            bar.update()
            bar.write(
                f"scaling: {plan.label}: val bpb {result['final_bpb']:.3f}, {result['tokens_per_s']:,.0f} tokens/s, "
                f"{result['wall_seconds'] / 60:.1f} min"
            )
    write_report(report, out)
    return report


def estimate(config: ScalingConfig, probe_steps: int = 12, log=print) -> dict[str, Any]:
    """Minutes each run of ``config`` should take, from a probe of ``probe_steps`` steps of each run (isolated, as
    the real ones): set-up + ``steps`` × the probe's median step time + the validations × one validation's time.

    Routing collapses onto a few experts in the first steps and spreads again within about a hundred, so the probe's
    median under-estimates the large n of ``exact`` and ``local``; its ``step_seconds_max`` (the first steps) is the
    other bound.
    """
    from tqdm.auto import tqdm

    probe = replace(config, steps=probe_steps, eval_every=probe_steps, warmup_steps=min(2, probe_steps - 1))
    validations = config.steps // config.eval_every + (config.steps % config.eval_every != 0)
    runs = {}
    for plan in tqdm(plan_runs(config), desc="estimate", unit="run"):
        r = run_isolated(probe, plan)
        validation = statistics.fmean(r["validation_seconds"])
        seconds = r["setup_seconds"] + config.steps * r["step_seconds_median"] + validations * validation
        runs[plan.slug] = {
            "step_seconds_median": r["step_seconds_median"],
            "step_seconds_max": max(r["step_seconds"][probe.warmup_steps :]),
            "validation_seconds": validation,
            "setup_seconds": r["setup_seconds"],
            "minutes": seconds / 60,
        }
        log(f"estimate: {plan.label}: {runs[plan.slug]}")
    return {"probe_steps": probe_steps, "runs": runs, "total_minutes": sum(r["minutes"] for r in runs.values())}


# ------------------------------------------------------------------------------------------------------ report


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """Issue 16's goals from the runs there are: ``exact`` falls strictly with n and its largest n beats n = 8 by
    0.05 bpb; ``local`` is within 0.05 bpb of ``exact`` at every n."""
    bpb = {(r["model"], r["num_experts"]): r["final_bpb"] for r in report["runs"].values()}
    exact = sorted((n, v) for (m, n), v in bpb.items() if m == "exact")
    result: dict[str, Any] = {}
    if len(exact) >= 2:
        values = [v for _, v in exact]
        result["exact_falls_strictly"] = all(b < a for a, b in zip(values, values[1:]))
        result["exact_gain"] = {"from_n": exact[0][0], "to_n": exact[-1][0], "bpb": values[0] - values[-1]}
        result["exact_gain_ge_0.05"] = values[0] - values[-1] >= 0.05
    gaps = {n: bpb[("local", n)] - v for n, v in exact if ("local", n) in bpb}
    if gaps:
        result["local_minus_exact"] = {str(n): gap for n, gap in gaps.items()}
        result["local_within_0.05"] = all(gap <= 0.05 for gap in gaps.values())
    # exact and GlobalMoE take the same update (to 1e-5 over 5 steps): their gap is the runs' noise
    spread = {n: v - bpb[("global_moe", n)] for n, v in exact if ("global_moe", n) in bpb}
    if spread:
        result["exact_minus_global_moe"] = {str(n): gap for n, gap in spread.items()}
    return result


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(report["runs"].values(), key=lambda r: (r["num_experts"] or 0, order[r["model"]]))


def markdown(report: dict[str, Any]) -> str:
    config, recipe = report["config"], report["recipe"]
    runs = _rows(report)
    data = next(iter(runs))["data"] if runs else {}
    metric = "CUDA peak allocated" if config["accelerator"] == "gpu" else "peak RSS"
    lines = [
        "# Scaling: validation bpb, speed and memory against the number of experts (issue 16)",
        "",
        "Written by `scripts/bench_scaling.py` from `scaling.json`; do not edit by hand.",
        "",
        "- Command"
        + (
            f": `{report['command']}`"
            if len(set(report["commands"])) <= 1
            else "s (one report; a later command resumes it or adds runs): "
            + ", then ".join(f"`{c}`" for c in dict.fromkeys(report["commands"]))
        ),
        f"- Machine: {report['machine']}; started {report['date']}"
        + (f", last run {report['updated']}" if "updated" in report else ""),
        f"- Model (`configs/{RECIPE_FILE}`'s model section"
        + (f", with {config['overrides']}" if config["overrides"] else "")
        + f"): d = {recipe['d_model']}, {recipe['n_shared_layers']} trunk layers, k = {recipe['num_active_experts']}"
        f", router {recipe.get('router')}, balance {recipe.get('balance_coef')}, lr {recipe['lr']}, seed "
        f"{config['seed']}. PragnosiaLM: no cap on experts per step, 8 device slots, disk store, Adam experts at lr "
        f"{recipe['lr']}. GlobalMoE: the same router, every expert resident. DenseLM: one FFN k experts wide.",
        f"- Every run: {config['steps']} steps × {config['batch_size']} × {config['block_size']} bytes = "
        f"{config['steps'] * config['batch_size'] * config['block_size']:,} tokens; validation every "
        f"{config['eval_every']} steps on {config['limit_val_batches']} fixed batches.",
        "- Data: "
        + ", ".join(
            f"{name} ({config['domains'][name]}) {d['bytes'] / 1e6:.1f} MB, {d['train_tokens']:,} train / "
            f"{d['val_tokens']:,} val tokens"
            for name, d in data.items()
        )
        + f" (max_bytes_per_domain {config['max_bytes_per_domain']}).",
        f"- tokens/s: training steps after the first {config['warmup_steps']}, on a machine other jobs may share "
        f"(see the dates); memory: per-step {metric} (median and max over those steps), each run in its own process.",
        "",
        f"| n | model | val bpb | tokens/s | {metric} median (MiB) | max (MiB) | active params | total params "
        "| touched experts/step | minutes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        memory = r[r["memory_metric"]]
        touched = f"{r['touched_per_step']:.0f}" if "touched_per_step" in r else ""
        lines.append(
            f"| {r['num_experts'] or '–'} | {LABELS[r['model']]} | {r['final_bpb']:.3f} | {r['tokens_per_s']:,.0f} "
            f"| {memory['median_mib']:,.0f} | {memory['max_mib']:,.0f} | {r['params']['active']:,} "
            f"| {r['params']['total']:,} | {touched} | {r['wall_seconds'] / 60:.1f} |"
        )
    outcome = goals(report)
    if outcome:
        lines += ["", "Goals (final val bpb):", ""]
        if "exact_falls_strictly" in outcome:
            gain = outcome["exact_gain"]
            lines.append(
                f"- `exact` falls strictly with n: {_mark(outcome['exact_falls_strictly'])}; n = {gain['to_n']} "
                f"beats n = {gain['from_n']} by {gain['bpb']:.3f} bpb (goal ≥ 0.05: "
                f"{_mark(outcome['exact_gain_ge_0.05'])})."
            )
        if "local_minus_exact" in outcome:
            gaps = ", ".join(f"n = {n}: {gap:+.3f}" for n, gap in outcome["local_minus_exact"].items())
            lines.append(
                f"- `local` − `exact`: {gaps} (goal ≤ 0.05 at every n: {_mark(outcome['local_within_0.05'])})."
            )
        if "exact_minus_global_moe" in outcome:
            spread = ", ".join(f"n = {n}: {gap:+.3f}" for n, gap in outcome["exact_minus_global_moe"].items())
            lines.append(
                f"- Noise: `exact` − GlobalMoE, which take the same update (a test: 1e-5 over 5 steps) until rounding "
                f"flips a routing decision and the runs drift apart: {spread}. Differences of this size between two "
                "runs are not a result."
            )
        tokens = config["steps"] * config["batch_size"] * config["block_size"]
        k = recipe["num_active_experts"]
        visits = ", ".join(f"n = {n}: {k * tokens // n:,}" for n in config["num_experts"])
        lines.append(f"- (token, expert) pairs per expert over a run (k × tokens ÷ n): {visits}.")
    lines += ["", "Plots: `scaling.png` (bpb, tokens/s and memory against n), `curves.png` (learning curves).", ""]
    return "\n".join(lines)


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


# GlobalMoE hollow and dotted: where exact reproduces it, both stay visible
STYLE = {
    "exact": dict(marker="o"),
    "local": dict(marker="s"),
    "global_moe": dict(marker="D", markersize=9, fillstyle="none", linestyle=":"),
}


def plot(report: dict[str, Any], out: Path) -> None:
    """``scaling.png``: bpb, tokens/s and per-step peak memory against n (log x), one line per model (DenseLM a
    horizontal line); ``curves.png``: every run's val bpb against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _rows(report)
    panels = (
        ("final_bpb", "val bits per byte", "quality"),
        ("tokens_per_s", "training tokens/s", "speed"),
        ("memory", "per-step peak memory (MiB)", "memory"),
    )

    def value(r, key):
        return r[r["memory_metric"]]["median_mib"] if key == "memory" else r[key]

    ns = sorted({r["num_experts"] for r in runs if r["num_experts"] is not None})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for model in MODELS:
            rows = [r for r in runs if r["model"] == model]
            if not rows:
                continue
            if model == "dense":
                ax.axhline(value(rows[0], key), color="gray", linestyle="--", label=LABELS[model])
                continue
            ax.plot(
                [r["num_experts"] for r in rows], [value(r, key) for r in rows], label=LABELS[model], **STYLE[model]
            )
        ax.set(xscale="log", xlabel="experts n", ylabel=ylabel, title=title)
        ax.set_xticks(ns, [str(n) for n in ns], minor=False)
        ax.minorticks_off()
        if key == "tokens_per_s":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot([p["tokens"] for p in r["curve"]], [p["val/bpb"] for p in r["curve"]], marker=".", label=r["label"])
    ax.set(xlabel="training tokens", ylabel="val bits per byte", title="Learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    """``scaling.json`` (written first, atomically), then ``README.md`` and the plots from it."""
    path = out / "scaling.json"
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)
    report = json.loads(path.read_text())
    (out / "README.md").write_text(markdown(report))
    if report["runs"]:
        plot(report, out)


def _child(config_json: str, plan_json: str, out_path: str) -> None:
    config = ScalingConfig(**json.loads(config_json))
    plan = RunPlan(*json.loads(plan_json))
    with tempfile.TemporaryDirectory(prefix="pragnosia-scaling-run-") as root:
        result = train_run(config, plan, root)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _child(*sys.argv[1:4])
