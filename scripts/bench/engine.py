"""Step time and store reads of the expert-major engine's recipes against GlobalMoE and DenseLM (issue 15).

Every contender of one n lives in one process and they take turns: each round, each trains one window of
``window_steps`` batches (the same batches for all, new ones each round) with a fresh ``Trainer``, in an order that
rotates from round to round, so the machine's drift hits all alike and every ratio comes from the same run. The
first round is warm-up; the first step of each window is not timed. Disk stores start materialized (every record
written once), so reads are real reads, as in a long run. With several ``precisions`` every recipe runs at each,
as contenders of the same rounds.

The recipes are the shipped configs (``configs/*.yaml``, model section) with ``num_experts``, the store and its
folder replaced. The baselines take the options of ``configs/streamed.yaml`` they accept: ``GlobalMoE`` its widths,
router, balance term, lr, seed and clipping (the model the ``exact`` recipe trains, update for update, so both touch
the same experts every step); ``DenseLM`` its widths, k, lr, seed and clipping (the trunk plus one FFN of k experts'
width: the same active parameters with no routing, the speed floor). ``DenseLM`` has no n: it runs in every n group,
so each ratio to it comes from the same interleaved run.
"""

from __future__ import annotations

import inspect
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.recipes import model_options
from bench.report import machine_description, page_header
from bench.throughput import ThroughputConfig, draw_batches, train_window

# name: (config file, PragnosiaLM overrides); None: the baseline of that name in pragnosia_pl, built from BASELINE
RECIPES: dict[str, tuple[str, dict[str, Any]] | None] = {
    "local S=2": ("quickstart.yaml", {}),
    "local S=8": ("quickstart.yaml", {"expert_slots": 8, "expert_cache": 8}),
    "local": ("quickstart.yaml", {"expert_slots": None, "expert_cache": 8}),
    "exact": ("streamed.yaml", {}),
    "bounded": ("bounded.yaml", {}),
    # fine-grained: n × 8 experts, hidden ÷ 8, k × 8; 16 of them computed together (32 slots: 4 G = 1 records)
    "exact G=8": ("streamed.yaml", {"granularity": 8, "expert_batch": 16, "expert_cache": 32}),
    "exact G=8 one by one": ("streamed.yaml", {"granularity": 8}),  # the same, one expert at a time
    "GlobalMoE": None,
    "DenseLM": None,
}
DEFAULT_RECIPES = tuple(name for name in RECIPES if "G=8" not in name)  # G = 8 on demand: n × 8 records
BASELINE = "streamed.yaml"
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # Lightning's, as the Trainer takes them (16-mixed: GPU)


@dataclass
class EngineBenchConfig:
    """One run of the benchmark.

    Args:
        num_experts: n values; each is one group of interleaved contenders.
        recipes: names from :data:`RECIPES`.
        global_moe_max: largest n at which ``GlobalMoE`` runs (every expert resident).
        precisions: ``Trainer`` precisions every contender runs at, interleaved in the same rounds.
        batch_size, block_size: the batch (sequences × bytes).
        train_before: steps each contender trains before it is timed: routing collapses onto a few experts in the
            first steps and the balance term spreads it again within about a hundred (n = 512: 234, 21, then 184
            experts touched at steps 1, 3 and 100), and a long run's step visits the spread-out set.
        window_steps, rounds, warmup_rounds: timing protocol (above).
        threads: torch CPU threads.
    """

    num_experts: tuple[int, ...] = (8, 64, 512, 4096)
    recipes: tuple[str, ...] = DEFAULT_RECIPES
    global_moe_max: int = 512
    precisions: tuple[str, ...] = ("32-true",)
    batch_size: int = 16
    block_size: int = 128
    train_before: int = 60
    window_steps: int = 4
    rounds: int = 3
    warmup_rounds: int = 1
    threads: int = 1
    seed: int = 0
    max_bytes_per_domain: int = 1_000_000
    overrides: dict[str, Any] = field(default_factory=dict)  # for every model (widths, router), over the configs

    def __post_init__(self) -> None:
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown:
            raise ValueError(f"recipes ({', '.join(unknown)}) must be among: {', '.join(RECIPES)}")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise ValueError(f"precisions ({', '.join(unknown) or 'empty'}) must be among: {', '.join(PRECISIONS)}")
        if self.window_steps < 2 or self.rounds < 1:
            raise ValueError(f"window_steps ({self.window_steps}) must be ≥ 2 and rounds ({self.rounds}) ≥ 1")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def label(self, recipe: str, precision: str) -> str:
        """A contender's name in the report: its recipe, and its precision where the run has others than 32-true."""
        return recipe if tuple(self.precisions) == ("32-true",) else f"{recipe} {precision}"


@dataclass
class Contender:
    recipe: str
    num_experts: int
    precision: str = "32-true"
    label: str = ""
    model: Any = None
    step_seconds: list[float] = field(default_factory=list)
    reads: float = 0.0
    updates: float = 0.0
    timed_steps: int = 0


def build(config: EngineBenchConfig, contender: Contender, root: Path):
    import torch

    from pragnosia_pl import PragnosiaLM

    recipe = RECIPES[contender.recipe]
    if recipe is None:
        return build_baseline(config, contender)
    options = recipe_options(config, contender.recipe, contender.num_experts)
    folder = root / f"{contender.label.replace(' ', '_').replace('=', '')}-n{contender.num_experts}"
    options.update(store="disk", store_dir=str(folder), seed=config.seed)
    model = PragnosiaLM(**options)
    store = model.store
    record = torch.empty(store.record_numel)
    for expert_id in range(store.num_experts):  # materialized: reads are reads, as in a long run
        store.read(expert_id, record)
        store.write(expert_id, record)
    store.synchronize()
    return model


def recipe_options(config: EngineBenchConfig, name: str, num_experts: int) -> dict[str, Any]:
    """``PragnosiaLM``'s options of recipe ``name`` in the group of ``num_experts``: with a ``granularity`` G (the
    fine-grained recipe, Krajewski et al. 2024), each expert split in G (hidden ÷ G), k × G of them active, n × G in
    all: the same active and total parameters as G = 1 at ``num_experts``."""
    config_file, overrides = RECIPES[name]
    options = {**model_options(config_file), **overrides, **config.overrides, "num_experts": num_experts}
    G = options.pop("granularity", 1)
    if G > 1:
        hidden = options.get("expert_hidden") or 4 * options["d_model"]
        options.update(
            expert_hidden=hidden // G,
            num_active_experts=options.get("num_active_experts", 2) * G,
            num_experts=num_experts * G,
        )
    return options


def build_baseline(config: EngineBenchConfig, contender: Contender):
    """``GlobalMoE`` or ``DenseLM`` with the options of :data:`BASELINE` and of ``config.overrides`` it accepts (the
    exact recipe's router: ``GlobalMoE`` and ``exact`` then touch the same experts)."""
    import pragnosia_pl

    model_class = getattr(pragnosia_pl, contender.recipe)
    accepted = inspect.signature(model_class.__init__).parameters
    options = {k: v for k, v in {**model_options(BASELINE), **config.overrides}.items() if k in accepted}
    if "num_experts" in accepted:
        options["num_experts"] = contender.num_experts
    model = model_class(**options, seed=config.seed)
    if hasattr(model, "routers"):
        model.touched_experts = 0  # experts routed to in training, counted as PragnosiaLM counts its expert updates
        for router in model.routers:
            router.register_forward_hook(partial(_count_touched, model))
    return model


def _count_touched(model, router, inputs, routing) -> None:
    if model.training:
        model.touched_experts += routing.working_set.numel()


def _counters(model) -> tuple[float, float]:
    """Store reads and experts touched (PragnosiaLM: expert updates) so far."""
    if not hasattr(model, "memory_stats"):
        return 0.0, float(getattr(model, "touched_experts", 0))
    stats = model.memory_stats()
    return stats.get("store_reads", 0.0), stats.get("expert_updates", 0.0)


def run_group(config: EngineBenchConfig, num_experts: int, batches: list, root: Path, log=print) -> list[dict]:
    names = [r for r in config.recipes if r != "GlobalMoE" or num_experts <= config.global_moe_max]
    contenders = [
        Contender(name, num_experts, precision, config.label(name, precision))
        for name in names
        for precision in config.precisions
    ]
    for contender in contenders:
        log(f"engine: n={num_experts} building {contender.label}")
        contender.model = build(config, contender, root)
    W = config.window_steps
    timed_batches, batches = (
        batches[: (config.warmup_rounds + config.rounds) * W],
        batches[len(batches) - config.train_before :],
    )
    if config.train_before:
        for contender in contenders:
            train_window(contender.model, batches, str(root), precision=contender.precision)
        log(f"engine: n={num_experts} trained {config.train_before} steps before timing")
    batches = timed_batches
    for round_index in range(config.warmup_rounds + config.rounds):
        window = batches[round_index * W : (round_index + 1) * W]
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            before = _counters(contender.model)
            seconds = train_window(contender.model, window, str(root), precision=contender.precision)
            if round_index >= config.warmup_rounds:
                after = _counters(contender.model)
                contender.step_seconds += seconds
                contender.reads += after[0] - before[0]
                contender.updates += after[1] - before[1]
                contender.timed_steps += W  # reads and updates count the untimed first step too
        log(f"engine: n={num_experts} round {round_index + 1}/{config.warmup_rounds + config.rounds} done")
    results = [summarize(config, c) for c in contenders]
    for contender in contenders:
        if hasattr(contender.model, "residency"):
            contender.model.store.close()
        contender.model = None
    for result in results:  # each against the baselines at its own precision
        baselines = {r["recipe"]: r["step_ms_median"] for r in results if r["precision"] == result["precision"]}
        for key, baseline in (("step_time_vs_global_moe", "GlobalMoE"), ("step_time_vs_dense", "DenseLM")):
            result[key] = result["step_ms_median"] / baselines[baseline] if baseline in baselines else None
        if "G=8" in result["recipe"] and "exact" in baselines:  # the fine-grained goal: ≤ 1.5 × G = 1's time
            result["step_time_vs_exact"] = result["step_ms_median"] / baselines["exact"]
    return results


def summarize(config: EngineBenchConfig, contender: Contender) -> dict:
    steps = contender.step_seconds
    result = {
        "recipe": contender.recipe,
        "precision": contender.precision,
        "label": contender.label,
        "num_experts": contender.num_experts,
        "timed_steps": len(steps),
        "step_ms_median": 1e3 * statistics.median(steps),
        "step_ms_mean": 1e3 * statistics.fmean(steps),
        "tokens_per_s": config.tokens_per_step / statistics.median(steps),
    }
    if contender.recipe == "DenseLM":
        return {**result, "reads_per_step": 0.0}  # no store, no experts
    result["touched_per_step"] = contender.updates / contender.timed_steps
    if contender.recipe != "GlobalMoE":
        options = recipe_options(config, contender.recipe, contender.num_experts)
        k = options.get("num_active_experts", 2)
        result["num_experts"] = options["num_experts"]
        result["reads_per_step"] = contender.reads / contender.timed_steps
        result["reads_per_touched_expert"] = contender.reads / max(contender.updates, 1.0)
        result["token_pairs_per_read"] = contender.timed_steps * config.tokens_per_step * k / max(contender.reads, 1)
    return result


def run(config: EngineBenchConfig, out: Path, log=print, command: str = "") -> dict:
    import torch

    torch.set_num_threads(config.threads)
    count = (config.warmup_rounds + config.rounds) * config.window_steps + config.train_before
    batches = draw_batches(
        ThroughputConfig(
            batch_size=config.batch_size,
            block_size=config.block_size,
            seed=config.seed,
            max_bytes_per_domain=config.max_bytes_per_domain,
        ),
        count,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="pragnosia-engine-") as tmp:
        for n in config.num_experts:
            results += run_group(config, n, batches, Path(tmp), log)
    report = {
        "config": asdict(config),
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "results": results,
    }
    write_report(report, out)
    return report


def markdown(report: dict) -> str:
    config = report["config"]
    ran = {r["recipe"] for r in report["results"]}
    precisions = config.get("precisions", ["32-true"])
    dense = any(r.get("step_time_vs_dense") is not None for r in report["results"])
    lines = [
        *page_header("Engine step time (issue 15)", "python scripts/bench_engine.py", ["engine.json"]),
        f"`{report.get('command') or 'python scripts/bench_engine.py'}`",
        "",
        *([f"Engine as of commit {report['engine_commit']}.", ""] if "engine_commit" in report else []),
        f"{report['date']}, {report['machine']}. Batch {config['batch_size']}×{config['block_size']} bytes, disk "
        f"store (materialized), each contender trained {config['train_before']} steps first, then "
        f"{config['rounds']} timed rounds × {config['window_steps'] - 1} steps, "
        "all contenders of one n interleaved in one process. Recipes: `configs/quickstart.yaml` (local S=2; "
        "`local S=8`: expert_slots 8, cache 8; `local`: no cap, cache 8), `configs/streamed.yaml` (exact, "
        "no cap, cache 8, product router)"
        + (" and `configs/bounded.yaml` (`bounded`: exact, at most 8 experts a step)" if "bounded" in ran else "")
        + (
            "; `exact G=8`: the exact recipe with each expert split in 8 (hidden ÷ 8, k × 8, n × 8: the same active "
            "and total parameters; its n column is n × 8), 16 experts computed together (`expert_batch: 16`, "
            "`expert_cache: 32`), `one by one` without (`expert_batch: 1`, 8 slots); time over exact's in the group: "
            + ", ".join(
                f"{r.get('label', r['recipe'])} at n = {r['num_experts']}: {r['step_time_vs_exact']:.2f} ×"
                for r in report["results"]
                if r.get("step_time_vs_exact") is not None
            )
            + ")"
            if any("G=8" in name for name in ran)
            else ""
        )
        + "; GlobalMoE: the exact recipe's model (same widths, router, seed and clipping), every expert "
        "resident: it starts from `exact`'s weights and takes its updates (a test holds them within 1e-5 over 5 "
        "steps), but over the steps before timing float rounding flips routing decisions, so the two touch "
        "similar, not identical, sets of experts"
        + (
            " (GlobalMoE's touched column)."
            if any(r["recipe"] == "GlobalMoE" and "touched_per_step" in r for r in report["results"])
            else "."
        )
        + (
            " DenseLM: the trunk plus one FFN of k experts' width where the expert layer sits (the same widths, k, "
            "lr, seed and clipping), the speed floor: the same active parameters with no routing and no store; it "
            "has no n and runs in every n group, so each ratio to it comes from the same run."
            if "DenseLM" in ran
            else ""
        )
        + (
            f" Every contender ran at each precision ({', '.join(precisions)}), in the same rounds; its ratios are to "
            "the baselines at its precision."
            if list(precisions) != ["32-true"]
            else ""
        )
        + (f" Every model also takes {config['overrides']}." if config.get("overrides") else ""),
        "",
        "Median ms per training step (reads: store reads per step; per touched: reads per touched expert; "
        "pairs/read: (token, expert) pairs per store read):",
        "",
        "| n | recipe | ms/step | × GlobalMoE |"
        + (" × DenseLM |" if dense else "")
        + " tokens/s | reads | touched | per touched | pairs/read |",
        "|---:|---|---:|---:|" + ("---:|" if dense else "") + "---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ratios = [_ratio(r["step_time_vs_global_moe"]), *([_ratio(r.get("step_time_vs_dense"))] if dense else [])]
        lines.append(
            f"| {r['num_experts']} | {r.get('label', r['recipe'])} | {r['step_ms_median']:.0f} | {' | '.join(ratios)} "
            f"| {r['tokens_per_s']:,.0f} | {_io_cells(r)} |"
        )
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _io_cells(r: dict) -> str:
    """A row's reads, touched, per touched and pairs/read cells."""
    if r["recipe"] == "DenseLM":
        return f"{r['reads_per_step']:.0f} | n/a |  | "
    if "reads_per_step" in r:
        return (
            f"{r['reads_per_step']:.0f} | {r['touched_per_step']:.0f} | {r['reads_per_touched_expert']:.2f} | "
            f"{r['token_pairs_per_read']:.1f}"
        )
    if "touched_per_step" in r:  # GlobalMoE, from 2026-12-02
        return f" | {r['touched_per_step']:.0f} |  | "
    return " |  |  | "


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(markdown(report))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r.get("label", r["recipe"]) for r in report["results"]):
        rows = [r for r in report["results"] if r.get("label", r["recipe"]) == label]
        ax.plot([r["num_experts"] for r in rows], [r["step_ms_median"] for r in rows], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="experts n", ylabel="ms per step (median)", title="Step time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)
    plt.close(fig)
