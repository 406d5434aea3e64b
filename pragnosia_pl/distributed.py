"""Collectives that keep data-parallel ranks in lockstep on the experts (DESIGN §10).

Lightning's DDP synchronises the shared parameters; the experts live outside ``nn.Module`` parameters, so
the training step agrees on them itself. Every rank chooses the same working set from the router mass summed
over ranks, and applies the same token-weighted mean of the expert gradients to its own replica of the store:
the stores stay identical without ever moving a record between ranks.

Every function is the identity in a single process (no collective, bit-for-bit the single-process result).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default group; 1 when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group; 0 when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def sum_across_ranks(mass: torch.Tensor) -> torch.Tensor:
    """The router mass (n,) summed over ranks: the mass of the global batch, the same tensor on every rank.

    An all-reduce leaves bit-identical results on every rank, so ``topk`` on it (same kernel, same input)
    picks the same working set everywhere, ties included.
    """
    if world_size() == 1:
        return mass
    mass = mass.contiguous()
    dist.all_reduce(mass, op=dist.ReduceOp.SUM)
    return mass


def expert_group() -> dist.ProcessGroup | None:
    """A process group of its own for the experts' all-reduces (``None`` in one process).

    The exact objective all-reduces each expert's gradient inside the backward pass, while DDP's reducer
    all-reduces the shared gradient's buckets on the default group; a separate group keeps the two streams of
    collectives from interleaving differently on different ranks. Call it on every rank, at the same point.
    """
    if world_size() == 1:
        return None
    return dist.new_group()


def average_across_ranks(grad: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """An expert's gradient (P,) averaged over the ranks, as DDP averages the shared gradient: with equal batches
    on every rank it is the gradient of the global batch's mean loss (a rank whose tokens never reached the
    expert contributes zeros)."""
    if world_size() == 1:
        return grad
    grad = grad.contiguous()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    return grad / world_size()


def mean_across_ranks(
    grad: torch.Tensor, local_loss: torch.Tensor, num_tokens: int, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert's flat gradient (P,) and local loss () averaged over every token it saw on every rank.

    Each rank weights its mean by its ``num_tokens``, so the result is what one process would compute on the
    global batch; a rank whose batch sent the expert no tokens contributes nothing (its mean over zero tokens
    is undefined). One all-reduce of P + 2 floats per expert.
    """
    if world_size() == 1:
        return grad, local_loss
    weighted = torch.empty(grad.numel() + 2, dtype=torch.float32, device=grad.device)  # [Σ n·g | Σ n·L | Σ n]
    if num_tokens > 0:
        torch.mul(grad.reshape(-1), num_tokens, out=weighted[:-2])
        weighted[-2] = local_loss.float() * num_tokens
    else:
        weighted[:-1].zero_()
    weighted[-1] = num_tokens
    dist.all_reduce(weighted, op=dist.ReduceOp.SUM, group=group)
    expert_tokens = weighted[-1].clamp(min=1)
    return (weighted[:-2] / expert_tokens).view_as(grad).to(grad.dtype), weighted[-2] / expert_tokens
