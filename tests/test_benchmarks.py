"""Quick modes of the quality and throughput benchmarks (issue 6): files written, numbers sane; the results pages
(issue 17): each is its JSON rendered, and follows it."""

import json
import math
import runpy
import shutil
import sys
from pathlib import Path

import pytest
from bench.quality import (
    PRESET_VARIANTS,
    QualityConfig,
    fit_budget,
    parse_variants,
    plan_runs,
)
from bench.throughput import ThroughputConfig, plan_contenders

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name: str, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(SCRIPTS / name), run_name="__main__")


def test_bench_quality_quick(tmp_path, monkeypatch):
    out = tmp_path / "quality"
    variants = json.dumps({"bte": {"objective": "exact", "expert_optimizer": "adam"}})
    run_script(
        "bench_quality.py", "--quick", "--out", str(out), "--variants", variants, "exact", monkeypatch=monkeypatch
    )
    for name in (
        "quality.json",
        "quality.md",
        "curves.png",
        "curve_pragnosia_n8.png",
        "curve_pragnosia_n8_bte.png",
        "curve_pragnosia_n8_exact.png",
        "curve_global_moe_n8.png",
        "curve_dense.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "quality.json").read_text())
    labels = ["PragnosiaLM n=8", "PragnosiaLM n=8 [bte]", "PragnosiaLM n=8 [exact]", "GlobalMoE n=8", "DenseLM"]
    assert [r["label"] for r in report["runs"]] == labels
    actives = [r["params"]["active"] for r in report["runs"]]
    assert max(actives) / min(actives) < 1.01, "the models must have the same active parameters"
    for run in report["runs"]:
        assert run["steps"] == 20
        assert [p["step"] for p in run["curve"]] == [10, 20]
        for key in ("val/bpb", "val/bpb/code", "val/bpb/prose"):
            assert math.isfinite(run["final"][key]) and 0 < run["final"][key] < 8.5, (run["label"], key)
        assert run["curve"][-1]["val/bpb"] < 8.0  # 20 steps learn something beyond a uniform byte (8 bits)
    assert set(report["goals"]) == {"n=8", "n=8 [bte]", "n=8 [exact]"}
    assert "| PragnosiaLM n=8 |" in (out / "quality.md").read_text()
    page = (out / "README.md").read_text()  # the run went into a page's folder: the page follows it
    assert "python scripts/bench_quality.py --quick" in page
    assert all(f"| {run['final']['val/bpb']:.3f} |" in page for run in report["runs"])


def test_bench_throughput_quick(tmp_path, monkeypatch):
    out = tmp_path / "throughput"
    run_script("bench_throughput.py", "--quick", "--out", str(out), monkeypatch=monkeypatch)
    report = json.loads((out / "throughput.json").read_text())
    results = report["results"]
    assert len(results) == 7  # 3 stores × caches {2, 8}, and GlobalMoE
    for r in results:
        assert r["timed_steps"] == 2
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        if r["model"] == "PragnosiaLM":
            assert 0 < r["step_time_vs_device"] < 10 and 0 < r["speed_vs_global_moe"] < 100
            assert 0 <= r["cache_hit_rate"] <= 1
            if r["store"] == "device":
                assert r["step_time_vs_device"] == 1.0
    assert "| 8 | GlobalMoE |" in (out / "throughput.md").read_text()
    page = (out / "README.md").read_text()
    assert "python scripts/bench_throughput.py --quick" in page and "Measured before" not in page
    assert all(f"{r['tokens_per_s']:,.0f}" in page for r in results)


def test_plans():
    assert [p.label for p in plan_runs(QualityConfig(num_experts=(8, 32), variants={}))] == [
        "PragnosiaLM n=8",
        "GlobalMoE n=8",
        "PragnosiaLM n=32",
        "GlobalMoE n=32",
        "DenseLM",
    ]
    assert [p.label for p in plan_runs(QualityConfig(num_experts=(8,), models=("pragnosia",), plain=False))] == [
        "PragnosiaLM n=8 [exact]",
        "PragnosiaLM n=8 [local]",
    ]
    contenders = plan_contenders(ThroughputConfig(), 512)
    assert [(c.store, c.expert_cache) for c in contenders] == [
        ("device", 2),
        ("host", 2),
        ("disk", 2),
        ("device", 8),
        ("host", 8),
        ("disk", 8),
        (None, None),
    ]
    assert {c.expert_cache for c in plan_contenders(ThroughputConfig(cache_factors=(1, 4)), 4)} == {2, 4, None}


def test_variants_are_presets_or_json():
    exact = PRESET_VARIANTS["exact"]
    assert parse_variants(["exact", '{"adam": {"expert_optimizer": "adam"}}']) == {
        "exact": exact,
        "adam": {"expert_optimizer": "adam"},
    }
    assert exact["expert_cache"] < 32 and exact["objective"] == "exact"
    assert PRESET_VARIANTS["local"] == {**exact, "objective": "local"}
    for bad in ("fast", "[1, 2]", '{"x": 1}'):
        with pytest.raises(ValueError, match=r"neither a preset \(exact, bounded, local\) nor a JSON"):
            parse_variants([bad])


def test_fit_budget_cuts_steps_to_a_multiple_of_eval_every():
    steps, budget = fit_budget(1500, 100, {"a": 10.0, "b": 5.0}, minutes=10, overhead=1.0)
    assert (steps, budget["steps_run"]) == (1500, 1500)  # 150 s + 300 s fit in 10 min
    steps, budget = fit_budget(1500, 100, {"a": 1.0, "b": 1.0}, minutes=10, overhead=1.0)
    assert steps == 300 and budget["estimated_minutes"] == pytest.approx(50.0)
    assert fit_budget(1500, 100, {"a": 0.01}, minutes=1)[0] == 100  # never below one learning-curve point


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (QualityConfig, dict(models=("pragnosia", "switch")), r"models \(switch\) must be among"),
        (QualityConfig, dict(num_experts=(1,)), r"must each be ≥ expert_slots \(2\)"),
        (QualityConfig, dict(steps=0), r"steps \(0\) must be ≥ 1"),
        (ThroughputConfig, dict(stores=("ssd",)), r"stores \(ssd\) must be among"),
        (ThroughputConfig, dict(skip_steps=8), r"skip_steps \(8\) must be in \[0, window_steps=8\)"),
        (ThroughputConfig, dict(cache_factors=(0,)), r"cache_factors \(0,\) must each be ≥ 1"),
    ],
)
def test_config_errors(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_bench_engine_quick(tmp_path, monkeypatch):
    out = tmp_path / "engine"
    run_script("bench_engine.py", "--quick", "--out", str(out), monkeypatch=monkeypatch)
    for name in ("engine.json", "README.md", "step_time.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "engine.json").read_text())
    rows = {r["recipe"]: r for r in report["results"]}
    assert set(rows) == {"local S=2", "local S=8", "local", "exact", "bounded", "GlobalMoE", "DenseLM"}
    assert rows["GlobalMoE"]["step_time_vs_global_moe"] == 1.0 and rows["DenseLM"]["step_time_vs_dense"] == 1.0
    for name, row in rows.items():
        assert math.isfinite(row["step_ms_median"]) and row["step_ms_median"] > 0, name
        assert row["step_time_vs_dense"] == pytest.approx(row["step_ms_median"] / rows["DenseLM"]["step_ms_median"])
        if name not in ("GlobalMoE", "DenseLM"):  # invariant 7, as the benchmark counts it
            limit = 2 if name in ("exact", "bounded") else 1
            assert 0 <= row["reads_per_touched_expert"] <= limit, row
    assert rows["DenseLM"]["reads_per_step"] == 0 and "touched_per_step" not in rows["DenseLM"]
    page = (out / "README.md").read_text()
    assert "| 8 | exact |" in page and "| × GlobalMoE | × DenseLM |" in page
    dense_row = next(line for line in page.splitlines() if line.startswith("| 8 | DenseLM |"))
    assert dense_row.endswith("| 0 | n/a |  |  |")
    # GlobalMoE counts the experts it routes to in training, as PragnosiaLM counts its expert updates: with the same
    # seed, weights and first batches, exact's first steps touch as many (up to rounding-flipped routing)
    assert rows["GlobalMoE"]["touched_per_step"] == pytest.approx(rows["exact"]["touched_per_step"], rel=0.25)
    assert rows["GlobalMoE"]["touched_per_step"] > 0
    rendered = (out / "README.md").read_text()
    (out / "README.md").write_text("stale")
    run_script("bench_engine.py", "--report-only", "--out", str(out), monkeypatch=monkeypatch)
    assert (out / "README.md").read_text() == rendered


def test_bench_engine_quick_at_two_precisions(tmp_path, monkeypatch):
    """Every contender at each precision, in one run; each compared with the baselines at its own precision."""
    from bench import throughput

    precisions = []  # of every Trainer the run builds

    def timing_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        precisions.append(trainer.precision)
        return trainer

    build_trainer = throughput.timing_trainer
    monkeypatch.setattr(throughput, "timing_trainer", timing_trainer)
    out = tmp_path / "engine"
    args = ["--quick", "--recipes", "exact", "GlobalMoE", "DenseLM", "--precisions", "32-true", "bf16-mixed"]
    run_script("bench_engine.py", *args, "--out", str(out), monkeypatch=monkeypatch)
    assert precisions.count("bf16-mixed") == precisions.count("32-true") > 0
    rows = {r["label"]: r for r in json.loads((out / "engine.json").read_text())["results"]}
    assert set(rows) == {
        f"{recipe} {precision}"
        for recipe in ("exact", "GlobalMoE", "DenseLM")
        for precision in ("32-true", "bf16-mixed")
    }
    for precision in ("32-true", "bf16-mixed"):
        exact, moe, dense = (rows[f"{recipe} {precision}"] for recipe in ("exact", "GlobalMoE", "DenseLM"))
        assert exact["precision"] == precision
        assert exact["step_time_vs_global_moe"] == pytest.approx(exact["step_ms_median"] / moe["step_ms_median"])
        assert exact["step_time_vs_dense"] == pytest.approx(exact["step_ms_median"] / dense["step_ms_median"])
    page = (out / "README.md").read_text()
    assert "| 8 | exact bf16-mixed |" in page and "| 8 | exact 32-true |" in page


# ------------------------------------------------------------------------------------------------ results pages

RESULTS = SCRIPTS / "results"
MIB = 2**20


def _json(path: Path):
    return json.loads(path.read_text())


def _quality_numbers(folder: Path) -> list[str]:
    return [f"{run['final']['val/bpb']:.3f}" for path in folder.glob("**/quality.json") for run in _json(path)["runs"]]


def _memory_numbers(folder: Path) -> list[str]:
    return [
        f"{r['mean_bytes'] / MIB:.1f}" for path in folder.glob("**/constant_memory.json") for r in _json(path)["runs"]
    ]


def _throughput_numbers(folder: Path) -> list[str]:
    return [f"{r['tokens_per_s']:,.0f}" for path in folder.glob("**/throughput.json") for r in _json(path)["results"]]


def _store_numbers(folder: Path) -> list[str]:
    whole = _json(folder / "whole_process" / "peak_rss.json")
    return _memory_numbers(folder) + [f"{kb:,}" for s in whole["samples"] for kb in s["max_rss_kb"].values()]


def _quickstart_numbers(folder: Path) -> list[str]:
    results = _json(folder / "quickstart.json")["results"]
    return [f"{r['tokens_per_s']:,.0f}" for r in results] + [f"{r['val_bpb_after']:.2f}" for r in results]


def _gpu_numbers(folder: Path) -> list[str]:
    tests = _json(folder / "cuda_tests.json")
    return [f"{tests['passed']} passed", *_memory_numbers(folder), *_throughput_numbers(folder)]


PAGE_NUMBERS = {
    "quality": _quality_numbers,
    "constant_memory": _memory_numbers,
    "store_memory": _store_numbers,
    "throughput": _throughput_numbers,
    "quickstart": _quickstart_numbers,
    "gpu": _gpu_numbers,
}


@pytest.mark.parametrize("name", sorted(PAGE_NUMBERS))
def test_results_page_is_its_json_rendered(name):
    """The checked-in page is what its benchmark renders from the checked-in JSON (a hand edit fails here), and
    every figure of the JSON is on it."""
    from bench import pages

    folder = RESULTS / name
    text = pages.render(folder)
    assert text == (folder / "README.md").read_text(), f"{name}/README.md is not its JSON rendered: re-render it"
    assert "do not edit by hand" in text.splitlines()[2]
    missing = [number for number in PAGE_NUMBERS[name](folder) if number not in text]
    assert not missing, missing


def _set(data, path: list, value):
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


# (page, JSON in it, where in the JSON, a new value, what the page must then say)
CHANGES = [
    ("quality", "engine_n32/quality.json", ["runs", 1, "final", "val/bpb"], 1.2345, "| 1.234 |"),
    ("quality", "seed3_n32_matched/quality.json", ["runs", 0, "final", "val/bpb"], 1.6789, "| 1.679 |"),
    ("constant_memory", "engine_quickstart/constant_memory.json", ["runs", 1, "mean_bytes"], 600.44 * MIB, "600.4"),
    ("constant_memory", "constant_memory.json", ["runs", 0, "mean_bytes"], 512.34 * MIB, "| 512.3 |"),
    ("store_memory", "whole_process/peak_rss.json", ["samples", 0, "max_rss_kb", "8"], 123456, "| 123,456 |"),
    ("throughput", "throughput.json", ["results", 0, "tokens_per_s"], 12345.4, "12,345 /"),
    ("quickstart", "quickstart.json", ["results", 0, "val_bpb_after"], 3.21, "| 3.21 |"),
    ("gpu", "cuda_tests.json", ["passed"], 99, "99 passed"),
    ("gpu", "throughput/throughput.json", ["results", 6, "tokens_per_s"], 98765.0, "| 98,765 |"),
]


@pytest.mark.parametrize(("name", "source", "path", "value", "expected"), CHANGES)
def test_results_page_follows_its_json(tmp_path, name, source, path, value, expected):
    """Rendered from a copy whose JSON says something else, the page says it too, and differs from the one in git."""
    from bench import pages

    folder = tmp_path / name
    shutil.copytree(RESULTS / name, folder, ignore=shutil.ignore_patterns("*.png"))
    data = _json(folder / source)
    _set(data, path, value)
    (folder / source).write_text(json.dumps(data))
    text = pages.render(folder)
    assert expected in text
    assert expected not in (RESULTS / name / "README.md").read_text()
    assert pages.write(folder).read_text() == text


def test_engine_pages_are_their_json_rendered():
    from bench import engine

    for path in RESULTS.glob("engine/**/engine.json"):
        assert engine.markdown(_json(path)) == (path.parent / "README.md").read_text(), path


def test_pages_banner_follows_the_date(tmp_path):
    """A report dated before the engine rewrite gets the banner; the same report dated after it does not."""
    from bench import pages

    folder = tmp_path / "quickstart"
    shutil.copytree(RESULTS / "quickstart", folder)
    assert "Measured before the engine rewrite" in pages.render(folder)
    data = _json(folder / "quickstart.json")
    (folder / "quickstart.json").write_text(json.dumps({**data, "date": "2026-12-02 10:00"}))
    assert "Measured before the engine rewrite" not in pages.render(folder)


def test_page_of_an_unknown_folder_is_an_error(tmp_path):
    from bench import pages

    with pytest.raises(ValueError, match=r"is not a results page: its name must be one of quality, constant_memory"):
        pages.render(tmp_path / "elsewhere")
    assert pages.page_folder(tmp_path / "throughput" / "engine") == tmp_path / "throughput"
    assert pages.page_folder(tmp_path / "elsewhere") is None
