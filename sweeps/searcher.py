"""The Optuna searcher of a sweep, with its study in a database that optuna-dashboard can read.

Ray's `OptunaSearch` asks Optuna for every trial's config and tells it each trial's result. With
an RDB storage (sqlite next to the experiment by default, see `resolve_study`) the study lives
outside the driver: `optuna-dashboard sqlite:///EXPERIMENT/optuna.db` shows it live, and after a
driver crash the study is still there for `resume`.

Two gaps of Ray's searcher are closed here:

* Optuna trials can be left RUNNING: Tune does not tell the searcher about trials it abandons
  when the driver dies, and a tell that raises is only logged. `settle_study` resolves them before
  a resume and at the end of every run (except those whose Tune trial is unfinished: Tune
  continues them on resume, and they tell their own Optuna trial).
* A trial whose Optuna trial is already finished (or unknown) must not crash the driver when it
  reports again after a resume; `OptunaStudySearch` skips such reports.

And one waste of compute is avoided: samplers re-propose configurations the study has already
trained (TPE in a discrete space, often). With search.skip_repeats, such a proposal is answered
from the finished trial, as Optuna's FAQ suggests, and Optuna is asked again (`OptunaStudySearch`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from core import experiment_folder, storage
from core.numbers import is_finite_number
from core.redact import MASK, has_credentials, redact
from core.status import TrialStatus
from sweeps.baseline import BASELINE_ATTR, BASELINE_KEY, Baseline
from sweeps.warm_start import WARM_START_ATTR

if TYPE_CHECKING:
    from sweeps.spec import SweepSpec

# Where cloud-storage sweeps keep their sqlite study on the driver machine (a database cannot
# live in an object store); a consistent snapshot of it is published into the experiment at every
# trial end (`StudySnapshots`), from which `resume` on another machine restores it (`restore_study`).
STUDIES_ENV = "QLORA_SWEEP_STUDIES"
# User attribute linking an Optuna trial to its Tune trial (and trial_<id>/ folder).
TUNE_TRIAL_ATTR = "ray_trial_id"
# User attribute of an Optuna trial answered from an earlier finished trial with the same parameters.
REPEAT_ATTR = "repeat_of"
# Proposals per Tune trial that may be answered that way before a repeat is trained anyway (the
# space may be exhausted, or the sampler sure of one point).
MAX_REPEAT_SKIPS = 10
_UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def studies_root() -> Path:
    return Path(os.environ.get(STUDIES_ENV) or Path.home() / ".local" / "share" / "qlora-sweep" / "studies")


def resolve_study(spec: SweepSpec, experiment_dir: str, experiment_name: str) -> SweepSpec:
    """Fill search.optuna_storage and search.optuna_study_name with what this sweep will use.

    The saved sweep_spec.yaml then records where the study is, for resume and the dashboard.
    """
    search = spec.search
    url = search.optuna_storage
    if url is None:
        if storage.is_uri(experiment_dir):
            url = f"sqlite:///{studies_root() / experiment_name}.db"
        else:
            url = f"sqlite:///{Path(experiment_dir, experiment_folder.STUDY_FILE)}"
    elif url != "memory":
        # A resumed sweep's saved spec holds the URL with its password masked (core/redact.py).
        url = _absolute_sqlite(unmasked_study_url(url), spec.base_dir)
    name = search.optuna_study_name or experiment_name
    search = search.model_copy(update={"optuna_storage": url, "optuna_study_name": name})
    return spec.model_copy(update={"search": search})


def _absolute_sqlite(url: str, base_dir: Path) -> str:
    """A relative sqlite path resolves against the spec's folder, not the working directory."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return url
    path = Path(parsed.database).expanduser()
    if path.is_absolute():
        return url
    return parsed.set(database=str((base_dir / path).resolve())).render_as_string(hide_password=False)


def sqlite_path(url: str | None) -> Path | None:
    """The database file of a sqlite URL, else None."""
    if not url or url == "memory":
        return None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def dashboard_command(url: str | None) -> str | None:
    """The optuna-dashboard command for a study (None for an in-memory study)."""
    if not url or url == "memory":
        return None
    return f"optuna-dashboard {redact(url)}"  # credentials masked (core/redact.py)


def open_storage(url: str) -> Any:
    """An Optuna RDB storage; sqlite waits for locks held by a reading dashboard instead of failing.

    Its pickle (Ray pickles the searcher into tuner.pkl and searcher-state-*.pkl) holds the URL with
    its credentials masked (core/redact.py); the real URL stays in this process's memory.
    """
    engine_kwargs = {"connect_args": {"timeout": 30}} if sqlite_path(url) else None
    if has_credentials(url):
        _STUDY_URLS[redact(url)] = url
    return StudyStorage(url, engine_kwargs=engine_kwargs)


# Study URLs with credentials, by their redacted form: what an unpickled storage connects with.
_STUDY_URLS: dict[str, str] = {}
# sqlite studies restored from an experiment's snapshot to another path (`restore_study`): the URL Ray's
# pickled searcher holds -> the URL this process uses.
_RELOCATED: dict[str, str] = {}


def unmasked_study_url(url: str) -> str:
    """The URL an unpickled or resumed study connects with: the real one if this process has it;
    otherwise a password that was masked is left out, so the database driver's own sources apply
    (PGPASSWORD or ~/.pgpass for PostgreSQL)."""
    url = _RELOCATED.get(url, url)
    if url in _STUDY_URLS:
        return _STUDY_URLS[url]
    if MASK not in url or url == "memory":
        return url
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a SQLAlchemy URL: Optuna reports it
        return url
    return parsed._replace(password=None).render_as_string(hide_password=False) if parsed.password == MASK else url


class StudyStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage, pickled with the credentials of its URL masked (see `open_storage`)."""

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["url"] = redact(state["url"])
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__({**state, "url": unmasked_study_url(state["url"])})


def check_study(spec: SweepSpec, *, resuming: bool) -> str | None:
    """A problem with the (resolved) study location, else None. Checked before Ray starts.

    A new sweep must not reuse an existing study (TPE would learn from another sweep's trials);
    a resumed one needs its study back, because Ray's restored searcher points at it.
    """
    url, name = spec.search.optuna_storage, spec.search.optuna_study_name
    if url is None or url == "memory":
        return None
    db = sqlite_path(url)
    if db is not None:
        if resuming and not db.exists():
            return (
                f"search.optuna_storage: the study database {db} is gone. Resume continues that study "
                "(Ray's saved searcher points at it): copy the file back to that path, or start a new sweep"
            )
        if not resuming and not db.exists():
            return None  # created with the experiment; nothing there to collide with
        if not db.parent.is_dir():
            return f"search.optuna_storage: folder {db.parent} does not exist; create it or choose another path"
    try:
        import optuna

        names = optuna.study.get_all_study_names(storage=open_storage(url))
    except Exception as exc:  # unreachable server, bad credentials, missing driver module
        first = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        unsaved = (
            ". A password in the study URL is never saved with the experiment: give it to the database "
            "driver (PGPASSWORD or ~/.pgpass for PostgreSQL)"
            if resuming and db is None else ""
        )
        return f"search.optuna_storage: cannot open {redact(url)} ({first}){unsaved}"
    if resuming and name not in names:
        return f"search.optuna_study_name: study '{name}' is not in the Optuna storage; resume needs the sweep's study"
    if not resuming and name in names:
        return (
            f"search.optuna_study_name: study '{name}' already exists in the Optuna storage; "
            "choose another --name (or search.optuna_study_name), or continue that sweep with `qlora-sweep resume`"
        )
    return None


def search_space(spec: SweepSpec) -> Callable[[Any], dict[str, Any]]:
    """The define-by-run function `OptunaSearch(space=...)` calls: the spec's typed space
    (trainables/params.py) with train.batch_size bound. Picklable, as Tune pickles the searcher."""
    return partial(spec.space.define_by_run, default_batch_size=spec.train.batch_size)


def make_searcher(spec: SweepSpec, space: Any, sampler: Any, mode: str) -> OptunaStudySearch:
    """The sweep's searcher, its study in search.optuna_storage (resolved; see `resolve_study`)."""

    url = spec.search.optuna_storage
    db = sqlite_path(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return OptunaStudySearch(
        space=space,
        # Multi-objective mode (search.objectives): lists, one direction per metric.
        metric=spec.search.objective_metrics if spec.search.multi_objective else spec.search.metric,
        mode=[spec.tune_mode(m) for m in spec.search.objective_metrics] if spec.search.multi_objective else mode,
        sampler=sampler,
        storage=open_storage(url) if url and url != "memory" else None,
        study_name=spec.search.optuna_study_name,
        skip_repeats=spec.search.skip_repeats,
    )


class TuneGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler (search.sampler: grid), minus its `study.stop()` once every point has been proposed.

    `Study.stop` only works inside `study.optimize`; under Ray Tune the study is driven by ask/tell
    and Tune stops after num_samples trials, so the call would only raise. The trials take the
    grid's points in its seeded, shuffled order, one each; past the grid's size Optuna proposes
    points again (answered from the study with search.skip_repeats).
    """

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


class BaselineASHAScheduler(ASHAScheduler):
    """Ray's ASHA, except that the baseline trial (`BASELINE_KEY` in its config) is never stopped
    early: its results still fill ASHA's rungs, so other trials are compared with it."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and trial.config.get(BASELINE_KEY) and result.get(self._time_attr, 0) < self._max_t:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


class OptunaStudySearch(OptunaSearch):
    """Ray's OptunaSearch, with each Optuna trial tagged with its Tune trial id and reports that
    cannot be recorded (finished or unknown Optuna trial after a resume) skipped, not raised."""

    def __init__(self, *args: Any, skip_repeats: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip_repeats = skip_repeats
        self.repeats_skipped = 0
        # A study kept outside the experiment (StudySnapshots) is published at every proposal too, so
        # the experiment's snapshot holds every Optuna trial this searcher's saved state names.
        self.snapshots: StudySnapshots | None = None

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        # getattr: a searcher pickled before skip_repeats existed (resume of an older sweep) lacks it.
        for _ in range(MAX_REPEAT_SKIPS if getattr(self, "skip_repeats", False) else 0):
            if params is None or not self._answer_repeat(trial_id):
                break
            params = super().suggest(trial_id)  # a fresh Optuna trial for the same Tune trial
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            # Lets `settle_study` (and a person on the dashboard) find the Tune trial of an Optuna trial.
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
            if params is not None and ot_trial.user_attrs.get(BASELINE_ATTR):
                # The enqueued baseline (sweeps/baseline.py): its config says so, for ASHA and the trials table.
                params = {**params, BASELINE_KEY: True}
        if params is not None and getattr(self, "snapshots", None) is not None:
            self.snapshots.publish()  # before Tune saves a state that names this trial
        return params

    def _rebind_lost(self, trial_id: str) -> bool:
        """After a resume from a study snapshot older than this searcher's state, the Optuna trial of
        `trial_id` may be missing from the study. Ask a new one with the same parameters and tags in its
        place, so the resumed trial's results reach the study. False if its parameters are unknown."""
        old = self._ot_trials[trial_id]
        frozen = getattr(old, "_cached_frozen_trial", None)
        if frozen is None or not frozen.params:
            return False
        self._ot_study.enqueue_trial(dict(frozen.params), user_attrs=dict(frozen.user_attrs), skip_if_exists=False)
        new = self._ot_study.ask(fixed_distributions=dict(frozen.distributions))
        self._ot_trials[trial_id] = new
        print(f"[qlora-sweep] Optuna trial {frozen.number} of Tune trial {trial_id} is not in the restored study "
              f"(its snapshot predates it); recorded again as Optuna trial {new.number}", flush=True)
        return True

    def _recorded(self, trial_id: str, record: Callable[[], None]) -> None:
        """Run `record` (a report or tell of `trial_id`), rebinding an Optuna trial the study lost once."""
        try:
            record()
        except KeyError:  # optuna's RDB storage: "Record does not exist."
            if not self._rebind_lost(trial_id):
                raise
            record()

    def seed_study(self, baseline: Baseline | None, priors: list[Any]) -> None:
        """Start a new study from what is known: earlier experiments' trials (search.warm_start) as
        finished prior trials, and the baseline enqueued as the first trial to run."""
        if priors:
            self._ot_study.add_trials(priors)
        if baseline is not None:
            self._ot_study.enqueue_trial(baseline.params, user_attrs={BASELINE_ATTR: True}, skip_if_exists=False)

    def _answer_repeat(self, trial_id: str) -> bool:
        """If the proposal for `trial_id` repeats a finished trial, tell it that trial's values and forget it."""
        import optuna

        proposal = self._ot_trials[trial_id]
        for earlier in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            # A warm-start trial (another experiment's) is not answered from: this sweep has no curve or adapter of it.
            if earlier.params == proposal.params and WARM_START_ATTR not in earlier.user_attrs:
                proposal.set_user_attr(REPEAT_ATTR, earlier.number)
                self._ot_study.tell(proposal, earlier.values)
                del self._ot_trials[trial_id]
                self.repeats_skipped = getattr(self, "repeats_skipped", 0) + 1
                print(f"[repeat] {proposal.params} was trained by Optuna trial {earlier.number}: not training it "
                      "again, asking for another configuration", flush=True)
                return True
        return False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        import optuna

        if trial_id not in self._ot_trials:
            return
        try:
            self._recorded(trial_id, lambda: super(OptunaStudySearch, self).on_trial_result(trial_id, result))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # settled before this resumed trial reported again; the study keeps the first outcome

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials:
            return
        if result and trial_id not in self._completed_trials and isinstance(self.metric, str) and self.metric in result:
            # Tune hands the result that ends a trial (stop criterion) only to on_trial_complete;
            # report it too, so the dashboard's intermediate-value curves reach the last round.
            self.on_trial_result(trial_id, result)
        if result and isinstance(self.metric, list) and any(not is_finite_number(result.get(m)) for m in self.metric):
            # Multi-objective: Optuna cannot complete a trial with a missing value (Ray would only log
            # the error and leave it RUNNING); without all values it ends PRUNED, or FAIL on error.
            result = None
        if result and isinstance(self.metric, str) and not is_finite_number(result.get(self.metric)) and self.metric in result:
            # A diverged trial (NaN loss). Optuna refuses NaN as a value, so this too ends PRUNED:
            # TPE ranks a pruned trial whose last intermediate value is NaN below every other trial,
            # and so learns to avoid its region (a FAIL would be ignored).
            if trial_id not in self._completed_trials:
                status = str(result.get("trial_status") or TrialStatus.DIVERGED)
                self._recorded(trial_id, lambda: self._ot_trials[trial_id].set_user_attr("trial_status", status))
            result = None
        self._recorded(trial_id, lambda: super(OptunaStudySearch, self).on_trial_complete(trial_id, result=result, error=error))

    def set_constraint(self, trial_id: str, name: str, value: float) -> None:
        """Record a constraint on a Tune trial's Optuna trial before it is told (value > 0: infeasible).

        Optuna's samplers steer away from infeasible trials and `best_trials` leaves them out. Set from
        the trial's parameters (sweeps/admission.py), not from its values: a sampler's constraints_func
        runs before Optuna stores the values, so through Ray it would see none.
        """
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            ot_trial.set_constraint(name, float(value))

    def link_tune_trial(self, trial_id: str, tune_trial_id: str) -> None:
        """Tag the Optuna trial asked under `trial_id` with the Tune trial that runs it (see sweeps/admission.py)."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, tune_trial_id)


# --- settling stale RUNNING trials -------------------------------------------------------------


def _last_value(experiment_dir: str, trial_id: str, metric: str) -> float | None:
    """The last value of `metric` a trial reported, if it is a finite number (from its result.json)."""
    values = [r.get(metric) for r in experiment_folder.read_results(experiment_dir, trial_id)]
    finite = [v for v in values if v is not None]
    return float(finite[-1]) if finite and is_finite_number(finite[-1]) else None


def settle_study(spec: SweepSpec, experiment_dir: str) -> list[str]:
    """Resolve Optuna trials left RUNNING with no Tune trial going to tell them.

    A RUNNING Optuna trial whose Tune trial is unfinished in Tune's saved state is left alone:
    `resume` continues that trial, which reports to it (after a normal run none is unfinished;
    after Ctrl+C some are, and stay RUNNING for the resume). Any other is stale: told COMPLETE
    with its last reported value if its Tune trial terminated normally, else FAIL (asked just
    before the driver died, errored, or restarted from scratch under a new id).

    Returns:
        One line per trial settled, for the log.
    """
    import optuna

    url, name = spec.search.optuna_storage, spec.search.optuna_study_name
    if url is None or url == "memory":
        return []
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    # Tune's saved statuses, read as JSON (never unpickled).
    statuses = {trial_id: state["status"] for trial_id, state in experiment_folder.tune_states(experiment_dir).items()}
    settled = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        tune_id = trial.user_attrs.get(TUNE_TRIAL_ATTR)
        status = statuses.get(tune_id) if tune_id else None
        if status in _UNFINISHED:
            continue
        # One value per objective (several in multi-objective mode, search.objectives).
        metrics = spec.search.objective_metrics
        values = [_last_value(experiment_dir, tune_id, m) if status == "TERMINATED" else None for m in metrics]
        if all(v is not None for v in values):
            study.tell(trial.number, values if len(values) > 1 else values[0])
            shown = ", ".join(f"{m} {v:.4f}" for m, v in zip(metrics, values))
            settled.append(f"Optuna trial {trial.number} (Tune {tune_id}): COMPLETE with {shown}")
        else:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            why = f"Tune status {status}" if status else "no Tune trial (asked just before the driver stopped)"
            settled.append(f"Optuna trial {trial.number} (Tune {tune_id or '-'}): FAIL, {why}")
    return settled


def snapshot_target(url: str | None, experiment_dir: str) -> tuple[Path, str] | None:
    """(the sqlite study file, where its snapshot goes in the experiment), or None when there is
    nothing to publish: no sqlite study, or the study is the experiment's own file already."""
    db = sqlite_path(_RELOCATED.get(url, url) if url else url)
    target = experiment_folder.file(experiment_dir, experiment_folder.STUDY_FILE)
    if db is None or (not storage.is_uri(target) and Path(target).resolve() == db.resolve()):
        return None
    return db, target


def snapshot_study(db: Path, target: str) -> None:
    """Write a consistent copy of the sqlite study `db` to `target` (local or cloud).

    sqlite3's online backup API copies pages under the database's own locks, so the copy is a
    state the database was in even while Optuna (or a dashboard) writes; a byte copy of a file in
    use can be torn. The copy is written whole (core/storage.py: temp file + rename locally; an
    object store publishes an object at close).
    """
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qlora-sweep-study-") as tmp:
        copy = Path(tmp, experiment_folder.STUDY_FILE)
        source = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            destination = sqlite3.connect(copy)
            try:
                source.backup(destination)
            finally:
                destination.close()
        finally:
            source.close()
        storage.write_bytes(target, copy.read_bytes())


def publish_study(spec: SweepSpec, experiment_dir: str) -> str | None:
    """Publish a snapshot of a sqlite study kept outside the experiment into it (`snapshot_study`)."""
    found = snapshot_target(spec.search.optuna_storage, experiment_dir)
    if found is None or not found[0].exists():
        return None
    snapshot_study(*found)
    return found[1]


def restore_study(spec: SweepSpec, experiment_dir: str, experiment_name: str) -> tuple[SweepSpec, str | None]:
    """On resume, bring back a sqlite study that is not on this machine from the experiment's snapshot.

    The saved spec names the study file of the machine that ran the sweep (a lost head node's disk,
    for cloud storage). When that file is missing here and the experiment holds a snapshot, the
    snapshot becomes `studies_root()/<experiment>.db` (or continues one restored there before), and
    Ray's searcher, unpickled with the old path, connects to it (see `unmasked_study_url`).

    Returns:
        (the spec with the URL in use, a line for the log or None).
    """
    url = spec.search.optuna_storage
    found = snapshot_target(url, experiment_dir)
    if url is None or found is None or found[0].exists() or not storage.exists(found[1]):
        return spec, None
    local = studies_root() / f"{experiment_name}.db"
    line = f"optuna study {found[0]} is not on this machine; continuing the one restored before at {local}"
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + ".partial")
        partial.write_bytes(storage.read_bytes(found[1]))
        partial.replace(local)
        line = f"optuna study {found[0]} is not on this machine; restored it from {found[1]} to {local}"
    new_url = f"sqlite:///{local}"
    if new_url != url:
        _RELOCATED[url] = new_url
    search = spec.search.model_copy(update={"optuna_storage": new_url})
    return spec.model_copy(update={"search": search}), line


def study_snapshots(spec: SweepSpec, experiment_dir: str) -> list[Any]:
    """The Tune callback publishing the study at every trial end, when the study lives outside the experiment."""
    if snapshot_target(spec.search.optuna_storage, experiment_dir) is None:
        return []
    return [StudySnapshots(spec.search.optuna_storage, experiment_dir)]


class StudySnapshots(Callback):
    """At every trial end (completed, stopped by ASHA, errored), publish the study into the experiment.

    Tune tells the searcher before its callbacks (ray/tune/execution/tune_controller.py `stop_trial`,
    `_process_trial_failure`), so each snapshot holds the trial's outcome. A new head node can then
    resume from the experiment alone. Pickled into tuner.pkl with the run config; it holds the study
    URL with credentials masked (a sqlite URL has none) and resolves a restored study's new path.
    """

    def __init__(self, url: str, experiment_dir: str):
        self.url = redact(url)
        self.experiment_dir = experiment_dir
        self.failures = 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.publish()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.publish()

    def publish(self) -> None:
        found = snapshot_target(self.url, self.experiment_dir)
        if found is None or not found[0].exists():
            return
        try:
            snapshot_study(*found)
        except Exception as exc:  # a storage hiccup must not end the sweep; the next trial end retries
            self.failures += 1
            first = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
            print(f"[qlora-sweep] warning: could not publish the optuna study to {redact(found[1])} ({first}); "
                  "retrying at the next trial end", flush=True)
