"""Files a continual-learning run leaves behind: ``continual.json``, ``continual.md`` and ``continual.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .continual_metrics import ContinualFigures


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _clean(rows: list[list[float]] | list[float] | None) -> Any:
    if rows is None:
        return None
    return [_clean(row) if isinstance(row, list) else _finite_or_none(row) for row in rows]


def continual_record(
    domains: list[str],
    stage_domains: list[str],
    matrices: dict[str, list[list[float]]],
    initial: dict[str, list[float] | None],
    figures: dict[str, ContinualFigures],
) -> dict[str, Any]:
    """The JSON-ready summary; NaN (not measured) becomes ``null``."""
    return {
        "domains": domains,
        "stages": stage_domains,
        "metrics": {
            name: {
                "initial": _clean(initial.get(name)),
                "matrix": _clean(matrix),
                "figures": {k: _finite_or_none(v) for k, v in figures[name]._asdict().items()}
                if name in figures
                else None,
            }
            for name, matrix in matrices.items()
        },
    }


def markdown_table(
    domains: list[str],
    stage_domains: list[str],
    matrix: list[list[float]],
    initial: list[float] | None,
    figures: ContinualFigures | None,
    name: str = "loss",
) -> str:
    """``R`` as a markdown table (a row per stage, a column per domain) followed by the figures."""

    def cells(row: list[float]) -> str:
        return " | ".join("–" if math.isnan(v) else f"{v:.4f}" for v in row)

    lines = [f"| {name} after \\ on | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    if initial is not None:
        lines.append(f"| before training | {cells(initial)} |")
    for i, row in enumerate(matrix):
        lines.append(f"| stage {i + 1} ({stage_domains[i]}) | {cells(row)} |")
    if figures is not None:
        lines.append("")
        labels = {"average_final": "average final", "bwt": "BWT", "forgetting": "forgetting", "fwt": "FWT"}
        for key, value in figures._asdict().items():
            lines.append(f"- {name} {labels[key]}: " + ("n/a" if math.isnan(value) else f"{value:+.4f}"))
    return "\n".join(lines) + "\n"


def write_heatmap(
    path: Path, domains: list[str], stage_domains: list[str], matrix: list[list[float]], initial: list[float] | None
) -> None:
    """A heat-map of ``R`` (with the row before training on top when known), values written in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = ([initial] if initial is not None else []) + matrix
    labels = (["before training"] if initial is not None else []) + [
        f"after stage {i + 1} ({d})" for i, d in enumerate(stage_domains[: len(matrix)])
    ]
    figure = Figure(figsize=(1.6 + 1.1 * len(domains), 1.0 + 0.5 * len(rows)))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(rows, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(domains)), labels=domains)
    ax.set_yticks(range(len(rows)), labels=labels)
    ax.set_xlabel("evaluated on")
    ax.set_title("validation loss")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if not math.isnan(value):
                color = "black" if image.norm(value) < 0.5 else "white"  # light cells at low loss
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, ax=ax)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_report(out_dir: Path, record: dict[str, Any], markdown: str, heatmap_args: dict[str, Any]) -> list[Path]:
    """Write the three files into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "continual.json", out_dir / "continual.md", out_dir / "continual.png"]
    paths[0].write_text(json.dumps(record, indent=2) + "\n")
    paths[1].write_text(markdown)
    write_heatmap(paths[2], **heatmap_args)
    return paths
