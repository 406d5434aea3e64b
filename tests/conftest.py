import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the benchmarks (scripts/bench/) are importable as `bench`, as the scripts import them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

TINY = dict(d_model=16, n_shared_layers=1, n_heads=2)


@pytest.fixture
def tiny() -> dict:
    """Keyword arguments of a tiny model (width 16, one trunk layer)."""
    return dict(TINY)


def token_loader(num_batches: int = 4, batch_size: int = 4, block_size: int = 16, seed: int = 0) -> DataLoader:
    """Batches ``(x, y)`` of a repetitive byte sequence a model can learn quickly."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 256, (37,), generator=g)
    stream = pattern.repeat(num_batches * batch_size * (block_size + 1) // 37 + 2)
    blocks = stream[: num_batches * batch_size * (block_size + 1)].view(-1, block_size + 1)
    return DataLoader(TensorDataset(blocks[:, :-1], blocks[:, 1:]), batch_size=batch_size)


def cpu_trainer(tmp_path, **kwargs):
    from lightning.pytorch import Trainer

    options = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return Trainer(**options)


def expert_records(model) -> torch.Tensor:
    """Every expert's record ``(n, R)`` as the model's store holds it, after the cache has written back."""
    model.experts().flush()
    out = torch.empty(model.store.num_experts, model.store.record_numel)
    for expert_id in range(model.store.num_experts):
        model.store.read(expert_id, out[expert_id])
    return out
