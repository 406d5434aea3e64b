"""How fast: training tokens/s of ``PragnosiaLM`` per expert store and cache size, and of ``GlobalMoE`` (issue 6).

All contenders of one n live in one process and take turns: every round, each trains one window of
``window_steps`` batches (the same batches for all, new ones each round), in an order that rotates from
round to round, so drift in the machine's load hits every contender alike and every ratio is measured in
the same run. The first round is warm-up. Expert stores start *materialized* (every record written once),
so host and disk reads are real reads, as in a long run.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.recipes import method_options, text_domains
from bench.report import load_average, markdown_table, provenance, report_header

STORE_KINDS = ("device", "host", "disk")


@dataclass
class ThroughputConfig:
    """One throughput benchmark.

    Args:
        num_experts: n values; each is one group of interleaved contenders.
        stores: ``PragnosiaLM`` stores to time.
        cache_factors: expert caches to time, as multiples of S (``expert_cache = f·S``, at most n).
        window_steps: training steps per contender and round; the first ``skip_steps`` of each are not timed
            (a new ``Trainer`` and optimizer state).
        rounds: timed rounds, after ``warmup_rounds`` untimed ones.
        global_moe: time ``GlobalMoE`` too.
        threads: torch CPU threads (``None``: torch's default); see ``QualityConfig.threads``.
        recipe: the shipped config whose method every ``PragnosiaLM`` contender trains (its store and
            ``expert_cache`` are the contender's).
        pragnosia: extra ``PragnosiaLM`` keyword arguments, over the recipe.

    Raises:
        ValueError: on an unknown store or a non-positive size.
    """

    num_experts: tuple[int, ...] = (8, 64, 512)
    stores: tuple[str, ...] = STORE_KINDS
    cache_factors: tuple[int, ...] = (1, 4)
    global_moe: bool = True
    d_model: int = 128
    n_shared_layers: int = 2
    n_heads: int = 4
    num_active_experts: int = 2
    block_size: int = 128
    batch_size: int = 16
    window_steps: int = 8
    skip_steps: int = 1
    rounds: int = 4
    warmup_rounds: int = 1
    max_bytes_per_domain: int | None = 1_000_000
    domains: dict[str, str] = field(default_factory=lambda: {"code": "stdlib-code", "prose": "stdlib-docs"})
    recipe: str = "quickstart.yaml"
    pragnosia: dict[str, Any] = field(default_factory=dict)
    threads: int | None = 1
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.num_experts = tuple(self.num_experts)
        self.stores = tuple(self.stores)
        self.cache_factors = tuple(self.cache_factors)
        unknown = [s for s in self.stores if s not in STORE_KINDS]
        if unknown or not self.stores:
            raise ValueError(f"stores ({', '.join(unknown) or 'empty'}) must be among: {', '.join(STORE_KINDS)}")
        for key in ("window_steps", "rounds", "batch_size", "block_size", "d_model"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} ({getattr(self, key)}) must be ≥ 1")
        if not 0 <= self.skip_steps < self.window_steps:
            raise ValueError(f"skip_steps ({self.skip_steps}) must be in [0, window_steps={self.window_steps})")
        if not self.cache_factors or min(self.cache_factors) < 1:
            raise ValueError(f"cache_factors {self.cache_factors} must each be ≥ 1")
        if not self.num_experts or min(self.num_experts) < self.expert_slots:
            raise ValueError(f"num_experts {self.num_experts} must each be ≥ expert_slots ({self.expert_slots})")

    @classmethod
    def quick(cls, **overrides: Any) -> ThroughputConfig:
        """A tiny run (seconds): width 32, one trunk layer, n=8, one timed round of 3 steps."""
        options: dict[str, Any] = dict(
            num_experts=(8,),
            d_model=32,
            n_shared_layers=1,
            n_heads=2,
            block_size=32,
            batch_size=4,
            window_steps=3,
            rounds=1,
            max_bytes_per_domain=60_000,
        )
        options.update(overrides)
        return cls(**options)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    @property
    def expert_slots(self) -> int:
        """S of the recipe, the unit of ``cache_factors``."""
        return {**method_options(self.recipe), **self.pragnosia}["expert_slots"]


@dataclass
class Contender:
    """One timed configuration: ``GlobalMoE`` (``store`` is ``None``) or ``PragnosiaLM`` with a store and cache."""

    num_experts: int
    store: str | None = None
    expert_cache: int | None = None
    model: Any = None
    step_seconds: list[float] = field(default_factory=list)
    window_seconds: list[float] = field(default_factory=list)
    cache_hits: float = 0.0
    cache_loads: float = 0.0

    @property
    def label(self) -> str:
        if self.store is None:
            return f"GlobalMoE n={self.num_experts}"
        return f"PragnosiaLM n={self.num_experts} {self.store} cache={self.expert_cache}"


def plan_contenders(config: ThroughputConfig, num_experts: int) -> list[Contender]:
    """The contenders of one n: every store × cache size, then ``GlobalMoE``."""
    caches = sorted({min(f * config.expert_slots, num_experts) for f in config.cache_factors})
    contenders = [Contender(num_experts, store, cache) for cache in caches for store in config.stores]
    if config.global_moe:
        contenders.append(Contender(num_experts))
    return contenders


def build_model(config: ThroughputConfig, contender: Contender, root: str):
    """The contender's module, its expert store materialized (every record written once)."""
    import torch

    from pragnosia_pl import GlobalMoE, PragnosiaLM

    common = dict(
        d_model=config.d_model,
        n_shared_layers=config.n_shared_layers,
        n_heads=config.n_heads,
        num_experts=contender.num_experts,
        num_active_experts=config.num_active_experts,
    )
    if contender.store is None:
        return GlobalMoE(**common)
    store_dir = Path(root) / f"n{contender.num_experts}-{contender.store}-c{contender.expert_cache}"
    options = {**common, **method_options(config.recipe), **config.pragnosia, "seed": config.seed}
    options.update(expert_cache=contender.expert_cache, store=contender.store, store_dir=str(store_dir))
    model = PragnosiaLM(**options)
    store = model.store
    if store.kind != "device":  # the device store holds every initial record already
        record = torch.empty(store.record_numel)
        for expert_id in range(store.num_experts):
            store.read(expert_id, record)
            store.write(expert_id, record)
        store.synchronize()
    return model


def _step_timer():
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        """Wall time of every training step (``on_train_batch_start`` to ``on_train_batch_end``)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _synchronize(pl_module.device)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _synchronize(pl_module.device)
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_trainer(steps: int, root: str, callback, precision: str = "32-true"):
    """A bare ``Trainer`` for ``steps`` training steps at ``precision``: no logger, checkpoints, progress bar or
    validation."""
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="auto",
        devices=1,
        precision=precision,
        max_steps=steps,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
    )


def train_window(model, batches: list, root: str, skip_steps: int = 1, precision: str = "32-true") -> list[float]:
    """Train ``model`` on ``batches`` with a fresh ``Trainer`` at ``precision``; the seconds of its steps after the
    first ``skip_steps``."""
    from torch.utils.data import DataLoader

    timer = _step_timer()
    trainer = timing_trainer(len(batches), root, timer, precision)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return timer.seconds[skip_steps:]


def draw_batches(config: ThroughputConfig, count: int) -> list:
    """``count`` training batches of the mixed domains, in the data module's seeded order."""
    data = text_domains(config)
    batches = []
    while len(batches) < count:
        for batch in data.train_dataloader():
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def run_group(config: ThroughputConfig, num_experts: int, batches: list, root: str, log=print) -> list[dict]:
    """Time every contender of one n, interleaved round by round; their results."""
    from lightning.pytorch import seed_everything

    contenders = plan_contenders(config, num_experts)
    for contender in contenders:
        seed_everything(config.seed, verbose=False)
        contender.model = build_model(config, contender, root)
    W = config.window_steps
    for round_index in range(config.warmup_rounds + config.rounds):
        timed = round_index >= config.warmup_rounds
        window = batches[round_index * W : (round_index + 1) * W]
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            before = _cache_counters(contender)
            seconds = train_window(contender.model, window, root, config.skip_steps)
            if timed:
                after = _cache_counters(contender)
                contender.step_seconds += seconds
                contender.window_seconds.append(sum(seconds))
                contender.cache_hits += after[0] - before[0]
                contender.cache_loads += after[1] - before[1]
        log(f"throughput: n={num_experts} round {round_index + 1}/{config.warmup_rounds + config.rounds} done")
    results = [summarize(config, c) for c in contenders]
    for contender in contenders:
        if contender.store is not None:
            contender.model.store.close()
        contender.model = None
    add_ratios(results, contenders)
    return results


def _cache_counters(contender: Contender) -> tuple[float, float]:
    if contender.store is None:
        return 0.0, 0.0
    stats = contender.model.experts().stats()
    return stats["hits"], stats["loads"]


def summarize(config: ThroughputConfig, contender: Contender) -> dict:
    steps = contender.step_seconds
    mean = statistics.fmean(steps)
    result = {
        "label": contender.label,
        "model": "GlobalMoE" if contender.store is None else "PragnosiaLM",
        "num_experts": contender.num_experts,
        "store": contender.store,
        "expert_cache": contender.expert_cache,
        "timed_steps": len(steps),
        "step_ms_mean": 1e3 * mean,
        "step_ms_median": 1e3 * statistics.median(steps),
        "tokens_per_s": config.tokens_per_step / mean,
    }
    if contender.store is not None:
        result["cache_hit_rate"] = contender.cache_hits / contender.cache_loads if contender.cache_loads else math.nan
    return result


def add_ratios(results: list[dict], contenders: list[Contender]) -> None:
    """Step time relative to the device store with the same cache, and speed relative to ``GlobalMoE``.

    A ratio is the median over rounds of the ratio of the two windows' times in that round (both trained
    on the same batches, close in time), so a slow spell on the machine cancels out.
    """
    windows = {(c.store, c.expert_cache): c.window_seconds for c in contenders}
    moe = windows.get((None, None))
    for result, contender in zip(results, contenders):
        if contender.store is None:
            continue
        own = contender.window_seconds
        device = windows.get(("device", contender.expert_cache))
        if device is not None:
            result["step_time_vs_device"] = statistics.median(a / b for a, b in zip(own, device))
        if moe is not None:
            result["speed_vs_global_moe"] = statistics.median(b / a for a, b in zip(own, moe))


def run_throughput(config: ThroughputConfig, out_dir: str | Path, log=print, command: str = "") -> dict:
    """Run the benchmark and write ``throughput.json`` and ``throughput.md`` to ``out_dir``."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started, load = time.time(), load_average()
    batches = draw_batches(config, (config.warmup_rounds + config.rounds) * config.window_steps)
    results = []
    with tempfile.TemporaryDirectory(prefix="pragnosia-throughput-") as root:
        for n in config.num_experts:
            results += run_group(config, n, batches, root, log)
    report = {
        **report_header("throughput", started, config, command, load),
        "tokens_per_step": config.tokens_per_step,
        "results": results,
        "goals": throughput_goals(results),
    }
    (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "throughput.md").write_text(throughput_markdown(report))
    return report


def throughput_goals(results: list[dict], max_store_ratio: float = 1.15, min_n_for_moe: int = 64) -> dict:
    """Host and disk step time ≤ ``max_store_ratio`` × the device store's; PragnosiaLM ≥ GlobalMoE at n ≥ 64."""
    store_ratios = [r["step_time_vs_device"] for r in results if r.get("store") in ("host", "disk")]
    moe_ratios = [
        r["speed_vs_global_moe"] for r in results if "speed_vs_global_moe" in r and r["num_experts"] >= min_n_for_moe
    ]
    return {
        "max_store_ratio": max_store_ratio,
        "worst_store_ratio": max(store_ratios, default=math.nan),
        "stores_within": all(r <= max_store_ratio for r in store_ratios) if store_ratios else None,
        "min_speed_vs_global_moe_at_n_ge_64": min(moe_ratios, default=math.nan),
        "faster_than_global_moe": all(r >= 1.0 for r in moe_ratios) if moe_ratios else None,
    }


def throughput_markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        "# Throughput: training tokens/s by expert store and cache",
        "",
        f"{report['machine']}, {report['date']}; {report['wall_minutes']:.0f} min wall.",
        "",
        f"d={config['d_model']}, {config['n_shared_layers']} trunk layers, k={config['num_active_experts']}, "
        f"configs/{config['recipe']}, batch {config['batch_size']}×{config['block_size']} bytes. Contenders of one n "
        f"take turns, {config['rounds']} timed rounds of {config['window_steps'] - config['skip_steps']} steps "
        f"(+{config['warmup_rounds']} warm-up round), same batches per round. Ratios are medians over rounds of "
        "per-round ratios (same run, same batches). Cache hit rate: loads served from a device slot, an expert "
        "prefetched while the previous one trained included.",
        "",
    ]

    def fmt(r: dict, key: str) -> str:
        value = r.get(key)
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"

    header = ["n", "model", "store", "cache", "tokens/s", "step ms (median)", "step time / device store"]
    header += ["speed / GlobalMoE", "cache hit rate"]
    rows = [
        [
            r["num_experts"],
            r["model"],
            r["store"] or "—",
            r["expert_cache"] or "—",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_ms_median']:.1f}",
            fmt(r, "step_time_vs_device"),
            fmt(r, "speed_vs_global_moe"),
            fmt(r, "cache_hit_rate"),
        ]
        for r in report["results"]
    ]
    lines += markdown_table(header, rows)
    return "\n".join([*lines, "", *goal_lines(report), ""])


def goal_lines(report: dict) -> list[str]:
    """The benchmark's two goals, met or not."""
    goals = report["goals"]
    faster = goals["faster_than_global_moe"]
    return [
        f"- host/disk step time ≤ {goals['max_store_ratio']} × device: "
        f"{'yes' if goals['stores_within'] else '**no**'} (worst {goals['worst_store_ratio']:.3f})",
        "- PragnosiaLM ≥ GlobalMoE speed at n ≥ 64: "
        + ("n/a" if faster is None else "yes" if faster else "**no**")
        + f" (slowest ratio {goals['min_speed_vs_global_moe_at_n_ge_64']:.2f})",
    ]


def summary_table(report: dict) -> list[str]:
    """One row per n: PragnosiaLM's tokens/s by store for each cache, the range of the stores' step-time ratios to the
    device store's, GlobalMoE's tokens/s and the range of PragnosiaLM's speed ratios to it."""
    stores = report["config"]["stores"]
    rows = []
    for n in sorted({r["num_experts"] for r in report["results"]}):
        ours = [r for r in report["results"] if r["num_experts"] == n and r["store"]]
        moe = next((r for r in report["results"] if r["num_experts"] == n and not r["store"]), None)
        by_cache = [
            " / ".join(f"{r['tokens_per_s']:,.0f}" for r in ours if r["expert_cache"] == cache) + f" (cache {cache})"
            for cache in sorted({r["expert_cache"] for r in ours})
        ]
        store_ratios = [r["step_time_vs_device"] for r in ours if r["store"] != "device" and "step_time_vs_device" in r]
        moe_ratios = [r["speed_vs_global_moe"] for r in ours if "speed_vs_global_moe" in r]
        rows.append(
            [n, "; ".join(by_cache), _span(store_ratios), "" if moe is None else f"{moe['tokens_per_s']:,.0f}"]
            + [_span(moe_ratios)]
        )
    header = ["n", f"PragnosiaLM tokens/s ({' / '.join(stores)} store)", "step time ÷ device store's"]
    return markdown_table([*header, "GlobalMoE tokens/s", "PragnosiaLM speed ÷ GlobalMoE's"], rows, align="rllrl")


def _span(values: list[float]) -> str:
    return "" if not values else f"{min(values):.2f}–{max(values):.2f}"


def trend_lines(report: dict) -> list[str]:
    """PragnosiaLM's tokens/s (first store, smallest cache) and GlobalMoE's from the smallest n to the largest."""
    ns = sorted({r["num_experts"] for r in report["results"]})
    if len(ns) < 2:
        return []
    store = report["config"]["stores"][0]
    ours: dict[int, dict] = {}
    for r in report["results"]:
        if r["store"] == store and r["expert_cache"] < ours.get(r["num_experts"], {}).get("expert_cache", math.inf):
            ours[r["num_experts"]] = r
    moe = {r["num_experts"]: r for r in report["results"] if not r["store"]}
    cache = min(r["expert_cache"] for r in ours.values())
    line = f"- From n = {ns[0]:,} to {ns[-1]:,}: PragnosiaLM ({store} store, cache {cache}) " + " → ".join(
        f"{ours[n]['tokens_per_s']:,.0f}" for n in ns if n in ours
    )
    if moe:
        line += " tokens/s, GlobalMoE " + " → ".join(f"{moe[n]['tokens_per_s']:,.0f}" for n in ns if n in moe)
    faster = [n for n in ns if n in moe and n in ours and moe[n]["tokens_per_s"] > ours[n]["tokens_per_s"]]
    return [line + " tokens/s" + (f"; GlobalMoE is faster at n = {', '.join(map(str, faster))}." if faster else ".")]


def slow_step_notes(report: dict, ratio: float = 1.25) -> list[str]:
    """Contenders whose mean step (what tokens/s uses) is ``ratio`` × their median step or more: a few slow steps."""
    return [
        f"- {r['label']}: tokens/s from its mean step, {r['step_ms_mean']:.1f} ms, pulled up by a few slow steps; its "
        f"median step is {r['step_ms_median']:.1f} ms (the ratio columns use per-round medians)."
        for r in report["results"]
        if r["step_ms_mean"] >= ratio * r["step_ms_median"]
    ]


def profile_step(
    config: ThroughputConfig,
    num_experts: int,
    store: str,
    expert_cache: int,
    steps: int = 6,
    row_limit: int = 30,
    command: str = "",
) -> tuple[str, dict]:
    """``torch.profiler`` table (self CPU time) of ``steps`` training steps of one ``PragnosiaLM`` contender, and its
    report (the ``row_limit`` ops of most self CPU time: share of self CPU time, of CPU time, calls)."""
    import torch
    from lightning.pytorch import Callback, seed_everything
    from torch.profiler import ProfilerActivity, profile

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    batches = draw_batches(config, steps + 2)

    class Profiled(Callback):
        def __init__(self) -> None:
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 2:
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == steps + 1:
                self.prof.__exit__(None, None, None)

    from torch.utils.data import DataLoader

    with tempfile.TemporaryDirectory(prefix="pragnosia-profile-") as root:
        seed_everything(config.seed, verbose=False)
        contender = Contender(num_experts, store, expert_cache)
        model = build_model(config, contender, root)
        profiled = Profiled()
        trainer = timing_trainer(len(batches), root, profiled)
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
        model.store.close()
    events = profiled.prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = [
        {
            "name": e.key,
            "self_cpu_percent": 100 * e.self_cpu_time_total / total,
            "cpu_total_percent": 100 * e.cpu_time_total / total,
            "calls": e.count,
        }
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    ]
    report = {
        "benchmark": "throughput_profile",
        **provenance(command),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "num_experts": num_experts,
        "store": store,
        "expert_cache": expert_cache,
        "steps": steps,
        "self_cpu_ms_total": total / 1e3,
        "ops": ops,
    }
    return events.table(sort_by="self_cpu_time_total", row_limit=row_limit), report


# What a profile's summary adds up: each group's ops are those whose name contains one of its words.
PROFILE_GROUPS = {
    "matrix multiplies": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("scaled_dot_product",),
    "GELU": ("gelu",),
    "copies": ("aten::copy_",),
    "AdamW": ("AdamW",),
    "kernel launches": ("cudaLaunchKernel",),
}


def profile_lines(profile: dict, top: int = 8) -> list[str]:
    """A profile report's ops of most self CPU time, and the share of each of :data:`PROFILE_GROUPS`."""
    steps = profile["steps"]
    rows = [
        [f"`{op['name']}`", f"{op['self_cpu_percent']:.1f}%", f"{op['calls'] / steps:,.0f}"]
        for op in profile["ops"][:top]
    ]
    shares = []
    for group, words in PROFILE_GROUPS.items():
        ops = [op for op in profile["ops"] if any(word in op["name"] for word in words)]
        if ops:
            share = sum(op["self_cpu_percent"] for op in ops)
            shares.append(f"{group} {share:.1f}% ({sum(op['calls'] for op in ops) / steps:,.0f} calls per step)")
    return [
        f"Self CPU time of {steps} steps ({profile['self_cpu_ms_total']:.0f} ms in all): " + ", ".join(shares) + ".",
        "",
        *markdown_table(["op", "self CPU", "calls per step"], rows, align="lrr"),
    ]
