"""The results pages: ``scripts/results/<experiment>/README.md``, each written from the JSON in its folder.

A page is named by its folder (:data:`PAGES`) and holds one section per report (or per group of reports that one
table compares). Every number on a page is computed here from a report, so the text and the numbers cannot drift;
the prose around them says only what holds whatever the numbers are, or is chosen by them. A benchmark re-renders
the page it wrote into after a run, and each benchmark's ``--report-only`` re-renders one without running anything.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import constant_memory, throughput
from bench.report import (
    RESULTS,
    before_engine_rewrite,
    engine_banner,
    machine_line,
    markdown_table,
    page_header,
    run_lines,
)

MIB = constant_memory.MIB


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def reports_under(folder: Path, name: str) -> list[tuple[str, dict[str, Any]]]:
    """``(subfolder, report)`` of every ``<subfolder>/<name>`` in ``folder``, by subfolder name."""
    return [(path.parent.name, load(path)) for path in sorted(folder.glob(f"*/{name}"))]


def _date(report: dict[str, Any]) -> str:
    return report["date"][:10]


def _old_options(config: dict[str, Any]) -> str:
    """The old engine's options a run's config (or spec) names: its working set S and k, the local rule."""
    if "expert_slots" not in config:
        return ""
    return f"S = {config['expert_slots']}, k = {config['num_active_experts']}, local rule"


# ------------------------------------------------------------------------------------------------ constant memory

CM_COMMAND = "python scripts/prove_constant_memory.py --report-only"


def memory_section(report: dict[str, Any], title: str, link: str, options: str | None = "") -> list[str]:
    """A ``prove_constant_memory.py`` report: its settings, command, machine, table, verdict and plot (``options``:
    those of the old engine the banner names; ``None``: no banner, the page has one)."""
    return [
        f"## {title}",
        "",
        *([] if options is None else engine_banner([report], options)),
        *run_lines(report),
        "",
        constant_memory.settings(report),
        "",
        *constant_memory.runs_table(report),
        "",
        *failed_check_notes([(link.rstrip("/") or ".", report)]),
        "",
        f"![memory vs n and vs step]({link}constant_memory.png)",
        "",
    ]


def _pragnosia(report: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((r for r in report["runs"] if r["model"] == "pragnosia"), key=lambda r: r["num_experts"])


def _global_moe(report: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((r for r in report["runs"] if r["model"] == "global"), key=lambda r: r["num_experts"])


def memory_growth(report: dict[str, Any]) -> list[str]:
    """PragnosiaLM at its largest n against its smallest, and what GlobalMoE adds per expert."""
    ours, moe = _pragnosia(report), _global_moe(report)
    first, last = ours[0], ours[-1]
    ratios = [r["floor_ratio"] for r in ours]
    lines = [
        f"- PragnosiaLM at n = {last['num_experts']:,}: {last['mean_bytes'] / MIB:.1f} MiB mean per-step peak, "
        f"against {first['mean_bytes'] / MIB:.1f} MiB at n = {first['num_experts']:,} (max/min over every n "
        f"{report['spread']:.3f}); model part / floor {min(ratios):.2f}–{max(ratios):.2f}."
    ]
    if len(moe) >= 2:
        per_expert = (moe[-1]["mean_bytes"] - moe[0]["mean_bytes"]) / (moe[-1]["num_experts"] - moe[0]["num_experts"])
        same_n = next((r for r in reversed(ours) if r["num_experts"] == moe[-1]["num_experts"]), None)
        lines.append(
            f"- GlobalMoE grows by {per_expert / MIB:.2f} MiB per expert (parameters, gradients and Adam moments of "
            f"the experts a step touched) from n = {moe[0]['num_experts']:,} to {moe[-1]['num_experts']:,}"
            + (
                f", where it needs {moe[-1]['mean_bytes'] / same_n['mean_bytes']:.1f}× PragnosiaLM's peak."
                if same_n
                else "."
            )
        )
    return lines


def recipes_table(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """One row per report: PragnosiaLM's options and batch, its smallest and largest n, max/min and verdict."""
    rows = []
    for folder, report in reports:
        ours = _pragnosia(report)
        spec = ours[0]["spec"]
        ends = [f"n = {r['num_experts']:,}: {r['mean_bytes'] / MIB:.1f} / {r['peak_bytes'] / MIB:.1f}" for r in ours]
        rows.append(
            [
                constant_memory.recipe(spec),
                f"{spec['batch_size']} × {spec['block_size']}",
                "; ".join(ends),
                f"{report['spread']:.3f}",
                "PASS" if report["passed"] else "FAIL: " + ", ".join(k for k, ok in report["checks"].items() if not ok),
                f"[{folder}]({folder}/constant_memory.md)",
            ]
        )
    header = ["PragnosiaLM", "batch", "mean / max per-step peak (MiB)", "max/min across n", "verdict", "folder"]
    return markdown_table(header, rows, align="llllll")


def failed_check_notes(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What each failed check of the script says, with its numbers."""
    notes = []
    for folder, report in reports:
        ours, criteria, checks = _pragnosia(report), report["criteria"], report["checks"]
        if not checks["cv_within_runs"]:
            cvs = ", ".join(f"{100 * r['cv']:.1f}%" for r in ours)
            notes.append(
                f"- `{folder}`: the within-run check fails (CV {cvs}; limit {100 * criteria['max_cv']:.0f}%): the "
                "step's peak follows how many experts the batch touched, which moves from step to step; the claim "
                "is flatness across n."
            )
        if not checks["near_floor"]:
            ratios = ", ".join(f"{r['floor_ratio']:.2f}" for r in ours)
            notes.append(
                f"- `{folder}`: model part / analytic floor {ratios} (limit {criteria['max_floor_ratio']}): DESIGN "
                "§6's floor describes the default step, and this recipe holds more than it counts (not broken down)."
            )
    return notes


def constant_memory_page(folder: Path) -> list[str]:
    """Each recipe's memory at its smallest and largest n (the subfolders), then every report with GlobalMoE."""
    recipes = reports_under(folder, "constant_memory.json")
    sources = [f"{name}/constant_memory.json" for name, _ in recipes]
    root = folder / "constant_memory.json"
    full = [(name, report) for name, report in recipes if _global_moe(report)]
    if root.is_file():
        full.append(("", load(root)))
        sources.append("constant_memory.json")
    lines = page_header("Constant memory: peak memory per step against the number of experts", CM_COMMAND, sources)
    if recipes:
        criteria = recipes[0][1]["criteria"]
        lines += [
            "## Recipe by recipe",
            "",
            *engine_banner([r for _, r in recipes]),
            f"Each recipe at its smallest and largest n, per-step peak memory with the disk store, each run its own "
            f"process. Flat means max/min of the mean peak across n ≤ {criteria['max_spread']}; the script's verdict "
            "also checks the spread within each run and the analytic floor. Settings and every run: the folder's "
            "`constant_memory.md`.",
            "",
            *recipes_table(recipes),
            "",
            *failed_check_notes(recipes),
            "",
            "Commands:",
            "",
            *(f"- `{report['command']}`" for _, report in recipes),
            *dict.fromkeys(machine_line(report) for _, report in recipes),
            "",
        ]
    for name, report in full:
        ours, moe = _pragnosia(report), _global_moe(report)
        title = (
            f"PragnosiaLM (n = {ours[0]['num_experts']:,} to {ours[-1]['num_experts']:,}) against GlobalMoE "
            f"(to n = {moe[-1]['num_experts']:,})"
            if moe
            else f"PragnosiaLM, n = {ours[0]['num_experts']:,} to {ours[-1]['num_experts']:,}"
        )
        title += ", before the engine rewrite" if before_engine_rewrite(report) else f", {_date(report)}"
        options = _old_options(ours[0]["spec"]) + ": today `configs/quickstart.yaml`'s method"
        lines += memory_section(report, title, f"{name}/" if name else "", options)
        lines += [*memory_growth(report), ""]
    lines += [
        "`tests/test_memory_shape.py` checks the shape (flat for PragnosiaLM, growing for GlobalMoE) at tiny widths on "
        "every test run.",
    ]
    return lines


def whole_process_section(report: dict[str, Any]) -> list[str]:
    """Whole-process peak RSS of one command at several n, one row per sample."""
    ns = sorted({int(n) for sample in report["samples"] for n in sample["max_rss_kb"]})
    rows = []
    for index, sample in enumerate(report["samples"], 1):
        rss = {int(n): kb for n, kb in sample["max_rss_kb"].items()}
        ratio = rss[max(rss)] / rss[min(rss)]
        rows.append(
            [f"sample {index} ({sample['date']})", *(f"{rss[n]:,}" if n in rss else "" for n in ns)]
            + [f"{ratio:.3f} (n = {max(rss):,} / n = {min(rss):,})"]
        )
    if len(report["samples"]) > 2:  # the mean of each n over the samples that have it
        means = {
            n: statistics.fmean(int(s["max_rss_kb"][str(n)]) for s in report["samples"] if str(n) in s["max_rss_kb"])
            for n in ns
        }
        rows.append(
            [f"mean of the {len(report['samples'])} samples", *(f"{means[n]:,.0f}" for n in ns)]
            + [f"{means[ns[-1]] / means[ns[0]]:.3f} (n = {ns[-1]:,} / n = {ns[0]:,})"]
        )
    header = ["run", *(f"n = {n:,}" for n in ns), "largest n / smallest"]
    smallest = [sample["max_rss_kb"][str(ns[0])] for sample in report["samples"] if str(ns[0]) in sample["max_rss_kb"]]
    return [
        f"## {report.get('title', 'Whole-process peak RSS against n')}",
        "",
        *engine_banner([report]),
        *([report["caveat"], ""] if "caveat" in report else []),
        f"- Command, with N = {', '.join(f'{n:,}' for n in ns)}: `{report['command']}`",
        *run_lines({**report, "command": ""}),
        "",
        f"{report['metric']}, one process per run:",
        "",
        *markdown_table(header, rows, align="l" + "r" * (len(ns) + 1)),
        "",
        f"Run-to-run noise at n = {ns[0]:,}: {max(smallest) - min(smallest):,} KB between the samples. The router's "
        "scores and the capped step's router mass are computed in chunks; what still grows with n is the product "
        "router's weight with its gradient and Adam state (as √n).",
        "",
    ]


def stores_table(disk: dict[str, Any], host: dict[str, Any]) -> list[str]:
    """The disk and the host store side by side, n by n."""
    host_runs = {r["num_experts"]: r for r in _pragnosia(host)}
    rows = [
        [r["num_experts"], f"{r['mean_bytes'] / MIB:.1f}", f"{r['floor_ratio']:.2f}"]
        + [f"{host_runs[n]['mean_bytes'] / MIB:.1f}", f"{host_runs[n]['floor_ratio']:.2f}"]
        for r in _pragnosia(disk)
        if (n := r["num_experts"]) in host_runs
    ]
    header = ["n", "disk store: mean per-step peak RSS (MiB)", "model/floor", "host store: the same (MiB)"]
    return markdown_table([*header, "model/floor"], rows, align="rrrrr")


def store_memory_page(folder: Path) -> list[str]:
    """Whole-process RSS (``whole_process/peak_rss.json``), the disk and host stores side by side (``disk/``,
    ``host/``), then every other ``constant_memory.json`` here."""
    # the lifelong peak first, then the older measurement of the peak since the last step
    wholes = sorted(
        (folder / "whole_process").glob("*peak_rss.json"), key=lambda path: not path.name.startswith("lifelong")
    )
    memory = dict(reports_under(folder, "constant_memory.json"))
    sources = [f"whole_process/{path.name}" for path in wholes] + [f"{name}/constant_memory.json" for name in memory]
    lines = page_header(
        "Disk and host stores: memory against the number of experts",
        CM_COMMAND.replace("--report-only", "--report-only --out scripts/results/store_memory"),
        sources,
    )
    for whole in wholes:
        lines += whole_process_section(load(whole))
    disk, host = memory.pop("disk", None), memory.pop("host", None)
    if disk and host:
        ns = [r["num_experts"] for r in _pragnosia(disk)]
        cvs = [r["cv"] for r in _pragnosia(host)]
        failed = [k for k, ok in host["checks"].items() if not ok]
        lines += [
            f"## Disk and host stores, n = {ns[0]:,} to {ns[-1]:,}",
            "",
            *engine_banner([disk, host], _old_options(_pragnosia(disk)[0]["spec"])),
            *dict.fromkeys([*run_lines(disk), *run_lines(host)]),
            "",
            constant_memory.settings(disk, store=False),
            "",
            *stores_table(disk, host),
            "",
            f"- Disk store: max/min across n {disk['spread']:.3f}, verdict {'PASS' if disk['passed'] else 'FAIL'}.",
            f"- Host store: max/min across n {host['spread']:.3f}, largest within-run CV {100 * max(cvs):.1f}%, "
            f"verdict {'PASS' if host['passed'] else 'FAIL (' + ', '.join(failed) + ')'}. The host store keeps its "
            "records in host memory, which on a machine without a GPU *is* the process's RSS: it grows by the "
            "records of the experts the run has touched. Device memory is what the host store keeps flat; see "
            "[On a GPU](../gpu/README.md).",
            "",
        ]
    for name, report in memory.items():
        ours = _pragnosia(report)
        title = f"`{name}`, n = {ours[0]['num_experts']:,} to {ours[-1]['num_experts']:,}"
        lines += memory_section(report, title, f"{name}/")
        lines += [*memory_growth(report), ""]
    return lines


# ------------------------------------------------------------------------------------------------ throughput


def throughput_section(report: dict[str, Any], title: str, link: str, options: str | None = "") -> list[str]:
    """A ``bench_throughput.py`` report: its protocol, command, machine, summary table and goals (``options``: as in
    :func:`memory_section`)."""
    config = report["config"]
    recipe = f"; every PragnosiaLM trains `configs/{config['recipe']}`'s method" if "recipe" in config else ""
    return [
        f"## {title}",
        "",
        *([] if options is None else engine_banner([report], options)),
        *run_lines(report),
        "",
        f"d = {config['d_model']}, {config['n_shared_layers']} trunk layers, k = {config['num_active_experts']}, "
        f"batch {config['batch_size']} × {config['block_size']} bytes, {config['threads'] or 'default'} torch "
        f"thread(s){recipe}. All contenders of one n in one process, taking turns over {config['rounds']} timed "
        f"rounds of {config['window_steps'] - config['skip_steps']} steps on the same batches (after "
        f"{config['warmup_rounds']} warm-up round), so every ratio is measured in the same run; ratios are medians "
        "of per-round ratios; stores start with every record written. Full table: "
        f"[{link}throughput.md]({link}throughput.md).",
        "",
        *throughput.summary_table(report),
        "",
        *throughput.goal_lines(report),
        *throughput.slow_step_notes(report),
        *throughput.trend_lines(report),
        "",
    ]


def profile_section(profile: dict[str, Any], folder: Path, path: Path) -> list[str]:
    """A ``bench_throughput.py --profile`` report: the shares of the step's CPU time."""
    table = path.with_suffix(".txt")
    launches = profile["ops"][0]["name"].startswith("cudaLaunchKernel")
    return [
        f"### Where the time goes: n = {profile['num_experts']:,}, {profile['store']} store, cache "
        f"{profile['expert_cache']}",
        "",
        *run_lines(profile),
        "",
        *throughput.profile_lines(profile),
        "",
        *(
            [
                "Launching kernels takes the largest share of the step's CPU time: at these widths the step is bound "
                "by the CPU that launches them, not by the GPU (larger widths or CUDA graphs would use more of it; not "
                "measured).",
                "",
            ]
            if launches
            else []
        ),
        *([f"The profiler's own table: `{table.relative_to(folder)}`.", ""] if table.is_file() else []),
    ]


def throughput_page(folder: Path) -> list[str]:
    """Every ``throughput.json`` here (the folder's own last), then every profile."""
    reports = reports_under(folder, "throughput.json")
    if (folder / "throughput.json").is_file():
        reports.append(("", load(folder / "throughput.json")))
    profiles = sorted(folder.glob("profile_*.json"))
    sources = [f"{name}/throughput.json" if name else "throughput.json" for name, _ in reports]
    lines = page_header(
        "Throughput: stores, cache, and GlobalMoE",
        "python scripts/bench_throughput.py --report-only",
        sources + [p.name for p in profiles],
    )
    for name, report in reports:
        title = (
            "Before the engine rewrite"
            if before_engine_rewrite(report)
            else f"The expert-major engine, {_date(report)}"
        )
        lines += throughput_section(report, title, f"{name}/" if name else "", _old_options(report["config"]))
    for path in profiles:
        lines += profile_section(load(path), folder, path)
    lines += [
        "The disk store's file sits in the OS page cache on this machine at these sizes; a store larger than RAM reads "
        "from the disk (see `bench_beyond_ram.py`).",
    ]
    return lines


# ------------------------------------------------------------------------------------------------ quickstart


def quickstart_page(folder: Path) -> list[str]:
    from bench import quickstart

    report = load(folder / "quickstart.json")
    return [
        *page_header(
            "Quickstart, and the baselines on the same config",
            "python scripts/bench_quickstart.py --report-only",
            ["quickstart.json"],
        ),
        *engine_banner([report], "the quickstart config as it was then"),
        *run_lines(report),
        "",
        *quickstart.markdown(report),
    ]


# ------------------------------------------------------------------------------------------------ GPU


def gpu_page(folder: Path) -> list[str]:
    """The CUDA tests (``cuda_tests.json``), device memory (``constant_memory/``), throughput (``throughput/`` and
    ``throughput_3rounds/``) and a profile (``profile_*.json``), all from one GPU session."""
    tests = load(folder / "cuda_tests.json")
    memory = load(folder / "constant_memory" / "constant_memory.json")
    runs = reports_under(folder, "throughput.json")
    profiles = sorted(folder.glob("profile_*.json"))
    sources = ["cuda_tests.json", "constant_memory/constant_memory.json"]
    sources += [f"{name}/throughput.json" for name, _ in runs] + [p.name for p in profiles]
    lines = page_header(
        "On a GPU: CUDA tests, device memory and throughput",
        "python scripts/bench_throughput.py --report-only --out scripts/results/gpu",
        sources,
    )
    lines += [
        *engine_banner([tests, memory, *(r for _, r in runs)]),
        "Everything GPU-only is in one script, `bash scripts/gpu_checks.sh [OUT_DIR]`; the JSON it wrote is in "
        "`scripts/results/gpu/`.",
        "",
        "## CUDA tests",
        "",
        *run_lines(tests),
        "",
        f"{tests['passed']} passed, {tests['failed']} failed, {tests['deselected']} deselected "
        f"({tests['seconds']:.0f} s; the log: `{tests['log']}`). They cover the pinned host store and disk store "
        "round trips and copy ordering on side streams, the cache under random operations on CUDA, training on "
        "CUDA with the device, host and disk stores, CUDA training against CPU training, flat device memory in n "
        "while `GlobalMoE` grows, exact resume from a checkpoint on CUDA, and `MemoryMonitor`'s CUDA counters.",
        "",
    ]
    ours = _pragnosia(memory)
    lines += memory_section(memory, "Device memory against n", "constant_memory/", None)
    lines += [
        f'"Model part" subtracts what the CUDA libraries keep allocated after their first matrix product (cuBLAS '
        f"workspaces, {ours[0]['runtime_bytes'] / MIB:.0f} MiB here, the same for every run). From n = "
        f"{ours[0]['num_experts']:,} to {ours[-1]['num_experts']:,} the device peak rises by "
        f"{(ours[-1]['mean_bytes'] - ours[0]['mean_bytes']) / MIB:.1f} MiB.",
        *memory_growth(memory),
        "",
    ]
    if any(r["floor_ratio"] < 1 for r in ours):
        lines += [
            "The floor overestimates the activations on a GPU (fused attention saves no attention weights, probably; "
            "not checked), hence model/floor < 1.",
            "",
        ]
    for name, report in runs:
        lines += throughput_section(report, f"Throughput on CUDA: `{name}/`", f"{name}/", None)
    for path in profiles:
        lines += profile_section(load(path), folder, path)
    lines += [
        "Not run on the GPU: NCCL DDP (one GPU; the DDP tests use gloo), and the quality and continual benchmarks.",
        "",
    ]
    return lines


# ------------------------------------------------------------------------------------------------ the pages


def _quality_page(folder: Path) -> list[str]:
    from bench import quality_page

    return quality_page.page(folder)


PAGES: dict[str, Callable[[Path], list[str]]] = {
    "quality": _quality_page,
    "constant_memory": constant_memory_page,
    "store_memory": store_memory_page,
    "throughput": throughput_page,
    "quickstart": quickstart_page,
    "gpu": gpu_page,
}


def render(folder: Path) -> str:
    """The text of ``folder``'s page (named by the folder, one of :data:`PAGES`).

    Raises:
        ValueError: the folder is not a results page.
    """
    folder = Path(folder)
    if folder.name not in PAGES:
        raise ValueError(f"{folder} is not a results page: its name must be one of {', '.join(PAGES)}")
    return "\n".join(PAGES[folder.name](folder)).rstrip("\n") + "\n"


def write(folder: Path) -> Path:
    """Write ``folder/README.md`` from the JSON in ``folder``; return its path."""
    path = Path(folder) / "README.md"
    path.write_text(render(folder))
    return path


def page_folder(out: Path) -> Path | None:
    """The results page ``out`` is, or is inside (its parent): the folder a benchmark's page is re-rendered in."""
    out = Path(out)
    return next((folder for folder in (out, out.parent) if folder.name in PAGES), None)


__all__ = ["PAGES", "RESULTS", "page_folder", "render", "write"]
