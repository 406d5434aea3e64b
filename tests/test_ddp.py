"""DESIGN §10: two CPU processes on Lightning's DDP (gloo) train what one process trains on the global batch.

A DDP run is a subprocess running a two-line script that calls :func:`train` (Lightning's DDP launcher re-runs
the script for rank 1, so it cannot be pytest itself). Every rank dumps its shared parameters, every expert
record and the logged ``train/loss``; single-process runs call :func:`train` here with the global batch
(2 × the per-rank batch, the same samples at every step).

Runs of 2 epochs × 4 steps, a checkpoint at each epoch end (epoch ends: a plain DataLoader resumes exactly):
    ddp            two ranks from scratch
    single         one process from scratch
    ddp_resumed    two ranks resuming from single's epoch-1 checkpoint
    single_resumed one process resuming from ddp's epoch-1 checkpoint
    *_per_token    no expert_slots cap: the experts visited are the union of those any rank's tokens chose
    *_exact        per-token, objective exact, a cache smaller than the touched set (each expert's gradient
                   all-reduced inside the backward pass, on a process group of its own)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_trainer, expert_records, token_loader
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from pragnosia_pl import PragnosiaLM

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The dirpath has changed")]  # resumed elsewhere

PER_RANK_BATCH = 4
STEPS_PER_EPOCH = 4
# Same samples per step, another summation order: the loss curves agree to float32 rounding (measured 5e-7). Each
# rank's balance loss sees only its half of the batch (as in any data-parallel MoE), which moves the router
# weights alone by more than rounding (measured 1.4e-3 relative after 8 steps; everything else 4e-5).
LOSS_TOLERANCE = 1e-5
RELATIVE_TOLERANCE = {"routers.0.proj.weight": 1e-2}
DEFAULT_RELATIVE_TOLERANCE = 2e-4

MODEL = dict(
    d_model=16,
    n_shared_layers=1,
    n_heads=2,
    num_experts=8,
    num_active_experts=2,
    expert_slots=3,
    expert_cache=3,
    store="disk",
    expert_optimizer="adam",
    local_lr=0.01,
    lr=3e-3,
)

SCRIPT = """import json, sys
sys.path.insert(0, {tests!r})
from test_ddp import train
train(json.loads(sys.argv[1]))
"""


class LossHistory(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def train(config: dict) -> dict:
    """Fit the test model for 2 epochs on ``config["devices"]`` processes; each rank dumps its state."""
    out = Path(config["out"])
    seed_everything(0)
    model = PragnosiaLM(**{**MODEL, **config.get("model", {})}, store_dir=str(out / "store"))
    history = LossHistory()
    devices = config["devices"]
    trainer = cpu_trainer(
        out,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[history, ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1)],
    )
    dataset = token_loader(STEPS_PER_EPOCH, 2 * PER_RANK_BATCH).dataset
    if devices == 1:  # the permutation Lightning's DistributedSampler deals out to the ranks, in one process
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=2 * PER_RANK_BATCH, sampler=sampler)
    else:  # Lightning replaces the sampler: rank r takes every other sample of the same permutation
        loader = DataLoader(dataset, batch_size=PER_RANK_BATCH)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=config.get("ckpt_path"))
    result = dict(
        losses=history.losses,
        records=expert_records(model),
        live=str(model.store.path.parent),
        state={name: t.detach().clone() for name, t in model.state_dict().items()},
    )
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    return result


def run(tmp_path: Path, name: str, devices: int, ckpt_path: Path | None = None, **model) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    config = dict(out=str(out), devices=devices, ckpt_path=None if ckpt_path is None else str(ckpt_path), model=model)
    if devices == 1:
        return [train(config)]
    script = out / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(config)], capture_output=True, text=True, timeout=300, cwd=out
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(devices)]


def epoch_checkpoint(tmp_path: Path, name: str) -> Path:
    (checkpoint,) = (tmp_path / name / "ckpt").glob(f"epoch=0-step={STEPS_PER_EPOCH}*.ckpt")
    return checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    tmp_path = tmp_path_factory.mktemp("ddp")
    runs = {"ddp": run(tmp_path, "ddp", devices=2), "single": run(tmp_path, "single", devices=1)}
    runs["ddp_resumed"] = run(tmp_path, "ddp_resumed", devices=2, ckpt_path=epoch_checkpoint(tmp_path, "single"))
    runs["single_resumed"] = run(tmp_path, "single_resumed", devices=1, ckpt_path=epoch_checkpoint(tmp_path, "ddp"))
    runs["snapshots"] = sorted(p.name for p in (tmp_path / "ddp" / "store" / "snapshots").iterdir())
    # Each token its own top-k over all experts. Without the balance loss (per rank: its f·P is not linear in the
    # batch, and per-token routing makes f differ most between the halves) DDP matches one process to rounding.
    per_token = dict(num_experts=4, expert_slots=None, expert_cache=4, balance_coef=0.0)
    for devices, name in ((2, "ddp_per_token"), (1, "single_per_token")):
        runs[name] = run(tmp_path, name, devices=devices, **per_token)
    # Global backpropagation, the experts streamed through 2 slots: DDP averages the experts' gradients as it
    # averages the shared ones.
    exact = dict(per_token, objective="exact", expert_cache=2)
    for devices, name in ((2, "ddp_exact"), (1, "single_exact")):
        runs[name] = run(tmp_path, name, devices=devices, **exact)
    return runs


def assert_close(a: dict, b: dict) -> None:
    """Every shared tensor and every expert record of ``a`` within its relative (L2) tolerance of ``b``."""
    tensors = [(name, a["state"][name], b["state"][name]) for name in a["state"]]
    tensors += [(f"expert {e}", x, y) for e, (x, y) in enumerate(zip(a["records"], b["records"]))]
    for name, x, y in tensors:
        tolerance = RELATIVE_TOLERANCE.get(name, DEFAULT_RELATIVE_TOLERANCE)
        assert (x - y).norm() <= tolerance * y.norm(), (name, float((x - y).norm() / y.norm()))


@pytest.mark.parametrize("name", ["ddp", "ddp_resumed", "ddp_per_token", "ddp_exact"])
def test_ranks_hold_identical_shared_parameters_and_expert_records(runs, name):
    rank0, rank1 = runs[name]
    assert len(rank0["losses"]) == 2 * STEPS_PER_EPOCH - (STEPS_PER_EPOCH if name.endswith("resumed") else 0)
    for key in rank0["state"]:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
    assert torch.equal(rank0["records"], rank1["records"])
    assert rank0["losses"] == rank1["losses"]  # train/loss is the mean over ranks
    assert rank0["live"] != rank1["live"]  # each rank's replica in its own (locked) store file


def test_experts_were_trained(runs):
    (single,) = runs["single"]
    initial = torch.empty_like(single["records"])
    model = PragnosiaLM(**MODEL)
    for expert_id in range(MODEL["num_experts"]):
        model.layout.init_record(expert_id, initial[expert_id])
    trained = (single["records"] != initial).any(dim=1)
    assert int(trained.sum()) > MODEL["expert_slots"]  # the comparisons of records are not vacuous


@pytest.mark.parametrize("name", ["", "_per_token", "_exact"])
def test_loss_curve_matches_a_single_process_with_the_global_batch(runs, name):
    ddp, (single,) = runs[f"ddp{name}"][0], runs[f"single{name}"]
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), atol=LOSS_TOLERANCE, rtol=0)
    assert single["losses"][-1] < single["losses"][0] - 0.1  # it learns
    assert_close(ddp, single)


def test_checkpoint_written_under_ddp_resumes_in_a_single_process(runs):
    ddp, (resumed,) = runs["ddp"][0], runs["single_resumed"]
    tail = ddp["losses"][STEPS_PER_EPOCH:]
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(tail), atol=LOSS_TOLERANCE, rtol=0)
    assert_close(resumed, ddp)
    assert len(runs["snapshots"]) == 2  # one per checkpoint, written by rank 0 alone


def test_checkpoint_written_in_a_single_process_resumes_under_ddp(runs):
    (single,), resumed = runs["single"], runs["ddp_resumed"][0]
    tail = single["losses"][STEPS_PER_EPOCH:]
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(tail), atol=LOSS_TOLERANCE, rtol=0)
    assert_close(resumed, single)
