"""Continual learning (issue 7): the consolidation policy, the benchmark's quick mode, its arithmetic and resume."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bench.continual import (
    DEFAULT_VARIANTS,
    PLAIN,
    RECIPE_FILE,
    ContinualConfig,
    RunPlan,
    continual_goals,
    figures_of,
    make_datamodule,
    markdown,
    plan_runs,
    train_model,
)
from bench.recipes import method_options
from conftest import cpu_trainer, expert_records, token_loader

from callbacks import DomainSwitcher
from pragnosia_pl import PragnosiaLM
from pragnosia_pl.consolidation import DOMAIN_SWITCH_RATE, Consolidation
from pragnosia_pl.router import Router

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PROTECTED = "experts_per_domain: 2"
RESULTS = SCRIPTS / "results" / "continual"


def protected_model(tiny, experts_per_domain: int = 3) -> PragnosiaLM:
    return PragnosiaLM(
        **tiny,
        num_experts=8,
        num_active_experts=2,
        expert_slots=3,
        expert_cache=3,
        store="host",
        experts_per_domain=experts_per_domain,
    )


# ------------------------------------------------------------------------------------------------- the policy


def test_a_switch_protects_the_domains_experts_and_keeps_its_shared_parts_as_they_were(tiny, tmp_path):
    torch.manual_seed(0)
    model = protected_model(tiny)
    cpu_trainer(tmp_path, max_steps=4).fit(model, token_loader(4, seed=0))
    first = model.consolidation.groups[0].experts.tolist()
    assert len(first) == 3 and set(model.usage) <= set(first)  # stage 1 trained its own 3 experts only
    tokens, targets = next(iter(token_loader(1, seed=0)))
    model.eval()
    with torch.no_grad():
        first_domain = F.log_softmax(model(tokens), dim=-1)  # one known domain: its model alone
    model.on_domain_switch("a", "b")
    shared_at_switch = [p.detach().clone() for p in model.parameters()]
    before = expert_records(model)

    model.train()
    model.usage.clear()
    cpu_trainer(tmp_path, max_steps=4).fit(model, token_loader(4, seed=1))
    second = model.consolidation.groups[1].experts.tolist()
    assert not set(first) & set(second) and set(model.usage) <= set(second)
    after = expert_records(model)
    assert torch.equal(before[first], after[first])  # protected: bit-for-bit, optimizer state included
    assert not torch.equal(before[second], after[second])  # the new domain's experts learnt
    live = [p.detach().clone() for p in model.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(shared_at_switch, live))  # every shared part learnt on
    assert all(torch.equal(a, b) for a, b in zip(model.consolidation.groups[0].shared, shared_at_switch))
    assert model.consolidation.switches == [{"step": 4, "previous": "a", "new": "b"}]

    model.eval()
    with torch.no_grad():
        mixed = model(tokens)  # both domains' models, weighted by their posterior
        known, model.consolidation.groups = model.consolidation.groups, model.consolidation.groups[1:]
        second_domain = F.log_softmax(model(tokens), dim=-1)  # the open domain's model alone: the live shared parts
        model.consolidation.groups = known
    assert all(torch.equal(a, b) for a, b in zip(live, model.parameters()))  # evaluation put the live ones back
    torch.testing.assert_close(mixed, Consolidation.mix([first_domain, second_domain], tokens), rtol=0, atol=1e-5)
    # A fixed-share average is at most log G − (T − 1)·log(1 − α) nats worse per sequence than the right domain's
    # model alone: here the first domain's, as it was at the switch.
    seq_nll = lambda log_probs: -log_probs.gather(-1, targets[..., None]).squeeze(-1).sum(-1)  # noqa: E731
    bound = math.log(2) - (tokens.size(1) - 1) * math.log1p(-DOMAIN_SWITCH_RATE)
    assert (seq_nll(mixed) <= seq_nll(first_domain) + bound + 1e-4).all()


def test_a_switch_before_the_domain_trained_keeps_it_open(tiny, tmp_path):
    model = protected_model(tiny)
    model.on_domain_switch("a", "b")  # nothing trained yet: nothing to protect
    assert len(model.consolidation.groups) == 1 and model.consolidation.switches == []
    plain = PragnosiaLM(**tiny, num_experts=8, num_active_experts=2)
    assert plain.consolidation is None
    plain.on_domain_switch("a", "b")  # without experts_per_domain a switch changes nothing


def test_mix_is_the_fixed_share_average_given_the_prefix():
    tokens = torch.tensor([[0, 1, 1]])  # (B=1, T=3), V=2
    a = torch.tensor([[[0.9, 0.1], [0.5, 0.5], [0.8, 0.2]]]).log()  # domain a's predictions at t = 0, 1, 2
    b = torch.tensor([[[0.2, 0.8], [0.1, 0.9], [0.3, 0.7]]]).log()
    assert torch.equal(Consolidation.mix([a], tokens), a)
    for alpha, by_hand in [(0.5, [0.5, 0.5 / 9 + 0.25, 0.348214]), (DOMAIN_SWITCH_RATE, None)]:
        # t=0: no evidence, 1/2 each; then after each token: (1 − α)·posterior + α/2, the posterior from the
        # weight before and the token's probability (x_1 = 1: a 0.1, b 0.8; x_2 = 1: a 0.5, b 0.9)
        w_a = [0.5]
        for pa, pb in [(0.1, 0.8), (0.5, 0.9)]:
            posterior_a = w_a[-1] * pa / (w_a[-1] * pa + (1 - w_a[-1]) * pb)
            w_a.append((1 - alpha) * posterior_a + alpha / 2)
        if by_hand:
            assert w_a == pytest.approx(by_hand, abs=1e-6)
        expected = torch.stack([w * a[0, t].exp() + (1 - w) * b[0, t].exp() for t, w in enumerate(w_a)])
        mixed = Consolidation.mix([a, b], tokens) if by_hand is None else Consolidation.mix([a, b], tokens, alpha)
        assert torch.allclose(mixed.exp()[0], expected, atol=1e-6)
    assert DOMAIN_SWITCH_RATE == 0.01


def test_policy_state_round_trips():
    policy = Consolidation(experts_per_domain=2, num_experts=8, num_active_experts=2)
    policy.groups[0].experts = torch.tensor([1, 5])
    policy.switch(step=1, parameters=[torch.ones(3)], previous="a", new="b")
    restored = Consolidation(experts_per_domain=2, num_experts=8, num_active_experts=2)
    restored.load_state_dict(policy.state_dict())
    assert restored.summary() == policy.summary() and restored.protected.tolist() == [1, 5]
    assert torch.equal(restored.groups[0].shared[0], torch.ones(3))


def test_router_candidates_bound_the_working_set_and_every_expert_gets_tokens():
    router = Router(d_model=16, num_experts=16, num_active_experts=2)
    candidates = torch.tensor([3, 7, 9, 12])
    routing = router(torch.randn(64, 16), expert_slots=4, candidates=candidates)
    assert set(routing.working_set.tolist()) <= set(candidates.tolist())
    offsets = routing.groups().offsets
    assert all(end > start for start, end in zip(offsets, offsets[1:]))
    with pytest.raises(ValueError, match="1 candidate experts cannot give each token k=2"):
        router(torch.randn(4, 16), expert_slots=2, candidates=torch.tensor([3]))


@pytest.mark.parametrize("experts_per_domain", [1, 9])
def test_domain_groups_must_fit_the_experts(tiny, experts_per_domain):
    with pytest.raises(
        ValueError,
        match=rf"model\.experts_per_domain \({experts_per_domain}\) must be between model\.num_active_experts \(2\) "
        r"and model\.num_experts \(8\), or null",
    ):
        protected_model(tiny, experts_per_domain=experts_per_domain)


def test_domains_that_run_out_of_experts_name_the_keys():
    policy = Consolidation(experts_per_domain=3, num_experts=4, num_active_experts=2)
    router = Router(d_model=4, num_experts=4, num_active_experts=2)
    policy.training_candidates(torch.randn(8, 4), router)
    policy.switch(step=1, parameters=[], previous="a", new="b")
    with pytest.raises(
        ValueError, match=r"domain 2 needs model\.experts_per_domain \(3\) unprotected experts but only 1"
    ):
        policy.training_candidates(torch.randn(8, 4), router)


# ------------------------------------------------------------------------------------------------ the benchmark


def test_bench_continual_quick(tmp_path, monkeypatch):
    out = tmp_path / "continual"
    monkeypatch.setattr(sys, "argv", ["bench_continual.py", "--quick", "--out", str(out)])
    runpy.run_path(str(SCRIPTS / "bench_continual.py"), run_name="__main__")
    report = json.loads((out / "continual.json").read_text())
    labels = [r["label"] for r in report["runs"]]
    assert labels == [
        "GlobalMoE (naive sequential)",
        f"PragnosiaLM ({PLAIN})",
        f"PragnosiaLM ({PROTECTED})",
        "DenseLM (naive sequential)",
        "PragnosiaLM joint (all domains mixed, reference)",
    ]
    for run in report["runs"]:
        bpb = run["bpb"]
        assert run["stages"] == ["code", "docs", "licenses"] and run["steps"] == 12
        assert len(bpb["initial"]) == 3 and [len(row) for row in bpb["matrix"]] == [3, 3, 3]  # 3 stages × 3 domains
        assert all(0 < v < 9 for row in bpb["matrix"] for v in row)
        assert bpb["plasticity"] == [bpb["matrix"][i][i] for i in range(3)]
        assert (out / run["slug"] / "continual.png").stat().st_size > 0
    assert set(report["goals"]) == {PLAIN, PROTECTED}
    plain, protected, joint = report["runs"][1], report["runs"][2], report["runs"][4]
    assert plain["options"]["experts_per_domain"] is None and "consolidation" not in plain
    assert joint["options"]["experts_per_domain"] is None and "consolidation" not in joint
    assert protected["options"] == {**method_options(RECIPE_FILE), "experts_per_domain": 2}  # the config's, m = 2
    domains = protected["consolidation"]["domains"]
    assert [len(d["experts"]) for d in domains] == [2, 2, 2] and len({e for d in domains for e in d["experts"]}) == 6
    assert [d["shared_snapshot"] for d in domains] == [True, True, False]  # the open domain uses the live ones
    assert (out / "heatmaps.png").stat().st_size > 0

    page = (out / "README.md").read_text()  # written from the JSON: its numbers, its command
    assert "Written by `scripts/bench_continual.py` from `continual.json`" in page
    assert f"`python scripts/bench_continual.py --quick --out {out}`" in page and report["machine"] in page
    for run in report["runs"]:
        figures = run["bpb"]["figures"]
        assert f"| {run['label']} | {figures['average_final']:.3f} |" in page
        if run["kind"] != "joint":
            assert f"| {figures['forgetting']:+.3f} | {figures['bwt']:+.3f} |" in page


def test_the_results_page_is_rendered_from_its_json():
    report = json.loads((RESULTS / "continual.json").read_text())
    assert (RESULTS / "README.md").read_text() == markdown(report)
    assert report["command"] == "python scripts/bench_continual.py"
    assert {run["variant"] for run in report["runs"] if run["kind"] == "pragnosia"} == set(DEFAULT_VARIANTS)


def test_figures_and_goals_match_a_hand_computed_example():
    schedule = [{"domain": d, "epochs": 1} for d in ("a", "b", "c")]

    def finished(matrix, initial):
        switcher = DomainSwitcher(schedule)
        switcher.domains = ["a", "b", "c"]
        switcher.loss_matrix = switcher.bpb_matrix = matrix
        switcher.initial_loss = switcher.initial_bpb = initial
        return switcher

    global_moe = figures_of(
        RunPlan("global_moe"), finished([[2.0, 5.0, 6.0], [3.0, 2.5, 5.5], [3.5, 3.0, 1.5]], [8.0, 8.0, 8.0])
    )
    figures = global_moe["bpb"]["figures"]
    assert figures["average_final"] == pytest.approx(8.0 / 3)  # (3.5 + 3.0 + 1.5) / 3
    assert figures["bwt"] == pytest.approx(-1.0)  # ((2 − 3.5) + (2.5 − 3)) / 2
    assert figures["forgetting"] == pytest.approx(1.0)  # ((3.5 − 2) + (3 − 2.5)) / 2
    assert figures["fwt"] == pytest.approx(2.75)  # ((8 − 5) + (8 − 5.5)) / 2
    assert global_moe["bpb"]["plasticity"] == [2.0, 2.5, 1.5]

    mine = figures_of(
        RunPlan("pragnosia", "x"), finished([[2.1, 5.0, 6.0], [2.1, 2.6, 6.0], [2.15, 2.6, 1.6]], [8.0, 8.0, 8.0])
    )
    goal = continual_goals([global_moe, mine])["x"]
    assert goal["forgetting"] == pytest.approx(0.025)  # ((2.15 − 2.1) + (2.6 − 2.6)) / 2
    assert goal["forgetting_ratio"] == pytest.approx(0.025) and goal["forgetting_ok"]  # ≤ 5% of 1.0
    assert goal["final_ratio"] == pytest.approx(6.35 / 8.0) and goal["final_ok"]  # 0.794 ≤ 0.8
    assert goal["plasticity_ratios"] == pytest.approx([1.05, 1.04, 1.6 / 1.5]) and goal["plasticity_ok"]


def test_resume_in_the_middle_of_the_schedule_continues_exactly(tmp_path):
    config = ContinualConfig.quick(baselines=())
    plan = plan_runs(config)[1]
    assert plan.variant == PROTECTED
    data = make_datamodule(config)
    whole = train_model(config, plan, data, tmp_path / "whole", tmp_path / "work-whole")
    first = train_model(config, plan, data, tmp_path / "first", tmp_path / "work", stop_after_stage=1)
    assert len(first["bpb"]["matrix"]) == 1 and first["steps"] == 4
    checkpoint = str(tmp_path / "work" / "checkpoints" / "last.ckpt")
    resumed = train_model(config, plan, data, tmp_path / "resumed", tmp_path / "work", ckpt_path=checkpoint)
    assert resumed["steps"] == whole["steps"] == 12
    assert resumed["bpb"]["initial"] == whole["bpb"]["initial"]
    assert resumed["bpb"]["matrix"] == whole["bpb"]["matrix"]  # CPU: bit-identical
    assert resumed["consolidation"] == whole["consolidation"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(schedule=["code", "poetry"]), r"schedule names \['poetry'\], which are not among domains"),
        (dict(schedule=["code"]), r"schedule \(\['code'\]\) needs at least two stages"),
        (dict(baselines=("global_moe", "linear")), r"baselines \(linear\) must be among: global_moe, dense, joint"),
        (dict(steps_per_stage=5), r"steps_per_stage \(5\) must be a multiple of batches_per_epoch \(2\)"),
        (dict(d_model=0), r"d_model \(0\) must be ≥ 1"),
        (dict(joint_variant="best"), r"joint_variant \('best'\) must be one of pragnosia_variants"),
    ],
)
def test_bad_benchmark_options_name_their_field(options, match):
    with pytest.raises(ValueError, match=match):
        ContinualConfig.quick(**options)


def test_stages_must_fit_the_smallest_domain():
    with pytest.raises(ValueError, match=r"batches_per_epoch \(500\) exceeds the \d+ training batches"):
        make_datamodule(ContinualConfig.quick(steps_per_stage=500, batches_per_epoch=500))


def test_default_variants_label_and_plan():
    config = ContinualConfig()
    runs = plan_runs(config)
    assert runs[0].kind == "global_moe" and [r.kind for r in runs[-2:]] == ["dense", "joint"]
    assert math.isclose(config.steps_per_stage / config.batches_per_epoch, config.epochs_per_stage)
    assert len({r.slug for r in runs}) == len(runs)
