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


def mean_across_ranks(
    grad: torch.Tensor, local_loss: torch.Tensor, num_tokens: int, batch_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert's flat gradient (P,) and local loss () averaged over every token it saw on every rank.

    Each rank weights its mean by its ``num_tokens``, so the result is what one process would compute on the
    global batch; a rank whose batch sent the expert no tokens contributes nothing (its mean over zero tokens
    is undefined). With ``batch_tokens`` (this rank's batch) the gradient is instead divided by all ranks' batch
    tokens: the sum over the expert's tokens weighted as the shared loss weighs them (``local_weighting:
    batch``); the loss stays the mean. One all-reduce of P + 3 floats per expert.
    """
    if world_size() == 1:
        if batch_tokens is None:
            return grad, local_loss
        return grad * (num_tokens / batch_tokens), local_loss
    weighted = torch.empty(grad.numel() + 3, dtype=torch.float32, device=grad.device)  # [Σ n·g | Σ n·L | Σ n | Σ N]
    if num_tokens > 0:
        torch.mul(grad.reshape(-1), num_tokens, out=weighted[:-3])
        weighted[-3] = local_loss.float() * num_tokens
    else:
        weighted[:-2].zero_()
    weighted[-2] = num_tokens
    weighted[-1] = 0 if batch_tokens is None else batch_tokens
    dist.all_reduce(weighted, op=dist.ReduceOp.SUM)
    expert_tokens = weighted[-2].clamp(min=1)
    divisor = expert_tokens if batch_tokens is None else weighted[-1]
    return (weighted[:-3] / divisor).view_as(grad).to(grad.dtype), weighted[-3] / expert_tokens
