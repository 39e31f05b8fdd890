"""The one data model for a trial's result.

Every metric a trial reports, and every column of the trials table, is declared here once with
its unit, its dtype and whether lower or higher is better. The trainable reports these names,
the driver optimizes and schedules on them, and the report reads, sorts and labels with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
)

# Trial-level columns of trials.csv beyond the search-space config columns.
TRIAL_COLUMNS: tuple[Column, ...] = (
    Column("trial_id", "string", "", None, "Ray Tune trial id."),
    Column("status", "string", "", None, "completed | early_stopped | running | failed | oom | infeasible | diverged."),
    Column("best_eval_loss", "float64", "nats/token", "lower", "Lowest eval_loss the trial reached."),
    Column("final_eval_loss", "float64", "nats/token", "lower", "eval_loss at the trial's last evaluation."),
    Column("steps", "Int64", "steps", None, "Optimizer steps the trial ran."),
    Column("peak_memory_mib", "float64", "MiB", "lower", "Peak memory; see memory_kind."),
    Column("memory_kind", "string", "", None, "cuda_reserved (VRAM) or host_rss (CPU process RSS)."),
    Column("trainable_params", "Int64", "params", None, "LoRA parameters being trained."),
    Column("tokens_per_s", "float64", "tokens/s", "higher", "Mean training throughput."),
    Column("wall_s", "float64", "s", "lower", "Wall-clock time of the trial."),
    Column("node", "string", "", None, "IP of the node the trial ran on."),
    Column("error", "string", "", None, "First line of the error for failed trials."),
)

# The objective the searcher and ASHA optimize in single-objective mode.
OBJECTIVE = "eval_loss"

MEMORY_KINDS = {
    "cuda_reserved": "VRAM: torch.cuda.max_memory_reserved",
    "host_rss": "host RAM: peak RSS of the trial process (CPU run, not VRAM)",
}

COLUMNS: dict[str, Column] = {c.name: c for c in (*REPORTED_METRICS, *TRIAL_COLUMNS)}


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
