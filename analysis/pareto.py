"""Quality against memory: the Pareto front, the best trial, the best under each memory budget.

Pure functions on the trials table (analysis.results), so they can be tested on hand-made frames.
Which way is better for each column comes from the one metrics table (trainables/metrics.py):
lower eval loss is better, lower peak memory is better.

Semantics, stated once:

* Only *rankable* trials take part: status completed, early_stopped, running or paused, with a
  finite best_eval_loss and a finite peak memory. Failed, OOM, diverged and infeasible trials are
  never "best" (their numbers are not a configuration's quality), and the report lists them.
  An early-stopped trial is ranked by the loss it reached before ASHA stopped it.
* Memory figures are compared only within one memory kind (`primary_memory_kind`): a CPU process's
  RSS is never compared with, or presented as, VRAM.
* Pareto front: a trial is on it when no other trial is at least as good on both axes and strictly
  better on one. Identical points are all on it (neither dominates the other); rows with a missing
  value are never on it and dominate nothing.
* A trial fits a budget of B GiB when its measured peak is at most B x 1024 MiB.
* "Within 1% of the best": best_eval_loss <= best + 1% of |best|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from core.numbers import is_finite_number
from core.status import RANKABLE_STATUSES
from trainables.metrics import DEFAULT_BUDGETS_GIB, direction

QUALITY = "best_eval_loss"
MEMORY = "peak_memory_mib"
MIB_PER_GIB = 1024
WITHIN_OF_BEST = 0.01
# Preferred when several memory kinds occur: VRAM is what budgets are about.
MEMORY_KIND_PREFERENCE = ("cuda_reserved", "host_rss")


def rankable(trials: pd.DataFrame, memory_kind: str | None = None) -> pd.DataFrame:
    """Trials whose quality and memory can be ranked (see module docstring), optionally of one memory kind."""
    keep = trials["status"].isin([s.value for s in RANKABLE_STATUSES]).fillna(False).astype(bool)
    keep &= _finite_mask(trials[QUALITY]) & _finite_mask(trials[MEMORY])
    if memory_kind is not None:
        keep &= (trials["memory_kind"] == memory_kind).fillna(False).astype(bool)
    return trials[keep]


def primary_memory_kind(trials: pd.DataFrame) -> str | None:
    """The memory kind the analysis uses: cuda_reserved if any rankable trial measured VRAM, else the most common."""
    kinds = rankable(trials)["memory_kind"].dropna()
    if kinds.empty:
        return None
    for kind in MEMORY_KIND_PREFERENCE:
        if (kinds == kind).any():
            return kind
    return str(kinds.value_counts().index[0])


def pareto_front(frame: pd.DataFrame, columns: Sequence[str] = (MEMORY, QUALITY)) -> pd.Series:
    """Which rows no other row dominates.

    Directions come from trainables.metrics (both default columns are lower-is-better).

    Args:
        frame: Any table holding `columns`.
        columns: The objectives.

    Returns:
        A boolean Series aligned with `frame`: True for rows on the Pareto front.
    """
    # Flip higher-is-better columns so that lower is better everywhere.
    values = np.column_stack(
        [
            pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
            * (1.0 if direction(c) == "lower" else -1.0)
            for c in columns
        ]
    ).reshape(len(frame), len(columns))
    valid = np.isfinite(values).all(axis=1)
    on_front = np.zeros(len(frame), dtype=bool)
    points = values[valid]
    # Row i is dominated if some row j is <= on every objective and < on at least one.
    le = (points[None, :, :] <= points[:, None, :]).all(axis=2)
    lt = (points[None, :, :] < points[:, None, :]).any(axis=2)
    on_front[valid] = ~(le & lt).any(axis=1)
    return pd.Series(on_front, index=frame.index, name="on_front")


def _ranked_order(frame: pd.DataFrame, first: str, second: str) -> pd.DataFrame:
    """Sort by `first`, then `second`, then trial_id, each the better way first, so ties are deterministic."""
    keys = [first, second] + (["trial_id"] if "trial_id" in frame else [])
    ascending = [direction(first) == "lower", direction(second) == "lower"] + [True] * (len(keys) - 2)
    return frame.sort_values(keys, ascending=ascending, kind="mergesort")


def best_trial(frame: pd.DataFrame) -> pd.Series | None:
    """The row with the best quality; ties go to lower memory, then the smaller trial id. None if empty."""
    candidates = frame[_finite_mask(frame[QUALITY])]
    if candidates.empty:
        return None
    return _ranked_order(candidates, QUALITY, MEMORY).iloc[0]


def best_under_budgets(frame: pd.DataFrame, budgets_gib: Sequence[float] = DEFAULT_BUDGETS_GIB) -> pd.DataFrame:
    """For each budget, the best trial whose measured peak fits in it.

    Args:
        frame: Rankable trials of one memory kind.
        budgets_gib: Budgets in GiB, reported in the order given.

    Returns:
        One row per budget: budget_gib, fits (how many trials fit), trial_id, best_eval_loss,
        peak_memory_mib and headroom_mib (budget minus peak); trial columns are empty when
        nothing fits.
    """
    rows = []
    for budget in budgets_gib:
        limit = float(budget) * MIB_PER_GIB
        fitting = frame[pd.to_numeric(frame[MEMORY], errors="coerce") <= limit]
        best = best_trial(fitting)
        rows.append(
            {
                "budget_gib": float(budget),
                "fits": int(len(fitting)),
                "trial_id": None if best is None else best["trial_id"],
                QUALITY: math.nan if best is None else float(best[QUALITY]),
                MEMORY: math.nan if best is None else float(best[MEMORY]),
                "headroom_mib": math.nan if best is None else limit - float(best[MEMORY]),
            }
        )
    table = pd.DataFrame(rows, columns=["budget_gib", "fits", "trial_id", QUALITY, MEMORY, "headroom_mib"])
    return table.astype({"budget_gib": "float64", "fits": "int64", "trial_id": "string"})


def cheapest_within(frame: pd.DataFrame, tolerance: float = WITHIN_OF_BEST) -> pd.Series | None:
    """The lowest-memory trial whose quality is within `tolerance` (relative) of the best.

    Ties on memory go to the better quality, then the smaller trial id. None if `frame` is empty.
    """
    best = best_trial(frame)
    if best is None:
        return None
    loss = float(best[QUALITY])
    sign = 1.0 if direction(QUALITY) == "lower" else -1.0
    bound = loss + sign * tolerance * abs(loss)
    quality = pd.to_numeric(frame[QUALITY], errors="coerce")
    close = frame[(quality <= bound) if sign > 0 else (quality >= bound)]
    close = close[_finite_mask(close[MEMORY])]
    if close.empty:
        return best
    return _ranked_order(close, MEMORY, QUALITY).iloc[0]


def tradeoff_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The Pareto front from least to most memory, with what each step costs relative to the best trial.

    Returns:
        The front's rows with two more columns: memory_saved_pct (memory below the best trial's,
        in %) and loss_increase_pct (quality lost against the best trial, in %).
    """
    front = frame[pareto_front(frame)]
    best = best_trial(front)
    if best is None:
        return front.assign(memory_saved_pct=pd.Series(dtype="float64"), loss_increase_pct=pd.Series(dtype="float64"))
    front = _ranked_order(front, MEMORY, QUALITY)
    best_memory, best_loss = float(best[MEMORY]), float(best[QUALITY])
    return front.assign(
        memory_saved_pct=(best_memory - front[MEMORY]) / best_memory * 100 if best_memory else math.nan,
        loss_increase_pct=(front[QUALITY] - best_loss) / abs(best_loss) * 100 if best_loss else math.nan,
    )


def _finite_mask(series: pd.Series) -> pd.Series:
    """Element-wise core.numbers.is_finite_number for a table column (numeric strings count, as in pandas)."""
    numeric = pd.to_numeric(series, errors="coerce").astype("float64")
    return pd.Series([is_finite_number(v) for v in numeric.to_numpy(na_value=np.nan)], index=series.index, dtype=bool)
