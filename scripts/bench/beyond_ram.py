"""Beyond RAM: train a store holding more expert state than the machine's RAM, reading it from the disk (issue 16).

The run, in this process (its whole-process peak RSS is the figure):

1. **The disk's own speed**, on the same file system and in the same session, before and after the run (a virtual
   disk's speed varies): a scratch file of ``probe_bytes`` written and then read back sequentially with
   ``O_DIRECT`` in 8 MiB requests (what ``dd iflag=direct bs=8M`` does), so neither figure comes from the page
   cache. The store's read speed is compared with the faster of the two probes.
2. **The store.** ``PragnosiaLM`` with wide experts (``d → expert_hidden → d``) and Adam: one record holds an
   expert's parameters, both Adam moments and its step counter. ``store: direct`` (``O_DIRECT``: no record is
   ever served from, or left in, the page cache). Every record is written once before training (each expert's
   seed-derived initial record), so the file holds ``num_experts × record`` bytes from the first step.
3. **Training**, ``exact`` (two store reads per touched expert: the same update as global backpropagation), each
   token its own top-k of all n, ``expert_cache`` device slots; validation on a fixed set before and after.

Reported (``beyond_ram.json``; ``README.md`` is written from it): store size; per-step and whole-process peak RSS;
tokens/s; MB/s read and written by the store, over the time its worker spent in the system calls and over the
training time; the disk's own sequential speeds; validation bpb before and after, and the training loss.
The store's folder is deleted at the end (``keep_store=False``), and the free space before and after is recorded.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.recipes import step_recorder, text_domains

SCRIPTS = Path(__file__).resolve().parents[1]
PROBE_CHUNK = 8 * 2**20
DEFAULT_MALLOC = "default_malloc"  # the sub-folder of a run with glibc's default (dynamic) mmap threshold


@dataclass
class BeyondRamConfig:
    """One beyond-RAM run.

    Args:
        num_experts, expert_hidden: the store's size: n records of a ``d_model → expert_hidden → d_model`` expert
            with its Adam state (default 2,816 × 12.6 MB = 35.6 GB = 33.1 GiB).
        d_model, n_shared_layers, n_heads, num_active_experts: the trunk and the routing (k).
        objective, expert_cache, lr: the recipe (``exact``, 8 slots, Adam at the shared lr).
        steps, batch_size, block_size: training (``batch_size × block_size`` bytes a step).
        limit_val_batches: validation batches (the first ones of the held-out files), before and after training.
        domains, max_bytes_per_domain: the data (``TextDomains``).
        store_dir: where the store (and the disk probe) go; default ``<out>/store``. Deleted afterwards.
        probe_bytes: size of the disk-speed probe file.
        threads: torch CPU threads.
    """

    num_experts: int = 2816
    expert_hidden: int = 4096
    d_model: int = 128
    n_shared_layers: int = 2
    n_heads: int = 4
    num_active_experts: int = 2
    objective: str = "exact"
    expert_cache: int = 8
    lr: float = 1e-3
    steps: int = 60
    batch_size: int = 16
    block_size: int = 128
    limit_val_batches: int = 2
    domains: dict[str, str] = field(default_factory=lambda: {"code": "python-code"})
    max_bytes_per_domain: int | None = 16_000_000
    store_dir: str | None = None
    probe_bytes: int = 8 * 2**30
    threads: int = 1
    seed: int = 0
    cache_dir: str | None = None
    keep_store: bool = False

    def __post_init__(self) -> None:
        for key in ("num_experts", "expert_hidden", "steps", "batch_size", "block_size", "probe_bytes", "threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} ({getattr(self, key)}) must be ≥ 1")

    @classmethod
    def quick(cls, **changes: Any) -> BeyondRamConfig:
        """Seconds: 64 experts of width 64 on a tiny trunk, a 16 MiB probe, 3 steps (what the test runs)."""
        options: dict[str, Any] = dict(
            num_experts=64,
            expert_hidden=64,
            d_model=16,
            n_shared_layers=1,
            n_heads=2,
            steps=3,
            batch_size=2,
            block_size=32,
            limit_val_batches=1,
            domains={"prose": "stdlib-docs"},
            max_bytes_per_domain=60_000,
            probe_bytes=16 * 2**20,
        )
        return cls(**{**options, **changes})


def disk_speed(directory: Path, size: int) -> dict[str, float]:
    """Sequential write and read speed (bytes/s) of the file system at ``directory``, with ``O_DIRECT`` and
    8 MiB requests, on a scratch file of ``size`` bytes (removed afterwards)."""
    path = directory / "disk-probe.bin"
    chunk = min(PROBE_CHUNK, size)
    size = size // chunk * chunk
    buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(chunk))
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        start = time.perf_counter()
        for offset in range(0, size, chunk):
            os.pwrite(fd, view, offset)
        os.fdatasync(fd)
        write = size / (time.perf_counter() - start)
        start = time.perf_counter()
        for offset in range(0, size, chunk):
            os.preadv(fd, [view], offset)
        read = size / (time.perf_counter() - start)
    finally:
        os.close(fd)
        view.release()
        buffer.close()
        path.unlink(missing_ok=True)
    return {
        "probe_bytes": float(size),
        "request_bytes": float(chunk),
        "write_bytes_per_s": write,
        "read_bytes_per_s": read,
    }


def build_model(config: BeyondRamConfig, store_dir: Path):
    from pragnosia_pl import PragnosiaLM

    return PragnosiaLM(
        d_model=config.d_model,
        n_shared_layers=config.n_shared_layers,
        n_heads=config.n_heads,
        num_experts=config.num_experts,
        num_active_experts=config.num_active_experts,
        objective=config.objective,
        expert_cache=config.expert_cache,
        expert_hidden=config.expert_hidden,
        store="direct",
        store_dir=str(store_dir),
        expert_optimizer="adam",
        local_lr=config.lr,
        lr=config.lr,
        seed=config.seed,
    )


def fill_store(store, log=print) -> dict[str, float]:
    """Writes every expert's initial record, so the whole store is on the disk before training. The next record
    is generated while the store's worker writes the previous one (two buffers)."""
    import torch
    from tqdm.auto import tqdm

    buffers = [torch.empty(store.record_numel), torch.empty(store.record_numel)]
    pending = [None, None]
    start = time.perf_counter()
    for expert_id in tqdm(range(store.num_experts), desc="writing the store", unit="expert", mininterval=5):
        slot = expert_id % 2
        if pending[slot] is not None:
            pending[slot].wait()
        buffers[slot].zero_()
        store.init_record(expert_id, buffers[slot])
        pending[slot] = store.write_async(expert_id, buffers[slot])
    store.synchronize()
    seconds = time.perf_counter() - start
    log(f"beyond_ram: wrote {store.num_experts} records in {seconds:.0f} s")
    return {"seconds": seconds, "bytes": float(store.num_experts * store.record_bytes)}


def _store_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    keys = ("reads", "writes", "lazy_reads", "file_bytes_read", "bytes_written", "read_seconds", "write_seconds")
    return {key: after[key] - before[key] for key in keys}


def run(config: BeyondRamConfig, out: Path, command: str = "", log=print) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); writes ``out/beyond_ram.json`` and ``out/README.md``."""
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from callbacks import MemoryMonitor, process_peak_rss

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    store_dir = Path(config.store_dir) if config.store_dir else out / "store"
    store_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        **report.report_header("beyond_ram", time.time(), config),
        "command": command,
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "free_disk_bytes_before": shutil.disk_usage(store_dir).free,
        "load_average_before": os.getloadavg(),  # other jobs on the machine: the timings are shared with them
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # None: glibc's dynamic default
    }
    log(f"beyond_ram: measuring the disk ({config.probe_bytes / 2**30:.1f} GiB, O_DIRECT, 8 MiB requests)")
    disk_before = disk_speed(store_dir, config.probe_bytes)
    log(f"beyond_ram: disk {json.dumps(disk_before)}")

    seed_everything(config.seed, verbose=False)
    data = text_domains(config)
    model = build_model(config, store_dir)
    store = model.store
    result["store"] = {
        "num_experts": store.num_experts,
        "record_bytes": store.record_bytes,
        "bytes": store.num_experts * store.record_bytes,
        "expert_params": model.layout.num_params,
        "path": str(store.path),
    }
    result["fill"] = fill_store(store, log)
    result["store"]["file_bytes_allocated"] = store.stats()["file_bytes_allocated"]
    result["page_cache_dropped"] = _drop_page_cache()

    tokens_per_step = config.batch_size * config.block_size
    monitor, recorder = MemoryMonitor(), step_recorder(tokens_per_step)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=config.steps,
        default_root_dir=str(out / "lightning"),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=config.limit_val_batches,
        val_check_interval=config.steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=1,
        callbacks=[monitor, recorder],
    )
    start = time.perf_counter()
    trainer.validate(model, datamodule=data, verbose=False)
    validation_before = time.perf_counter() - start
    stats_before = store.stats()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    store.synchronize()
    io = _store_delta(store.stats(), stats_before)
    train_seconds = sum(recorder.step_seconds)
    tokens = len(recorder.step_seconds) * tokens_per_step
    updates = [0.0] + [row["expert_updates"] for row in monitor.history]
    result["training"] = {
        "steps": trainer.global_step,
        "tokens": tokens,
        "tokens_per_s": tokens / train_seconds,
        "step_seconds": recorder.step_seconds,
        "step_seconds_median": statistics.median(recorder.step_seconds),
        "train_loss": recorder.loss,
        "touched_by_step": [b - a for a, b in zip(updates, updates[1:])],
        "experts_used": len(model.usage),
        "peak_rss_per_step_bytes": [row["peak_rss_bytes"] for row in monitor.history],
        "fit_seconds": fit_seconds,
        "validation_seconds_before": validation_before,
        "store_io": io,
        # over the time the store's worker spent in pread/pwrite, and over the training steps' wall time
        "read_bytes_per_s_in_io": io["file_bytes_read"] / io["read_seconds"] if io["read_seconds"] else 0.0,
        "write_bytes_per_s_in_io": io["bytes_written"] / io["write_seconds"] if io["write_seconds"] else 0.0,
        "read_bytes_per_s_of_training": io["file_bytes_read"] / train_seconds,
        "write_bytes_per_s_of_training": io["bytes_written"] / train_seconds,
    }
    result["validation"] = recorder.curve  # step 0 (before training) and the last step
    model.experts().flush()
    store.close()
    # the virtual disk's speed varies from minute to minute: probe it again, and compare with the faster probe
    disk_after = disk_speed(store_dir, config.probe_bytes)
    log(f"beyond_ram: disk again {json.dumps(disk_after)}")
    result["disk"] = {
        **max(disk_before, disk_after, key=lambda d: d["read_bytes_per_s"]),
        "probes": [disk_before, disk_after],
    }
    result["load_average_after"] = os.getloadavg()
    # MemoryMonitor's per-step resets also reset the kernel's process peak (getrusage): process_peak_rss keeps it
    result["whole_process_peak_rss_bytes"] = process_peak_rss()
    if not config.keep_store:
        shutil.rmtree(store_dir, ignore_errors=True)
        shutil.rmtree(out / "lightning", ignore_errors=True)
    result["store_deleted"] = not store_dir.exists()
    result["free_disk_bytes_after"] = shutil.disk_usage(out).free
    result["wall_seconds"] = time.perf_counter() - started
    (out / "beyond_ram.json").write_text(json.dumps(result, indent=2) + "\n")
    write_page(out)
    return result


def write_page(out: Path) -> None:
    """``out/README.md`` from ``out/beyond_ram.json`` (and the run with glibc's default allocator settings in
    ``out/default_malloc/``, when there is one)."""
    result = json.loads((out / "beyond_ram.json").read_text())
    other = out / DEFAULT_MALLOC / "beyond_ram.json"
    compare = json.loads(other.read_text()) if other.is_file() and result.get("malloc_mmap_threshold") else None
    (out / "README.md").write_text(render(result, compare))


def _drop_page_cache() -> bool:
    """Drops the whole page cache where allowed (root on Linux); the direct store does not use it anyway."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _loads(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _gb(value: float) -> str:
    return f"{value / 1e9:.1f} GB ({value / 2**30:.1f} GiB)"


def _mbs(value: float) -> str:
    return f"{value / 1e6:,.0f} MB/s"


def _allocator(result: dict[str, Any]) -> str:
    threshold = result.get("malloc_mmap_threshold")
    if threshold is None:
        return "glibc's default allocator settings (its mmap threshold rises to 32 MiB as buffers are freed)"
    return f"glibc's mmap threshold fixed at {int(threshold) / 2**20:g} MiB (`MALLOC_MMAP_THRESHOLD_={threshold}`)"


def render(result: dict[str, Any], compare: dict[str, Any] | None = None) -> str:
    """``README.md`` from ``beyond_ram.json`` (and ``compare``, the same run with glibc's default allocator
    settings): every number below comes from them."""
    config, store, disk, train = result["config"], result["store"], result["disk"], result["training"]
    io = train["store_io"]
    rss = train["peak_rss_per_step_bytes"]
    before, after = result["validation"][0]["val/bpb"], result["validation"][-1]["val/bpb"]
    read_share = train["read_bytes_per_s_in_io"] / disk["read_bytes_per_s"]
    losses = train["train_loss"]
    tenth = max(1, len(losses) // 10)
    lines = [
        "# Beyond RAM: a store larger than the machine's memory, trained from the disk (issue 16)",
        "",
        "Written by `scripts/bench_beyond_ram.py` from `beyond_ram.json`; do not edit by hand.",
        "",
        f"- Command: `{result['command']}`",
        f"- Machine: {result['machine']}, {result['ram_bytes'] / 2**30:.1f} GiB RAM; run {result['date']}; load "
        f"average (1, 5, 15 min) {_loads(result['load_average_before'])} at the start, "
        f"{_loads(result['load_average_after'])} at the end (other jobs shared the CPU: timings are not alone); "
        f"{_allocator(result)}",
        f"- Model: d = {config['d_model']}, {config['n_shared_layers']} trunk layers, "
        f"k = {config['num_active_experts']}, "
        f"`{config['objective']}`, {config['expert_cache']} device slots, `store: direct` (O_DIRECT); experts "
        f"{config['d_model']} → {config['expert_hidden']} → {config['d_model']} with Adam "
        f"({store['expert_params']:,} parameters, a record of {store['record_bytes'] / 1e6:.1f} MB).",
        f"- Training: {train['steps']} steps × {config['batch_size']} × {config['block_size']} bytes, each token its "
        f"top-{config['num_active_experts']} of all {store['num_experts']:,} experts.",
        "",
        *report.markdown_table(
            ["What", "Measured"],
            [
                [
                    "Store (expert state on disk)",
                    f"{store['num_experts']:,} records × {store['record_bytes'] / 1e6:.1f} MB = "
                    f"{_gb(store['bytes'])}; {_gb(store['file_bytes_allocated'])} allocated on disk",
                ],
                ["Machine RAM", _gb(result["ram_bytes"])],
                [
                    "Writing the store before training",
                    f"{result['fill']['seconds']:.0f} s ({_mbs(result['fill']['bytes'] / result['fill']['seconds'])})",
                ],
                ["Whole-process peak RSS", f"{result['whole_process_peak_rss_bytes'] / 2**20:,.0f} MiB"],
                [
                    "Per-step peak RSS, median / max",
                    f"{statistics.median(rss) / 2**20:,.0f} / {max(rss) / 2**20:,.0f} MiB",
                ],
                [
                    "Tokens/s (training steps)",
                    f"{train['tokens_per_s']:,.0f} ({train['step_seconds_median']:.1f} s per step, median)",
                ],
                ["Touched experts per step, median", f"{statistics.median(train['touched_by_step']):.0f}"],
                ["Distinct experts trained", f"{train['experts_used']:,} of {store['num_experts']:,}"],
                ["Store reads / writes", f"{io['reads']:,.0f} / {io['writes']:,.0f} ({io['lazy_reads']:,.0f} lazy)"],
                [
                    "Read from the disk",
                    f"{_gb(io['file_bytes_read'])}: {_mbs(train['read_bytes_per_s_in_io'])} while "
                    f"reading, {_mbs(train['read_bytes_per_s_of_training'])} over the training time",
                ],
                [
                    "Written",
                    f"{_gb(io['bytes_written'])}: {_mbs(train['write_bytes_per_s_in_io'])} while writing, "
                    f"{_mbs(train['write_bytes_per_s_of_training'])} over the training time",
                ],
                [
                    "The disk's own sequential speed (O_DIRECT, 8 MiB requests, "
                    f"{disk['probe_bytes'] / 2**30:.0f} GiB), before / after the run",
                    " / ".join(
                        f"read {_mbs(p['read_bytes_per_s'])}, write {_mbs(p['write_bytes_per_s'])}"
                        for p in disk["probes"]
                    ),
                ],
                ["Store reads while reading ÷ the disk's sequential read (the faster probe)", f"{read_share:.2f}"],
                ["Validation bpb, before → after training", f"{before:.3f} → {after:.3f}"],
                [
                    f"Training loss, mean of the first → last {tenth} steps",
                    f"{statistics.fmean(losses[:tenth]):.3f} → {statistics.fmean(losses[-tenth:]):.3f}",
                ],
                ["Page cache dropped before training", "yes" if result["page_cache_dropped"] else "no (not root)"],
                ["Store deleted afterwards", "yes" if result["store_deleted"] else "no"],
                [
                    "Free disk before → after",
                    f"{_gb(result['free_disk_bytes_before'])} → {_gb(result['free_disk_bytes_after'])}",
                ],
                ["Wall time", f"{result['wall_seconds'] / 60:.1f} min"],
            ],
            align="lr",
        ),
        "",
        '"While reading" divides the bytes read from the file by the seconds the store\'s worker thread spent in the '
        'read system calls; "over the training time" divides them by the training steps\' wall time, which also holds '
        "the writes (the same worker thread, in issue order), the trunk and the expert computations.",
        "",
    ]
    if compare is not None:
        peaks = compare["training"]["peak_rss_per_step_bytes"]
        lines += [
            f"**The allocator.** The same run with {_allocator(compare)} ([page]({DEFAULT_MALLOC}/README.md), "
            f"{compare['date']}): whole-process peak RSS {compare['whole_process_peak_rss_bytes'] / 2**20:,.0f} MiB, "
            f"and the per-step peak climbs from {peaks[0] / 2**20:,.0f} MiB at the first step to "
            f"{peaks[-1] / 2**20:,.0f} MiB at step {len(peaks)}: the experts' activations are freed buffers of "
            "1-32 MiB that glibc then keeps in its heap. With the threshold fixed they go back to the system when "
            f"freed, and the per-step peak stays at {statistics.median(rss) / 2**20:,.0f} MiB (median; max "
            f"{max(rss) / 2**20:,.0f}). The benchmark fixes it unless run with `--default-malloc`; for wide experts "
            "on CPU, set `MALLOC_MMAP_THRESHOLD_=1048576` in your own runs too.",
            "",
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the store-bound step (issue 25)


@dataclass
class StoreBoundConfig:
    """The store-bound step of issue 25: an ``exact`` model whose every step touches most of its experts, trained on
    each store of ``stores`` in turn in one process, on the same random bytes.

    Args:
        num_experts, expert_hidden, d_model, n_shared_layers, n_heads, num_active_experts: n = 256 experts
            128 → 4,096 → 128 with Adam (a record of 12.6 MB; 3.2 GB in all).
        expert_cache, lr: 8 device slots, Adam at the shared lr.
        stores: ``host``, ``direct``, or ``direct+tier`` (``direct`` behind a host tier of ``host_tier_bytes``).
        host_tier_bytes: the tier (1 GiB: a third of the store).
        warmup_steps, steps, rounds: ``rounds`` rounds of ``steps`` counted steps per store, the stores in turn
            within a round (so they share the machine's load), and ``warmup_steps`` more first, not counted.
        batch_size, block_size: random bytes a step (``batch_size × block_size``).
        store_dir: where the direct store's file goes; default ``<out>/store`` (deleted afterwards).
        threads: torch CPU threads.
    """

    num_experts: int = 256
    expert_hidden: int = 4096
    d_model: int = 128
    n_shared_layers: int = 2
    n_heads: int = 4
    num_active_experts: int = 2
    expert_cache: int = 8
    lr: float = 1e-3
    stores: tuple[str, ...] = ("host", "direct", "direct+tier")
    host_tier_bytes: int = 2**30
    warmup_steps: int = 2
    steps: int = 2
    rounds: int = 3
    batch_size: int = 16
    block_size: int = 128
    store_dir: str | None = None
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.stores) - {"host", "direct", "direct+tier"}
        if unknown:
            raise ValueError(f"stores ({sorted(unknown)}) must be host, direct or direct+tier")

    @classmethod
    def quick(cls, **changes: Any) -> StoreBoundConfig:
        """Seconds: 24 experts of width 64 on a tiny trunk, a tier of 6 records, 1 + 2 steps (what the test runs)."""
        options: dict[str, Any] = dict(
            num_experts=24,
            expert_hidden=64,
            d_model=16,
            n_shared_layers=1,
            n_heads=2,
            expert_cache=3,
            host_tier_bytes=6 * 4 * (3 * (2 * 16 * 64 + 64 + 16 + 2 * 16) + 1),
            warmup_steps=1,
            steps=1,
            rounds=2,
            batch_size=2,
            block_size=32,
        )
        return cls(**{**options, **changes})


def store_meter():
    """A callback that records, per training step, its seconds, the experts it touched (expert updates) and the
    store's traffic: bytes read and written through the store, and from and to the disk file."""
    from lightning.pytorch import Callback
    from typing_extensions import override

    def counters(pl_module) -> dict[str, float]:
        store = pl_module.store.stats()
        disk = {key[len("backing_") :]: value for key, value in store.items() if key.startswith("backing_")}
        disk = disk or (store if "file_bytes_read" in store else {})
        return {
            "updates": pl_module.rule.updates,
            "reads": store["reads"],
            "bytes_read": store["bytes_read"],
            "bytes_written": store["bytes_written"],
            "disk_bytes_read": disk.get("file_bytes_read", 0.0),
            "disk_bytes_written": disk.get("bytes_written", 0.0),
            "disk_read_seconds": disk.get("read_seconds", 0.0),
            "disk_write_seconds": disk.get("write_seconds", 0.0),
            "tier_hits": store.get("tier_hits", 0.0),
            "cpu_seconds": time.process_time(),  # every thread of the process: the work, whatever the load
        }

    class StoreMeter(Callback):
        """See :func:`store_meter`."""

        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.round = 0  # set by the caller before each round's fit
            self._start: tuple[float, dict[str, float]] = (0.0, {})

        @override
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            self._start = (time.perf_counter(), counters(pl_module))

        @override
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            started, before = self._start
            after = counters(pl_module)
            row = {key: after[key] - before[key] for key in after}
            row["seconds"] = time.perf_counter() - started
            row["touched"] = row.pop("updates")
            row["round"] = self.round
            self.steps.append(row)

    return StoreMeter()


def run_store_bound(config: StoreBoundConfig, out: Path, command: str = "", log=print) -> dict[str, Any]:
    """Every store of ``config.stores``, each filled with every expert's initial record, trained ``rounds`` times
    ``steps`` steps in turn (``warmup_steps`` more in the first round, not counted), on the same random bytes: the
    stores share the machine's load round by round. Writes ``out/store_bound.json`` and ``out/README.md``."""
    import gc

    import torch
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    import pragnosia_pl
    from pragnosia_pl import PragnosiaLM

    torch.set_num_threads(config.threads)
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    store_dir = Path(config.store_dir) if config.store_dir else out / "store"
    total = config.warmup_steps + config.rounds * config.steps
    generator = torch.Generator().manual_seed(config.seed)
    blocks = torch.randint(0, 256, (total * config.batch_size, config.block_size + 1), generator=generator)
    result: dict[str, Any] = {
        **report.report_header("store_bound", started, config, command, load=os.getloadavg()[0]),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "package": str(Path(pragnosia_pl.__file__).parent),  # the code measured (a "before" run imports another)
        "runs": [],
    }
    models, meters = {}, {}
    for contender in config.stores:
        kind, _, tier = contender.partition("+")
        seed_everything(config.seed, verbose=False)
        options = dict(host_tier_bytes=config.host_tier_bytes) if tier else {}  # absent before issue 25
        models[contender] = model = PragnosiaLM(
            d_model=config.d_model,
            n_shared_layers=config.n_shared_layers,
            n_heads=config.n_heads,
            num_experts=config.num_experts,
            num_active_experts=config.num_active_experts,
            objective="exact",
            expert_cache=config.expert_cache,
            expert_hidden=config.expert_hidden,
            store=kind,
            store_dir=str(store_dir / contender),
            expert_optimizer="adam",
            local_lr=config.lr,
            lr=config.lr,
            seed=config.seed,
            **options,
        )
        store = model.store
        log(f"store_bound: {contender}: writing {config.num_experts} records")
        fill = fill_store(getattr(store, "backing", store), log)  # the tier starts empty
        meters[contender] = store_meter()
        result["runs"].append(
            {
                "store": contender,
                "record_bytes": store.record_bytes,
                "params_bytes": 4 * model.layout.num_params,
                "fill_seconds": fill["seconds"],
                "load_average_before": os.getloadavg(),
            }
        )
    first = 0  # the round's first batch
    for round_ in range(config.rounds):
        count = config.steps + (config.warmup_steps if round_ == 0 else 0)
        part = blocks[first * config.batch_size : (first + count) * config.batch_size]
        loader = DataLoader(TensorDataset(part[:, :-1], part[:, 1:]), batch_size=config.batch_size)
        first += count
        for contender, model in models.items():  # every fit builds the shared AdamW anew: the same for each store
            meters[contender].round = round_
            trainer = Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=count,
                default_root_dir=str(out / "lightning"),
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
                callbacks=[meters[contender]],
            )
            trainer.fit(model, train_dataloaders=loader)
        log(f"store_bound: round {round_ + 1} of {config.rounds} done")
    for run in result["runs"]:
        model, steps = models[run["store"]], meters[run["store"]].steps
        model.experts().flush()
        run.update(load_average_after=os.getloadavg(), steps=steps, counted=steps[config.warmup_steps :])
        log(f"store_bound: {run['store']}: {json.dumps(summarize_store_bound(run))}")
        model.store.close()
    models.clear()
    gc.collect()
    result["paired_ratios"] = paired_ratios(result["runs"])
    log(f"store_bound: ÷ host, median over rounds: {json.dumps(result['paired_ratios'])}")
    shutil.rmtree(store_dir, ignore_errors=True)
    shutil.rmtree(out / "lightning", ignore_errors=True)
    result["wall_minutes"] = (time.time() - started) / 60
    (out / "store_bound.json").write_text(json.dumps(result, indent=2) + "\n")
    write_store_bound_page(out)
    return result


def paired_ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each store's median step time over the host store's, round by round (the rounds ran one after the other,
    the stores in turn within a round), then the median over the rounds; empty without a host run or rounds."""
    by_round: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for step in run["counted"]:
            if "round" in step:
                by_round.setdefault(run["store"], {}).setdefault(step["round"], []).append(step["seconds"])
    host = by_round.get("host", {})
    return {
        store: statistics.median(statistics.median(rounds[r]) / statistics.median(host[r]) for r in rounds if r in host)
        for store, rounds in by_round.items()
        if store != "host" and any(r in host for r in rounds)
    }


def summarize_store_bound(run: dict[str, Any]) -> dict[str, float]:
    """The counted steps of one store: medians and means per step and per touched expert."""
    steps = run["counted"]
    touched = sum(step["touched"] for step in steps)

    def per_step(key: str) -> float:
        return statistics.fmean(step[key] for step in steps)

    return {
        "ms_per_step": 1e3 * statistics.median(step["seconds"] for step in steps),
        "touched_per_step": touched / len(steps),
        "reads_per_touched": sum(step["reads"] for step in steps) / touched,
        "read_per_step": per_step("bytes_read"),
        "written_per_step": per_step("bytes_written"),
        "read_per_touched_in_p": sum(step["bytes_read"] for step in steps) / touched / run["params_bytes"],
        "disk_read_per_step": per_step("disk_bytes_read"),
        "disk_written_per_step": per_step("disk_bytes_written"),
        "disk_seconds_per_step": per_step("disk_read_seconds") + per_step("disk_write_seconds"),
        "cpu_seconds_per_step": per_step("cpu_seconds") if "cpu_seconds" in steps[0] else float("nan"),
        "tier_hits_per_step": per_step("tier_hits"),
    }


def write_store_bound_page(out: Path) -> None:
    """``out/README.md`` from ``out/store_bound.json`` and, when there is one, ``out/before/store_bound.json`` (the
    same command on the code before issue 25)."""
    result = json.loads((out / "store_bound.json").read_text())
    before_path = out / "before" / "store_bound.json"
    before = json.loads(before_path.read_text()) if before_path.is_file() else None
    config = result["config"]
    lines = [
        *report.page_header(
            "The store-bound step: host against direct, and a host tier (issue 25)",
            "scripts/bench_beyond_ram.py --store-bound",
            ["store_bound.json"],
            also="`before/store_bound.json` (the same command on the code before issue 25)" if before else "",
        ),
        f"- Model: `exact`, n = {config['num_experts']}, experts {config['d_model']} → {config['expert_hidden']} → "
        f"{config['d_model']} with Adam, {config['expert_cache']} device slots, k = {config['num_active_experts']}, "
        f"{config['batch_size']} × {config['block_size']} random bytes a step, {config['threads']} torch thread(s); "
        f"{config['warmup_steps']} steps not counted, then "
        + (
            f"{config['rounds']} rounds of {config['steps']} counted steps per store, the stores in turn within a "
            "round (so they share the machine's load alike)"
            if "rounds" in config
            else f"{config['steps']} counted, one store after the other"
        )
        + " (medians and means over the counted steps). "
        f"Host tier: {config['host_tier_bytes'] / 2**30:g} GiB.",
        "- P: an expert's parameter bytes; a record is P + 2P (Adam's moments) + 4 bytes (its step).",
    ]
    for label, report_ in (("After" if before else "Run", result), ("Before", before)):
        if report_ is None:
            continue
        summaries = [(run, summarize_store_bound(run)) for run in report_["runs"]]
        host = next((s["ms_per_step"] for run, s in summaries if run["store"] == "host"), None)
        paired = report_.get("paired_ratios", {})
        rows = []
        for run, s in summaries:
            loads = f"{run['load_average_before'][0]:.1f} → {run['load_average_after'][0]:.1f}"
            rows.append(
                [
                    f"`{run['store']}`",
                    f"{s['ms_per_step']:,.0f}",
                    f"{s['ms_per_step'] / host:.2f}" if host else "",
                    f"{paired[run['store']]:.2f}" if run["store"] in paired else "",
                    f"{s['touched_per_step']:.0f}",
                    f"{s['reads_per_touched']:.2f}",
                    f"{s['read_per_step'] / 2**20:,.0f}",
                    f"{s['read_per_touched_in_p']:.2f} P",
                    f"{s['written_per_step'] / 2**20:,.0f}",
                    f"{s['disk_read_per_step'] / 2**20:,.0f} / {s['disk_written_per_step'] / 2**20:,.0f}",
                    f"{s['disk_seconds_per_step']:.2f}",
                    f"{s['cpu_seconds_per_step']:.1f}"
                    if s["cpu_seconds_per_step"] == s["cpu_seconds_per_step"]
                    else "",
                    f"{s['tier_hits_per_step']:.0f}",
                    loads,
                ]
            )
        lines += [
            "",
            f"## {label}: {report_['date']}, commit {report_.get('commit') or '?'}",
            "",
            report.run_lines(report_)[0] if report_.get("command") else "",
            f"- Package measured: `{report_['package']}`"
            + (" (the tree of the commit before issue 25, imported through `PYTHONPATH`)" if label == "Before" else ""),
            report.machine_line(report_),
            "",
            *report.markdown_table(
                [
                    "Store",
                    "ms per step",
                    "÷ host",
                    "÷ host, paired by round (median)",
                    "Touched experts per step",
                    "Reads per touched expert",
                    "Read per step (MiB)",
                    "Read per touched expert",
                    "Written per step (MiB)",
                    "Disk read / written per step (MiB)",
                    "Store worker's seconds in the disk per step",
                    "CPU seconds per step (all threads)",
                    "Tier hits per step",
                    "Load average (1 min) before → after",
                ],
                rows,
                align="lrrrrrrrrrrrrl",
            ),
        ]
    (out / "README.md").write_text("\n".join(lines) + "\n")
