"""How the report writes values: table cells, losses, memory figures with their kind, Markdown tables.

Shared by report.md (analysis/report.py), report.html (analysis/html.py) and compare
(analysis/compare.py), so the two report formats print every number the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from analysis.pareto import MEMORY, QUALITY

# What each memory kind measured, in words (trainables/metrics.py MEMORY_KINDS names them).
MEMORY_NOTES = {
    "cuda_reserved": (
        "VRAM as torch.cuda.max_memory_reserved on the trial's GPU: everything PyTorch's caching allocator "
        "held at the peak. It excludes the CUDA context (about 0.3-0.5 GiB per process) that nvidia-smi also "
        "counts, so leave that much headroom under a budget."
    ),
    "host_rss": (
        "Peak resident set size of the trial's process on the host (a CPU run): the model, optimizer and "
        "activations in host RAM plus Python, PyTorch and libraries. It is not VRAM, and GPU budgets do not "
        "apply to it; use it to compare trials of this run with each other."
    ),
    "cpu_tensor_peak": (
        "The most bytes of PyTorch tensors alive at once in a CPU trial (parameters, gradients, optimizer states, "
        "activations, temporaries) over its first optimizer steps and first evaluation: torch.profiler's CPU allocator "
        "events summed in time order, plus the tensors the trial held when each window opened. It leaves out Python "
        "and the libraries, so it moves with r, target modules and batch size, and it is the quantity the estimator's "
        "allocated bytes predict for the same CPU setup (fp32). It is host RAM, not VRAM."
    ),
}


def present(value: Any) -> bool:
    """Whether a table cell holds a value (not None, pd.NA or NaN); strings and other objects count."""
    if value is None or value is pd.NA:
        return False
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def memory_label(value: float | None, kind: str | None) -> str:
    """'612 MiB host RSS (CPU, not VRAM)' / '9,812 MiB VRAM (9.58 GiB)'."""
    if not present(value):
        return "n/a"
    value = float(value)
    if kind == "cuda_reserved":
        return f"{value:,.0f} MiB VRAM ({value / 1024:.2f} GiB)"
    names = {"host_rss": "host RSS (CPU, not VRAM)", "cpu_tensor_peak": "CPU tensor peak (not VRAM)"}
    shown = f"{value:,.2f}" if kind == "cpu_tensor_peak" and abs(value) < 100 else f"{value:,.0f}"
    return f"{shown} MiB {names.get(kind or '', kind or 'unknown kind')}"


def fmt_loss(value: Any) -> str:
    return f"{float(value):.4f}" if present(value) else "n/a"


def fmt_value(name: str, value: Any) -> str:
    """A table cell: learning rates in scientific notation, counts with separators, losses with 4 decimals."""
    if not present(value):
        return ""
    if name in ("learning_rate",):
        return f"{float(value):.2e}"
    if name in (QUALITY, "final_eval_loss"):
        return f"{float(value):.4f}"
    if name in ("memory_error_pct", "memory_saved_pct", "quality_lost_pct", "tensor_peak_error_pct"):
        return f"{float(value):+.1f}%"
    if name in ("tensor_peak_mib", "predicted_tensor_peak_mib"):
        return f"{float(value):,.3f}" if abs(float(value)) < 100 else f"{float(value):,.0f}"  # tiny models: a few MiB
    if name in (MEMORY, "predicted_memory_mib", "headroom_mib", "tokens_per_s"):
        return f"{float(value):,.0f}"
    if name in ("budget_gib",):
        return f"{float(value):g} GiB"
    if name == "wall_s":
        return f"{float(value):.1f}"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return str(value)


def config_text(row: pd.Series | dict[str, Any], columns: Sequence[str]) -> str:
    """'r=32, lora_alpha=32, target_modules=attention, learning_rate=4.83e-03, ...'."""
    return ", ".join(f"{c}={fmt_value(c, row[c])}" for c in columns if c in row and present(row[c]))


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    columns = list(columns or frame.columns)

    def cell(name: str, value: Any) -> str:
        return fmt_value(name, value).replace("|", "\\|")

    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in frame.to_dict("records")]
    return "\n".join([head, rule, *body])
