"""The one data model for a trial's result.

Every metric a trial reports, and every column of the trials table, is declared here once with
its unit, its dtype and whether lower or higher is better. The trainable reports these names,
the driver optimizes and schedules on them, and the report reads, sorts and labels with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.status import ALL_STATUSES
from trainables.params import ALPHA_RATIO_PARAM, KNOBS

# VRAM budgets (GiB) the report ranks trials under by default ("best under budget"). Here, not in
# analysis/pareto.py, so the CLI's --budget-gib default is known without importing pandas.
DEFAULT_BUDGETS_GIB: tuple[float, ...] = (8, 16, 24, 48, 80)

Direction = Literal["lower", "higher"]


@dataclass(frozen=True)
class Column:
    """One column of the trials table.

    Attributes:
        name: Column name, identical in Tune results, trials.csv and the report.
        dtype: pandas dtype the loader casts to.
        unit: Unit shown next to the figure in reports ("" when dimensionless).
        better: "lower" or "higher" for quality/cost metrics; None for descriptive columns.
        doc: One line for the report legend.
    """

    name: str
    dtype: str
    unit: str = ""
    better: Direction | None = None
    doc: str = ""


# Metrics a trial reports to Tune after every evaluation round.
REPORTED_METRICS: tuple[Column, ...] = (
    Column("eval_loss", "float64", "nats/token", "lower", "Mean cross-entropy on the held-out eval split."),
    Column("perplexity", "float64", "", "lower", "exp(eval_loss)."),
    Column("train_loss", "float64", "nats/token", "lower", "Mean training loss since the previous evaluation."),
    Column("step", "Int64", "steps", None, "Optimizer steps done so far."),
    Column("tokens_seen", "Int64", "tokens", None, "Training tokens processed so far (non-padding)."),
    Column("tokens_per_s", "float64", "tokens/s", "higher", "Training throughput, excluding evaluation."),
    Column(
        "peak_memory_mib",
        "float64",
        "MiB",
        "lower",
        "Peak memory of the trial; what was measured is in memory_kind.",
    ),
    Column(
        "memory_kind",
        "string",
        "",
        None,
        "cuda_reserved: torch.cuda.max_memory_reserved on the trial's GPU; "
        "host_rss: peak resident set size of the trial's process (CPU runs, not VRAM).",
    ),
    Column("cuda_allocated_mib", "float64", "MiB", "lower", "torch.cuda.max_memory_allocated (CUDA only)."),
    Column("trainable_params", "Int64", "params", None, "LoRA parameters being trained."),
    Column("total_params", "Int64", "params", None, "All parameters of the PEFT model (4-bit weights counted unpacked)."),
    Column("trial_status", "string", "", None, "Set only on a trial's terminal report when it ended abnormally."),
    Column(
        "predicted_memory_mib",
        "float64",
        "MiB",
        "lower",
        "Peak VRAM (torch.cuda.max_memory_reserved) predicted before the trial ran, for a CUDA GPU "
        "(trainables/trial_memory.py); on a CPU run still the VRAM prediction; empty without a prediction.",
    ),
    Column("oom_message", "string", "", None, "First line of the out-of-memory error, on an oom trial's terminal report."),
    Column(
        "checkpoint_fallback",
        "string",
        "",
        None,
        "Set on the reports of a restored trial whose latest checkpoint was unreadable: which one, why, and the "
        "older checkpoint it continued from (trainables/checkpoints.py).",
    ),
    Column(
        "timeout_message",
        "string",
        "",
        None,
        "What the trial watchdog saw (train.trial_timeout_s or stall_timeout_s passed, at which step), on a "
        "timed_out trial's terminal report (trainables/watchdog.py).",
    ),
    # The CPU tensor peak (trainables/memory_probe.py TensorPeakProbe): what moves with the configuration on CPU.
    Column(
        "tensor_peak_mib",
        "float64",
        "MiB",
        "lower",
        "CPU runs: the most tensor bytes alive at once (parameters, gradients, optimizer states, activations, "
        "temporaries) during the first optimizer steps and the first evaluation, from torch.profiler's CPU allocator "
        "events plus what the trial held when each window opened (memory kind cpu_tensor_peak; host RAM, not VRAM).",
    ),
    Column("tensor_peak_kind", "string", "", None, "cpu_tensor_peak where tensor_peak_mib was measured."),
    Column(
        "predicted_tensor_peak_mib",
        "float64",
        "MiB",
        "lower",
        "The estimator's allocated bytes (trainables/trial_memory.py) for the trial's CPU setup (fp32, no autocast) at "
        "the batch shape its profiled steps trained on; what tensor_peak_mib is compared with.",
    ),
    Column(
        "tensor_peak_seq_len",
        "Int64",
        "tokens",
        None,
        "Longest padded sequence length among the profiled training batches (the CPU prediction's seq_len).",
    ),
    Column("oom_batch_size", "Int64", "examples", None, "Micro-batch the trial ran out of memory with."),
    # Task evaluation's cost (trainables/task_metrics.py), on the reports after which it ran.
    Column("task_eval_s", "float64", "s", "lower", "Seconds the task evaluation (eval.metrics) took after this round."),
    Column(
        "task_eval_peak_mib",
        "float64",
        "MiB",
        "lower",
        "Peak memory while the task evaluation ran (the trial's memory_kind: VRAM on CUDA, host RSS on CPU).",
    ),
)

REPORTED: dict[str, Column] = {c.name: c for c in REPORTED_METRICS}

# Trial-level columns of trials.csv beyond the search-space config columns.
TRIAL_COLUMNS: tuple[Column, ...] = (
    Column("trial_id", "string", "", None, "Ray Tune trial id."),
    Column("status", "string", "", None, " | ".join(ALL_STATUSES) + " (core/status.py)."),
    Column("best_eval_loss", "float64", "nats/token", "lower", "Lowest eval_loss the trial reached."),
    Column("final_eval_loss", "float64", "nats/token", "lower", "eval_loss at the trial's last evaluation."),
    Column("steps", "Int64", "steps", None, "Optimizer steps the trial ran."),
    # The same figures as the trial's reports (the peak is the highest reported, the others the last).
    REPORTED["peak_memory_mib"],
    REPORTED["memory_kind"],
    REPORTED["trainable_params"],
    REPORTED["tokens_per_s"],
    Column("wall_s", "float64", "s", "lower", "Wall-clock time of the trial."),
    Column("node", "string", "", None, "IP of the node the trial ran on."),
    Column("node_id", "string", "", None, "Ray node id of the node the trial ran on (unique even when IPs repeat)."),
    Column("error", "string", "", None, "First line of the error for failed trials."),
    # Report and export columns (analysis/).
    Column("best_step", "Int64", "steps", None, "Step of the evaluation with the lowest eval_loss."),
    REPORTED["total_params"],
    REPORTED["predicted_memory_mib"],
    REPORTED["tensor_peak_mib"],
    REPORTED["tensor_peak_kind"],
    REPORTED["predicted_tensor_peak_mib"],
    REPORTED["tensor_peak_seq_len"],
    Column(
        "tensor_peak_error_pct",
        "float64",
        "%",
        None,
        "(predicted_tensor_peak_mib - tensor_peak_mib) / tensor_peak_mib x 100 (CPU runs).",
    ),
    Column(
        "memory_error_pct",
        "float64",
        "%",
        None,
        "(predicted - measured) / measured x 100; only where memory_kind is cuda_reserved (VRAM).",
    ),
    Column("device", "string", "", None, "cpu or cuda:N."),
    Column("iterations", "Int64", "rounds", None, "Evaluation rounds reported to Tune (ASHA's time unit)."),
    Column(
        "checkpoint_path",
        "string",
        "",
        None,
        "The trial's kept checkpoint with the lowest eval_loss (adapter + tokenizer); what export copies.",
    ),
    Column("trial_dir", "string", "", None, "The trial's folder in the experiment."),
    # Memory admission, GPU packing and OOM handling (sweeps/admission.py, docs/memory.md).
    Column(
        "infeasible_reason",
        "string",
        "",
        None,
        "Why a configuration was rejected before launch: predicted not to fit the GPU, or dominated by an OOM config.",
    ),
    Column("gpu_fraction", "float64", "GPU", None, "Share of a GPU the trial asked Ray for (resources.pack)."),
    Column("gpu_ids", "string", "", None, "GPU ids Ray gave the trial on its node (with resources.pack)."),
    Column("started_at", "float64", "s", None, "When the trial started (Unix time)."),
    Column("ended_at", "float64", "s", None, "When the trial last reported (Unix time)."),
    Column("micro_batch_size", "Int64", "examples", None, "Micro-batch the trial trained with (half its config's after an OOM retry)."),
    Column("oom_retry", "string", "", None, "Set when the trial ran out of memory and retried with half the micro-batch."),
    Column(
        "baseline", "boolean", "", None,
        "The baseline trial: the standard QLoRA recipe mapped to the space, trained to the full budget (search.baseline).",
    ),
    # Task metrics (eval.metrics) add best_<metric> and final_<metric> columns, named and directed by the
    # spec (trainables/task_metrics.py, `task_columns`); their evaluation's cost:
    Column("task_eval_total_s", "float64", "s", "lower", "Seconds the trial spent in task evaluation, all rounds."),
    REPORTED["task_eval_peak_mib"],  # the highest of the trial's task evaluations
)
# The trial-config key (and trials-table column) that marks the baseline trial (sweeps/baseline.py).
BASELINE_COLUMN = "baseline"

# The search-space columns of trials.csv (one trial's config), from the hyperparameter registry.
CONFIG_COLUMNS: tuple[Column, ...] = tuple(
    Column(k.name, k.column_dtype, "examples" if k.name == "batch_size" else "", None, k.doc) for k in KNOBS
) + (Column(ALPHA_RATIO_PARAM, "float64", "", None, "alpha / r, when the space draws alpha as a multiple of r."),)

# The objective the searcher and ASHA optimize in single-objective mode.
OBJECTIVE = "eval_loss"

MEMORY_KINDS = {
    "cuda_reserved": "VRAM: torch.cuda.max_memory_reserved",
    "host_rss": "host RAM: peak RSS of the trial process (CPU run, not VRAM)",
    "cpu_tensor_peak": "host RAM: peak of live tensor bytes over the first steps and evaluation (torch.profiler, CPU run, not VRAM)",
}

COLUMNS: dict[str, Column] = {c.name: c for c in (*REPORTED_METRICS, *TRIAL_COLUMNS, *CONFIG_COLUMNS)}


def task_columns(name: str, better: Direction, unit: str = "") -> tuple[Column, Column]:
    """The trials-table columns of one task metric: its best and its last measured value."""
    best = "highest" if better == "higher" else "lowest"
    return (
        Column(f"best_{name}", "float64", unit, better, f"The {best} {name} the trial measured (eval.metrics)."),
        Column(f"final_{name}", "float64", unit, better, f"{name} at the trial's last task evaluation."),
    )


def direction(name: str) -> Direction:
    """Return "lower" or "higher" for an optimizable metric.

    Raises:
        KeyError: If the metric is unknown or has no direction.
    """
    column = COLUMNS[name]
    if column.better is None:
        raise KeyError(f"{name} is descriptive and has no better direction")
    return column.better


def tune_mode(name: str) -> Literal["min", "max"]:
    """Map a metric's direction to Ray Tune's mode string."""
    return "min" if direction(name) == "lower" else "max"
