"""Quality against memory: the Pareto front, the best trial, the best under each memory budget.

Pure functions on the trials table (analysis.results), so they can be tested on hand-made frames.
Quality is the sweep's objective in its direction (`Quality`, from the saved spec's search.metric:
best_eval_loss, lower is better, or a task metric's best_<name> with that metric's direction);
lower peak memory is better (trainables/metrics.py).

Semantics, stated once:

* Only *rankable* trials take part: status completed, early_stopped, running or paused, with a
  finite quality and a finite peak memory. Failed, OOM, diverged and infeasible trials are
  never "best" (their numbers are not a configuration's quality), and the report lists them.
  An early-stopped trial is ranked by the loss it reached before ASHA stopped it.
* Memory figures are compared only within one memory kind (`primary_memory_kind`): a CPU process's
  RSS is never compared with, or presented as, VRAM.
* Pareto front: a trial is on it when no other trial is at least as good on both axes and strictly
  better on one. Identical points are all on it (neither dominates the other); rows with a missing
  value are never on it and dominate nothing.
* A trial fits a budget of B GiB when its measured peak is at most B x 1024 MiB.
* "Within 1% of the best": no more than 1% of |best| worse than the best, in the quality's direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.numbers import is_finite_number
from core.status import RANKABLE_STATUSES
from trainables.metrics import DEFAULT_BUDGETS_GIB, direction

MEMORY = "peak_memory_mib"
# Metrics ranked by the trials' best eval loss: perplexity is exp(eval_loss), the same order.
LOSS_METRICS = ("eval_loss", "perplexity")


@dataclass(frozen=True)
class Quality:
    """What ranks trials: the objective (search.metric), its trials-table column and which way is better.

    Attributes:
        metric: eval_loss, or the task metric's name (eval.metrics).
        better: "lower" or "higher".
    """

    metric: str = "eval_loss"
    better: str = "lower"

    @property
    def column(self) -> str:
        return f"best_{self.metric}"

    @property
    def lower_is_better(self) -> bool:
        return self.better == "lower"

    def describe(self) -> str:
        return f"{self.metric} ({self.better} is better)"

    def fmt(self, value: Any) -> str:
        """A value of it as the report writes it: losses to 4 decimals, task metrics to 4 digits."""
        if not is_finite_number(value):
            return "n/a"
        return f"{float(value):.4f}" if self.metric == "eval_loss" else f"{float(value):.4g}"

    def gain(self, value: float, reference: float) -> float:
        """How much better `value` is than `reference`, as a fraction of |reference| (negative: worse;
        +-inf against a reference of 0, e.g. a baseline that got no answer right)."""
        reference = float(reference)
        delta = reference - float(value) if self.lower_is_better else float(value) - reference
        if not reference:
            return math.copysign(math.inf, delta) if delta else 0.0
        return delta / abs(reference)

    def gain_text(self, value: float, reference: float) -> str:
        """`gain` in words: "12.5% lower", or the difference where the reference is 0."""
        gain = self.gain(value, reference)
        if math.isfinite(gain):
            return f"{abs(gain) * 100:.1f}% {'lower' if self.lower_is_better == (gain >= 0) else 'higher'}"
        return f"{abs(float(value) - float(reference)):.4g} {'lower' if self.lower_is_better == (gain >= 0) else 'higher'} (from 0)"

    @classmethod
    def of(cls, spec: Any) -> Quality:
        """The quality of a saved spec (analysis/saved_spec.py): its search.metric in its direction."""
        metric = spec.search.metric or "eval_loss"
        if metric in LOSS_METRICS or metric not in spec.task_metrics:
            return LOSS
        return cls(metric, spec.direction(metric))


LOSS = Quality()
QUALITY = LOSS.column  # the eval-loss column, which every trial has whatever the objective
MIB_PER_GIB = 1024
WITHIN_OF_BEST = 0.01
# Preferred when several memory kinds occur: VRAM is what budgets are about.
MEMORY_KIND_PREFERENCE = ("cuda_reserved", "host_rss")


def rankable(trials: pd.DataFrame, memory_kind: str | None = None, quality: Quality = LOSS) -> pd.DataFrame:
    """Trials whose quality and memory can be ranked (see module docstring), optionally of one memory kind."""
    keep = trials["status"].isin([s.value for s in RANKABLE_STATUSES]).fillna(False).astype(bool)
    values = trials[quality.column] if quality.column in trials else pd.Series(np.nan, index=trials.index)
    keep &= _finite_mask(values) & _finite_mask(trials[MEMORY])
    if memory_kind is not None:
        keep &= (trials["memory_kind"] == memory_kind).fillna(False).astype(bool)
    return trials[keep]


def primary_memory_kind(trials: pd.DataFrame, quality: Quality = LOSS) -> str | None:
    """The memory kind the analysis uses: cuda_reserved if any rankable trial measured VRAM, else the most common."""
    kinds = rankable(trials, quality=quality)["memory_kind"].dropna()
    if kinds.empty:
        return None
    for kind in MEMORY_KIND_PREFERENCE:
        if (kinds == kind).any():
            return kind
    return str(kinds.value_counts().index[0])


def pareto_front(frame: pd.DataFrame, quality: Quality = LOSS) -> pd.Series:
    """Which rows no other row dominates on memory (lower is better) and quality (in its direction).

    Args:
        frame: Any table holding the memory and quality columns.
        quality: The objective.

    Returns:
        A boolean Series aligned with `frame`: True for rows on the Pareto front.
    """
    return dominance_front(frame, [(MEMORY, direction(MEMORY) == "lower"), (quality.column, quality.lower_is_better)])


def dominance_front(frame: pd.DataFrame, objectives: Sequence[tuple[str, bool]]) -> pd.Series:
    """Which rows no other row dominates on `objectives`, each (column, lower is better).

    Returns:
        A boolean Series aligned with `frame`: True for rows on the front.
    """
    # Flip higher-is-better columns so that lower is better everywhere.
    values = np.column_stack(
        [
            pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype="float64", na_value=np.nan) * (1.0 if lower else -1.0)
            for c, lower in objectives
        ]
    ).reshape(len(frame), len(objectives))
    valid = np.isfinite(values).all(axis=1)
    on_front = np.zeros(len(frame), dtype=bool)
    points = values[valid]
    # Row i is dominated if some row j is <= on every objective and < on at least one.
    le = (points[None, :, :] <= points[:, None, :]).all(axis=2)
    lt = (points[None, :, :] < points[:, None, :]).any(axis=2)
    on_front[valid] = ~(le & lt).any(axis=1)
    return pd.Series(on_front, index=frame.index, name="on_front")


def _ranked_order(frame: pd.DataFrame, quality: Quality, memory_first: bool = False) -> pd.DataFrame:
    """Sort by quality then memory (or memory then quality), then trial_id, each the better way first,
    so ties are deterministic."""
    pairs = [(quality.column, quality.lower_is_better), (MEMORY, direction(MEMORY) == "lower")]
    if memory_first:
        pairs.reverse()
    if "trial_id" in frame:
        pairs.append(("trial_id", True))
    return frame.sort_values([k for k, _ in pairs], ascending=[a for _, a in pairs], kind="mergesort")


def best_trial(frame: pd.DataFrame, quality: Quality = LOSS) -> pd.Series | None:
    """The row with the best quality; ties go to lower memory, then the smaller trial id. None if empty."""
    if quality.column not in frame:
        return None
    candidates = frame[_finite_mask(frame[quality.column])]
    if candidates.empty:
        return None
    return _ranked_order(candidates, quality).iloc[0]


def best_under_budgets(
    frame: pd.DataFrame, budgets_gib: Sequence[float] = DEFAULT_BUDGETS_GIB, quality: Quality = LOSS
) -> pd.DataFrame:
    """For each budget, the best trial whose measured peak fits in it.

    Args:
        frame: Rankable trials of one memory kind.
        budgets_gib: Budgets in GiB, reported in the order given.
        quality: The objective.

    Returns:
        One row per budget: budget_gib, fits (how many trials fit), trial_id, the quality column,
        peak_memory_mib and headroom_mib (budget minus peak); trial columns are empty when
        nothing fits.
    """
    column = quality.column
    rows = []
    for budget in budgets_gib:
        limit = float(budget) * MIB_PER_GIB
        fitting = frame[pd.to_numeric(frame[MEMORY], errors="coerce") <= limit]
        best = best_trial(fitting, quality)
        rows.append(
            {
                "budget_gib": float(budget),
                "fits": int(len(fitting)),
                "trial_id": None if best is None else best["trial_id"],
                column: math.nan if best is None else float(best[column]),
                MEMORY: math.nan if best is None else float(best[MEMORY]),
                "headroom_mib": math.nan if best is None else limit - float(best[MEMORY]),
            }
        )
    table = pd.DataFrame(rows, columns=["budget_gib", "fits", "trial_id", column, MEMORY, "headroom_mib"])
    return table.astype({"budget_gib": "float64", "fits": "int64", "trial_id": "string"})


def cheapest_within(frame: pd.DataFrame, tolerance: float = WITHIN_OF_BEST, quality: Quality = LOSS) -> pd.Series | None:
    """The lowest-memory trial whose quality is within `tolerance` (relative) of the best.

    Ties on memory go to the better quality, then the smaller trial id. None if `frame` is empty.
    """
    best = best_trial(frame, quality)
    if best is None:
        return None
    values = pd.to_numeric(frame[quality.column], errors="coerce")
    close = frame[[quality.gain(v, best[quality.column]) >= -tolerance if is_finite_number(v) else False for v in values]]
    close = close[_finite_mask(close[MEMORY])]
    if close.empty:
        return best
    return _ranked_order(close, quality, memory_first=True).iloc[0]


def tradeoff_table(frame: pd.DataFrame, quality: Quality = LOSS) -> pd.DataFrame:
    """The Pareto front from least to most memory, with what each step costs relative to the best trial.

    Returns:
        The front's rows with two more columns: memory_saved_pct (memory below the best trial's,
        in %) and quality_lost_pct (how much worse than the best trial, in % of it, in the
        quality's direction).
    """
    front = frame[pareto_front(frame, quality)]
    best = best_trial(front, quality)
    if best is None:
        return front.assign(memory_saved_pct=pd.Series(dtype="float64"), quality_lost_pct=pd.Series(dtype="float64"))
    front = _ranked_order(front, quality, memory_first=True)
    best_memory, best_value = float(best[MEMORY]), float(best[quality.column])
    lost = [-quality.gain(v, best_value) * 100 if best_value else math.nan for v in front[quality.column]]
    return front.assign(
        memory_saved_pct=(best_memory - front[MEMORY]) / best_memory * 100 if best_memory else math.nan,
        quality_lost_pct=pd.Series(lost, index=front.index, dtype="float64"),
    )


def _finite_mask(series: pd.Series) -> pd.Series:
    """Element-wise core.numbers.is_finite_number for a table column (numeric strings count, as in pandas)."""
    numeric = pd.to_numeric(series, errors="coerce").astype("float64")
    return pd.Series([is_finite_number(v) for v in numeric.to_numpy(na_value=np.nan)], index=series.index, dtype=bool)
