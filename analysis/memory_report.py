"""The report's memory sections: predicted vs measured, admission and OOMs, GPU packing, and the
Pareto front of a multi-objective search.

Pure functions on the trials table (analysis/results.py), so they can be tested on hand-made frames.

* Predicted vs measured: a prediction (predicted_memory_mib) is always a VRAM figure, for a CUDA GPU.
  The error is shown only where the trial measured VRAM (memory_kind cuda_reserved); next to a CPU
  run's host RSS it is "n/a", since the two are different quantities.
* CPU tensor peak: a CPU trial also measures its tensor peak (tensor_peak_mib, memory kind
  cpu_tensor_peak: the most tensor bytes alive at once over its first steps and evaluation) and
  reports the estimator's allocated bytes for the same CPU setup beside it
  (predicted_tensor_peak_mib). The two are the same quantity, so their error is shown.
* Packing (resources.pack): trials that shared a GPU are grouped by node and GPU id; from their
  start/end times come the most trials that ran on one GPU at once, the GPU-hours the GPUs were busy
  (the union of each GPU's trial intervals) and the GPU-hours one trial per GPU would have held them
  (the sum of trial durations). The saving assumes trials would have run as fast alone; packed
  trials share compute, so it is an upper bound. On a CPU run the GPU was logical (Ray's bookkeeping
  only: no memory cap was enforced and no GPU computed), and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import pandas as pd

from analysis.pareto import MEMORY, QUALITY, dominance_front
from analysis.saved_spec import SavedSpec
from core.numbers import is_finite_number
from core.status import TrialStatus
from trainables.metrics import direction

NOT_COMPARABLE = "n/a (measured host RSS, not comparable)"
# search.objectives metric -> the trials-table column that holds it per trial.
OBJECTIVE_COLUMNS = {"eval_loss": QUALITY, "perplexity": QUALITY, "peak_memory_mib": MEMORY, "tokens_per_s": "tokens_per_s"}
PREDICTION_COLUMNS = ["trial_id", "status", "predicted_memory_mib", MEMORY, "memory_kind", "error"]
SpecLike = SavedSpec | Mapping[str, Any]


# --- predicted vs measured ------------------------------------------------------------------------


def prediction_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials with a prediction: predicted and measured side by side, the error only for VRAM.

    Returns:
        Columns trial_id, status, predicted_memory_mib, peak_memory_mib, memory_kind and error
        (a string: "+4.2%", "n/a (measured host RSS, not comparable)" or "" before any measurement).
    """
    if "predicted_memory_mib" not in trials:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    have = trials[trials["predicted_memory_mib"].notna() & (trials["status"] != TrialStatus.INFEASIBLE.value)]
    errors = []
    for row in have.to_dict("records"):
        if row.get("memory_kind") == "cuda_reserved" and is_finite_number(row.get("memory_error_pct")):
            errors.append(f"{float(row['memory_error_pct']):+.1f}%")
        elif row.get("memory_kind") == "host_rss":
            errors.append(NOT_COMPARABLE)
        else:
            errors.append("")
    out = have[["trial_id", "status", "predicted_memory_mib", MEMORY, "memory_kind"]].copy()
    out["error"] = pd.Series(errors, index=have.index, dtype="string")
    return out.reset_index(drop=True)


@dataclass(frozen=True)
class Predictions:
    """What the report says about predicted vs measured memory (both report.md and report.html).

    Attributes:
        rows: prediction_rows(trials).
        text: The paragraph above the table: the mean error where VRAM was measured, else why
            there is none; and what the estimator does not model (run_plan.json's memory plan).
    """

    rows: pd.DataFrame
    text: str


def predictions(trials: pd.DataFrame, not_modelled: Sequence[str] = ()) -> Predictions | None:
    """Predicted vs measured memory, None when no trial that ran has a prediction."""
    rows = prediction_rows(trials)
    if rows.empty:
        return None
    # memory_error_pct is only ever computed against VRAM (analysis/results.py); the filter says so again.
    errors = trials.loc[trials["memory_kind"] == "cuda_reserved", "memory_error_pct"].dropna()
    if len(errors):
        text = (
            f"Mean absolute error {errors.abs().mean():.1f}% over {len(errors)} trials (error = (predicted - measured) / "
            "measured; positive: the estimate was too high)."
        )
    else:
        text = "Predictions are peak VRAM on a CUDA GPU (torch.cuda.max_memory_reserved)." + (
            " This run measured host RSS, so the error is n/a: the two are not comparable."
            if not (rows["memory_kind"] == "cuda_reserved").any()
            else ""
        )
        if tensor_peaks(trials) is not None:
            text += " The CPU tensor peak is compared with the estimator's CPU prediction below."
    if not_modelled:
        text += f" Not modelled by the estimator: {'; '.join(not_modelled)}."
    return Predictions(rows=rows, text=text)


# --- the CPU tensor peak ------------------------------------------------------------------------------

TENSOR = "tensor_peak_mib"
TENSOR_PREDICTED = "predicted_tensor_peak_mib"
TENSOR_ERROR = "tensor_peak_error_pct"
TENSOR_KIND = "cpu_tensor_peak"
TENSOR_COLUMNS = [
    "trial_id", "status", "r", "target_modules", "micro_batch_size", "tensor_peak_seq_len", TENSOR_PREDICTED, TENSOR,
    TENSOR_ERROR,
]
TENSOR_HOW = (
    "Measured: the most tensor bytes alive at once in each CPU trial over its first optimizer steps and first "
    "evaluation (memory kind cpu_tensor_peak: torch.profiler's CPU allocator events summed in time order, plus the "
    "tensors the trial held when each window opened). Predicted: the estimator's allocated bytes for the same CPU "
    "setup (fp32, no autocast, its optimizer), at the batch size and padded length the profiled batches had."
)


def tensor_peak_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials that measured a CPU tensor peak: predicted and measured side by side, with the error."""
    if TENSOR not in trials:
        return pd.DataFrame(columns=TENSOR_COLUMNS)
    have = trials[pd.to_numeric(trials[TENSOR], errors="coerce").notna()]
    columns = [c for c in TENSOR_COLUMNS if c in have]
    return have[columns].reset_index(drop=True)


@dataclass(frozen=True)
class TensorPeaks:
    """What the report says about the CPU tensor peak (report.md and report.html).

    Attributes:
        rows: tensor_peak_rows(trials).
        text: How it was measured and predicted, the error, and how far it moved against host RSS.
        line: One summary line.
    """

    rows: pd.DataFrame
    text: str
    line: str


def tensor_peaks(trials: pd.DataFrame) -> TensorPeaks | None:
    """The CPU tensor-peak comparison, None when no trial measured one (GPU runs, older experiments)."""
    rows = tensor_peak_rows(trials)
    if rows.empty:
        return None
    measured = pd.to_numeric(rows[TENSOR], errors="coerce")
    errors = pd.to_numeric(rows[TENSOR_ERROR], errors="coerce").dropna() if TENSOR_ERROR in rows else pd.Series(dtype="float64")
    spread = f"{measured.min():,.3f}-{measured.max():,.3f} MiB over {_count(len(rows), 'trial')}"
    if len(errors):
        fit = (
            f"prediction error (predicted - measured) / measured: mean absolute {errors.abs().mean():.1f}%, "
            f"largest {errors.abs().max():.1f}%, over {_count(len(errors), 'trial')}"
        )
    else:
        fit = "no prediction (the estimator does not model this model)"
    rss = pd.Series(dtype="float64")
    if "memory_kind" in trials and MEMORY in trials:
        rss = pd.to_numeric(trials.loc[trials["memory_kind"] == "host_rss", MEMORY], errors="coerce").dropna()
    against = (
        f" Host RSS of the same trials spans {rss.min():,.0f}-{rss.max():,.0f} MiB: Python and the libraries drown the "
        "model there, which is why the quality-vs-memory chart and this table use the tensor peak."
        if len(rss) > 1
        else ""
    )
    text = f"{TENSOR_HOW} Measured {spread}; {fit}.{against}"
    line = f"CPU tensor peak (cpu_tensor_peak, not VRAM): {spread}; {fit}"
    return TensorPeaks(rows=rows, text=text, line=line)


def chart_memory(ranked: pd.DataFrame, memory_kind: str | None) -> tuple[pd.DataFrame, str | None]:
    """The memory the quality-vs-memory chart plots: on a CPU run the tensor peak, where every trial has one.

    Host RSS is dominated by Python and the libraries (every smoke trial reads 620-640 MiB); the tensor peak
    (memory kind cpu_tensor_peak) moves with the configuration. Returns the frame with peak_memory_mib
    replaced by the tensor peak, and the kind to label the axis with; otherwise both unchanged.
    """
    if memory_kind != "host_rss" or TENSOR not in ranked or ranked.empty:
        return ranked, memory_kind
    tensor = pd.to_numeric(ranked[TENSOR], errors="coerce").astype("float64")
    if not all(is_finite_number(v) for v in tensor):
        return ranked, memory_kind
    return ranked.assign(**{MEMORY: tensor}), "cpu_tensor_peak"


def _tensor_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The tensor-peak rows as report.md shows them."""
    shown = pd.DataFrame({c: rows[c] for c in rows.columns if c not in (TENSOR_PREDICTED, TENSOR, TENSOR_ERROR)})
    shown = shown.rename(columns={"tensor_peak_seq_len": "padded seq_len"})
    missing = pd.Series([None] * len(rows), index=rows.index)
    shown["predicted (MiB)"] = [_mib3(v) for v in rows.get(TENSOR_PREDICTED, missing)]
    shown["measured (MiB)"] = [_mib3(v) for v in rows[TENSOR]]
    shown["error"] = [f"{float(v):+.1f}%" if is_finite_number(v) else "" for v in rows.get(TENSOR_ERROR, missing)]
    return shown


def _mib3(value: Any) -> str:
    if not is_finite_number(value):
        return ""
    return f"{float(value):,.3f}" if abs(float(value)) < 100 else f"{float(value):,.0f}"


# --- packing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingSummary:
    """How trials shared GPUs (resources.pack).

    Attributes:
        gpus: GPUs (node, GPU id) that ran packed trials.
        trials: Packed trials with start and end times.
        max_per_gpu: Most trials that ran on one GPU at the same time.
        mean_per_gpu: Trials per GPU on average while the GPU was busy.
        busy_gpu_hours: GPU-hours during which at least one trial ran (what packing occupied).
        unpacked_gpu_hours: Sum of trial durations (what one trial per GPU would have occupied).
        reserved_gpu_hours: Sum of GPU share x duration (what Ray accounted to the trials).
        logical: True when no trial ran on CUDA (a CPU run: the GPU was Ray's bookkeeping only).
    """

    gpus: int
    trials: int
    max_per_gpu: int
    mean_per_gpu: float
    busy_gpu_hours: float
    unpacked_gpu_hours: float
    reserved_gpu_hours: float
    logical: bool

    @property
    def saved_gpu_hours(self) -> float:
        return self.unpacked_gpu_hours - self.busy_gpu_hours

    @property
    def saved_pct(self) -> float:
        return self.saved_gpu_hours / self.unpacked_gpu_hours * 100 if self.unpacked_gpu_hours else 0.0

    @property
    def throughput_gain(self) -> float:
        """Trial-hours per busy GPU-hour (1.0: no gain over one trial per GPU)."""
        return self.unpacked_gpu_hours / self.busy_gpu_hours if self.busy_gpu_hours else 1.0


def _intervals_stats(intervals: list[tuple[float, float]]) -> tuple[int, float]:
    """(most intervals overlapping at once, length of their union)."""
    events = sorted([(s, 1) for s, e in intervals] + [(e, -1) for s, e in intervals], key=lambda x: (x[0], x[1]))
    running = peak = 0
    union = 0.0
    opened = 0.0
    for t, step in events:
        if running == 0 and step == 1:
            opened = t
        running += step
        peak = max(peak, running)
        if running == 0:
            union += t - opened
    return peak, union


def packing_summary(trials: pd.DataFrame) -> PackingSummary | None:
    """Trials per GPU and GPU-hours saved, from packed trials' start/end times; None without packing."""
    needed = {"gpu_fraction", "started_at", "ended_at"}
    if not needed <= set(trials.columns):
        return None
    rows = [
        r
        for r in trials.to_dict("records")
        if all(is_finite_number(r.get(c)) for c in ("gpu_fraction", "started_at", "ended_at"))
        and float(r["ended_at"]) > float(r["started_at"])
    ]
    if not rows:
        return None
    by_gpu: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        node = r.get("node_id") if isinstance(r.get("node_id"), str) else str(r.get("node") or "?")
        gpu = r.get("gpu_ids") if isinstance(r.get("gpu_ids"), str) and r.get("gpu_ids") else "?"
        by_gpu.setdefault((node, gpu), []).append(r)
    peak, busy = 0, 0.0
    for members in by_gpu.values():
        p, u = _intervals_stats([(float(m["started_at"]), float(m["ended_at"])) for m in members])
        peak, busy = max(peak, p), busy + u
    durations = [float(r["ended_at"]) - float(r["started_at"]) for r in rows]
    unpacked = sum(durations)
    reserved = sum(float(r["gpu_fraction"]) * d for r, d in zip(rows, durations))
    devices = [r.get("device") for r in rows if isinstance(r.get("device"), str)]
    return PackingSummary(
        gpus=len(by_gpu),
        trials=len(rows),
        max_per_gpu=peak,
        mean_per_gpu=unpacked / busy if busy else 0.0,
        busy_gpu_hours=busy / 3600,
        unpacked_gpu_hours=unpacked / 3600,
        reserved_gpu_hours=reserved / 3600,
        logical=not any(d.startswith("cuda") for d in devices),
    )


def packing_lines(summary: PackingSummary) -> list[str]:
    """The packing outcome in words, with the caveats."""
    lines = [
        f"{summary.trials} packed trials on {summary.gpus} GPU{'s' if summary.gpus != 1 else ''}: up to "
        f"{summary.max_per_gpu} ran on one GPU at once ({summary.mean_per_gpu:.2f} on average while busy)",
        f"GPU time: {summary.busy_gpu_hours:.4f} GPU-hours busy vs {summary.unpacked_gpu_hours:.4f} with one trial per "
        f"GPU: {summary.saved_gpu_hours:.4f} GPU-hours saved ({summary.saved_pct:.0f}%, {summary.throughput_gain:.2f}x "
        "trials per GPU-hour; an upper bound, as packed trials share the GPU's compute)",
    ]
    if summary.logical:
        lines.append(
            "this was a CPU run: the GPU was logical (Ray's accounting only), no memory cap was enforced and no GPU "
            "computed, so this shows how trials were scheduled, not a measured GPU saving"
        )
    return lines


# --- multi-objective --------------------------------------------------------------------------------


def objective_columns(spec: SpecLike) -> list[str]:
    """The trials-table columns of a multi-objective search's objectives ([] in single-objective mode):
    best_<name> for a task metric of eval.metrics."""
    saved = SavedSpec.from_raw(spec)
    columns = []
    for objective in saved.search.objectives or []:
        if objective in OBJECTIVE_COLUMNS:
            columns.append(OBJECTIVE_COLUMNS[objective])
        elif objective in saved.task_metrics:
            columns.append(f"best_{objective}")
    return columns


def objectives_front(ranked: pd.DataFrame, columns: Sequence[str], spec: SpecLike | None = None) -> pd.DataFrame:
    """The ranked trials no other beats on every searched objective, best first on the first one.

    Directions come from trainables/metrics.py, and for task metrics (best_<name>) from the spec's eval.metrics.
    """
    if ranked.empty or not columns:
        return ranked.iloc[0:0]
    tasks = SavedSpec.from_raw(spec).task_metrics if spec is not None else {}
    objectives = [
        (c, (tasks[c.removeprefix("best_")] if c.removeprefix("best_") in tasks else direction(c)) == "lower")
        for c in dict.fromkeys(columns)
    ]
    front = ranked[dominance_front(ranked, objectives)]
    return front.sort_values(objectives[0][0], ascending=objectives[0][1], kind="mergesort")


# --- what the report shows --------------------------------------------------------------------------


def _mib(value: Any) -> str:
    """MiB with a decimal below 100 (tiny test models predict a few MiB)."""
    if not is_finite_number(value):
        return ""
    return f"{float(value):,.1f}" if abs(float(value)) < 100 else f"{float(value):,.0f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def memory_summary_lines(trials: pd.DataFrame, spec: SpecLike) -> list[str]:
    """Summary lines: admission and OOMs, packing, predictions; nothing when there is nothing to say."""
    lines = []
    statuses = trials["status"].value_counts() if "status" in trials else pd.Series(dtype="int64")
    infeasible = int(statuses.get(TrialStatus.INFEASIBLE.value, 0))
    oom = int(statuses.get(TrialStatus.OOM.value, 0))
    if infeasible or oom:
        parts = []
        if infeasible:
            reasons = trials.loc[trials["status"] == TrialStatus.INFEASIBLE.value].get(
                "infeasible_reason", pd.Series(dtype="string")
            )
            dominated = int(reasons.fillna("").astype(str).str.startswith("dominated by OOM").sum())
            parts.append(
                f"{_count(infeasible, 'configuration')} rejected before launch ({infeasible - dominated} predicted not "
                f"to fit, {dominated} dominated by an OOM config)"
            )
        if oom:
            parts.append(f"{_count(oom, 'trial')} ran out of memory")
        lines.append("memory: " + "; ".join(parts))
    tensors = tensor_peaks(trials)
    if tensors is not None:
        lines.append(tensors.line)
    summary = packing_summary(trials)
    if summary is not None:
        lines.append("packing: " + packing_lines(summary)[0] + f"; {summary.saved_pct:.0f}% GPU-hours saved"
                     + (" (logical GPU: CPU run)" if summary.logical else ""))
    return lines


def memory_markdown(
    trials: pd.DataFrame, spec: SpecLike, ranked: pd.DataFrame, table: Callable[..., str], not_modelled: Sequence[str] = ()
) -> list[str]:
    """report.md sections; `table(frame, columns)` renders a Markdown table (analysis.formatting.markdown_table)."""
    parts: list[str] = []
    predicted = predictions(trials, not_modelled)
    if predicted is not None:
        rows = predicted.rows
        shown = pd.DataFrame(
            {
                "trial_id": rows["trial_id"],
                "status": rows["status"],
                "predicted VRAM (MiB)": [_mib(v) for v in rows["predicted_memory_mib"]],
                "measured (MiB)": [_mib(v) for v in rows[MEMORY]],
                "memory_kind": rows["memory_kind"],
                "error": rows["error"],
            }
        )
        parts += ["## Memory: predicted vs measured", "", predicted.text, "", table(shown), ""]
    tensors = tensor_peaks(trials)
    if tensors is not None:
        parts += ["## CPU tensor peak: predicted vs measured", "", tensors.text, "", table(_tensor_table(tensors.rows)), ""]
    summary = packing_summary(trials)
    if summary is not None:
        parts += ["## GPU packing", "", *[f"- {line}" for line in packing_lines(summary)], ""]
    saved = SavedSpec.from_raw(spec)
    columns = objective_columns(saved)
    if columns:
        front = objectives_front(ranked, columns, saved)
        parts += [
            "## Pareto front of the searched objectives (multi-objective mode)",
            "",
            f"Optuna searched {', '.join(saved.search.objectives or [])} together; these trials are not beaten on all of "
            f"them by any other. ASHA early-stopped on {saved.search.metric} only (docs/multi-objective.md).",
            "",
            table(front, ["trial_id", *[c for c in ("r", "target_modules", "batch_size") if c in front], *dict.fromkeys(columns)])
            if not front.empty
            else "No trial has values for every objective yet.",
            "",
        ]
    return parts


def memory_html(
    trials: pd.DataFrame,
    spec: SpecLike,
    ranked: pd.DataFrame,
    data_table: Callable[..., str],
    not_modelled: Sequence[str] = (),
) -> str:
    """report.html sections: predictions, packing, the multi-objective front; `data_table` is analysis.html's."""
    parts = []
    predicted = predictions(trials, not_modelled)
    if predicted is not None:
        # The error only next to VRAM; next to host RSS it reads "n/a (measured host RSS, not comparable)".
        table = data_table(
            predicted.rows,
            PREDICTION_COLUMNS,
            headers={"predicted_memory_mib": "predicted VRAM (MiB)", MEMORY: "measured (MiB)", "error": "error"},
        )
        parts.append(f"<h2>Predicted vs measured memory</h2><p>{escape(predicted.text)}</p>{table}")
    tensors = tensor_peaks(trials)
    if tensors is not None:
        table = data_table(
            tensors.rows,
            list(tensors.rows.columns),
            headers={
                "tensor_peak_seq_len": "padded seq_len",
                TENSOR_PREDICTED: "predicted (MiB)",
                TENSOR: "measured (MiB, cpu_tensor_peak)",
                TENSOR_ERROR: "error",
            },
        )
        parts.append(f"<h2>CPU tensor peak: predicted vs measured</h2><p>{escape(tensors.text)}</p>{table}")
    summary = packing_summary(trials)
    if summary is not None:
        parts.append("<h2>GPU packing</h2><ul>" + "".join(f"<li>{escape(line)}</li>" for line in packing_lines(summary)) + "</ul>")
    saved = SavedSpec.from_raw(spec)
    columns = objective_columns(saved)
    if columns:
        front = objectives_front(ranked, columns, saved)
        shown = ["trial_id", *[c for c in ("r", "target_modules", "batch_size") if c in front], *dict.fromkeys(columns)]
        parts.append(
            "<h2>Pareto front of the searched objectives</h2><p>"
            + escape(
                f"Multi-objective search over {', '.join(saved.search.objectives or [])}: no other trial beats these on "
                f"all of them. ASHA early-stopped on {saved.search.metric} only (docs/multi-objective.md)."
            )
            + "</p>"
            + (data_table(front, shown) if not front.empty else "<p>No trial has values for every objective yet.</p>")
        )
    return "".join(parts)
