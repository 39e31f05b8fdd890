"""Write an experiment's report: trials.csv and report.md under EXPERIMENT_DIR/report/.

Every memory figure carries its kind (cuda_reserved = VRAM, host_rss = CPU process RSS) next to
it, so nobody mistakes a CPU number for VRAM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from analysis.results import Experiment, load_experiment
from sweeps import storage
from trainables.metrics import MEMORY_KINDS


@dataclass
class ReportOutcome:
    report_dir: str
    files: list[str]
    summary_lines: list[str] = field(default_factory=list)


def memory_label(value: float | None, kind: str | None) -> str:
    """'612 MiB host RSS (CPU, not VRAM)' / '9,812 MiB CUDA reserved'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    names = {"cuda_reserved": "CUDA reserved", "host_rss": "host RSS (CPU, not VRAM)"}
    return f"{value:,.0f} MiB {names.get(kind or '', kind or 'unknown kind')}"


def summary_lines(exp: Experiment) -> list[str]:
    trials = exp.trials
    counts = trials["status"].value_counts()
    lines = [
        f"trials: {len(trials)} ("
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + ")"
    ]
    ranked = trials.dropna(subset=["best_eval_loss"]).sort_values("best_eval_loss")
    if ranked.empty:
        lines.append("no trial reported an evaluation yet")
        return lines
    best, worst = ranked.iloc[0], ranked.iloc[-1]
    lines.append(
        f"best: trial {best.trial_id} eval_loss {best.best_eval_loss:.4f} "
        f"(r={best.r}, alpha={best.lora_alpha:g}, targets={best.target_modules}, lr={best.learning_rate:.2e}), "
        f"peak memory {memory_label(best.peak_memory_mib, best.memory_kind)}"
    )
    if len(ranked) > 1:
        lines.append(f"worst: trial {worst.trial_id} eval_loss {worst.best_eval_loss:.4f}")
    return lines


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def render_markdown(exp: Experiment) -> str:
    trials = exp.trials
    kinds = sorted(k for k in trials["memory_kind"].dropna().unique())
    provenance = "; ".join(f"`{k}` = {MEMORY_KINDS.get(k, 'unknown')}" for k in kinds) or "no measurement yet"
    shown = ["trial_id", "status", *exp.config_columns]
    shown += ["best_eval_loss", "final_eval_loss", "steps", "peak_memory_mib", "memory_kind", "trainable_params", "tokens_per_s", "wall_s", "node"]
    shown = [c for c in dict.fromkeys(shown) if c in trials.columns and trials[c].notna().any()]
    parts = [
        f"# Sweep report: {exp.spec.get('name', '')}",
        "",
        f"Experiment: `{exp.path}`  ",
        f"Model: `{exp.spec['model']['path']}` ({exp.spec['model']['quantization']}"
        f"{', double quant' if exp.spec['model'].get('double_quant') else ''}), "
        f"data: `{exp.spec['data']['path']}` ({exp.spec['data']['format']})  ",
        f"Objective: {exp.spec['search']['metric']} (lower is better), {exp.spec['train']['max_steps']} steps max per trial",
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary_lines(exp)],
        "",
        f"**How memory was measured:** {provenance}.",
        "",
        "## Trials",
        "",
        _markdown_table(trials[shown]),
        "",
    ]
    failed = trials[trials["status"].isin(["failed", "oom", "diverged", "infeasible"])]
    if not failed.empty:
        parts += ["## Trials that did not finish normally", ""]
        parts += [f"- `{r.trial_id}` {r.status}: {r.error or ''}" for r in failed.itertuples()]
        parts.append("")
    if exp.notes:
        parts += ["## Notes from loading", "", *[f"- {n}" for n in exp.notes], ""]
    return "\n".join(parts)


def write_report(experiment_dir: str, out_dir: str | None = None) -> ReportOutcome:
    """Load an experiment and write its report files; return where they went.

    Raises:
        NotAnExperiment: If the folder is not a qlora-sweep experiment.
    """
    exp = load_experiment(experiment_dir)
    report_dir = out_dir or storage.join(exp.path, "report")
    files = {
        "trials.csv": exp.trials.to_csv(index=False),
        "report.md": render_markdown(exp),
    }
    for name, text in files.items():
        storage.write_text(storage.join(report_dir, name), text)
    return ReportOutcome(report_dir=report_dir, files=list(files), summary_lines=summary_lines(exp))
