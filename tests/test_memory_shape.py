"""Memory shape, in subprocesses (DESIGN §4.5, §6): flat in n with the disk store, growing for GlobalMoE.

A property with generous margins, not a timing: each run is a separate process through the normal training path.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from bench.constant_memory import RunResult, RunSpec, run_isolated, verdict

TINY = dict(
    d_model=32, n_shared_layers=1, n_heads=2, batch_size=4, block_size=32, max_bytes=100_000, steps=10, warmup=3
)


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, int], RunResult]:
    specs = [RunSpec(model, n, **TINY) for model in ("pragnosia", "global") for n in (8, 2048)]
    with ThreadPoolExecutor(len(specs)) as pool:  # separate processes: concurrency changes no run's RSS
        return {(spec.model, spec.num_experts): result for spec, result in zip(specs, pool.map(run_isolated, specs))}


# Wide experts (d = 32, hidden 4,096: 1.07 MB records) and per-token top-2 over all n (no expert_slots cap) on 32
# tokens a step: at n ≥ 4,096 a step touches ~60 experts and 8 steps materialize ~450 of them, ~470 MB of records,
# which an in-RAM store would add to the process; at n = 8 the run touches 8 records, 8.5 MB.
WIDE_RUN = """
import json, sys
from pathlib import Path
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from pragnosia_pl import PragnosiaLM

num_experts, store_dir, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
objective, expert_optimizer, expert_layers, n_layers = sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7])
torch.set_num_threads(1)

def status(key):
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) * 1024 for line in file if line.startswith(key + ":"))

class StepPeaks(pl.Callback):
    def __init__(self):
        self.peaks = []
    def on_train_batch_start(self, *args):
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # VmHWM := VmRSS: each step's own peak
    def on_train_batch_end(self, *args):
        self.peaks.append(status("VmHWM"))
        self.on_disk = sum(path.stat().st_blocks * 512 for path in Path(store_dir).rglob("experts.bin"))

tokens = torch.randint(0, 256, (2 * steps, 17), generator=torch.Generator().manual_seed(0))
loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)
model = PragnosiaLM(d_model=32, n_shared_layers=n_layers, n_heads=2, num_experts=num_experts, num_active_experts=2,
                    expert_slots=None, expert_cache=4, expert_hidden=4096, store="disk", store_dir=store_dir,
                    objective=objective, expert_optimizer=expert_optimizer, local_lr=1e-3, lr=1e-3,
                    expert_layers=expert_layers, seed=0)
probe = StepPeaks()
trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=store_dir, callbacks=[probe])
trainer.fit(model, loader)
print(json.dumps([probe.peaks, probe.on_disk]))
"""
WIDE_EXPERTS = (8, 4096, 10**6)
WARMUP_STEPS = 2
# the seed's rule with SGD on one expert layer; and exact with Adam (records 3x as large) on 2 expert layers, every
# block's feed-forward (issue 22: a test of local/SGD alone passed with exact keeping a host copy of each expert)
WIDE_RECIPES = {"local": ("local", "sgd", "top", "1"), "exact": ("exact", "adam", "every", "2")}


@pytest.fixture(scope="module", params=list(WIDE_RECIPES))
def wide_runs(request, tmp_path_factory) -> dict[int, tuple[list[int], int]]:
    """Per n: the peak RSS of each training step and the bytes of records on disk at the end (the live store is
    removed when the run ends), from concurrent processes."""
    root = tmp_path_factory.mktemp("wide")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    started = {
        n: subprocess.Popen(
            [sys.executable, "-c", WIDE_RUN, str(n), str(root / str(n)), "8", *WIDE_RECIPES[request.param]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in WIDE_EXPERTS
    }
    runs = {}
    for n, process in started.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        runs[n] = tuple(json.loads(out.strip().splitlines()[-1]))
    return runs


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_disk_store_host_memory_follows_the_touched_experts_not_n(wide_runs):
    # Replaces a tiny-width test (d = 32, 10 steps, n ≤ 2,048) that still passed with the disk store swapped for an
    # in-RAM one (make_store returning a HostStore for "disk"). This one fails with it: the ~470 MB of records
    # materialized at n = 10⁶ (~370 MB at n = 4,096) then sit in the process and its peak RSS grows by them.
    limit = 64 << 20  # allocator noise and per-step tensors of ~60 touched experts are a few MiB to ~25 MiB
    small = max(wide_runs[8][0][WARMUP_STEPS:])
    for n in WIDE_EXPERTS[1:]:
        peaks = wide_runs[n][0]
        assert max(peaks[WARMUP_STEPS:]) - small < limit, (n, small, peaks)
        assert peaks[-1] - peaks[WARMUP_STEPS] < limit / 2, (n, peaks)  # no growth as more experts materialize
    # the test has teeth: the runs at large n did hold several times `limit` of records, on disk
    assert min(wide_runs[n][1] for n in WIDE_EXPERTS[1:]) > 5 * limit, wide_runs
    assert wide_runs[8][1] < limit  # n = 8: every record of the store (8 per layer) is less than the margin


def test_global_moe_grows_by_at_least_its_extra_experts(runs):
    small, large = runs["global", 8], runs["global", 2048]
    from pragnosia_pl import GlobalMoE

    per_expert = sum(
        p.numel()
        for p in GlobalMoE(
            d_model=32, n_shared_layers=1, n_heads=2, num_experts=1, num_active_experts=1
        ).experts.parameters()
    )
    # At least their float32 parameters (gradients and Adam moments exist only for experts a step touched).
    extra = (2048 - 8) * per_expert * 4
    assert large.summary["mean_bytes"] - small.summary["mean_bytes"] >= extra


def test_verdict_logic(runs):
    decision = verdict(list(runs.values()))
    assert decision["checks"]["flat_across_n"] and decision["checks"]["baseline_grows"]
    flat = verdict(list(runs.values()), {"max_cv": 1.0, "max_spread": 1.0 - 1e-9, "max_floor_ratio": 100.0})
    assert not flat["checks"]["flat_across_n"] and not flat["passed"]


def test_script_quick_mode_writes_its_files(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "scripts/prove_constant_memory.py",
            "--quick",
            "--experts",
            "8",
            "64",
            "--steps",
            "8",
            "--warmup",
            "3",
            "--baseline-max-experts",
            "64",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    result = json.loads((tmp_path / "constant_memory.json").read_text())
    assert {(r["model"], r["num_experts"]) for r in result["runs"]} == {
        ("pragnosia", 8),
        ("pragnosia", 64),
        ("global", 8),
        ("global", 64),
    }
    assert (done.returncode == 0) == result["passed"]
    assert all(len(r["per_step_bytes"]) == 8 and r["floor_bytes"] > 0 for r in result["runs"])
    assert "Verdict" in (tmp_path / "constant_memory.md").read_text()
    assert (tmp_path / "constant_memory.png").stat().st_size > 10_000


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match=r"--steps \(5\) must be larger than --warmup \(5\)"):
        RunSpec(steps=5, warmup=5)
    with pytest.raises(ValueError, match=r"model \('dense'\) must be one of: pragnosia, global"):
        RunSpec(model="dense")


@pytest.mark.parametrize("objective", ["exact", "local"])
def test_nothing_outlives_its_step_with_expert_layers_in_the_trunk(objective):
    """From the second expert layer on, pass 2's closure could lead back into the step's graph (through the balance
    losses), a cycle across autograd's C++ edges that Python's collector cannot free: every step's activations would
    stay (a 5 M-token run grew by 2 MB a step until the kernel killed it). The live tensors stay the same in
    number from step to step."""
    import gc

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pragnosia_pl import PragnosiaLM

    counts = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            gc.collect()
            counts.append(sum(1 for o in gc.get_objects() if torch.is_tensor(o)))

    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (96, 33))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    model = PragnosiaLM(
        d_model=16, n_shared_layers=2, n_heads=2, num_experts=8, objective=objective, expert_optimizer="adam",
        expert_slots=None, expert_cache=4, store="host", expert_layers="every",
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[Count()]
    )
    trainer.fit(model, data)
    assert counts[-1] == counts[3], f"live tensors after each step: {counts}"
