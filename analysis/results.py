"""Load an experiment folder (local or s3://, gs://) into one tidy pandas table, one row per trial.

Reads only what Tune and qlora-sweep write as text: sweep_spec.yaml, the JSON experiment state,
and each trial's params.json / result.json / error.txt. Nothing is unpickled, so pointing the
report at a folder is safe, and it works while the sweep is still running.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from core import storage
from trainables.metrics import COLUMNS, TRIAL_COLUMNS

# Tune's trial status -> ours, when the trial's own reports do not say more.
_TUNE_STATUS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "ERROR": "failed"}
TERMINAL_TRIAL_STATUSES = ("oom", "diverged", "infeasible")
STATUSES = ("completed", "early_stopped", "running", "pending", "paused", "failed", "oom", "infeasible", "diverged")


class AnalysisInputError(Exception):
    """Bad input to report/compare/export (a folder, a trial id, an option); the message says the fix."""


class NotAnExperiment(AnalysisInputError):
    """The folder is not a qlora-sweep experiment."""


@dataclass
class Experiment:
    """One sweep's results.

    Attributes:
        path: The experiment folder or URI.
        spec: The sweep spec as it ran (sweep_spec.yaml).
        trials: One row per trial; columns from trainables.metrics.TRIAL_COLUMNS plus the config.
        curves: One row per evaluation of every trial (trial_id, training_iteration, step, eval_loss, ...).
        notes: Things the loader could not read, to show in the report instead of dropping silently.
    """

    path: str
    spec: dict[str, Any]
    trials: pd.DataFrame
    curves: pd.DataFrame
    config_columns: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def max_steps(self) -> int:
        return int(self.spec["train"]["max_steps"])


def is_experiment(path: str) -> bool:
    return storage.exists(storage.join(path, storage.SPEC_FILE))


def load_experiment(path: str) -> Experiment:
    """Read an experiment folder into an Experiment.

    Raises:
        NotAnExperiment: If `path` holds no sweep_spec.yaml (i.e. was not written by qlora-sweep).
    """
    path = storage.absolute(path)
    spec_path = storage.join(path, storage.SPEC_FILE)
    if not storage.exists(spec_path):
        raise NotAnExperiment(
            f"{path} is not a qlora-sweep experiment folder (no {storage.SPEC_FILE}). "
            "Pass the folder that `qlora-sweep run` printed, e.g. results/smoke-20260101-120000"
        )
    spec = yaml.safe_load(storage.read_text(spec_path))
    notes: list[str] = []
    tune_states = _tune_states(path, notes)
    rows, curves = [], []
    trial_dirs = [d for d in storage.list_dirs(path) if d.startswith("trial_")]
    seen: set[str] = set()
    for dirname in trial_dirs:
        row, curve = _load_trial(path, dirname, spec, tune_states, notes)
        if row is not None:
            rows.append(row)
            curves.extend(curve)
            seen.add(row["trial_id"])
    for trial_id, state in tune_states.items():
        if trial_id not in seen:  # suggested but never started: no folder yet
            rows.append({"trial_id": trial_id, "status": _TUNE_STATUS.get(state["status"], "pending"), **state["config"]})
    rows.extend(_infeasible_rows(path, notes))
    from sweeps.space import SEARCHED

    config_columns = ["r", "lora_alpha"] + (["lora_alpha_ratio"] if isinstance(spec["space"].get("lora_alpha"), dict) else [])
    config_columns += [c for c in SEARCHED if c not in ("r", "lora_alpha")]
    trials = _typed_table(rows, config_columns)
    curves_df = pd.DataFrame(curves) if curves else pd.DataFrame(columns=["trial_id", "training_iteration", "step", "eval_loss"])
    return Experiment(path=path, spec=spec, trials=trials, curves=curves_df, config_columns=config_columns, notes=notes)


def _tune_states(path: str, notes: list[str]) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, logdir, error_file, config} from the newest experiment_state JSON."""
    files = [f for f in storage.list_files(path) if f.startswith("experiment_state-") and f.endswith(".json")]
    if not files:
        return {}
    try:
        state = json.loads(storage.read_text(storage.join(path, sorted(files)[-1])))
    except (json.JSONDecodeError, OSError) as exc:
        notes.append(f"could not read Tune's experiment state ({exc}); statuses are inferred from results")
        return {}
    out = {}
    for trial_json, runtime_json in state.get("trial_data", []):
        trial, runtime = json.loads(trial_json), json.loads(runtime_json)
        config = trial.get("config") if isinstance(trial.get("config"), dict) else {}
        out[trial["trial_id"]] = {
            "status": trial.get("status", ""),
            "logdir": trial.get("relative_logdir"),
            "error_file": runtime.get("error_filename"),
            "num_failures": runtime.get("num_failures", 0),
            "config": {k: v for k, v in config.items() if not isinstance(v, (dict, list))},
        }
    return out


def _read_results(path: str, notes: list[str], dirname: str) -> list[dict[str, Any]]:
    results_path = storage.join(path, dirname, "result.json")
    if not storage.exists(results_path):
        return []
    out = []
    for line in storage.read_text(results_path).splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            notes.append(f"{dirname}/result.json has a truncated line (the trial was killed while writing); it was skipped")
    return out


def _load_trial(
    path: str, dirname: str, spec: dict[str, Any], tune_states: dict[str, dict[str, Any]], notes: list[str]
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    trial_id = dirname.removeprefix("trial_")
    params_path = storage.join(path, dirname, "params.json")
    params = json.loads(storage.read_text(params_path)) if storage.exists(params_path) else {}
    results = _read_results(path, notes, dirname)
    state = tune_states.get(trial_id, {})
    error, failed_at = None, None
    error_path = storage.join(path, dirname, "error.txt")
    if storage.exists(error_path):
        text = storage.read_text(error_path).strip().splitlines()
        error = next((line for line in reversed(text) if line.strip()), "error")
        failed_at = next((m.group(1) for line in reversed(text) if (m := _FAILURE_LINE.match(line))), None)
    evals = [r for r in results if "eval_loss" in r]
    last = results[-1] if results else {}
    finite = [r["eval_loss"] for r in evals if _finite(r["eval_loss"])]
    row: dict[str, Any] = {
        "trial_id": trial_id,
        "status": _status(state.get("status"), last, error, spec, failed_at),
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
        "error": error or last.get("oom_message"),
        "trial_dir": storage.join(path, dirname),
        "best_step": _best(evals).get("step"),
        "predicted_memory_mib": _predicted_memory(results, params),
        "checkpoint_path": _best_checkpoint(path, dirname, results),
        # Memory admission, packing and OOM handling (sweeps/admission.py, trainables/qlora.py).
        "gpu_fraction": last.get("gpu_fraction"),
        "gpu_ids": last.get("gpu_ids"),
        "started_at": last.get("started_at"),
        "ended_at": (last["started_at"] + last["elapsed_s"]) if _finite(last.get("started_at")) and _finite(last.get("elapsed_s")) else None,
        "micro_batch_size": last.get("micro_batch_size"),
        "oom_retry": last.get("oom_retry"),
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
        }
        for r in evals
    ]
    return row, curve


def _best(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The report with the lowest finite eval_loss ({} if none); the earliest wins a tie."""
    finite = [r for r in evals if _finite(r.get("eval_loss"))]
    return min(finite, key=lambda r: r["eval_loss"]) if finite else {}


def _predicted_memory(results: list[dict[str, Any]], params: dict[str, Any]) -> float | None:
    """The memory estimator's prediction, wherever the driver or trainable recorded it."""
    for source in (*reversed(results), params):
        value = source.get("predicted_memory_mib")
        if _finite(value):
            return float(value)
    return None


def _best_checkpoint(path: str, dirname: str, results: list[dict[str, Any]]) -> str | None:
    """The kept checkpoint folder with the lowest eval_loss.

    Tune keeps only some checkpoints (the best by eval_loss and the latest), and a report may run
    while Tune is still rotating them, so a result's checkpoint_dir_name is used only if the folder
    still exists.
    """
    named = [r for r in results if r.get("checkpoint_dir_name") and _finite(r.get("eval_loss"))]
    if not named:
        return None
    kept = set(storage.list_dirs(storage.join(path, dirname)))
    for r in sorted(named, key=lambda r: (r["eval_loss"], -(r.get("training_iteration") or 0))):
        if r["checkpoint_dir_name"] in kept:
            return storage.join(path, dirname, r["checkpoint_dir_name"])
    return None


def _infeasible_rows(path: str, notes: list[str]) -> list[dict[str, Any]]:
    """Configurations rejected before launch (memory admission), written by the driver."""
    location = storage.join(path, "infeasible.jsonl")
    if not storage.exists(location):
        return []
    rows = []
    for line in storage.read_text(location).splitlines():
        if line.strip():
            try:
                rows.append({**json.loads(line), "status": "infeasible"})
            except json.JSONDecodeError:
                notes.append("infeasible.jsonl has an unreadable line; it was skipped")
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value and value not in (float("inf"), float("-inf"))


# Tune's error.txt heads each failure with "Failure # N (occurred at YYYY-mm-dd_HH-MM-SS)".
_FAILURE_LINE = re.compile(r"^Failure # \d+ \(occurred at (\S+)\)")


def _status(
    tune_status: str | None,
    last: dict[str, Any],
    error: str | None,
    spec: dict[str, Any],
    failed_at: str | None = None,
) -> str:
    reported = last.get("trial_status")
    if reported in TERMINAL_TRIAL_STATUSES:
        return reported
    if tune_status == "ERROR":
        return "failed"
    # error.txt stays after a failure that Tune retried (train.max_failures). And when a trial's
    # node dies, Tune (2.60) never saves its ERROR status: the saved state still says RUNNING. So
    # an error counts unless the trial terminated normally or reported again after it (Tune's
    # "date" uses the same format as error.txt, so the strings compare in time order).
    retried = tune_status == "TERMINATED" or (failed_at is not None and (last.get("date") or "") > failed_at)
    if error and not retried:
        return "failed"
    if tune_status in ("RUNNING", "PENDING", "PAUSED"):
        return _TUNE_STATUS[tune_status]
    if not last:
        return "pending" if tune_status is None else "failed"
    max_steps = int(spec["train"]["max_steps"])
    rounds = max_steps // int(spec["train"]["eval_every"])
    asha = (spec.get("scheduler") or {}).get("asha") or {}
    max_rounds = asha.get("max_t") or rounds
    if (last.get("step") or 0) >= max_steps or (last.get("training_iteration") or 0) >= max_rounds:
        return "completed"
    if tune_status == "TERMINATED" or last.get("done"):
        return "early_stopped"
    return "running"


def _typed_table(rows: list[dict[str, Any]], config_columns: list[str]) -> pd.DataFrame:
    """Columns in a fixed order with the dtypes declared in trainables.metrics."""
    ordered = ["trial_id", "status", *config_columns]
    ordered += [c.name for c in TRIAL_COLUMNS if c.name not in ordered]
    frame = pd.DataFrame(rows)
    for name in ordered:
        if name not in frame:
            frame[name] = None
    extra = [c for c in frame.columns if c not in ordered]
    frame = frame[ordered + extra]
    for name in frame.columns:
        column = COLUMNS.get(name)  # config, metric and trial columns alike (trainables/metrics.py)
        dtype = column.dtype if column else None
        if dtype:
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(dtype) if dtype in ("Int64", "float64") else frame[name].astype(dtype)
    # A VRAM prediction compared with a CPU process's RSS would be a meaningless error figure.
    vram = (frame["memory_kind"] == "cuda_reserved").fillna(False).astype(bool)
    error = (frame["predicted_memory_mib"] - frame["peak_memory_mib"]) / frame["peak_memory_mib"] * 100
    frame["memory_error_pct"] = error.where(vram).astype("float64")
    return frame.sort_values(["status", "best_eval_loss"], key=_status_order, na_position="last").reset_index(drop=True)


def _status_order(series: pd.Series) -> pd.Series:
    if series.name == "status":
        return series.map({s: i for i, s in enumerate(STATUSES)}).fillna(len(STATUSES))
    return series
