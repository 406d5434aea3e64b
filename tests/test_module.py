"""PragnosiaLM: DESIGN §4 invariants 2, 3 (local) and 4 through training_step, configuration errors, baselines.

Mutations seen failing here, and the test that caught each:
- a write-back under the wrong id (expert e's slot stored as e + 1): untouched experts unchanged (every case);
- `local` also running the exact second pass (the LM loss reaches the experts, the trunk gets their input
  gradient): the local objective through training_step;
- the local loss doubled, and the mixture the LM loss reads scaled by 1.5: the local objective through training_step;
- evaluation capped by the training expert_slots (a token's experts chosen from the whole batch): causal evaluation.
"""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_trainer, expert_records, token_loader

from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM


def initial_parameters(model: PragnosiaLM, expert_ids: list[int]) -> list[torch.Tensor]:
    """Each expert's initial parameters, as leaves that require grad."""
    return [model.layout.init_params(e).clone().requires_grad_(True) for e in expert_ids]


@pytest.mark.parametrize("store", ["device", "host", "disk"])
@pytest.mark.parametrize(("objective", "expert_optimizer"), [("local", "sgd"), ("local", "adam"), ("exact", "adam")])
def test_untouched_experts_unchanged_with_evictions_and_prefetch(tiny, tmp_path, store, objective, expert_optimizer):
    """Invariant 2: a cache of 2 slots, ~6 experts touched per step of 3 steps: experts stream, are prefetched,
    evicted and written back; every expert no step touched is bit-for-bit its initial record."""
    model = PragnosiaLM(
        **tiny,
        num_experts=24,
        num_active_experts=2,
        objective=objective,
        expert_cache=2,
        store=store,
        store_dir=str(tmp_path / "store"),
        expert_optimizer=expert_optimizer,
    )
    initial = torch.empty(24, model.layout.record_numel)
    for expert_id in range(24):
        model.layout.init_record(expert_id, initial[expert_id])
    cpu_trainer(tmp_path, max_steps=3).fit(model, train_dataloaders=token_loader(3, batch_size=2, block_size=8))
    stats = model.experts().stats()
    assert stats["evictions"] > 0 and stats["prefetches"] > 0 and stats["writebacks"] > 0
    after = expert_records(model)
    touched = set(model.usage)
    assert 3 <= len(touched) < 24
    for expert_id in range(24):
        params, state, step = model.layout.split(after[expert_id])
        if expert_id in touched:
            assert step.item() == model.usage[expert_id], f"expert {expert_id}: one update per step that touched it"
            if expert_optimizer == "adam":
                assert state.abs().sum() > 0  # the moments live in the record
        else:
            assert torch.equal(after[expert_id], initial[expert_id]), f"untouched expert {expert_id} changed"


class CapturesSharedGradients(PragnosiaLM):
    def on_before_optimizer_step(self, optimizer):
        self.shared_grads = {name: p.grad.clone() for name, p in self.named_parameters() if p.grad is not None}


def test_local_objective_through_training_step(tiny, tmp_path):
    """Invariant 3 (local), through one real training step: each touched expert moved by exactly its own local
    loss's SGD step on its own tokens, and the shared parameters' gradient is the LM loss's with every expert's
    output a constant (so no local loss reached them, and the LM loss reached no expert). The reference is
    written out here, from the initial weights, with none of the module's code but its routing."""
    lr = 0.5
    model = CapturesSharedGradients(
        **tiny,
        num_experts=10,
        num_active_experts=2,
        store="host",
        expert_optimizer="sgd",
        local_lr=lr,
        grad_clip=0.0,
        balance_coef=0.0,
    )
    initial = copy.deepcopy(model)
    loader = token_loader(1, batch_size=4, block_size=12)
    cpu_trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=loader)

    x, y = next(iter(loader))
    targets = y.flatten()
    h = initial.backbone.trunk(x).flatten(0, 1)  # (N, d)
    routing = initial.routers[0](h)
    chosen = routing.working_set[routing.positions]  # (N, k)
    expert_ids = routing.working_set.tolist()
    params = initial_parameters(initial, expert_ids)
    norm, embed = initial.backbone.norm, initial.backbone.embed.weight
    mixture = torch.zeros_like(h)
    after = expert_records(model)
    for expert_id, p in zip(expert_ids, params):
        token_idx = (chosen == expert_id).any(dim=-1).nonzero().squeeze(-1)
        gate = (routing.gates * (chosen == expert_id)).sum(dim=-1)[token_idx]
        h_e = h[token_idx].detach()
        out = initial.layout.forward(p, h_e)
        mixture = mixture.index_add(0, token_idx, gate[:, None] * out.detach())
        z = F.layer_norm(h_e + out, norm.normalized_shape, norm.weight.detach(), norm.bias.detach())
        (grad,) = torch.autograd.grad(F.cross_entropy(F.linear(z, embed.detach()), targets[token_idx]), p)
        stepped = model.layout.split(after[expert_id])[0]
        torch.testing.assert_close(stepped, p.detach() - lr * grad, rtol=0, atol=1e-6, msg=f"expert {expert_id}")
    lm_loss = F.cross_entropy(F.linear(norm(h + mixture), embed), targets)
    names = [name for name, _ in initial.named_parameters()]
    expected = torch.autograd.grad(lm_loss, list(initial.parameters()), allow_unused=True)
    assert set(model.shared_grads) == {name for name, g in zip(names, expected) if g is not None}
    for name, grad in zip(names, expected):
        if grad is not None:
            torch.testing.assert_close(model.shared_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert "routers.0.proj.weight" in model.shared_grads  # the router learns through the gates


@pytest.mark.parametrize("model_class", [PragnosiaLM, GlobalMoE])
def test_global_step_counts_batches(tiny, tmp_path, model_class):
    model = model_class(**tiny, num_experts=6, num_active_experts=2)
    trainer = cpu_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, train_dataloaders=token_loader(3))
    assert trainer.global_step == 6
    assert len(trainer.optimizers) == 1


def test_training_lowers_the_loss_for_every_model(tiny, tmp_path):
    for model in (
        PragnosiaLM(**tiny, num_experts=4, num_active_experts=2, local_lr=0.05, lr=3e-3),
        PragnosiaLM(
            **tiny,
            num_experts=4,
            num_active_experts=2,
            objective="exact",
            expert_optimizer="adam",
            local_lr=3e-3,
            lr=3e-3,
            expert_cache=2,
        ),
        GlobalMoE(**tiny, num_experts=4, num_active_experts=2, lr=3e-3),
        DenseLM(**tiny, num_active_experts=2, lr=3e-3),
    ):
        trainer = cpu_trainer(tmp_path, max_epochs=15)
        before = trainer.validate(model, token_loader(2), verbose=False)[0]["val/loss"]
        trainer.fit(model, train_dataloaders=token_loader(4), val_dataloaders=token_loader(2))
        after = trainer.callback_metrics["val/loss"].item()
        assert after < 0.7 * before, type(model).__name__


def test_eval_forward_and_generate_stream_through_the_cache(tiny):
    model = PragnosiaLM(**tiny, num_experts=16, num_active_experts=2, expert_slots=2, expert_cache=2)
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 12)))
    assert logits.shape == (2, 12, 256)
    assert len(model.experts().resident_ids()) <= 2
    sample = model.generate(b"ab", max_new_tokens=5)
    assert isinstance(sample, bytes) and len(sample) == 5


def test_evaluation_is_causal(tiny):
    """A token's prediction never depends on later tokens, whatever expert_slots caps in training."""
    model = PragnosiaLM(**tiny, num_experts=32, num_active_experts=2, expert_slots=2)
    torch.nn.init.normal_(model.routers[0].proj.weight, std=1.0)
    tokens = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        full = model(tokens)
        prefix = model(tokens[:, :10])
    torch.testing.assert_close(full[:, :10], prefix, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_active_experts=3, expert_slots=2), r"model.expert_slots \(2\) must be between model.num_active"),
        (dict(num_experts=4, expert_slots=5), r"model.expert_slots \(5\) must be between .* model.num_experts \(4\)"),
        (dict(num_experts=4, num_active_experts=5), r"model.num_active_experts \(5\) must be ≤ model.num_experts"),
        (dict(expert_cache=0), r"model.expert_cache \(0\) must be > 0"),
        (dict(num_experts=0), r"model.num_experts \(0\) must be > 0"),
        (dict(d_model=-8), r"model.d_model \(-8\) must be > 0"),
        (dict(store="cloud"), r"model.store \('cloud'\) must be one of: device, host, disk"),
        (dict(objective="global"), r"model.objective \('global'\) must be one of: local, exact"),
        (dict(expert_optimizer="lion"), r"model.expert_optimizer \('lion'\) must be one of: sgd, adam"),
        (dict(router="hash"), r"model.router \('hash'\) must be one of: product, flat"),
        (dict(d_model=18, n_heads=4), r"model.d_model \(18\) must be divisible by model.n_heads \(4\)"),
        (dict(micro_batch=0), r"model.micro_batch \(0\) must be ≥ 1 or null"),
        (dict(grad_clip=-1.0), r"model.grad_clip \(-1.0\) must be ≥ 0"),
        (dict(store="disk", store_dir="/proc/nope"), r"model.store_dir \(/proc/nope\) cannot be created"),
        (
            dict(store="host", host_tier_bytes=2**20),
            r"model.host_tier_bytes \(1048576\) must be 0 \(none\), or > 0 with",
        ),
        (dict(store="disk", host_tier_bytes=-1), r"model.host_tier_bytes \(-1\) must be 0 \(none\)"),
    ],
)
def test_bad_configuration_names_the_key(kwargs, message):
    options = dict(d_model=16, n_shared_layers=1, n_heads=2, num_experts=8, num_active_experts=2)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        PragnosiaLM(**options)


@pytest.mark.parametrize("model_class", [PragnosiaLM, GlobalMoE, DenseLM])
def test_the_shared_adamw_does_not_decay(tiny, model_class):
    model = model_class(**tiny, num_active_experts=2)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)  # whose default weight decay is 0.01
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0]
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


def test_the_option_list_is_short():
    """Issue 17: at most 20 keys (consolidation is one of them, experts_per_domain); each earned by a user or a
    measurement. Issue 25 added host_tier_bytes (the host tier of a store larger than RAM, which its benchmark
    measures); issue 22 the placement of the expert layers and the vocabulary linked from the data; issue 23 the
    experts computed together (fine-grained experts' speed, which its benchmark measures)."""
    assert list(inspect.signature(PragnosiaLM).parameters) == [
        "d_model",
        "n_shared_layers",
        "n_heads",
        "num_experts",
        "num_active_experts",
        "objective",
        "expert_slots",
        "expert_cache",
        "micro_batch",
        "expert_hidden",
        "store",
        "store_dir",
        "expert_optimizer",
        "local_lr",
        "lr",
        "balance_coef",
        "router",
        "grad_clip",
        "seed",
        "experts_per_domain",
        "host_tier_bytes",
        "expert_layers",  # issue 22: expert layers in the trunk's blocks
        "vocab_size",  # issue 22: linked from data.vocab_size (a tokenizer), not typed by the user
        "expert_batch",  # issue 23: fine-grained experts computed g at a time (their speed goal)
    ]
