"""Two sweeps side by side, e.g. the same search space on two base models.

`qlora-sweep compare EXP_A EXP_B [--out DIR]` writes compare.html (self-contained), compare.md and
compare.csv (both trials tables with a `sweep` column): the best trial of each sweep, the best under
each memory budget, the Pareto fronts overlaid on one chart, and the spec keys that differ.
Fronts are overlaid only when both sweeps measured the same memory kind; otherwise each gets its
own, labelled chart, so a CPU RSS figure is never drawn on a VRAM axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import pandas as pd

from analysis.formatting import markdown_table, memory_label
from analysis.html import CSS, data_table, figure
from analysis.pareto import DEFAULT_BUDGETS_GIB, MEMORY, QUALITY
from analysis.results import load_experiment
from analysis.summary import Analysis, analyze
from core import storage


@dataclass
class CompareOutcome:
    out_dir: str
    files: list[str]
    summary_lines: list[str]


def sweep_labels(paths: Sequence[str]) -> list[str]:
    """Experiment folder names, made unique when two are equal."""
    names = [storage.absolute(p).rstrip("/").rsplit("/", 1)[-1] for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n} ({chr(ord('A') + i)})" for i, n in enumerate(names)]
    return names


def spec_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Dotted spec keys whose values differ (storage, study location and names left out)."""
    ignored = {"name", "storage", "search.optuna_storage", "search.optuna_study_name"}
    flat_a, flat_b = _flatten(a), _flatten(b)
    keys = sorted(set(flat_a) | set(flat_b))
    return [(k, flat_a.get(k), flat_b.get(k)) for k in keys if k not in ignored and flat_a.get(k) != flat_b.get(k)]


def _flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        # A space value ({loguniform: [...]}, {ratio: [...]}, a list) is one value: space.<knob>.
        if isinstance(value, dict) and value and prefix != "space.":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def comparison_table(analyses: dict[str, Analysis]) -> pd.DataFrame:
    """One row per sweep: model, trials, best trial, cheapest within 1%, best under each budget."""
    rows = []
    for label, a in analyses.items():
        model = a.exp.saved_spec.model
        row: dict[str, Any] = {
            "sweep": label,
            "model": model.path,
            "quantization": model.quantization,
            "trials": sum(a.counts.values()),
            "ranked": len(a.ranked),
            "memory_kind": a.memory_kind,
            "objective": a.quality.describe(),
            "best_trial": None if a.best is None else a.best["trial_id"],
            "best_value": None if a.best is None else float(a.best[a.quality.column]),
            QUALITY: None if a.best is None else float(a.best[QUALITY]),
            MEMORY: None if a.best is None else float(a.best[MEMORY]),
            "cheapest_within_1pct": None if a.cheapest is None else a.cheapest["trial_id"],
            "cheapest_memory_mib": None if a.cheapest is None else float(a.cheapest[MEMORY]),
        }
        for budget in a.budgets.to_dict("records"):
            row[f"best_under_{budget['budget_gib']:g}gib"] = (
                f"{budget['trial_id']} ({a.quality.fmt(budget[a.quality.column])})" if pd.notna(budget["trial_id"]) else "none fits"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def compare_experiments(
    paths: Sequence[str], out_dir: str | None = None, budgets_gib: Sequence[float] = DEFAULT_BUDGETS_GIB
) -> CompareOutcome:
    """Load, analyse and render two (or more) sweeps side by side; write the files last.

    Raises:
        NotAnExperiment: If a path is not a qlora-sweep experiment.
    """
    from analysis import plots  # matplotlib: loaded only when charts are drawn

    experiments = [load_experiment(p) for p in paths]
    labels = sweep_labels([e.path for e in experiments])
    # The comparison shows no importances: skip opening each sweep's Optuna study for them.
    analyses = {label: analyze(exp, budgets_gib, importance=False) for label, exp in zip(labels, experiments)}
    if out_dir is None:
        first = experiments[0].path.rstrip("/")
        out_dir = storage.join(first.rsplit("/", 1)[0], "compare-" + "-vs-".join(
            e.path.rstrip("/").rsplit("/", 1)[-1] for e in experiments))
    table = comparison_table(analyses)
    kinds = {a.memory_kind for a in analyses.values() if a.memory_kind}
    qualities = {a.quality for a in analyses.values()}
    charts: dict[str, bytes] = {}
    if len(kinds) <= 1 and len(qualities) == 1:
        kind = next(iter(kinds), None)
        png = plots.fronts_overlay({label: a.ranked for label, a in analyses.items()}, kind, next(iter(qualities)))
        if png:
            charts["fronts"] = png
    else:  # different memory kinds or objectives: one chart each, never one axis for both
        for label, a in analyses.items():
            png = plots.fronts_overlay({label: a.ranked}, a.memory_kind, a.quality)
            if png:
                charts[f"front {label}"] = png
    differences = spec_differences(experiments[0].spec, experiments[1].spec) if len(experiments) == 2 else []
    lines = [f"{label}: " + " | ".join(a.summary[:2]) for label, a in analyses.items()]

    trials = pd.concat([a.exp.trials.assign(sweep=label) for label, a in analyses.items()], ignore_index=True)
    trials = trials[["sweep", *[c for c in trials.columns if c != "sweep"]]]
    diff_frame = pd.DataFrame(differences, columns=["key", labels[0], labels[1]] if len(labels) == 2 else ["key", "a", "b"])
    kinds_note = (
        "" if len(kinds) <= 1 else
        "<div class=\"banner warn\">The sweeps measured memory differently ("
        + ", ".join(f"{escape(label)}: {escape(str(a.memory_kind))}" for label, a in analyses.items())
        + "), so their fronts are drawn separately and their memory figures are not comparable.</div>"
    )
    if len(qualities) > 1:
        kinds_note += (
            "<div class=\"banner warn\">The sweeps optimize different objectives ("
            + ", ".join(f"{escape(label)}: {escape(a.quality.describe())}" for label, a in analyses.items())
            + "), so each is ranked by its own and their fronts are drawn separately.</div>"
        )
    best_lines = "".join(
        f"<li><b>{escape(label)}</b>: "
        + (
            f"best trial <code>{escape(str(a.best['trial_id']))}</code>, {escape(a.quality.metric)} "
            f"{a.quality.fmt(a.best[a.quality.column])}, "
            f"{escape(memory_label(a.best[MEMORY], a.memory_kind))}" if a.best is not None else "no evaluation yet"
        )
        + (" (partial: still running)" if a.in_progress else "")
        + "</li>"
        for label, a in analyses.items()
    )
    html_parts = [
        f"<h1>Sweep comparison: {' vs '.join(escape(l) for l in labels)}</h1>",
        '<div class="meta">' + "<br>".join(f"{escape(l)}: <code>{escape(a.exp.path)}</code>" for l, a in analyses.items()) + "</div>",
        f'<div class="card" style="margin-top:14px"><h3>Best per sweep</h3><ul class="compact">{best_lines}</ul></div>',
        kinds_note,
        "<h2>Side by side</h2>",
        data_table(table.astype(object), list(table.columns)),
        "<h2>Pareto fronts</h2>",
        *[figure(png, name, "Each sweep's Pareto front (line) over its rankable trials (faint points). Lower-left is better.")
          for name, png in charts.items()],
        "<h2>What differs between the specs</h2>",
        data_table(diff_frame.astype(str), list(diff_frame.columns)) if len(diff_frame) else "<p>Nothing but names and storage.</p>",
        "<p>Each sweep's own report has the details: <code>qlora-sweep report EXPERIMENT_DIR</code>.</p>",
    ]
    html = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Sweep comparison</title><style>{CSS}</style></head><body><main>{''.join(html_parts)}</main></body></html>\n"
    )
    md = "\n".join(
        [
            f"# Sweep comparison: {' vs '.join(labels)}",
            "",
            *[f"- {line}" for line in lines],
            "",
            "## Side by side",
            "",
            markdown_table(table),
            "",
            "## What differs between the specs",
            "",
            markdown_table(diff_frame.astype(str)) if len(diff_frame) else "Nothing but names and storage.",
            "",
            *[f"![{name}](plots/{name.replace(' ', '_')}.png)" for name in charts],
            "",
        ]
    )
    files: dict[str, bytes] = {
        "compare.csv": trials.to_csv(index=False).encode(),
        **{f"plots/{name.replace(' ', '_')}.png": png for name, png in charts.items()},
        "compare.md": md.encode(),
        "compare.html": html.encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(out_dir, *name.split("/")), data)
    return CompareOutcome(out_dir=out_dir, files=list(files), summary_lines=lines)
