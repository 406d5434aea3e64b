"""Continual-learning figures from a loss matrix, with the signs of the accuracy-based definitions kept.

Notation: stages ``i = 0 .. T-1`` trained in order, stage ``i`` on domain column ``c_i``; ``R[i][j]`` is the
evaluation loss (lower is better) on domain ``j`` after stage ``i``; ``b[j]`` the loss before any training.
The accuracy-based definitions (GEM: Lopez-Paz & Ranzato 2017; forgetting: Chaudhry et al. 2018) are
rewritten for losses so that each figure keeps its meaning:

- average final loss ``= mean_j R[T-1][j]`` over every evaluated domain (lower is better).
- BWT (backward transfer) ``= 1/(T-1) · Σ_{i<T-1} (R[i][c_i] − R[T-1][c_i])``: how much the loss on each
  earlier stage's domain *fell* since that stage ended. As in GEM, negative BWT is forgetting.
- forgetting ``= mean over the domains j trained before the last stage of (R[T-1][j] − min_{l<T-1} R[l][j])``:
  how far the final loss is above the best loss seen on that domain after an earlier stage. As in Chaudhry
  et al., positive forgetting is bad: the loss got worse.
- FWT (forward transfer) ``= mean over stages i ≥ 1 whose domain is new of (b[c_i] − R[i-1][c_i])``: how much
  the earlier stages lowered the loss on a domain before it was trained. Positive is good, as in GEM.

BWT, forgetting and FWT need two stages or more (FWT also needs ``b``); otherwise they are NaN. NaN entries
of ``R`` (domains not evaluated) are left out of the means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class ContinualFigures(NamedTuple):
    """The figures of one loss matrix; see the module docstring for the definitions."""

    average_final: float
    bwt: float
    forgetting: float
    fwt: float


def continual_figures(
    matrix: Sequence[Sequence[float]],
    stage_columns: Sequence[int],
    initial: Sequence[float] | None = None,
) -> ContinualFigures:
    """Average final loss, BWT, forgetting and FWT of a loss matrix.

    Args:
        matrix: ``R[i][j]``, the loss on domain ``j`` after stage ``i``; one row per stage trained so far.
        stage_columns: ``c_i``, the column of the domain stage ``i`` trained on (at least one per row).
        initial: ``b[j]``, the loss on domain ``j`` before any training; ``None`` if unknown.

    Raises:
        ValueError: if the matrix is empty or ragged, or a stage column is out of range.

    Example::

        >>> continual_figures([[1.0, 3.0], [2.0, 1.5]], stage_columns=[0, 1], initial=[4.0, 4.0])
        ContinualFigures(average_final=1.75, bwt=-1.0, forgetting=1.0, fwt=1.0)
    """
    if not matrix:
        raise ValueError("continual_figures needs at least one row (one trained stage)")
    width = len(matrix[0])
    if any(len(row) != width for row in matrix) or (initial is not None and len(initial) != width):
        raise ValueError(f"continual_figures: every row and the initial losses must have {width} columns")
    last = len(matrix) - 1
    columns = list(stage_columns[: last + 1])
    if len(columns) <= last or any(not 0 <= c < width for c in columns):
        raise ValueError(
            f"continual_figures: stage_columns {list(stage_columns)} must give one column in [0, {width}) per row"
        )

    final = matrix[last]
    average_final = _mean(final)
    if last == 0:
        return ContinualFigures(average_final, math.nan, math.nan, math.nan)

    bwt = _mean([matrix[i][c] - final[c] for i, c in enumerate(columns[:last])])
    earlier = list(dict.fromkeys(columns[:last]))
    forgetting = _mean([final[j] - _nanmin(matrix[stage][j] for stage in range(last)) for j in earlier])
    fwt = math.nan
    if initial is not None:
        new = [i for i in range(1, last + 1) if columns[i] not in columns[:i]]
        fwt = _mean([initial[columns[i]] - matrix[i - 1][columns[i]] for i in new])
    return ContinualFigures(average_final, bwt, forgetting, fwt)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _nanmin(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan
