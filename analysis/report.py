"""An experiment's report: what is best, what is best under each memory budget, what mattered.

`write_report` loads an experiment (analysis.results), analyses it (analysis.pareto,
analysis.importance), draws the charts (analysis.plots) and writes, under EXPERIMENT_DIR/report/:

    report.html     self-contained (charts embedded), opens offline; summary first, then details
    report.md       the same summary and tables; charts linked from plots/
    trials.csv      one row per trial, every column (trainables/metrics.py documents them)
    trials.parquet  the same with its dtypes
    plots/*.png     the charts

Everything is rendered in memory first and written only then, each file atomically where the
filesystem allows, report.html last; a sweep still running gets a report marked as partial.
Every memory figure carries its kind next to it (cuda_reserved = VRAM, host_rss = the CPU process's
RSS), so nobody mistakes a CPU number for VRAM.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from analysis.importance import Importance, param_importances
from analysis.memory_report import memory_markdown, memory_summary_lines
from analysis.pareto import (
    DEFAULT_BUDGETS_GIB,
    MEMORY,
    QUALITY,
    RANKABLE_STATUSES,
    WITHIN_OF_BEST,
    best_trial,
    best_under_budgets,
    cheapest_within,
    pareto_front,
    primary_memory_kind,
    rankable,
    tradeoff_table,
)
from analysis.results import STATUSES, AnalysisInputError, Experiment, load_experiment
from core import storage
from trainables.metrics import COLUMNS

IN_PROGRESS_STATUSES = ("running", "pending", "paused")
PLOT_NAMES = {
    "quality_vs_memory": "Quality vs peak memory",
    "loss_curves": "Eval-loss curves",
    "importance": "Hyperparameter importance",
    "rank_targets": "Rank x target modules",
    "lr_vs_loss": "Learning rate vs loss",
}
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
}


@dataclass
class ReportOutcome:
    report_dir: str
    files: list[str]
    summary_lines: list[str] = field(default_factory=list)


@dataclass
class Analysis:
    """Everything the report shows, computed once and rendered as HTML and Markdown.

    Attributes:
        exp: The experiment as loaded.
        budgets_gib: The memory budgets asked about.
        memory_kind: The memory kind compared (see analysis.pareto.primary_memory_kind).
        ranked: Rankable trials of that kind, with an `on_front` column.
        best: The best trial (None before any evaluation).
        cheapest: The lowest-memory trial within 1% of the best.
        budgets: Best trial per budget (analysis.pareto.best_under_budgets).
        tradeoffs: The Pareto front from least memory up, with its cost against the best.
        importance: Parameter importances and their source.
        not_ranked: Trials left out of the ranking, with a `reason` column.
        counts: Trials per status.
        generated_at: When the report was made (local time).
    """

    exp: Experiment
    budgets_gib: tuple[float, ...]
    memory_kind: str | None
    ranked: pd.DataFrame
    best: pd.Series | None
    cheapest: pd.Series | None
    budgets: pd.DataFrame
    tradeoffs: pd.DataFrame
    importance: Importance
    not_ranked: pd.DataFrame
    counts: dict[str, int]
    generated_at: str

    @property
    def in_progress(self) -> bool:
        return any(self.counts.get(s, 0) for s in IN_PROGRESS_STATUSES)

    @property
    def budgets_apply(self) -> bool:
        """GPU budgets are about VRAM; for any other memory kind the budget table is only illustrative."""
        return self.memory_kind == "cuda_reserved"

    @property
    def name(self) -> str:
        return str(self.exp.spec.get("name") or self.exp.path.rstrip("/").rsplit("/", 1)[-1])


def analyze(
    exp: Experiment, budgets_gib: Sequence[float] = DEFAULT_BUDGETS_GIB, *, importance: bool = True
) -> Analysis:
    """Compute the report's content from a loaded experiment (no files written)."""
    trials = exp.trials
    kind = primary_memory_kind(trials)
    ranked = rankable(trials, kind).copy()
    ranked["on_front"] = pareto_front(ranked)
    counts = {s: int(n) for s, n in trials["status"].value_counts().items()}
    counts = {s: counts[s] for s in sorted(counts, key=lambda s: STATUSES.index(s) if s in STATUSES else 99)}
    return Analysis(
        exp=exp,
        budgets_gib=tuple(float(b) for b in budgets_gib),
        memory_kind=kind,
        ranked=ranked,
        best=best_trial(ranked),
        cheapest=cheapest_within(ranked),
        budgets=best_under_budgets(ranked, budgets_gib),
        tradeoffs=tradeoff_table(ranked),
        importance=param_importances(exp) if importance else Importance({}, "not computed"),
        not_ranked=_not_ranked(trials, ranked, kind),
        counts=counts,
        generated_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


def _not_ranked(trials: pd.DataFrame, ranked: pd.DataFrame, kind: str | None) -> pd.DataFrame:
    """Trials not in the ranking, each with the reason; nothing is dropped silently."""
    rest = trials[~trials["trial_id"].isin(ranked["trial_id"])].copy()
    reasons = []
    for row in rest.to_dict("records"):
        status, error = row["status"], row.get("error")
        error = None if error is None or error is pd.NA else str(error)
        if status == "oom":
            reason = "ran out of memory" + (f": {error}" if error else "")
        elif status == "diverged":
            reason = "loss became NaN/inf" + (f" by step {row['steps']}" if _present(row.get("steps")) else "")
        elif status == "infeasible" and _present(row.get("infeasible_reason")):
            reason = f"rejected before launch: {row['infeasible_reason']}"  # sweeps/admission.py says why
        elif status == "infeasible":
            reason = "rejected before launch: predicted not to fit" + (
                f" ({row['predicted_memory_mib']:,.0f} MiB predicted)" if _present(row.get("predicted_memory_mib")) else ""
            )
        elif status == "failed":
            reason = f"failed: {error}" if error else "failed (no error file)"
        elif status not in RANKABLE_STATUSES:
            reason = f"{status}: no evaluation yet"
        elif not _present(row.get(QUALITY)):
            reason = "no evaluation yet"
        elif not _present(row.get(MEMORY)):
            reason = "no memory measurement"
        else:
            reason = f"memory measured as {row.get('memory_kind')}, not comparable with {kind}"
        reasons.append(reason)
    return rest.assign(reason=pd.Series(reasons, index=rest.index, dtype="string"))


# --- formatting ---------------------------------------------------------------------------------


def _present(value: Any) -> bool:
    if value is None or value is pd.NA:
        return False
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def memory_label(value: float | None, kind: str | None) -> str:
    """'612 MiB host RSS (CPU, not VRAM)' / '9,812 MiB VRAM (9.58 GiB)'."""
    if not _present(value):
        return "n/a"
    value = float(value)
    if kind == "cuda_reserved":
        return f"{value:,.0f} MiB VRAM ({value / 1024:.2f} GiB)"
    names = {"host_rss": "host RSS (CPU, not VRAM)"}
    return f"{value:,.0f} MiB {names.get(kind or '', kind or 'unknown kind')}"


def fmt_loss(value: Any) -> str:
    return f"{float(value):.4f}" if _present(value) else "n/a"


def fmt_value(name: str, value: Any) -> str:
    """A table cell: learning rates in scientific notation, counts with separators, losses with 4 decimals."""
    if not _present(value):
        return ""
    if name in ("learning_rate",):
        return f"{float(value):.2e}"
    if name in (QUALITY, "final_eval_loss"):
        return f"{float(value):.4f}"
    if name in ("memory_error_pct", "memory_saved_pct", "loss_increase_pct"):
        return f"{float(value):+.1f}%"
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
    return ", ".join(f"{c}={fmt_value(c, row[c])}" for c in columns if c in row and _present(row[c]))


def varying_config(analysis: Analysis) -> tuple[list[str], dict[str, Any]]:
    """Config columns that differ between trials, and the fixed ones with their single value."""
    trials = analysis.exp.trials
    varying, fixed = [], {}
    for column in analysis.exp.config_columns:
        if column not in trials:
            continue
        values = trials[column].dropna().unique()
        if len(values) > 1:
            varying.append(column)
        elif len(values) == 1:
            fixed[column] = values[0]
    return varying, fixed


def headline_config(analysis: Analysis) -> list[str]:
    """The config columns to describe a trial by: those that vary, or all when nothing does."""
    varying, fixed = varying_config(analysis)
    return varying or list(fixed)


def trial_table_columns(analysis: Analysis) -> list[str]:
    """The trials-table columns worth showing: varying config, quality, memory, cost, where."""
    varying, _ = varying_config(analysis)
    shown = ["trial_id", "status", *varying, QUALITY, "final_eval_loss", "best_step", "steps", MEMORY, "memory_kind"]
    if analysis.exp.trials["predicted_memory_mib"].notna().any():
        shown += ["predicted_memory_mib", "memory_error_pct"]
    shown += ["trainable_params", "tokens_per_s", "wall_s", "node"]
    trials = analysis.exp.trials
    shown = [c for c in shown if c not in constant_columns(analysis)]
    return [c for c in dict.fromkeys(shown) if c in trials and (trials[c].notna().any() or c in ("trial_id", "status"))]


def constant_columns(analysis: Analysis) -> dict[str, Any]:
    """Descriptive columns with one value across all trials, stated once instead of in every row."""
    trials, out = analysis.exp.trials, {}
    for column in ("memory_kind", "node", "device"):
        values = trials[column].dropna().unique() if column in trials else []
        if len(values) == 1 and len(trials) > 1:
            out[column] = values[0]
    return out


def asha_rung_steps(spec: dict[str, Any]) -> list[int]:
    """Steps at which ASHA compares trials (grace_period x reduction_factor^k rounds, below max_t)."""
    asha = (spec.get("scheduler") or {}).get("asha")
    train = spec.get("train") or {}
    if not asha or not train.get("eval_every"):
        return []
    rounds = int(train["max_steps"]) // int(train["eval_every"])
    max_t = int(asha.get("max_t") or rounds)
    rung, steps = float(asha.get("grace_period") or 1), []
    while rung < max_t and len(steps) < 20:
        steps.append(int(round(rung)) * int(train["eval_every"]))
        rung *= float(asha.get("reduction_factor") or 2)
    return steps


def export_command(analysis: Analysis, trial_id: str | None = None) -> str:
    trial = trial_id or (analysis.best["trial_id"] if analysis.best is not None else "best")
    return f"qlora-sweep export {analysis.exp.path} --trial {trial} --out ./{analysis.name}-{trial}-adapter"


# --- summary ------------------------------------------------------------------------------------


def summary_lines(analysis: Analysis | Experiment) -> list[str]:
    """The report's summary as plain lines, for the console and the top of report.md."""
    if isinstance(analysis, Experiment):
        analysis = analyze(analysis, importance=False)
    counts = analysis.counts
    total = sum(counts.values())
    lines = [f"trials: {total} (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")" if total else "trials: none yet"]
    if analysis.in_progress:
        lines.append("the sweep is still running: this is a partial report")
    lines += input_lines(analysis.exp)
    best, kind = analysis.best, analysis.memory_kind
    if best is None:
        lines.append("no trial has reported an evaluation yet")
        return lines
    lines.append(
        f"best: trial {best['trial_id']} eval_loss {fmt_loss(best[QUALITY])} ({config_text(best, headline_config(analysis))}), "
        f"peak memory {memory_label(best[MEMORY], kind)}"
    )
    cheap = analysis.cheapest
    if cheap is not None and cheap["trial_id"] != best["trial_id"]:
        saved = (float(best[MEMORY]) - float(cheap[MEMORY])) / float(best[MEMORY]) * 100
        lines.append(
            f"cheapest within {WITHIN_OF_BEST:.0%} of best: trial {cheap['trial_id']} eval_loss {fmt_loss(cheap[QUALITY])}, "
            f"{memory_label(cheap[MEMORY], kind)} ({saved:.1f}% less memory)"
        )
    elif cheap is not None:
        lines.append(f"cheapest within {WITHIN_OF_BEST:.0%} of best: the best trial itself (nothing cheaper comes close)")
    per_budget = ", ".join(
        f"{b.budget_gib:g} GiB: " + (f"{b.trial_id} ({fmt_loss(b.best_eval_loss)})" if _present(b.trial_id) else "none fits")
        for b in analysis.budgets.itertuples()
    )
    if analysis.budgets_apply:
        lines.append(f"best under each VRAM budget: {per_budget}")
    else:
        lines.append(
            f"memory budgets ({', '.join(f'{b:g}' for b in analysis.budgets_gib)} GiB) are VRAM budgets and not meaningful "
            f"for this run: memory was measured as {kind}"
            + (", the host RSS of CPU trial processes, not VRAM" if kind == "host_rss" else "")
        )
    lines += memory_summary_lines(analysis.exp.trials, analysis.exp.spec)
    if analysis.importance.values:
        top = list(analysis.importance.values.items())[:3]
        lines.append("what mattered most: " + ", ".join(f"{k} ({v:.2f})" for k, v in top))
    if len(analysis.not_ranked):
        lines.append(
            f"not ranked: {len(analysis.not_ranked)} trials ("
            + ", ".join(f"{n} {s}" for s, n in analysis.not_ranked["status"].value_counts().items())
            + "); listed in the report"
        )
    return lines


# --- Markdown -----------------------------------------------------------------------------------


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    columns = list(columns or frame.columns)

    def cell(name: str, value: Any) -> str:
        return fmt_value(name, value).replace("|", "\\|")

    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in frame.to_dict("records")]
    return "\n".join([head, rule, *body])


def render_markdown(analysis: Analysis, plot_files: dict[str, str] | None = None) -> str:
    """report.md: summary, budgets, trade-offs, importances, trials, and what was left out."""
    exp, spec = analysis.exp, analysis.exp.spec
    kind = analysis.memory_kind
    varying, fixed = varying_config(analysis)
    parts = [
        f"# Sweep report: {analysis.name}",
        "",
        f"Experiment: `{exp.path}`  ",
        f"Model: `{spec['model']['path']}` ({spec['model']['quantization']}"
        f"{', double quant' if spec['model'].get('double_quant') else ''}), "
        f"data: `{spec['data']['path']}` ({spec['data']['format']})  ",
        (f"Objectives: {', '.join(spec['search']['objectives'])} (multi-objective; ASHA on {spec['search']['metric']})"
         if spec["search"].get("objectives") else f"Objective: {spec['search']['metric']} (lower is better)")
        + f", up to {spec['train']['max_steps']} steps per trial  ",
        f"Generated: {analysis.generated_at}" + (" (**partial: the sweep is still running**)" if analysis.in_progress else ""),
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary_lines(analysis)],
        "",
        f"**How memory was measured:** {MEMORY_NOTES.get(kind or '', 'no measurement yet')}",
        "",
    ]
    if analysis.best is not None:
        parts += [
            "## Deploy the best trial",
            "",
            "```",
            export_command(analysis),
            "```",
            "",
            "Add `--merge` for a standalone model with the adapter merged in (see docs/report.md).",
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
            f"Trials no other trial beats on both eval loss and peak memory ({kind}), from least memory up; "
            "the last two columns compare each with the best trial.",
            "",
            markdown_table(
                analysis.tradeoffs,
                ["trial_id", *varying, QUALITY, MEMORY, "memory_saved_pct", "loss_increase_pct"],
            ),
            "",
        ]
    # Predicted vs measured memory, GPU packing, the multi-objective front (analysis/memory_report.py).
    parts += memory_markdown(exp.trials, spec, analysis.ranked, markdown_table)
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
        "quality_vs_memory": plots.quality_vs_memory(analysis.ranked, analysis.memory_kind, analysis.budgets_gib, highlight),
        "loss_curves": plots.loss_curves(analysis.exp.curves, analysis.exp.trials, asha_rung_steps(analysis.exp.spec), best_id),
        "importance": plots.importance_bars(analysis.importance.values),
        "rank_targets": plots.rank_targets_heatmap(analysis.ranked),
        "lr_vs_loss": plots.lr_vs_loss(analysis.ranked),
    }
    return {name: png for name, png in charts.items() if png}


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
    from analysis.html import render_html

    analysis = analyze(load_experiment(experiment_dir), budgets_gib)
    report_dir = out_dir or storage.join(analysis.exp.path, "report")
    charts = render_plots(analysis)
    files: dict[str, bytes] = {
        "trials.csv": analysis.exp.trials.to_csv(index=False).encode(),
        "trials.parquet": parquet_bytes(analysis.exp.trials),
        **{f"plots/{name}.png": png for name, png in charts.items()},
        "report.md": render_markdown(analysis, {name: f"plots/{name}.png" for name in charts}).encode(),
        # Last: the file people open appears only once everything it summarizes is written.
        "report.html": render_html(analysis, charts).encode(),
    }
    publish(report_dir, files, analysis.exp.path)
    return ReportOutcome(report_dir=report_dir, files=list(files), summary_lines=summary_lines(analysis))


# --- inputs: skipped data rows and remote code (see docs/reliability.md) ------------------------


def read_data_report(exp: Experiment) -> dict[str, Any] | None:
    """The driver's data_report.json (rows read, train/eval counts, skipped rows), None if absent."""
    location = storage.join(exp.path, storage.DATA_REPORT_FILE)
    if not storage.exists(location):
        return None  # experiments from before the file existed
    try:
        value = json.loads(storage.read_text(location))
    except (OSError, ValueError):
        return {"unreadable": True}
    return value if isinstance(value, dict) else {"unreadable": True}


def input_lines(exp: Experiment) -> list[str]:
    """Summary lines about what went into the sweep: bad rows skipped, remote code trusted."""
    lines = []
    data = read_data_report(exp)
    if data and data.get("unreadable"):
        lines.append(f"data: {storage.DATA_REPORT_FILE} is unreadable, so skipped bad rows cannot be counted")
    elif data and data.get("skipped_rows"):
        lines.append(
            f"data: {data['skipped_rows']} bad rows skipped (data.on_bad_rows: skip) of {data.get('rows_read')} read; "
            f"trained on {data.get('train_rows')}, evaluated on {data.get('eval_rows')}; listed in the report"
        )
    model = exp.spec.get("model") or {}
    if model.get("trust_remote_code"):
        lines.append(
            f"trust_remote_code was ON: Python code shipped with the model '{model.get('path')}' ran on the driver "
            "and on every trial worker"
        )
    return lines


def bad_rows_section(exp: Experiment) -> list[str]:
    """report.md's list of the data rows the sweep skipped."""
    data = read_data_report(exp)
    if not data or not data.get("skipped_rows"):
        return []
    listed = list(data.get("skipped") or [])
    more = int(data["skipped_rows"]) - len(listed)
    return [
        "## Bad rows skipped",
        "",
        f"`{data.get('path')}`: {data['skipped_rows']} of {data.get('rows_read')} rows were skipped "
        "(data.on_bad_rows: skip). Fix them, or set on_bad_rows: error to stop on them.",
        "",
        *[f"- {message}" for message in listed],
        *([f"- ... and {more} more"] if more > 0 else []),
        "",
    ]


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
