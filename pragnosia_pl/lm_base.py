"""What every language model of the package shares: the backbone, the shared optimizer and evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from typing_extensions import override

from pragnosia_pl.model import Backbone, ExpertPlacement, Placement
from pragnosia_pl.tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_json

VOCAB_SIZE = 256  # token ids by default: bytes (``TextDomains(tokenizer='bytes')``)
MAX_LEN = 1024  # positions of the rotary table: the longest sequence (``data.block_size``) any model takes


def check_positive(**sizes: int | float) -> None:
    """Raise ``ValueError`` naming the YAML key of the first size that is not positive."""
    for key, value in sizes.items():
        if value is None or value <= 0:
            raise ValueError(f"model.{key} ({value}) must be > 0")


@contextmanager
def seeded(seed: int, stream: int) -> Iterator[None]:
    """Initialise what is built inside from ``(seed, stream)`` alone, leaving the global RNG as it was: the same
    ``seed`` gives every model of the package the same backbone (stream 0) and router (stream 1)."""
    if not 0 <= seed < 2**23:
        raise ValueError(f"model.seed ({seed}) must be in [0, {2**23})")
    if not 0 <= stream < 2**20:
        raise ValueError(f"stream ({stream}) must be in [0, 2^20)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2**63 + seed * 2**20 + stream)  # above every expert's seed (experts.expert_seed)
        yield


def router_stream(layer: int) -> int:
    """The :func:`seeded` stream of expert layer ``layer``'s router (the backbone is stream 0, DenseLM's FFNs 2)."""
    return 1 if layer == 0 else 16 + layer


def compute_dtype(device: torch.device) -> torch.dtype | None:
    """The lower precision autocast runs matrix products in on ``device`` now (``bf16-mixed``, ``16-mixed``), or
    ``None`` outside autocast: what the experts, run outside autograd, compute in."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class LanguageModel(LightningModule):
    """Base of ``PragnosiaLM``, ``GlobalMoE`` and ``DenseLM``: backbone, shared AdamW, validation metrics.

    The backbone (``vocab_size`` token ids, sequences of at most :data:`MAX_LEN` tokens) is initialised from
    ``seed`` (not from the global RNG) and the shared AdamW's gradient is clipped to ``grad_clip`` by its own norm,
    the same in every model (DESIGN §7).
    Subclasses implement ``forward(tokens) -> logits`` (evaluation path) and ``training_step``.
    Validation logs ``val/loss`` (nats per token) and ``val/bpb`` (bits per byte: the loss summed over the target
    tokens ÷ (ln 2 · their bytes), so it compares across tokenizers) over all tokens and ``val/loss/<domain>``,
    ``val/bpb/<domain>`` per validation dataloader, named by the datamodule's ``val_domain_names``; ``test`` logs
    the same under ``test/``, one test dataloader per domain in the same order.

    The tokenizer is the datamodule's ``tokenizer`` when it has one (taken when fitting, validating or testing
    starts), else bytes for ``vocab_size`` 256, else none (then no ``bpb`` and no :meth:`generate`); checkpoints
    carry it.
    """

    def __init__(
        self,
        d_model: int,
        n_shared_layers: int,
        n_heads: int,
        lr: float,
        seed: int,
        grad_clip: float,
        expert_layers: Placement = "top",
        vocab_size: int = VOCAB_SIZE,
    ) -> None:
        super().__init__()
        check_positive(d_model=d_model, n_heads=n_heads, lr=lr, vocab_size=vocab_size)
        if n_shared_layers < 0:
            raise ValueError(f"model.n_shared_layers ({n_shared_layers}) must be ≥ 0")
        if d_model % n_heads:
            raise ValueError(f"model.d_model ({d_model}) must be divisible by model.n_heads ({n_heads})")
        if grad_clip < 0:
            raise ValueError(f"model.grad_clip ({grad_clip}) must be ≥ 0 (0 disables clipping)")
        self.placement = ExpertPlacement.build(expert_layers, n_shared_layers)
        self.segments = self.placement.segments(n_shared_layers)  # blocks before each expert layer, then the rest
        with seeded(seed, 0):
            self.backbone = Backbone(
                vocab_size, d_model, n_shared_layers, n_heads, MAX_LEN, without_ffn=self.placement.replaced
            )
        self.vocab_size = vocab_size
        self.val_losses: dict[str, MeanMetric] = {}
        self.test_losses: dict[str, MeanMetric] = {}
        self.val_bytes_per_token: dict[str, MeanMetric] = {}  # per stage and domain: the target tokens' mean bytes
        self.test_bytes_per_token: dict[str, MeanMetric] = {}
        self.tokenizer: Tokenizer | None = ByteTokenizer() if vocab_size == VOCAB_SIZE else None
        self._tokenizer_from_checkpoint = False
        self._byte_lengths: torch.Tensor | None = None  # (V,) the tokenizer's, on the device

    def use_tokenizer(self, tokenizer: Tokenizer, source: str) -> None:
        """Take ``tokenizer`` (from ``source``, named in errors) for bits per byte, generation and checkpoints.

        Raises:
            ValueError: If its vocabulary is not ``model.vocab_size``, or it differs from the checkpoint's.
        """
        if tokenizer.vocab_size != self.vocab_size:
            raise ValueError(
                f"model.vocab_size ({self.vocab_size}) must equal the vocabulary of {source} ({tokenizer.vocab_size})"
            )
        if self._tokenizer_from_checkpoint and self.tokenizer.fingerprint() != tokenizer.fingerprint():
            raise ValueError(f"{source} is not the tokenizer this checkpoint was trained with; use that data.tokenizer")
        self.tokenizer, self._byte_lengths = tokenizer, None

    def _take_datamodule_tokenizer(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            self.use_tokenizer(tokenizer, "data.tokenizer")

    @override
    def on_fit_start(self) -> None:
        self._take_datamodule_tokenizer()

    @override
    def on_validation_start(self) -> None:
        self._take_datamodule_tokenizer()

    @override
    def on_test_start(self) -> None:
        self._take_datamodule_tokenizer()

    @property
    def max_len(self) -> int:
        """The longest sequence the model takes (its rotary table): ``data.block_size`` must not exceed it."""
        return self.backbone.max_len

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters trained by the shared optimizer."""
        return list(self.parameters())

    def clip_shared_gradients(self) -> None:
        """Clip the shared parameters' gradient to ``grad_clip`` by its own norm (no-op at 0)."""
        if self.hparams.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.shared_parameters(), self.hparams.grad_clip)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # No weight decay: no measurement ever used any (AdamW's default would be 0.01).
        options = dict(lr=self.hparams.lr, betas=(0.9, 0.95), weight_decay=0.0)
        try:  # the fused kernel (CPU and CUDA since torch 2.4), as the experts' flat Adam uses
            return torch.optim.AdamW(self.parameters(), **options, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(self.parameters(), **options)

    def val_domain_name(self, dataloader_idx: int) -> str:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "val_domain_names", None)
        return names[dataloader_idx] if names else str(dataloader_idx)

    @override
    def on_validation_epoch_start(self) -> None:
        self.val_losses = {}  # fresh each epoch: metrics reset under inference mode could not be updated later
        self.val_bytes_per_token = {}

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        return self._evaluate("val", batch, dataloader_idx)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_losses("val")

    @override
    def on_test_epoch_start(self) -> None:
        self.test_losses, self.test_bytes_per_token = {}, {}

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        return self._evaluate("test", batch, dataloader_idx)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_losses("test")

    def _evaluate(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> torch.Tensor:
        """The batch's loss, into ``{stage}_losses`` and the target tokens' bytes into ``{stage}_bytes_per_token``
        (over all domains, and its domain's)."""
        losses, per_token = getattr(self, f"{stage}_losses"), getattr(self, f"{stage}_bytes_per_token")
        tokens, targets = batch  # (B, T), (B, T)
        logits = self(tokens)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if self.tokenizer is not None and self._byte_lengths is None:
            self._byte_lengths = self.tokenizer.byte_lengths.to(self.device)  # (V,)
        for name in ("", self.val_domain_name(dataloader_idx)):
            if name not in losses:
                with torch.inference_mode(False):
                    losses[name] = MeanMetric(sync_on_compute=True).to(self.device)
                    per_token[name] = MeanMetric(sync_on_compute=True).to(self.device)
            losses[name].update(loss.detach(), weight=targets.numel())
            if self.tokenizer is not None:
                bytes_per_token = self._byte_lengths[targets].sum() / targets.numel()  # 1 for bytes, exactly
                per_token[name].update(bytes_per_token, weight=targets.numel())
        return loss

    def _log_losses(self, stage: str) -> None:
        losses, per_token = getattr(self, f"{stage}_losses"), getattr(self, f"{stage}_bytes_per_token")
        for name, metric in losses.items():
            loss = metric.compute()
            suffix = f"/{name}" if name else ""
            self.log(f"{stage}/loss{suffix}", loss, prog_bar=not name, sync_dist=False)
            if self.tokenizer is not None:
                # Σ loss / (ln 2 · Σ bytes) = (mean loss per token ÷ mean bytes per token) / ln 2, both weighted by
                # tokens; the byte tokenizer divides by exactly 1, so its figure is the loss / ln 2 bit for bit.
                bits_per_byte = loss / per_token[name].compute() / math.log(2)
                self.log(f"{stage}/bpb{suffix}", bits_per_byte, prog_bar=not name, sync_dist=False)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_json()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tokenizer" in checkpoint:
            self._tokenizer_from_checkpoint = False
            self.use_tokenizer(tokenizer_from_json(checkpoint["tokenizer"]), "the checkpoint's tokenizer")
            self._tokenizer_from_checkpoint = True

    @torch.no_grad()
    def generate(
        self,
        prompt: bytes,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> bytes:
        """Continue ``prompt`` by ``max_new_tokens`` tokens (bytes, with the byte tokenizer) and return their bytes
        (constant memory: experts stream through the slots); the prompt is encoded and the sample decoded with the
        model's tokenizer, each token predicted from the last :data:`MAX_LEN` tokens at most. Sampling follows
        Hugging Face ``generate``.

        Args:
            prompt: Bytes to continue (empty: a newline).
            max_new_tokens: Tokens to add.
            temperature: Divides the logits; 0 is greedy decoding (the most likely token each time).
            top_k: Sample among the ``top_k`` most likely tokens only (0: all; clipped to the vocabulary).
            top_p: Sample among the most likely tokens whose probabilities sum to ``top_p`` (nucleus; 1: all).

        Raises:
            ValueError: On a value out of range, naming the argument, or a model without a tokenizer.

        Example::

            model = PragnosiaLM.load_from_checkpoint("runs/quickstart/checkpoints/last.ckpt").eval()
            print(model.generate(b"def ", 200, temperature=0).decode(errors="replace"))
        """
        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens = torch.tensor(self._encode(prompt or b"\n"), dtype=torch.long, device=self.device)[None]  # (1, T)
        start = tokens.size(1)
        for _ in range(max_new_tokens):
            logits = self.next_token_logits(tokens[:, -MAX_LEN:]).float()  # (V,)
            if temperature == 0:
                next_token = logits.argmax()[None]  # (1,)
            else:
                probs = F.softmax(_filter_logits(logits / temperature, top_k, top_p), dim=-1)  # (V,)
                next_token = torch.multinomial(probs, 1)  # (1,)
            tokens = torch.cat([tokens, next_token[None]], dim=1)
        return self.tokenizer.decode(tokens[0, start:].tolist())

    def _encode(self, text: bytes) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"this model (vocab_size {self.vocab_size}) has no tokenizer: fit it on data first")
        return self.tokenizer.encode(text)

    def next_token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits (V,) of the token after ``tokens`` (1, T): the last row of ``self(tokens)``; a model may
        compute that row alone."""
        return self(tokens)[0, -1]  # (V,)

    @torch.no_grad()
    def score(self, text: bytes, block_size: int = 128, batch_size: int = 16) -> tuple[float, int]:
        """Bits per byte of the whole of ``text``: every token of it predicted once, from the tokens before it in its
        window of ``block_size`` (the first from a newline), as validation predicts a block's tokens; the summed loss
        over ln 2 times the text's bytes.

        Args:
            text: The bytes to score.
            block_size: Tokens predicted per window (the training ``data.block_size`` makes it comparable with
                ``val/bpb``); at most :attr:`max_len`.
            batch_size: Windows per forward pass.

        Returns:
            ``(bits per byte, bytes scored)``.

        Raises:
            ValueError: On empty ``text`` or a ``block_size`` out of range.
        """
        if not text:
            raise ValueError("score: the text is empty")
        if not 1 <= block_size <= self.max_len:
            raise ValueError(f"block_size ({block_size}) must be between 1 and {self.max_len}")
        check_positive(batch_size=batch_size)
        ids = self._encode(text)
        stream = torch.tensor([*self._encode(b"\n")[-1:], *ids], dtype=torch.long, device=self.device)  # (N + 1,)
        num_full = len(ids) // block_size
        windows = stream[: num_full * block_size + 1]
        inputs = [windows[:-1].view(num_full, block_size)] if num_full else []  # (W, T)
        targets = [windows[1:].view(num_full, block_size)] if num_full else []
        if len(ids) % block_size:
            inputs.append(stream[num_full * block_size : -1][None])  # (1, T')
            targets.append(stream[num_full * block_size + 1 :][None])
        total = 0.0
        for x, y in zip(inputs, targets):
            for start in range(0, x.size(0), batch_size):
                logits = self(x[start : start + batch_size])  # (b, T, V)
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(), y[start : start + batch_size].flatten(), reduction="sum"
                )
                total += float(loss)
        return total / len(text) / math.log(2), len(text)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, flag: str = "") -> None:
    """Raise ``ValueError`` on a sampling value out of range, naming it as ``{flag}{name}`` (``--`` on the CLI)."""
    if max_new_tokens < 1:
        raise ValueError(f"{flag}max_new_tokens ({max_new_tokens}) must be ≥ 1")
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"{flag}temperature ({temperature}) must be ≥ 0 and finite (0: greedy)")
    if top_k < 0:
        raise ValueError(f"{flag}top_k ({top_k}) must be ≥ 0 (0: the whole vocabulary)")
    if not 0 < top_p <= 1:
        raise ValueError(f"{flag}top_p ({top_p}) must be in (0, 1] (1: off)")


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (V,) with every byte outside the top-k and outside the nucleus of mass ``top_p`` at -inf."""
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], -math.inf)
    if top_p < 1:
        probs, order = F.softmax(logits, dim=-1).sort(descending=True)  # (V,), (V,)
        outside = probs.cumsum(0) - probs >= top_p  # the mass before it already reaches top_p; the first always stays
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), -math.inf)
    return logits
