"""Training on a CUDA device: stores agree, memory is flat in n, checkpoints resume (skipped without CUDA)."""

import pytest
import torch
from conftest import cpu_trainer, expert_records, token_loader

from callbacks import MemoryMonitor
from pragnosia_pl import GlobalMoE, PragnosiaLM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def gpu_trainer(tmp_path, **kwargs):
    return cpu_trainer(tmp_path, accelerator="gpu", **kwargs)


def pragnosia(tiny, tmp_path, store: str, num_experts: int = 8, **kwargs) -> PragnosiaLM:
    options = dict(
        num_experts=num_experts,
        num_active_experts=2,
        expert_slots=3,
        expert_cache=3,
        store=store,
        store_dir=str(tmp_path / f"store-{store}-{num_experts}"),
        expert_optimizer="adam",
        seed=0,
    )
    options.update(kwargs)
    return PragnosiaLM(**tiny, **options)


def test_every_store_trains_the_same_experts_on_cuda(tiny, tmp_path):
    records, shared = {}, {}
    for store in ("device", "host", "disk"):
        torch.manual_seed(0)
        model = pragnosia(tiny, tmp_path, store)
        gpu_trainer(tmp_path, max_steps=6).fit(model, train_dataloaders=token_loader(6))
        assert model.store.kind == store
        records[store] = expert_records(model)
        shared[store] = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    reference = records["device"]
    assert not torch.equal(reference, expert_records(pragnosia(tiny, tmp_path / "fresh", "device")))
    for store in ("host", "disk"):
        torch.testing.assert_close(records[store], reference, rtol=0, atol=1e-6, msg=f"{store} store's records")
        torch.testing.assert_close(shared[store], shared["device"], rtol=0, atol=1e-6, msg=f"{store} shared")


def test_cuda_training_matches_cpu_training(tiny, tmp_path):
    results = []
    for trainer in (cpu_trainer(tmp_path, max_steps=4), gpu_trainer(tmp_path, max_steps=4)):
        torch.manual_seed(0)
        model = pragnosia(tiny, tmp_path / trainer.accelerator.__class__.__name__, "host")
        trainer.fit(model, train_dataloaders=token_loader(4))
        results.append(expert_records(model))
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-4)


def peak_allocated_while_training(model, tmp_path, steps: int = 6) -> tuple[float, MemoryMonitor]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    monitor = MemoryMonitor()
    gpu_trainer(tmp_path, max_steps=steps, callbacks=[monitor]).fit(model, train_dataloaders=token_loader(steps))
    return max(row["cuda_peak_bytes"] for row in monitor.history[2:]), monitor


def test_cuda_memory_does_not_grow_with_the_number_of_experts(tiny, tmp_path):
    wide = dict(tiny, d_model=64)
    ours = {n: peak_allocated_while_training(pragnosia(wide, tmp_path, "host", n), tmp_path)[0] for n in (8, 4096)}
    theirs = {
        n: peak_allocated_while_training(GlobalMoE(**wide, num_experts=n, num_active_experts=2), tmp_path)[0]
        for n in (8, 256)
    }
    assert ours[4096] <= 1.02 * ours[8], ours
    expert_bytes = 4 * 2 * (2 * 64 * 4 * 64)  # weights of one expert (up + down), parameter and gradient at least
    assert theirs[256] - theirs[8] > 200 * expert_bytes, theirs


def test_memory_monitor_reports_the_store_on_cuda(tiny, tmp_path):
    _, monitor = peak_allocated_while_training(pragnosia(tiny, tmp_path, "host"), tmp_path)
    row = monitor.history[-1]
    assert row["cuda_peak_bytes"] > 0 and row["cuda_allocated_bytes"] > 0


def test_checkpoint_resume_on_cuda_is_exact(tiny, tmp_path):
    torch.manual_seed(0)
    straight = pragnosia(tiny, tmp_path / "straight", "host")
    gpu_trainer(tmp_path / "a", max_epochs=2).fit(straight, train_dataloaders=token_loader(3))

    torch.manual_seed(0)
    first = pragnosia(tiny, tmp_path / "first", "host")
    trainer = gpu_trainer(tmp_path / "b", max_epochs=1)
    trainer.fit(first, train_dataloaders=token_loader(3))
    trainer.save_checkpoint(tmp_path / "half.ckpt")

    torch.manual_seed(1)
    resumed = pragnosia(tiny, tmp_path / "resumed", "host")
    trainer = gpu_trainer(tmp_path / "c", max_epochs=2)
    trainer.fit(resumed, train_dataloaders=token_loader(3), ckpt_path=tmp_path / "half.ckpt")
    assert trainer.global_step == 6
    torch.testing.assert_close(expert_records(resumed), expert_records(straight), rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("expert_layers", ["top", "every_other"])
def test_exact_equals_global_moe_in_mixed_precision_on_cuda(tmp_path, precision, expert_layers):
    """Issue 22: the experts compute in the autocast dtype on CUDA too (where the backward runs on autograd's own
    thread, without autocast state), and under 16-mixed their pass-2 gradients have the GradScaler's scale divided
    out. A looser bound than on the CPU: cuBLAS may pick other kernels for the two models' matrix shapes."""
    from test_exact import SHAPE, assert_same_model

    loader = token_loader(5, batch_size=4, block_size=16)
    layers = dict(expert_layers=expert_layers, n_shared_layers=1 if expert_layers == "top" else 4)
    options = dict(lr=1e-3, router="flat")
    ours = PragnosiaLM(**{**SHAPE, **layers, **options}, objective="exact", expert_optimizer="adam", local_lr=1e-3,
                       expert_cache=3, store="host")  # fmt: skip
    gpu_trainer(tmp_path, max_steps=5, precision=precision).fit(ours, train_dataloaders=loader)
    reference = GlobalMoE(**{**SHAPE, **layers, **options})
    gpu_trainer(tmp_path, max_steps=5, precision=precision).fit(reference, train_dataloaders=loader)
    assert ours.skipped_expert_updates <= 2  # 16-mixed: the scaler's first steps may overflow and skip
    if ours.skipped_expert_updates == 0:
        assert_same_model(ours.cpu(), reference.cpu(), atol=1e-3)
