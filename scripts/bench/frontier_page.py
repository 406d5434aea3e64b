"""The frontier benchmark's page: its goals (issue 23), ``README.md`` and plots, all from ``frontier.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECIPE_FILE = "streamed.yaml"
MODELS = ("dense", "global_moe", "exact", "local", "fine")
LABELS = {
    "exact": "PragnosiaLM exact",
    "local": "PragnosiaLM local",
    "fine": "PragnosiaLM exact, fine",
    "global_moe": "GlobalMoE",
    "dense": "DenseLM",
}

PRAGNOSIA = ("exact", "local", "fine")
BASELINES = ("dense", "global_moe")


def bpb_at_seconds(run: dict[str, Any], seconds: float) -> float:
    """``run``'s val bpb after ``seconds`` of training: its curve interpolated linearly, its first point before that
    and its final bpb after its end (it had finished: more time would have meant another run, with more tokens)."""
    points = [(p["train_seconds"], p["val/bpb"]) for p in run["curve"]]
    if seconds <= points[0][0]:
        return points[0][1]
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if seconds <= t1:
            return b0 + (b1 - b0) * (seconds - t0) / (t1 - t0)
    return points[-1][1]


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """Issue 23's goals, from the runs there are."""
    runs = list(report["runs"].values())
    by = {(r["model"], r["size"]): r for r in runs}
    result: dict[str, Any] = {}
    global_moes = sorted((r for r in runs if r["model"] == "global_moe"), key=lambda r: r["size"])
    ours = [r for r in runs if r["model"] in PRAGNOSIA]
    if global_moes and ours:
        budget = 1.1 * global_moes[0]["peak_mib"]
        fitting = [r for r in runs if r["model"] in BASELINES and r["peak_mib"] <= budget]
        best = min((r for r in ours if r["peak_mib"] <= budget), key=lambda r: r["final_bpb"], default=None)
        frontier: dict[str, Any] = {"budget_mib": budget, "baselines": [r["label"] for r in fitting]}
        if best is not None and fitting:
            rival = min(fitting, key=lambda r: r["final_bpb"])
            at_time = {r["label"]: bpb_at_seconds(r, best["train_seconds"]) for r in fitting}
            frontier.update(
                best=best["label"],
                best_bpb=best["final_bpb"],
                rival=rival["label"],
                margin_tokens=rival["final_bpb"] - best["final_bpb"],
                margin_time=min(at_time.values()) - best["final_bpb"],
                rival_time=min(at_time, key=at_time.get),
            )
            frontier["ok_tokens"] = frontier["margin_tokens"] >= 0.05
            frontier["ok_time"] = frontier["margin_time"] >= 0.03
        result["frontier"] = frontier
    exact = sorted((n, r["final_bpb"]) for (m, n), r in by.items() if m == "exact")
    if len(exact) >= 2:
        values = [v for _, v in exact]
        result["exact_falls_strictly"] = all(b < a for a, b in zip(values, values[1:]))
        tokens = report["config"]["steps"] * report["config"]["batch_size"] * report["config"]["block_size"]
        k = report["recipe"]["num_active_experts"]
        result["exact_by_n"] = {str(n): {"bpb": v, "pairs_per_expert": k * tokens // n} for n, v in exact}
    granularity = report["config"]["granularity"]
    for (m, n), r in by.items():
        if m == "fine" and ("exact", n // granularity) in by:
            coarse = by[("exact", n // granularity)]
            result["fine"] = {"n": n, "coarse_n": n // granularity, "gain": coarse["final_bpb"] - r["final_bpb"]}
            result["fine"]["ok"] = result["fine"]["gain"] > 0
            result["fine"]["time_per_token_ratio"] = coarse["tokens_per_s"] / r["tokens_per_s"]
    floor = by.get(("dense", report["recipe"]["d_model"]))  # DenseLM with the MoE's active parameters
    speed = {}
    for (m, n), r in sorted(by.items()):
        if m != "exact":
            continue
        row = {}
        if floor is not None:
            row["x_dense"] = floor["tokens_per_s"] / r["tokens_per_s"]
            limit = {512: 1.3, 4096: 1.5}.get(n)
            row["ok_dense"] = None if limit is None else row["x_dense"] <= limit
        if ("global_moe", n) in by:
            row["x_global_moe"] = by[("global_moe", n)]["tokens_per_s"] / r["tokens_per_s"]
            row["ok_global_moe"] = row["x_global_moe"] <= 1.0 if n >= 64 else None
        speed[str(n)] = row
    if speed:
        result["speed"] = speed
    gaps = {
        n: by[("local", n)]["final_bpb"] - by[("exact", n)]["final_bpb"]
        for m, n in by
        if m == "local" and ("exact", n) in by
    }
    if gaps:
        result["local_minus_exact"] = {str(n): gap for n, gap in sorted(gaps.items())}
        result["local_within_0.05"] = all(gap <= 0.05 for gap in gaps.values())
    return result


def _order(report: dict[str, Any]) -> list[dict[str, Any]]:
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(report["runs"].values(), key=lambda r: (order[r["model"]], r["size"]))


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else "yes" if ok else "**no**"


def markdown(report: dict[str, Any]) -> str:
    config, recipe = report["config"], report["recipe"]
    runs = _order(report)
    data = next(iter(runs))["data"] if runs else {}
    metric = "CUDA peak allocated" if config["accelerator"] == "gpu" else "whole-process peak RSS"
    tokens = config["steps"] * config["batch_size"] * config["block_size"]
    commands = list(dict.fromkeys(report["commands"]))
    lines = [
        "# The frontier: validation bpb against peak memory and wall time (issue 23)",
        "",
        "Written by `scripts/bench_frontier.py` from `frontier.json`; do not edit by hand.",
        "",
        "- Command"
        + (
            f": `{commands[0]}`"
            if len(commands) <= 1
            else "s (one report; a later command resumes it or adds runs): "
            + ", then ".join(f"`{c}`" for c in commands)
        ),
        f"- Machine: {report['machine']}; started {report['date']}"
        + (f", last run {report['updated']}" if "updated" in report else ""),
        f"- Model (`configs/{RECIPE_FILE}`'s model section"
        + (f", with {config['overrides']}" if config["overrides"] else "")
        + f"): d = {recipe['d_model']}, {recipe['n_shared_layers']} trunk layers, k = {recipe['num_active_experts']}"
        f", router {recipe.get('router')}, balance {recipe.get('balance_coef')}, peak lr {recipe['lr']}, seed "
        f"{config['seed']}. PragnosiaLM: no cap on experts per step, 8 device slots, disk store, Adam experts at the "
        f"shared lr. GlobalMoE: the same router, every expert resident. DenseLM d = {recipe['d_model']}: one FFN k "
        f"experts wide (the MoEs' active parameters); the other DenseLM widths keep that FFN width. Fine: G = "
        f"{config['granularity']} (expert hidden ÷ G, k × G).",
        f"- Every run: {config['steps']} steps × {config['batch_size']} × {config['block_size']} tokens = {tokens:,}; "
        f"warmup {config['lr_warmup_steps']} steps, then a cosine to 0.1 × at the last step; validation every "
        f"{config['eval_every']} steps on {config['limit_val_batches']} fixed batches.",
        "- Data: "
        + ", ".join(
            f"{name} ({config['domains'][name]}) {d['bytes'] / 1e6:.1f} MB, {d['train_tokens']:,} train / "
            f"{d['val_tokens']:,} val tokens"
            for name, d in data.items()
        )
        + f" (max_bytes_per_domain {config['max_bytes_per_domain']}).",
        f"- Memory: the {metric} of the run's process (each run in its own; a resumed run: the largest of its "
        f"processes). tokens/s: training steps after the first {config['warmup_steps']}; minutes: wall time, set-up "
        "and validation included.",
        "",
        f"| model | val bpb | {metric} (MiB) | tokens/s | active params | total params | experts/step | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        touched = f"{r['touched_per_step']:,.0f}" if "touched_per_step" in r else ""
        lines.append(
            f"| {r['label']} | {r['final_bpb']:.3f} | {r['peak_mib']:,.0f} | {r['tokens_per_s']:,.0f} "
            f"| {r['params']['active']:,} | {r['params']['total']:,} | {touched} | {r['wall_seconds'] / 60:.1f} |"
        )
    outcome = goals(report)
    lines += ["", "Goals:", ""]
    frontier = outcome.get("frontier")
    if frontier and "best" in frontier:
        lines.append(
            f"- Frontier at {frontier['budget_mib']:,.0f} MiB (GlobalMoE's smallest n + 10 %; fitting baselines: "
            f"{', '.join(frontier['baselines'])}): the best PragnosiaLM run, {frontier['best']}, "
            f"{frontier['best_bpb']:.3f} bpb, beats the best of them ({frontier['rival']}) by "
            f"{frontier['margin_tokens']:+.3f} at equal tokens (goal ≥ 0.05: {_mark(frontier['ok_tokens'])}) and "
            f"{frontier['rival_time']} by {frontier['margin_time']:+.3f} at its training time (goal ≥ 0.03: "
            f"{_mark(frontier['ok_time'])}; a baseline that finished sooner counts with its final bpb)."
        )
    elif frontier:
        lines.append(f"- Frontier at {frontier['budget_mib']:,.0f} MiB: no PragnosiaLM run or no baseline fits yet.")
    if "exact_by_n" in outcome:
        points = ", ".join(
            f"n = {n}: {v['bpb']:.3f} ({v['pairs_per_expert']:,} pairs per expert)"
            for n, v in outcome["exact_by_n"].items()
        )
        lines.append(f"- Capacity: `exact` {points}; falls strictly: {_mark(outcome['exact_falls_strictly'])}.")
    if "fine" in outcome:
        fine = outcome["fine"]
        lines.append(
            f"- Fine-grained n = {fine['n']:,} against `exact` n = {fine['coarse_n']:,}: {fine['gain']:+.3f} bpb "
            f"(goal > 0: {_mark(fine['ok'])}), {fine['time_per_token_ratio']:.2f} × its time per token (goal ≤ 1.5)."
        )
    for n, row in outcome.get("speed", {}).items():
        parts = []
        if "x_dense" in row:
            parts.append(f"{row['x_dense']:.2f} × DenseLM's time per token (goal: {_mark(row['ok_dense'])})")
        if "x_global_moe" in row:
            parts.append(f"{row['x_global_moe']:.2f} × GlobalMoE's (goal ≤ 1.0: {_mark(row['ok_global_moe'])})")
        if parts:
            lines.append(f"- Speed, `exact` n = {n}: " + ", ".join(parts) + ".")
    if "local_minus_exact" in outcome:
        gaps = ", ".join(f"n = {n}: {gap:+.3f}" for n, gap in outcome["local_minus_exact"].items())
        lines.append(f"- `local` − `exact`: {gaps} (goal ≤ 0.05: {_mark(outcome['local_within_0.05'])}).")
    lines += [
        "",
        "Plots: `frontier.png` (val bpb against peak memory, and against training time), `curves.png` (learning "
        "curves against tokens).",
        "",
    ]
    return "\n".join(lines)


STYLE = {
    "dense": dict(marker="s", color="gray", linestyle="--"),
    "global_moe": dict(marker="D", color="tab:orange", fillstyle="none", linestyle=":"),
    "exact": dict(marker="o", color="tab:blue"),
    "local": dict(marker="^", color="tab:green"),
    "fine": dict(marker="*", color="tab:red", markersize=12, linestyle="none"),
}


def plot(report: dict[str, Any], out: Path) -> None:
    """``frontier.png``: val bpb against peak memory (one line per model, n or width along it; the budget a dotted
    line) and against training seconds (every run's curve); ``curves.png``: val bpb against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _order(report)
    outcome = goals(report)
    fig, (memory, wall) = plt.subplots(1, 2, figsize=(14, 5))
    for model in MODELS:
        rows = sorted((r for r in runs if r["model"] == model), key=lambda r: r["peak_mib"])
        if not rows:
            continue
        memory.plot([r["peak_mib"] for r in rows], [r["final_bpb"] for r in rows], label=LABELS[model], **STYLE[model])
        for r in rows:
            memory.annotate(
                f"d={r['size']}" if model == "dense" else f"n={r['size']}",
                (r["peak_mib"], r["final_bpb"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="x-small",
            )
    if "frontier" in outcome:
        memory.axvline(outcome["frontier"]["budget_mib"], color="black", linestyle=":", label="budget")
    memory.set(xscale="log", xlabel="peak memory (MiB)", ylabel="val bits per byte", title="bpb against memory")
    wall_style = {m: {k: v for k, v in s.items() if k in ("color", "linestyle")} for m, s in STYLE.items()}
    for r in runs:
        style = {**wall_style[r["model"]], "linestyle": wall_style[r["model"]].get("linestyle", "-")}
        if style["linestyle"] == "none":
            style["linestyle"] = "-"
        wall.plot(
            [p["train_seconds"] / 60 for p in r["curve"]], [p["val/bpb"] for p in r["curve"]], label=r["label"], **style
        )
    wall.set(xlabel="training minutes", ylabel="val bits per byte", title="bpb against wall time")
    for ax in (memory, wall):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot([p["tokens"] for p in r["curve"]], [p["val/bpb"] for p in r["curve"]], marker=".", label=r["label"])
    ax.set(xlabel="training tokens", ylabel="val bits per byte", title="Learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    """``frontier.json`` (written first, atomically), then ``README.md`` and the plots from it."""
    path = out / "frontier.json"
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)
    report = json.loads(path.read_text())
    (out / "README.md").write_text(markdown(report))
    if report["runs"]:
        plot(report, out)
