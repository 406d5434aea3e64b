"""GlobalMoE's expert clipping: each expert a step routed to, by its own norm, as torch's ``clip_grad_norm_`` on it.

Mutations seen failing here: every expert clipped by the norm of all of their gradients together; the ``1e-6`` of
``clip_grad_norm_``'s coefficient left out; the step's working set recorded without the layer's offset (``e``, not
``l·n + e``).
"""

import torch
import torch.nn.functional as F

from pragnosia_pl import GlobalMoE


def test_global_moe_clips_each_routed_expert_as_clip_grad_norm_does():
    torch.manual_seed(0)
    model = GlobalMoE(d_model=16, n_shared_layers=2, n_heads=2, num_experts=12, expert_layers="every", router="flat")
    tokens, targets = torch.randint(0, 256, (2, 1, 4))  # 8 (token, expert) pairs a layer: some of the 12 untouched
    F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
    touched = [i for i, expert in enumerate(model.experts) if expert.up.weight.grad is not None]
    assert model.step_working_set == set(touched)
    assert any(i < 12 for i in touched) and any(i >= 12 for i in touched) and len(touched) < 24

    reference = {}  # expert id: its gradients clipped by torch, on copies
    norms = []
    for i in touched:
        copies = [torch.nn.Parameter(p.detach().clone()) for p in model.experts[i].parameters()]
        for copy, p in zip(copies, model.experts[i].parameters()):
            copy.grad = p.grad.clone()
        norms.append(torch.linalg.vector_norm(torch.stack([copy.grad.norm() for copy in copies])))
        reference[i] = copies
    max_norm = torch.stack(norms).median().item()  # some experts above it, some below
    assert min(norms) < max_norm < max(norms)
    for copies in reference.values():
        torch.nn.utils.clip_grad_norm_(copies, max_norm)
    model.hparams.grad_clip = max_norm

    model.on_before_optimizer_step(None)
    for i, copies in reference.items():
        for p, copy in zip(model.experts[i].parameters(), copies):
            torch.testing.assert_close(p.grad, copy.grad, rtol=1e-6, atol=0)
    assert all(model.experts[i].up.weight.grad is None for i in range(24) if i not in reference)
    assert model.step_working_set == set()  # the next step records its own
