"""A working set larger than the cache streams through the device slots (``expert_cache < expert_slots``)."""

import pytest
import torch
from conftest import cpu_trainer, expert_records, token_loader

from pragnosia_pl import PragnosiaLM


def train(tiny, tmp_path, name: str, cache: int, steps: int = 4, **kwargs) -> PragnosiaLM:
    torch.manual_seed(0)
    options = dict(num_experts=8, num_active_experts=2, expert_slots=8, expert_cache=cache, store="host",
                   store_dir=str(tmp_path / name), expert_optimizer="adam", local_lr=1e-3, router="flat")
    options.update(kwargs)
    model = PragnosiaLM(**tiny, **options)
    cpu_trainer(tmp_path / name, max_steps=steps).fit(model, train_dataloaders=token_loader(steps))
    return model


def shared(model: PragnosiaLM) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_streaming_local_learning_equals_a_cache_that_holds_the_working_set(tiny, tmp_path):
    whole = train(tiny, tmp_path, "whole", cache=8)
    streamed = train(tiny, tmp_path, "streamed", cache=2)
    assert streamed.experts().stats()["capacity"] == 2
    assert streamed.experts().stats()["evictions"] > 0, "the working set did not stream"
    assert torch.equal(expert_records(streamed), expert_records(whole))
    assert torch.equal(shared(streamed), shared(whole))


@pytest.mark.parametrize(("store", "readout"), [("host", "own"), ("disk", "own"), ("host", "mixture")])
def test_streamed_backprop_through_experts_equals_the_resident_path(tiny, tmp_path, store, readout):
    # In one process the streamed step defers each expert's local step until its Jacobian has been used in the
    # backward pass, so it computes what the resident path computes, in a different order.
    options = dict(backprop_through_experts=True, store=store, local_readout=readout)
    whole = train(tiny, tmp_path, "whole", cache=8, **options)
    streamed = train(tiny, tmp_path, "streamed", cache=2, **options)
    detached = train(tiny, tmp_path, "detached", cache=2, store=store)
    assert streamed.experts().stats()["evictions"] > 0
    torch.testing.assert_close(shared(streamed), shared(whole), rtol=0, atol=1e-5)
    torch.testing.assert_close(expert_records(streamed), expert_records(whole), rtol=0, atol=1e-5)
    assert not torch.allclose(shared(detached), shared(whole), rtol=0, atol=1e-4), "no gradient went through"


def test_streamed_step_without_a_shared_gradient_still_trains_the_experts(tiny, tmp_path):
    # Every shared parameter frozen (as consolidation's shared_lr_factor 0 does after a switch): no backward pass.
    model = PragnosiaLM(**tiny, num_experts=8, num_active_experts=2, expert_slots=8, expert_cache=2,
                        store_dir=str(tmp_path / "frozen"), expert_optimizer="adam", backprop_through_experts=True)
    for param in model.parameters():
        param.requires_grad_(False)
    cpu_trainer(tmp_path / "frozen", max_steps=2).fit(model, train_dataloaders=token_loader(2))
    assert sum(model.usage.values()) > 0
    for expert_id, uses in model.usage.items():
        assert model.layout.split(expert_records(model)[expert_id])[2].item() == uses


@pytest.mark.parametrize("store", ["host", "disk"])
def test_streamed_backprop_through_experts_trains_and_keeps_experts_local(tiny, tmp_path, store):
    before = PragnosiaLM(**tiny, num_experts=8, num_active_experts=2, expert_slots=8, seed=0)
    initial = expert_records(before)
    model = train(tiny, tmp_path, store, cache=3, steps=6, backprop_through_experts=True, store=store)
    after = expert_records(model)
    stats = model.experts().stats()
    assert stats["capacity"] == 3 and stats["resident"] <= 3
    assert stats["loads"] == 2 * sum(model.usage.values())  # the forward and the backward pass load each expert
    assert not torch.equal(after, initial)
    for expert_id in range(8):
        params, state, step = model.layout.split(after[expert_id])
        assert step.item() == model.usage[expert_id], f"expert {expert_id}: one local step per step it was used"


def test_expert_slots_all_follows_num_experts(tiny):
    model = PragnosiaLM(**tiny, num_experts=12, num_active_experts=2, expert_slots="all", expert_cache=3)
    assert model.expert_slots == 12 and model.eval_expert_slots == 12 and model.expert_cache_size == 3
