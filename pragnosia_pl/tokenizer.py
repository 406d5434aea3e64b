"""Tokenizers of ``TextDomains``: bytes (the default), a Hugging Face ``tokenizers`` JSON file, or a byte-level BPE
of a given vocabulary size trained on the training split and cached.

Every tokenizer maps any byte string to token ids and back exactly (``decode(encode(b)) == b``), and knows how many
bytes each token stands for (:attr:`Tokenizer.byte_lengths`), so ``val/bpb`` divides by the bytes of the target
tokens and stays comparable across tokenizers. Its :meth:`Tokenizer.to_json` string rebuilds it
(:func:`tokenizer_from_json`): a checkpoint carries its tokenizer that way.

Byte-level tokenizers (GPT-2's scheme) are the only ``tokenizers`` files taken: their tokens are byte strings, so a
token's byte length is defined and the round trip is exact. Bytes that are not valid UTF-8 (a block cut in the
middle of a character) are encoded as the single-byte tokens every byte-level vocabulary holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

BYTES = "bytes"
BPE_PREFIX = "bpe:"
CHOICES = "bytes, bpe:<vocab size> (e.g. bpe:8192) or a path to a tokenizers JSON file"
# Bump when training changes what a cached BPE holds, so old files are not reused.
_BPE_VERSION = 1
_CHUNK_CHARS = 1 << 16  # text is encoded in pieces of about this many characters, cut after a newline
_BATCH_CHUNKS = 64  # pieces per encode_batch call (bounds the memory of the Encoding objects)
_ESCAPED = re.compile("([\udc80-\udcff]+)")  # bytes that are not UTF-8, as ``surrogateescape`` decodes them
_PROBE = "Hello, wörld!\n\tdef f(x):  return x ** 2  # ∑ 😀\r\n\n"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters, the alphabet of byte-level vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


BYTE_CHARS = _bytes_to_unicode()
CHAR_BYTES = {char: byte for byte, char in BYTE_CHARS.items()}


def storage_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned (or int32) dtype that holds every id of a vocabulary."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class Tokenizer:
    """What ``TextDomains`` and the models need of a tokenizer: ids of bytes, bytes of ids, bytes per token.

    Attributes:
        vocab_size: V, the number of token ids (the model's embedding rows).
        byte_lengths: ``(V,)`` int64, the bytes each token stands for (0 for an id no text encodes to).
    """

    vocab_size: int
    byte_lengths: torch.Tensor

    def encode(self, data: bytes) -> list[int]:
        """Token ids of ``data``: any bytes, ``decode`` gives them back."""
        return self.encode_array(data).tolist()

    def encode_array(self, data: bytes) -> np.ndarray:
        """:meth:`encode` as an array of :func:`storage_dtype`."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> bytes:
        """The bytes that ``ids`` stand for."""
        raise NotImplementedError

    def to_json(self) -> str:
        """A JSON string that :func:`tokenizer_from_json` rebuilds this tokenizer from."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash of :meth:`to_json`: equal fingerprints, equal tokenizers."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:32]


class ByteTokenizer(Tokenizer):
    """Token id = byte value, ``V = 256``: no training, nothing to download, any text."""

    vocab_size = 256

    def __init__(self) -> None:
        self.byte_lengths = torch.ones(256, dtype=torch.long)

    def encode_array(self, data: bytes) -> np.ndarray:
        return np.frombuffer(bytes(data), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int]) -> bytes:
        return bytes(ids)

    def to_json(self) -> str:
        return json.dumps({"kind": BYTES})


class ByteLevelTokenizer(Tokenizer):
    """A byte-level Hugging Face ``tokenizers.Tokenizer`` (BPE as GPT-2's), with an exact round trip.

    Args:
        tokenizer: The ``tokenizers.Tokenizer``; its vocabulary must spell tokens in the byte-level alphabet and hold
            the 256 single bytes, and it must give back the text it encodes (no normalizer, no added prefix space).
        vocab_size: V; at least the tokenizer's own size (the ids above it are padding no text encodes to).
        name: What the error messages call it.

    Raises:
        ValueError: If the tokenizer is not byte-level or does not round-trip; the message names ``data.tokenizer``.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None, name: str = "the tokenizer") -> None:
        self.tokenizer = tokenizer
        added = {index: token.content for index, token in tokenizer.get_added_tokens_decoder().items()}
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        own_size = max(vocab.values()) + 1
        self.vocab_size = own_size if vocab_size is None else vocab_size
        if self.vocab_size < own_size:
            raise ValueError(f"data.tokenizer: {name} has {own_size} ids, more than vocab_size {self.vocab_size}")
        self.pieces = [b""] * self.vocab_size
        for token, index in vocab.items():
            if index in added:
                self.pieces[index] = added[index].encode("utf-8")
            elif all(char in CHAR_BYTES for char in token):
                self.pieces[index] = bytes(CHAR_BYTES[char] for char in token)
            else:
                raise ValueError(
                    f"data.tokenizer: {name} is not a byte-level tokenizer (token {token!r} is not spelled in "
                    "GPT-2's byte alphabet); bits per byte need tokens that are byte strings"
                )
        missing = [byte for byte, char in BYTE_CHARS.items() if char not in vocab]
        if missing:
            raise ValueError(
                f"data.tokenizer: {name} is not a byte-level tokenizer (it lacks the single-byte tokens of "
                f"{len(missing)} byte values); bits per byte need tokens that are byte strings"
            )
        self.byte_ids = np.array([vocab[BYTE_CHARS[byte]] for byte in range(256)], dtype=np.int64)
        self.byte_lengths = torch.tensor([len(piece) for piece in self.pieces], dtype=torch.long)
        probe = _PROBE.encode("utf-8") + b"\xe2\x88"  # ends inside a character
        if self.decode(self.encode(probe)) != probe:
            raise ValueError(
                f"data.tokenizer: {name} does not give back the text it encodes (a normalizer, or a prefix space?); "
                "bits per byte need an exact round trip"
            )

    def encode_array(self, data: bytes) -> np.ndarray:
        dtype = storage_dtype(self.vocab_size)
        parts = [np.asarray(ids, dtype=dtype) for ids in self._encode_parts(bytes(data))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def _encode_parts(self, data: bytes) -> Iterator[list[int] | np.ndarray]:
        """Ids of ``data`` in order: its UTF-8 text in pieces through the tokenizer, other bytes one token each."""
        # encode_batch_fast (tokenizers ≥ 0.20) skips the offsets: measured 4.8 against 7.6 CPU seconds per 8 MB of code
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        batch: list[str] = []
        for segment in _segments(data):
            if isinstance(segment, str):
                batch.append(segment)
                if len(batch) < _BATCH_CHUNKS:
                    continue
            for encoding in encode_batch(batch, add_special_tokens=False):
                yield encoding.ids
            batch = []
            if isinstance(segment, bytes):
                yield self.byte_ids[np.frombuffer(segment, dtype=np.uint8)]
        for encoding in encode_batch(batch, add_special_tokens=False):
            yield encoding.ids

    def decode(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.pieces[index] for index in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": "byte-level", "vocab_size": self.vocab_size, "tokenizer": self.tokenizer.to_str()})


def _pieces(text: str) -> Iterator[str]:
    """``text`` cut after a newline about every :data:`_CHUNK_CHARS` characters (the pieces encode in parallel)."""
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        cut = text.find("\n", start + _CHUNK_CHARS)
        if cut < 0:
            break
        yield text[start : cut + 1]
        start = cut + 1
    if start < len(text):
        yield text[start:]


def _segments(data: bytes) -> Iterator[str | bytes]:
    """``data`` in order as pieces of UTF-8 text (:func:`_pieces`) and runs of the bytes that are not UTF-8."""
    parts = _ESCAPED.split(data.decode("utf-8", errors="surrogateescape"))
    for index, part in enumerate(parts):
        if index % 2:
            yield part.encode("utf-8", errors="surrogateescape")
        else:
            yield from _pieces(part)


def tokenizer_from_json(text: str) -> Tokenizer:
    """The tokenizer that :meth:`Tokenizer.to_json` wrote."""
    state = json.loads(text)
    if state["kind"] == BYTES:
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    return ByteLevelTokenizer(HFTokenizer.from_str(state["tokenizer"]), state["vocab_size"])


def parse_tokenizer(spec: str) -> tuple[str, int | None]:
    """Checks a ``data.tokenizer`` value: ``("bytes", None)``, ``("bpe", V)`` or ``("file", None)``.

    Raises:
        ValueError: Naming ``data.tokenizer`` and its choices.
    """
    if spec == BYTES:
        return BYTES, None
    if spec.startswith(BPE_PREFIX):
        size = spec[len(BPE_PREFIX) :]
        if not size.isdigit() or int(size) <= 256:
            raise ValueError(f"data.tokenizer ({spec!r}): bpe:<vocab size> needs a vocabulary > 256, e.g. bpe:8192")
        return "bpe", int(size)
    if os.path.isfile(os.path.expanduser(spec)):
        return "file", None
    raise ValueError(f"data.tokenizer ({spec!r}) must be {CHOICES}")


def load_tokenizer_file(path: str) -> ByteLevelTokenizer:
    """A ``tokenizers`` JSON file (``tokenizer.json``) as a :class:`ByteLevelTokenizer`.

    Raises:
        ValueError: If the file is not a byte-level ``tokenizers`` file; the message names ``data.tokenizer``.
    """
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tokenizer = HFTokenizer.from_file(os.path.expanduser(path))
    except Exception as err:  # the library raises its own Exception type on a malformed file
        raise ValueError(f"data.tokenizer ({path!r}) is not a tokenizers JSON file: {err}") from None
    return ByteLevelTokenizer(tokenizer, name=path)


def train_bpe(texts: Iterable[bytes], vocab_size: int) -> ByteLevelTokenizer:
    """A byte-level BPE of ``vocab_size`` ids (the 256 bytes, then merges) trained on ``texts`` with ``tokenizers``.

    Its pre-tokenizer is GPT-2's (no prefix space); bytes that are not UTF-8 take no part in training. When the text
    has fewer merges to learn than asked for, the ids above the trained ones are padding.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    pieces = (segment for text in texts for segment in _segments(text) if isinstance(segment, str))
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    return ByteLevelTokenizer(tokenizer, vocab_size, name=f"bpe:{vocab_size}")


def cached_bpe(texts: list[bytes], vocab_size: int, cache_dir: str | os.PathLike) -> ByteLevelTokenizer:
    """:func:`train_bpe` on ``texts``, cached as ``<cache_dir>/tokenizers/bpe-<V>-<hash>.json``.

    The file's name holds a hash of the training text (every byte of it) and the vocabulary size, so a BPE is
    trained once per training split and size; it is written atomically (a crash leaves no partial file).
    """
    digest = hashlib.sha256(f"{_BPE_VERSION}:{vocab_size}:{len(texts)}".encode())
    for text in texts:
        digest.update(len(text).to_bytes(8, "little"))
        digest.update(text)
    path = Path(cache_dir, "tokenizers", f"bpe-{vocab_size}-{digest.hexdigest()[:32]}.json")
    if path.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        return ByteLevelTokenizer(HFTokenizer.from_file(str(path)), vocab_size, name=str(path))
    tokenizer = train_bpe(texts, vocab_size)
    write_atomically(path, tokenizer.tokenizer.to_str().encode())
    return tokenizer


def write_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in its folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
