"""Load an experiment folder (local or s3://, gs://) into one tidy pandas table, one row per trial.

Reads only what Tune and qlora-sweep write as text: sweep_spec.yaml, run_plan.json, the JSON
experiment state, and each trial's params.json / result.json / error.txt, all through the folder
format's one owner, core.experiment_folder. Nothing is unpickled, so pointing the report at a
folder is safe, and it works while the sweep is still running. Statuses are core.status's
TrialStatus values (kept as plain strings in the table); config columns come from the
hyperparameter registry (trainables/params.py) via the saved space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.saved_spec import SavedSpec
from core import experiment_folder as folder
from core import storage
from core.errors import QloraSweepError
from core.experiment_folder import is_experiment  # noqa: F401 - re-exported for callers of analysis.results
from core.numbers import is_finite_number
from core.run_plan import RunPlan, load_run_plan
from core.status import ALL_STATUSES, FROM_TUNE, REPORTED_STATUSES, TrialStatus
from trainables.metrics import BASELINE_COLUMN, COLUMNS, TRIAL_COLUMNS, task_columns


class AnalysisInputError(QloraSweepError):
    """Bad input to report/compare/export (a folder, a trial id, an option); the message says the fix."""


class NotAnExperiment(AnalysisInputError):
    """The folder is not a qlora-sweep experiment."""


@dataclass
class Experiment:
    """One sweep's results.

    Attributes:
        path: The experiment folder or URI.
        spec: The sweep spec as it ran (sweep_spec.yaml), as a plain dict.
        trials: One row per trial; columns from trainables.metrics.TRIAL_COLUMNS plus the config.
        curves: One row per evaluation of every trial (trial_id, training_iteration, step, eval_loss, ...).
        config_columns: The trial-config columns, from the hyperparameter registry (trainables/params.py).
        notes: Things the loader could not read, to show in the report instead of dropping silently.
        saved_spec: The typed, lenient view of `spec` that analysis reads (analysis.saved_spec).
        plan: The run plan preflight saved (run_plan.json: provenance, model, memory plan); an empty
            RunPlan for experiments from before the file existed.
        data_report: The driver's data_report.json (rows read, skipped rows); None if absent,
            {"unreadable": True} if it cannot be read.
    """

    path: str
    spec: dict[str, Any]
    trials: pd.DataFrame
    curves: pd.DataFrame
    config_columns: list[str]
    notes: list[str] = field(default_factory=list)
    saved_spec: SavedSpec = field(default_factory=SavedSpec)
    plan: RunPlan = field(default_factory=RunPlan)
    data_report: dict[str, Any] | None = None
    # The earlier experiments the study started from (warm_start.json's sources; [] without).
    warm_start: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_steps(self) -> int:
        return self.saved_spec.train.max_steps


def load_experiment(path: str) -> Experiment:
    """Read an experiment folder into an Experiment.

    Raises:
        NotAnExperiment: If `path` holds no sweep_spec.yaml (i.e. was not written by qlora-sweep).
        AnalysisInputError: If its sweep_spec.yaml is not YAML.
    """
    # S3 keys in the URI stay in memory (core/storage.py); the path the report and export show has none.
    path = storage.absolute(storage.without_credentials(path))
    if not folder.is_experiment(path):
        raise NotAnExperiment(
            f"{path} is not a qlora-sweep experiment folder (no {folder.SPEC_FILE}). "
            "Pass the folder that `qlora-sweep run` printed, e.g. results/smoke-20260101-120000"
        )
    try:
        spec = folder.read_spec(path)
    except ValueError as exc:
        raise AnalysisInputError(f"{path}: {exc}; the experiment cannot be read") from None
    notes: list[str] = []
    saved = SavedSpec.from_raw(spec, notes)
    tune_states = folder.tune_states(path, notes)
    rows, curves = [], []
    seen: set[str] = set()
    for dirname in folder.trial_dirnames(path):
        trial_id = dirname.removeprefix(folder.TRIAL_PREFIX)
        row, curve = _load_trial(path, trial_id, saved, tune_states, notes)
        if tune_states and trial_id not in tune_states and row["steps"] is None and not row["error"]:
            notes.append(
                f"{dirname} has no results and Tune's saved state does not name it: a trial started just before "
                "the driver stopped (resume does not continue it; the search proposes afresh), or one starting "
                "now; not counted"
            )
            continue
        rows.append(row)
        curves.extend(curve)
        seen.add(trial_id)
    for trial_id, state in tune_states.items():
        if trial_id not in seen:  # suggested but never started: no folder yet
            status = FROM_TUNE.get(state["status"], TrialStatus.PENDING)
            rows.append({"trial_id": trial_id, "status": status.value, **state["config"]})
    rows += [
        {**row, "status": TrialStatus.INFEASIBLE.value}  # rejected before launch by memory admission
        for row in folder.read_jsonl(path, folder.INFEASIBLE_FILE, notes)
    ]
    config_columns = saved.config_columns(notes)
    trials = _typed_table(rows, config_columns, saved)
    curves_df = pd.DataFrame(curves) if curves else pd.DataFrame(columns=["trial_id", "training_iteration", "step", "eval_loss"])
    return Experiment(
        path=path,
        spec=spec,
        trials=trials,
        curves=curves_df,
        config_columns=config_columns,
        notes=notes,
        saved_spec=saved,
        plan=load_run_plan(path, notes),
        data_report=_data_report(path),
        warm_start=_warm_start(path, notes),
    )


def _warm_start(path: str, notes: list[str]) -> list[dict[str, Any]]:
    """The sources of warm_start.json (sweeps/warm_start.py), [] when the sweep started from nothing."""
    try:
        value = folder.read_json(path, folder.WARM_START_FILE)
    except (OSError, ValueError):
        notes.append(f"{folder.WARM_START_FILE} is unreadable: the warm-start sources are not listed")
        return []
    sources = value.get("sources") if isinstance(value, dict) else None
    return [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []


def _data_report(path: str) -> dict[str, Any] | None:
    """The driver's data_report.json, None if absent (experiments from before it existed)."""
    try:
        value = folder.read_json(path, folder.DATA_REPORT_FILE)
    except (OSError, ValueError):
        return {"unreadable": True}
    if value is None:
        return None
    return value if isinstance(value, dict) else {"unreadable": True}


def _load_trial(
    path: str, trial_id: str, spec: SavedSpec, tune_states: dict[str, dict[str, Any]], notes: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    params = folder.read_params(path, trial_id)
    results = folder.read_results(path, trial_id, notes)
    state = tune_states.get(trial_id, {})
    error, failed_at = folder.read_error(path, trial_id)
    evals = [r for r in results if "eval_loss" in r]
    last = results[-1] if results else {}
    finite = [r["eval_loss"] for r in evals if is_finite_number(r["eval_loss"])]
    row: dict[str, Any] = {
        "trial_id": trial_id,
        "status": _status(state.get("status"), last, error, spec, failed_at).value,
        **{k: v for k, v in params.items() if not isinstance(v, (dict, list))},
        "best_eval_loss": min(finite) if finite else None,
        "final_eval_loss": last.get("eval_loss") if evals else None,
        "steps": last.get("step"),
        "peak_memory_mib": max((r.get("peak_memory_mib", 0) for r in results), default=None) if results else None,
        "memory_kind": last.get("memory_kind"),
        "trainable_params": last.get("trainable_params"),
        "total_params": last.get("total_params"),
        "tokens_per_s": last.get("tokens_per_s"),
        "wall_s": last.get("time_total_s"),
        "node": last.get("node_ip"),
        "node_id": last.get("node_id"),
        "device": last.get("device"),
        "iterations": last.get("training_iteration"),
        "error": error or last.get("oom_message") or last.get("timeout_message"),
        "trial_dir": folder.trial_dir(path, trial_id),
        "best_step": _best(evals).get("step"),
        "predicted_memory_mib": _predicted_memory(results, params),
        # The CPU tensor peak: measured once per attempt, carried by every later report (the last wins).
        **{key: _last_reported(results, key) for key in TENSOR_PEAK_KEYS},
        "checkpoint_path": _best_checkpoint(path, trial_id, results),
        # Memory admission, packing and OOM handling (sweeps/admission.py, trainables/qlora.py).
        "gpu_fraction": last.get("gpu_fraction"),
        "gpu_ids": last.get("gpu_ids"),
        "started_at": last.get("started_at"),
        "ended_at": (last["started_at"] + last["elapsed_s"]) if is_finite_number(last.get("started_at")) and is_finite_number(last.get("elapsed_s")) else None,
        "micro_batch_size": last.get("micro_batch_size"),
        "oom_retry": last.get("oom_retry"),
        **_task_figures(results, spec),
    }
    if row["memory_kind"] is None and results:
        row["memory_kind"] = "unknown"
    curve = [
        {
            "trial_id": trial_id,
            "training_iteration": r.get("training_iteration"),
            "step": r.get("step"),
            "eval_loss": r.get("eval_loss"),
            "train_loss": r.get("train_loss"),
            "peak_memory_mib": r.get("peak_memory_mib"),
            **{name: r.get(name) for name in spec.task_metrics},
        }
        for r in evals
    ]
    return row, curve


def _task_figures(results: list[dict[str, Any]], spec: SavedSpec) -> dict[str, Any]:
    """best_<metric> and final_<metric> of each task metric (eval.metrics), in its direction, and the
    task evaluation's cost; rounds without a task evaluation report NaN and are skipped."""
    out: dict[str, Any] = {}
    measured = [r for r in results if is_finite_number(r.get("task_eval_s"))]
    for name, better in spec.task_metrics.items():
        values = [r[name] for r in results if is_finite_number(r.get(name))]
        out[f"best_{name}"] = (max(values) if better == "higher" else min(values)) if values else None
        out[f"final_{name}"] = values[-1] if values else None
        for extra in (f"{name}_loss", f"{name}_base_loss"):  # forgetting's figures, as last measured
            found = [r[extra] for r in results if is_finite_number(r.get(extra))]
            if found:
                out[f"final_{extra}"] = found[-1]
    if spec.task_metrics:
        out["task_eval_total_s"] = sum(r["task_eval_s"] for r in measured) if measured else None
        peaks = [r["task_eval_peak_mib"] for r in measured if is_finite_number(r.get("task_eval_peak_mib"))]
        out["task_eval_peak_mib"] = max(peaks) if peaks else None
    return out


def _best(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The report with the lowest finite eval_loss ({} if none); the earliest wins a tie."""
    finite = [r for r in evals if is_finite_number(r.get("eval_loss"))]
    return min(finite, key=lambda r: r["eval_loss"]) if finite else {}


TENSOR_PEAK_KEYS = ("tensor_peak_mib", "tensor_peak_kind", "predicted_tensor_peak_mib", "tensor_peak_seq_len")


def _last_reported(results: list[dict[str, Any]], key: str) -> Any:
    """The value of `key` in the latest report that has one (None if none does)."""
    for result in reversed(results):
        value = result.get(key)
        if value is not None and (isinstance(value, str) or is_finite_number(value)):
            return value
    return None


def _predicted_memory(results: list[dict[str, Any]], params: dict[str, Any]) -> float | None:
    """The memory estimator's prediction, wherever the driver or trainable recorded it."""
    for source in (*reversed(results), params):
        value = source.get("predicted_memory_mib")
        if is_finite_number(value):
            return float(value)
    return None


def _best_checkpoint(path: str, trial_id: str, results: list[dict[str, Any]]) -> str | None:
    """The kept checkpoint folder with the lowest eval_loss.

    Tune keeps only some checkpoints (the best by eval_loss and the latest), and a report may run
    while Tune is still rotating them, so a result's checkpoint_dir_name is used only if the folder
    still exists.
    """
    named = [r for r in results if r.get("checkpoint_dir_name") and is_finite_number(r.get("eval_loss"))]
    if not named:
        return None
    trial_dir = folder.trial_dir(path, trial_id)
    kept = set(storage.list_dirs(trial_dir))
    for r in sorted(named, key=lambda r: (r["eval_loss"], -(r.get("training_iteration") or 0))):
        if r["checkpoint_dir_name"] in kept:
            return storage.join(trial_dir, r["checkpoint_dir_name"])
    return None


def _status(
    tune_status: str | None,
    last: dict[str, Any],
    error: str | None,
    spec: SavedSpec,
    failed_at: str | None = None,
) -> TrialStatus:
    reported = last.get("trial_status")
    if isinstance(reported, str) and reported in REPORTED_STATUSES:
        return TrialStatus(reported)
    if tune_status == "ERROR":
        return TrialStatus.FAILED
    # error.txt stays after a failure that Tune retried (train.max_failures). And when a trial's
    # node dies, Tune (2.60) never saves its ERROR status: the saved state still says RUNNING. So
    # an error counts unless the trial terminated normally or reported again after it (Tune's
    # "date" uses the same format as error.txt, so the strings compare in time order).
    retried = tune_status == "TERMINATED" or (failed_at is not None and (last.get("date") or "") > failed_at)
    if error and not retried:
        return TrialStatus.FAILED
    if tune_status in ("RUNNING", "PENDING", "PAUSED"):
        return FROM_TUNE[tune_status]
    if not last:
        return TrialStatus.PENDING if tune_status is None else TrialStatus.FAILED
    if (last.get("step") or 0) >= spec.train.max_steps or (last.get("training_iteration") or 0) >= spec.max_rounds:
        return TrialStatus.COMPLETED
    if tune_status == "TERMINATED" or last.get("done"):
        return TrialStatus.EARLY_STOPPED
    return TrialStatus.RUNNING


def _typed_table(rows: list[dict[str, Any]], config_columns: list[str], saved: SavedSpec | None = None) -> pd.DataFrame:
    """Columns in a fixed order with the dtypes declared in trainables.metrics; sorted by status, then
    by the objective (best_<search.metric>) in its direction."""
    saved = saved or SavedSpec()
    task = [c for name, better in saved.task_metrics.items() for c in task_columns(name, better)]  # type: ignore[arg-type]
    ordered = ["trial_id", "status", *config_columns]
    ordered += [c.name for c in TRIAL_COLUMNS if c.name not in ordered]
    ordered[ordered.index("final_eval_loss") + 1 : ordered.index("final_eval_loss") + 1] = [c.name for c in task]
    frame = pd.DataFrame(rows)
    for name in ordered:
        if name not in frame:
            frame[name] = None
    extra = [c for c in frame.columns if c not in ordered]
    frame = frame[ordered + extra]
    for name in frame.columns:
        column = COLUMNS.get(name)  # config, metric and trial columns alike (trainables/metrics.py)
        dtype = column.dtype if column else ("float64" if name in {c.name for c in task} else None)
        if dtype:
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(dtype) if dtype in ("Int64", "float64") else frame[name].astype(dtype)
    frame[BASELINE_COLUMN] = frame[BASELINE_COLUMN].fillna(False)  # only the baseline's config has the key
    # A VRAM prediction compared with a CPU process's RSS would be a meaningless error figure.
    vram = (frame["memory_kind"] == "cuda_reserved").fillna(False).astype(bool)
    error = (frame["predicted_memory_mib"] - frame["peak_memory_mib"]) / frame["peak_memory_mib"] * 100
    frame["memory_error_pct"] = error.where(vram).astype("float64")
    # The CPU tensor peak against the estimator's allocated bytes for the same CPU setup (same quantity).
    tensor_error = (frame["predicted_tensor_peak_mib"] - frame["tensor_peak_mib"]) / frame["tensor_peak_mib"] * 100
    frame["tensor_peak_error_pct"] = tensor_error.astype("float64")
    objective = saved.objective_column if saved.objective_column in frame else "best_eval_loss"
    metric = objective.removeprefix("best_")
    ascending = [True, metric not in saved.task_metrics or saved.task_metrics[metric] == "lower"]
    return frame.sort_values(
        ["status", objective], key=_status_order, ascending=ascending, na_position="last", kind="mergesort"
    ).reset_index(drop=True)


def read_trials_csv(path: Any) -> pd.DataFrame:
    """Load a report's trials.csv with the column dtypes of trainables.metrics.

    Plain `pd.read_csv` guesses: Tune's 8-hex-digit trial ids such as "12345678" or "1e999999"
    come back as an int or as inf. Read the file through this instead.
    """
    frame = pd.read_csv(path, dtype={name: "string" for name, c in COLUMNS.items() if c.dtype == "string"})
    for name in frame.columns:
        column = COLUMNS.get(name)
        if column and column.dtype in ("Int64", "float64"):
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(column.dtype)
    return frame


def _status_order(series: pd.Series) -> pd.Series:
    if series.name == "status":
        return series.map({s.value: i for i, s in enumerate(ALL_STATUSES)}).fillna(len(ALL_STATUSES))
    return series
