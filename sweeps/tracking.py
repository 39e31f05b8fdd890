"""Experiment trackers: MLflow and Weights & Biases, through Ray Tune's own logger callbacks.

The spec's `tracking:` section (sweeps/spec.py `TrackingSpec`) names them; the experiment folder stays
the record of the sweep either way. What each tracker gets:

- MLflow: one run for the sweep (the parent, created here by the driver with the MLflow client), and one
  child run per trial (tag `mlflow.parentRunId`), logged by sweeps/tracking_callbacks.py `TrialRunsToMLflow`, Ray Tune's
  `MLflowLoggerCallback` with its own run names and tags. A trial run holds the trial's config as
  params, every evaluation round's numeric metrics (trainables/metrics.py REPORTED_METRICS, step =
  the round), the memory kind as a tag, and a `status` tag (core/status.py) at the end. Once the report
  is written, `publish` logs its files to the parent run and sets each trial's `status` tag to the one
  trials.csv gives it.
- W&B: one run per trial, in a group named after the experiment, logged by `TrialRunsToWandb` (Ray
  Tune's `WandbLoggerCallback`): config, every round's numeric metrics, the memory kind in the config,
  and the end status as a tag and in the summary.

Tracker secrets (SECRET_ENV) come from the environment only: no callback holds them (the callbacks are
pickled into tuner.pkl), and the W&B key is not passed as a runtime_env variable, which Ray logs in plain
text (Ray's `WandbLoggerCallback` does that; `TrialRunsToWandb` does not). sweeps/driver.py sends them to
workers in its setup hook, like the other secrets.

Neither tracker is a dependency: `pip install 'qlora-sweep[tracking]'`; `problems` says so in preflight.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import experiment_folder, storage
from core.redact import redact
from sweeps.tracking_names import EXPERIMENT_TAG, ROLE_TAG, STATUS_TAG, TRIAL_TAG

if TYPE_CHECKING:
    from sweeps.spec import SweepSpec

INSTALL_HINT = "pip install 'qlora-sweep[tracking]'"
# Tracker credentials, read from the environment only (sweeps/driver.py adds them to its SECRET_ENV).
SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY")

# How long preflight waits for the MLflow server (no retries: a wrong URI fails in seconds).
PREFLIGHT_TIMEOUT_S = 10


def problems(spec: SweepSpec, *, offline: bool = False) -> list[str]:
    """What keeps the spec's trackers from working, checked in preflight before Ray starts.

    A tracker package that is not installed, an MLflow server that does not answer (unless `offline`),
    and W&B online mode without a key.
    """
    tracking = spec.tracking
    found: list[str] = []
    for section, package in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if getattr(tracking, section) is not None and not installed(package):
            found.append(
                f"tracking.{section}: the {package} package is not installed; {INSTALL_HINT}, or remove "
                f"tracking.{section} from the spec"
            )
    if found:
        return found
    if tracking.mlflow is not None and not offline:
        problem = _mlflow_reachable(tracking.mlflow.uri)
        if problem:
            found.append(problem)
    if tracking.wandb is not None and tracking.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        if not _wandb_logged_in():
            found.append(
                "tracking.wandb: mode is online but no W&B key was found; set WANDB_API_KEY in the environment "
                "(or run `wandb login`), or use mode: offline and `wandb sync` later"
            )
    return found


def installed(package: str) -> bool:
    """Whether `package` imports here."""
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """MLflow's HTTP client without retries and with a short timeout, for the preflight probe."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(PREFLIGHT_TIMEOUT_S)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _mlflow_reachable(uri: str) -> str | None:
    from mlflow.tracking import MlflowClient

    try:
        with _fail_fast():
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # connection refused, 401/403, a broken store
        first = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        return (
            f"tracking.mlflow.uri: cannot reach the MLflow tracking server at {redact(uri)} ({first[:300]}). "
            "Start it (`mlflow server --host 127.0.0.1 --port 5000`), fix the URI, or set MLFLOW_TRACKING_TOKEN "
            "(or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) if it needs credentials"
        )
    return None


def _wandb_logged_in() -> bool:
    try:
        import wandb

        wandb.ensure_configured()
        return bool(wandb.api.api_key)
    except Exception:
        return False


def experiment_of(spec: SweepSpec) -> str:
    """The MLflow experiment the sweep's runs go to."""
    assert spec.tracking.mlflow is not None
    return spec.tracking.mlflow.experiment or spec.name


# --- building the callbacks ---------------------------------------------------------------------


def callbacks(spec: SweepSpec, experiment_name: str, experiment_dir: str, log: Callable[[str], None]) -> list[Any]:
    """Ray Tune logger callbacks for the spec's trackers (none without a tracking section).

    For MLflow, creates the sweep's parent run first (or finds it, for a sweep started before).
    """
    from sweeps.tracking_callbacks import TrialRunsToMLflow, TrialRunsToWandb

    made: list[Any] = []
    raw = {"train": spec.train.model_dump(mode="json"), "scheduler": spec.scheduler.model_dump(mode="json")}
    if spec.tracking.mlflow is not None:
        uri = spec.tracking.mlflow.uri
        parent = parent_run(uri, experiment_of(spec), experiment_name, experiment_dir, create=True)
        log(f"[qlora-sweep] mlflow: experiment '{experiment_of(spec)}', sweep run {parent} at {redact(uri)}")
        made.append(
            TrialRunsToMLflow(
                tracking_uri=uri,
                experiment_name=experiment_of(spec),
                tags={"mlflow.parentRunId": parent, EXPERIMENT_TAG: experiment_name, ROLE_TAG: "trial"},
                spec_for_status=raw,
            )
        )
    if spec.tracking.wandb is not None:
        wandb_spec = spec.tracking.wandb
        # wandb writes its runs into DIR/wandb: $WANDB_DIR/wandb, or the local experiment folder's wandb/.
        wandb_dir = os.environ.get("WANDB_DIR") or (None if storage.is_uri(experiment_dir) else experiment_dir)
        if wandb_dir:
            Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        where = f", run files in {Path(wandb_dir, 'wandb')}" if wandb_dir and wandb_spec.mode == "offline" else ""
        log(f"[qlora-sweep] wandb: project '{wandb_spec.project}', group '{experiment_name}', mode {wandb_spec.mode}{where}")
        made.append(
            TrialRunsToWandb(
                project=wandb_spec.project,
                group=experiment_name,
                mode=wandb_spec.mode,
                spec_for_status=raw,
                **({"dir": wandb_dir} if wandb_dir else {}),
            )
        )
    return made


def parent_run(uri: str, experiment: str, experiment_name: str, experiment_dir: str, *, create: bool) -> str | None:
    """The id of the sweep's MLflow run (tagged with the experiment folder's name); made if `create`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        if not create:
            return None
        experiment_id = client.create_experiment(experiment)
    else:
        experiment_id = found.experiment_id
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.{EXPERIMENT_TAG} = '{experiment_name}' and tags.{ROLE_TAG} = 'sweep'"
    )
    if runs:
        return runs[0].info.run_id
    if not create:
        return None
    run = client.create_run(
        experiment_id,
        run_name=experiment_name,
        tags={EXPERIMENT_TAG: experiment_name, ROLE_TAG: "sweep", "experiment_dir": redact(experiment_dir)},
    )
    return run.info.run_id


# --- after the report ---------------------------------------------------------------------------


def publish(experiment_dir: str, report: Any, log: Callable[[str], None], *, interrupted: str | None = None) -> None:
    """Log the report's files to the sweep's MLflow run, set each trial run's status from trials.csv,
    and end the sweep run. Nothing without tracking.mlflow in the saved spec; a tracker that fails is
    reported and skipped (the report in the folder is already written)."""
    try:
        raw = experiment_folder.read_spec(experiment_dir)
    except (OSError, ValueError):
        return  # no saved spec to name a tracker (the report said what is wrong with the folder)
    mlflow_raw = ((raw.get("tracking") or {}) if isinstance(raw, dict) else {}).get("mlflow")
    if not mlflow_raw:
        return
    uri = mlflow_raw["uri"]
    experiment = mlflow_raw.get("experiment") or raw.get("name")
    experiment_name = experiment_dir.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]  # the folder's name
    try:
        _publish(uri, experiment, experiment_name, experiment_dir, report, interrupted)
    except Exception as exc:
        first = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        log(f"[qlora-sweep] mlflow: could not log the report to the sweep run ({first}); the report is in the folder")
        return
    log(f"[qlora-sweep] mlflow: report logged to the sweep run of '{experiment_name}' at {redact(uri)}")


def _publish(uri: str, experiment: str, experiment_name: str, experiment_dir: str, report: Any, interrupted: str | None) -> None:
    from mlflow.tracking import MlflowClient

    from analysis.results import read_trials_csv

    client = MlflowClient(tracking_uri=uri)
    parent = parent_run(uri, experiment, experiment_name, experiment_dir, create=True)
    with tempfile.TemporaryDirectory(prefix="qlora-sweep-report-") as tmp:
        for name in report.files:
            target = Path(tmp, *name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_read_bytes(storage.join(report.report_dir, *name.split("/"))))
        client.log_artifacts(parent, tmp, artifact_path="report")
        trials = read_trials_csv(Path(tmp, "trials.csv")) if Path(tmp, "trials.csv").is_file() else None
    if trials is not None:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.{EXPERIMENT_TAG} = '{experiment_name}' and tags.{ROLE_TAG} = 'trial'",
            max_results=10_000,
        )
        status_of = dict(zip(trials["trial_id"].astype(str), trials["status"].astype(str)))
        for run in runs:
            status = status_of.get(run.data.tags.get(TRIAL_TAG, ""))
            if status is not None:
                client.set_tag(run.info.run_id, STATUS_TAG, status)
        for status, count in trials["status"].astype(str).value_counts().items():
            client.set_tag(parent, f"trials_{status}", str(int(count)))
    client.set_terminated(parent, status="KILLED" if interrupted else "FINISHED")


def _read_bytes(location: str) -> bytes:
    fs, path = storage.filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()
