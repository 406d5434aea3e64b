"""The router: exact per-token top-k (product keys with n ≠ n1·n2 included), gates and balance term, memory.

Every reference here is built from the router's weight alone (``proj.weight``, ``keys``), never its helpers.
Mutations seen failing: the product-key candidates without the last row's own top-k (n = 50: wrong top-k and
``IndexError`` at k = 1), the working set in mass order instead of id order, gates from the un-normalised
keys of another expert.
"""

import pytest
import torch
import torch.nn.functional as F

from pragnosia_pl.router import Router


def all_log_probs(router: Router, h: torch.Tensor) -> torch.Tensor:
    """log p(e | t) for every token and every valid expert, by brute force: (N, n), normalised over them."""
    scores = (h @ router.proj.weight.t()).float()
    if router.kind == "flat":
        return F.log_softmax(scores, dim=-1)
    n1, n2 = router.keys
    lp1, lp2 = F.log_softmax(scores[:, :n1], dim=-1), F.log_softmax(scores[:, n1:], dim=-1)
    full = (lp1[:, :, None] + lp2[:, None, :]).flatten(1)[:, : router.num_experts]  # (N, n), expert i·n2 + j
    return full - full.logsumexp(dim=-1, keepdim=True)  # renormalised over the real ids (none past n)


def raw_logits(router: Router, h: torch.Tensor) -> torch.Tensor:
    scores = (h @ router.proj.weight.t()).float()
    if router.kind == "flat":
        return scores
    n1, n2 = router.keys
    return (scores[:, :n1, None] + scores[:, None, n1:]).flatten(1)[:, : router.num_experts]


@pytest.mark.parametrize("kind", ["product", "flat"])
@pytest.mark.parametrize(("num_experts", "k"), [(50, 1), (50, 2), (50, 3), (7, 2), (64, 2), (1000, 4), (3, 3)])
def test_per_token_topk_is_the_brute_force_topk(kind, num_experts, k):
    torch.manual_seed(num_experts + k)
    router = Router(16, num_experts, k, router=kind)
    torch.nn.init.normal_(router.proj.weight, std=1.0)  # spread-out logits: no ties
    h = torch.randn(512, 16)
    routing = router(h)
    chosen = routing.working_set[routing.positions]  # (N, k) expert ids
    expected = all_log_probs(router, h).topk(k, dim=-1).indices
    assert torch.equal(chosen.sort(dim=-1).values, expected.sort(dim=-1).values)
    assert torch.equal(routing.working_set, expected.unique())  # every touched expert, ascending
    torch.testing.assert_close(
        routing.gates, torch.softmax(raw_logits(router, h).gather(1, chosen), dim=-1), rtol=1e-5, atol=1e-6
    )


def test_fifty_experts_top1_trains():
    """The issue-15 report: ``PragnosiaLM(num_experts=50, num_active_experts=1)`` raised IndexError on step 1."""
    from pragnosia_pl import PragnosiaLM

    model = PragnosiaLM(d_model=16, n_shared_layers=1, n_heads=2, num_experts=50, num_active_experts=1)
    torch.nn.init.normal_(model.routers[0].proj.weight, std=1.0)
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (8, 32)))
    assert logits.shape == (8, 32, 256) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["product", "flat"])
def test_capped_working_set_takes_the_top_mass_experts_in_id_order(kind):
    torch.manual_seed(1)
    router = Router(16, 50, 2, router=kind)
    torch.nn.init.normal_(router.proj.weight, std=0.5)
    h = torch.randn(256, 16)
    routing = router(h, expert_slots=5)
    probs = all_log_probs(router, h).exp()
    top_mass = probs.sum(dim=0).topk(5).indices
    chosen = routing.working_set[routing.positions]
    inside = probs[:, top_mass].topk(2, dim=-1).indices  # each token's top-2 within the 5
    assert torch.equal(chosen.sort(dim=-1).values, top_mass[inside].sort(dim=-1).values)
    assert torch.equal(routing.working_set, top_mass[inside].unique())  # ascending, untaken experts dropped


@pytest.mark.parametrize("kind", ["product", "flat"])
@pytest.mark.parametrize("expert_slots", [3, None])  # a capped working set; per-token top-k over all 50
def test_balance_term_equals_the_dense_formula(kind, expert_slots):
    torch.manual_seed(0)
    router = Router(16, 50, 2, router=kind)
    h = torch.randn(64, 16, requires_grad=True)
    routing = router(h, expert_slots)
    working_set, positions = routing.working_set, routing.positions
    prob_in_set = all_log_probs(router, h)[:, working_set].exp().mean(dim=0)  # (S,)
    fraction = F.one_hot(positions, working_set.numel()).sum(dim=(0, 1)).float() / positions.numel()
    balance = router.num_experts * (fraction * prob_in_set).sum()
    torch.testing.assert_close(routing.balance_loss, balance)
    grads = torch.autograd.grad(routing.gates.square().sum() + routing.balance_loss, [h, router.proj.weight])
    gates = torch.softmax(raw_logits(router, h).gather(1, working_set[positions]), dim=-1)
    reference = torch.autograd.grad(gates.square().sum() + balance, [h, router.proj.weight])
    for grad, expected in zip(grads, reference):
        torch.testing.assert_close(grad, expected)


def test_groups_list_each_experts_tokens_once_in_id_order():
    torch.manual_seed(0)
    router = Router(16, 40, 2)
    routing = router(torch.randn(100, 16))
    groups = routing.groups()
    assert groups.expert_ids == sorted(groups.expert_ids) and groups.offsets[-1] == 200
    chosen = routing.working_set[routing.positions]  # (N, k)
    for position, expert_id in enumerate(groups.expert_ids):
        token_idx = groups.token_idx[groups.rows(position)]
        expected = (chosen == expert_id).any(dim=-1).nonzero().squeeze(-1)
        assert torch.equal(token_idx, expected)


def test_per_token_routing_holds_nothing_of_size_tokens_by_working_set():
    torch.manual_seed(0)
    num_tokens, router = 512, Router(16, 4096, 2)
    h = torch.randn(num_tokens, 16, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        routing = router(h)
    working_set = routing.working_set.numel()
    assert working_set > 400  # per-token top-2 of 4096 experts: most tokens choose experts of their own
    assert sum(saved.values()) < num_tokens * working_set * 4  # less than one float32 (N, S) tensor


@pytest.mark.parametrize("kind", ["product", "flat"])
@pytest.mark.parametrize("expert_slots", [3, None])
def test_chunked_scoring_routes_as_one_chunk(monkeypatch, kind, expert_slots):
    """Tokens scored in chunks (recomputed in the backward pass) give the routing, gates, balance term and
    gradients of one chunk."""
    import pragnosia_pl.router as router_module

    torch.manual_seed(2)
    router = Router(16, 50, 2, router=kind)
    torch.nn.init.normal_(router.proj.weight, std=0.5)
    h = torch.randn(300, 16, requires_grad=True)

    def route(budget):
        monkeypatch.setattr(router_module, "SCORE_BUDGET", budget)
        routing = router(h, expert_slots)
        grads = torch.autograd.grad(routing.gates.square().sum() + routing.balance_loss, [h, router.proj.weight])
        return routing, grads

    (one, grads_one), (many, grads_many) = route(1 << 20), route(7 * sum(router.keys))  # 43 chunks of 7 tokens
    assert torch.equal(one.working_set, many.working_set) and torch.equal(one.positions, many.positions)
    torch.testing.assert_close(one.gates, many.gates)
    torch.testing.assert_close(one.balance_loss, many.balance_loss)
    for a, b in zip(grads_one, grads_many):
        torch.testing.assert_close(a, b)


def test_router_memory_does_not_grow_with_n():
    """Saved for backward at n = 10⁶ (n1 + n2 = 2,000 scores a token): far less than one (N, n1 + n2) tensor."""
    torch.manual_seed(0)
    num_tokens, router = 2048, Router(32, 10**6, 2)
    h = torch.randn(num_tokens, 32, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        router(h)
    assert sum(saved.values()) < num_tokens * sum(router.keys) * 4 / 8


@pytest.mark.parametrize("num_experts", [7, 50, 1000])
def test_no_probability_reaches_an_id_past_n(num_experts):
    """Product keys with n ≠ n1·n2 (7 = 3·3 - 2, 50 = 8·7 - 6, 1000 = 32·32 - 24): each token's probabilities over
    the n real experts sum to 1, and the balance term's P_i are those probabilities (brute force, renormalised over
    ids < n). Mutation seen failing: the joint p1·p2 left unnormalised (22 % of the mass on ids ≥ 7 at n = 7)."""
    torch.manual_seed(num_experts)
    router = Router(16, num_experts, 2)
    assert router.keys[0] * router.keys[1] != num_experts
    torch.nn.init.normal_(router.proj.weight, std=1.0)
    h = torch.randn(300, 16)
    mass = router.expert_mass(h)  # (n,)
    assert mass.shape == (num_experts,)
    torch.testing.assert_close(mass.sum(), torch.tensor(300.0), rtol=1e-5, atol=0)
    probs = all_log_probs(router, h).exp()  # (N, n)
    torch.testing.assert_close(mass, probs.sum(dim=0), rtol=1e-4, atol=1e-5)
    routing = router(h)
    fraction = torch.bincount(routing.positions.flatten(), minlength=routing.working_set.numel()) / (300 * 2)
    expected = num_experts * (fraction * probs.mean(dim=0)[routing.working_set]).sum()
    torch.testing.assert_close(routing.balance_loss, expected, rtol=1e-4, atol=1e-6)
