"""PragnosiaLM: DESIGN §4 invariants 2, 3 and 4, configuration errors, baselines."""

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_trainer, token_loader

from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM


def all_records(model: PragnosiaLM) -> torch.Tensor:
    store = model.store
    records = torch.empty(store.num_experts, store.record_numel)
    for expert_id in range(store.num_experts):
        store.read(expert_id, records[expert_id])
    return records


def initial_parameters(model: PragnosiaLM, expert_ids: list[int]) -> list[torch.Tensor]:
    """Each expert's initial parameters, as leaves that require grad."""
    leaves = []
    for expert_id in expert_ids:
        record = torch.empty(model.layout.record_numel)
        model.layout.init_record(expert_id, record)
        leaves.append(model.layout.split(record)[0].clone().requires_grad_(True))
    return leaves


@pytest.mark.parametrize("store", ["device", "host", "disk"])
@pytest.mark.parametrize("expert_optimizer", ["sgd", "adam"])
def test_unselected_experts_unchanged_after_a_step(tiny, tmp_path, store, expert_optimizer):
    model = PragnosiaLM(
        **tiny, num_experts=8, num_active_experts=2, expert_slots=3, expert_cache=3, store=store,
        store_dir=str(tmp_path / "store"), expert_optimizer=expert_optimizer, local_momentum=0.9,
    )
    before = all_records(model)
    cpu_trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=token_loader(1))
    model.experts().flush()
    after = all_records(model)
    selected = set(model.usage)
    assert len(selected) == 3
    for expert_id in range(8):
        if expert_id in selected:
            assert not torch.equal(before[expert_id], after[expert_id])
            params, state, step = model.layout.split(after[expert_id])
            assert step.item() == 1.0
            assert state.abs().sum() > 0  # momentum / moments live in the record
        else:
            assert torch.equal(before[expert_id], after[expert_id]), f"expert {expert_id} changed"


def test_no_gradient_crosses_experts_or_shared(tiny):
    model = PragnosiaLM(**tiny, num_experts=8, num_active_experts=2)
    x, y = next(iter(token_loader(1)))
    shared = list(model.parameters())
    h = model.backbone.trunk(x).flatten(0, 1)  # (N, d)
    routing = model.router(h, model.expert_slots)
    leaves = initial_parameters(model, routing.working_set.tolist())
    outs = [model.layout.forward(leaf, h.detach()) for leaf in leaves]
    targets = y.flatten()

    local = model.local_loss(h.detach(), outs[0], targets)
    grads = torch.autograd.grad(local, [*leaves, *shared], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None or not g.any() for g in grads[1:]), "local loss reached another expert or a shared part"

    mixture = torch.zeros_like(h)
    for position, out in enumerate(outs):
        token_idx, gate = routing.tokens_of(position)
        mixture = mixture.index_add(0, token_idx, gate[:, None] * out.detach()[token_idx])
    lm_loss = torch.nn.functional.cross_entropy(model.backbone.logits(h + mixture), targets)
    grads = torch.autograd.grad(lm_loss, [*leaves, *shared], allow_unused=True)
    assert all(g is None for g in grads[: len(leaves)]), "the shared loss reached an expert"
    router_index = next(i for i, p in enumerate(shared) if p is model.router.proj.weight)
    assert grads[len(leaves) + router_index] is not None, "the router must learn through the gates"


def test_local_step_updates_only_its_record(tiny):
    model = PragnosiaLM(**tiny, num_experts=4, num_active_experts=1, local_lr=0.1)
    record = torch.empty(model.layout.record_numel)
    model.layout.init_record(2, record)
    initial = record.clone()
    x, y = next(iter(token_loader(1)))
    h = torch.randn(x.numel(), tiny["d_model"])
    out, loss, updated = model.local_step(record, h, y.flatten())
    assert out.shape == h.shape and not out.requires_grad and loss.ndim == 0 and updated
    assert not torch.equal(record, initial)
    second = model.local_step(record, h, y.flatten())[1]
    assert second < loss  # the expert learned from its own loss


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
        GlobalMoE(**tiny, num_experts=4, num_active_experts=2, lr=3e-3),
        DenseLM(**tiny, num_active_experts=2, lr=3e-3),
    ):
        trainer = cpu_trainer(tmp_path, max_epochs=15)
        before = trainer.validate(model, token_loader(2), verbose=False)[0]["val/loss"]
        trainer.fit(model, train_dataloaders=token_loader(4), val_dataloaders=token_loader(2))
        after = trainer.callback_metrics["val/loss"].item()
        assert after < 0.7 * before, type(model).__name__


def test_eval_forward_and_generate_stream_through_the_cache(tiny):
    model = PragnosiaLM(**tiny, num_experts=16, num_active_experts=2, expert_slots=2, eval_expert_slots=16)
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 12)))
    assert logits.shape == (2, 12, 256)
    assert len(model.experts().resident_ids()) <= 2
    sample = model.generate(b"ab", max_new_tokens=5)
    assert isinstance(sample, bytes) and len(sample) == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(num_active_experts=3, expert_slots=2),
            r"model.num_active_experts \(3\) must be ≤ model.expert_slots \(2\)",
        ),
        (dict(num_experts=4, expert_slots=5), r"model.expert_slots \(5\) must be ≤ model.num_experts \(4\)"),
        (dict(expert_slots=3, expert_cache=0), r"model.expert_cache \(0\) must be > 0"),
        (dict(num_experts=0), r"model.num_experts \(0\) must be > 0"),
        (dict(d_model=-8), r"model.d_model \(-8\) must be > 0"),
        (dict(store="cloud"), r"model.store \('cloud'\) must be one of: device, host, disk"),
        (dict(expert_optimizer="lion"), r"model.expert_optimizer \('lion'\) must be one of: sgd, adam"),
        (dict(gate="soft"), r"model.gate \('soft'\) must be one of: router, uniform"),
        (dict(router="hash"), r"model.router \('hash'\) must be one of: product, flat"),
        (dict(d_model=18, n_heads=4), r"model.d_model \(18\) must be divisible by model.n_heads \(4\)"),
        (dict(eval_expert_slots=1), r"model.eval_expert_slots \(1\) must be between"),
        (dict(keep_snapshots=0), r"model.keep_snapshots \(0\) must be ≥ 1"),
        (dict(local_betas=(0.9, 1.5)), r"model.local_betas \(\(0.9, 1.5\)\) must be two numbers in \[0, 1\)"),
        (dict(local_readout="sum"), r"model.local_readout \('sum'\) must be one of: own, mixture"),
        (dict(local_weighting="token"), r"model.local_weighting \('token'\) must be one of: expert, batch"),
    ],
)
def test_bad_configuration_names_the_key(kwargs, message):
    options = dict(d_model=16, n_shared_layers=1, n_heads=2, num_experts=8, num_active_experts=2)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        PragnosiaLM(**options)


def shared_loss_gradients(model: PragnosiaLM, x: torch.Tensor, y: torch.Tensor):
    """Route ``x`` with the model's initial weights and take the shared LM loss's gradient for each working-set
    expert's initial parameters. Returns ``(h, working_set, placed, params, mixture, gradients)``."""
    with torch.no_grad():
        h = model.backbone.trunk(x).flatten(0, 1)  # (N, d), the step's trunk output (the shared step comes after)
        routing = model.router(h, model.expert_slots)
    working_set = routing.working_set.tolist()
    params = initial_parameters(model, working_set)
    placed = [routing.tokens_of(position) for position in range(len(working_set))]  # (N_e,), (N_e,) each
    mixture = torch.zeros_like(h)
    for (token_idx, gate), p in zip(placed, params):
        mixture = mixture.index_add(0, token_idx, gate[:, None] * model.layout.forward(p, h[token_idx]))
    gradients = torch.autograd.grad(F.cross_entropy(model.backbone.logits(h + mixture), y.flatten()), params)
    return h, working_set, placed, params, mixture.detach(), gradients


def test_mixture_readout_gives_each_expert_the_shared_loss_gradient(tiny):
    from pragnosia_pl.local_learning import Readout

    model = PragnosiaLM(**tiny, num_experts=6, num_active_experts=2, expert_slots=6, local_readout="mixture")
    x, y = next(iter(token_loader(1)))
    targets = y.flatten()
    h, _, placed, params, context, shared_grads = shared_loss_gradients(model, x, y)
    for position, ((token_idx, gate), p) in enumerate(zip(placed, params)):
        out = model.layout.forward(p, h[token_idx])
        local = model.local_loss(h[token_idx], out, targets[token_idx], Readout(context[token_idx], gate))
        (grad,) = torch.autograd.grad(local, p)
        scale = token_idx.numel() / targets.numel()  # the local loss averages over the expert's tokens only
        torch.testing.assert_close(grad * scale, shared_grads[position], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("local_weighting", ["expert", "batch"])
def test_a_step_moves_each_expert_by_the_shared_loss_gradient_under_batch_weighting(tiny, tmp_path, local_weighting):
    """``local_readout: mixture`` with ``local_weighting: batch``: one SGD step (lr 1) on an expert equals minus
    the shared LM loss's gradient for it; with the default weighting it is that times N/N_e."""
    model = PragnosiaLM(
        **tiny, num_experts=6, num_active_experts=2, expert_slots=6, store="device", expert_optimizer="sgd",
        local_lr=1.0, local_readout="mixture", local_weighting=local_weighting, balance_coef=0.0,
    )
    loader = token_loader(1)
    x, y = next(iter(loader))
    _, working_set, placed, params, _, shared_grads = shared_loss_gradients(model, x, y)

    cpu_trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=loader)
    records = all_records(model)
    for expert_id, (token_idx, _), p, shared_grad in zip(working_set, placed, params, shared_grads):
        step = p.detach() - model.layout.split(records[expert_id])[0]  # lr 1: the gradient the expert stepped on
        share = token_idx.numel() / y.numel()
        expected = shared_grad if local_weighting == "batch" else shared_grad / share
        torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
