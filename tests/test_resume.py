"""Resume after the driver is killed, the Optuna study in sqlite, and optuna-dashboard reading it.

One real scenario, shared by the tests below: `qlora-sweep run` (4 trials, 2 at a time, 40 steps)
in its own process group, SIGKILLed once one trial has finished and another is mid-way, then
`qlora-sweep resume`. optuna-dashboard watches the study's sqlite file the whole time.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.cli_runs import read_results
from tests.conftest import free_port, make_spec_dict, own_home, ray_pids, wait_for_no_ray_processes, write_spec

BIN = Path(sys.executable).parent
QLORA_SWEEP = str(BIN / "qlora-sweep")
NUM_SAMPLES = 4
MAX_STEPS = 40
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}


# --- the refusal (no Ray, no training) ---------------------------------------------------------


class _Tripwire:
    """Unpickling this creates a file: proof that resume never unpickled the folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("entry", ["cli", "sweep.py"])
def test_resume_refuses_a_folder_that_qlora_sweep_did_not_write(tmp_path: Path, entry: str) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    marker = tmp_path / "unpickled"
    # A folder that looks like a Tune experiment to Ray, but has no sweep_spec.yaml.
    (foreign / "tuner.pkl").write_bytes(pickle.dumps(_Tripwire(marker)))
    (foreign / "searcher-state-x.pkl").write_bytes(pickle.dumps(_Tripwire(marker)))
    command = (
        [QLORA_SWEEP, "resume", str(foreign)]
        if entry == "cli"
        else [sys.executable, str(Path(__file__).parent.parent / "sweeps" / "sweep.py"), "--resume", str(foreign)]
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2, done.stderr
    assert "not a qlora-sweep experiment folder (no sweep_spec.yaml)" in done.stderr
    assert "unpickles" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not marker.exists(), "resume unpickled a file from a folder it should have refused"


def test_resume_of_a_missing_folder_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [QLORA_SWEEP, "resume", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert done.returncode == 2
    assert "no such folder" in done.stderr and "Traceback" not in done.stderr


# --- where the study lives, and settling stale trials (real sqlite, no Ray) --------------------


def test_a_bad_optuna_storage_url_is_a_spec_error_that_says_what_to_write() -> None:
    from sweeps.spec import SpecError, parse_spec

    expected = r"search\.optuna_storage: got 'optuna\.db'; not a SQLAlchemy URL; write e\.g\. sqlite:"
    with pytest.raises(SpecError, match=expected):
        parse_spec(make_spec_dict(search={"optuna_storage": "optuna.db"}))
    with pytest.raises(SpecError, match=r"train\.max_failures: got -1"):
        parse_spec(make_spec_dict(train={"max_failures": -1}))


def test_the_study_goes_next_to_local_results_and_to_the_driver_for_cloud_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sweeps.searcher import resolve_study
    from sweeps.spec import parse_spec

    spec = parse_spec(make_spec_dict(), base_dir=tmp_path)
    local = resolve_study(spec, str(tmp_path / "res" / "exp1"), "exp1").search
    assert (local.optuna_storage, local.optuna_study_name) == (f"sqlite:///{tmp_path}/res/exp1/optuna.db", "exp1")
    monkeypatch.setenv("QLORA_SWEEP_STUDIES", str(tmp_path / "studies"))
    cloud = resolve_study(spec, "s3://bucket/res/exp2", "exp2").search
    assert cloud.optuna_storage == f"sqlite:///{tmp_path}/studies/exp2.db"
    relative = parse_spec(make_spec_dict(search={"optuna_storage": "sqlite:///db/o.db"}), base_dir=tmp_path)
    assert resolve_study(relative, "s3://b/x", "x").search.optuna_storage == f"sqlite:///{tmp_path}/db/o.db"
    shared = parse_spec(make_spec_dict(search={"optuna_storage": "postgresql://u@h/db", "optuna_study_name": "s"}))
    assert (resolve_study(shared, "/r/x", "x").search.optuna_storage, "s") == ("postgresql://u@h/db", "s")
    memory = parse_spec(make_spec_dict(search={"optuna_storage": "memory"}))
    assert resolve_study(memory, "/r/x", "x").search.optuna_storage == "memory"


def test_a_new_sweep_refuses_an_existing_study_and_resume_needs_its_database(tmp_path: Path) -> None:
    import optuna

    from sweeps.searcher import check_study, resolve_study
    from sweeps.spec import parse_spec

    spec = resolve_study(parse_spec(make_spec_dict()), str(tmp_path / "exp"), "exp")
    assert check_study(spec, resuming=False) is None  # a fresh folder: nothing to collide with
    problem = check_study(spec, resuming=True)
    assert problem and f"the study database {tmp_path}/exp/optuna.db is gone" in problem
    (tmp_path / "exp").mkdir()
    optuna.create_study(study_name="exp", storage=spec.search.optuna_storage)
    assert "study 'exp' already exists" in check_study(spec, resuming=False)
    assert check_study(spec, resuming=True) is None


def _experiment_state(folder: Path, statuses: dict[str, str]) -> None:
    """The JSON part of Tune's experiment state that settle_study reads."""
    trial_data = [[json.dumps({"trial_id": t, "status": s}), json.dumps({})] for t, s in statuses.items()]
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))


def test_settling_leaves_continuing_trials_to_tune_and_resolves_every_other_running_trial(tmp_path: Path) -> None:
    import optuna

    from sweeps.searcher import TUNE_TRIAL_ATTR, resolve_study, settle_study
    from sweeps.spec import parse_spec

    experiment = tmp_path / "exp"
    experiment.mkdir()
    spec = resolve_study(parse_spec(make_spec_dict()), str(experiment), "exp")
    study = optuna.create_study(study_name="exp", storage=spec.search.optuna_storage)
    for tune_id in ("running", "pending", "terminated", "errored", "orphan"):
        study.ask().set_user_attr(TUNE_TRIAL_ATTR, tune_id)
    study.ask()  # no Tune id at all
    _experiment_state(
        experiment, {"running": "RUNNING", "pending": "PENDING", "terminated": "TERMINATED", "errored": "ERROR"}
    )
    (experiment / "trial_terminated").mkdir()
    (experiment / "trial_terminated" / "result.json").write_text(
        json.dumps({"eval_loss": 2.0}) + "\n" + json.dumps({"eval_loss": 1.5}) + "\n" + '{"eval_lo'
    )

    def states() -> dict[str, tuple[str, float | None]]:
        trials = optuna.load_study(study_name="exp", storage=spec.search.optuna_storage).trials
        return {t.user_attrs.get(TUNE_TRIAL_ATTR, "-"): (t.state.name, t.value) for t in trials}

    lines = settle_study(spec, str(experiment))
    assert states() == {
        "running": ("RUNNING", None),  # Tune continues these; they tell their own Optuna trial
        "pending": ("RUNNING", None),
        "terminated": ("COMPLETE", 1.5),  # its last reported value (a line cut short by a kill is skipped)
        "errored": ("FAIL", None),
        "orphan": ("FAIL", None),  # proposed just before the crash, never saved by Tune
        "-": ("FAIL", None),
    }
    assert len(lines) == 4 and any("no Tune trial" in line for line in lines)
    assert settle_study(spec, str(experiment)) == []  # settling twice changes nothing
    # The end of the sweep: Tune finished (or failed) the two it continued; none may stay RUNNING.
    _experiment_state(experiment, {"running": "TERMINATED", "pending": "ERROR", "terminated": "TERMINATED"})
    settle_study(spec, str(experiment))
    assert states()["running"][0] == "FAIL"  # no result.json to take a value from
    assert {s for s, _ in states().values()} == {"COMPLETE", "FAIL"}


# --- the kill-and-resume scenario --------------------------------------------------------------



def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def dashboard_study(base: str, name: str) -> dict[str, Any]:
    studies = get_json(f"{base}/api/studies")["study_summaries"]
    (study_id,) = [s["study_id"] for s in studies if s["study_name"] == name]
    return {"study_id": study_id, **get_json(f"{base}/api/studies/{study_id}")}


@dataclass
class Scenario:
    experiment: Path
    results_at_kill: dict[str, list[dict[str, Any]]]
    raw_at_kill: dict[str, str]
    completed_at_kill: list[str]
    running_at_kill: list[str]
    dashboard_at_kill: dict[str, Any]
    dashboard_after: dict[str, Any]
    importances: dict[str, Any]
    ray_left_after_kill: list[str]
    ray_left_after_resume: list[str]
    resume: subprocess.CompletedProcess
    resume_s: float


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    root = tmp_path_factory.mktemp("resume")
    spec = write_spec(
        root / "spec.yaml",
        make_spec_dict(
            search={"num_samples": NUM_SAMPLES, "max_concurrent": 2},
            # 4 micro-batches per step make a round last ~1 s here, so the kill lands mid-trial.
            train={"max_steps": MAX_STEPS, "eval_every": 10, "batch_size": 8, "grad_accum": 4},
        ),
    )
    experiment = root / "results" / "killed"
    db_url = f"sqlite:///{experiment / 'optuna.db'}"
    log = open(root / "run.log", "w")
    already_running = ray_pids()
    driver = subprocess.Popen(
        # --address local: a cluster of its own, even if another Ray runs on this machine.
        [QLORA_SWEEP, "run", str(spec), "--storage", str(root / "results"), "--name", "killed", "--address", "local"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes the driver and all it started
        env=ENV,
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    dashboard = None
    try:
        deadline = time.time() + 400
        while True:
            if driver.poll() is not None:
                pytest.fail(f"the sweep ended before it could be killed:\n{(root / 'run.log').read_text()[-3000:]}")
            assert time.time() < deadline, "no moment with a finished and a running trial"
            if dashboard is None and (experiment / "optuna.db").exists():
                dashboard = subprocess.Popen(
                    [str(BIN / "optuna-dashboard"), db_url, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    env=own_home(root, ENV),  # it serves with gunicorn when installed (by mlflow)
                )
                # Wait for it to serve the study now, so that reading it at the kill below is quick
                # (a slow first answer there let the running trial finish before the kill landed).
                _wait_for_study(base, "killed")
            results = read_results(experiment)
            completed = [t for t, rows in results.items() if rows and rows[-1]["step"] == MAX_STEPS]
            running = [t for t, rows in results.items() if rows and rows[-1]["step"] < MAX_STEPS]
            if completed and running:
                break
            time.sleep(0.2)
        dashboard_at_kill = _wait_for_study(base, "killed") if dashboard else {}
        ray_tree = psutil.Process(driver.pid).children(recursive=True)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        ray_left_after_kill = _reap(ray_tree)
        # What was on disk when the driver died (the driver writes result.json; nothing writes now).
        results = read_results(experiment)
        raw_at_kill = {t: (experiment / f"trial_{t}" / "result.json").read_text() for t in results}
        completed = [t for t, rows in results.items() if rows and rows[-1]["step"] == MAX_STEPS]
        running = [t for t, rows in results.items() if rows and rows[-1]["step"] < MAX_STEPS]
        assert running, "every trial that had started finished before the kill landed"

        started = time.time()
        resume = subprocess.run(
            [QLORA_SWEEP, "resume", str(experiment), "--address", "local"],
            capture_output=True,
            text=True,
            timeout=600,
            env=ENV,
        )
        resume_s = time.time() - started
        dashboard_after = dashboard_study(base, "killed") if dashboard else {}
        importances = (
            get_json(f"{base}/api/studies/{dashboard_after['study_id']}/param_importances") if dashboard else {}
        )
        return Scenario(
            experiment=experiment,
            results_at_kill=results,
            raw_at_kill=raw_at_kill,
            completed_at_kill=completed,
            running_at_kill=running,
            dashboard_at_kill=dashboard_at_kill,
            dashboard_after=dashboard_after,
            importances=importances,
            ray_left_after_kill=ray_left_after_kill,
            ray_left_after_resume=wait_for_no_ray_processes(ignore=already_running),
            resume=resume,
            resume_s=resume_s,
        )
    finally:
        for proc in (driver, dashboard):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _wait_for_study(base: str, name: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.time() + timeout_s
    while True:
        try:
            return dashboard_study(base, name)
        except (OSError, ValueError):
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _reap(processes: list[psutil.Process], timeout_s: float = 15) -> list[str]:
    """Wait for the killed driver's Ray processes to exit; kill (by PID) and list any that do not."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    left = [f"{p.pid} {p.name()}" for p in alive]
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)
    return left



@pytest.mark.integration
def test_killed_driver_leaves_no_ray_processes_behind(killed_and_resumed: Scenario) -> None:
    s = killed_and_resumed
    assert s.ray_left_after_kill == [], f"Ray processes outlived the killed driver: {s.ray_left_after_kill}"
    assert s.ray_left_after_resume == [], f"Ray processes left after resume: {s.ray_left_after_resume}"


@pytest.mark.integration
def test_resume_finishes_every_trial_without_rerunning_finished_ones(killed_and_resumed: Scenario) -> None:
    from analysis.results import load_experiment

    s = killed_and_resumed
    assert s.resume.returncode == 0, s.resume.stdout[-3000:] + s.resume.stderr[-3000:]
    assert "Traceback" not in s.resume.stderr
    trials = load_experiment(str(s.experiment)).trials
    assert len(trials) == NUM_SAMPLES
    assert set(trials["status"]) == {"completed"}, trials[["trial_id", "status", "error"]]
    after = read_results(s.experiment)
    for trial_id in s.completed_at_kill:
        # Not run again: its result.json is byte for byte what it was when the driver died.
        assert (s.experiment / f"trial_{trial_id}" / "result.json").read_text() == s.raw_at_kill[trial_id]
    for trial_id, rows in after.items():
        steps = [r["step"] for r in rows]
        assert steps == list(range(10, MAX_STEPS + 1, 10)), f"trial {trial_id} steps {steps}"
    print(
        f"killed with {len(s.completed_at_kill)} trial(s) finished and steps "
        f"{ {t: s.results_at_kill[t][-1]['step'] for t in s.running_at_kill} } reached by the running one(s); "
        f"resume took {s.resume_s:.1f} s"
    )
    for trial_id in s.running_at_kill:
        rows = after[trial_id]
        done_before = len(s.results_at_kill[trial_id])
        resumed = rows[done_before]
        # Continued from its checkpoint: the first new report is the next round, counted from the restore.
        assert resumed["training_iteration"] == done_before + 1
        assert resumed["iterations_since_restore"] == 1
        assert resumed["step"] == 10 * (done_before + 1)


@pytest.mark.integration
def test_optuna_study_survives_the_kill_with_no_stale_running_trial(killed_and_resumed: Scenario) -> None:
    import optuna

    s = killed_and_resumed
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{s.experiment / 'optuna.db'}")
    listing = [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials), listing
    ran = set(read_results(s.experiment))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # Each Tune trial has exactly one COMPLETE Optuna trial; a resumed trial told the Optuna trial
    # it was given before the kill its remaining rounds, rather than getting a second one.
    assert sorted(t.user_attrs["ray_trial_id"] for t in complete) == sorted(ran), listing
    for trial in complete:
        assert sorted(trial.intermediate_values) == [1, 2, 3, 4]
    # Any other Optuna trial is one the searcher asked for just before the kill, whose Tune trial
    # never reached Tune's saved state (so never ran, has no folder); resume marked it FAIL.
    orphans = [t for t in study.trials if t not in complete]
    # (An orphan asked for in the instant before the kill may not have been linked to a Tune id yet.)
    assert all(t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("ray_trial_id") not in ran for t in orphans)
    assert len(study.trials) == NUM_SAMPLES + len(orphans) and len(orphans) <= 2, listing
    for orphan in orphans:
        assert f"Optuna trial {orphan.number} " in s.resume.stdout and "FAIL" in s.resume.stdout


@pytest.mark.integration
def test_optuna_dashboard_shows_the_sweep_live_and_after_resume(killed_and_resumed: Scenario) -> None:
    s = killed_and_resumed
    at_kill = [t["state"] for t in s.dashboard_at_kill["trials"]]
    assert "Complete" in at_kill and "Running" in at_kill, at_kill
    after = [t["state"] for t in s.dashboard_after["trials"]]
    assert "Running" not in after and after.count("Complete") == NUM_SAMPLES, after
    assert s.dashboard_after["best_trials"], "the dashboard shows no best trial"
    assert {p["name"] for p in s.importances["param_importances"][0]} >= {"learning_rate"}
