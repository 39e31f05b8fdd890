"""What the report says, computed once: the `Analysis` of an experiment and the content both report
formats show (summary lines, the columns worth showing, provenance).

`analyze` loads nothing: it takes an Experiment (analysis/results.py) and ranks, budgets and
explains it (analysis/pareto.py, analysis/importance.py). report.md (analysis/report.py),
report.html (analysis/html.py) and compare (analysis/compare.py) render an Analysis; none of them
recomputes what is here, and neither renderer imports the other.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pandas as pd

from analysis.formatting import config_text, fmt_loss, memory_label, present
from analysis.importance import Importance, param_importances
from analysis.memory_report import memory_summary_lines
from analysis.pareto import (
    DEFAULT_BUDGETS_GIB,
    LOSS,
    MEMORY,
    QUALITY,
    WITHIN_OF_BEST,
    Quality,
    best_trial,
    best_under_budgets,
    cheapest_within,
    pareto_front,
    primary_memory_kind,
    rankable,
    tradeoff_table,
)
from analysis.results import Experiment
from analysis.saved_spec import SavedSpec
from analysis.task_report import TaskSummary, task_summary
from core.experiment_folder import DATA_REPORT_FILE
from core.numbers import plain_value
from core.status import ALL_STATUSES, RANKABLE_STATUSES, TrialStatus
from trainables.metrics import BASELINE_COLUMN

# The fraction of the objective by which the best trial must beat the baseline for the report to
# recommend it over the standard recipe (search.baseline).
BASELINE_MARGIN = 0.01

IN_PROGRESS_STATUSES = (TrialStatus.RUNNING, TrialStatus.PENDING, TrialStatus.PAUSED)
# The packages whose versions the report's provenance lists (run_plan.json records a few more).
PROVENANCE_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "ray", "optuna")


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
        task: The task metrics section (eval.metrics; analysis/task_report.py), None without any.
        quality: What ranks the trials: the objective (search.metric) in its direction.
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
    task: TaskSummary | None = None
    quality: Quality = LOSS

    @property
    def in_progress(self) -> bool:
        return any(self.counts.get(s, 0) for s in IN_PROGRESS_STATUSES)

    @property
    def budgets_apply(self) -> bool:
        """GPU budgets are about VRAM; for any other memory kind the budget table is only illustrative."""
        return self.memory_kind == "cuda_reserved"

    @property
    def name(self) -> str:
        return str(self.exp.saved_spec.name or self.exp.path.rstrip("/").rsplit("/", 1)[-1])

    @cached_property
    def baseline(self) -> pd.Series | None:
        """The baseline trial (search.baseline) if it is ranked, else None."""
        marked = self.ranked[self.ranked[BASELINE_COLUMN].fillna(False).astype(bool)] if BASELINE_COLUMN in self.ranked else self.ranked.iloc[:0]
        return marked.iloc[0] if len(marked) else None

    @cached_property
    def recommended(self) -> pd.Series | None:
        """What the report recommends: the best trial, or the baseline when the best beats it by less
        than BASELINE_MARGIN of the objective (the standard recipe is the safer choice then)."""
        best, base = self.best, self.baseline
        if best is None or base is None or best["trial_id"] == base["trial_id"]:
            return best
        q = self.quality.column
        return base if self.quality.gain(best[q], base[q]) < BASELINE_MARGIN else best

    @cached_property
    def summary(self) -> list[str]:
        """The summary lines (console, report.md, report.html), computed once per analysis."""
        return summary_lines(self)

    def json_summary(self) -> dict[str, Any]:
        """What `--json` prints for an experiment (docs/scripting.md): plain JSON values only."""
        from trainables.metrics import CONFIG_COLUMNS

        config_names = [c.name for c in CONFIG_COLUMNS]

        def trial_record(row: pd.Series) -> dict[str, Any]:
            record = {
                "trial_id": str(row["trial_id"]),
                "status": str(row["status"]),
                "params": {k: plain_value(row[k]) for k in config_names if plain_value(row.get(k)) is not None},
            }
            for column in dict.fromkeys((self.quality.column, QUALITY, MEMORY, "memory_kind", "steps")):
                if column in row.index:
                    record[column] = plain_value(row[column])
            return record

        front = self.ranked[self.ranked["on_front"]] if "on_front" in self.ranked else self.ranked.iloc[:0]
        return {
            "experiment": self.name,
            "experiment_dir": self.exp.path,
            "trials": int(len(self.exp.trials)),
            "statuses": dict(self.counts),
            "quality": self.quality.column,
            "quality_better": self.quality.better,
            "memory": MEMORY,
            "memory_kind": self.memory_kind,
            "best": trial_record(self.best) if self.best is not None else None,
            "baseline": trial_record(self.baseline) if self.baseline is not None else None,
            "recommended": trial_record(self.recommended) if self.recommended is not None else None,
            "pareto_front": [trial_record(row) for _, row in front.iterrows()],
            "summary": list(self.summary),
        }

    @cached_property
    def provenance(self) -> list[str]:
        """The provenance lines from run_plan.json; [] for experiments from before it existed."""
        return provenance_lines(self.exp)


def analyze(
    exp: Experiment, budgets_gib: Sequence[float] = DEFAULT_BUDGETS_GIB, *, importance: bool = True
) -> Analysis:
    """Compute the report's content from a loaded experiment (no files written)."""
    trials = exp.trials
    quality = Quality.of(exp.saved_spec)
    kind = primary_memory_kind(trials, quality)
    ranked = rankable(trials, kind, quality).copy()
    ranked["on_front"] = pareto_front(ranked, quality)
    counts = {s: int(n) for s, n in trials["status"].value_counts().items()}
    order = {s.value: i for i, s in enumerate(ALL_STATUSES)}
    counts = {s: counts[s] for s in sorted(counts, key=lambda s: order.get(s, len(order)))}
    return Analysis(
        exp=exp,
        budgets_gib=tuple(float(b) for b in budgets_gib),
        memory_kind=kind,
        ranked=ranked,
        best=best_trial(ranked, quality),
        cheapest=cheapest_within(ranked, quality=quality),
        budgets=best_under_budgets(ranked, budgets_gib, quality),
        tradeoffs=tradeoff_table(ranked, quality),
        importance=param_importances(exp) if importance else Importance({}, "not computed"),
        not_ranked=_not_ranked(trials, ranked, kind, quality),
        counts=counts,
        generated_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        task=task_summary(exp, ranked),
        quality=quality,
    )


def _not_ranked(trials: pd.DataFrame, ranked: pd.DataFrame, kind: str | None, quality: Quality = LOSS) -> pd.DataFrame:
    """Trials not in the ranking, each with the reason; nothing is dropped silently."""
    rest = trials[~trials["trial_id"].isin(ranked["trial_id"])].copy()
    reasons = []
    for row in rest.to_dict("records"):
        status, error = row["status"], row.get("error")
        error = None if error is None or error is pd.NA else str(error)
        if status == TrialStatus.OOM:
            reason = "ran out of memory" + (f": {error}" if error else "")
        elif status == TrialStatus.DIVERGED:
            reason = "loss became NaN/inf" + (f" by step {row['steps']}" if present(row.get("steps")) else "")
        elif status == TrialStatus.INFEASIBLE and present(row.get("infeasible_reason")):
            reason = f"rejected before launch: {row['infeasible_reason']}"  # sweeps/admission.py says why
        elif status == TrialStatus.INFEASIBLE:
            reason = "rejected before launch: predicted not to fit" + (
                f" ({row['predicted_memory_mib']:,.0f} MiB predicted)" if present(row.get("predicted_memory_mib")) else ""
            )
        elif status == TrialStatus.FAILED:
            reason = f"failed: {error}" if error else "failed (no error file)"
        elif status == TrialStatus.TIMED_OUT:
            reason = f"timed out: {error}" if error else "timed out (train.trial_timeout_s / stall_timeout_s)"
        elif status not in RANKABLE_STATUSES:
            reason = f"{status}: no evaluation yet"
        elif not present(row.get(QUALITY)):
            reason = "no evaluation yet"
        elif not present(row.get(quality.column)):
            reason = f"no {quality.metric} measured (eval.when measures it only at some rounds)"
        elif not present(row.get(MEMORY)):
            reason = "no memory measurement"
        else:
            reason = f"memory measured as {row.get('memory_kind')}, not comparable with {kind}"
        reasons.append(reason)
    return rest.assign(reason=pd.Series(reasons, index=rest.index, dtype="string"))


# --- which columns to show -----------------------------------------------------------------------


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
    task = [f"{k}_{m}" for m in analysis.exp.saved_spec.task_metrics for k in ("best", "final")]
    if task:
        task += ["task_eval_total_s", "task_eval_peak_mib"]
    shown = ["trial_id", "status", *varying, QUALITY, "final_eval_loss", *task, "best_step", "steps", MEMORY, "memory_kind"]
    if analysis.exp.trials["predicted_memory_mib"].notna().any():
        shown += ["predicted_memory_mib", "memory_error_pct"]
    # CPU runs: the tensor peak, which moves with the configuration where host RSS does not.
    shown += ["tensor_peak_mib", "predicted_tensor_peak_mib", "tensor_peak_error_pct"]
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


def asha_rung_steps(spec: SavedSpec | Mapping[str, Any]) -> list[int]:
    """Steps at which ASHA compares trials (grace_period x reduction_factor^k rounds, below max_t)."""
    spec = SavedSpec.from_raw(spec)
    asha, eval_every = spec.asha, spec.train.eval_every
    if asha is None or not eval_every:
        return []
    rung, steps = float(asha.grace_period or 1), []
    while rung < spec.max_rounds and len(steps) < 20:
        steps.append(int(round(rung)) * eval_every)
        rung *= float(asha.reduction_factor or 2)
    return steps


def export_command(analysis: Analysis, trial_id: str | None = None) -> str:
    """The export command of a trial; by default of the recommended one (the best, or the baseline)."""
    trial = trial_id or (analysis.recommended["trial_id"] if analysis.recommended is not None else "best")
    return f"qlora-sweep export {analysis.exp.path} --trial {trial} --out ./{analysis.name}-{trial}-adapter"


# --- summary ------------------------------------------------------------------------------------


def baseline_lines(analysis: Analysis) -> list[str]:
    """The gain over the baseline (the summary's first line) and the recommendation; [] without a baseline."""
    trials = analysis.exp.trials
    marked = trials[trials[BASELINE_COLUMN].fillna(False).astype(bool)] if BASELINE_COLUMN in trials else trials.iloc[:0]
    if not len(marked):
        return []
    base, best, kind, q = analysis.baseline, analysis.best, analysis.memory_kind, analysis.quality
    metric, column = q.metric, q.column
    if base is None:
        return [f"baseline (standard QLoRA recipe): trial {marked.iloc[0]['trial_id']} has no ranked evaluation "
                f"({marked.iloc[0]['status']}); no comparison"]
    recipe = config_text(base, headline_config(analysis))
    if best is None or best["trial_id"] == base["trial_id"]:
        return [f"vs baseline: the baseline (standard QLoRA recipe, trial {base['trial_id']}, {recipe}) is the best trial, "
                f"{metric} {q.fmt(base[column])}; recommended: the baseline"]
    gain = q.gain(best[column], base[column])
    memory = ""
    if present(best.get(MEMORY)) and present(base.get(MEMORY)) and float(base[MEMORY]):
        change = (float(best[MEMORY]) - float(base[MEMORY])) / float(base[MEMORY]) * 100
        memory = (f", peak memory {memory_label(best[MEMORY], kind)} vs {memory_label(base[MEMORY], kind)} "
                  f"({abs(change):.1f}% {'more' if change > 0 else 'less'})")
    line = (f"vs baseline: best trial {best['trial_id']} {metric} {q.fmt(best[column])} vs the baseline's "
            f"{q.fmt(base[column])} (trial {base['trial_id']}, standard QLoRA recipe: {recipe}), "
            f"{q.gain_text(best[column], base[column])} (better){memory}")
    rec = analysis.recommended
    if rec is not None and rec["trial_id"] == base["trial_id"]:
        advice = (f"recommended: the baseline, trial {base['trial_id']}: the best beats it by {gain * 100:.1f}% "
                  f"{metric}, under the {BASELINE_MARGIN:.0%} that counts as a real gain")
    else:
        by = f"{gain * 100:.1f}%" if math.isfinite(gain) else f"{q.fmt(best[column])} against {q.fmt(base[column])}"
        advice = f"recommended: trial {best['trial_id']} (it beats the baseline by {by} {metric})"
    return [line, advice]


def warm_start_lines(exp: Experiment) -> list[str]:
    """Where the study was warm-started from (warm_start.json), one line per earlier experiment."""
    lines = []
    for source in exp.warm_start:
        text = f"warm start: {source.get('trials', 0)} prior trials from {source.get('path')} (model {source.get('model')}"
        text += f", {source['left_out']} left out)" if source.get("left_out") else ")"
        notes = [str(n) for n in source.get("notes") or []]
        lines.append(text + ("; " + "; ".join(notes) if notes else ""))
    return lines


def summary_lines(analysis: Analysis) -> list[str]:
    """The report's summary as plain lines, for the console and the top of report.md and report.html.

    The first line says how much the best trial beats the baseline (search.baseline), when there is one.
    Prefer `analysis.summary`, which computes them once.
    """
    counts = analysis.counts
    total = sum(counts.values())
    lines = baseline_lines(analysis)
    lines.append(f"trials: {total} (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")" if total else "trials: none yet")
    lines += warm_start_lines(analysis.exp)
    if analysis.in_progress:
        lines.append("the sweep is still running: this is a partial report")
    lines += input_lines(analysis.exp)
    best, kind, q = analysis.best, analysis.memory_kind, analysis.quality
    if best is None:
        lines.append("no trial has reported an evaluation yet" if q == LOSS else f"no trial has measured {q.metric} yet")
        return lines
    if analysis.task is not None:
        lines += analysis.task.lines()
    loss = "" if q == LOSS else f" ({q.better} is better), eval_loss {fmt_loss(best[QUALITY])}"
    lines.append(
        f"best: trial {best['trial_id']} {q.metric} {q.fmt(best[q.column])}{loss} "
        f"({config_text(best, headline_config(analysis))}), peak memory {memory_label(best[MEMORY], kind)}"
    )
    cheap = analysis.cheapest
    if cheap is not None and cheap["trial_id"] != best["trial_id"]:
        saved = (float(best[MEMORY]) - float(cheap[MEMORY])) / float(best[MEMORY]) * 100
        lines.append(
            f"cheapest within {WITHIN_OF_BEST:.0%} of best: trial {cheap['trial_id']} {q.metric} {q.fmt(cheap[q.column])}, "
            f"{memory_label(cheap[MEMORY], kind)} ({saved:.1f}% less memory)"
        )
    elif cheap is not None:
        lines.append(f"cheapest within {WITHIN_OF_BEST:.0%} of best: the best trial itself (nothing cheaper comes close)")
    per_budget = ", ".join(
        f"{b['budget_gib']:g} GiB: " + (f"{b['trial_id']} ({q.fmt(b[q.column])})" if present(b["trial_id"]) else "none fits")
        for b in analysis.budgets.to_dict("records")
    )
    if analysis.budgets_apply:
        lines.append(f"best under each VRAM budget: {per_budget}")
    else:
        lines.append(
            f"memory budgets ({', '.join(f'{b:g}' for b in analysis.budgets_gib)} GiB) are VRAM budgets and not meaningful "
            f"for this run: memory was measured as {kind}"
            + (", the host RSS of CPU trial processes, not VRAM" if kind == "host_rss" else "")
        )
    lines += memory_summary_lines(analysis.exp.trials, analysis.exp.saved_spec)
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


def skip_rules(data: dict[str, Any]) -> str:
    """Which data settings dropped rows, as data_report.json records them."""
    rules = [f"data.{key}: skip" for key in ("on_bad_rows", "on_long_rows") if data.get(key) == "skip"]
    if data.get("on_long_rows") == "skip" and data.get("on_bad_rows") == "skip":
        rules = ["data.on_bad_rows: skip"]  # on_long_rows follows on_bad_rows unless set apart
    return ", ".join(rules) or "data.on_bad_rows: skip"


def input_lines(exp: Experiment) -> list[str]:
    """Summary lines about what went into the sweep: bad rows skipped, remote code trusted."""
    lines = []
    data = exp.data_report
    if data and data.get("unreadable"):
        lines.append(f"data: {DATA_REPORT_FILE} is unreadable, so skipped bad rows cannot be counted")
    elif data and data.get("skipped_rows"):
        lines.append(
            f"data: {data['skipped_rows']} bad rows skipped ({skip_rules(data)}) of {data.get('rows_read')} read; "
            f"trained on {data.get('train_rows')}, evaluated on {data.get('eval_rows')}; listed in the report"
        )
    if data and data.get("truncated_rows"):
        lines.append(
            f"data: {data['truncated_rows']} rows longer than data.max_seq_length ({data.get('max_seq_length')}) "
            "were truncated (data.on_long_rows: truncate; the response cut, never the prompt); listed in the report"
        )
    model = exp.saved_spec.model
    if model.trust_remote_code:
        lines.append(
            f"trust_remote_code was ON: Python code shipped with the model '{model.path}' ran on the driver "
            "and on every trial worker"
        )
    return lines


# --- provenance (run_plan.json) ----------------------------------------------------------------------


def provenance_lines(exp: Experiment) -> list[str]:
    """What produced the experiment: versions, commit, Python, GPUs; [] when run_plan.json has none."""
    p = exp.plan.provenance
    if not (p.qlora_sweep or p.git_commit or p.python or p.platform or p.packages):
        return []  # an experiment from before run_plan.json, or a plan without provenance
    version = f"qlora-sweep: {p.qlora_sweep or 'version not recorded'}"
    if p.git_commit:
        version += f", git commit {p.git_commit[:12]}" + (" (with uncommitted changes)" if p.git_dirty else "")
    lines = [version, f"Python: {p.python or 'not recorded'}" + (f" on {p.platform}" if p.platform else "")]
    packages = [f"{name} {p.packages.get(name) or 'not installed'}" for name in PROVENANCE_PACKAGES if name in p.packages]
    if packages:
        lines.append("packages: " + ", ".join(packages))
    if p.gpus:
        lines.append("GPUs: " + ", ".join(f"{n} x {name}" if n > 1 else name for name, n in Counter(p.gpus).items()))
    elif exp.saved_spec.resources.gpus_per_trial > 0:
        lines.append("GPUs: GPU trials (names not recorded)")
    else:
        lines.append("GPUs: none (CPU trials)")
    if p.created_at:
        lines.append(f"recorded: {p.created_at}")
    if exp.plan.overrides:
        lines.append("spec overrides: " + " ".join(f"--set {item}" for item in exp.plan.overrides))
    return lines
