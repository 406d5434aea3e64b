"""The scratch script of the three screens in this folder (2026-11-26), kept as it ran.

It ran bench_quality.py with each expert's local loss multiplied by N_e / N (its tokens' share of the 16 × 128
batch), before `model.local_weighting: batch` existed; that option scales the gradient by the same factor.
    PYTHONPATH=$PWD python scripts/results/quality/screens/scaled_local_loss.py --num-experts 32 --models pragnosia \
        --no-plain --variants '{"mixnorm": {...the tuned preset..., "local_readout": "mixture"}}' \
        --time-budget-min 0 --seed 0 --out ...
"""

import runpy
import sys

from pragnosia_pl.module import PragnosiaLM

BATCH_TOKENS = 16 * 128
unscaled = PragnosiaLM.local_loss


def local_loss(self, h_e, expert_out, targets_e, readout=None):
    return unscaled(self, h_e, expert_out, targets_e, readout) * (h_e.size(0) / BATCH_TOKENS)


PragnosiaLM.local_loss = local_loss
sys.argv = ["bench_quality.py"] + sys.argv[1:]
runpy.run_path("scripts/bench_quality.py", run_name="__main__")
