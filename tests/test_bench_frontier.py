"""Quick mode of the frontier benchmark (issue 23): every file written from one JSON, numbers finite and sane,
finished runs kept, a killed run resumed from its checkpoint to the same result, a report of another config
refused."""

import json
import math

import pytest
from bench.frontier import FrontierConfig, RunPlan, plan_runs  # scripts/ is on the path (conftest.py)
from bench.frontier_page import bpb_at_seconds
from bench_frontier import main

from pragnosia_pl.faults import CRASH_AT_ENV


def test_quick_mode_writes_a_sane_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "frontier"
    args = ["--quick", "--global-moe-max", "8", "--parallel", "2", "--out", str(out)]
    main(args)
    for name in ("frontier.json", "README.md", "frontier.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list((out / ".runs").iterdir()), "a finished run's checkpoints and store are removed"
    report = json.loads((out / "frontier.json").read_text())
    assert report["command"] == "python scripts/bench_frontier.py " + " ".join(args)
    assert report["machine"] and report["date"] and report["config"]["steps"] == 6
    runs = report["runs"]
    assert list(runs) == [
        "dense_d16",
        "dense_d24",
        "global_moe_n8",
        "exact_n8",
        "local_n8",
        "exact_n64",
        "fine_n16",
    ]
    assert {r["tokens"] for r in runs.values()} == {6 * 4 * 32}, "every run sees the same number of tokens"
    moes = [r["params"]["active"] for slug, r in runs.items() if slug != "dense_d24"]
    assert max(moes) / min(moes) < 1.05, "the MoEs, the fine recipe and DenseLM d=16: the same active parameters"
    assert runs["dense_d24"]["params"]["active"] > 1.3 * runs["dense_d16"]["params"]["active"]
    for slug, r in runs.items():
        assert [p["step"] for p in r["curve"]] == [3, 6], slug
        assert all(0 < p["val/bpb"] < 8.5 for p in r["curve"]), slug
        times = [p["train_seconds"] for p in r["curve"]]
        assert 0 < times[0] < times[1] == pytest.approx(r["train_seconds"]), slug
        assert r["final_bpb"] == r["curve"][-1]["val/bpb"]
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, slug
        assert 50 < r["peak_mib"] < 4096 and r["memory_metric"] == "peak_rss" and r["processes"] == 1, slug
        assert r["runs_at_once"] == 2, slug  # two at a time, reported in the plan's order all the same
    assert runs["fine_n16"]["touched_per_step"] > runs["exact_n8"]["touched_per_step"] / 2
    # exact is GlobalMoE's update: same seed, same data, same schedule, the same bpb
    assert runs["exact_n8"]["final_bpb"] == pytest.approx(runs["global_moe_n8"]["final_bpb"], abs=1e-4)
    readme = (out / "README.md").read_text()
    for r in runs.values():
        assert f"| {r['label']} | {r['final_bpb']:.3f} | {r['peak_mib']:,.0f} |" in readme, r["label"]
    assert report["command"] in readme and "Frontier at" in readme and "Capacity" in readme

    capsys.readouterr()
    main(args)  # everything is in the JSON: nothing runs again
    assert "resuming" in capsys.readouterr().out
    assert json.loads((out / "frontier.json").read_text())["runs"] == runs
    main(["--quick", "--models", "exact", "--experts", "8", "--out", str(out)])  # fewer runs: the same benchmark
    assert json.loads((out / "frontier.json").read_text())["runs"] == runs
    with pytest.raises(ValueError, match=r"another config \(differs in: steps\)"):
        main([*args, "--steps", "8"])


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path, monkeypatch):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["--quick", "--models", "exact", "--experts", "8", "--local-experts", "8"]
    main([*args, "--out", str(whole)])
    monkeypatch.setenv(CRASH_AT_ENV, "checkpoint-write:2")  # checkpoints at steps 2 and 4: killed inside the second
    with pytest.raises(RuntimeError, match="exact n=8 failed"):
        main([*args, "--out", str(killed)])
    assert (killed / ".runs" / "exact_n8" / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.delenv(CRASH_AT_ENV)
    main([*args, "--out", str(killed)])
    before = json.loads((whole / "frontier.json").read_text())["runs"]["exact_n8"]
    after = json.loads((killed / "frontier.json").read_text())["runs"]["exact_n8"]
    assert after["processes"] == 2 and before["processes"] == 1
    assert len(after["curve"]) == len(before["curve"]) == 2
    assert after["curve"] == [
        {**p, "train_seconds": q["train_seconds"]} for p, q in zip(before["curve"], after["curve"])
    ]
    assert len(after["step_seconds"]) == 6, "the first process's step times ride in the checkpoint"
    assert after["wall_seconds"] > after["train_seconds"]


def test_plan_config_and_goal_arithmetic():
    config = FrontierConfig()
    plans = plan_runs(config)
    assert plans[:3] == [RunPlan("dense", 128), RunPlan("dense", 192), RunPlan("dense", 256)]
    assert [p.slug for p in plans if p.model == "global_moe"] == ["global_moe_n8", "global_moe_n64", "global_moe_n512"]
    assert [p.size for p in plans if p.model == "local"] == [64, 512]
    assert plans[-1] == RunPlan("fine", 4096 * 8)
    assert config.steps * config.tokens_per_step >= 25_000_000
    assert FrontierConfig.gpu().recipe()["d_model"] >= 512
    assert FrontierConfig.gpu().steps * FrontierConfig.gpu().tokens_per_step >= 200_000_000
    with pytest.raises(ValueError, match="models \\(sparse\\) must be among"):
        FrontierConfig(models=("sparse",))
    with pytest.raises(ValueError, match="must each be ≥ num_active_experts"):
        FrontierConfig(num_experts=(1,))
    with pytest.raises(ValueError, match="every n must be ≤ 65,536"):
        FrontierConfig(fine_num_experts=2**17)
    with pytest.raises(ValueError, match="granularity \\(3\\) must divide"):
        FrontierConfig(granularity=3)
    run = {"curve": [{"train_seconds": 10.0, "val/bpb": 3.0}, {"train_seconds": 20.0, "val/bpb": 2.0}]}
    assert [bpb_at_seconds(run, s) for s in (5.0, 15.0, 20.0, 99.0)] == [3.0, 2.5, 2.0, 2.0]
