"""The experiment folder's format: its one owner.

An experiment is a folder (or s3:// / gs:// prefix) that Ray Tune and qlora-sweep write together::

    <experiment>/
      sweep_spec.yaml          the spec as it ran (paths absolute, secrets redacted)  SPEC_FILE
      run_plan.json            what preflight resolved, with provenance (versioned)   PLAN_FILE
      data_report.json         rows read, train/eval counts, skipped bad rows          DATA_REPORT_FILE
      infeasible.jsonl         configurations memory admission refused before launch INFEASIBLE_FILE
      optuna.db                the Optuna study (local storage), or a consistent snapshot of
                               one kept elsewhere, published at every trial end       STUDY_FILE
      warm_start.json          earlier experiments the study started from (search.warm_start) WARM_START_FILE
      tuner.pkl, experiment_state-*.json, searcher-state-*.pkl    Ray Tune's own state
      qlora_sweep_digests.json, qlora_sweep_digests-<session>.json    HMACs of Tune's pickled
                               state, checked before `resume` unpickles it   DIGESTS_FILE, DIGESTS_PREFIX
      trial_<id>/params.json, result.json, error.txt, checkpoint_*/   one folder per trial
      report/                  what `qlora-sweep report` writes                     REPORT_DIR

The writer (sweeps/driver.py) and every reader (analysis/, `resume`) use these names and readers,
so the format lives here once. Readers parse JSON only: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from typing import Any


from core import storage, yaml_limits

SPEC_FILE = "sweep_spec.yaml"
PLAN_FILE = "run_plan.json"
DATA_REPORT_FILE = "data_report.json"
INFEASIBLE_FILE = "infeasible.jsonl"
STUDY_FILE = "optuna.db"
WARM_START_FILE = "warm_start.json"
REPORT_DIR = "report"
TUNER_FILE = "tuner.pkl"  # Ray Tune's pickled Tuner; only `resume` opens it (Tuner.restore)
# Digests of Tune's pickled state (sweeps/tune_state.py): tuner.pkl's and vouched-for files', and one per Tune session.
DIGESTS_FILE = "qlora_sweep_digests.json"
DIGESTS_PREFIX = "qlora_sweep_digests-"
TRIAL_PREFIX = "trial_"
PARAMS_FILE = "params.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
_STATE_PREFIX, _STATE_SUFFIX = "experiment_state-", ".json"
# Optuna user attribute of a study trial answered from an identical earlier one (search.skip_repeats).
REPEAT_ATTR = "repeat_of"
# Tune's error.txt heads each failure with "Failure # N (occurred at YYYY-mm-dd_HH-MM-SS)".
FAILURE_LINE = re.compile(r"^Failure # \d+ \(occurred at (\S+)\)")


def is_experiment(path: str) -> bool:
    """Whether `path` is a folder qlora-sweep wrote (it holds SPEC_FILE)."""
    return storage.exists(storage.join(path, SPEC_FILE))


def file(path: str, name: str) -> str:
    """The location of one of the experiment's own files (SPEC_FILE, PLAN_FILE, ...)."""
    return storage.join(path, name)


def read_spec(path: str) -> dict[str, Any]:
    """The spec as it ran (SPEC_FILE), as a plain dict ({} when it holds no mapping).

    Raises:
        FileNotFoundError: If the folder has no SPEC_FILE (see `is_experiment`).
        ValueError: If the file is not YAML.
    """
    location = file(path, SPEC_FILE)
    if not storage.exists(location):
        raise FileNotFoundError(location)
    try:
        value = yaml_limits.load(storage.read_text(location))
    except ValueError as exc:
        raise ValueError(f"{SPEC_FILE}: {str(exc).splitlines()[0]}") from None
    return value if isinstance(value, dict) else {}


def read_json(path: str, name: str) -> Any:
    """One of the experiment's own JSON files (DATA_REPORT_FILE, ...), parsed; None when it is absent.

    Raises:
        ValueError: If it is not JSON (json.JSONDecodeError).
        OSError: If it cannot be read.
    """
    location = file(path, name)
    if not storage.exists(location):
        return None
    return json.loads(storage.read_text(location))


def trial_dirname(trial_id: str) -> str:
    return f"{TRIAL_PREFIX}{trial_id}"


def trial_dir(path: str, trial_id: str) -> str:
    return storage.join(path, trial_dirname(trial_id))


def trial_dirnames(path: str) -> list[str]:
    """The trial folders of an experiment, sorted."""
    return [d for d in storage.list_dirs(path) if d.startswith(TRIAL_PREFIX)]


def read_results(path: str, trial_id: str, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """A trial's reports, in order, from its result.json (one JSON object per line).

    A line cut short by a kill is skipped (and noted in `notes` when given).
    """
    location = storage.join(trial_dir(path, trial_id), RESULT_FILE)
    if not storage.exists(location):
        return []
    out = []
    for line in storage.read_text(location).splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if notes is not None:
                notes.append(
                    f"{trial_dirname(trial_id)}/{RESULT_FILE} has a truncated line (the trial was killed while "
                    "writing); it was skipped"
                )
    return out


def read_params(path: str, trial_id: str) -> dict[str, Any]:
    """A trial's config as Tune saved it (params.json); {} before Tune wrote it."""
    location = storage.join(trial_dir(path, trial_id), PARAMS_FILE)
    return json.loads(storage.read_text(location)) if storage.exists(location) else {}


def read_error(path: str, trial_id: str) -> tuple[str | None, str | None]:
    """(last non-empty line of the trial's error.txt, when its last failure occurred), or (None, None)."""
    location = storage.join(trial_dir(path, trial_id), ERROR_FILE)
    if not storage.exists(location):
        return None, None
    text = storage.read_text(location).strip().splitlines()
    error = next((line for line in reversed(text) if line.strip()), "error")
    failed_at = next((m.group(1) for line in reversed(text) if (m := FAILURE_LINE.match(line))), None)
    return error, failed_at


def tune_states(path: str, notes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, logdir, error_file, num_failures, config} from Tune's newest experiment_state JSON.

    Raises nothing: an unreadable state gives {} (and a note when `notes` is given).
    """
    files = [f for f in storage.list_files(path) if f.startswith(_STATE_PREFIX) and f.endswith(_STATE_SUFFIX)]
    if not files:
        return {}
    try:
        state = json.loads(storage.read_text(storage.join(path, sorted(files)[-1])))
    except (json.JSONDecodeError, OSError) as exc:
        if notes is not None:
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


def read_jsonl(path: str, name: str, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The objects of one of the experiment's JSON-lines files (e.g. INFEASIBLE_FILE); bad lines skipped."""
    location = storage.join(path, name)
    if not storage.exists(location):
        return []
    rows = []
    for line in storage.read_text(location).splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if notes is not None:
                    notes.append(f"{name} has an unreadable line; it was skipped")
    return rows
