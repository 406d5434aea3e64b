"""Memory shape, in subprocesses (DESIGN §4.5, §6): flat in n with the disk store, growing for GlobalMoE.

A property with generous margins, not a timing: each run is a separate process through the normal training path.
"""

import json
import subprocess
import sys

import pytest

from pragnosia_pl.experiments.constant_memory import RunResult, RunSpec, run_isolated, verdict

TINY = dict(
    d_model=32, n_shared_layers=1, n_heads=2, batch_size=4, block_size=32, max_bytes=100_000, steps=10, warmup=3
)


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, int], RunResult]:
    return {(model, n): run_isolated(RunSpec(model, n, **TINY)) for model in ("pragnosia", "global") for n in (8, 2048)}


def test_disk_store_peak_rss_is_flat_in_the_number_of_experts(runs):
    small, large = runs["pragnosia", 8].summary["mean_bytes"], runs["pragnosia", 2048].summary["mean_bytes"]
    assert abs(large - small) / small < 0.10, (small, large)


def test_global_moe_grows_by_at_least_its_extra_experts(runs):
    small, large = runs["global", 8], runs["global", 2048]
    from pragnosia_pl import GlobalMoE

    per_expert = sum(
        p.numel()
        for p in GlobalMoE(
            d_model=32, n_shared_layers=1, n_heads=2, num_experts=1, num_active_experts=1
        ).experts.parameters()
    )
    # At least their float32 parameters (gradients and Adam moments exist only for experts a step touched).
    extra = (2048 - 8) * per_expert * 4
    assert large.summary["mean_bytes"] - small.summary["mean_bytes"] >= extra


def test_verdict_logic(runs):
    decision = verdict(list(runs.values()))
    assert decision["checks"]["flat_across_n"] and decision["checks"]["baseline_grows"]
    flat = verdict(list(runs.values()), {"max_cv": 1.0, "max_spread": 1.0 - 1e-9, "max_floor_ratio": 100.0})
    assert not flat["checks"]["flat_across_n"] and not flat["passed"]


def test_script_quick_mode_writes_its_files(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "scripts/prove_constant_memory.py",
            "--quick",
            "--experts",
            "8",
            "64",
            "--steps",
            "8",
            "--warmup",
            "3",
            "--baseline-max-experts",
            "64",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    result = json.loads((tmp_path / "constant_memory.json").read_text())
    assert {(r["model"], r["num_experts"]) for r in result["runs"]} == {
        ("pragnosia", 8),
        ("pragnosia", 64),
        ("global", 8),
        ("global", 64),
    }
    assert (done.returncode == 0) == result["passed"]
    assert all(len(r["per_step_bytes"]) == 8 and r["floor_bytes"] > 0 for r in result["runs"])
    assert "Verdict" in (tmp_path / "constant_memory.md").read_text()
    assert (tmp_path / "constant_memory.png").stat().st_size > 10_000


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match=r"--steps \(5\) must be larger than --warmup \(5\)"):
        RunSpec(steps=5, warmup=5)
    with pytest.raises(ValueError, match=r"model \('dense'\) must be one of: pragnosia, global"):
        RunSpec(model="dense")
