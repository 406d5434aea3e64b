"""How many tokens each expert's local step sees (N_e), under the quality benchmark's `matched` recipe.

    PYTHONPATH=$PWD python scripts/results/quality/screens/token_counts.py --steps 300 --out token_counts.json

For n = 8 and 32 it trains 300 steps (seed 0, no validation) and records N_e for every (step, expert) of the
working set. With `local_weighting: expert` every such step weighs the same whatever N_e is; with `batch` its
gradient is scaled by N_e / N. The spread of N_e is what the choice changes.
"""

import argparse
import json
import statistics

from pragnosia_pl.experiments.quality import PRESET_VARIANTS, QualityConfig, RunPlan, build_model, make_datamodule


def token_counts(num_experts: int, steps: int) -> list[int]:
    from lightning.pytorch import Trainer, seed_everything

    config = QualityConfig(num_experts=(num_experts,), variants={"matched": PRESET_VARIANTS["matched"]})
    seed_everything(config.seed, verbose=False)
    model = build_model(config, RunPlan("pragnosia", num_experts, "matched"), "/tmp/token-counts-store")
    counts: list[int] = []
    local_step = model.local_step

    def recording_local_step(record, h_e, *args, **kwargs):
        counts.append(h_e.size(0))
        return local_step(record, h_e, *args, **kwargs)

    model.local_step = recording_local_step
    trainer = Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=make_datamodule(config))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="token_counts.json")
    args = parser.parse_args()
    report = {}
    for n in (8, 32):
        counts = token_counts(n, args.steps)
        mean = statistics.fmean(counts)
        report[n] = {
            "expert_steps": len(counts), "mean_tokens": mean, "cv": statistics.pstdev(counts) / mean,
            "median_tokens": statistics.median(counts), "min_tokens": min(counts),
            "share_below_quarter_mean": sum(c < mean / 4 for c in counts) / len(counts),
        }
        print(n, report[n], flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
