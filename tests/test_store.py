"""Expert stores and the device expert cache (DESIGN §4.1, §4.2, §5).

Issue 25's mutations, each seen failing the test named:
- ``ExpertCache.invalidate`` dropping queued write-backs unwaited: the invalidate-raises test;
- a short read retried from the unaligned offset it reached: the aligned-retry test (``direct``: EINVAL);
- a part read moving the whole record: the part-read test; the state's checksum not checked: the per-part checksum test;
- the host tier: a snapshot without writing its dirty records back, or plain LRU admission: its budget test; a tier hit
  copied at once instead of in the disk worker's order: the random-operations test (direct+tier); a restore keeping its
  rows: the snapshot/restore test (direct+tier); a failed eviction write dropped: its failed-eviction test;
- a refused tier leaving its disk store open: the too-small-tier test.
"""

import errno
import hashlib
import itertools
import os
import random
import re
import time
from pathlib import Path

import pytest
import torch

from pragnosia_pl.expert_cache import ExpertCache
from pragnosia_pl.store import (
    CorruptRecordError,
    DeviceStore,
    DiskStore,
    ExpertStore,
    HostStore,
    make_store,
    remove_stale_live_directories,
)
from pragnosia_pl.store import base as store_module

KINDS = ["device", "host", "disk", "direct", "direct+tier"]  # direct+tier: a HostTier of 4 records (+ 2 in flight)
DISK_KINDS = ["disk", "direct"]
N, R = 16, 64  # experts, record elements

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_init(seed: int = 0):
    def init_record(expert_id: int, out: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + expert_id)
        torch.randn(out.numel(), generator=generator, out=out)

    return init_record


def build(
    kind: str,
    tmp_path: Path,
    num_experts: int = N,
    record_numel: int = R,
    name: str = "store",
    params_numel: int | None = None,
) -> ExpertStore:
    kind, _, tier = kind.partition("+")
    return make_store(
        kind,
        num_experts=num_experts,
        record_numel=record_numel,
        init_record=make_init(),
        device="cpu",
        directory=tmp_path / name,
        params_numel=params_numel,
        host_tier_bytes=6 * record_numel * 4 if tier else 0,
    )


def initial(expert_id: int, record_numel: int = R) -> torch.Tensor:
    out = torch.empty(record_numel)
    make_init()(expert_id, out)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.int32), b.cpu().view(torch.int32))


def read(store: ExpertStore, expert_id: int) -> torch.Tensor:
    out = torch.full((store.record_numel,), float("nan"))
    store.read(expert_id, out)
    return out


def record(value: float) -> torch.Tensor:
    return torch.full((R,), value) + torch.arange(R) / R


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- validation


def test_make_store_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match=re.escape("model.store ('x') must be one of: device, host, disk, direct")):
        build("x", tmp_path)


def test_disk_store_needs_a_directory():
    with pytest.raises(ValueError, match=r"model\.store_dir must be set when model\.store is 'disk'"):
        make_store("disk", num_experts=N, record_numel=R, init_record=make_init(), directory=None)


@pytest.mark.parametrize("kind", KINDS)
def test_store_validates_arguments(kind, tmp_path):
    with pytest.raises(ValueError, match=r"num_experts \(0\) must be an integer ≥ 1"):
        build(kind, tmp_path, num_experts=0)
    with pytest.raises(ValueError, match=r"record_numel \(0\) must be an integer ≥ 1"):
        build(kind, tmp_path, record_numel=0)
    store = build(kind, tmp_path)
    for bad_id in (N, -1):
        with pytest.raises(IndexError, match=rf"expert id {bad_id} out of range \[0, {N}\)"):
            store.read(bad_id, torch.empty(R))
    with pytest.raises(ValueError, match=rf"into must be a contiguous 1-D float32 tensor of {R} elements"):
        store.read(0, torch.empty(R, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"src must be a contiguous 1-D float32 tensor.*non-contiguous"):
        store.write(0, torch.empty(R, 2)[:, 0])
    with pytest.raises(ValueError, match=r"got \(2, 32\) torch.float32"):
        store.write_async(0, torch.empty(2, R // 2))
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="is closed"):
        store.read(0, torch.empty(R))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_host_store_pinning_needs_cuda():
    with pytest.raises(ValueError, match=r"pin_memory=True\) needs CUDA"):
        HostStore(N, R, make_init(), pin_memory=True)
    assert HostStore(N, R, make_init()).pin_memory is False


def test_cache_validates_arguments(tmp_path):
    store = build("host", tmp_path)
    with pytest.raises(ValueError, match=r"model\.expert_cache \(0\) must be an integer ≥ 1"):
        ExpertCache(store, 0, "cpu")
    cache = ExpertCache(store, 2, "cpu")
    with pytest.raises(IndexError, match=rf"expert id {N} out of range"):
        cache.load(N)
    with pytest.raises(ValueError, match="expert 3 is not resident in the cache"):
        cache.mark_dirty(3)
    assert ExpertCache(store, 10 * N, "cpu").slots.shape == (N, R)  # capacity clamped to n


# ------------------------------------------------------------------------------------ records and lazy init


@pytest.mark.parametrize("kind", KINDS)
def test_lazy_init_is_deterministic_and_does_not_materialize(kind, tmp_path):
    store = build(kind, tmp_path)
    first, second = read(store, 5), read(store, 5)
    assert same_bits(first, second) and same_bits(first, initial(5))
    assert not same_bits(first, read(store, 6))
    assert not store.materialized(5) and store.materialized_ids() == []
    stats = store.stats()
    assert stats["reads"] == 3 and stats["writes"] == 0 and stats["materialized"] == 0
    assert stats["lazy_reads"] == 3 and stats["bytes_read"] == 3 * R * 4


@pytest.mark.parametrize("kind", ["host", *DISK_KINDS])
def test_init_record_gets_a_zeroed_buffer(kind, tmp_path):
    def fill_first_half(expert_id: int, out: torch.Tensor) -> None:
        out[: R // 2] = expert_id

    store = make_store(kind, num_experts=N, record_numel=R, init_record=fill_first_half, directory=tmp_path)
    garbage = torch.full((R,), 7.0)
    store.read(3, garbage)
    assert torch.equal(garbage, torch.cat([torch.full((R // 2,), 3.0), torch.zeros(R // 2)]))


@pytest.mark.parametrize("kind", KINDS)
def test_write_then_read_round_trips(kind, tmp_path):
    store = build(kind, tmp_path)
    for expert_id in (9, 2, 4):
        store.write(expert_id, record(expert_id))
    assert store.materialized_ids() == [2, 4, 9]
    assert store.materialized(9) and not store.materialized(3)
    for expert_id in range(N):
        expected = record(expert_id) if expert_id in (2, 4, 9) else initial(expert_id)
        assert same_bits(read(store, expert_id), expected), expert_id
    stats = store.stats()
    assert stats["writes"] == 3 and stats["bytes_written"] == 3 * R * 4 and stats["materialized"] == 3


@pytest.mark.parametrize("kind", KINDS)
def test_operations_take_effect_in_issue_order(kind, tmp_path):
    store = build(kind, tmp_path)
    slot = record(1.0)
    write = store.write_async(3, slot)
    read_back = torch.empty(R)
    pending = [write, store.read_async(3, read_back), store.read_async(5, slot)]  # 5 overwrites the written slot
    for handle in pending:
        handle.wait()
    assert same_bits(read_back, record(1.0))  # the read saw the earlier write
    assert same_bits(read(store, 3), record(1.0))  # the write read the slot before the later read filled it
    assert same_bits(slot, initial(5))
    store.synchronize()
    assert all(handle.done() for handle in pending)


def test_device_store_is_allocated_and_initialised_eagerly():
    store = DeviceStore(N, R, make_init(), device="cpu")
    assert store.records.shape == (N, R)
    assert all(same_bits(store.records[e], initial(e)) for e in range(N))
    assert store.materialized_ids() == []


def test_host_store_memory_grows_with_materialized_experts_only():
    start = time.perf_counter()
    store = HostStore(1_000_000, 1024, make_init(), pin_memory=False)
    assert time.perf_counter() - start < 1.0
    assert store.stats()["host_bytes_allocated"] == 0
    store.write(999_999, torch.ones(1024))
    assert store.stats()["host_bytes_allocated"] == 1024 * 4  # the first arena holds one record
    for expert_id in range(100):
        store.write(expert_id, torch.full((1024,), float(expert_id)))
    assert store.stats()["host_bytes_allocated"] < 2 * 101 * 1024 * 4  # arenas double: < 2x the records
    assert same_bits(read(store, 999_999), torch.ones(1024))
    assert all(same_bits(read(store, e), torch.full((1024,), float(e))) for e in range(100))


# ------------------------------------------------------------------------------------------- disk store


def test_disk_store_with_a_million_experts_is_sparse_and_instant(tmp_path):
    path = tmp_path / "experts.bin"
    start = time.perf_counter()
    store = DiskStore(path, 1_000_000, 1024, make_init())
    assert time.perf_counter() - start < 1.0
    assert path.stat().st_size == 1_000_000 * 1024 * 4
    assert path.stat().st_blocks * 512 <= 64 * 1024  # ~nothing on disk
    assert same_bits(read(store, 999_999), initial(999_999, 1024))
    store.write(123_456, torch.ones(1024))
    store.synchronize()
    assert path.stat().st_blocks * 512 <= 1024 * 1024
    assert store.materialized_ids() == [123_456]
    assert store.stats()["file_bytes_allocated"] == path.stat().st_blocks * 512
    store.close()


def test_disk_store_file_is_exclusive_and_released_on_close(tmp_path):
    path = tmp_path / "experts.bin"
    store = DiskStore(path, N, R, make_init())
    with pytest.raises(RuntimeError, match="is in use by another DiskStore"):
        DiskStore(path, N, R, make_init())
    store.close()
    with DiskStore(path, N, R, make_init()) as reopened:  # the old contents are discarded
        assert reopened.materialized_ids() == []


@pytest.mark.skipif(os.name != "posix", reason="stale folders are told apart by file locks")
def test_stale_live_folders_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = DiskStore(tmp_path / "live-dead" / "experts.bin", N, R, make_init())
    dead.write(1, record(1.0))
    dead.close()  # its process was killed: nobody holds the lock any more, the file stays
    busy = DiskStore(tmp_path / "live-busy" / "experts.bin", N, R, make_init())  # a running store
    fresh = DiskStore(tmp_path / "live-fresh" / "experts.bin", N, R, make_init())
    fresh.close()  # unlocked but just written: could be a store between its open and its lock
    (tmp_path / "live-hoststore").mkdir()  # no record file: not ours to judge
    old = time.time() - 3600
    for name in ("live-dead", "live-busy"):
        os.utime(tmp_path / name / "experts.bin", (old, old))

    removed = remove_stale_live_directories(tmp_path, min_age_s=60)

    assert removed == [tmp_path / "live-dead"]
    assert not (tmp_path / "live-dead").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"live-busy", "live-fresh", "live-hoststore"}
    busy.write(2, record(2.0))  # the running store is untouched
    assert same_bits(read(busy, 2), record(2.0))
    busy.close()


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_disk_store_detects_a_corrupted_byte(kind, tmp_path):
    store = build(kind, tmp_path)
    for expert_id in (1, 5, 6):
        store.write(expert_id, record(expert_id))
    flip_byte(store.path, 5 * store.stride + 17)
    with pytest.raises(
        CorruptRecordError, match=rf"expert 5: checksum mismatch in {re.escape(str(store.path))}"
    ) as info:
        read(store, 5)
    assert info.value.expert_id == 5 and info.value.path == str(store.path)
    assert re.search(r"expected xxh3 0x[0-9a-f]{16}, got 0x[0-9a-f]{16}", str(info.value))
    with pytest.raises(CorruptRecordError, match="expert 5"):
        store.read_async(5, torch.empty(R)).wait()  # worker errors surface on wait()
    assert same_bits(read(store, 6), record(6))  # neighbours are intact


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_disk_store_detects_a_truncated_file(kind, tmp_path):
    store = build(kind, tmp_path)
    store.write(2, record(2))
    store.write(9, record(9))
    os.truncate(store.path, 9 * store.stride + 10)
    with pytest.raises(CorruptRecordError, match=rf"expert 9: {re.escape(str(store.path))} is truncated"):
        read(store, 9)
    assert same_bits(read(store, 2), record(2))


def resident_pages(path: Path) -> int:
    """How many pages of the file at ``path`` are in the page cache (mincore(2) over a mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), size) as mapped:
        vector = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        del address  # the exported buffer must be released before the mapping closes
        return sum(v & 1 for v in vector)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
@pytest.mark.parametrize("kind", DISK_KINDS)
def test_direct_store_bypasses_the_page_cache(kind, tmp_path):
    """``store: direct`` leaves none of its records in the page cache (the store larger than RAM reads from the
    disk); ``store: disk`` goes through it. Records of any size round-trip at 4 KiB-aligned offsets."""
    record_numel = 1000  # 4,000 bytes: not a multiple of the 4 KiB O_DIRECT needs
    store = build(kind, tmp_path, record_numel=record_numel)
    for expert_id in range(N):
        store.write(expert_id, torch.full((record_numel,), float(expert_id)))
    for expert_id in reversed(range(N)):
        out = torch.empty(record_numel)
        store.read(expert_id, out)
        assert torch.equal(out, torch.full((record_numel,), float(expert_id))), expert_id
    store.synchronize()
    stats = store.stats()
    assert stats["file_bytes_read"] >= N * store.record_bytes and stats["read_seconds"] > 0
    assert stats["write_seconds"] > 0
    if kind == "direct":
        assert store.stride % 4096 == 0 and store.path.stat().st_size == N * store.stride
        assert resident_pages(store.path) == 0
    else:
        assert resident_pages(store.path) > 0
    store.close()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
def test_direct_store_on_a_file_system_without_o_direct_says_so(tmp_path, monkeypatch):
    import errno

    from pragnosia_pl.store import disk

    real_open = os.open

    def open_like_an_old_tmpfs(path, flags, *args):  # kernels before 6.6 refuse O_DIRECT on tmpfs with EINVAL
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(disk.os, "open", open_like_an_old_tmpfs)
    with pytest.raises(ValueError, match=r"model\.store 'direct': the file system of .* does not support O_DIRECT"):
        build("direct", tmp_path)
    build("disk", tmp_path).close()


# ---------------------------------------------------------------------------------- snapshot and restore


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_is_isolated_and_restore_returns_to_it(kind, tmp_path):
    store = build(kind, tmp_path)
    for expert_id in (1, 4, 7):
        store.write(expert_id, record(expert_id))
    snapshot = tmp_path / "snapshot"
    store.snapshot(snapshot)
    assert sorted(p.name for p in snapshot.iterdir()) == ["index.npy", "meta.json", "records.bin"]
    digest = tree_digest(snapshot)

    store.write(4, record(40.0))
    store.write(10, record(10.0))
    assert tree_digest(snapshot) == digest  # later writes cannot change the snapshot

    store.restore(snapshot)
    assert store.materialized_ids() == [1, 4, 7]  # 10 is unmaterialized again
    for expert_id in range(N):
        expected = record(expert_id) if expert_id in (1, 4, 7) else initial(expert_id)
        assert same_bits(read(store, expert_id), expected), expert_id


@pytest.mark.parametrize(("source", "target"), list(itertools.product(KINDS, KINDS)))
def test_snapshot_restores_into_any_store_kind(source, target, tmp_path):
    origin = build(source, tmp_path, name="origin")
    for expert_id in (0, 3, N - 1):
        origin.write(expert_id, record(expert_id))
    origin.snapshot(tmp_path / "snapshot")
    destination = build(target, tmp_path, name="destination")
    destination.write(5, record(55.0))
    destination.restore(tmp_path / "snapshot")
    assert destination.materialized_ids() == [0, 3, N - 1]
    assert all(same_bits(read(destination, e), read(origin, e)) for e in range(N))


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_streams_records_through_a_bounded_buffer(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "SNAPSHOT_CHUNK_BYTES", 3 * R * 4)  # 3 records per chunk
    store = build(kind, tmp_path)
    written = [0, 2, 3, 5, 8, 9, 10, 11, 14, 15]
    for expert_id in written:
        store.write(expert_id, record(expert_id))
    store.snapshot(tmp_path / "snapshot")
    assert (tmp_path / "snapshot" / "records.bin").stat().st_size == len(written) * R * 4
    copy = build("host", tmp_path, name="copy")
    copy.restore(tmp_path / "snapshot")
    assert copy.materialized_ids() == written
    assert all(same_bits(read(copy, e), read(store, e)) for e in range(N))


def test_snapshot_replaces_an_earlier_snapshot_and_leaves_no_temporaries(tmp_path):
    store = build("host", tmp_path)
    store.write(1, record(1.0))
    store.snapshot(tmp_path / "snapshot")
    store.write(2, record(2.0))
    store.snapshot(tmp_path / "snapshot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot"]
    store.write(3, record(3.0))
    store.restore(tmp_path / "snapshot")
    assert store.materialized_ids() == [1, 2]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not a snapshot")
    with pytest.raises(FileExistsError, match="is not an expert-store snapshot"):
        store.snapshot(tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "not a snapshot"


def test_restore_rejects_a_mismatched_or_missing_snapshot(tmp_path):
    build("host", tmp_path).snapshot(tmp_path / "snapshot")  # nothing materialized
    store = build("disk", tmp_path)
    store.write(3, record(3.0))
    store.restore(tmp_path / "snapshot")
    assert store.materialized_ids() == [] and same_bits(read(store, 3), initial(3))
    store.close()
    with pytest.raises(ValueError, match=rf"has num_experts={N}, this store has num_experts=8"):
        build("host", tmp_path, num_experts=8).restore(tmp_path / "snapshot")
    with pytest.raises(ValueError, match=rf"has record_numel={R}, this store has record_numel=32"):
        build("disk", tmp_path, record_numel=32).restore(tmp_path / "snapshot")
    with pytest.raises(FileNotFoundError, match="no expert-store snapshot at"):
        build("host", tmp_path).restore(tmp_path / "missing")


@pytest.mark.parametrize("kind", KINDS)
def test_restore_detects_a_corrupted_snapshot_and_leaves_the_store_unchanged(kind, tmp_path):
    source = build("host", tmp_path, name="source")
    for expert_id in (2, 4, 7):
        source.write(expert_id, record(expert_id))
    snapshot = tmp_path / "snapshot"
    source.snapshot(snapshot)
    records_bin = snapshot / "records.bin"
    flip_byte(records_bin, 1 * R * 4 + 3)  # the second record: expert 4

    store = build(kind, tmp_path)
    store.write(9, record(9.0))
    with pytest.raises(CorruptRecordError, match=rf"expert 4: checksum mismatch in {re.escape(str(records_bin))}"):
        store.restore(snapshot)
    assert store.materialized_ids() == [9]
    assert same_bits(read(store, 9), record(9.0)) and same_bits(read(store, 4), initial(4))


def test_restore_detects_a_truncated_records_file(tmp_path):
    source = build("disk", tmp_path)
    for expert_id in (2, 4, 7):
        source.write(expert_id, record(expert_id))
    source.snapshot(tmp_path / "snapshot")
    records_bin = tmp_path / "snapshot" / "records.bin"
    os.truncate(records_bin, 3 * R * 4 - 1)
    with pytest.raises(CorruptRecordError, match=rf"{re.escape(str(records_bin))} is truncated") as info:
        build("host", tmp_path, name="target").restore(tmp_path / "snapshot")
    assert info.value.expert_id == 7 and "record of expert 7 is incomplete" in str(info.value)


# ------------------------------------------------------------------------------------------- expert cache


def test_cache_hits_cost_no_transfer_and_slots_are_fixed(tmp_path):
    store = build("host", tmp_path)
    cache = ExpertCache(store, 2, "cpu")
    base, end = cache.slots.data_ptr(), cache.slots.data_ptr() + cache.slots.numel() * 4
    first = cache.load(0)
    assert base <= first.data_ptr() < end and first.shape == (R,)
    assert same_bits(first, initial(0))
    reads = store.stats()["reads"]
    assert cache.load(0).data_ptr() == first.data_ptr()
    assert store.stats()["reads"] == reads  # a hit reads nothing
    cache.load(1)
    cache.load(2)  # evicts 0, the least recently used
    assert cache.resident_ids() == [1, 2]
    assert cache.slots.data_ptr() == base
    stats = cache.stats()
    assert (stats["loads"], stats["hits"], stats["misses"], stats["evictions"]) == (4, 1, 3, 1)
    assert stats["bytes_in"] == 3 * R * 4 and stats["resident"] == 2 and stats["writebacks"] == 0
    assert store.materialized_ids() == []  # nothing was dirty, nothing written


@pytest.mark.parametrize("kind", KINDS)
def test_prefetch_never_evicts_the_current_expert(kind, tmp_path):
    store = build(kind, tmp_path)
    cache = ExpertCache(store, 2, "cpu")
    cache.load(0)
    cache.load(1)
    cache.prefetch(2)  # evicts 0, not 1 (the current expert)
    assert cache.resident_ids() == [1, 2]
    cache.prefetch(3)  # only 1 (current) and 2 (in flight) could go: no-op
    assert cache.resident_ids() == [1, 2]
    bytes_in = cache.stats()["bytes_in"]
    assert same_bits(cache.load(2), initial(2))
    stats = cache.stats()
    assert stats["bytes_in"] == bytes_in and stats["hits"] == 1 and stats["prefetches"] == 1

    single = ExpertCache(store, 1, "cpu")
    single.load(0)
    single.prefetch(1)
    assert single.resident_ids() == [0]


@pytest.mark.parametrize("kind", KINDS)
def test_dirty_experts_are_written_back_on_eviction_and_flush(kind, tmp_path):
    store = build(kind, tmp_path)
    cache = ExpertCache(store, 2, "cpu")
    cache.load(0).copy_(record(100.0))
    cache.mark_dirty(0)
    cache.load(1)
    cache.prefetch(2)  # evicts dirty 0 while 1 is current: write-back, then the read into its slot
    assert same_bits(read(store, 0), record(100.0))
    assert same_bits(cache.load(2), initial(2))
    cache.load(2).copy_(record(200.0))
    cache.mark_dirty(2)
    cache.flush()
    assert same_bits(read(store, 2), record(200.0))
    assert cache.resident_ids() == [1, 2] and cache.dirty_ids() == []
    cache.flush()
    assert cache.stats()["writebacks"] == 2 and cache.stats()["bytes_out"] == 2 * R * 4
    assert store.materialized_ids() == [0, 2]


def run_random_operations(store: ExpertStore, device: str, steps: int = 300, capacity: int = 3) -> None:
    """Random load / modify / prefetch / flush, whole or of the parameters only, against a reference model of what
    each expert holds."""
    rng = random.Random(0)
    cache = ExpertCache(store, capacity, device)
    slots_ptr = cache.slots.data_ptr()
    latest = {e: initial(e, store.record_numel) for e in range(store.num_experts)}  # the expert's true record
    modified: set[int] = set()
    current = None
    P = store.params_numel
    for step in range(steps):
        action = rng.choice(["load", "load", "params", "modify", "prefetch", "prefetch", "prefetch params", "flush"])
        expert_id = rng.randrange(store.num_experts)
        if action == "load":
            current = expert_id
            assert same_bits(cache.load(expert_id), latest[expert_id]), (step, expert_id)
        elif action == "params":
            current = expert_id
            assert same_bits(cache.load(expert_id, params_only=True)[:P], latest[expert_id][:P]), (step, expert_id)
        elif action == "prefetch params":
            cache.prefetch(expert_id, params_only=True)
        elif action == "modify" and current is not None:
            slot = cache.load(current)
            slot.add_(torch.randn(store.record_numel, generator=torch.Generator().manual_seed(step)).to(device))
            cache.mark_dirty(current)
            latest[current] = slot.cpu().clone()
            modified.add(current)
        elif action == "prefetch":
            cache.prefetch(expert_id)
        elif action == "flush":
            cache.flush()
        assert len(cache.resident_ids()) <= capacity  # DESIGN §4.1
        assert cache.slots.data_ptr() == slots_ptr
        if step % 25 == 0:  # DESIGN §4.2: the store holds the latest record of every expert not dirty
            for e in set(range(store.num_experts)) - set(cache.dirty_ids()):
                assert same_bits(read(store, e), latest[e]), (step, e)
    cache.flush()
    assert set(store.materialized_ids()) <= modified
    for e in range(store.num_experts):
        assert same_bits(read(store, e), latest[e]), e
        if e not in modified:
            assert not store.materialized(e)
    stats = cache.stats()
    assert stats["writebacks"] >= len(modified) and stats["evictions"] > 0 and stats["hits"] > 0
    if P < store.record_numel:
        assert stats["state_loads"] > 0  # a resident's parameters completed by its state


@pytest.mark.parametrize("kind", KINDS)
def test_cache_keeps_the_store_exact_under_random_operations(kind, tmp_path):
    run_random_operations(build(kind, tmp_path, num_experts=12, record_numel=32, params_numel=11), "cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_a_part_read_moves_that_part_only(kind, tmp_path):
    """Parameters and state read alone land at their places, the rest of the buffer untouched; the store counts the
    part's bytes, and the direct store's file reads whole 4 KiB blocks of that part only."""
    record_numel, params_numel = 3000, 1100  # 4,400 bytes of parameters, 7,600 of state: neither block-aligned
    store = build(kind, tmp_path, record_numel=record_numel, params_numel=params_numel)
    full = torch.randn(record_numel)
    store.write(4, full)
    store.synchronize()
    before = store.stats()
    out = torch.full((record_numel,), float("nan"))
    store.read(4, out, "params")
    assert same_bits(out[:params_numel], full[:params_numel]) and out[params_numel:].isnan().all()
    out = torch.full((record_numel,), float("nan"))
    store.read(4, out, "state")
    assert same_bits(out[params_numel:], full[params_numel:]) and out[:params_numel].isnan().all()
    store.synchronize()
    after = store.stats()
    assert after["bytes_read"] - before["bytes_read"] == record_numel * 4
    if kind == "direct":
        blocks = (-(-params_numel * 4 // 4096) + -(-(record_numel - params_numel) * 4 // 4096)) * 4096
        assert after["file_bytes_read"] - before["file_bytes_read"] == blocks == 16384
    with pytest.raises(ValueError, match=r"part \('optimizer'\) must be one of: record, params, state"):
        store.read(4, out, "optimizer")


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_each_part_has_its_own_checksum(kind, tmp_path):
    record_numel, params_numel = 3000, 1100
    store = build(kind, tmp_path, record_numel=record_numel, params_numel=params_numel)
    full = torch.randn(record_numel)
    store.write(2, full)
    flip_byte(store.path, 2 * store.stride + store.state_offset + 8)  # inside the state
    out = torch.empty(record_numel)
    store.read(2, out, "params")  # its own checksum holds
    assert same_bits(out[:params_numel], full[:params_numel])
    with pytest.raises(CorruptRecordError, match=r"expert 2: checksum mismatch .* \(its optimizer state: expected"):
        store.read(2, out, "state")
    with pytest.raises(CorruptRecordError, match=r"expert 2: checksum mismatch .* \(its optimizer state"):
        store.read(2, out)
    store.write(2, full)
    flip_byte(store.path, 2 * store.stride + 8)  # inside the parameters
    with pytest.raises(CorruptRecordError, match=r"expert 2: checksum mismatch .* \(its parameters: expected"):
        store.read(2, out, "params")
    store.read(2, out, "state")


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
@pytest.mark.parametrize("kind", DISK_KINDS)
@pytest.mark.parametrize("part", ["record", "params", "state"])
def test_a_short_read_is_retried_from_an_aligned_offset(kind, part, tmp_path, monkeypatch):
    """The first read of a record returns 5,000 bytes, mid-block: the retry must read on (``direct``: from the
    block boundary at 4,096, with a 4 KiB-aligned length and buffer, or O_DIRECT fails with EINVAL)."""
    record_numel, params_numel = 6000, 2200  # 8,800 bytes of parameters: a part of three blocks
    store = build(kind, tmp_path, record_numel=record_numel, params_numel=params_numel)
    full = torch.randn(record_numel)
    store.write(3, full)
    store.synchronize()
    real_preadv, calls = os.preadv, []

    def short_once(fd, buffers, offset, *args):
        calls.append((offset, len(buffers[0])))
        if len(calls) == 1:
            real_preadv(fd, [buffers[0][:8192]], offset, *args)
            return 5000  # as if the rest had not arrived yet
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", short_once)
    out = torch.empty(record_numel)
    store.read(3, out, part)
    monkeypatch.undo()
    first, end = store.part_bounds[part]
    assert same_bits(out[first:end], full[first:end])
    assert len(calls) == 2
    (offset, length), (retry_offset, retry_length) = calls
    if kind == "direct":
        assert retry_offset == offset + 4096 and retry_length == length - 4096
        assert retry_offset % 4096 == 0 and retry_length % 4096 == 0
    else:
        assert retry_offset == offset + 5000 and retry_length == length - 5000


def eio(fd, buffers, offset, *args):
    raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_cache_invalidate_raises_a_write_back_that_failed(kind, tmp_path, monkeypatch):
    """A write-back queued before a restore and failed on the store's worker is raised by ``invalidate()``, not
    dropped with its handle."""
    store = build(kind, tmp_path)
    cache = ExpertCache(store, 1, "cpu")
    cache.load(0).copy_(record(5.0))
    cache.mark_dirty(0)
    monkeypatch.setattr(os, "pwritev", eio)
    cache.load(1)  # evicts 0: its write-back is queued, and fails, before the read of 1 (the worker's order)
    monkeypatch.undo()
    with pytest.raises(OSError, match=r"expert 0: cannot write its record to .*experts\.bin.*Input/output error"):
        cache.invalidate()
    assert cache.resident_ids() == [] and cache.dirty_ids() == []
    cache.invalidate()  # raised once: nothing is left pending
    assert same_bits(cache.load(0), initial(0))  # the failed write never counted


def test_host_tier_keeps_the_most_written_records_within_its_budget_and_writes_them_back(tmp_path):
    """A tier of 6 records: the first 6 written enter; a record written no more often than every one in the tier goes
    to the file; one written more often evicts the least often written (then least recently used), which is written
    to the file; a snapshot writes every dirty record to the file first."""
    store = build("direct+tier", tmp_path)
    backing = store.backing
    for expert_id in range(8):
        store.write(expert_id, record(expert_id))
    stats = store.stats()
    assert stats["tier_records"] == 6 and stats["tier_bytes_allocated"] == 6 * store.record_bytes <= 6 * R * 4
    assert stats["tier_write_arounds"] == 2 and stats["tier_evictions"] == 0
    assert backing.materialized_ids() == [6, 7] and same_bits(read(backing, 7), record(7))
    store.write(3, record(30.0))  # in the tier: stays there, dirty
    store.write(7, record(70.0))  # written twice, more than 0 (the least recent of those written once): 0 leaves
    assert backing.materialized_ids() == [0, 6, 7] and same_bits(read(backing, 0), record(0))
    assert store.stats()["tier_evictions"] == 1
    before = backing.stats()["reads"]
    expected = {1: record(1), 2: record(2), 3: record(30.0), 4: record(4), 5: record(5), 7: record(70.0)}
    assert all(same_bits(read(store, e), value) for e, value in expected.items())  # hits: the file is not read
    assert backing.stats()["reads"] == before and store.stats()["tier_hits"] == 6
    assert same_bits(read(store, 0), record(0)) and backing.stats()["reads"] == before + 1  # a miss
    assert not same_bits(read(backing, 3), record(30.0))  # dirty in the tier only
    store.snapshot(tmp_path / "snapshot")
    assert store.stats()["tier_dirty"] == 0 and backing.materialized_ids() == list(range(8))
    assert all(same_bits(read(backing, e), value) for e, value in expected.items())  # the file holds them now


def test_a_host_tier_smaller_than_a_record_is_refused_and_its_disk_store_closed(tmp_path, monkeypatch):
    closed, close = [], DiskStore.close
    monkeypatch.setattr(DiskStore, "close", lambda store: closed.append(store.path) or close(store))
    with pytest.raises(ValueError, match=r"model.host_tier_bytes \(100\) must hold at least one record \(256 bytes\)"):
        make_store(
            "direct", num_experts=N, record_numel=R, init_record=make_init(), directory=tmp_path, host_tier_bytes=100
        )
    assert closed == [tmp_path / "experts.bin"]  # not left open, its file locked, until garbage collection
    with pytest.raises(
        ValueError, match=r"model.host_tier_bytes \(4096\) needs model.store disk or direct, not 'host'"
    ):
        make_store("host", num_experts=N, record_numel=R, init_record=make_init(), host_tier_bytes=4096)


def test_host_tier_raises_a_failed_eviction_before_a_snapshot_or_restore(tmp_path, monkeypatch):
    store = build("direct+tier", tmp_path)  # 6 records
    for expert_id in range(6):
        store.write(expert_id, record(expert_id))
    store.snapshot(tmp_path / "snapshot")
    for expert_id in range(6):
        store.write_async(expert_id, record(-expert_id))  # dirty again, written twice, 0 the least recently used
    for _ in range(2):
        store.write_async(6, record(6.0)).wait()  # written as often as those in the tier: to the file directly
    monkeypatch.setattr(os, "pwritev", eio)
    store.write_async(6, record(6.0))  # more often now: evicts 0, whose write fails on the worker
    store.backing.synchronize()
    monkeypatch.undo()
    with pytest.raises(OSError, match=r"expert 0: cannot write its record"):
        store.restore(tmp_path / "snapshot")
    store.restore(tmp_path / "snapshot")  # raised once; now restored
    assert [same_bits(read(store, e), record(e)) for e in range(6)] == [True] * 6
    assert same_bits(read(store, 6), initial(6)) and store.materialized_ids() == list(range(6))


@pytest.mark.parametrize("kind", KINDS)
def test_cache_invalidate_after_restore(kind, tmp_path):
    store = build(kind, tmp_path)
    cache = ExpertCache(store, 2, "cpu")
    cache.load(0).copy_(record(1.0))
    cache.mark_dirty(0)
    cache.flush()
    store.snapshot(tmp_path / "snapshot")
    cache.load(0).copy_(record(2.0))
    cache.mark_dirty(0)
    cache.flush()
    cache.load(1).copy_(record(3.0))
    cache.mark_dirty(1)  # never flushed: restore discards it
    store.restore(tmp_path / "snapshot")
    cache.invalidate()
    assert cache.resident_ids() == [] and cache.dirty_ids() == []
    assert same_bits(cache.load(0), record(1.0))
    assert same_bits(cache.load(1), initial(1))
    cache.flush()
    assert store.materialized_ids() == [0]


def test_cache_load_of_a_corrupt_record_leaves_the_cache_usable(tmp_path):
    store = build("disk", tmp_path)
    store.write(3, record(3.0))
    flip_byte(store.path, 3 * store.record_bytes)
    cache = ExpertCache(store, 2, "cpu")
    with pytest.raises(CorruptRecordError, match="expert 3"):
        cache.load(3)
    assert cache.resident_ids() == []
    assert same_bits(cache.load(0), initial(0)) and same_bits(cache.load(1), initial(1))


# ------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_round_trip_and_async_order(kind, tmp_path):
    store = make_store(
        kind, num_experts=N, record_numel=R, init_record=make_init(), device="cuda", directory=tmp_path / "store"
    )
    if kind == "host":
        assert store.pin_memory
    slot = record(1.0).cuda()
    pending = [store.write_async(3, slot), store.read_async(5, slot)]
    for handle in pending:
        handle.wait()
    assert same_bits(slot, initial(5))
    assert same_bits(read(store, 3), record(1.0))
    into = torch.empty(R, device="cuda")
    store.read(3, into)
    assert same_bits(into, record(1.0))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_cache_keeps_the_store_exact_under_random_operations(kind, tmp_path):
    store = make_store(
        kind, num_experts=12, record_numel=32, init_record=make_init(), device="cuda", directory=tmp_path / "store"
    )
    run_random_operations(store, "cuda")


def peak_rss_growth(action) -> int:
    """Bytes the process's resident set rose above its level before ``action()`` at its peak during it."""

    def status(key: str) -> int:
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    action()
    return status("VmHWM") - before


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_snapshot_and_restore_hold_a_few_records_not_every_materialized_one(tmp_path):
    # Catches a snapshot buffer sized by the materialized experts (it was up to 64 MiB): the checkpoint's peak
    # RSS then grows with the experts a run touched (DESIGN §4.5).
    record_numel = 1 << 18  # 1 MiB records, 64 of them materialized: 64 MiB on disk
    store = DiskStore(tmp_path / "experts.bin", 10**6, record_numel, make_init())
    for expert_id in range(0, 64_000, 1000):
        store.write(expert_id, torch.full((record_numel,), float(expert_id)))
    assert peak_rss_growth(lambda: store.snapshot(tmp_path / "snapshot")) < 16 << 20
    copy = DiskStore(tmp_path / "copy.bin", 10**6, record_numel, make_init())
    assert peak_rss_growth(lambda: copy.restore(tmp_path / "snapshot")) < 16 << 20
    assert copy.materialized_ids() == list(range(0, 64_000, 1000))
    assert same_bits(read(copy, 63_000), torch.full((record_numel,), 63_000.0))
    store.close()
    copy.close()
