"""The router: gates and balance term from each token's own experts, and memory that does not grow with N·S."""

import pytest
import torch

from pragnosia_pl.router import Router


def dense_reference(router: Router, h: torch.Tensor, working_set: torch.Tensor, positions: torch.Tensor):
    """Gates and balance term through the (N, S) log-probabilities of the whole working set."""
    scores = router.proj(h).float().split(router.keys, dim=-1)
    log_probs = [torch.log_softmax(s, dim=-1) for s in scores]
    gates = torch.softmax(router._log_prob_at(scores, working_set).gather(1, positions), dim=-1)  # (N, k)
    prob_in_set = router._log_prob_at(log_probs, working_set).exp().mean(dim=0)  # (S,)
    fraction = torch.nn.functional.one_hot(positions, working_set.numel()).sum(dim=(0, 1)).float() / positions.numel()
    return gates, router.num_experts * (fraction * prob_in_set).sum()


@pytest.mark.parametrize("kind", ["product", "flat"])
@pytest.mark.parametrize("expert_slots", [3, 50])  # a bounded working set; per-token top-k over all 50
def test_gates_and_balance_term_equal_the_dense_formulas(kind, expert_slots):
    torch.manual_seed(0)
    router = Router(16, 50, 2, router=kind)
    h = torch.randn(64, 16, requires_grad=True)
    routing = router(h, expert_slots)
    gates, balance = dense_reference(router, h, routing.working_set, routing.positions)
    torch.testing.assert_close(routing.gates, gates)
    torch.testing.assert_close(routing.balance_loss, balance)
    grads = torch.autograd.grad(routing.gates.square().sum() + routing.balance_loss, [h, router.proj.weight])
    reference = torch.autograd.grad(gates.square().sum() + balance, [h, router.proj.weight])
    for grad, expected in zip(grads, reference):
        torch.testing.assert_close(grad, expected)


def test_per_token_routing_holds_nothing_of_size_tokens_by_working_set():
    torch.manual_seed(0)
    num_tokens, router = 512, Router(16, 4096, 2)
    h = torch.randn(num_tokens, 16, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        routing = router(h, 4096)
    working_set = routing.working_set.numel()
    assert working_set > 400  # per-token top-2 of 4096 experts: most tokens choose experts of their own
    assert sum(saved.values()) < num_tokens * working_set * 4  # less than one float32 (N, S) tensor
