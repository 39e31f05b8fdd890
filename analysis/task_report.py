"""The report's task-metrics section: what each trial got right, and whether eval loss tracked it.

For a sweep with `eval.metrics` (trainables/task_metrics.py) the trials table has best_<metric> and
final_<metric> columns. This module ranks the rankable trials by the objective (best_<search.metric>)
in its direction, and computes, for each task metric, the Spearman rank correlation between a trial's
best eval loss and its best value of the metric across trials: +1 or -1 when loss orders the trials
exactly as the task does (-1 for a higher-is-better metric means "lower loss, more right"), near 0
when loss says little about the task here. Also the task evaluation's cost: seconds per evaluation
and its peak memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from analysis.results import Experiment

LOSS = "best_eval_loss"


@dataclass(frozen=True)
class Correlation:
    metric: str
    rho: float  # NaN with fewer than 3 trials or a constant column
    trials: int

    def describe(self, better: str) -> str:
        if not math.isfinite(self.rho):
            return f"{self.metric}: not enough varied trials to correlate ({self.trials} with both figures)"
        agrees = (self.rho < 0) if better == "higher" else (self.rho > 0)
        strength = "strongly" if abs(self.rho) >= 0.7 else "weakly" if abs(self.rho) >= 0.3 else "hardly"
        how = "lower loss went with better" if agrees else "lower loss went with worse"
        return (
            f"{self.metric}: Spearman rho {self.rho:+.2f} between best eval loss and best {self.metric} over "
            f"{self.trials} trials; loss {strength} tracks the task here ({how} {self.metric})"
        )


@dataclass
class TaskSummary:
    """The task section of a report.

    Attributes:
        metrics: Task metric name -> "higher" or "lower".
        objective: search.metric.
        ranking: Trials ranked by best_<objective>, its direction first (rankable trials only).
        correlations: One per task metric.
        eval_s: Mean seconds of one task evaluation across every trial's evaluations (NaN without any).
        peak_mib: Highest peak memory of a task evaluation, and its kind.
    """

    metrics: dict[str, str]
    objective: str
    ranking: pd.DataFrame
    correlations: list[Correlation] = field(default_factory=list)
    eval_s: float = math.nan
    peak_mib: float = math.nan
    memory_kind: str | None = None

    def lines(self) -> list[str]:
        out = []
        if self.objective in self.metrics and not self.ranking.empty:
            top = self.ranking.iloc[0]
            out.append(
                f"ranked by {self.objective} ({self.metrics[self.objective]} is better): best trial {top['trial_id']} "
                f"with {self.objective} {top[f'best_{self.objective}']:.4g} (eval loss {top[LOSS]:.4f})"
            )
        out += [c.describe(self.metrics[c.metric]) for c in self.correlations]
        if math.isfinite(self.eval_s):
            kind = f" ({self.memory_kind})" if self.memory_kind else ""
            peak = f", peak memory {self.peak_mib:,.0f} MiB{kind}" if math.isfinite(self.peak_mib) else ""
            out.append(f"task evaluation cost: {self.eval_s:.2f} s per evaluation{peak}")
        return out

    def table(self) -> pd.DataFrame:
        columns = ["trial_id", "status", LOSS, *(f"{k}_{m}" for m in self.metrics for k in ("best", "final"))]
        extra = [c for c in self.ranking.columns if c.startswith("final_") and c.endswith("_loss") and c != "final_eval_loss"]
        return self.ranking[[c for c in [*columns, *extra, "task_eval_total_s", "task_eval_peak_mib"] if c in self.ranking]]


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties get their mean rank)."""
    ra, rb = a.rank(), b.rank()
    if len(ra) < 3 or ra.nunique() < 2 or rb.nunique() < 2:
        return math.nan
    return float(ra.corr(rb))


def task_summary(exp: Experiment, ranked: pd.DataFrame) -> TaskSummary | None:
    """The task section for an experiment with task metrics, None without any.

    Args:
        exp: The loaded experiment.
        ranked: Its rankable trials (analysis.pareto.rankable).
    """
    metrics = exp.saved_spec.task_metrics
    if not metrics:
        return None
    objective = exp.saved_spec.search.metric
    column = f"best_{objective}"
    ranking = ranked
    if column in ranked:
        ascending = metrics.get(objective, "lower") == "lower"
        ranking = ranked.sort_values([column, LOSS], ascending=[ascending, True], na_position="last", kind="mergesort")
    correlations = []
    for name in metrics:
        best = f"best_{name}"
        if best not in ranked:
            continue
        both = ranked[[LOSS, best]].apply(pd.to_numeric, errors="coerce").dropna()
        correlations.append(Correlation(name, spearman(both[LOSS], both[best]), len(both)))
    curves = exp.curves
    eval_s = math.nan
    trials = exp.trials
    if "task_eval_total_s" in trials:
        total = pd.to_numeric(trials["task_eval_total_s"], errors="coerce").sum()
        count = 0
        if metrics and not curves.empty:
            first = next(iter(metrics))
            if first in curves:
                count = int(pd.to_numeric(curves[first], errors="coerce").notna().sum())
        eval_s = float(total / count) if count else math.nan
    peak = pd.to_numeric(trials.get("task_eval_peak_mib", pd.Series(dtype="float64")), errors="coerce").max()
    kinds = trials["memory_kind"].dropna().unique() if "memory_kind" in trials else []
    return TaskSummary(
        metrics=metrics,
        objective=objective,
        ranking=ranking,
        correlations=correlations,
        eval_s=eval_s,
        peak_mib=float(peak) if pd.notna(peak) else math.nan,
        memory_kind=str(kinds[0]) if len(kinds) == 1 else None,
    )
