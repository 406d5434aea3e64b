"""Text domains: preset names and paths/globs resolved to files, read through Hugging Face ``datasets``.

A domain value is a preset name (``stdlib-code``, ``stdlib-docs``, ``licenses``, ``python-code``), a path, a
glob, or a list of these. Files are read as bytes and decoded as UTF-8 with replacement, so no file can crash the load;
empty files are skipped. The documents pass through ``datasets.Dataset.from_generator`` with a fingerprint
built from every file's path, size and mtime, so a cached domain is reused until one of its files changes.
Nothing is ever downloaded.

``python-code`` is split into training, validation and test *by file* (:func:`split_by_file`): each file carries a
name relative to the library folder it lies in, and a hash of that name decides its split and its reading order,
so the split is the same on every machine and no validation or test file is ever trained on.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

# Bump when the documents a source yields change, so old caches are not reused.
_READER_VERSION = 1
DOCUMENT_SEPARATOR = b"\n\n"
_GLOB_CHARS = frozenset("*?[")
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "encodings", "site-packages", "dist-packages", "__pycache__"}
)
_LICENSES_DIR = "/usr/share/common-licenses"
_SNIFF_BYTES = 8192  # a NUL byte among a file's first bytes marks it binary (UTF-8 text has none)


class Source(NamedTuple):
    """One file of a domain; ``kind`` says how to read it: ``"text"`` or ``"pydoc-topics"``.

    ``name`` is set on the files of a domain split by file: the file's path relative to its root, which
    :func:`split_by_file` hashes (never the absolute path, so the split does not depend on the machine).
    """

    path: str
    kind: str = "text"
    name: str | None = None


def _stdlib_code() -> list[Source]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        files.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return [Source(str(f)) for f in sorted(files, key=lambda f: f.relative_to(root).as_posix())]


def _stdlib_docs() -> list[Source]:
    return [Source(str(Path(sysconfig.get_paths()["stdlib"], "pydoc_data", "topics.py")), "pydoc-topics")]


def _licenses() -> list[Source]:
    if not os.path.isdir(_LICENSES_DIR):
        raise FileNotFoundError(f"preset 'licenses' reads {_LICENSES_DIR}/* (Debian/Ubuntu); it is not on this machine")
    return [Source(p) for p in sorted(glob.glob(os.path.join(_LICENSES_DIR, "*"))) if os.path.isfile(p)]


def _interpreter_roots() -> tuple[list[Path], list[Path]]:
    """The interpreter's prefixes (walked) and its library folders (a file's name is relative to the deepest one)."""
    prefixes = [Path(p) for p in dict.fromkeys([sys.prefix, sys.base_prefix])]
    libraries = list(prefixes)
    for base in prefixes:
        paths = sysconfig.get_paths(vars={"base": str(base), "platbase": str(base), "installed_base": str(base)})
        libraries.extend(Path(paths[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    return prefixes, libraries


def python_code_sources(prefixes: Iterable[str | Path], libraries: Iterable[str | Path] = ()) -> list[Source]:
    """Every ``.py`` file below ``prefixes``, named relative to the deepest of ``libraries`` (or prefixes) holding it,
    in the order of :func:`file_hash` of the name (a capped read samples the whole tree, not its first folder).

    Args:
        prefixes: Folders to walk (``__pycache__`` is skipped; a file reached twice is listed once).
        libraries: Folders that names are taken relative to, e.g. ``site-packages``, so a package's files have the
            same names in a virtualenv and in a system install.
    """
    prefixes = [Path(p) for p in prefixes]
    roots = sorted({Path(p) for p in [*prefixes, *libraries]}, key=lambda root: len(root.parts), reverse=True)
    named: dict[str, Source] = {}
    for prefix in prefixes:
        for dirpath, dirnames, filenames in os.walk(prefix):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for filename in filenames:
                if not filename.endswith(".py"):
                    continue
                path = Path(dirpath, filename)
                root = next(root for root in roots if path.is_relative_to(root))
                real = os.path.realpath(path)
                if real not in named and os.path.isfile(real):
                    named[real] = Source(str(path), name=path.relative_to(root).as_posix())
    return sorted(named.values(), key=lambda source: (file_hash(source.name), source.name))


def _python_code() -> list[Source]:
    return python_code_sources(*_interpreter_roots())


def file_hash(name: str) -> tuple[int, float]:
    """A stable hash of a file's name: its reading order (an int) and its split coordinate (uniform in [0, 1))."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big") / 2**64


def split_by_file(
    key: str, sources: list[Source], val_fraction: float, test_fraction: float = 0.0
) -> tuple[list[Source], list[Source], list[Source]]:
    """Splits a domain's files into training, validation and test files, keeping their order.

    A file is a validation file when its split coordinate (:func:`file_hash` of its ``name``) is below
    ``val_fraction``; when none is, the one with the smallest coordinate is, so validation is never empty. A file
    is a test file when its coordinate lies in ``[val_fraction, val_fraction + test_fraction)``; when none does
    (and ``test_fraction`` > 0), the remaining file with the smallest coordinate is. The validation files do not
    depend on ``test_fraction``, and the split depends on each file's name only: adding or removing other files
    moves no file across it.

    Raises:
        ValueError: If a file has no ``name`` or the domain has too few files for its splits.
    """
    if any(source.name is None for source in sources):
        raise ValueError(
            f"data.domains.{key}: python-code is split by file and cannot share a domain with other files; "
            "give them their own domain"
        )
    coordinate = {source.name: file_hash(source.name)[1] for source in sources}
    needed = 3 if test_fraction > 0 else 2
    if len(coordinate) < needed:
        raise ValueError(f"data.domains.{key}: splitting by file needs ≥ {needed} files, found {len(coordinate)}")
    held_out = {name for name, value in coordinate.items() if value < val_fraction}
    if not held_out or len(held_out) == len(coordinate):
        held_out = {min(coordinate, key=coordinate.get)}
    rest = {name: value for name, value in coordinate.items() if name not in held_out}
    tested = {name for name, value in rest.items() if value < val_fraction + test_fraction}
    if test_fraction > 0 and (not tested or len(tested) == len(rest)):
        tested = {min(rest, key=rest.get)}
    train = [source for source in sources if source.name not in held_out and source.name not in tested]
    val = [source for source in sources if source.name in held_out]
    return train, val, [source for source in sources if source.name in tested]


PRESETS = {"stdlib-code": _stdlib_code, "stdlib-docs": _stdlib_docs, "licenses": _licenses, "python-code": _python_code}


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or bool(_GLOB_CHARS & set(spec)) or os.path.exists(spec)


def _match(pattern: str) -> list[Source]:
    pattern = os.path.expanduser(pattern)
    if os.path.isfile(pattern):
        return [Source(pattern)]
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    return [Source(p) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]


def resolve_domain(key: str, spec: str | list[str]) -> list[Source]:
    """Turns one ``data.domains`` value into its files, in reading order, without duplicates.

    Args:
        key: The domain's name, used in error messages (``data.domains.<key>``).
        spec: A preset name, a path, a glob (``**`` recurses; a directory means every file below it), or a
            list of these.

    Raises:
        ValueError: If a name is neither a preset nor a path, a preset is unavailable, or nothing matches.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ValueError(f"data.domains.{key}: the list of files is empty")
    sources: list[Source] = []
    for item in specs:
        if item in PRESETS:
            try:
                found = PRESETS[item]()
            except FileNotFoundError as err:
                raise ValueError(f"data.domains.{key}: {err}") from None
        elif _looks_like_path(item):
            found = _match(item)
        else:
            raise ValueError(
                f"data.domains.{key}: {item!r} is neither a preset nor an existing path; "
                f"presets: {', '.join(PRESETS)} (or give a path or glob)"
            )
        if not found:
            raise ValueError(f"data.domains.{key}: no files match {item!r}")
        sources.extend(found)
    seen: set[str] = set()
    unique = []
    for source in sources:
        real = os.path.realpath(source.path)
        if real not in seen:
            seen.add(real)
            unique.append(source)
    return unique


def _pydoc_topics(raw: bytes) -> list[str]:
    """The prose values of ``pydoc_data/topics.py``'s ``topics`` dict, in key order; the file itself if unparsable."""
    text = raw.decode("utf-8", errors="replace")
    try:
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
                topics = ast.literal_eval(node.value)
                return [topics[name] for name in sorted(topics)]
    except (SyntaxError, ValueError, TypeError):
        pass
    return [text]


def _read_documents(sources: list[tuple[str, str]]) -> Iterator[dict[str, str]]:
    for path, kind in sources:
        raw = Path(path).read_bytes()
        texts = _pydoc_topics(raw) if kind == "pydoc-topics" else [raw.decode("utf-8", errors="replace")]
        for text in texts:
            if text:
                yield {"path": path, "text": text}


def _select(
    key: str, sources: list[Source], max_bytes: int | None
) -> tuple[list[tuple[str, str, int, int]], list[str], list[str]]:
    """Sources in order, with size and mtime, stopping once their sizes reach ``max_bytes``; and the binary and
    the empty files skipped on the way. Raises ``ValueError`` on a file that cannot be read."""
    selected, binary, empty, total = [], [], [], 0
    for source in sources:
        try:
            stat = os.stat(source.path)
            with open(source.path, "rb") as file:
                head = file.read(_SNIFF_BYTES)
        except OSError as err:
            raise ValueError(f"data.domains.{key}: cannot read {source.path}: {err.strerror or err}") from None
        if stat.st_size == 0:
            empty.append(source.path)
            continue
        if b"\0" in head:
            binary.append(source.path)
            continue
        selected.append((source.path, source.kind, stat.st_size, stat.st_mtime_ns))
        total += stat.st_size
        if max_bytes is not None and total >= max_bytes:
            break
    return selected, binary, empty


def _listing(paths: list[str], kind: str) -> str:
    if not paths:
        return ""
    return f"{len(paths)} {kind} file(s) skipped: {', '.join(paths[:3])}{', …' if len(paths) > 3 else ''}"


def load_domain_bytes(key: str, sources: list[Source], max_bytes: int | None, cache_dir: str) -> np.ndarray:
    """Reads a domain's files through ``datasets`` and returns their UTF-8 bytes, joined and truncated.

    Documents are joined by ``DOCUMENT_SEPARATOR``; files are taken in order and no file past the one that
    reaches ``max_bytes`` is read.

    Args:
        key: The domain's name, used in error messages.
        sources: The domain's files, from :func:`resolve_domain`.
        max_bytes: Keep at most this many bytes (``None``: all).
        cache_dir: The ``datasets`` cache directory.

    Returns:
        A ``uint8`` array of the domain's bytes (its byte tokens).

    Raises:
        ValueError: If a file cannot be read, or the files hold no text (binary files are skipped).
    """
    selected, binary, empty = _select(key, sources, max_bytes)
    if not selected:
        skipped = [_listing(binary, "binary"), _listing(empty, "empty")]
        raise ValueError(f"data.domains.{key}: files hold no text ({'; '.join(filter(None, skipped))})")
    if binary:
        rank_zero_warn(f"data.domains.{key}: {_listing(binary, 'binary')}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    fingerprint = hashlib.sha256(json.dumps([_READER_VERSION, selected]).encode()).hexdigest()[:32]
    try:
        documents = datasets.Dataset.from_generator(
            _read_documents,
            features=datasets.Features({"path": datasets.Value("string"), "text": datasets.Value("string")}),
            cache_dir=cache_dir,
            gen_kwargs={"sources": [(path, kind) for path, kind, _, _ in selected]},
            fingerprint=fingerprint,
        )
    except ValueError as err:  # datasets refuses an empty split
        if "corresponds to no data" in str(err):
            raise ValueError(f"data.domains.{key}: files hold no text") from None
        raise
    chunks: list[bytes] = []
    total = 0
    for text in documents["text"]:
        if chunks:
            chunks.append(DOCUMENT_SEPARATOR)
        chunks.append(text.encode("utf-8"))
        total += len(DOCUMENT_SEPARATOR) * (len(chunks) > 1) + len(chunks[-1])
        if max_bytes is not None and total >= max_bytes:
            break
    stream = b"".join(chunks)[:max_bytes]
    if not stream:
        raise ValueError(f"data.domains.{key}: files hold no text")
    return np.frombuffer(stream, dtype=np.uint8).copy()
