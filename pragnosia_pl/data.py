"""``TextDomains``: local text files as named domains of tokens (bytes by default), packed into fixed blocks."""

from __future__ import annotations

import hashlib
import io
import math
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from typing_extensions import override

from pragnosia_pl.domains import Source, load_domain_bytes, resolve_domain, split_by_file
from pragnosia_pl.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    cached_bpe,
    load_tokenizer_file,
    parse_tokenizer,
    write_atomically,
)

DEFAULT_DOMAINS = {"code": "stdlib-code", "prose": "stdlib-docs"}


class BlockDataset(Dataset):
    """Non-overlapping blocks of ``block_size + 1`` tokens; item ``i`` is ``(x, y)`` with ``y`` = ``x`` shifted.

    Args:
        tokens: The domain's tokens, shape ``(N,)``: ``uint8`` bytes, or ``uint16``/``int32`` ids of a larger
            vocabulary.
        blocks: Which blocks of ``tokens`` this dataset holds (block ``b`` starts at ``b * (block_size + 1)``).
        block_size: Tokens per input sequence ``T``.
    """

    def __init__(self, tokens: torch.Tensor, blocks: torch.Tensor, block_size: int) -> None:
        self.tokens = tokens
        self.blocks = blocks
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.blocks[index]) * (self.block_size + 1)
        block = self.tokens[start : start + self.block_size + 1].long()  # (T + 1,)
        return block[:-1], block[1:]  # (T,), (T,)


class EpochSampler(Sampler[int]):
    """A random order of ``range(num_samples)`` that depends only on ``(seed, epoch)``, not on the global RNG.

    Lightning calls :meth:`set_epoch` at the start of every epoch, so a run resumed at an epoch boundary sees
    the same batches in the same order as an uninterrupted one. A run resumed mid-epoch restarts the epoch's
    iteration, and Lightning ends it early by the number of batches already trained on; ``consumed`` says how
    many samples those were, and the sampler yields them last (never reached), so the resumed epoch trains on
    exactly the batches the interrupted one had left.

    Args:
        num_samples: Size of the dataset.
        seed: Seed of the order.
        consumed: Called when an iteration starts: samples of this epoch's order already trained on.
    """

    def __init__(self, num_samples: int, seed: int = 0, consumed: Callable[[], int] | None = None) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.consumed = consumed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        skip = self.consumed() % self.num_samples if self.consumed is not None and self.num_samples else 0
        return iter(np.roll(order, -skip).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """The training ``DataLoader``: it resumes mid-epoch, because its :class:`EpochSampler` starts a resumed epoch
    after the samples the Trainer already trained on, with or without worker processes.

    Its state (saved in every checkpoint) is what that count of samples depends on: the number of samples and the
    batch size. A checkpoint taken with others warns that the resumed epoch will not continue the same order.
    """

    def state_dict(self) -> dict[str, int]:
        return {"num_samples": len(self.dataset), "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict != self.state_dict():
            rank_zero_warn(
                f"the checkpoint's training data had {state_dict}, this run's has {self.state_dict()}: the resumed "
                "epoch does not continue the interrupted one's order of batches"
            )


def _collate_blocks(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*batch)
    return torch.stack(inputs), torch.stack(targets)  # (B, T), (B, T)


class DomainText(NamedTuple):
    """A domain's bytes and their train/val/test split: by block (``train``, ``val`` and ``test`` are the same
    stream, the blocks of ``block_bytes`` bytes listed in ``train_blocks``, ``val_blocks`` and ``test_blocks``) or by
    file (a stream per split, no block lists)."""

    train: np.ndarray  # (N,) uint8
    val: np.ndarray  # (N,) uint8
    test: np.ndarray  # (N,) uint8
    train_blocks: np.ndarray | None = None
    val_blocks: np.ndarray | None = None
    test_blocks: np.ndarray | None = None
    block_bytes: int = 0

    @property
    def num_bytes(self) -> int:
        return len(self.train) if self.val is self.train else len(self.train) + len(self.val) + len(self.test)

    def runs(self, split: str) -> list[bytes]:
        """The text of ``split`` (``train``, ``val`` or ``test``): one piece per run of consecutive blocks, or its
        stream."""
        stream, blocks = getattr(self, split), getattr(self, f"{split}_blocks")
        if blocks is None:
            return [stream.tobytes()] if len(stream) else []
        if not len(blocks):
            return []
        runs = np.split(blocks, np.flatnonzero(np.diff(blocks) != 1) + 1)
        return [stream[run[0] * self.block_bytes : (run[-1] + 1) * self.block_bytes].tobytes() for run in runs]


class LoadedDomains(NamedTuple):
    """What :meth:`TextDomains.setup` keeps: per domain its bytes read and its blocks; and the tokenizer."""

    num_bytes: dict[str, int]
    train: dict[str, BlockDataset]
    val: dict[str, BlockDataset]
    test: dict[str, BlockDataset]
    tokenizer: Tokenizer


def _default_cache_dir() -> str:
    return os.environ.get("PRAGNOSIA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pragnosia")


class TextDomains(pl.LightningDataModule):
    """Named domains of local text, tokenised (bytes by default) and packed into blocks, for language modelling.

    Each domain's files are read through Hugging Face ``datasets`` (cached under ``cache_dir``, keyed on every
    file's size and mtime; nothing is downloaded), encoded as UTF-8 bytes, joined with a blank line between
    documents and cut into non-overlapping blocks of ``block_size + 1`` bytes. A seeded permutation of each
    domain's blocks gives a deterministic train/val/test split: its first blocks are the validation blocks, the next
    ones the test blocks, the rest the training blocks, so the validation blocks do not depend on ``test_fraction``.
    ``python-code`` is split by file instead (a stable hash of each file's name picks its split), so no validation
    or test file is ever trained on. With the byte tokenizer (ids 0-255) those blocks are the sequences. With
    another, each split's text (its runs of consecutive blocks, or its files) is encoded and its tokens are packed
    into blocks of ``block_size + 1`` tokens, so the validation text is the same under every tokenizer; a
    ``bpe:<V>`` tokenizer is trained on the training text of every domain only (cached under
    ``<cache_dir>/tokenizers``), and encoded splits are cached under ``<cache_dir>/tokens``, keyed on their text and
    the tokenizer. Training mixes the active domains (all, or the one chosen with :meth:`set_domain`) in an order
    fixed by ``(seed, epoch)``; validation and test have one loader per domain, in the order of
    :attr:`val_domain_names`. A batch
    is ``(x, y)``, two ``LongTensor`` of shape ``(batch_size, block_size)`` with ``y`` = ``x`` shifted by one
    token.

    Args:
        domains: Domain name to its text: a preset (``stdlib-code``: the standard library's ``.py`` files
            without tests; ``stdlib-docs``: the prose of ``pydoc_data/topics.py``; ``licenses``:
            ``/usr/share/common-licenses/*``; ``python-code``: every ``.py`` file under the interpreter's
            prefixes, standard library and installed packages), a path, a glob, or a list of these. ``None``:
            ``{"code": "stdlib-code", "prose": "stdlib-docs"}``.
        block_size: Tokens per training sequence ``T``.
        batch_size: Sequences per batch ``B``.
        val_fraction: Share of each domain's blocks held out for validation (at least one block).
        test_fraction: Share of each domain's blocks held out for ``pragnosia test`` (at least one block), never
            trained or validated on; 0: no test split.
        max_bytes_per_domain: Read at most this many bytes of each domain (files in order); ``None``: all. A
            domain split by file reads ``val_fraction`` of them from its validation files, ``test_fraction``
            from its test files, the rest from its training files.
        num_workers: ``DataLoader`` worker processes.
        seed: Seed of the train/val/test split and of the training order.
        cache_dir: Where ``datasets`` caches the read files, trained tokenizers and encoded splits live; ``None``:
            ``$PRAGNOSIA_CACHE`` or ``~/.cache/pragnosia``.
        tokenizer: ``bytes`` (ids are bytes, V = 256), ``bpe:<V>`` (a byte-level BPE of V ids trained with Hugging
            Face ``tokenizers`` on the training split, e.g. ``bpe:8192``), or the path of a byte-level ``tokenizers``
            JSON file. :attr:`vocab_size` is known at once (``pragnosia fit`` links it to ``model.vocab_size``);
            :attr:`tokenizer` after :meth:`setup` (when a BPE is trained).

    Raises:
        ValueError: On an invalid argument, naming its ``data.*`` key; at :meth:`setup`, on a domain whose files
            don't exist, hold no text, or are shorter than one block per split (or whose split gives less than a
            block of tokens); at :meth:`prepare_data`, on a ``block_size`` longer than the model's ``max_len``,
            before any file is read.

    Example::

        from pragnosia_pl import TextDomains

        data = TextDomains({"code": "stdlib-code", "notes": ["docs/*.md", "README.md"]}, block_size=64)
        data.setup("fit")
        x, y = next(iter(data.train_dataloader()))  # (16, 64) each
        data.set_domain("notes")  # the next train_dataloader() draws from "notes" only
    """

    def __init__(
        self,
        domains: dict[str, str | list[str]] | None = None,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_bytes_per_domain: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        tokenizer: str = "bytes",
    ) -> None:
        super().__init__()
        domains = dict(DEFAULT_DOMAINS if domains is None else domains)
        if not domains:
            raise ValueError("data.domains is empty; name at least one domain, e.g. {code: stdlib-code}")
        if block_size < 1:
            raise ValueError(f"data.block_size ({block_size}) must be ≥ 1")
        if batch_size < 1:
            raise ValueError(f"data.batch_size ({batch_size}) must be ≥ 1")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction ({val_fraction}) must be in (0, 1)")
        if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"data.test_fraction ({test_fraction}) must be in [0, 1) with data.val_fraction ({val_fraction}) "
                "+ data.test_fraction < 1"
            )
        if max_bytes_per_domain is not None and max_bytes_per_domain < 1:
            raise ValueError(f"data.max_bytes_per_domain ({max_bytes_per_domain}) must be ≥ 1 or null")
        if num_workers < 0:
            raise ValueError(f"data.num_workers ({num_workers}) must be ≥ 0")
        kind, bpe_size = parse_tokenizer(tokenizer)
        self.save_hyperparameters()
        self.domains = domains
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_bytes_per_domain = max_bytes_per_domain
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir or _default_cache_dir()
        self.tokenizer_spec = tokenizer
        self.bpe_size = bpe_size
        self._tokenizer: Tokenizer | None = None  # a BPE is trained (or found in the cache) at setup
        if kind == "bytes":
            self._tokenizer = ByteTokenizer()
        elif kind == "file":
            self._tokenizer = load_tokenizer_file(tokenizer)
        self._prepared: LoadedDomains | None = None
        self.active_domain: str | None = None
        self._num_bytes: dict[str, int] = {}
        self._train: dict[str, BlockDataset] = {}
        self._val: dict[str, BlockDataset] = {}
        self._test: dict[str, BlockDataset] = {}

    @property
    def vocab_size(self) -> int:
        """V, the number of token ids (known before :meth:`setup`: a ``bpe:<V>`` pads what training leaves short)."""
        return self.bpe_size if self._tokenizer is None else self._tokenizer.vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the data (a ``bpe:<V>`` one exists after :meth:`setup`, which trains or loads it)."""
        if self._tokenizer is None:
            raise RuntimeError(f"TextDomains: data.tokenizer {self.tokenizer_spec} is made in setup(); call it first")
        return self._tokenizer

    @property
    def domain_names(self) -> list[str]:
        return list(self.domains)

    @property
    def val_domain_names(self) -> list[str]:
        """Names of the validation dataloaders, in order (``dataloader_idx`` ``i`` is domain ``i``)."""
        return list(self.domains)

    @override
    def prepare_data(self) -> None:
        self._check_block_size()
        if not self._num_bytes:  # fails here, before the Trainer makes a run directory; trains and caches a BPE
            self._prepared = self._load_all()

    def _check_block_size(self) -> None:
        """``block_size`` against the model's longest sequence (its ``max_len``), before any file is read."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        max_len = getattr(model, "max_len", None)
        if isinstance(max_len, int) and self.block_size > max_len:
            raise ValueError(
                f"data.block_size ({self.block_size}) exceeds the {max_len} positions of the model's rotary table: "
                f"data.block_size must be ≤ {max_len}"
            )

    @override
    def setup(self, stage: str) -> None:
        if self._num_bytes:
            return
        loaded, self._prepared = self._prepared or self._load_all(), None
        num_bytes, train, val, test = loaded.num_bytes, loaded.train, loaded.val, loaded.test
        lines = []
        for key in self.domains:
            size = f"{num_bytes[key] / 1e6:.1f} MB" if num_bytes[key] >= 100_000 else f"{num_bytes[key] / 1e3:.1f} kB"
            lines.append(
                f"{key} {size} ({len(train[key]):,} train / {len(val[key]):,} val / {len(test[key]):,} test blocks)"
            )
        self._num_bytes, self._train, self._val, self._test = num_bytes, train, val, test
        self._tokenizer = loaded.tokenizer
        vocabulary = "" if isinstance(loaded.tokenizer, ByteTokenizer) else f"; tokenizer {self.tokenizer_spec}"
        rank_zero_info("data: " + ", ".join(lines) + vocabulary)

    def _load_all(self) -> LoadedDomains:
        """Every domain's bytes read and split, the tokenizer (a BPE trained on the training text of every domain),
        and the training, validation and test blocks of every domain."""
        texts = {key: self._read(key) for key in self.domains}
        tokenizer = self._tokenizer
        if tokenizer is None:
            training_text = [run for text in texts.values() for run in text.runs("train")]
            tokenizer = cached_bpe(training_text, self.bpe_size, self.cache_dir)
        train, val, test = {}, {}, {}
        for key, text in texts.items():
            train[key], val[key], test[key] = self._blocks(key, text, tokenizer)
        return LoadedDomains({key: text.num_bytes for key, text in texts.items()}, train, val, test, tokenizer)

    def _read(self, key: str) -> DomainText:
        """The bytes of domain ``key`` and their training/validation/test split: a seeded split of its blocks (the
        validation blocks are the permutation's first ones whatever ``test_fraction`` is), or of its files."""
        sources = resolve_domain(key, self.domains[key])
        if any(source.name is not None for source in sources):
            return self._split_by_file(key, sources)
        stream = load_domain_bytes(key, sources, self.max_bytes_per_domain, self.cache_dir)  # (N,)
        num_blocks = self._num_blocks(key, len(stream))
        order = np.random.default_rng([self.seed, zlib.crc32(key.encode())]).permutation(num_blocks)
        num_val = min(max(1, math.ceil(self.val_fraction * num_blocks)), num_blocks - 1)
        num_test = 0 if self.test_fraction == 0 else max(1, math.ceil(self.test_fraction * num_blocks))
        num_test = min(num_test, num_blocks - num_val - 1)
        val, test, train = (np.sort(blocks) for blocks in np.split(order, [num_val, num_val + num_test]))
        return DomainText(stream, stream, stream, train, val, test, self.block_size + 1)

    def _split_by_file(self, key: str, sources: list[Source]) -> DomainText:
        train_files, val_files, test_files = split_by_file(key, sources, self.val_fraction, self.test_fraction)
        val_bytes = test_bytes = train_bytes = None
        if self.max_bytes_per_domain is not None:
            val_bytes = max(1, round(self.val_fraction * self.max_bytes_per_domain))
            test_bytes = max(1, round(self.test_fraction * self.max_bytes_per_domain)) if self.test_fraction else 0
            train_bytes = self.max_bytes_per_domain - val_bytes - test_bytes
            if train_bytes < 1:
                raise ValueError(
                    f"data.max_bytes_per_domain ({self.max_bytes_per_domain}) leaves no training bytes for "
                    f"data.domains.{key} after its validation and test shares (data.val_fraction "
                    f"{self.val_fraction}, data.test_fraction {self.test_fraction})"
                )
        train = load_domain_bytes(key, train_files, train_bytes, self.cache_dir)  # (N,)
        val = load_domain_bytes(key, val_files, val_bytes, self.cache_dir)
        test = load_domain_bytes(key, test_files, test_bytes, self.cache_dir) if self.test_fraction else train[:0]
        return DomainText(train, val, test)

    def _blocks(
        self, key: str, text: DomainText, tokenizer: Tokenizer
    ) -> tuple[BlockDataset, BlockDataset, BlockDataset]:
        """The training, validation and test blocks of a domain: its byte blocks, or its splits' tokens packed."""
        if isinstance(tokenizer, ByteTokenizer) and text.train_blocks is not None:
            stream = torch.from_numpy(text.train)  # (N,)
            return tuple(
                BlockDataset(stream, torch.from_numpy(blocks), self.block_size)
                for blocks in (text.train_blocks, text.val_blocks, text.test_blocks)
            )
        unit = "bytes" if isinstance(tokenizer, ByteTokenizer) else "tokens"
        splits = []
        parts = [("training", "train"), ("validation", "val")] + ([("test", "test")] if self.test_fraction else [])
        for split, part in parts:
            if isinstance(tokenizer, ByteTokenizer):
                tokens = getattr(text, part)  # (N,)
            else:
                tokens = self._encode(text.runs(part), tokenizer)  # (N,)
            num_blocks = len(tokens) // (self.block_size + 1)
            if num_blocks < 1:
                source = "files" if text.train_blocks is None else "blocks"
                raise ValueError(
                    f"data.domains.{key}: its {split} {source} give {len(tokens):,} {unit}, less than one block of "
                    f"data.block_size + 1 = {self.block_size + 1} {unit}; raise data.max_bytes_per_domain or lower "
                    "data.block_size"
                )
            splits.append(BlockDataset(torch.from_numpy(tokens), torch.arange(num_blocks), self.block_size))
        if not self.test_fraction:
            splits.append(BlockDataset(splits[0].tokens, torch.arange(0), self.block_size))
        return splits[0], splits[1], splits[2]

    def _encode(self, runs: list[bytes], tokenizer: Tokenizer) -> np.ndarray:
        """The tokens of ``runs`` (each encoded on its own), cached under ``<cache_dir>/tokens`` by a hash of the
        tokenizer and of the text."""
        digest = hashlib.sha256(f"{tokenizer.fingerprint()}:{len(runs)}".encode())
        for run in runs:
            digest.update(len(run).to_bytes(8, "little"))
            digest.update(run)
        path = Path(self.cache_dir, "tokens", f"{digest.hexdigest()[:32]}.npy")
        if path.is_file():
            return np.load(path)
        tokens = np.concatenate([tokenizer.encode_array(run) for run in runs])
        buffer = io.BytesIO()
        np.save(buffer, tokens)
        write_atomically(path, buffer.getvalue())
        return tokens

    def _num_blocks(self, key: str, num_bytes: int) -> int:
        num_blocks = num_bytes // (self.block_size + 1)
        needed = 3 if self.test_fraction else 2  # one block per split at least
        if num_blocks < needed:
            raise ValueError(
                f"data.domains.{key}: {num_bytes:,} bytes make {num_blocks} block(s) of data.block_size + 1 = "
                f"{self.block_size + 1} bytes (need ≥ {needed}): data.block_size ({self.block_size}) is too large "
                "for its text"
            )
        return num_blocks

    def _consumed_samples(self) -> int:
        """Samples of the current epoch the Trainer has trained on when it (re)starts iterating: 0, unless it
        resumes mid-epoch. One batch per rank per step: under DDP the ranks share the order, interleaved."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.ready * self.batch_size * trainer.world_size

    def set_domain(self, name: str | None) -> None:
        """Restricts training to one domain from the next ``train_dataloader()`` on.

        Args:
            name: A key of ``domains``, or ``None`` for all domains.

        Raises:
            ValueError: If ``name`` is not a domain.
        """
        if name is not None and name not in self.domains:
            raise ValueError(f"unknown domain {name!r}; domains: {', '.join(self.domains)}")
        self.active_domain = name

    def num_tokens(self, domain: str, split: str = "train") -> int:
        """Target tokens in ``split`` (``"train"``, ``"val"`` or ``"test"``) of ``domain``: blocks × ``block_size``."""
        self._check_setup()
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; domains: {', '.join(self.domains)}")
        splits = {"train": self._train, "val": self._val, "test": self._test}
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; splits: train, val, test")
        return len(splits[split][domain]) * self.block_size

    def summary(self) -> dict[str, dict[str, int]]:
        """Per domain: ``bytes`` read, ``{train,val,test}_blocks`` and ``{train,val,test}_tokens``."""
        self._check_setup()
        return {
            key: {
                "bytes": self._num_bytes[key],
                "train_blocks": len(self._train[key]),
                "val_blocks": len(self._val[key]),
                "test_blocks": len(self._test[key]),
                "train_tokens": self.num_tokens(key, "train"),
                "val_tokens": self.num_tokens(key, "val"),
                "test_tokens": self.num_tokens(key, "test"),
            }
            for key in self.domains
        }

    @override
    def train_dataloader(self) -> DataLoader:
        self._check_setup()
        names = list(self.domains) if self.active_domain is None else [self.active_domain]
        dataset = ConcatDataset([self._train[name] for name in names])
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"data.batch_size ({self.batch_size}) exceeds the {len(dataset)} training blocks of "
                f"{', '.join(names)}; lower data.batch_size or data.block_size"
            )
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(dataset), self.seed, consumed=self._consumed_samples),
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=_collate_blocks,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def val_dataloader(self) -> list[DataLoader]:
        self._check_setup()
        return self._eval_loaders(self._val)

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """One loader per domain over its test blocks, in the order of :attr:`val_domain_names`."""
        self._check_setup()
        if not self.test_fraction:
            raise ValueError("data.test_fraction is 0: there is no test split; set it > 0 (default 0.05)")
        return self._eval_loaders(self._test)

    def _eval_loaders(self, splits: dict[str, BlockDataset]) -> list[DataLoader]:
        return [
            DataLoader(
                splits[name],
                batch_size=self.batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=_collate_blocks,
                persistent_workers=self.num_workers > 0,
            )
            for name in self.val_domain_names
        ]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"active_domain": self.active_domain}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.set_domain(state_dict.get("active_domain"))

    def _check_setup(self) -> None:
        if not self._num_bytes:
            raise RuntimeError("TextDomains: call setup() first (the Trainer does this)")
