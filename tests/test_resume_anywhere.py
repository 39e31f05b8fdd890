"""Issue 14: resume from the bucket alone, resume only what qlora-sweep wrote, cheap checkpoints.

* A sweep on S3 (moto) whose driver is SIGKILLed after a trial ended, its study and Ray's driver-side
  state deleted, is resumed on a "new head node" (other study folder, other Ray temp dir) from the
  bucket alone: no trial lost, none run twice.
* A tampered tuner.pkl (a pickle that would create a marker file) is refused before it is unpickled;
  with --trust-experiment the resume proceeds (and runs it: that is what trusting means).
* train.checkpoint_every: a trial whose worker dies continues from its last checkpoint, which the
  interval decides (every 2 rounds here), not from step 0.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from core import integrity
from sweeps.spec import SpecError, parse_spec
from tests.cli_runs import QLORA_SWEEP, cli_env, private_ray_tmp, read_results, run_cli
from tests.conftest import make_spec_dict, wait_for_no_ray_processes, write_spec
from tests.fault_plugins import SLOW_STEP_ENV, SLOW_STEPS

# --- train.checkpoint_every: parsing and the rule -------------------------------------------------------------


def test_checkpoint_every_takes_rounds_or_a_time_and_names_the_field_when_bad() -> None:
    from trainables.settings import DEFAULT_CHECKPOINT_EVERY, CheckpointInterval

    assert parse_spec(make_spec_dict(train={"checkpoint_every": 3})).train.checkpoint_interval == CheckpointInterval(rounds=3)
    assert parse_spec(make_spec_dict(train={"checkpoint_every": "90s"})).train.checkpoint_interval.seconds == 90
    assert parse_spec(make_spec_dict(train={"checkpoint_every": "1.5h"})).train.checkpoint_interval.seconds == 5400
    spec = make_spec_dict()
    del spec["train"]["checkpoint_every"]
    assert parse_spec(spec).train.checkpoint_every == DEFAULT_CHECKPOINT_EVERY == "5m"
    for bad in (0, "10", "10 minutes", "-1m", True, 2.5):
        with pytest.raises(SpecError) as err:
            parse_spec(make_spec_dict(train={"checkpoint_every": bad}))
        assert "train.checkpoint_every" in str(err.value) and "10m" in str(err.value), (bad, str(err.value))


def test_a_checkpoint_is_due_by_rounds_or_time_and_always_at_the_last_round() -> None:
    from trainables.settings import CheckpointInterval

    every_2 = CheckpointInterval(rounds=2)
    assert [every_2.due(n, 0.0, last_round=False) for n in (1, 2, 3)] == [False, True, True]
    five_min = CheckpointInterval(seconds=300)
    assert not five_min.due(10, 299.0, last_round=False) and five_min.due(1, 300.0, last_round=False)
    assert five_min.due(1, 0.0, last_round=True) and every_2.due(1, 0.0, last_round=True)


# --- the study snapshot and the key: units --------------------------------------------------------------------


def test_a_study_snapshot_is_consistent_while_optuna_writes(tmp_path: Path) -> None:
    """sqlite3's backup API copies a state the database was in, even with a writer going."""
    import optuna

    from sweeps.searcher import snapshot_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for i in range(5):
            snapshot_study(tmp_path / "study.db", str(tmp_path / f"copy{i}.db"))
    finally:
        stop.set()
        writer.join()
    for i in range(5):
        with sqlite3.connect(tmp_path / f"copy{i}.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        copy = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / f'copy{i}.db'}")
        assert all(t.state.is_finished() or t.state.name == "RUNNING" for t in copy.trials)


def test_the_key_is_created_owner_only_and_digests_bind_name_and_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(integrity.KEY_ENV, str(tmp_path / "cfg" / "experiment.key"))
    assert integrity.read_key() is None
    key = integrity.ensure_key()
    assert integrity.ensure_key() == key and len(key) == integrity.KEY_BYTES
    assert (tmp_path / "cfg" / "experiment.key").stat().st_mode & 0o077 == 0
    d = integrity.digest(key, "tuner.pkl", b"abc")
    assert integrity.matches(key, "tuner.pkl", b"abc", [d])
    assert not integrity.matches(key, "tuner.pkl", b"abd", [d])
    assert not integrity.matches(key, "searcher-state-x.pkl", b"abc", [d])  # not another file's digest
    assert not integrity.matches(b"k" * 32, "tuner.pkl", b"abc", [d])  # not under another key


# --- real sweeps ----------------------------------------------------------------------------------------------


def _s3_results(s3: Any, bucket: str, prefix: str) -> dict[str, list[dict[str, Any]]]:
    from tests.test_s3_storage import keys

    out = {}
    for key in keys(s3, prefix):
        if key.endswith("/result.json"):
            body = s3.client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
            rows = []
            for line in body.splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
            out[key.split("/")[-2].removeprefix("trial_")] = rows
    return out


S3_STEPS = 20
KILL_WINDOW_STEP_S = 0.5
# The sweeps run outside the checkout; the spec's plug-in (tests/fault_plugins.py) is importable from it,
# as a user's installed plug-in package would be on a new head node.
PLUGINS = str(Path(__file__).resolve().parent.parent)


def _terminated_in_bucket(s3: Any, bucket: str, prefix: str) -> int:
    """Trials that Tune's newest uploaded experiment state records as TERMINATED (read as JSON)."""
    from tests.test_s3_storage import keys

    states = sorted(k for k in keys(s3, prefix) if k.split("/")[-1].startswith("experiment_state-"))
    if not states:
        return 0
    try:
        state = json.loads(s3.client.get_object(Bucket=bucket, Key=states[-1])["Body"].read())
    except ValueError:
        return 0
    return sum(json.loads(trial).get("status") == "TERMINATED" for trial, _ in state.get("trial_data", []))


@pytest.mark.integration
def test_a_sweep_on_s3_resumes_on_a_new_head_node_from_the_bucket_alone(tmp_path: Path) -> None:
    """SIGKILL the driver after a trial ended (and Tune uploaded its state saying so); delete the study and Ray's driver-side files; resume with
    another study folder and Ray temp dir: every trial completes, each reports every round once.
    Control: without the per-trial-end snapshot (sweeps/searcher.py StudySnapshots) the bucket has no
    study until a sweep ends normally, and this resume is refused ("the study database ... is gone")."""
    import optuna

    from analysis.results import read_trials_csv
    from tests.test_s3_storage import BUCKET, keys, moto_s3

    old_head, new_head = tmp_path / "old-head-studies", tmp_path / "new-head-studies"
    spec = write_spec(
        tmp_path / "s3.yaml",
        make_spec_dict(
            name="s3resume",
            search={"num_samples": 2, "max_concurrent": 1},
            # 4 micro-batches per step: trial 2 is still in its first round when the kill lands. (Killed
            # between two checkpoints of one trial, Tune 2.60 can restore a state naming the checkpoint that
            # num_to_keep=1 just deleted: "Could not recover from checkpoint"; seen with 1 micro-batch.)
            # Before the kill every step also sleeps KILL_WINDOW_STEP_S, so trial 2 is still training
            # while the poll below sees trial 1's end reach the bucket (without it, on a busy machine,
            # trial 2 could end first); the resumed sweep runs without it.
            train={"max_steps": S3_STEPS, "eval_every": 10, "batch_size": 8, "grad_accum": 4, "callbacks": [SLOW_STEPS]},
        ),
    )
    uri, prefix = f"s3://{BUCKET}/sweeps/s3resume", "sweeps/s3resume/"
    with moto_s3() as s3:
        with private_ray_tmp() as old_ray:
            log = tmp_path / "run.log"
            with open(log, "w") as out:
                driver = subprocess.Popen(
                    [QLORA_SWEEP, "run", str(spec), "--storage", f"s3://{BUCKET}/sweeps", "--name", "s3resume",
                     "--address", "local"],
                    env=cli_env(old_ray, QLORA_SWEEP_STUDIES=str(old_head), PYTHONPATH=PLUGINS,
                                **{SLOW_STEP_ENV: str(KILL_WINDOW_STEP_S)}), stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, cwd=tmp_path,
                )
                try:
                    deadline = time.time() + 900
                    while True:
                        assert driver.poll() is None, log.read_text()[-3000:]
                        assert time.time() < deadline, f"no trial ended:\n{log.read_text()[-3000:]}"
                        results = _s3_results(s3, BUCKET, prefix)
                        ended = [t for t, rows in results.items() if rows and rows[-1]["step"] == S3_STEPS]
                        if ended and f"{prefix}optuna.db" in keys(s3, prefix) and _terminated_in_bucket(s3, BUCKET, prefix) >= 1:
                            break
                        time.sleep(0.3)
                finally:
                    os.killpg(driver.pid, signal.SIGKILL)  # the head node is gone: driver, Ray, its disk
                    driver.wait()
            killed_at = time.time()
            at_kill = _s3_results(s3, BUCKET, prefix)
            # The kill landed mid-sweep: the study in the bucket came from a trial end, not the sweep's end.
            assert sum(bool(rows) and rows[-1]["step"] == S3_STEPS for rows in at_kill.values()) < 2, at_kill
            assert not wait_for_no_ray_processes(), "Ray processes outlived the kill"
        # private_ray_tmp removed the old head's Ray temp dir (Tune's driver staging files); now its study.
        shutil.rmtree(old_head)
        assert "stopped by" not in log.read_text()  # killed, not interrupted: nothing was saved at the end

        with private_ray_tmp() as new_ray:
            resumed = run_cli(["resume", uri, "--address", "local"], new_ray, cwd=tmp_path,
                              QLORA_SWEEP_STUDIES=str(new_head), PYTHONPATH=PLUGINS)
        recovered_s = time.time() - killed_at
        assert resumed.returncode == 0, resumed.output[-4000:]
        assert "restored it from" in resumed.output, resumed.output[-3000:]
        tune_trials = _s3_results(s3, BUCKET, prefix)
        assert len(tune_trials) == 2, tune_trials.keys()  # no trial lost
        for trial, rows in tune_trials.items():
            # Every round reported once: no trial (and no round of one) ran twice.
            assert [r["step"] for r in rows] == [10, 20], (trial, [r["step"] for r in rows])
        body = s3.client.get_object(Bucket=BUCKET, Key=f"{prefix}report/trials.csv")["Body"].read()
        (tmp_path / "trials.csv").write_bytes(body)
        trials = read_trials_csv(tmp_path / "trials.csv")
        assert sorted(trials["status"]) == ["completed", "completed"], trials
        study = optuna.load_study(study_name="s3resume", storage=f"sqlite:///{new_head / 's3resume.db'}")
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert sorted(t.user_attrs["ray_trial_id"] for t in complete) == sorted(tune_trials), study.trials
        # The bucket's snapshot now holds the finished study too, for the next head node.
        (tmp_path / "final.db").write_bytes(s3.client.get_object(Bucket=BUCKET, Key=f"{prefix}optuna.db")["Body"].read())
        final = optuna.load_study(study_name="s3resume", storage=f"sqlite:///{tmp_path / 'final.db'}")
        assert len([t for t in final.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
        print(f"kill to resumed sweep's end: {recovered_s:.1f} s")


@pytest.mark.integration
def test_a_tampered_tuner_pkl_is_refused_before_unpickling_unless_trusted(tmp_path: Path) -> None:
    """tuner.pkl replaced by a pickle that would create a marker: `resume` refuses (exit 2, no marker);
    other Tune state changed, or no key here: refused too; with --trust-experiment it proceeds.
    Control: without the check (sweeps/tune_state.py verify) the tripwire runs on the first resume."""
    from sweeps import tune_state

    spec = write_spec(
        tmp_path / "one.yaml",
        make_spec_dict(name="one", search={"num_samples": 1, "max_concurrent": 1}, train={"max_steps": 10, "eval_every": 10}),
    )
    experiment, marker = tmp_path / "results" / "one", tmp_path / "tripwire-ran"
    with private_ray_tmp() as ray_tmp:
        run = run_cli(["run", str(spec), "--storage", str(tmp_path / "results"), "--name", "one", "--address", "local"], ray_tmp)
    assert run.returncode == 0, run.output[-3000:]
    assert (experiment / tune_state.DIGESTS_FILE).exists() and list(experiment.glob(f"{tune_state.DIGESTS_PREFIX}*.json"))
    tune_state.verify(str(experiment))  # what the sweep wrote checks

    tuner = experiment / "tuner.pkl"
    original = tuner.read_bytes()
    tuner.write_bytes(_tripwire(marker, original))
    with private_ray_tmp() as ray_tmp:
        refused = run_cli(["resume", str(experiment), "--address", "local"], ray_tmp)
    assert refused.returncode == 2, refused.output[-3000:]
    assert "tuner.pkl has no valid digest" in refused.output and "--trust-experiment" in refused.output, refused.output
    assert "Traceback" not in refused.output
    assert not marker.exists(), "the tampered pickle was opened"

    # Other state Tune unpickles is covered the same way; and without this machine's key nothing is trusted.
    tuner.write_bytes(original)
    state = next(experiment.glob("experiment_state-*.json"))
    saved_state = state.read_bytes()
    state.write_bytes(saved_state.replace(b'"trial_data"', b'"trial_data" ', 1))
    with pytest.raises(tune_state.UntrustedExperiment, match="experiment_state-"):
        tune_state.verify(str(experiment))
    state.write_bytes(saved_state)
    # sweep_spec.yaml names code that resume runs (here a train.callbacks plug-in whose import would
    # create the marker): it is digested with tuner.pkl, and a changed spec is refused before preflight.
    spec_file = experiment / "sweep_spec.yaml"
    saved_spec_text = spec_file.read_text()
    (tmp_path / "planted.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('planted')\ndef f(context):\n    return None\n"
    )
    planted = yaml.safe_load(saved_spec_text)
    planted["train"]["callbacks"] = ["planted:f"]
    spec_file.write_text(yaml.safe_dump(planted, sort_keys=False))
    with private_ray_tmp() as ray_tmp:
        refused = run_cli(["resume", str(experiment), "--address", "local"], ray_tmp, cwd=tmp_path)
    assert refused.returncode == 2, refused.output[-3000:]
    assert "sweep_spec.yaml has no valid digest" in refused.output, refused.output[-3000:]
    assert not marker.exists(), "resume ran a plug-in that a writer of the folder planted in its spec"
    spec_file.write_text(saved_spec_text)
    key_file = integrity.key_path()
    key = key_file.read_bytes()
    key_file.unlink()
    try:
        with pytest.raises(tune_state.UntrustedExperiment, match="no experiment key"):
            tune_state.verify(str(experiment))
    finally:
        key_file.write_bytes(key)
    tune_state.verify(str(experiment))

    tuner.write_bytes(_tripwire(marker, original))
    with private_ray_tmp() as ray_tmp:
        trusted = run_cli(["resume", str(experiment), "--address", "local", "--trust-experiment"], ray_tmp)
    assert trusted.returncode == 0, trusted.output[-3000:]
    assert marker.exists()  # trusting means unpickling whatever is there
    tune_state.verify(str(experiment))  # what the user vouched for is recorded


CKPT_STEPS = 40


@pytest.mark.integration
def test_a_killed_trial_continues_from_its_last_checkpoint_chosen_by_checkpoint_every(tmp_path: Path) -> None:
    """checkpoint_every: 2 with a round every 10 steps: checkpoints at steps 20 and 40. The worker dies
    at step 35; Tune retries the trial from step 20 (rounds 30 and 40 again), not from step 0.
    Control: with a checkpoint at every round (the interval ignored) it continues from step 30."""
    from tests.fault_plugins import CRASH_ONCE, CRASH_ONCE_ENV

    spec = write_spec(
        tmp_path / "ckpt.yaml",
        make_spec_dict(
            name="ckpt",
            search={"num_samples": 1, "max_concurrent": 1},
            train={"max_steps": CKPT_STEPS, "eval_every": 10, "checkpoint_every": 2, "max_failures": 1,
                   "callbacks": [CRASH_ONCE]},
        ),
    )
    with private_ray_tmp() as ray_tmp:
        run = run_cli(
            ["run", str(spec), "--storage", str(tmp_path / "results"), "--name", "ckpt", "--address", "local"], ray_tmp,
            **{CRASH_ONCE_ENV: f"{tmp_path / 'crashed'}:35"},
        )
    assert run.returncode == 0, run.output[-3000:]
    assert (tmp_path / "crashed").exists(), "the worker was not killed"
    [rows] = read_results(tmp_path / "results" / "ckpt").values()
    crashed_at = (tmp_path / "crashed").stat().st_mtime
    # Rounds 10, 20, 30, then the worker dies in round 40. The retry (a new attempt: a later started_at)
    # restores the step-20 checkpoint and reports rounds 30 and 40. (Tune's result.json of the retried
    # trial is its last uploaded copy plus the retry's rows, so the first attempt's round 30 may be gone.)
    retry = [r["step"] for r in rows if r["started_at"] > crashed_at]
    assert retry == [30, 40], [(r["step"], r["started_at"]) for r in rows]
    # The first attempt's rows survive only as far as Tune had synced result.json before the crash
    # (none at all, seen in CI): whatever survived is its rounds in order.
    before = [r["step"] for r in rows if r["started_at"] < crashed_at]
    assert before == [10, 20, 30][: len(before)], before


def _tripwire(marker: Path, original: bytes) -> bytes:
    """A pickle that creates `marker` when unpickled, then gives back what `original` unpickles to."""

    class Tripwire:
        def __reduce__(self) -> tuple[Any, ...]:
            code = (f"(__import__('pathlib').Path({str(marker)!r}).touch(), "
                    f"__import__('ray.cloudpickle', fromlist=['loads']).loads(bytes.fromhex({original.hex()!r})))[1]")
            return (eval, (code,))

    return pickle.dumps(Tripwire())


def _proposed_and_saved(tmp_path: Path, snapshots: bool) -> tuple[Any, Path, Path, dict, Path]:
    """A searcher on a sqlite study whose snapshot is taken before trial "t1" is proposed; its state saved after."""
    from sweeps.driver import make_sampler
    from sweeps.searcher import StudySnapshots, make_searcher, search_space, snapshot_study

    db = tmp_path / "studies" / "s.db"
    spec = parse_spec(make_spec_dict(name="s", search={"num_samples": 2, "optuna_storage": f"sqlite:///{db}"}))
    searcher = make_searcher(spec, search_space(spec), make_sampler(spec), "min")
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    snapshot = experiment / "optuna.db"
    snapshot_study(db, str(snapshot))  # the last trial end's snapshot: no trial yet
    if snapshots:
        searcher.snapshots = StudySnapshots(f"sqlite:///{db}", str(experiment))
    params = searcher.suggest("t1")
    state = tmp_path / "searcher.pkl"
    searcher.save(str(state))  # Tune's experiment state, saved after the proposal
    return spec, db, snapshot, params, state


def _resumed_from_snapshot(tmp_path: Path, spec: Any, db: Path, snapshot: Path, state: Path) -> Any:
    """The head node is lost: its study goes; the snapshot becomes the study; the saved searcher is restored."""
    from sweeps.driver import make_sampler
    from sweeps.searcher import make_searcher, search_space

    db.unlink()
    shutil.copy(snapshot, db)
    restored = make_searcher(spec, search_space(spec), make_sampler(spec), "min")
    restored.restore(str(state))
    return restored


def _resume_and_finish_t1(case: Path, snapshots: bool) -> tuple[Any, dict]:
    """Propose t1, resume from the snapshot, report two rounds of t1: (its one Optuna trial, its params)."""
    import optuna

    spec, db, snapshot, params, state = _proposed_and_saved(case, snapshots)
    restored = _resumed_from_snapshot(case, spec, db, snapshot, state)
    restored.on_trial_result("t1", {"eval_loss": 1.5, "training_iteration": 1})
    restored.on_trial_complete("t1", {"eval_loss": 1.25, "training_iteration": 2})
    (trial,) = optuna.load_study(study_name=spec.search.optuna_study_name, storage=f"sqlite:///{db}").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 1.25
    return trial, params


def test_the_study_snapshot_holds_every_trial_the_saved_searcher_names(tmp_path: Path) -> None:
    """Published at every proposal, the snapshot a new head node resumes from names trial t1; the resumed
    trial's results reach the study. Control: published only at trial ends (before the fix), it does not."""
    import optuna

    for snapshots, trials_in_snapshot in ((True, 1), (False, 0)):
        case = tmp_path / str(snapshots)
        spec, db, snapshot, params, state = _proposed_and_saved(case, snapshots)
        seen = optuna.load_study(study_name=spec.search.optuna_study_name, storage=f"sqlite:///{snapshot}").trials
        assert len(seen) == trials_in_snapshot, seen
    # With the snapshot taken at the proposal, the resumed trial reports to the Optuna trial it had.
    trial, _ = _resume_and_finish_t1(tmp_path / "resumed", True)
    assert trial.number == 0 and trial.user_attrs["ray_trial_id"] == "t1"


def test_a_resumed_trial_missing_from_an_older_study_snapshot_is_recorded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The snapshot predates the proposal (an upload failed): the resumed trial's report used to end the
    sweep with optuna's KeyError "Record does not exist" (seen in CI). Now a new Optuna trial with the same
    parameters and tags takes its place. Control: without the rebinding, the KeyError."""
    from sweeps.searcher import OptunaStudySearch

    trial, params = _resume_and_finish_t1(tmp_path / "fixed", False)
    assert trial.user_attrs["ray_trial_id"] == "t1" and trial.intermediate_values == {1: 1.5, 2: 1.25}
    assert trial.params == {k: v for k, v in params.items() if k in trial.params} and trial.params
    assert "is not in the restored study" in capsys.readouterr().out

    monkeypatch.setattr(OptunaStudySearch, "_rebind_lost", lambda self, trial_id: False)
    spec, db, snapshot, params, state = _proposed_and_saved(tmp_path / "control", False)
    restored = _resumed_from_snapshot(tmp_path / "control", spec, db, snapshot, state)
    with pytest.raises(KeyError, match="Record does not exist"):
        restored.on_trial_result("t1", {"eval_loss": 1.5, "training_iteration": 1})
