"""The quality results page, ``scripts/results/quality/README.md``, from the ``quality.json`` of its folders.

Reports measured on the expert-major engine get a section each; the reports measured before it are the archive:
the five-seed verdict of that time (:data:`FIVE_SEEDS` names its runs), every run in one table, and the screens
that wrote JSON of their own (tokens per expert, a GPU screen, the first investigation).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench import report as report_lib
from bench.quality import PRESETS

COMMAND = "python scripts/bench_quality.py --report-only"
DOMAINS = ("code", "prose")
# The verdict before the engine rewrite: (folder, run slug) of each seed, 0 to 4, per n and model.
_SEEDS = range(5)
FIVE_SEEDS: dict[int, dict[str, list[tuple[str, str]]]] = {
    32: {
        "PragnosiaLM [matched]": [(f"seed{s}_n32_matched", "pragnosia_n32_matched") for s in _SEEDS],
        "PragnosiaLM [tuned], own readout": [
            ("seed0_n32_b95", "pragnosia_n32_tuned_b95"),
            ("seed1_n32_b95", "pragnosia_n32_tuned_b95"),
            ("seed2_n32_tuned", "pragnosia_n32_tuned"),
            ("seed3_n32", "pragnosia_n32_tuned"),
            ("seed4_n32", "pragnosia_n32_tuned"),
        ],
        "GlobalMoE": [
            (folder, "global_moe_n32")
            for folder in ("seed0_n32", "seed1_n32", "seed2_n32_global", "seed3_n32", "seed4_n32")
        ],
    },
    8: {
        "PragnosiaLM [matched]": [
            (folder, "pragnosia_n8_matched")
            for folder in ("seed0_n8_matched", "seed1_n8_matched", "seed2_n8_matched", "seed3_n8", "seed4_n8")
        ],
        "GlobalMoE": [
            (folder, "global_moe_n8") for folder in ("seed0_n8", "seed1_n8", "seed2_n8_global", "seed3_n8", "seed4_n8")
        ],
    },
}


def load_reports(folder: Path) -> dict[str, dict[str, Any]]:
    """Every ``quality.json`` below ``folder``, by its folder relative to ``folder``."""
    return {
        path.parent.relative_to(folder).as_posix(): json.loads(path.read_text())
        for path in sorted(folder.glob("**/quality.json"))
    }


def _runs(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["slug"]: r for r in report["runs"]}


def _bpb(run: dict[str, Any], key: str = "val/bpb") -> str:
    value = run.get("final", run).get(key)
    return "" if value is None else f"{value:.3f}"


def _recipe(report: dict[str, Any], run: dict[str, Any]) -> str:
    k = report["config"]["num_active_experts"]
    if run["kind"] == "global_moe":
        return "the `streamed.yaml` model, every expert resident"
    if run["kind"] == "dense":
        return f"one FFN the width of {k} experts"
    if not run["variant"]:
        return "`configs/quickstart.yaml`"
    config_file, overrides, _ = PRESETS.get(run["variant"], ("", {}, ""))
    text = f"`configs/{config_file}`" if config_file else f"[{run['variant']}]"
    return text + "".join(f", {key}: {value}" for key, value in overrides.items())


def engine_section(name: str, report: dict[str, Any]) -> list[str]:
    """One report of the expert-major engine: the runs, what the recipes cost against one another, the goals."""
    config, runs = report["config"], report["runs"]
    data = ", ".join(
        f"{domain} ({config['domains'][domain]}) {d['bytes'] / 1e6:.2f} MB" for domain, d in report["data"].items()
    )
    ns = ", ".join(str(n) for n in config["num_experts"])
    lines = [
        f"## n = {ns}, {report['steps']:,} steps, seed {config['seed']} ({report['date'][:10]})",
        "",
        *report_lib.run_lines(report),
        "",
        f"d = {config['d_model']}, {config['n_shared_layers']} trunk layers, k = {config['num_active_experts']}, batch "
        f"{config['batch_size']} × {config['block_size']} bytes, {report['tokens_per_model']:,} tokens per model; data "
        f"{data}, mixed; validation on held-out blocks of each. Every model starts from the same seed-derived weights "
        "and gets the same shared AdamW, schedule and clipping.",
        "",
    ]
    header = ["model", "recipe", "val bpb", *(f"bpb {d}" for d in DOMAINS), "train steps/s"]
    rows = [
        [
            r["label"],
            _recipe(report, r),
            _bpb(r),
            *(_bpb(r, f"val/bpb/{d}") for d in DOMAINS),
            f"{r['steps_per_s']:.1f}",
        ]
        for r in sorted(runs, key=lambda r: r["final"]["val/bpb"])
    ]
    lines += [*report_lib.markdown_table(header, rows, align="llrrrr"), ""]
    lines += [f"- [{variant}]: {options}" for variant, options in config["variants"].items()]
    by_variant = {(r["kind"], r["variant"]): r["final"]["val/bpb"] for r in runs}
    exact, local = by_variant.get(("pragnosia", "exact")), by_variant.get(("pragnosia", "local"))
    moe, dense = by_variant.get(("global_moe", "")), by_variant.get(("dense", ""))
    if exact is not None and moe is not None:
        lines.append(
            f"- `exact` and GlobalMoE take the same updates (`tests/test_exact.py`); over {report['steps']:,} steps "
            f"float rounding flips routing decisions, and they end {abs(exact - moe):.3f} apart."
        )
    if exact is not None and local is not None:
        lines.append(
            f"- `local` costs {local - exact:.3f} bpb against `exact` at the same routing, cache and optimizer"
            + ("" if dense is None else f", and {'trails' if local > dense else 'beats'} DenseLM ({dense:.3f})")
            + "."
        )
    lines += ["", "Goals (final val bpb, all domains):", ""]
    lines += [
        f"- {label}: PragnosiaLM {goal['pragnosia']:.3f} ≤ GlobalMoE {_value(goal['global_moe'])}: "
        f"{_mark(goal['le_global_moe'])}; < DenseLM {_value(goal['dense'])}: {_mark(goal['lt_dense'])}"
        for label, goal in report["goals"].items()
    ]
    return [*lines, "", f"Learning curves: [{name}/curves.png]({name}/curves.png).", ""]


def _value(value: float | None, spec: str = ".3f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "**no**"


def five_seeds(reports: dict[str, dict[str, Any]]) -> list[str]:
    """The verdict of the old engine: ``matched`` against GlobalMoE over five seeds, n = 32 and 8."""
    bpb = {(folder, slug): r["final"]["val/bpb"] for folder, rep in reports.items() for slug, r in _runs(rep).items()}
    rows, notes = [], []
    for n, models in FIVE_SEEDS.items():
        if not all(key in bpb for runs in models.values() for key in runs):
            continue
        for label, runs in models.items():
            values = [bpb[key] for key in runs]
            rows.append([n, label, *(f"{v:.3f}" for v in values), f"{statistics.fmean(values):.3f}"])
        ours = [bpb[key] for key in models["PragnosiaLM [matched]"]]
        moe = [bpb[key] for key in models["GlobalMoE"]]
        diffs = [a - b for a, b in zip(ours, moe)]
        notes.append(
            f"- n = {n}: `matched` − GlobalMoE, seed by seed, {', '.join(f'{d:+.3f}' for d in diffs)} (mean "
            f"{statistics.fmean(diffs):+.3f}); ahead on {sum(d < 0 for d in diffs)} of {len(diffs)} seeds."
        )
    if not rows:
        return []
    seeds = len(next(iter(FIVE_SEEDS.values()))["GlobalMoE"])
    return [
        f"### The verdict of that engine: {seeds} seeds",
        "",
        "`matched`: the mixture readout with each expert's loss weighted by its share of the batch's tokens, so its "
        "local step is the one the shared loss would give it (`local_readout: mixture`, `local_weighting: batch`; "
        "what `objective: exact` computes today). `[tuned]`: every expert in the working set, each reading its own "
        "output. Final validation bpb:",
        "",
        *report_lib.markdown_table(
            ["n", "model", *(f"seed {s}" for s in range(seeds)), "mean"], rows, align="rl" + "r" * 6
        ),
        "",
        *notes,
        "",
    ]


def _options(report: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    config = report["config"]
    if run["kind"] != "pragnosia":
        return {}
    if run["variant"]:
        return dict(config["variants"][run["variant"]])
    plain = {k: config[k] for k in ("expert_slots", "local_lr") if k in config}
    return {**plain, **config.get("pragnosia", {})}


def _format(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {json.dumps(v)}" for k, v in options.items())


def every_run(reports: dict[str, dict[str, Any]]) -> list[str]:
    """Every run of ``reports`` in one table, n by n; options that every variant shares are said once."""
    entries = [(folder, report, run) for folder, report in reports.items() for run in report["runs"]]
    variants = [_options(report, run) for _, report, run in entries if run["kind"] == "pragnosia" and run["variant"]]
    common = {k: v for k, v in variants[0].items() if all(o.get(k) == v for o in variants)} if variants else {}
    rows = []
    for folder, report, run in sorted(
        entries, key=lambda e: (e[2]["num_experts"] or 0, e[2]["kind"], e[2]["variant"], e[1]["config"]["seed"])
    ):
        options = {k: v for k, v in _options(report, run).items() if common.get(k, object()) != v or not run["variant"]}
        rows.append(
            [run["num_experts"] or "–", run["label"], _format(options), report["config"]["seed"], _bpb(run)]
            + [_bpb(run, f"val/bpb/{d}") for d in DOMAINS]
            + [f"{run['steps_per_s']:.1f}", f"[{folder}]({folder}/quality.md)", report["date"]]
        )
    header = ["n", "run", "options", "seed", "val bpb", *(f"bpb {d}" for d in DOMAINS), "steps/s", "folder", "date"]
    config = next(iter(reports.values()))["config"]
    steps = sorted({report["steps"] for report in reports.values()})
    return [
        "### Every run",
        "",
        f"{', '.join(f'{s:,}' for s in steps)} steps of {config['batch_size']} × {config['block_size']} bytes, d = "
        f"{config['d_model']}, {config['n_shared_layers']} trunk layers, k = {config['num_active_experts']}, the same "
        "data as above. Every variant"
        + (f" also sets {_format(common)}" if common else "")
        + "; the plain PragnosiaLM is the package's defaults of that time with the options shown. Each folder's "
        "`quality.md` has the per-domain table and learning curves; its `quality.json` the whole config. steps/s "
        "is not a benchmark (other runs shared the cores).",
        "",
        *report_lib.markdown_table(header, rows, align="rllrrrrrll"),
        "",
    ]


def token_counts(path: Path) -> list[str]:
    """Tokens per expert per step, from ``screens/token_counts.json``."""
    counts = json.loads(path.read_text())
    rows = [
        [n, f"{c['expert_steps']:,}", f"{c['mean_tokens']:.0f}", c["median_tokens"], f"{c['cv']:.2f}"]
        + [c["min_tokens"], f"{100 * c['share_below_quarter_mean']:.0f}%"]
        for n, c in counts.items()
    ]
    header = ["n", "expert-steps", "mean tokens", "median", "CV", "min", "below a quarter of the mean"]
    return [
        "### Tokens per expert per step",
        "",
        "Before `local_weighting`, each expert's loss was a mean over its own tokens, so Adam took as large a step "
        "on a few tokens as on many. How many tokens an expert received per step (`screens/token_counts.json`, "
        f"its script is in the history, commit {report_lib.ENGINE_REWRITE['last_old_commit']}):",
        "",
        *report_lib.markdown_table(header, rows, align="r" * 7),
        "",
    ]


def gpu_screen(path: Path) -> list[str]:
    """One line of JSON per run (``gpu_screen/*.jsonl``)."""
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kwargs = [r["kwargs"] for r in runs if r["kwargs"]]
    common = {k: v for k, v in kwargs[0].items() if all(o.get(k) == v for o in kwargs)} if kwargs else {}
    rows = [
        [r["variant"], r["label"], _format({k: v for k, v in r["kwargs"].items() if k not in common}), _bpb(r)]
        + [f"{r['steps_per_s']:.1f}"]
        for r in sorted(runs, key=lambda r: r["final"]["val/bpb"])
    ]
    run = runs[0]
    return [
        "### A GPU screen of learning rates and gates",
        "",
        f"`{path.parent.name}/{path.name}`: {len(runs)} runs side by side on one GPU, {run['steps']:,} steps, seed "
        f'{run["seed"]}, each `quality.train_one` with the benchmark\'s config and `accelerator="gpu"`. Every '
        f"PragnosiaLM run also sets {_format(common)}; steps/s is not a benchmark (the runs shared the GPU).",
        "",
        *report_lib.markdown_table(["variant", "model", "options", "val bpb", "steps/s"], rows, align="lllrr"),
        "",
    ]


def investigation(path: Path) -> list[str]:
    """The first investigation's runs (``investigation.json``)."""
    runs = json.loads(path.read_text())
    rows = [
        [r["variant"], r["n"] or "–", f"{r['steps']:,}", f"{r['bpb']:.3f}", f"{r['code']:.3f}", f"{r['prose']:.3f}"]
        + ["" if r["experts_used"] is None else r["experts_used"], _value(r["usage_entropy_bits"], ".2f", "")]
        for r in sorted(runs, key=lambda r: (r["n"] or 0, r["bpb"]))
    ]
    header = ["variant", "n", "steps", "val bpb", "bpb code", "bpb prose", "experts used", "usage entropy (bits)"]
    return [
        "### The first investigation",
        "",
        f"`{path.name}`: {len(runs)} runs of scratch scripts around `quality.train_one` with the benchmark's config "
        "(the same data): expert learning rates and optimizers, working sets S, the readouts of the local loss "
        "(some of them prototype code outside the package: only their results are kept), the trunk's gradient "
        "through the experts (`trunkgrad`), the router and the balance term. Sorted by n, then bpb:",
        "",
        *report_lib.markdown_table(header, rows, align="lrrrrrrr"),
        "",
    ]


def page(folder: Path) -> list[str]:
    """The quality page: a section per report of the current engine, then the archive of the old one."""
    reports = load_reports(folder)
    current = {name: r for name, r in reports.items() if not report_lib.before_engine_rewrite(r)}
    old = {name: r for name, r in reports.items() if report_lib.before_engine_rewrite(r)}
    extras = [p for p in ("screens/token_counts.json", "investigation.json") if (folder / p).is_file()]
    screens = sorted(folder.glob("gpu_screen/*.jsonl"))
    sources = [f"{name}/quality.json" for name in current] + extras
    sources += [p.relative_to(folder).as_posix() for p in screens]
    also = "the `quality.json` of every other folder" if old else ""
    lines = report_lib.page_header("Quality: local learning against global backpropagation", COMMAND, sources, also)
    for name, report in current.items():
        lines += engine_section(name, report)
    if not old:
        return lines
    machines = dict.fromkeys(report_lib.machine_line({**r, "date": r["date"][:10]}) for r in old.values())
    lines += [
        "## Before the engine rewrite",
        "",
        *report_lib.engine_banner(
            list(old.values()),
            "`local_readout`, `local_weighting`, `local_betas`, "
            "`backprop_through_experts`, `gate` and the presets `tuned`, `matched`, `streamed`",
        ),
        f"{len(old)} reports, {min(r['date'] for r in old.values())} to {max(r['date'] for r in old.values())}:",
        "",
        *machines,
        "",
        *five_seeds(old),
        *every_run(old),
    ]
    if (folder / "screens/token_counts.json").is_file():
        lines += token_counts(folder / "screens/token_counts.json")
    for path in screens:
        lines += gpu_screen(path)
    if (folder / "investigation.json").is_file():
        lines += investigation(folder / "investigation.json")
    return lines
