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


def test_streamed_gradient_through_experts_equals_the_resident_one_when_experts_stand_still(tiny, tmp_path):
    # With a negligible local step the post-step parameters the streamed backward uses are the pre-step ones, so
    # the trunk's gradient through the experts must be the same as with every expert's copy in the graph.
    still = dict(backprop_through_experts=True, local_lr=1e-12)
    whole = train(tiny, tmp_path, "whole", cache=8, **still)
    streamed = train(tiny, tmp_path, "streamed", cache=2, **still)
    detached = train(tiny, tmp_path, "detached", cache=2, local_lr=1e-12)
    torch.testing.assert_close(shared(streamed), shared(whole), rtol=0, atol=1e-6)
    assert not torch.allclose(shared(detached), shared(whole), rtol=0, atol=1e-4), "no gradient went through"


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
