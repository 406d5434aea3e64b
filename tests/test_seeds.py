"""Seeds: every (seed, expert) pair starts from its own weights, and the shared parts' streams never meet an expert's.

Mutation seen failing: the old ``seed·1_000_003 + e`` (seed 1's expert 0 is seed 0's expert 1,000,003).
"""

import pytest
import torch

from pragnosia_pl.experts import ExpertLayout, FlatSGD, expert_seed, feed_forward_expert
from pragnosia_pl.lm_base import seeded


def layout(seed: int) -> ExpertLayout:
    return ExpertLayout(lambda: feed_forward_expert(8, 16), FlatSGD(0.1), seed)


@pytest.mark.parametrize(("a", "b"), [((1, 0), (0, 1_000_003)), ((2, 5), (1, 1_000_008)), ((1, 0), (0, 2**20))])
def test_experts_of_different_seeds_never_share_initial_weights(a, b):
    assert expert_seed(*a) != expert_seed(*b)
    assert not torch.equal(layout(a[0]).init_params(a[1]), layout(b[0]).init_params(b[1]))


def test_shared_streams_start_above_every_expert_seed():
    with seeded(0, 0):
        shared = torch.rand(4)
    torch.manual_seed(expert_seed(2**23 - 1, 2**40 - 1))
    assert not torch.equal(shared, torch.rand(4))
    assert expert_seed(2**23 - 1, 2**40 - 1) < 2**63


def test_out_of_range_seeds_are_refused():
    with pytest.raises(ValueError, match=r"model.seed \(-1\) must be in \[0, 8388608\)"):
        expert_seed(-1, 0)
    with pytest.raises(ValueError, match=r"model.seed \(8388608\) must be in \[0, 8388608\)"):
        with seeded(2**23, 0):
            pass
