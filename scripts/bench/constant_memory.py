"""The constant-memory experiment (DESIGN §6): peak memory per training step against the number of experts.

Every configuration runs in a process of its own (``run_isolated``) through the normal training path with
``callbacks.MemoryMonitor``; only ``num_experts`` changes between runs. The metric is the per-step peak of
allocated CUDA memory where a GPU is used, and otherwise the process's per-step peak RSS with the disk store.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from bench.report import markdown_table, provenance, pyplot
from callbacks import read_memory

MODELS = ("pragnosia", "global")
CRITERIA = {"max_cv": 0.02, "max_spread": 1.05, "max_floor_ratio": 1.2}
SCRIPTS = Path(__file__).resolve().parents[1]  # holds the bench package, for the child processes


@dataclass
class RunSpec:
    """One training run of the experiment; everything but ``model`` and ``num_experts`` is shared by all runs."""

    model: str = "pragnosia"
    num_experts: int = 8
    steps: int = 50
    warmup: int = 10
    store: str = "disk"
    d_model: int = 128
    n_shared_layers: int = 2
    n_heads: int = 4
    num_active_experts: int = 2
    expert_slots: int = 2
    expert_cache: int = 2
    batch_size: int = 16
    block_size: int = 128
    max_bytes: int = 1_000_000
    accelerator: str = "auto"
    seed: int = 0
    malloc_trim_threshold: int | None = 4 * 2**20
    router: str = "product"
    pragnosia: dict = field(default_factory=dict)  # further PragnosiaLM keyword arguments, over the ones above
    precision: str = "32-true"  # Lightning's trainer.precision (bf16-mixed: the experts compute in bfloat16)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model ({self.model!r}) must be one of: {', '.join(MODELS)}")
        if self.steps <= self.warmup:
            raise ValueError(f"--steps ({self.steps}) must be larger than --warmup ({self.warmup})")


@dataclass
class RunResult:
    spec: RunSpec
    metric: str
    per_step: list[float]
    runtime_bytes: float
    floor_bytes: dict[str, float]
    tokens_per_s: float
    seconds: float
    summary: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        measured = self.per_step[self.spec.warmup :]
        mean = statistics.fmean(measured)
        std = statistics.pstdev(measured)
        model_bytes = mean - self.runtime_bytes
        self.summary = {
            "mean_bytes": mean,
            "std_bytes": std,
            "cv": std / mean,
            "peak_bytes": max(measured),
            "model_bytes": model_bytes,
            "floor_ratio": model_bytes / self.floor_bytes["total"],
        }


def build_model(spec: RunSpec):
    from pragnosia_pl import GlobalMoE, PragnosiaLM

    common = dict(
        d_model=spec.d_model,
        n_shared_layers=spec.n_shared_layers,
        n_heads=spec.n_heads,
        num_experts=spec.num_experts,
        num_active_experts=spec.num_active_experts,
        seed=spec.seed,
    )
    if spec.model == "global":
        return GlobalMoE(**common)
    options = dict(
        expert_slots=spec.expert_slots,
        expert_cache=spec.expert_cache,
        store=spec.store,
        store_dir=tempfile.mkdtemp(prefix="pragnosia-cm-"),
        router=spec.router,
    )
    return PragnosiaLM(**common, **{**options, **spec.pragnosia})


def analytic_floor(model, batch_size: int, block_size: int) -> dict[str, float]:
    """DESIGN §6 floor in bytes: shared params + grads + Adam, resident expert records, one expert's gradient,
    and an estimate of one batch's activations (float32)."""
    d, n_layers = model.hparams.d_model, model.hparams.n_shared_layers
    heads, vocab = model.hparams.n_heads, model.vocab_size
    N = batch_size * block_size
    shared_params = sum(p.numel() for p in model.parameters())  # GlobalMoE: its experts too
    floor = {"shared": 4.0 * 4 * shared_params}  # parameter, gradient, two Adam moments
    if hasattr(model, "layout"):
        floor["experts"] = 4.0 * model.experts().capacity * model.layout.record_numel
        floor["expert_grad"] = 4.0 * model.layout.num_params
        hidden = model.expert_hidden
    else:
        floor["experts"] = 0.0  # GlobalMoE's experts are shared parameters, counted above
        floor["expert_grad"] = 0.0
        hidden = model.experts[0].up.out_features
    # Saved for backward per trunk block: norms, q/k/v, attention output, FFN in/hidden/activation (≈ 18·N·d),
    # plus attention weights, for one micro-batch; the head's logits, their softmax and gradient (3·N·V); one
    # expert's local graph; the per-token tensors (h, z, the mixture, dL/dh: 4·N·d; every expert output: k·N·d).
    micro = min(batch_size, getattr(model.hparams, "micro_batch", None) or batch_size)
    trunk = n_layers * (18 * micro * block_size * d + 2 * micro * heads * block_size * block_size)
    head = 3 * N * vocab
    expert = N * (3 * d + 2 * hidden) + 3 * N * vocab
    per_token = (4 + model.hparams.num_active_experts) * N * d
    floor["activations"] = 4.0 * (trunk + head + expert + per_token)
    floor["total"] = sum(floor.values())
    return floor


class RuntimeBaseline(Callback):
    """Host memory that is not the model's: RSS when the first batch starts, less the tensors that exist then.

    What the interpreter, torch, Lightning and the data hold is the same for every n; subtracting it leaves the
    part of the per-step peak that the analytic floor describes.
    """

    bytes = 0.0

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == 0:
            tensors = sum(p.numel() * p.element_size() for p in pl_module.parameters())
            if hasattr(pl_module, "residency"):  # PragnosiaLM: its device slots
                cache = pl_module.experts()
                tensors += cache.slots.numel() * cache.slots.element_size()
            self.bytes = read_memory(torch.device("cpu"))["rss_bytes"] - tensors


def cuda_library_bytes() -> float:
    """Device memory the CUDA libraries keep allocated once a linear layer has run forward and backward.

    cuBLAS and cuBLASLt keep their workspaces in PyTorch's allocator after the first matrix product, so they
    count in ``memory_allocated`` for the rest of the process: the same bytes for every n and not the model's
    (the CUDA counterpart of :class:`RuntimeBaseline`).
    """
    layer = torch.nn.Linear(64, 64, device="cuda")
    x = torch.randn(32, 64, device="cuda", requires_grad=True)
    (layer(x) @ x.T).square().sum().backward()
    del layer, x
    torch.cuda.synchronize()
    return float(torch.cuda.memory_allocated())


def run_one(spec: RunSpec) -> RunResult:
    """Train ``spec`` in this process and measure it."""
    from lightning.pytorch import Trainer, seed_everything

    from callbacks import MemoryMonitor
    from pragnosia_pl import TextDomains

    seed_everything(spec.seed, verbose=False)
    data = TextDomains(
        {"code": "stdlib-code", "prose": "stdlib-docs"},
        block_size=spec.block_size,
        batch_size=spec.batch_size,
        max_bytes_per_domain=spec.max_bytes,
        seed=spec.seed,
    )
    data.prepare_data()
    data.setup("fit")
    cuda = spec.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    cuda_runtime = cuda_library_bytes() if cuda else 0.0
    model = build_model(spec)
    floor = analytic_floor(model, spec.batch_size, spec.block_size)
    monitor = MemoryMonitor()
    runtime = RuntimeBaseline()
    trainer = Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        max_steps=spec.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[runtime, monitor],
        precision=spec.precision,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    seconds = time.perf_counter() - start
    metric = "cuda_peak_bytes" if cuda else "peak_rss_bytes"
    per_step = [row[metric] for row in monitor.history]
    tokens_per_s = spec.steps * spec.batch_size * spec.block_size / seconds
    return RunResult(spec, metric, per_step, cuda_runtime if cuda else runtime.bytes, floor, tokens_per_s, seconds)


def run_isolated(spec: RunSpec, timeout: float = 1800) -> RunResult:
    """Run ``spec`` in a fresh Python process so that no run's memory is seen by another."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "bench.constant_memory", json.dumps(asdict(spec)), str(out)]
        path = os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)
        if spec.malloc_trim_threshold is not None:
            # glibc keeps up to ~32 MiB of freed heap by default (a dynamic trim threshold); a fixed threshold
            # makes RSS follow the live tensors, so the peak can be compared with the analytic floor.
            env["MALLOC_TRIM_THRESHOLD_"] = str(spec.malloc_trim_threshold)
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"run {spec.model} n={spec.num_experts} failed:\n{done.stderr[-3000:]}")
        raw = json.loads(out.read_text())
    raw["spec"] = RunSpec(**raw["spec"])
    raw.pop("summary")
    return RunResult(**raw)


def verdict(runs: list[RunResult], criteria: dict[str, float] = CRITERIA) -> dict:
    """Check the experiment's claims: flat within runs, flat across n, near the floor, baseline growing."""
    ours = sorted((r for r in runs if r.spec.model == "pragnosia"), key=lambda r: r.spec.num_experts)
    baseline = sorted((r for r in runs if r.spec.model == "global"), key=lambda r: r.spec.num_experts)
    means = [r.summary["mean_bytes"] for r in ours]
    checks = {
        "cv_within_runs": max(r.summary["cv"] for r in ours) < criteria["max_cv"],
        "flat_across_n": bool(means) and max(means) / min(means) <= criteria["max_spread"],
        "near_floor": max(r.summary["floor_ratio"] for r in ours) <= criteria["max_floor_ratio"],
    }
    if len(baseline) >= 2:
        growth = [b.summary["mean_bytes"] for b in baseline]
        checks["baseline_grows"] = all(later > earlier for earlier, later in zip(growth, growth[1:]))
    return {
        "criteria": criteria,
        "checks": checks,
        "spread": max(means) / min(means) if means else math.nan,
        "max_cv": max((r.summary["cv"] for r in ours), default=math.nan),
        "max_floor_ratio": max((r.summary["floor_ratio"] for r in ours), default=math.nan),
        "passed": all(checks.values()),
    }


def to_json(runs: list[RunResult], decision: dict) -> dict:
    entries = []
    for r in runs:
        entries.append(
            {
                "model": r.spec.model,
                "num_experts": r.spec.num_experts,
                "metric": r.metric,
                **r.summary,
                "runtime_bytes": r.runtime_bytes,
                "floor_bytes": r.floor_bytes["total"],
                "floor_parts": r.floor_bytes,
                "tokens_per_s": r.tokens_per_s,
                "seconds": r.seconds,
                "per_step_bytes": r.per_step,
                "spec": asdict(r.spec),
            }
        )
    return {"runs": entries, **decision}


MIB = 2**20
LABELS = {"pragnosia": "PragnosiaLM", "global": "GlobalMoE"}


def runs_table(report: dict) -> list[str]:
    """The report's table (GlobalMoE first, n ascending) and its verdict."""
    header = ["model", "n experts", "mean peak (MiB)", "CV", "max peak (MiB)", "model part (MiB)", "floor (MiB)"]
    rows = [
        [
            LABELS[r["model"]],
            r["num_experts"],
            f"{r['mean_bytes'] / MIB:.1f}",
            f"{100 * r['cv']:.2f}%",
            f"{r['peak_bytes'] / MIB:.1f}",
            f"{r['model_bytes'] / MIB:.1f}",
            f"{r['floor_bytes'] / MIB:.1f}",
            f"{r['floor_ratio']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
        ]
        for r in sorted(report["runs"], key=lambda r: (r["model"], r["num_experts"]))
    ]
    lines = markdown_table([*header, "model/floor", "tokens/s"], rows, align="lrrrrrrrr")
    checks = ", ".join(f"{name}: {'pass' if ok else 'FAIL'}" for name, ok in report["checks"].items())
    return [
        *lines,
        "",
        f"Spread of mean peak across n (max/min): {report['spread']:.3f}; largest CV: "
        f"{100 * report['max_cv']:.2f}%; largest model/floor: {report['max_floor_ratio']:.2f}.",
        f"Checks: {checks}. Verdict: {'PASS' if report['passed'] else 'FAIL'}.",
    ]


def settings(report: dict, store: bool = True) -> str:
    """What every run of the report shared: widths, batch, steps, the store (unless ``store`` is false) and
    PragnosiaLM's options."""
    spec = report["runs"][0]["spec"]
    ours = next((r["spec"] for r in report["runs"] if r["model"] == "pragnosia"), spec)
    cuda = report["runs"][0]["metric"] == "cuda_peak_bytes"
    metric = "per-step peak of allocated CUDA memory" if cuda else "per-step peak RSS (`VmHWM`, reset every step)"
    shape = (
        f"d = {spec['d_model']}, {spec['n_shared_layers']} trunk layers, k = {spec['num_active_experts']}, batch "
        f"{spec['batch_size']} × {spec['block_size']}, {spec['steps']} steps of which {spec['warmup']} warm-up"
    )
    return (
        shape
        + (f", {spec['store']} store" if store else "")
        + f"; PragnosiaLM: {recipe(ours)}. Metric: {metric}, mean and max over the steps after warm-up, each run its "
        "own process."
    )


def recipe(spec: dict) -> str:
    """PragnosiaLM's options in a run (over the package's defaults)."""
    options = {"expert_slots": spec["expert_slots"], "router": spec["router"], **spec.get("pragnosia", {})}
    slots = options.pop("expert_slots")
    if spec.get("per_token"):  # the option of the old engine's script: expert_slots = n
        slots = None
    parts = ["no cap on experts per step" if slots is None else f"S = {slots}", f"cache {spec['expert_cache']}"]
    return ", ".join([*parts, *(f"{key} {value}" for key, value in options.items())])


def markdown(report: dict) -> str:
    """``constant_memory.md``: the report's table and verdict."""
    return "\n".join(runs_table(report)) + "\n"


def plot(runs: list[RunResult], path: Path) -> None:
    plt = pyplot()
    mib = 2**20
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model, label, color in (
        ("pragnosia", "PragnosiaLM (local, store)", "tab:blue"),
        ("global", "GlobalMoE (backprop, resident)", "tab:red"),
    ):
        chosen = sorted((r for r in runs if r.spec.model == model), key=lambda r: r.spec.num_experts)
        if not chosen:
            continue
        left.plot(
            [r.spec.num_experts for r in chosen],
            [r.summary["mean_bytes"] / mib for r in chosen],
            "o-",
            color=color,
            label=label,
        )
        for r in chosen:
            right.plot(
                range(1, len(r.per_step) + 1), [v / mib for v in r.per_step], color=color, alpha=0.5, linewidth=1
            )
    left.set_xscale("log", base=2)
    left.set_xlabel("number of experts n")
    left.set_ylabel(f"mean per-step peak ({runs[0].metric}), MiB")
    left.set_title("memory vs n")
    left.legend()
    right.axvline(runs[0].spec.warmup + 0.5, color="gray", linestyle=":", label="end of warm-up")
    right.set_xlabel("training step")
    right.set_ylabel("per-step peak, MiB")
    right.set_title("memory vs step (every run)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    runs: list[RunResult], out_dir: Path, command: str = "", started: float | None = None, load: float | None = None
) -> dict:
    """``constant_memory.json`` (the runs, the verdict, the command, machine and start date; ``load``: the load
    average as the runs started), then ``.md`` and ``.png``."""
    device = torch.cuda.get_device_name() if runs[0].metric == "cuda_peak_bytes" else ""
    result = {
        "benchmark": "constant_memory",
        **provenance(command, load, device),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        **to_json(runs, verdict(runs)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "constant_memory.json").write_text(json.dumps(result, indent=2))
    (out_dir / "constant_memory.md").write_text(markdown(result))
    plot(runs, out_dir / "constant_memory.png")
    return result


def _child(spec_json: str, out_path: str) -> None:
    result = run_one(RunSpec(**json.loads(spec_json)))
    payload = asdict(result)
    Path(out_path).write_text(json.dumps(payload))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
