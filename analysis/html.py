"""report.html: one self-contained page (inline CSS, charts as base64 PNG, no network) that opens offline.

The page answers the questions in the order people ask them: which configuration is best, what is
best under my memory budget, what does saving memory cost, what mattered, how do I deploy the
winner; the full trials table and everything left out of the ranking follow.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from typing import Any

import pandas as pd

from analysis.formatting import MEMORY_NOTES, fmt_loss, fmt_value, memory_label, present
from analysis.memory_report import chart_memory, memory_html
from analysis.pareto import MEMORY, QUALITY, WITHIN_OF_BEST
from analysis.summary import (
    IN_PROGRESS_STATUSES,
    Analysis,
    constant_columns,
    export_command,
    headline_config,
    trial_table_columns,
    varying_config,
)
from core.status import TrialStatus
from trainables.metrics import COLUMNS, MEMORY_KINDS

STATUS_COLOURS = {
    TrialStatus.COMPLETED: "#2e7d32",
    TrialStatus.EARLY_STOPPED: "#6d6d6d",
    TrialStatus.RUNNING: "#1565c0",
    TrialStatus.PENDING: "#7e57c2",
    TrialStatus.PAUSED: "#7e57c2",
    TrialStatus.FAILED: "#c62828",
    TrialStatus.OOM: "#c62828",
    TrialStatus.DIVERGED: "#ef6c00",
    TrialStatus.INFEASIBLE: "#8d6e63",
    TrialStatus.TIMED_OUT: "#c62828",
}

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0;
       background: #f5f6f8; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; border-bottom: 1px solid #d9dce1; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 0 0 8px; text-transform: uppercase; letter-spacing: .04em; color: #555; }
.meta { color: #555; font-size: 13px; }
.meta code { background: #eceef1; }
.banner { background: #fff4e5; border: 1px solid #f0b35a; padding: 10px 14px; border-radius: 6px; margin: 14px 0; }
.warn { background: #fdecea; border-color: #e57373; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 14px; margin-top: 16px; }
.card { background: #fff; border: 1px solid #dde0e4; border-radius: 8px; padding: 14px 16px; }
.card.best { border-left: 5px solid #2e7d32; }
.card.cheap { border-left: 5px solid #1565c0; }
.big { font-size: 22px; font-weight: 600; }
.sub { color: #555; font-size: 13px; }
.kv { border-collapse: collapse; margin-top: 6px; font-size: 13px; }
.kv td { padding: 1px 10px 1px 0; vertical-align: top; }
.kv td:first-child { color: #666; }
table.data { border-collapse: collapse; background: #fff; font-size: 12.5px; width: 100%; }
table.data th, table.data td { border: 1px solid #e1e4e8; padding: 4px 8px; text-align: right; white-space: nowrap; }
table.data th { background: #f0f2f5; position: sticky; top: 0; cursor: pointer; user-select: none; }
table.data td.text, table.data th.text { text-align: left; }
table.data tr.best td { background: #e8f5e9; }
table.data tr.front td:first-child { font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; border: 1px solid #dde0e4; border-radius: 6px; }
.pill { display: inline-block; padding: 0 7px; border-radius: 9px; color: #fff; font-size: 11.5px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #dde0e4; border-radius: 8px; padding: 10px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: #555; font-size: 12.5px; margin-top: 6px; }
pre { background: #1e1e1e; color: #f0f0f0; padding: 10px 14px; border-radius: 6px; white-space: pre-wrap;
      overflow-wrap: anywhere; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
ul.compact li { margin: 2px 0; }
dl.legend dt { font-family: ui-monospace, monospace; font-size: 12.5px; margin-top: 6px; }
dl.legend dd { margin: 0 0 0 16px; color: #444; font-size: 13px; }
"""

# Click a column header to sort the table by it; numbers sort numerically via data-v.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, index) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute("data-order") !== "asc";
      rows.sort(function (a, b) {
        var x = a.cells[index].getAttribute("data-v"), y = b.cells[index].getAttribute("data-v");
        var nx = parseFloat(x), ny = parseFloat(y);
        var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        if (x === "" && y !== "") { return 1; }
        if (y === "" && x !== "") { return -1; }
        return asc ? cmp : -cmp;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      th.setAttribute("data-order", asc ? "asc" : "desc");
    });
  });
});
document.body.setAttribute("data-report-ready", "1");
"""

TEXT_COLUMNS = ("trial_id", "status", "target_modules", "lr_scheduler_type", "memory_kind", "node", "reason", "error")


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def pill(status: str) -> str:
    return f'<span class="pill" style="background:{STATUS_COLOURS.get(status, "#555")}">{_e(status.replace("_", " "))}</span>'


def img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figure(png: bytes | None, alt: str, caption: str) -> str:
    if not png:
        return ""
    return f"<figure>{img(png, alt)}<figcaption>{caption}</figcaption></figure>"


def data_table(
    frame: pd.DataFrame,
    columns: Sequence[str],
    *,
    highlight: str | None = None,
    front: set[str] | None = None,
    sortable: bool = False,
    headers: dict[str, str] | None = None,
) -> str:
    """An HTML table; cells formatted like the Markdown report, raw values kept for sorting."""
    headers = headers or {}
    head = "".join(
        f'<th class="{"text" if c in TEXT_COLUMNS else ""}" title="{_e(COLUMNS[c].doc if c in COLUMNS else "")}">'
        f"{_e(headers.get(c, c))}</th>"
        for c in columns
    )
    rows = []
    for record in frame.to_dict("records"):
        classes = []
        if highlight is not None and record.get("trial_id") == highlight:
            classes.append("best")
        if front and record.get("trial_id") in front:
            classes.append("front")
        cells = []
        for c in columns:
            value = record.get(c)
            shown = pill(str(value)) if c == "status" and isinstance(value, str) else _e(fmt_value(c, value))
            raw = "" if value is None or value is pd.NA or (isinstance(value, float) and value != value) else value
            cells.append(f'<td class="{"text" if c in TEXT_COLUMNS else ""}" data-v="{_e(raw)}">{shown}</td>')
        rows.append(f'<tr class="{" ".join(classes)}">{"".join(cells)}</tr>')
    kind = "data sortable" if sortable else "data"
    return f'<div class="scroll"><table class="{kind}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _config_kv(row: pd.Series, columns: Sequence[str]) -> str:
    cells = "".join(
        f"<tr><td>{_e(c)}</td><td>{_e(fmt_value(c, row[c]))}</td></tr>" for c in columns if c in row and present(row[c])
    )
    return f'<table class="kv">{cells}</table>'


def _deploy_words(analysis: Analysis) -> str:
    rec, best = analysis.recommended, analysis.best
    if rec is not None and best is not None and rec["trial_id"] != best["trial_id"]:
        return f"Deploy the recommended trial, the baseline {rec['trial_id']} (the best does not beat it meaningfully):"
    return "Deploy it:"


def _summary_cards(analysis: Analysis) -> str:
    kind, q = analysis.memory_kind, analysis.quality
    metric = q.metric.replace("_", " ")
    varying = headline_config(analysis)
    cards = []
    best = analysis.best
    if best is None:
        cards.append('<div class="card"><h3>Best configuration</h3><div class="big">no evaluation yet</div></div>')
    else:
        cards.append(
            '<div class="card best"><h3>Best configuration</h3>'
            f'<div class="big">{_e(metric)} {q.fmt(best[q.column])}</div>'
            f'<div class="sub">trial <code>{_e(best["trial_id"])}</code> {pill(str(best["status"]))} - peak '
            f"{_e(memory_label(best[MEMORY], kind))}</div>{_config_kv(best, varying)}"
            f'<div class="sub" style="margin-top:8px">{_e(_deploy_words(analysis))}</div><pre><code>{_e(export_command(analysis))}</code></pre>'
            "</div>"
        )
    cheap = analysis.cheapest
    if cheap is not None:
        if best is not None and cheap["trial_id"] == best["trial_id"]:
            body = '<div class="big">the best trial itself</div><div class="sub">no cheaper trial comes within ' \
                   f"{WITHIN_OF_BEST:.0%} of its {_e(metric)}</div>"
            cheapest_front = analysis.tradeoffs.iloc[0] if len(analysis.tradeoffs) else None
            if cheapest_front is not None and cheapest_front["trial_id"] != best["trial_id"]:
                body += (
                    f'<p class="sub">The cheapest trade-off on the Pareto front, trial '
                    f'<code>{_e(cheapest_front["trial_id"])}</code>, uses {cheapest_front["memory_saved_pct"]:.1f}% '
                    f'less memory for {cheapest_front["quality_lost_pct"]:.1f}% worse {_e(metric)} '
                    f"({q.fmt(cheapest_front[q.column])}).</p>"
                )
        else:
            saved = (float(best[MEMORY]) - float(cheap[MEMORY])) / float(best[MEMORY]) * 100
            lost = -q.gain(cheap[q.column], best[q.column]) * 100
            body = (
                f'<div class="big">{saved:.1f}% less memory</div>'
                f'<div class="sub">for {lost:.2f}% worse {_e(metric)}: trial <code>{_e(cheap["trial_id"])}</code>, '
                f"{_e(metric)} {q.fmt(cheap[q.column])}, peak {_e(memory_label(cheap[MEMORY], kind))}</div>"
                f"{_config_kv(cheap, varying)}"
            )
        cards.append(f'<div class="card cheap"><h3>Cheapest within {WITHIN_OF_BEST:.0%} of the best</h3>{body}</div>')
    counts = "".join(f"<tr><td>{pill(s)}</td><td>{n}</td></tr>" for s, n in analysis.counts.items())
    cards.append(
        f'<div class="card"><h3>Trials by status</h3><div class="big">{sum(analysis.counts.values())} trials</div>'
        f'<table class="kv">{counts}</table>'
        + (f'<div class="sub">{len(analysis.not_ranked)} not ranked; see "Trials left out"</div>' if len(analysis.not_ranked) else "")
        + "</div>"
    )
    cards.append(
        '<div class="card"><h3>How memory was measured</h3>'
        f'<div class="big">{_e(kind or "not yet")}</div>'
        f'<div class="sub">{_e(MEMORY_KINDS.get(kind or "", ""))}</div>'
        f'<p class="sub">{_e(MEMORY_NOTES.get(kind or "", ""))}</p></div>'
    )
    return f'<div class="grid">{"".join(cards)}</div>'


def _budget_section(analysis: Analysis) -> str:
    kind = analysis.memory_kind
    if analysis.budgets_apply:
        intro = (
            "The best trial whose measured peak VRAM fits in each budget (peak &le; budget). The peak excludes the "
            "CUDA context, so keep about 0.5 GiB spare."
        )
        banner = ""
    else:
        intro = "The same table computed on the memory this run measured, for comparing trials with each other only."
        banner = (
            f'<div class="banner warn"><b>Budgets are not meaningful for this run.</b> They are GPU (VRAM) sizes, but '
            f"memory here was measured as <code>{_e(kind)}</code>"
            + (": the peak RSS of each CPU trial process in host RAM" if kind == "host_rss" else "")
            + f". The peak column below is {'host RSS, not VRAM' if kind == 'host_rss' else _e(kind)}. "
            "Run the sweep on GPUs to choose by VRAM budget.</div>"
        )
    label = "peak (MiB, VRAM)" if analysis.budgets_apply else f"peak (MiB, {kind or 'n/a'}{', not VRAM' if kind == 'host_rss' else ''})"
    table = data_table(
        analysis.budgets,
        ["budget_gib", "fits", "trial_id", analysis.quality.column, MEMORY, "headroom_mib"],
        headers={"budget_gib": "budget", "fits": "trials that fit", MEMORY: label, "headroom_mib": "headroom (MiB)"},
    )
    return f"<h2>Best under each memory budget</h2>{banner}<p>{intro}</p>{table}"


def _provenance_section(analysis: Analysis) -> str:
    """What produced the experiment (run_plan.json); nothing for experiments from before it existed."""
    if not analysis.provenance:
        return ""
    return '<h2>Provenance</h2><ul class="compact">' + "".join(f"<li>{_e(line)}</li>" for line in analysis.provenance) + "</ul>"


def render_html(analysis: Analysis, charts: dict[str, bytes]) -> str:
    """The whole page."""
    exp, spec = analysis.exp, analysis.exp.saved_spec
    kind = analysis.memory_kind
    varying, fixed = varying_config(analysis)
    best_id = analysis.best["trial_id"] if analysis.best is not None else None
    front_ids = set(analysis.ranked.loc[analysis.ranked["on_front"], "trial_id"]) if len(analysis.ranked) else set()
    model, search = spec.model, spec.search
    parts = [
        f"<h1>Sweep report: {_e(analysis.name)}</h1>",
        '<div class="meta">',
        f"Experiment <code>{_e(exp.path)}</code><br>",
        f"Model <code>{_e(model.path)}</code> ({_e(model.quantization)}"
        f"{', double quant' if model.double_quant else ''}) - data <code>{_e(spec.data.path)}</code> "
        f"({_e(spec.data.format)}) - "
        + (f"objectives {_e(', '.join(search.objectives))} (multi-objective)" if search.objectives
           else f"objective {_e(search.metric)} ({_e(spec.direction(search.metric))} is better)")
        + ", up to "
        f"{_e(spec.train.max_steps)} steps per trial<br>Generated {_e(analysis.generated_at)}",
        "</div>",
    ]
    if analysis.in_progress:
        running = ", ".join(f"{analysis.counts[s]} {s.value}" for s in IN_PROGRESS_STATUSES if analysis.counts.get(s))
        parts.append(
            f'<div class="banner"><b>Partial report: the sweep is still running</b> ({_e(running)}). '
            "Run <code>qlora-sweep report</code> again for the latest results.</div>"
        )
    parts.append(_summary_cards(analysis))
    parts.append(
        '<div class="card" style="margin-top:14px"><h3>Summary</h3><ul class="compact">'
        + "".join(f"<li>{_e(line)}</li>" for line in analysis.summary)
        + "</ul></div>"
    )
    parts.append(_budget_section(analysis))

    parts.append("<h2>Quality vs memory</h2>")
    parts.append(
        figure(
            charts.get("quality_vs_memory"),
            "Quality vs peak memory",
            f"Each point is a trial; colour = target modules, marker = status. Ringed points joined by the step line are "
            f"the Pareto front: no other trial has both better {_e(analysis.quality.describe())} and lower peak memory. Memory is "
            + (
                "<b>cpu_tensor_peak</b>: the live tensor bytes of each CPU trial (torch.profiler's allocator events over "
                "its first steps and evaluation; not VRAM), because host RSS barely moves with the configuration; the "
                "front is drawn on that axis. Hollow diamonds: the estimator's prediction for the same CPU setup."
                if chart_memory(analysis.ranked, kind)[1] == "cpu_tensor_peak"
                else f"<b>{_e(kind or 'n/a')}</b>{' (host RSS: CPU, not VRAM)' if kind == 'host_rss' else ''}."
            ),
        )
    )
    parts.append(
        figure(
            charts.get("predicted_vs_measured"),
            "Predicted vs measured memory",
            "Each point is a trial: measured memory against the estimator's prediction for it (the CPU tensor peak "
            "against the CPU prediction on a CPU run, VRAM against the VRAM prediction on GPUs). Shaded: within 10%.",
        )
    )
    if not analysis.tradeoffs.empty:
        parts.append(
            "<p>What a memory saving costs: the Pareto front from least memory up, each compared with the best trial.</p>"
        )
        parts.append(
            data_table(
                analysis.tradeoffs,
                ["trial_id", "status", *varying, *dict.fromkeys((analysis.quality.column, QUALITY)), MEMORY,
                 "memory_saved_pct", "quality_lost_pct"],
                highlight=best_id,
                headers={"memory_saved_pct": "memory saved vs best", "quality_lost_pct": f"{analysis.quality.metric} worse than best"},
            )
        )
    # Predicted vs measured memory, GPU packing, the multi-objective front (analysis/memory_report.py).
    parts.append(memory_html(exp.trials, spec, analysis.ranked, data_table, exp.plan.memory.not_modelled))

    parts.append("<h2>What mattered</h2>")
    imp = analysis.importance
    if imp.values:
        notes = "".join(f"<li>{_e(n)}</li>" for n in imp.notes)
        parts.append(
            f"<p>Importance of each searched hyperparameter for {_e(imp.target)} (Optuna "
            f"<code>get_param_importances</code>, {_e(imp.evaluator)}, {imp.trials} trials). Source: {_e(imp.source)}.</p>"
            + (f'<ul class="compact sub">{notes}</ul>' if notes else "")
        )
    else:
        parts.append(f"<p>No importances: {_e('; '.join(imp.notes) or imp.source)}</p>")
    parts.append(
        '<div class="charts">'
        + figure(charts.get("importance"), "Hyperparameter importance", "Share of the variation in the objective each parameter explains.")
        + figure(charts.get("rank_targets"), "Rank x target modules", f"Best {_e(analysis.quality.describe())} in each (rank, target modules) cell; grey cells were never tried.")
        + figure(charts.get("lr_vs_loss"), "Learning rate vs quality", f"Best {_e(analysis.quality.describe())} against learning rate (log scale); colour = target modules.")
        + figure(
            charts.get("loss_curves"),
            "Eval-loss curves",
            "Eval loss after every evaluation round, one line per trial. Lines that end early with an X were stopped by "
            "ASHA at a rung (dotted lines) or ended abnormally.",
        )
        + "</div>"
    )

    if analysis.task is not None:
        task = analysis.task
        parts.append("<h2>Task metrics</h2>")
        parts.append(
            "<p>Measured inside each trial on a fixed, seeded subset of the eval split (eval.metrics). "
            f"Ranked by {_e(analysis.quality.describe())}, as are the best trial, the budget table, the Pareto front "
            "and the recommendation.</p>"
        )
        parts.append('<ul class="compact">' + "".join(f"<li>{_e(line)}</li>" for line in task.lines()) + "</ul>")
        parts.append(data_table(task.table(), list(task.table().columns), sortable=True))
    parts.append("<h2>All trials</h2>")
    fixed = {**fixed, **constant_columns(analysis)}
    if fixed:
        parts.append(
            "<p>Same in every trial: " + ", ".join(f"<code>{_e(k)}={_e(fmt_value(k, v))}</code>" for k, v in fixed.items()) + "</p>"
        )
    parts.append(
        "<p>Click a column header to sort. Green row: best trial; bold id: on the Pareto front. "
        "Every column is in <code>trials.csv</code> / <code>trials.parquet</code> next to this file.</p>"
    )
    same_kind = constant_columns(analysis).get("memory_kind")
    parts.append(
        data_table(
            exp.trials,
            trial_table_columns(analysis),
            highlight=best_id,
            front=front_ids,
            sortable=True,
            headers={MEMORY: f"peak_memory_mib ({same_kind})"} if same_kind else None,
        )
    )

    if len(analysis.not_ranked):
        parts.append("<h2>Trials left out of the ranking</h2>")
        parts.append(data_table(analysis.not_ranked, ["trial_id", "status", "reason"]))
    parts.append(_provenance_section(analysis))
    if exp.notes:
        parts.append("<h2>Notes from loading</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in exp.notes) + "</ul>")
    legend = "".join(
        f"<dt>{_e(c)}</dt><dd>{_e(COLUMNS[c].doc)}{(' [' + _e(COLUMNS[c].unit) + ']') if COLUMNS[c].unit else ''}"
        f"{(' - ' + COLUMNS[c].better + ' is better') if COLUMNS[c].better else ''}</dd>"
        for c in trial_table_columns(analysis)
        if c in COLUMNS
    )
    parts.append(f'<h2>Columns</h2><dl class="legend">{legend}</dl>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Sweep report: {_e(analysis.name)}</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(parts)}</main><script>{SORT_SCRIPT}</script></body></html>\n"
    )
