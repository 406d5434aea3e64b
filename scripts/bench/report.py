"""What every benchmark's report shares: its header (machine, date, config), markdown tables and a headless pyplot."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


def report_header(benchmark: str, started: float, config: Any) -> dict[str, Any]:
    """What every benchmark report starts with: its name, the machine, the start date, wall minutes, the config."""
    return {
        "benchmark": benchmark,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "wall_minutes": (time.time() - started) / 60,
        "config": asdict(config),
    }


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
