"""Quick mode of the scaling benchmark (issue 16): every file written from one JSON, numbers finite and sane,
runs resumed from the JSON, a report of another config refused."""

import json
import math

import pytest
from bench.scaling import RunPlan, ScalingConfig, plan_runs  # scripts/ is on the path (conftest.py)
from bench_scaling import main


def test_quick_mode_writes_a_sane_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "scaling"
    args = ["--quick", "--global-moe-max", "8", "--out", str(out)]
    main(args)
    for name in ("scaling.json", "README.md", "scaling.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "scaling.json").read_text())
    assert report["command"] == "python scripts/bench_scaling.py " + " ".join(args)
    assert report["machine"] and report["date"] and report["config"]["steps"] == 6
    runs = report["runs"]
    assert list(runs) == ["dense", "exact_n8", "local_n8", "global_moe_n8", "exact_n64", "local_n64"]
    tokens = {r["tokens"] for r in runs.values()}
    assert tokens == {6 * 4 * 32}, "every run sees the same number of tokens"
    actives = [r["params"]["active"] for r in runs.values()]
    assert max(actives) / min(actives) < 1.05, "the models must have the same active parameters"
    for slug, r in runs.items():
        assert [p["step"] for p in r["curve"]] == [3, 6], slug
        assert all(0 < p["val/bpb"] < 8.5 for p in r["curve"]), slug
        assert r["final_bpb"] == r["curve"][-1]["val/bpb"]
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, slug
        memory = r["peak_rss"]
        assert 50 < memory["median_mib"] <= memory["max_mib"] < 4096, slug
        if r["model"] in ("exact", "local"):
            assert 2 <= r["touched_per_step"] <= r["num_experts"], slug
    # exact is GlobalMoE's update: same seed, same data, the same bpb
    assert runs["exact_n8"]["final_bpb"] == pytest.approx(runs["global_moe_n8"]["final_bpb"], abs=1e-4)
    readme = (out / "README.md").read_text()
    for r in runs.values():
        assert f"| {r['final_bpb']:.3f} | {r['tokens_per_s']:,.0f} |" in readme, r["label"]
    assert report["command"] in readme

    capsys.readouterr()
    main(args)  # everything is in the JSON: nothing runs again
    assert "resuming" in capsys.readouterr().out
    assert json.loads((out / "scaling.json").read_text())["runs"] == runs
    # choosing fewer runs (or more) is the same benchmark: the report keeps every run and the union of the choices
    main(["--quick", "--models", "exact", "--experts", "8", "--out", str(out)])
    report = json.loads((out / "scaling.json").read_text())
    assert report["runs"] == runs
    assert report["config"]["num_experts"] == [8, 64] and report["config"]["models"] == [
        "exact",
        "local",
        "global_moe",
        "dense",
    ]
    with pytest.raises(ValueError, match=r"another config \(differs in: steps\)"):
        main([*args, "--steps", "8"])


def test_plan_and_config():
    plans = plan_runs(ScalingConfig())
    assert plans[0] == RunPlan("dense", None)
    assert [p.slug for p in plans if p.model == "global_moe"] == ["global_moe_n8", "global_moe_n64", "global_moe_n512"]
    assert len(plans) == 1 + 2 * 4 + 3
    assert ScalingConfig.gpu().recipe()["d_model"] >= 512
    with pytest.raises(ValueError, match="models \\(sparse\\) must be among"):
        ScalingConfig(models=("sparse",))
    with pytest.raises(ValueError, match="num_experts \\(1,\\) must each be ≥ num_active_experts"):
        ScalingConfig(num_experts=(1,))
    with pytest.raises(ValueError, match="accelerator \\('tpu'\\) must be one of"):
        ScalingConfig(accelerator="tpu")
