"""An experiment's report: what is best, what is best under each memory budget, what mattered.

`write_report` loads an experiment (analysis.results), analyses it (analysis.summary: ranking by
analysis.pareto, importances by analysis.importance), draws the charts (analysis.plots), renders
report.md here and report.html in analysis.html, and writes, under EXPERIMENT_DIR/report/:

    report.html     self-contained (charts embedded), opens offline; summary first, then details
    report.md       the same summary and tables; charts linked from plots/
    trials.csv      one row per trial, every column (trainables/metrics.py documents them)
    trials.parquet  the same with its dtypes
    plots/*.png     the charts

Everything is rendered in memory first and written only then, each file atomically where the
filesystem allows, report.html last; a sweep still running gets a report marked as partial.
Every memory figure carries its kind next to it (cuda_reserved = VRAM, host_rss = the CPU process's
RSS, cpu_tensor_peak = a CPU trial's live tensor bytes), so nobody mistakes a CPU number for VRAM.
On a CPU run the quality-vs-memory chart plots the tensor peak (host RSS barely moves), with the
estimator's prediction beside each point.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from analysis.formatting import MEMORY_NOTES, fmt_value, markdown_table
from analysis.html import render_html
from analysis.memory_report import memory_markdown
from analysis.pareto import DEFAULT_BUDGETS_GIB, MEMORY, QUALITY
from analysis.results import AnalysisInputError, Experiment, load_experiment
from analysis.summary import (  # noqa: F401 - Analysis and analyze are also this module's API
    Analysis,
    analyze,
    asha_rung_steps,
    constant_columns,
    export_command,
    trial_table_columns,
    varying_config,
)
from core import experiment_folder, storage
from core.redact import has_credentials, redact
from trainables.metrics import COLUMNS

PLOT_NAMES = {
    "quality_vs_memory": "Quality vs peak memory",
    "predicted_vs_measured": "Predicted vs measured memory",
    "loss_curves": "Eval-loss curves",
    "importance": "Hyperparameter importance",
    "rank_targets": "Rank x target modules",
    "lr_vs_loss": "Learning rate vs loss",
}


@dataclass
class ReportOutcome:
    report_dir: str
    files: list[str]
    summary_lines: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)  # trials per status (core/status.py)
    summary: dict[str, Any] = field(default_factory=dict)  # Analysis.json_summary(), what --json prints


# --- Markdown -----------------------------------------------------------------------------------


def render_markdown(analysis: Analysis, plot_files: dict[str, str] | None = None) -> str:
    """report.md: summary, budgets, trade-offs, importances, trials, and what was left out."""
    exp, spec = analysis.exp, analysis.exp.saved_spec
    kind = analysis.memory_kind
    varying, fixed = varying_config(analysis)
    search = spec.search
    parts = [
        f"# Sweep report: {analysis.name}",
        "",
        f"Experiment: `{exp.path}`  ",
        f"Model: `{spec.model.path}` ({spec.model.quantization}"
        f"{', double quant' if spec.model.double_quant else ''}), "
        f"data: `{spec.data.path}` ({spec.data.format})  ",
        (f"Objectives: {', '.join(search.objectives)} (multi-objective; ASHA on {search.metric})"
         if search.objectives else f"Objective: {search.metric} ({spec.direction(search.metric)} is better)")
        + f", up to {spec.train.max_steps} steps per trial  ",
        f"Generated: {analysis.generated_at}" + (" (**partial: the sweep is still running**)" if analysis.in_progress else ""),
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in analysis.summary],
        "",
        f"**How memory was measured:** {MEMORY_NOTES.get(kind or '', 'no measurement yet')}",
        "",
    ]
    if analysis.recommended is not None:
        parts += [
            "## Deploy the recommended trial"
            + (" (the baseline: the best does not beat it meaningfully)"
               if analysis.best is not None and analysis.recommended["trial_id"] != analysis.best["trial_id"] else ""),
            "",
            "```",
            export_command(analysis),
            "```",
            "",
            "Add `--merge` for a standalone model with the adapter merged in (see docs/report.md).",
            "",
        ]
    if analysis.task is not None:
        task = analysis.task
        parts += [
            "## Task metrics",
            "",
            "Measured inside each trial on a fixed, seeded subset of the eval split (eval.metrics; "
            f"docs/task-metrics.md). Trials ranked by {analysis.quality.describe()}, as are the best trial, the budget "
            "table, the Pareto front and the recommendation.",
            "",
            *[f"- {line}" for line in task.lines()],
            "",
            markdown_table(task.table(), list(task.table().columns)),
            "",
        ]
    title = "Best under each memory budget" if analysis.budgets_apply else (
        "Best under each memory budget (host RSS, not VRAM: budgets are not meaningful for a CPU run)"
        if kind == "host_rss" else "Best under each memory budget"
    )
    parts += [f"## {title}", "", markdown_table(analysis.budgets), ""]
    if not analysis.tradeoffs.empty:
        parts += [
            "## Pareto front: what a memory saving costs",
            "",
            f"Trials no other trial beats on both {analysis.quality.describe()} and peak memory ({kind}), from least memory up; "
            "the last two columns compare each with the best trial.",
            "",
            markdown_table(
                analysis.tradeoffs,
                ["trial_id", *varying, *dict.fromkeys((analysis.quality.column, QUALITY)), MEMORY, "memory_saved_pct",
                 "quality_lost_pct"],
            ),
            "",
        ]
    # Predicted vs measured memory, GPU packing, the multi-objective front (analysis/memory_report.py).
    parts += memory_markdown(exp.trials, spec, analysis.ranked, markdown_table, exp.plan.memory.not_modelled)
    if analysis.importance.values:
        parts += [
            "## What mattered",
            "",
            f"Importance for {analysis.importance.target}. Source: {analysis.importance.source}; "
            f"{analysis.importance.trials} trials, {analysis.importance.evaluator}.",
            "",
            *[f"- {k}: {v:.3f}" for k, v in analysis.importance.values.items()],
            *[f"- note: {n}" for n in analysis.importance.notes],
            "",
        ]
    for name, path in (plot_files or {}).items():
        parts += [f"![{PLOT_NAMES.get(name, name)}]({path})", ""]
    parts += ["## Trials", ""]
    fixed = {**fixed, **constant_columns(analysis)}
    if fixed:
        parts += ["Same in every trial: " + ", ".join(f"{k}={fmt_value(k, v)}" for k, v in fixed.items()), ""]
    parts += [markdown_table(exp.trials, trial_table_columns(analysis)), ""]
    if len(analysis.not_ranked):
        parts += ["## Trials left out of the ranking", ""]
        parts += [f"- `{r['trial_id']}` ({r['status']}): {r['reason']}" for r in analysis.not_ranked.to_dict("records")]
        parts.append("")
    parts += bad_rows_section(exp)
    if analysis.provenance:
        parts += ["## Provenance", "", *[f"- {line}" for line in analysis.provenance], ""]
    if exp.notes:
        parts += ["## Notes from loading", "", *[f"- {n}" for n in exp.notes], ""]
    parts += ["## Columns", ""]
    parts += [f"- `{c}`: {COLUMNS[c].doc}" for c in trial_table_columns(analysis) if c in COLUMNS and COLUMNS[c].doc]
    parts.append("")
    return "\n".join(parts)


# --- writing ------------------------------------------------------------------------------------


def render_plots(analysis: Analysis) -> dict[str, bytes]:
    """Every chart that has data, by name."""
    from analysis import plots

    best_id = analysis.best["trial_id"] if analysis.best is not None else None
    highlight = [t for t in dict.fromkeys([best_id, analysis.cheapest["trial_id"] if analysis.cheapest is not None else None]) if t]
    charts = {
        "quality_vs_memory": plots.quality_vs_memory(
            analysis.ranked, analysis.memory_kind, analysis.budgets_gib, highlight, analysis.quality
        ),
        "predicted_vs_measured": plots.predicted_vs_measured(analysis.exp.trials),
        "loss_curves": plots.loss_curves(
            analysis.exp.curves, analysis.exp.trials, asha_rung_steps(analysis.exp.saved_spec), best_id
        ),
        "importance": plots.importance_bars(analysis.importance.values),
        "rank_targets": plots.rank_targets_heatmap(analysis.ranked, analysis.quality),
        "lr_vs_loss": plots.lr_vs_loss(analysis.ranked, analysis.quality),
    }
    return {name: png for name, png in charts.items() if png}


def redact_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The table with credentials in URLs masked in its text cells (core/redact.py)."""
    out = frame.copy()
    for column in out.columns:
        if not (pd.api.types.is_numeric_dtype(out[column]) or pd.api.types.is_bool_dtype(out[column])):
            # A plain loop: map() on a string column keeps its dtype, which has no any().
            if any(isinstance(v, str) and has_credentials(v) for v in out[column]):
                out[column] = out[column].map(lambda v: redact(v) if isinstance(v, str) else v)
    return out


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def write_report(
    experiment_dir: str, out_dir: str | None = None, budgets_gib: Sequence[float] = DEFAULT_BUDGETS_GIB
) -> ReportOutcome:
    """Load an experiment, render its report in memory, then write the files; return where they went.

    Args:
        experiment_dir: The experiment folder or URI.
        out_dir: Where to write (default EXPERIMENT_DIR/report).
        budgets_gib: VRAM budgets for the "best under budget" table.

    Raises:
        NotAnExperiment: If the folder is not a qlora-sweep experiment.
    """
    analysis = analyze(load_experiment(experiment_dir), budgets_gib)
    report_dir = out_dir or experiment_folder.file(analysis.exp.path, experiment_folder.REPORT_DIR)
    charts = render_plots(analysis)
    trials = redact_frame(analysis.exp.trials)
    files: dict[str, bytes] = {
        "trials.csv": trials.to_csv(index=False).encode(),
        "trials.parquet": parquet_bytes(trials),
        **{f"plots/{name}.png": png for name, png in charts.items()},
        # No password or key of a URL in what the report says (core/redact.py).
        "report.md": redact(render_markdown(analysis, {name: f"plots/{name}.png" for name in charts})).encode(),
        # Last: the file people open appears only once everything it summarizes is written.
        "report.html": redact(render_html(analysis, charts)).encode(),
    }
    publish(report_dir, files, analysis.exp.path)
    return ReportOutcome(
        report_dir=report_dir, files=list(files), summary_lines=analysis.summary, statuses=dict(analysis.counts),
        summary={**analysis.json_summary(), "report_dir": report_dir, "files": list(files)},
    )


# --- inputs: skipped data rows (see docs/reliability.md) -------------------------------------------


def bad_rows_section(exp: Experiment) -> list[str]:
    """report.md's list of the data rows the sweep skipped (from data_report.json, read at load)."""
    from analysis.summary import skip_rules

    data = exp.data_report
    if not data:
        return []
    lines: list[str] = []
    if data.get("skipped_rows"):
        lines += _rows_section(
            "Bad rows skipped",
            f"`{data.get('path')}`: {data['skipped_rows']} of {data.get('rows_read')} rows were skipped "
            f"({skip_rules(data)}). Fix them, or set on_bad_rows / on_long_rows: error to stop on them.",
            data.get("skipped"),
            int(data["skipped_rows"]),
        )
    if data.get("truncated_rows"):
        lines += _rows_section(
            "Long rows truncated",
            f"`{data.get('path')}`: {data['truncated_rows']} rows were longer than data.max_seq_length "
            f"({data.get('max_seq_length')}) and were cut to it (data.on_long_rows: truncate): the response loses its "
            "end, the prompt is never cut.",
            data.get("truncated"),
            int(data["truncated_rows"]),
        )
    return lines


def _rows_section(title: str, intro: str, listed: list[str] | None, total: int) -> list[str]:
    """A report.md section listing data rows (data_report.json keeps the first few of `total`)."""
    listed = list(listed or [])
    more = total - len(listed)
    return [f"## {title}", "", intro, "", *[f"- {m}" for m in listed], *([f"- ... and {more} more"] if more > 0 else []), ""]


# --- publishing: never a half-written report that looks complete (see docs/reliability.md) ---------

# The files that present a report as complete: removed before a rewrite, written last.
SUMMARY_FILES = ("report.md", "report.html")


class ReportWriteError(AnalysisInputError):
    """The report could not be written completely; no report.md/report.html was left claiming it was."""


def publish(report_dir: str, files: dict[str, bytes], experiment_dir: str) -> None:
    """Write the rendered files, each atomically where the filesystem allows, summaries last.

    Old summaries are removed first, so that a stale report.html never sits next to half-rewritten
    data, and on a failure (full disk, unwritable folder) the summaries written so far are removed.

    Raises:
        ReportWriteError: With the file that failed, the reason, and how to write the report again.
    """
    order = [n for n in files if n not in SUMMARY_FILES] + [n for n in SUMMARY_FILES if n in files]
    name = SUMMARY_FILES[0]
    try:
        for name in SUMMARY_FILES:
            _delete_if_present(storage.join(report_dir, name))
        for name in order:
            storage.write_bytes(storage.join(report_dir, *name.split("/")), files[name])
    except OSError as exc:
        for summary in SUMMARY_FILES:
            with contextlib.suppress(OSError):
                _delete_if_present(storage.join(report_dir, summary))
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ReportWriteError(
            f"cannot write the report to {report_dir}: {name} failed ({reason}). No report.md or report.html "
            f"was left behind; the experiment itself is untouched. Free space or pass a writable --out, then "
            f"run `qlora-sweep report {experiment_dir}`"
        ) from None


def _delete_if_present(location: str) -> None:
    fs, path = storage.filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
