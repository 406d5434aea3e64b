"""Learning-rate schedules and precision flags (issue 22): the Lightning way, taking effect under manual optimization.

Mutations seen failing, and the test that caught each: the scheduler not stepped in ``training_step`` (the CLI
schedule tests and the resume test); ``--lr_scheduler`` alone left to Lightning, which drops it without an
``--optimizer`` (``test_lr_scheduler_alone_takes_effect``); ``WarmupCosine`` without its ``total_steps`` from the run
(``test_warmup_cosine_ends_at_the_runs_last_step``); the experts' learning rate not following the shared factor
(test_exact.py's scheduled ``exact ≡ GlobalMoE`` cases).
"""

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_trainer, expert_records, token_loader
from test_cli import QUICKSTART, TINY_RUN
from test_exact import with_schedule

from pragnosia_pl import PragnosiaLM, WarmupCosine
from pragnosia_pl.cli import main, run_cli


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pragnosia"])
    return tmp_path


def checkpoint_of(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_warmup_cosine_factors():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = WarmupCosine(optimizer, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([2.0 * s / 5 for s in range(1, 6)])  # linear warmup to the peak at step 4
    assert lrs[9] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))  # half way down
    assert lrs[14:] == pytest.approx([0.2, 0.2])  # the floor, then constant


def test_warmup_cosine_refuses_bad_values():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match=r"lr_scheduler.total_steps \(5\) must be > lr_scheduler.warmup_steps \(5\)"):
        WarmupCosine(optimizer, warmup_steps=5, total_steps=5)
    with pytest.raises(ValueError, match=r"lr_scheduler.min_lr_ratio \(2.0\) must be in \[0, 1\]"):
        WarmupCosine(optimizer, warmup_steps=1, total_steps=5, min_lr_ratio=2.0)


@pytest.mark.parametrize("objective", ["local", "exact"])
def test_lr_scheduler_alone_takes_effect(in_tmp, objective):
    """Issue 22's report: ``--lr_scheduler CosineAnnealingLR`` ran, but the checkpoint had ``lr_schedulers: []``
    and the learning rate was still 1e-3."""
    main(["fit", "--config", str(QUICKSTART), *TINY_RUN, "--trainer.max_steps", "4", "--model.objective", objective,
          "--lr_scheduler", "CosineAnnealingLR", "--lr_scheduler.T_max", "4",
          "--trainer.default_root_dir", "r"])  # fmt: skip
    checkpoint = checkpoint_of(in_tmp / "r")
    assert checkpoint["lr_schedulers"] and checkpoint["lr_schedulers"][0]["last_epoch"] == 4
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.95)  # the model's own AdamW


def test_optimizer_flag_takes_effect_for_the_shared_parameters(in_tmp):
    cli = run_cli(["fit", "--config", str(QUICKSTART), *TINY_RUN, "--optimizer", "SGD", "--optimizer.lr", "0.5",
                   "--trainer.default_root_dir", "r"])  # fmt: skip
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["initial_lr"] == 0.5
    shared = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert shared == {id(p) for p in cli.model.parameters()}  # the experts are in the store, with their own rule


def test_warmup_cosine_ends_at_the_runs_last_step(in_tmp):
    """The shipped configs name ``WarmupCosine`` without ``total_steps``: the cosine ends at ``trainer.max_steps``,
    whatever the command line sets it to."""
    main(["fit", "--config", str(QUICKSTART), *TINY_RUN, "--trainer.max_steps", "6",
          "--lr_scheduler.warmup_steps", "2", "--trainer.default_root_dir", "r"])  # fmt: skip
    state = checkpoint_of(in_tmp / "r")["lr_schedulers"][0]
    assert state["total_steps"] == 6 and state["last_epoch"] == 6
    assert state["_last_lr"][0] == pytest.approx(1e-3 * 0.1)  # at the floor after the last step


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trainer.precision", "bf16-true"], r"trainer.precision \(bf16-true\) is not supported"),
        (["--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.monitor", "val/loss"], "ReduceLROnPlateau"),
    ],
)
def test_flags_that_cannot_apply_are_refused_before_any_work(in_tmp, capsys, flags, message):
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", str(QUICKSTART), *TINY_RUN, *flags, "--trainer.default_root_dir", "r"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pragnosia: error:")
    assert re.search(message, err[0])
    assert not (in_tmp / "r").exists()  # before any work


@pytest.mark.parametrize("objective", ["local", "exact"])
def test_bf16_mixed_trains_both_objectives(in_tmp, objective):
    """Issue 22's report: ``--trainer.precision bf16-mixed`` crashed on step 1 in the hand-written backward."""
    main(["fit", "--config", str(QUICKSTART), *TINY_RUN, "--trainer.precision", "bf16-mixed", "--model.objective",
          objective, "--model.expert_optimizer", "adam", "--trainer.default_root_dir", "r"])  # fmt: skip
    checkpoint = checkpoint_of(in_tmp / "r")
    assert checkpoint["global_step"] == 2
    assert all(t.dtype == torch.float32 for t in checkpoint["state_dict"].values() if t.is_floating_point())


def test_resume_under_a_schedule_is_bit_identical(tiny, tmp_path):
    """The schedule's position is in the checkpoint: a run stopped after 3 of 6 steps (an epoch) and resumed ends
    where an uninterrupted one does (2 expert layers, exact, disk store)."""

    def make(name):
        model = PragnosiaLM(**{**tiny, "n_shared_layers": 2}, expert_layers="every", num_experts=6, expert_cache=3,
                            objective="exact", expert_optimizer="adam", local_lr=3e-3, lr=3e-3, store="disk",
                            store_dir=str(tmp_path / name))  # fmt: skip
        return with_schedule(model, total_steps=6)

    straight = make("straight")
    cpu_trainer(tmp_path / "a", max_epochs=2).fit(straight, train_dataloaders=token_loader(3))
    first = make("first")
    trainer = cpu_trainer(tmp_path / "b", max_epochs=1)
    trainer.fit(first, train_dataloaders=token_loader(3))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = make("resumed")
    trainer = cpu_trainer(tmp_path / "c", max_epochs=2)
    trainer.fit(resumed, train_dataloaders=token_loader(3), ckpt_path=tmp_path / "half.ckpt")
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(expert_records(straight), expert_records(resumed))
    assert resumed.layout.optimizer.lr == straight.layout.optimizer.lr
