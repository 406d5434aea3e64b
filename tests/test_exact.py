"""The expert-major step: ``exact`` is GlobalMoE's update, store reads per touched expert, micro-batches.

DESIGN §4 invariants 3 (exact) and 7. Mutations seen failing here, and the test that caught each:
- the expert gradient not clipped: exact ≡ GlobalMoE (the grad_clip 0.05 case);
- pass 2's updates not marked dirty (never written back): exact ≡ GlobalMoE;
- the gate left out of the gradient pass 2 steps on: exact ≡ GlobalMoE;
- `local` also running the exact second pass: reads per touched expert (local > 1);
- micro-batch outputs shifted by one position: micro-batches ≡ whole batch;
- the hand-written FFN backward taking `up.bias`'s gradient before gelu's backward instead of after, or returning
  the layer norm's output gradient as the input's: hand-written ≡ autograd, exact ≡ GlobalMoE, and the fallback test;
- `ExpertLayout.param_views` remembering views by the slot buffer alone, not the record's offset in it (every slot
  then read as the first): exact ≡ GlobalMoE (every store), micro-batches ≡ whole batch, and in test_module.py the
  local-objective and causal-evaluation tests;
- the autograd fallback not re-pointing its saved parameters to the expert's slot at the backward (stale when
  the expert was evicted and reloaded elsewhere between the passes): the autograd-fallback test (exact);
- the first pass reading whole records, or the second pass re-reading the parameters of an expert still in its slot:
  the bytes-per-touched-expert test; a host tier whose writes are not marked dirty: exact ≡ GlobalMoE (tier cases);
- `memory_stats()`'s step entries never reset at a step's start: reads per touched expert (steps add up to the run).
"""

import pytest
import torch
from conftest import cpu_trainer, expert_records, token_loader
from lightning.pytorch import Callback

from pragnosia_pl import GlobalMoE, PragnosiaLM
from pragnosia_pl.model import FeedForward, init_weights

SHAPE = dict(d_model=16, n_shared_layers=1, n_heads=2, num_experts=12, num_active_experts=2, seed=3)


def exact_model(tmp_path, store: str, cache: int, **kwargs) -> PragnosiaLM:
    return PragnosiaLM(
        **SHAPE,
        objective="exact",
        expert_optimizer="adam",
        local_lr=1e-2,
        lr=1e-2,
        expert_cache=cache,
        store=store,
        store_dir=str(tmp_path / "store"),
        router="flat",
        **kwargs,
    )


def expert_parameters(model: PragnosiaLM) -> torch.Tensor:
    return torch.stack([model.layout.split(record)[0] for record in expert_records(model)])  # (n, P)


@pytest.mark.parametrize(
    ("store", "cache", "grad_clip", "tier_records"),
    [
        ("device", 12, 1.0, 0),
        ("host", 12, 1.0, 0),
        ("disk", 12, 1.0, 0),
        ("disk", 3, 1.0, 0),
        ("host", 4, 0.05, 0),
        ("direct", 3, 1.0, 0),
        ("disk", 3, 1.0, 4),
        ("direct", 3, 1.0, 4),
    ],
)
def test_exact_equals_global_moe(tmp_path, store, cache, grad_clip, tier_records):
    """Same seed, data and clipping, 5 steps: every shared parameter and every expert within 1e-5 (a cache of 2 or
    3 slots is smaller than the ~10 experts a step touches, so they stream and are evicted; the first pass reads the
    parameters only). With a host tier of 4 records (``tier_records``), smaller than the touched set too, records
    are evicted from it to the file every step."""
    loader = token_loader(5, batch_size=4, block_size=16)
    record_bytes = exact_model(tmp_path, "host", cache).layout.record_numel * 4
    ours = exact_model(tmp_path, store, cache, grad_clip=grad_clip, host_tier_bytes=tier_records * record_bytes)
    cpu_trainer(tmp_path, max_steps=5).fit(ours, train_dataloaders=loader)
    reference = GlobalMoE(**SHAPE, lr=1e-2, router="flat", grad_clip=grad_clip)
    cpu_trainer(tmp_path, max_steps=5).fit(reference, train_dataloaders=loader)

    for (name, mine), theirs in zip(ours.backbone.named_parameters(), reference.backbone.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(ours.router.proj.weight, reference.router.proj.weight, rtol=0, atol=1e-5)
    theirs = torch.stack([torch.nn.utils.parameters_to_vector(e.parameters()) for e in reference.experts])
    torch.testing.assert_close(expert_parameters(ours), theirs.detach(), rtol=0, atol=1e-5)
    assert len(ours.usage) > 6 and ours.experts().stats()["evictions"] > (0 if cache < 12 else -1)
    if tier_records:
        stats = ours.store.stats()
        assert stats["tier_hits"] > 0 and stats["tier_evictions"] > 0 and stats["backing_writes"] > 0


@pytest.mark.parametrize("store", ["host", "direct"])
def test_exact_reads_the_parameters_then_the_rest_of_each_record(tmp_path, store):
    """One step of ``exact`` with Adam and one device slot: the first pass reads each touched expert's parameters
    (P bytes); the second, in reverse order, finds the last one's parameters still in the slot and reads its state
    (S bytes: Adam's two moments and the step), and reads every other record whole (P + S). Fails if the first
    pass reads whole records, or if the second reads a resident expert's parameters again."""
    model = exact_model(tmp_path, store, 1)
    record = torch.empty(model.layout.record_numel)
    for expert_id in range(SHAPE["num_experts"]):  # on the disk: the direct store reads the file, not init_record
        model.layout.init_record(expert_id, record)
        model.store.write(expert_id, record)
    written = model.store.stats()["bytes_written"]
    cpu_trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=token_loader(1, batch_size=4, block_size=16))
    layout, touched = model.layout, len(model.usage)
    params_bytes = 4 * layout.num_params
    state_bytes = 4 * (layout.record_numel - layout.num_params)
    assert state_bytes == 4 * (2 * layout.num_params + 1)  # Adam: m, v and the step
    expected = touched * params_bytes + state_bytes + (touched - 1) * (params_bytes + state_bytes)
    stats = model.memory_stats()
    assert touched > 4
    assert stats["store_bytes_read"] == stats["step_store_bytes_read"] == expected
    assert stats["store_reads"] == 2 * touched
    assert stats["step_store_bytes_written"] == stats["store_bytes_written"] - written
    if store == "direct":  # the file moves whole 4 KiB blocks of the parts asked for
        blocks = -(-params_bytes // 4096) * 4096, -(-state_bytes // 4096) * 4096
        file_read = model.store.stats()["file_bytes_read"]
        assert file_read == touched * blocks[0] + blocks[1] + (touched - 1) * sum(blocks)


def test_same_seed_same_initial_weights(tmp_path):
    ours = exact_model(tmp_path, "host", 4)
    reference = GlobalMoE(**SHAPE, router="flat")
    dense_a, dense_b = (GlobalMoE(**{**SHAPE, "seed": 5}, router="flat") for _ in range(2))
    for mine, theirs in zip(ours.backbone.parameters(), reference.backbone.parameters()):
        assert torch.equal(mine, theirs)
    assert torch.equal(ours.router.proj.weight, reference.router.proj.weight)
    assert torch.equal(
        expert_parameters(ours),
        torch.stack([torch.nn.utils.parameters_to_vector(e.parameters()) for e in reference.experts]).detach(),
    )
    assert torch.equal(dense_a.backbone.embed.weight, dense_b.backbone.embed.weight)
    assert not torch.equal(dense_a.backbone.embed.weight, reference.backbone.embed.weight)  # the seed matters


@pytest.mark.parametrize(("objective", "limit"), [("exact", 2), ("local", 1)])
def test_store_reads_per_touched_expert(tmp_path, objective, limit):
    """DESIGN §4 invariant 7, with a cache of 3 slots and ~10 experts touched per step, on the disk store."""
    model = PragnosiaLM(
        **SHAPE,
        objective=objective,
        expert_optimizer="adam",
        local_lr=1e-2,
        expert_cache=3,
        store="disk",
        store_dir=str(tmp_path / "store"),
    )
    per_step = []  # memory_stats()' step_* entries at the end of each step, as MemoryMonitor logs them

    class StepStats(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            stats = pl_module.memory_stats()
            per_step.append([stats[f"step_store_{key}"] for key in ("reads", "bytes_read", "bytes_written")])

    trainer = cpu_trainer(tmp_path, max_steps=6, callbacks=[StepStats()])
    trainer.fit(model, train_dataloaders=token_loader(6, batch_size=4, block_size=16))
    touched = sum(model.usage.values())  # Σ over steps of the experts each step touched
    stats = model.memory_stats()
    assert len(per_step) == 6 and all(reads > 0 for reads, _, _ in per_step)
    sums = [sum(column) for column in zip(*per_step)]  # the steps' own traffic adds up to the run's
    assert sums[:2] == [stats["store_reads"], stats["store_bytes_read"]]
    assert sums[2] <= stats["store_bytes_written"]  # the last dirty experts are written back after the last step
    assert touched >= 6 * 6
    assert stats["store_reads"] <= limit * touched
    assert stats["store_reads"] > (limit - 1) * touched  # a cache of 3 cannot hold a step's experts
    assert stats["expert_updates"] == touched


def test_micro_batches_give_the_whole_batch_update(tmp_path):
    """``micro_batch`` bounds the trunk's activations (recomputed in the backward pass), not the update."""
    loader = token_loader(3, batch_size=6, block_size=16)
    whole = exact_model(tmp_path, "host", 4)
    cpu_trainer(tmp_path, max_steps=3).fit(whole, train_dataloaders=loader)
    parts = exact_model(tmp_path, "host", 4, micro_batch=2)
    cpu_trainer(tmp_path, max_steps=3).fit(parts, train_dataloaders=loader)
    for mine, theirs in zip(parts.parameters(), whole.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(expert_parameters(parts), expert_parameters(whole), rtol=0, atol=1e-6)


def test_micro_batches_hold_one_micro_batch_of_trunk_activations():
    """Saved for backward by the trunk: about one micro-batch's activations, not the batch's."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (16, 32))

    def saved_bytes(micro_batch):
        model = PragnosiaLM(d_model=32, n_shared_layers=2, n_heads=2, num_experts=8, micro_batch=micro_batch)
        saved = {}

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model._trunk(tokens)
        return sum(saved.values())

    whole, parts = saved_bytes(None), saved_bytes(2)
    assert parts < whole / 4, (parts, whole)


def test_hand_written_expert_backward_equals_autograd():
    """``FeedForward.functional_backward`` against autograd through the module's own ``forward``: every parameter's
    gradient and the input's, at a few token counts (0 included: a DDP rank may send an expert no tokens)."""
    torch.manual_seed(0)
    expert = FeedForward(16, 64)
    expert.apply(init_weights)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.1 * torch.randn_like(p))  # layer-norm weights off 1 and biases off 0
    params = {name: p.detach() for name, p in expert.named_parameters()}
    for tokens in (0, 1, 7, 50):
        x = torch.randn(tokens, 16, requires_grad=True)
        grad_out = torch.randn(tokens, 16)
        expected = torch.autograd.grad(expert(x), [*expert.parameters(), x], grad_out)
        out, saved = FeedForward.functional_forward_saving(params, x.detach())
        grads = {name: torch.empty_like(p) for name, p in params.items()}
        grad_x = FeedForward.functional_backward(params, saved, grad_out, grads, input_grad=True)
        assert saved == []  # spent: each activation dropped once used, as autograd frees a graph's
        torch.testing.assert_close(out, expert(x).detach(), rtol=0, atol=1e-6)
        for name, mine, theirs in zip(grads, grads.values(), expected[:-1]):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=f"{name}, {tokens} tokens")
        torch.testing.assert_close(grad_x, expected[-1], rtol=0, atol=1e-6)


class _PlainFeedForward(FeedForward):
    """The default expert with no hand-written backward: ``ExpertLayout`` falls back to autograd."""

    functional_forward_saving = None
    functional_backward = None


class _PlainExpertLM(PragnosiaLM):
    def build_expert(self) -> torch.nn.Module:
        expert = _PlainFeedForward(self.hparams.d_model, self.expert_hidden)
        expert.apply(init_weights)
        return expert


@pytest.mark.parametrize("objective", ["exact", "local"])
def test_autograd_fallback_equals_hand_written_backward(tmp_path, objective):
    """An expert class without ``functional_backward`` trains through autograd, its saved parameters re-pointed to
    wherever the expert is at its backward: 4 steps with a cache of 3 slots (experts evicted between the passes)
    give the same model as the hand-written backward."""
    loader = token_loader(4, batch_size=4, block_size=16)
    options = dict(objective=objective, expert_optimizer="adam", local_lr=1e-2, lr=1e-2, expert_cache=3, store="host")
    plain = _PlainExpertLM(**SHAPE, **options, router="flat")
    assert not plain.layout.manual_backward
    cpu_trainer(tmp_path, max_steps=4).fit(plain, train_dataloaders=loader)
    hand = PragnosiaLM(**SHAPE, **options, router="flat")
    assert hand.layout.manual_backward
    cpu_trainer(tmp_path, max_steps=4).fit(hand, train_dataloaders=loader)
    torch.testing.assert_close(expert_parameters(plain), expert_parameters(hand), rtol=0, atol=1e-6)
    for mine, theirs in zip(plain.backbone.parameters(), hand.backbone.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    assert plain.experts().stats()["evictions"] > 0
