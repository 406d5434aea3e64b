"""What every benchmark's report shares: its header (machine, date, config), markdown tables, a headless pyplot,
and the results page (``scripts/results/<experiment>/README.md``) written from the report: its header, the run's
command, machine and date, and the banner of figures measured before the engine rewrite."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "scripts" / "results"
# The expert-major engine (issue 15) landed on this day, in commit 4aded45; a report dated before it measured the
# per-step working-set engine, whose last commit is 8ba3072.
ENGINE_REWRITE = {"date": "2026-12-01", "commit": "4aded45", "last_old_commit": "8ba3072"}
# A 1-minute load average at least this high when a run starts means other jobs were running on the machine.
SHARED_LOAD = 0.5


def report_header(benchmark: str, started: float, config: Any, command: str = "", load: float | None = None):
    """What every benchmark report starts with: its name, command, commit, the machine, the start date, wall minutes,
    the config, and whether other jobs shared the CPU (``load``: :func:`load_average` when the run started)."""
    return {
        "benchmark": benchmark,
        **provenance(command, load),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "wall_minutes": (time.time() - started) / 60,
        "config": asdict(config),
    }


def provenance(command: str = "", load: float | None = None, device: str = "") -> dict[str, Any]:
    """Where a report comes from: the command, the commit (``-dirty`` with uncommitted changes) and the machine."""
    record: dict[str, Any] = {"command": command, "commit": git_commit(), "machine": machine_description(device)}
    if load is not None:
        record.update(load_average=load, shared_cpu=load >= SHARED_LOAD)
    return record


def load_average() -> float:
    """The machine's 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def git_commit() -> str | None:
    """``git describe --always --dirty`` of the repository, or ``None`` outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def machine_description(device: str = "") -> str:
    """``<CPU model>, <cores> cores, <threads> torch threads[, device], torch <version>, Python <version>``."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = f", {device}" if device else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{device}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def markdown_table(header: list[str], rows: list[list[Any]], align: str = "") -> list[str]:
    """The lines of a markdown table; ``align`` has one letter per column, ``r`` for right-aligned (default left)."""
    align = align.ljust(len(header), "l")
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ results pages


def page_header(title: str, command: str, sources: list[str], also: str = "") -> list[str]:
    """The first lines of a results page: its title and where it comes from (``sources``, then ``also`` as words)."""
    origin = ", ".join(f"`{source}`" for source in sources) + (f", and {also}" if also else "")
    return [f"# {title}", "", f"Written by `{command}` from {origin}; do not edit by hand.", ""]


def run_lines(report: dict[str, Any]) -> list[str]:
    """The bullets that say how a report was measured: its command(s), and :func:`machine_line`."""
    commands = report.get("commands") or ([report["command"]] if report.get("command") else [])
    return [*(f"- Command: `{command}`" for command in commands), machine_line(report)]


def machine_line(report: dict[str, Any]) -> str:
    """``- Machine: …`` with the date, the commit and whether other jobs shared the CPU."""
    line = f"- Machine: {report['machine']}"
    if report.get("shared_cpu"):
        load = f" (load average {report['load_average']:.1f} as it started)" if "load_average" in report else ""
        line += f"; the CPU was shared with other jobs{load}, so timings are noisy (memory is not)"
    return line + f"; {report['date']}" + (f", commit {report['commit']}" if report.get("commit") else "") + "."


def before_engine_rewrite(report: dict[str, Any]) -> bool:
    """Whether ``report`` was measured before the expert-major engine (its date is earlier)."""
    return report["date"][:10] < ENGINE_REWRITE["date"]


def engine_banner(reports: list[dict[str, Any]], options: str = "") -> list[str]:
    """The banner of a section whose reports were measured before the engine rewrite (none when they were not);
    ``options`` says which of that engine's options the runs used."""
    if not any(before_engine_rewrite(r) for r in reports):
        return []
    old, new = ENGINE_REWRITE["last_old_commit"], ENGINE_REWRITE["commit"]
    return [
        f"> **Measured before the engine rewrite** (issue 15, commit {new}): these runs used the per-step "
        f"working-set engine of commit {old} and its options{f' ({options})' if options else ''}. Re-run the "
        "command on the current main for figures of the current engine.",
        "",
    ]
