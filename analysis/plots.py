"""The report's charts as PNG bytes (matplotlib's Agg canvas; no pyplot, no display, no global state).

Each function takes tables and returns PNG bytes, or None when there is nothing to draw, so the
HTML can embed them as base64 and the Markdown can link them. Colours mean the same thing in every
chart: one colour per target-module set.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.memory_report import TENSOR, TENSOR_PREDICTED, chart_memory
from analysis.pareto import LOSS, MEMORY, MIB_PER_GIB, Quality, pareto_front
from core.status import TrialStatus

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
STATUS_MARKERS = {TrialStatus.COMPLETED: "o", TrialStatus.EARLY_STOPPED: "X", TrialStatus.RUNNING: "^", TrialStatus.PAUSED: "s"}
# A loss curve of a trial in any other status ended early (ASHA, a failure): it ends with an X.
CURVE_ENDS_NORMALLY = (TrialStatus.COMPLETED, TrialStatus.RUNNING, TrialStatus.PENDING, TrialStatus.PAUSED)
DPI = 110

MEMORY_AXIS = {
    "cuda_reserved": "peak GPU memory, {unit} (VRAM: torch.cuda.max_memory_reserved)",
    "host_rss": "peak memory, {unit} (host RSS of the trial process: CPU run, not VRAM)",
    "cpu_tensor_peak": "CPU tensor peak, {unit} (live tensor bytes, torch.profiler allocator events: not VRAM)",
}



def target_colours(labels: Sequence[str]) -> dict[str, str]:
    """A stable colour per target-module label (sorted, so the same label keeps its colour in every chart)."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(sorted(set(labels)))}


def memory_scale(values: pd.Series) -> tuple[float, str]:
    """Divide MiB by this to plot; GiB once the figures pass 2 GiB, else MiB."""
    peak = pd.to_numeric(values, errors="coerce").max()
    return (float(MIB_PER_GIB), "GiB") if peak == peak and peak > 2 * MIB_PER_GIB else (1.0, "MiB")


def memory_axis_label(kind: str | None, unit: str) -> str:
    return MEMORY_AXIS.get(kind or "", "peak memory, {unit} (" + (kind or "unknown kind") + ")").format(unit=unit)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float = 7.5, height: float = 4.2) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _target_legend(
    ax: Any, colours: dict[str, str], statuses: Sequence[str], loc: str = "best", predicted: bool = False
) -> None:
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=label) for label, c in colours.items()]
    if predicted:
        handles.append(Line2D([], [], marker="D", linestyle="", color="#555555", markerfacecolor="none",
                              label="predicted (estimator)"))
    handles += [
        Line2D([], [], marker=STATUS_MARKERS.get(s, "o"), linestyle="", color="#555555", label=s.replace("_", " "))
        for s in statuses
        if s != TrialStatus.COMPLETED
    ]
    ax.legend(handles=handles, title="target modules", fontsize=8, title_fontsize=8, loc=loc)


def quality_vs_memory(
    ranked: pd.DataFrame,
    memory_kind: str | None,
    budgets_gib: Sequence[float] = (),
    highlight: Sequence[str] = (),
    quality: Quality = LOSS,
) -> bytes | None:
    """The objective (best eval loss, or a task metric) against peak memory, the Pareto front as a step
    line, one colour per target-module set.

    Args:
        ranked: Rankable trials of one memory kind (analysis.pareto.rankable).
        memory_kind: What the memory figures are; it labels the axis.
        budgets_gib: VRAM budgets drawn as vertical lines when they fall inside the plotted range
            (only for VRAM measurements).
        highlight: Trial ids to ring and label (best, cheapest within 1%).
        quality: The objective on the y axis.
    """
    column = quality.column
    if ranked.empty:
        return None
    ranked, memory_kind = chart_memory(ranked, memory_kind)
    scale, unit = memory_scale(ranked[MEMORY])
    colours = target_colours(ranked["target_modules"].fillna("?").astype(str))
    fig, ax = _figure()
    x = ranked[MEMORY].astype(float) / scale
    y = ranked[column].astype(float)
    predicted = None
    if memory_kind == "cpu_tensor_peak" and TENSOR_PREDICTED in ranked:
        predicted = pd.to_numeric(ranked[TENSOR_PREDICTED], errors="coerce").astype(float) / scale
        shown = np.isfinite(predicted.to_numpy(na_value=np.nan))
        if shown.any():
            # Predicted beside measured: a hollow diamond at the same loss, joined to the measured point.
            for xp, xm, yy in zip(predicted[shown], x[shown], y[shown]):
                ax.plot([xp, xm], [yy, yy], color="#bbbbbb", linewidth=0.8, zorder=1)
            ax.scatter(predicted[shown], y[shown], marker="D", s=30, facecolors="none",
                       edgecolors=[colours[str(t)] for t in ranked.loc[shown, "target_modules"].fillna("?")],
                       linewidths=1.0, zorder=2)
        else:
            predicted = None
    for status in ranked["status"].unique():
        part = ranked["status"] == status
        ax.scatter(
            x[part],
            y[part],
            c=[colours[str(t)] for t in ranked.loc[part, "target_modules"].fillna("?")],
            marker=STATUS_MARKERS.get(status, "o"),
            s=46,
            alpha=0.85,
            edgecolors="white",
            linewidths=0.5,
            zorder=3,
        )
    front = ranked[pareto_front(ranked, quality)].sort_values([MEMORY, column])
    if not front.empty:
        ax.step(front[MEMORY] / scale, front[column], where="post", color="#333333", linewidth=1.2, zorder=2,
                label="Pareto front")
        ax.scatter(front[MEMORY] / scale, front[column], s=130, facecolors="none", edgecolors="#333333",
                   linewidths=1.0, zorder=4)
    for i, trial_id in enumerate(highlight):
        row = ranked[ranked["trial_id"] == trial_id]
        if not row.empty:  # stacked, so two highlighted trials at one point stay readable
            ax.annotate(str(trial_id), (float(row[MEMORY].iloc[0]) / scale, float(row[column].iloc[0])),
                        textcoords="offset points", xytext=(6, 6 + 10 * i), fontsize=8)
    if memory_kind == "cuda_reserved":
        low, high = ax.get_xlim()
        for budget in budgets_gib:
            position = budget * MIB_PER_GIB / scale
            if low <= position <= high:
                ax.axvline(position, color="#999999", linestyle=":", linewidth=1)
                ax.text(position, ax.get_ylim()[1], f" {budget:g} GiB", fontsize=7, va="top", color="#666666")
    if _log_quality(quality, y):
        ax.set_yscale("log")
    ax.set_xlabel(memory_axis_label(memory_kind, unit))
    ax.set_ylabel(quality_axis_label(quality))
    if memory_kind == "cpu_tensor_peak":
        ax.set_title("Quality vs CPU tensor peak (ringed: Pareto front on this axis"
                     + ("; hollow diamonds: predicted" if predicted is not None else "") + ")", fontsize=10)
    else:
        ax.set_title("Quality vs peak memory (ringed: Pareto front)", fontsize=10)
    _target_legend(ax, colours, sorted(ranked["status"].unique()), predicted=predicted is not None)
    return _png(fig)


def predicted_vs_measured(trials: pd.DataFrame) -> bytes | None:
    """Predicted against measured memory, one point per trial, with the y = x line and a +-10% band.

    Plots the CPU tensor peak against the estimator's CPU prediction where trials measured it, and
    VRAM (cuda_reserved) against the VRAM prediction where they measured that; the two are never mixed.
    """
    pairs = []
    if TENSOR in trials and TENSOR_PREDICTED in trials:
        pairs.append(("cpu_tensor_peak", trials[TENSOR], trials[TENSOR_PREDICTED], trials))
    if "memory_kind" in trials and "predicted_memory_mib" in trials:
        vram = trials[(trials["memory_kind"] == "cuda_reserved").fillna(False).astype(bool)]
        pairs.append(("cuda_reserved", vram[MEMORY], vram["predicted_memory_mib"], vram))
    for kind, measured, predicted, frame in pairs:
        m = pd.to_numeric(measured, errors="coerce").astype(float)
        p = pd.to_numeric(predicted, errors="coerce").astype(float)
        keep = np.isfinite(m.to_numpy(na_value=np.nan)) & np.isfinite(p.to_numpy(na_value=np.nan)) & (m > 0).to_numpy()
        if keep.any():
            break
    else:
        return None
    m, p, frame = m[keep], p[keep], frame[keep]
    scale, unit = memory_scale(pd.concat([m, p]))
    m, p = m / scale, p / scale
    colours = target_colours(frame["target_modules"].fillna("?").astype(str)) if "target_modules" in frame else {}
    fig, ax = _figure(6.2, 4.6)
    low, high = float(min(m.min(), p.min())) * 0.95, float(max(m.max(), p.max())) * 1.05
    line = np.array([low, high])
    ax.fill_between(line, line * 0.9, line * 1.1, color="#dddddd", alpha=0.6, label="within 10%")
    ax.plot(line, line, color="#555555", linewidth=1, label="predicted = measured")
    ax.scatter(m, p, c=[colours.get(str(t), PALETTE[0]) for t in frame.get("target_modules", pd.Series(["?"] * len(m)))],
               s=46, edgecolors="white", linewidths=0.5, zorder=3)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    what = {"cpu_tensor_peak": "CPU tensor peak", "cuda_reserved": "VRAM, torch.cuda.max_memory_reserved"}[kind]
    ax.set_xlabel(f"measured, {unit} ({what})")
    ax.set_ylabel(f"predicted, {unit} (trainables/memory_estimator.py)")
    ax.set_title(f"Predicted vs measured memory ({what}; shaded: within 10%)", fontsize=10)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=label) for label, c in colours.items()]
    ax.legend(handles=handles, title="target modules", fontsize=8, title_fontsize=8, loc="upper left")
    return _png(fig)


def loss_curves(
    curves: pd.DataFrame, trials: pd.DataFrame, rung_steps: Sequence[int] = (), best_id: str | None = None
) -> bytes | None:
    """Eval loss against step for every trial; an X marks where ASHA (or a failure) stopped a trial.

    Args:
        curves: One row per evaluation (trial_id, step, eval_loss).
        trials: The trials table, for each trial's status and target modules.
        rung_steps: Steps of ASHA's rungs, drawn as dotted vertical lines.
        best_id: The best trial, drawn thicker.
    """
    finite = curves[np.isfinite(pd.to_numeric(curves["eval_loss"], errors="coerce").astype(float))]
    if finite.empty:
        return None
    info = trials.set_index("trial_id")
    colours = target_colours(trials["target_modules"].dropna().astype(str))
    fig, ax = _figure(7.5, 4.4)
    for trial_id, curve in finite.sort_values("step").groupby("trial_id", sort=False):
        status = str(info.at[trial_id, "status"]) if trial_id in info.index else "?"
        label = str(info.at[trial_id, "target_modules"]) if trial_id in info.index else "?"
        best = trial_id == best_id
        ax.plot(curve["step"], curve["eval_loss"], color=colours.get(label, "#777777"),
                linewidth=2.6 if best else 1.1, alpha=1.0 if best else 0.75, zorder=3 if best else 2)
        if status not in CURVE_ENDS_NORMALLY:
            ax.plot(curve["step"].iloc[-1], curve["eval_loss"].iloc[-1], marker="X", color=colours.get(label, "#777777"),
                    markersize=7, markeredgecolor="white", zorder=4)
        if best:
            ax.annotate(f"best: {trial_id}", (curve["step"].iloc[-1], curve["eval_loss"].iloc[-1]),
                        textcoords="offset points", xytext=(-10, 10), fontsize=8, ha="right")
    for step in rung_steps:
        ax.axvline(step, color="#999999", linestyle=":", linewidth=1)
    if _spans_decade(finite["eval_loss"]):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("Eval loss per trial (X: stopped early by ASHA or ended abnormally; dotted: ASHA rungs)", fontsize=10)
    _target_legend(ax, colours, [])
    return _png(fig)


def rank_targets_heatmap(ranked: pd.DataFrame, quality: Quality = LOSS) -> bytes | None:
    """The best objective value for each (rank, target-module set) cell; the count of trials below the value."""
    if ranked.empty or ranked["r"].isna().all():
        return None
    best = "min" if quality.lower_is_better else "max"
    table = ranked.groupby(["r", "target_modules"], observed=True)[quality.column].agg([best, "count"]).reset_index()
    table = table.rename(columns={best: "best"})
    ranks = sorted(int(r) for r in table["r"].unique())
    targets = sorted(str(t) for t in table["target_modules"].unique())
    grid = np.full((len(ranks), len(targets)), np.nan)
    counts = np.zeros_like(grid, dtype=int)
    for row in table.itertuples(index=False):
        i, j = ranks.index(int(row.r)), targets.index(str(row.target_modules))
        grid[i, j], counts[i, j] = row.best, row.count
    fig = Figure(figsize=(max(4.0, 1.5 * len(targets) + 2.2), max(2.6, 0.55 * len(ranks) + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(grid)
    cmap = _cmap("viridis_r" if quality.lower_is_better else "viridis").with_extremes(bad="#eeeeee")
    image = ax.imshow(masked, cmap=cmap, aspect="auto")
    fig.colorbar(image, ax=ax, label=quality_axis_label(quality))
    low, high = np.nanmin(grid), np.nanmax(grid)
    for i in range(len(ranks)):
        for j in range(len(targets)):
            if np.isnan(grid[i, j]):
                ax.text(j, i, "not tried", ha="center", va="center", fontsize=8, color="#888888")
                continue
            share = (grid[i, j] - low) / (high - low) if high > low else 0.0
            dark = high > low and (share if quality.lower_is_better else 1 - share) > 0.55
            ax.text(j, i, f"{grid[i, j]:.3g}\n({counts[i, j]} trial{'s' if counts[i, j] != 1 else ''})", ha="center",
                    va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(targets)), targets)
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("target modules")
    ax.set_ylabel("LoRA rank r")
    ax.set_title(f"Best {quality.metric.replace('_', ' ')} by rank and target modules", fontsize=10)
    return _png(fig)


def lr_vs_loss(ranked: pd.DataFrame, quality: Quality = LOSS) -> bytes | None:
    """The objective (best eval loss, or a task metric) against learning rate (log x), one colour per target-module set."""
    usable = ranked[pd.to_numeric(ranked["learning_rate"], errors="coerce") > 0]
    if usable.empty:
        return None
    colours = target_colours(usable["target_modules"].fillna("?").astype(str))
    fig, ax = _figure(6.5, 3.8)
    for status in usable["status"].unique():
        part = usable[usable["status"] == status]
        ax.scatter(part["learning_rate"], part[quality.column], c=[colours[str(t)] for t in part["target_modules"].fillna("?")],
                   marker=STATUS_MARKERS.get(status, "o"), s=46, alpha=0.85, edgecolors="white", linewidths=0.5)
    ax.set_xscale("log")
    if _log_quality(quality, usable[quality.column]):
        ax.set_yscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(quality_axis_label(quality))
    ax.set_title(f"Learning rate vs best {quality.metric.replace('_', ' ')}", fontsize=10)
    _target_legend(ax, colours, sorted(usable["status"].unique()))
    return _png(fig)


def importance_bars(values: dict[str, float], source: str = "") -> bytes | None:
    """Horizontal bars of parameter importance, most important on top."""
    if not values:
        return None
    names = list(values)[::-1]
    fig, ax = _figure(6.5, max(2.2, 0.45 * len(names) + 1.2))
    ax.barh(names, [values[n] for n in names], color="#4c72b0")
    for i, name in enumerate(names):
        ax.text(values[name], i, f" {values[name]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(values.values()) * 1.15 or 1)
    ax.set_xlabel("importance (share of the explained variation, sums to 1)")
    ax.set_title("What mattered: hyperparameter importance" + (f"\n{source}" if source else ""), fontsize=9)
    return _png(fig)


def fronts_overlay(fronts: dict[str, pd.DataFrame], memory_kind: str | None, quality: Quality = LOSS) -> bytes | None:
    """Several sweeps' Pareto fronts on one chart (compare), each sweep's trials faint behind its front,
    all on one objective (compare ranks every sweep by the same one)."""
    column = quality.column
    frames = [f for f in fronts.values() if not f.empty]
    if not frames:
        return None
    scale, unit = memory_scale(pd.concat([f[MEMORY] for f in frames]))
    fig, ax = _figure()
    for i, (name, ranked) in enumerate(fronts.items()):
        if ranked.empty:
            continue
        colour = PALETTE[i % len(PALETTE)]
        ax.scatter(ranked[MEMORY] / scale, ranked[column], color=colour, alpha=0.3, s=30)
        front = ranked[pareto_front(ranked, quality)].sort_values([MEMORY, column])
        ax.step(front[MEMORY] / scale, front[column], where="post", color=colour, linewidth=1.8, label=name)
        ax.scatter(front[MEMORY] / scale, front[column], color=colour, s=50, edgecolors="black", linewidths=0.6,
                   zorder=3)
    if _log_quality(quality, pd.concat([f[column] for f in frames])):
        ax.set_yscale("log")
    ax.set_xlabel(memory_axis_label(memory_kind, unit))
    ax.set_ylabel(quality_axis_label(quality))
    ax.set_title("Pareto fronts (faint: all rankable trials)", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def quality_axis_label(quality: Quality) -> str:
    """The y-axis label of a quality: what it is, its unit, which way is better."""
    if quality == LOSS:
        return "best eval loss (nats/token, lower is better)"
    return f"best {quality.metric} ({quality.better} is better)"


def _log_quality(quality: Quality, values: pd.Series) -> bool:
    """A log axis for losses spanning a decade; never for task metrics (accuracies include 0)."""
    return quality == LOSS and _spans_decade(values)


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def _spans_decade(values: pd.Series) -> bool:
    numeric = pd.to_numeric(values, errors="coerce").astype(float)
    numeric = numeric[np.isfinite(numeric) & (numeric > 0)]
    return bool(len(numeric)) and numeric.max() / numeric.min() >= 10 and not math.isclose(numeric.min(), 0)

