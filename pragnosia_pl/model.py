"""The shared parts of every model: byte embedding, causal trunk with RoPE, final norm and tied head.

Shape letters: B batch, T time, d width, N = B·T tokens, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) applied to queries and keys."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (Tmax, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(-2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)  # (T, hd/2)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, h, T, hd/2)
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, h, T, hd/2, 2)
        return rotated.flatten(-2)  # (B, h, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_len: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.rope = RotaryEmbedding(d_model // n_heads, max_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 × (B, T, d)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        q, k = self.rope(q), self.rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))  # (B, T, d)


class FeedForward(nn.Module):
    """Pre-norm feed-forward block ``x -> W2 · gelu(W1 · norm(x))``: the default expert, ``(N, d) -> (N, d)``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))

    @staticmethod
    def functional_forward(
        params: dict[str, torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``forward`` with the parameters given by name (an expert held in a slot): the same ops, without
        ``functional_call``'s per-call swap of module parameters. ``dtype``: the matrix products' (mixed precision,
        as autocast runs them: the norm in the input's precision, the linear layers in ``dtype``)."""
        return FeedForward.functional_forward_saving(params, x, dtype)[0]

    @staticmethod
    def functional_forward_saving(
        params: dict[str, torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``functional_forward`` and what :meth:`functional_backward` needs: the activations autograd would save,
        none of the parameters (they are read again at the backward, from wherever the expert is then)."""
        up_w, up_b, down_w, down_b = _linear_params(params, dtype)
        x_norm, mean, rstd = torch.native_layer_norm(x, (x.size(-1),), params["norm.weight"], params["norm.bias"], 1e-5)
        if dtype is not None:
            x_norm = x_norm.to(dtype)
        hidden = F.linear(x_norm, up_w, up_b)  # (N, H)
        act = F.gelu(hidden)  # (N, H)
        return F.linear(act, down_w, down_b), [x, x_norm, mean, rstd, hidden, act]

    @staticmethod
    def functional_backward(
        params: dict[str, torch.Tensor],
        saved: list[torch.Tensor],
        grad_out: torch.Tensor,
        grads: dict[str, torch.Tensor],
        input_grad: bool,
    ) -> torch.Tensor | None:
        """The vector-Jacobian product of ``functional_forward`` at ``grad_out`` (N, d), without autograd: each
        parameter's gradient written into ``grads[name]`` (views of one flat buffer, so nothing is concatenated);
        returns the input's gradient (N, d) when ``input_grad``, else ``None``. The same kernels, in the same
        order, as autograd runs: bit-identical to it (a test). A forward in mixed precision (its saved activations
        in a lower dtype) is differentiated in that dtype, each gradient then cast to the parameters' float32, as
        autograd through autocast's casts does.

        It consumes ``saved`` (emptied) and drops each activation as soon as it has used it, as autograd frees a
        graph's saved tensors during its backward: the (N, H) tensors never live all four at once."""
        x, x_norm, mean, rstd, hidden, act = saved
        saved.clear()
        dtype = act.dtype if act.dtype != grads["down.weight"].dtype else None
        _, _, down_w, _ = _linear_params(params, dtype)
        grad_out = grad_out if dtype is None else grad_out.to(dtype)
        _into(grads["down.weight"], torch.mm, grad_out.t(), act)  # (d, H)
        del act
        _into(grads["down.bias"], torch.sum, grad_out, 0)
        grad_act = torch.mm(grad_out, down_w)  # (N, H)
        grad_hidden = torch.ops.aten.gelu_backward(grad_act, hidden)  # (N, H)
        del grad_act, hidden
        _into(grads["up.weight"], torch.mm, grad_hidden.t(), x_norm)  # (H, d)
        _into(grads["up.bias"], torch.sum, grad_hidden, 0)
        grad_x_norm = torch.mm(grad_hidden, params["up.weight"] if dtype is None else params["up.weight"].to(dtype))
        del grad_hidden, x_norm
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            grad_x_norm.to(x.dtype),
            x,
            (x.size(-1),),
            mean,
            rstd,
            params["norm.weight"],
            params["norm.bias"],
            [input_grad, True, True],
        )
        grads["norm.weight"].copy_(grad_weight)
        grads["norm.bias"].copy_(grad_bias)
        return grad_x

    @staticmethod
    def grouped_forward_saving(
        params: dict[str, torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``functional_forward_saving`` of g experts at once: ``params`` by name with a leading expert dimension
        (``up.weight``: (g, H, d)), ``x`` (g, M, d), each expert's tokens padded to M with zero rows; returns
        (g, M, d) and what :meth:`grouped_backward` needs. Two batched matrix products instead of 2·g small ones
        (fine-grained experts: a few tokens each). A padding row is finite and, its output gradient being zero,
        adds nothing to any gradient."""
        up_w, up_b, down_w, down_b = _linear_params(params, dtype)
        x_hat, mean, rstd = torch.native_layer_norm(x, (x.size(-1),), None, None, 1e-5)  # (g, M, d), (g, M, 1) ×2
        x_norm = torch.addcmul(params["norm.bias"][:, None], x_hat, params["norm.weight"][:, None])  # (g, M, d)
        if dtype is not None:
            x_norm = x_norm.to(dtype)
        hidden = torch.baddbmm(up_b[:, None], x_norm, up_w.transpose(1, 2))  # (g, M, H)
        act = F.gelu(hidden)  # (g, M, H)
        out = torch.baddbmm(down_b[:, None], act, down_w.transpose(1, 2))  # (g, M, d)
        return out, [x_hat, rstd, x_norm, hidden, act]

    @staticmethod
    def grouped_backward(
        params: dict[str, torch.Tensor],
        saved: list[torch.Tensor],
        grad_out: torch.Tensor,
        grads: dict[str, torch.Tensor],
        input_grad: bool,
    ) -> torch.Tensor | None:
        """``functional_backward`` of g experts at once (:meth:`grouped_forward_saving`): ``grad_out`` (g, M, d), zero
        on the padding rows; each expert's parameter gradients written into ``grads[name]`` (g, *shape); returns the
        inputs' gradient (g, M, d) when ``input_grad``. Consumes ``saved``."""
        x_hat, rstd, x_norm, hidden, act = saved
        saved.clear()
        dtype = act.dtype if act.dtype != grads["down.weight"].dtype else None
        _, _, down_w, _ = _linear_params(params, dtype)
        grad_out = grad_out if dtype is None else grad_out.to(dtype)
        grads["down.weight"].copy_(torch.bmm(grad_out.transpose(1, 2), act))  # (g, d, H)
        del act
        grads["down.bias"].copy_(grad_out.sum(1))
        grad_hidden = torch.ops.aten.gelu_backward(torch.bmm(grad_out, down_w), hidden)  # (g, M, H)
        del hidden
        grads["up.weight"].copy_(torch.bmm(grad_hidden.transpose(1, 2), x_norm))  # (g, H, d)
        grads["up.bias"].copy_(grad_hidden.sum(1))
        del x_norm
        up_w = params["up.weight"] if dtype is None else params["up.weight"].to(dtype)
        grad_x_norm = torch.bmm(grad_hidden, up_w).to(x_hat.dtype)  # (g, M, d)
        del grad_hidden
        grads["norm.weight"].copy_((grad_x_norm * x_hat).sum(1))
        grads["norm.bias"].copy_(grad_x_norm.sum(1))
        if not input_grad:
            return None
        grad_x_hat = grad_x_norm.mul_(params["norm.weight"][:, None])  # (g, M, d)
        projection = (grad_x_hat * x_hat).mean(-1, keepdim=True)  # (g, M, 1)
        return (grad_x_hat - grad_x_hat.mean(-1, keepdim=True)).sub_(x_hat * projection).mul_(rstd)  # (g, M, d)


def _linear_params(params: dict[str, torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    names = ("up.weight", "up.bias", "down.weight", "down.bias")
    return [params[name] if dtype is None else params[name].to(dtype) for name in names]


def _into(out: torch.Tensor, op, *args) -> None:
    """``op(*args, out=out)`` when the result has ``out``'s dtype (no copy), else computed and cast into it."""
    if args[0].dtype == out.dtype:
        op(*args, out=out)
    else:
        out.copy_(op(*args))


class Block(nn.Module):
    """Pre-norm causal transformer block; without ``ffn`` its attention only (an expert layer, held by the model,
    takes the place of its feed-forward)."""

    def __init__(self, d_model: int, n_heads: int, max_len: int, ffn: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, max_len)
        self.ffn = FeedForward(d_model, 4 * d_model) if ffn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x if self.ffn is None else x + self.ffn(x)


Placement = Literal["top", "every_other", "every"]
PLACEMENTS = ("top", "every_other", "every")


class ExpertPlacement(NamedTuple):
    """Where a model's expert layers sit in its stack of ``n_layers`` blocks (``model.expert_layers``).

    - ``top``: one expert layer after the last block, which keeps its feed-forward (the seed's model);
    - ``every_other``: the feed-forward of blocks 1, 3, 5, … is an expert layer (Switch, GShard);
    - ``every``: the feed-forward of every block is an expert layer (Mixtral).
    """

    after: list[int]  # expert layer l runs after the first after[l] blocks
    replaced: set[int]  # blocks whose feed-forward an expert layer takes the place of

    @classmethod
    def build(cls, placement: Placement, n_layers: int) -> ExpertPlacement:
        if placement not in PLACEMENTS:
            raise ValueError(f"model.expert_layers ({placement!r}) must be one of: {', '.join(PLACEMENTS)}")
        if placement == "top":
            return cls([n_layers], set())
        replaced = list(range(1, n_layers, 2)) if placement == "every_other" else list(range(n_layers))
        if not replaced:
            raise ValueError(
                f"model.expert_layers ({placement!r}) places no expert layer in {n_layers} block(s): "
                "raise model.n_shared_layers or use top"
            )
        return cls([block + 1 for block in replaced], set(replaced))

    def segments(self, n_layers: int) -> list[tuple[int, int]]:
        """The runs of blocks ``[start, stop)`` before each expert layer, then the run after the last one."""
        bounds = [0, *self.after, n_layers]
        return list(zip(bounds[:-1], bounds[1:]))


class Backbone(nn.Module):
    """Everything a model shares: ``tokens -> h`` (embedding + trunk) and ``z -> logits`` (norm + tied head).

    Args:
        vocab_size: number of token ids (256 for bytes).
        d_model: width d.
        n_layers: number of causal trunk blocks.
        n_heads: attention heads per block; must divide ``d_model``.
        max_len: longest sequence the rotary table covers.

    Raises:
        ValueError: (from :meth:`trunk`) on a sequence longer than ``max_len``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        max_len: int,
        without_ffn: set[int] = frozenset(),
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, max_len, ffn=i not in without_ffn) for i in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.apply(init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * max(n_layers, 1)))

    def trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding and every block: (B, T) -> (B, T, d)."""
        return self.run_blocks(self.embed_tokens(tokens), 0, len(self.blocks))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.size(1) > self.max_len:
            raise ValueError(
                f"a sequence of {tokens.size(1)} tokens exceeds the {self.max_len} positions of the model's rotary "
                f"table: data.block_size must be ≤ {self.max_len}"
            )
        return self.embed(tokens)  # (B, T, d)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start`` to ``stop - 1`` over ``x`` (B, T, d)."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x  # (B, T, d)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(z), self.embed.weight)  # (..., V)

    def detached_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits through the head with its weights detached: gradients reach ``z`` and nothing shared."""
        normed = F.layer_norm(z, self.norm.normalized_shape, self.norm.weight.detach(), self.norm.bias.detach())
        return F.linear(normed, self.embed.weight.detach())  # (..., V)


def init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
