"""DESIGN §4.6: resuming from a checkpoint continues exactly as if uninterrupted (CPU: bit-identical)."""

from pathlib import Path

import pytest
import torch
from conftest import cpu_trainer, expert_records, token_loader
from lightning.pytorch.callbacks import ModelCheckpoint

from pragnosia_pl import PragnosiaLM
from pragnosia_pl.checkpoint_io import AtomicCheckpointIO


def make(tiny, tmp_path, name, store, **kwargs):
    store, _, tier = store.partition("+")
    if tier:  # a tier of 2 records
        kwargs["host_tier_bytes"] = 2 * 4 * make(tiny, tmp_path, name, "host").layout.record_numel
    return PragnosiaLM(
        **tiny,
        num_experts=6,
        num_active_experts=2,
        expert_slots=2,
        expert_cache=3,
        store=store,
        store_dir=str(tmp_path / name),
        expert_optimizer="adam",
        lr=3e-3,
        **kwargs,
    )


@pytest.mark.parametrize("store", ["device", "host", "disk", "direct", "direct+tier"])
@pytest.mark.parametrize("objective", ["local", "exact"])
def test_resume_is_bit_identical(tiny, tmp_path, store, objective):
    """Also ``direct`` (O_DIRECT), and ``direct`` behind a host tier of 2 records (dirty records in the tier when
    the checkpoint is taken: the snapshot must write them back and the restore must forget them)."""
    torch.manual_seed(0)
    straight = make(tiny, tmp_path, "straight", store, objective=objective)
    cpu_trainer(tmp_path / "a", max_epochs=2).fit(straight, train_dataloaders=token_loader(3))

    torch.manual_seed(0)
    first = make(tiny, tmp_path, "first", store, objective=objective)
    trainer = cpu_trainer(tmp_path / "b", max_epochs=1)
    trainer.fit(first, train_dataloaders=token_loader(3))
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)
    after_first = expert_records(first)
    first.store.write(0, torch.full((first.store.record_numel,), 7.0))  # the live store moves on; the snapshot must not

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed = make(tiny, tmp_path, "resumed", store, objective=objective)
    trainer = cpu_trainer(tmp_path / "c", max_epochs=2)
    trainer.fit(resumed, train_dataloaders=token_loader(3), ckpt_path=checkpoint)

    assert trainer.global_step == 6
    assert not torch.equal(after_first, expert_records(resumed)), "the second half trained nothing"
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(expert_records(straight), expert_records(resumed))


def test_missing_snapshot_is_reported(tiny, tmp_path):
    model = make(tiny, tmp_path, "run", "host")
    trainer = cpu_trainer(tmp_path, max_steps=1)
    trainer.fit(model, train_dataloaders=token_loader(1))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    for snapshot in (tmp_path / "run" / "snapshots").iterdir():
        for file in snapshot.iterdir():
            file.unlink()
        snapshot.rmdir()
    with pytest.raises(FileNotFoundError, match="expert-store snapshot .* is missing"):
        PragnosiaLM.load_from_checkpoint(tmp_path / "one.ckpt", store_dir=str(tmp_path / "other")).experts()


def snapshot_of(checkpoint: Path) -> str:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["expert_store"]["snapshot"]


def test_snapshots_live_as_long_as_the_checkpoints_that_name_them(tiny, tmp_path):
    """ModelCheckpoint keeps the 2 newest checkpoints and last.ckpt: only their snapshots remain; a checkpoint
    saved by hand elsewhere keeps its own, also when the run's checkpoints at that step are gone."""
    model = make(tiny, tmp_path, "run", "host")
    newest = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=2, monitor="step", mode="max")
    newest.save_last = True
    trainer = cpu_trainer(
        tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[newest], plugins=[AtomicCheckpointIO()]
    )
    trainer.fit(model, train_dataloaders=token_loader(5))
    trainer.save_checkpoint(tmp_path / "by_hand.ckpt")  # step 3, the snapshot of the run's newest checkpoint
    records_at_3 = expert_records(model)
    trainer = cpu_trainer(
        tmp_path, max_steps=5, enable_checkpointing=True, callbacks=[newest], plugins=[AtomicCheckpointIO()]
    )
    trainer.fit(model, train_dataloaders=token_loader(5), ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert kept == ["epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]
    named = {snapshot_of(tmp_path / "ckpt" / name) for name in kept} | {snapshot_of(tmp_path / "by_hand.ckpt")}
    snapshots = {str(p.resolve()) for p in (tmp_path / "run" / "snapshots").iterdir() if p.is_dir()}
    assert snapshots == named and len(named) == 3  # steps 4 and 5 (last.ckpt's too), and step 3's by hand
    holders = {p.name for p in (tmp_path / "run" / "snapshots").iterdir() if not p.is_dir()}
    assert holders == {f"{Path(snapshot).name}.checkpoints" for snapshot in named}
    by_hand = PragnosiaLM.load_from_checkpoint(tmp_path / "by_hand.ckpt", store_dir=str(tmp_path / "other"))
    assert torch.equal(expert_records(by_hand), records_at_3)  # its snapshot restores, intact


def test_without_the_atomic_checkpoint_io_every_snapshot_is_kept(tiny, tmp_path):
    model = make(tiny, tmp_path, "run", "host")
    latest = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=1)
    trainer = cpu_trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[latest])
    trainer.fit(model, train_dataloaders=token_loader(3))
    assert len(list((tmp_path / "ckpt").iterdir())) == 1 and len(list((tmp_path / "run" / "snapshots").iterdir())) == 3


def test_snapshot_follows_the_store_within_a_step(tiny, tmp_path):
    model = make(tiny, tmp_path, "run", "host")
    trainer = cpu_trainer(tmp_path, max_steps=1)
    trainer.fit(model, train_dataloaders=token_loader(1))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    model.store.write(5, torch.full((model.store.record_numel,), 3.0))
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    restored = PragnosiaLM.load_from_checkpoint(tmp_path / "b.ckpt", store_dir=str(tmp_path / "other"))
    record = torch.empty(model.store.record_numel)
    restored.store.read(5, record)
    assert torch.equal(record, torch.full_like(record, 3.0))


def test_a_moved_run_folder_still_resumes_and_loads(tiny, tmp_path):
    run = tmp_path / "run"
    model = make(tiny, run, "expert_store", "host")
    trainer = cpu_trainer(run, max_steps=2)
    trainer.fit(model, train_dataloaders=token_loader(2))
    trainer.save_checkpoint(run / "checkpoints" / "two.ckpt")
    records = expert_records(model)
    model.store.close()
    moved = tmp_path / "moved"
    run.rename(moved)
    checkpoint = moved / "checkpoints" / "two.ckpt"

    loaded = PragnosiaLM.load_from_checkpoint(checkpoint, store_dir=str(tmp_path / "elsewhere"))
    loaded.checkpoint_file = str(checkpoint)  # what `pragnosia generate` sets
    assert torch.equal(expert_records(loaded), records)

    resumed = make(tiny, tmp_path, "fresh", "host")
    trainer = cpu_trainer(tmp_path / "resume", max_steps=4)
    trainer.fit(resumed, train_dataloaders=token_loader(4), ckpt_path=checkpoint)
    assert trainer.global_step == 4
