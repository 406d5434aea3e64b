"""What a fixed memory buys: validation bpb against peak memory and against wall time (issue 23; it grew out of
issue 16's scaling benchmark, which it replaces).

The contenders (:func:`plan_runs`), all from ``configs/streamed.yaml``'s model section with :attr:`overrides`:

- ``DenseLM`` at each of ``dense_widths`` (d_model); at the recipe's own width it has the MoE's active parameters
  (one FFN k experts wide);
- ``GlobalMoE`` at every n ≤ ``global_moe_max`` (every expert resident with its Adam state);
- ``PragnosiaLM`` ``exact`` at every n (no cap on the experts of a step, 8 device slots, disk store, Adam experts
  at the shared lr), and ``local`` at ``local_num_experts``;
- the fine-grained recipe (Krajewski et al. 2024) at ``fine_num_experts``: granularity G splits each expert in G
  (``expert_hidden`` = 4d / G) and routes each token to k·G of them, the same active parameters; G × 8 slots of 1/G
  the size, 2G experts computed together (``expert_batch``).

Every run sees the same batches (same seed, batch and steps: equal tokens T), starts from the same weights (experts
from ``(seed, e)``), and gets the same shared AdamW, clipping and schedule: ``lr_warmup_steps`` of warmup, then a
cosine to 0.1 × at the last step (``pragnosia_pl.with_warmup_cosine``; the experts follow the same factor).

Each run is a process of its own (:func:`run_isolated`), so its whole-process lifelong peak RSS
(``callbacks.process_peak_rss``; CUDA: ``torch.cuda.max_memory_allocated``) is its own. A run checkpoints every
``checkpoint_every`` steps under ``OUT/.runs/<run>/`` (the checkpoint, the expert store, the learning curve so
far), so a run stopped by the end of a session continues from there under the same command, and the report,
``frontier.json``, is rewritten after every finished run: nothing finished is run again, nothing started is lost.
Validation runs every ``eval_every`` steps on a fixed set (the first ``limit_val_batches`` batches of the held-out
files); each point of the learning curve carries the tokens and the training seconds so far, which give the
bpb-against-wall-time plot. tokens/s counts training steps only, after ``warmup_steps``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from bench import report
from bench.frontier_page import LABELS, MODELS, RECIPE_FILE, write_report
from bench.recipes import step_recorder, text_domains

SCRIPTS = Path(__file__).resolve().parents[1]
ROOT = SCRIPTS.parent
CONFIGS = ROOT / "configs"
# Both objectives run the same streamed recipe (DESIGN §3): each token its own top-k of all n, the touched experts
# through 8 device slots, records on disk, Adam experts at the shared lr (local_lr is set to lr in build_model).
RUN_CHOICES = ("num_experts", "models", "global_moe_max", "local_num_experts", "dense_widths", "fine_num_experts")
STREAMED = {"expert_slots": None, "expert_cache": 8, "store": "disk", "expert_optimizer": "adam"}
MAX_EXPERTS = 65_536
STATE = ".runs"  # OUT/.runs/<run>: checkpoints and expert stores of unfinished runs


@dataclass
class FrontierConfig:
    """One frontier benchmark.

    Args:
        num_experts: the n of ``exact``; ``GlobalMoE`` runs at those ≤ ``global_moe_max``.
        models: which of :data:`MODELS` run.
        global_moe_max: largest n of ``GlobalMoE``.
        local_num_experts: the n of ``local``.
        dense_widths: the d_model of each ``DenseLM`` (heads as the recipe's).
        granularity: G of the fine-grained recipe (``expert_hidden`` ÷ G, k × G).
        fine_num_experts: its n; ``None``: the largest of ``num_experts`` × G, at most 65,536.
        steps: training steps of every run (``batch_size × block_size`` tokens each).
        lr_warmup_steps: warmup of the schedule, then a cosine to 0.1 × at ``steps``.
        eval_every: steps between two validations (the learning curve); the last step is always validated.
        limit_val_batches: validation batches (a fixed set: the first ones of the held-out files).
        batch_size, block_size: the batch (sequences × tokens).
        domains: ``TextDomains`` domains; default every ``.py`` file of the interpreter (split by file).
        max_bytes_per_domain: bytes read of each domain (``None``: all).
        overrides: keyword arguments over ``configs/streamed.yaml``'s model section, for every model
            (``micro_batch`` for ``PragnosiaLM`` only).
        warmup_steps: first steps left out of tokens/s.
        checkpoint_every: steps between two checkpoints of a run (what a stopped run resumes from).
        threads: torch CPU threads of each run.
        accelerator: ``cpu`` or ``gpu`` (Lightning's accelerator of every run).
        timeout_s: longest one process may run; a run cut there resumes from its checkpoint next time.
        parallel: runs at a time, each its own process (``threads`` each): on a machine of c cores, c runs take about
            1/c of the wall time, and each run's wall time and tokens/s are then those of a shared machine (its
            result records how many ran beside it). Changing it does not change which runs a report may hold.

    Raises:
        ValueError: on an unknown model or accelerator, or a size that does not fit.
    """

    num_experts: tuple[int, ...] = (8, 64, 512, 4096)
    models: tuple[str, ...] = MODELS
    global_moe_max: int = 512
    local_num_experts: tuple[int, ...] = (64, 512)
    dense_widths: tuple[int, ...] = (128, 192, 256)
    granularity: int = 8
    fine_num_experts: int | None = None
    steps: int = 763  # 763 × 256 × 128 = 25.0 M tokens
    lr_warmup_steps: int = 40
    eval_every: int = 191
    limit_val_batches: int = 2
    batch_size: int = 256
    block_size: int = 128
    domains: dict[str, str] = field(default_factory=lambda: {"code": "python-code"})
    max_bytes_per_domain: int | None = 32_000_000
    overrides: dict[str, Any] = field(default_factory=lambda: {"micro_batch": 16})
    warmup_steps: int = 5
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 1
    accelerator: Literal["cpu", "gpu"] = "cpu"
    cache_dir: str | None = None
    timeout_s: float = 8 * 3600
    parallel: int = 1

    def __post_init__(self) -> None:
        self.num_experts = tuple(sorted(set(self.num_experts)))
        self.local_num_experts = tuple(sorted(set(self.local_num_experts)))
        self.dense_widths = tuple(sorted(set(self.dense_widths)))
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"models ({', '.join(unknown) or 'empty'}) must be among: {', '.join(MODELS)}")
        self.models = tuple(m for m in MODELS if m in self.models)  # canonical order
        if self.accelerator not in ("cpu", "gpu"):
            raise ValueError(f"accelerator ({self.accelerator!r}) must be one of: cpu, gpu")
        positive = ("steps", "eval_every", "limit_val_batches", "batch_size", "block_size", "threads")
        for key in (*positive, "granularity", "checkpoint_every", "parallel"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} ({getattr(self, key)}) must be ≥ 1")
        recipe = self.recipe()
        k = recipe["num_active_experts"]
        smallest = min((*self.num_experts, *self.local_num_experts), default=0)
        if not self.num_experts or smallest < k:
            raise ValueError(f"num_experts {self.num_experts} must each be ≥ num_active_experts ({k})")
        if max((*self.num_experts, *self.local_num_experts, self.fine_experts)) > MAX_EXPERTS:
            raise ValueError(f"every n must be ≤ {MAX_EXPERTS:,}")
        if not 0 <= self.warmup_steps < self.steps or not 0 <= self.lr_warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) and lr_warmup_steps ({self.lr_warmup_steps}) must be in "
                f"[0, steps ({self.steps}))"
            )
        hidden = recipe.get("expert_hidden") or 4 * recipe["d_model"]
        if hidden % self.granularity:
            raise ValueError(f"granularity ({self.granularity}) must divide the expert's hidden width ({hidden})")

    def recipe(self) -> dict[str, Any]:
        """``configs/streamed.yaml``'s ``model.init_args`` with :attr:`overrides` on top."""
        options = yaml.safe_load((CONFIGS / RECIPE_FILE).read_text())["model"]["init_args"]
        return {**options, **self.overrides}

    @property
    def fine_experts(self) -> int:
        """n of the fine-grained recipe."""
        if self.fine_num_experts is not None:
            return self.fine_num_experts
        return min(max(self.num_experts) * self.granularity, MAX_EXPERTS)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    @classmethod
    def quick(cls, **changes: Any) -> FrontierConfig:
        """Seconds per run: width 16, one trunk layer, n ∈ {8, 64}, 6 steps of 4 × 32 bytes, one small file."""
        options: dict[str, Any] = dict(
            num_experts=(8, 64),
            local_num_experts=(8,),
            dense_widths=(16, 24),
            granularity=2,
            fine_num_experts=16,
            steps=6,
            lr_warmup_steps=2,
            eval_every=3,
            limit_val_batches=2,
            batch_size=4,
            block_size=32,
            domains={"prose": "stdlib-docs"},
            max_bytes_per_domain=60_000,
            overrides={"d_model": 16, "n_heads": 2, "n_shared_layers": 1, "micro_batch": 2},
            warmup_steps=2,
            checkpoint_every=2,
            timeout_s=300,
        )
        return cls(**{**options, **changes})

    @classmethod
    def gpu(cls, **changes: Any) -> FrontierConfig:
        """A GPU session's size (not yet measured): d = 512 with experts d → 512 → d (a record with its Adam
        state is 6.3 MB, n = 4,096 stores 26 GB), every n of ``GlobalMoE`` resident, T = 201 M tokens."""
        options: dict[str, Any] = dict(
            accelerator="gpu",
            global_moe_max=4096,
            dense_widths=(512, 768, 1024),
            steps=6144,
            lr_warmup_steps=200,
            eval_every=1024,
            batch_size=256,
            block_size=128,
            max_bytes_per_domain=None,
            overrides={"d_model": 512, "n_heads": 8, "expert_hidden": 512},
            checkpoint_every=500,
        )
        return cls(**{**options, **changes})


class RunPlan(NamedTuple):
    """One run: ``model`` of :data:`MODELS` at ``size``: n for the MoEs, d_model for ``dense``."""

    model: str
    size: int

    @property
    def num_experts(self) -> int | None:
        return None if self.model == "dense" else self.size

    @property
    def slug(self) -> str:
        return f"dense_d{self.size}" if self.model == "dense" else f"{self.model}_n{self.size}"

    @property
    def label(self) -> str:
        return f"DenseLM d={self.size}" if self.model == "dense" else f"{LABELS[self.model]} n={self.size}"


def plan_runs(config: FrontierConfig) -> list[RunPlan]:
    """The dense models and the smallest MoEs first, the most costly runs last: a benchmark cut short still has
    the frontier's reference points."""
    runs = [RunPlan("dense", d) for d in config.dense_widths] if "dense" in config.models else []
    for n in config.num_experts:
        if "global_moe" in config.models and n <= config.global_moe_max:
            runs.append(RunPlan("global_moe", n))
        if "exact" in config.models:
            runs.append(RunPlan("exact", n))
        if "local" in config.models and n in config.local_num_experts:
            runs.append(RunPlan("local", n))
    if "local" in config.models:
        runs += [RunPlan("local", n) for n in config.local_num_experts if n not in config.num_experts]
    if "fine" in config.models:
        runs.append(RunPlan("fine", config.fine_experts))
    return runs


def build_model(config: FrontierConfig, plan: RunPlan, store_dir: str):
    """The LightningModule of ``plan`` under the shared schedule; every model from the same recipe, seed and
    clipping."""
    from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM, with_warmup_cosine

    recipe = config.recipe()
    shared_keys = ("d_model", "n_shared_layers", "n_heads", "num_active_experts", "expert_hidden", "lr")
    common = {k: recipe[k] for k in (*shared_keys, "grad_clip") if k in recipe}
    common.update(seed=config.seed)
    moe = {k: recipe[k] for k in ("router", "balance_coef") if k in recipe}
    hidden = recipe.get("expert_hidden") or 4 * recipe["d_model"]  # one expert's hidden width
    if plan.model == "dense":  # the MoE's FFN (k experts wide), whatever the width
        model = DenseLM(**{**common, "d_model": plan.size, "expert_hidden": hidden})
    elif plan.model == "global_moe":
        model = GlobalMoE(**common, **moe, num_experts=plan.size)
    else:
        options = {**recipe, **common, **STREAMED, "local_lr": recipe["lr"]}
        options.update(objective="local" if plan.model == "local" else "exact", num_experts=plan.size)
        if plan.model == "fine":
            options.update(  # G × the slots of 1/G the size, computed 2G at a time (bench_engine's exact G=8)
                expert_hidden=hidden // config.granularity,
                num_active_experts=recipe["num_active_experts"] * config.granularity,
                expert_cache=STREAMED["expert_cache"] * config.granularity // 2,
                expert_batch=2 * config.granularity,
            )
        model = PragnosiaLM(**{**options, "store_dir": store_dir})
    return with_warmup_cosine(model, config.lr_warmup_steps, config.steps)


def parameter_counts(model) -> dict[str, int]:
    """``active`` parameters (what one token uses) and ``total`` ones (every expert)."""
    from pragnosia_pl import GlobalMoE, PragnosiaLM

    shared = sum(p.numel() for p in model.parameters())
    if isinstance(model, PragnosiaLM):
        k, n, expert = model.hparams.num_active_experts, model.hparams.num_experts, model.layout.num_params
        layers = len(model.routers)
        return {"active": shared + layers * k * expert, "total": shared + layers * n * expert}
    if isinstance(model, GlobalMoE):
        k, n = model.hparams.num_active_experts, model.hparams.num_experts
        expert = sum(p.numel() for p in model.experts[0].parameters())
        return {"active": shared - len(model.routers) * (n - k) * expert, "total": shared}
    return {"active": shared, "total": shared}


def run_ledger():
    """A callback that keeps, across the processes of one resumed run, the training seconds, the wall seconds and
    the lifelong peak memory of the earlier processes (it rides in the run's checkpoints)."""
    from lightning.pytorch import Callback
    from typing_extensions import override

    from callbacks import process_peak_rss

    class Ledger(Callback):
        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.first_step = 0
            self.earlier = {"wall_seconds": 0.0, "peak_rss_bytes": 0.0, "cuda_peak_bytes": 0.0, "processes": 0}

        def peaks(self) -> dict[str, float]:
            import torch

            peaks = {"peak_rss_bytes": max(process_peak_rss() or 0.0, self.earlier["peak_rss_bytes"])}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                peaks["cuda_peak_bytes"] = max(
                    float(torch.cuda.max_memory_allocated()), self.earlier["cuda_peak_bytes"]
                )
            return peaks

        def wall_seconds(self) -> float:
            return self.earlier["wall_seconds"] + time.perf_counter() - self.started

        @override
        def state_dict(self) -> dict[str, Any]:
            return {
                **self.earlier,
                **self.peaks(),
                "wall_seconds": self.wall_seconds(),
                "processes": self.earlier["processes"] + 1,
            }

        @override
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.earlier = {**self.earlier, **state_dict}

        @override
        def on_train_start(self, trainer, pl_module) -> None:
            self.first_step = trainer.global_step

    return Ledger()


def train_run(config: FrontierConfig, plan: RunPlan, state_dir: Path) -> dict[str, Any]:
    """Train ``plan`` in this process, from its last checkpoint in ``state_dir`` if there is one, and measure it
    (what one isolated process of :func:`run_isolated` does)."""
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pragnosia_pl import PragnosiaLM
    from pragnosia_pl.checkpoint_io import AtomicCheckpointIO

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    seed_everything(config.seed, verbose=False)
    data = text_domains(config)
    model = build_model(config, plan, str(state_dir / "store"))
    recorder, ledger = step_recorder(config.tokens_per_step), run_ledger()
    checkpoints = ModelCheckpoint(
        dirpath=state_dir / "checkpoints", every_n_train_steps=config.checkpoint_every, save_last=True, save_top_k=0
    )
    last = state_dir / "checkpoints" / "last.ckpt"
    trainer = Trainer(
        accelerator=config.accelerator,
        devices=1,
        max_steps=config.steps,
        default_root_dir=state_dir,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=config.limit_val_batches,
        val_check_interval=min(config.eval_every, config.steps),
        check_val_every_n_epoch=None,
        callbacks=[recorder, ledger, checkpoints],
        plugins=[AtomicCheckpointIO()],
    )
    setup_seconds = time.perf_counter() - started
    trainer.fit(model, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
    if not recorder.curve or recorder.curve[-1]["step"] != trainer.global_step:
        trainer.validate(model, datamodule=data, verbose=False)
    seconds = [0.0, *recorder.step_seconds]
    for point in recorder.curve:  # training seconds so far: the x of the bpb-against-wall-time plot
        point["train_seconds"] = math.fsum(seconds[: point["step"] + 1])
    timed = recorder.step_seconds[config.warmup_steps :]
    result: dict[str, Any] = {
        "model": plan.model,
        "size": plan.size,
        "num_experts": plan.num_experts,
        "label": plan.label,
        "steps": trainer.global_step,
        "tokens": trainer.global_step * config.tokens_per_step,
        "final_bpb": recorder.curve[-1]["val/bpb"],
        "curve": recorder.curve,
        "tokens_per_s": len(timed) * config.tokens_per_step / sum(timed),
        "step_seconds_median": statistics.median(timed),
        "step_seconds": recorder.step_seconds,
        "train_seconds": math.fsum(recorder.step_seconds),
        "validation_seconds": recorder.validation_seconds,
        "setup_seconds": setup_seconds,
        "params": parameter_counts(model),
        "wall_seconds": ledger.wall_seconds(),
        "processes": ledger.earlier["processes"] + 1,
        "runs_at_once": config.parallel,  # of the last process (its wall time shared the machine with the others)
        "data": data.summary(),
    }
    peaks = ledger.peaks()
    result["memory_metric"] = "cuda_peak" if "cuda_peak_bytes" in peaks else "peak_rss"
    result["peak_mib"] = peaks[f"{result['memory_metric']}_bytes"] / 2**20
    result["peak_rss_mib"] = peaks["peak_rss_bytes"] / 2**20
    if isinstance(model, PragnosiaLM):
        stats = model.memory_stats()
        steps_here = trainer.global_step - ledger.first_step  # the store's counters start with the process
        if steps_here:
            result["touched_per_step"] = stats["expert_updates"] / steps_here / len(model.routers)
        result["experts_used"] = len(model.usage)
        model.experts().flush()
        model.store.close()
    return result


def run_isolated(config: FrontierConfig, plan: RunPlan, state_dir: Path) -> dict[str, Any]:
    """Run ``plan`` in a fresh Python process (this module's ``__main__``), its checkpoints and store in
    ``state_dir``, and return its result.

    Raises:
        RuntimeError: the run failed or ran past ``timeout_s``, with the end of its output; its last checkpoint
            stays in ``state_dir`` for the next try.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    out = state_dir / "result.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.frontier", json.dumps(asdict(config)), json.dumps(plan), str(state_dir)]
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
    with tempfile.TemporaryDirectory(prefix="pragnosia-frontier-") as cwd:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=config.timeout_s, env=env, cwd=cwd)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(
                f"frontier: {plan.label} ran past {config.timeout_s:.0f} s; the same command resumes it from its last "
                f"checkpoint in {state_dir}"
            ) from error
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"frontier: {plan.label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def machine_description(config: FrontierConfig) -> str:
    import torch

    gpu = config.accelerator == "gpu" and torch.cuda.is_available()
    torch.set_num_threads(config.threads)
    return report.machine_description(torch.cuda.get_device_name() if gpu else "")


def load_report(config: FrontierConfig, path: Path, command: str) -> dict[str, Any]:
    """The report at ``path`` to resume, or a new one.

    Raises:
        ValueError: the report there was written with another config (mixing them would not be a comparison).
    """
    wanted = json.loads(json.dumps(asdict(config)))
    if path.is_file():
        report = json.loads(path.read_text())
        # the RUN_CHOICES only choose which runs there are: a run's result does not depend on them, so a report may
        # gain runs (a larger n, another model) under the union of the choices
        keys = sorted(
            k
            for k in wanted
            if k not in (*RUN_CHOICES, "timeout_s", "parallel") and report["config"].get(k) != wanted[k]
        )
        if keys:
            raise ValueError(
                f"{path} holds runs of another config (differs in: {', '.join(keys)}); resume with the same "
                "options, or give another --out"
            )
        old = report["config"]
        report["config"] = {
            **wanted,
            **{key: sorted(set(old[key]) | set(wanted[key])) for key in RUN_CHOICES if isinstance(wanted[key], list)},
            "models": [m for m in MODELS if m in old["models"] or m in wanted["models"]],
            "global_moe_max": max(old["global_moe_max"], wanted["global_moe_max"]),
        }
        report.setdefault("commands", []).append(command)
        return report
    return {
        "benchmark": "frontier",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_description(config),
        "command": command,
        "commands": [command],
        "config": wanted,
        "recipe": config.recipe(),
        "runs": {},
    }


def run(config: FrontierConfig, out: Path, command: str = "", log=print) -> dict[str, Any]:
    """Run every missing run of ``config`` (each in its own process, continuing from its checkpoint where a
    previous session stopped it) and write the report after each one."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    path = out / "frontier.json"
    report = load_report(config, path, command)
    plans = plan_runs(config)
    todo = [plan for plan in plans if plan.slug not in report["runs"]]
    if len(todo) < len(plans):
        log(f"frontier: resuming {path}: {len(plans) - len(todo)} of {len(plans)} runs done")
    order = [plan.slug for plan in plans]
    with (
        tqdm(total=len(plans), initial=len(plans) - len(todo), desc="frontier", unit="run") as bar,
        ThreadPoolExecutor(max_workers=config.parallel) as pool,
    ):
        running = {}
        for plan in todo:
            state_dir = out / STATE / plan.slug
            resumed = (state_dir / "checkpoints" / "last.ckpt").is_file()
            bar.write(f"frontier: {plan.label}" + (" (resumed from its checkpoint)" if resumed else "") + " queued")
            running[pool.submit(run_isolated, config, plan, state_dir)] = (plan, state_dir)
        for future in as_completed(running):
            plan, state_dir = running[future]
            result = future.result()  # a failure raises here; the runs still going finish first (the pool's exit)
            runs = {**report["runs"], plan.slug: result}  # in the plan's order, whatever order they finished in
            report["runs"] = {
                slug: runs[slug] for slug in sorted(runs, key=lambda s: order.index(s) if s in order else len(order))
            }
            report["updated"] = time.strftime("%Y-%m-%d %H:%M")
            write_report(report, out)
            shutil.rmtree(state_dir, ignore_errors=True)  # its store may be gigabytes; the JSON holds the result
            bar.update()
            bar.write(
                f"frontier: {plan.label}: val bpb {result['final_bpb']:.3f}, {result['tokens_per_s']:,.0f} tokens/s, "
                f"peak {result['peak_mib']:,.0f} MiB, {result['wall_seconds'] / 60:.1f} min"
            )
    write_report(report, out)
    return report


def estimate(config: FrontierConfig, probe_steps: int = 12, log=print) -> dict[str, Any]:
    """Minutes each run of ``config`` should take, from a probe of ``probe_steps`` steps of each run (isolated, as
    the real ones): set-up + ``steps`` × the probe's median step time + the validations × one validation's time.

    Routing collapses onto a few experts in the first steps and spreads again within about a hundred, so the probe's
    median under-estimates the large n of the MoEs; its ``step_seconds_max`` (the first steps) is the other bound.
    """
    from tqdm.auto import tqdm

    probe = replace(
        config,
        steps=probe_steps,
        eval_every=probe_steps,
        warmup_steps=min(2, probe_steps - 1),
        lr_warmup_steps=min(config.lr_warmup_steps, probe_steps - 1),
        checkpoint_every=probe_steps + 1,
    )
    validations = config.steps // config.eval_every + (config.steps % config.eval_every != 0)
    runs = {}
    for plan in tqdm(plan_runs(config), desc="estimate", unit="run"):
        with tempfile.TemporaryDirectory(prefix="pragnosia-frontier-probe-") as state:
            r = run_isolated(probe, plan, Path(state))
        validation = statistics.fmean(r["validation_seconds"])
        seconds = r["setup_seconds"] + config.steps * r["step_seconds_median"] + validations * validation
        runs[plan.slug] = {
            "step_seconds_median": r["step_seconds_median"],
            "step_seconds_max": max(r["step_seconds"][probe.warmup_steps :]),
            "validation_seconds": validation,
            "setup_seconds": r["setup_seconds"],
            "peak_mib": r["peak_mib"],
            "minutes": seconds / 60,
        }
        log(f"estimate: {plan.label}: {runs[plan.slug]}")
    return {"probe_steps": probe_steps, "runs": runs, "total_minutes": sum(r["minutes"] for r in runs.values())}


def _child(config_json: str, plan_json: str, state_dir: str) -> None:
    config = FrontierConfig(**json.loads(config_json))
    plan = RunPlan(*json.loads(plan_json))
    result = train_run(config, plan, Path(state_dir))
    (Path(state_dir) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _child(*sys.argv[1:4])
