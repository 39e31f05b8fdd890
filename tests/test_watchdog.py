"""Faults of shared clusters: a hung or slow trial (the trial watchdog), and two drivers on one experiment.

The watchdog scenario runs `qlora-sweep run` the way a user does, with real training stalled through
the trainer-callback seam (tests/fault_plugins.py `hang_or_slow`); the lock scenarios use real
processes. docs/reliability.md tabulates what each one measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from analysis.results import read_trials_csv
from tests.cli_runs import QLORA_SWEEP, cli_env, private_ray_tmp, processes_of, read_results, run_cli
from tests.conftest import make_spec_dict, write_spec
from tests.fault_plugins import HANG_AT_STEP, HANG_DIR_ENV, HANG_OR_SLOW, SLOW_STEP_ENV

REPO = Path(__file__).resolve().parent.parent

# A normal trial of the tiny spec (10 steps, model load included) takes 5 to 60 s on the suite's 2
# cores, idle or shared; the slow one sleeps SLOW_STEP_S per step (10 steps: 120 s), past
# TRIAL_TIMEOUT_S. STALL_TIMEOUT_S is above the longest gap between beats of a busy machine's
# start-up (loading the tokenizer and data, then the model).
TRIAL_TIMEOUT_S = 90
STALL_TIMEOUT_S = 45
SLOW_STEP_S = 12.0
WATCHDOG_STEPS = 10


@pytest.mark.integration
def test_a_hung_and_a_slow_trial_time_out_free_their_worker_and_the_search_moves_on(tmp_path: Path) -> None:
    hang_dir = tmp_path / "hang"
    hang_dir.mkdir()
    spec = write_spec(
        tmp_path / "watchdog.yaml",
        make_spec_dict(
            name="watchdog",
            search={"num_samples": 3, "max_concurrent": 2, "seed": 0, "sampler": "random"},
            train={
                "max_steps": WATCHDOG_STEPS, "eval_every": 5, "batch_size": 8, "max_failures": 1,
                "trial_timeout_s": TRIAL_TIMEOUT_S, "stall_timeout_s": STALL_TIMEOUT_S,
                "callbacks": [HANG_OR_SLOW],
            },
        ),
    )
    experiment = tmp_path / "results" / "watchdog"
    env = {HANG_DIR_ENV: str(hang_dir), SLOW_STEP_ENV: str(SLOW_STEP_S)}
    seen: dict[str, float] = {}
    second: dict[str, subprocess.CompletedProcess] = {}
    with private_ray_tmp() as ray_tmp:
        outcome: dict[str, object] = {}
        sweep = threading.Thread(
            target=lambda: outcome.update(run=run_cli(
                ["run", str(spec), "--storage", str(tmp_path / "results"), "--name", "watchdog"], ray_tmp, timeout=540, **env
            )),
            daemon=True,
        )
        sweep.start()
        # Watch the hung worker: when it hung, and when its process was gone (while the sweep still ran).
        hang_file = hang_dir / "hang.json"
        while sweep.is_alive() and "gone" not in seen:
            if "hung" not in seen and hang_file.exists():
                try:
                    hung = json.loads(hang_file.read_text())
                    seen.update(hung=hung["at"], pid=hung["pid"])
                except ValueError:
                    pass  # being written
            if "pid" in seen and not psutil.pid_exists(int(seen["pid"])):
                seen["gone"] = time.time()
            time.sleep(0.2)
        # One driver per experiment: a second `run` of the same --name, while this one runs, is refused.
        if sweep.is_alive():
            second["run"] = subprocess.run(
                [QLORA_SWEEP, "run", str(spec), "--storage", str(tmp_path / "results"), "--name", "watchdog"],
                env=cli_env(ray_tmp), capture_output=True, text=True, timeout=120,
            )
        sweep.join(timeout=540)
        run = outcome["run"]
        assert processes_of(ray_tmp) == [], "Ray processes left behind"

    assert "hung" in seen, f"the fault was never injected:\n{run.output[-4000:]}"
    assert "gone" in seen, f"the hung worker {seen.get('pid')} outlived the sweep:\n{run.output[-4000:]}"
    # A timed-out trial counts as failed: exit 1, so scripts and CI notice.
    assert run.returncode == 1, run.output[-4000:]
    assert "Traceback" not in run.stderr.split("[qlora-sweep]")[-1]
    assert "3 trials, 2 failed" in run.stdout, run.stdout[-3000:]
    trials = read_trials_csv(experiment / "report" / "trials.csv").set_index("trial_id")
    assert sorted(trials["status"]) == ["completed", "timed_out", "timed_out"], trials[["status", "steps", "error"]]
    claims = {role: (hang_dir / f"{role}.claim").read_text() for role in ("hang", "slow")}
    by_lr = {repr(float(lr)): tid for tid, lr in trials["learning_rate"].items()}
    hung, slow = by_lr[claims["hang"]], by_lr[claims["slow"]]
    (normal,) = set(trials.index) - {hung, slow}
    results = read_results(experiment)

    # The hung trial: stopped by stall_timeout_s, its last figures kept, reported once, not retried.
    assert "stall_timeout_s" in trials.loc[hung, "error"], trials.loc[hung, "error"]
    assert trials.loc[hung, "steps"] == HANG_AT_STEP
    assert [r.get("trial_status") for r in results[hung]] == ["timed_out"]
    assert not (experiment / f"trial_{hung}" / "error.txt").exists(), "a timed-out trial was retried"
    # The slow one: stopped at a step end past trial_timeout_s, before its last step.
    assert "trial_timeout_s" in trials.loc[slow, "error"], trials.loc[slow, "error"]
    assert trials.loc[slow, "steps"] < WATCHDOG_STEPS
    assert results[slow][-1]["trial_status"] == "timed_out"
    assert results[slow][-1]["elapsed_s"] < TRIAL_TIMEOUT_S + SLOW_STEP_S + 30  # stopped at the next step end
    assert not (experiment / f"trial_{slow}" / "error.txt").exists()
    # The search moved on: the third trial started on the resources the hung one freed, and completed.
    assert trials.loc[normal, "status"] == "completed"
    assert trials.loc[normal, "started_at"] >= seen["hung"]
    assert "[trial" in run.stdout and "timed_out" in run.stdout
    # The second driver was refused, naming the folder and the holder, before training anything.
    refused = second.get("run")
    assert refused is not None, "the sweep ended before the second driver could be tried"
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{experiment} is in use by another qlora-sweep driver: pid" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    stall_s = seen["gone"] - seen["hung"]
    assert stall_s < STALL_TIMEOUT_S + 30, f"the hung worker lived {stall_s:.0f} s after it hung"
    print(
        f"\n[watchdog] hung trial {hung}: worker pid {seen['pid']} gone {stall_s:.1f} s after it hung "
        f"(stall_timeout_s={STALL_TIMEOUT_S}); slow trial {slow} timed out at step {trials.loc[slow, 'steps']} "
        f"after {trials.loc[slow, 'wall_s']:.0f} s (trial_timeout_s={TRIAL_TIMEOUT_S}); {normal} completed; "
        f"sweep {run.wall_s:.0f} s; a second driver refused with exit 2"
    )


def _tearing_down_worker(defer: bool) -> tuple[str, str]:
    """Run, in a real Ray actor, a teardown whose weakref callback is where SIGTERM lands.

    Returns what became of the actor ("survived" or "ended") and its worker's stderr log.
    """
    import ray
    import weakref

    @ray.remote
    class TearingDown:
        def pid(self) -> int:
            return os.getpid()

        def free_the_model(self, defer: bool) -> str:
            if defer:
                from trainables.workarounds import defer_sigterm_out_of_callbacks

                defer_sigterm_out_of_callbacks()

            class Model:
                pass

            def freed(_ref: object) -> None:
                # The raylet's SIGTERM, arriving while the main thread runs this callback.
                os.kill(os.getpid(), signal.SIGTERM)
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    pass

            model = Model()
            watcher = weakref.ref(model, freed)
            del model
            time.sleep(3)
            return "survived" if watcher() is None else "model kept"

    actor = TearingDown.remote()
    pid = ray.get(actor.pid.remote())
    try:
        outcome = ray.get(actor.free_the_model.remote(defer), timeout=60)
    except ray.exceptions.RayActorError:
        outcome = "ended"
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return outcome, "".join(f.read_text(errors="replace") for f in logs.glob(f"worker-*-{pid}.err"))


@pytest.mark.usefixtures("ray_local")
def test_a_sigterm_inside_a_weakref_callback_still_ends_the_worker_quietly() -> None:
    # A trial worker the raylet stops mid-teardown (Tune's forced cleanup at the end of a sweep): the
    # SIGTERM is honoured, and no "Exception ignored" traceback reaches the sweep's output.
    outcome, stderr = _tearing_down_worker(defer=True)
    assert outcome == "ended", stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    # Control: Ray's handler alone. Its SystemExit is dropped inside the callback with a printed
    # traceback, and the worker carries on as if no SIGTERM had come.
    outcome, stderr = _tearing_down_worker(defer=False)
    assert outcome == "survived", stderr[-2000:]
    assert "Exception ignored" in stderr and "in sigterm_handler" in stderr, stderr[-2000:]


# --- one driver per experiment folder ---------------------------------------------------------

HOLD = """
import sys, time
from sweeps.driver_lock import DriverLock
with DriverLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.integration
def test_a_second_driver_is_refused_naming_the_folder_and_the_holder_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    experiment = tmp_path / "results" / "exp"
    experiment.mkdir(parents=True)
    (experiment / "sweep_spec.yaml").write_text("name: exp\n")  # resume checks the lock before reading it
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(experiment)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with private_ray_tmp() as ray_tmp:
            started = time.time()
            refused = run_cli(["resume", str(experiment)], ray_tmp, timeout=120)
            refused_s = time.time() - started
            assert refused.returncode == 2, refused.output
            assert refused.stderr.startswith("error: "), refused.stderr
            assert f"{experiment} is in use by another qlora-sweep driver: pid {holder.pid} on " in refused.stderr
            assert "Traceback" not in refused.output
            assert refused.ray_sessions == [], "Ray was started"
        # SIGKILL leaves no stale lock: the kernel drops it with the holder.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        from sweeps.driver_lock import DriverLock

        with DriverLock(str(experiment)) as lock:
            note = json.loads(lock.info_file.read_text())
            assert note["pid"] == os.getpid()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
    print(f"\n[lock] second driver refused (exit 2) in {refused_s:.1f} s, holder pid {holder.pid} named")


def test_a_bucket_experiment_has_one_lock_however_its_uri_is_spelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock of an s3:// experiment is a local file named after its URI: a trailing slash or keys
    inside the URI must not name another lock (a second driver would then get in)."""
    from core import storage
    from sweeps.driver_lock import DriverLock, ExperimentInUse, lock_paths

    monkeypatch.setattr(storage, "_CREDENTIALS", {})  # the keys handed over below stay in this test
    uri = "s3://bucket/sweeps/exp?endpoint_override=127.0.0.1:9&scheme=http"
    spellings = ["s3://bucket/sweeps/exp/?endpoint_override=127.0.0.1:9&scheme=http",
                 "s3://KEY:SECRET@bucket/sweeps/exp?endpoint_override=127.0.0.1:9&scheme=http"]
    assert {lock_paths(s) for s in spellings} == {lock_paths(uri)}
    assert lock_paths("s3://bucket/sweeps/other?endpoint_override=127.0.0.1:9&scheme=http") != lock_paths(uri)
    with DriverLock(uri):
        for spelling in spellings:
            with pytest.raises(ExperimentInUse, match="is in use by another qlora-sweep driver"):
                DriverLock(spelling).__enter__()


def test_a_driver_starting_as_the_last_one_leaves_an_empty_folder_still_keeps_out_a_third(tmp_path: Path) -> None:
    """The first driver of a folder that ends having written nothing removes the folder and its lock
    file. A second driver locking that file in the instant after the release must still keep out a
    third (were the file unlinked after the release, the third would lock a new file beside it)."""
    from filelock import FileLock

    from sweeps.driver_lock import DriverLock, ExperimentInUse

    experiment = tmp_path / "results" / "exp"
    first = DriverLock(str(experiment)).__enter__()
    second = FileLock(str(first.lock_file), timeout=0)
    release = first._lock.release

    def release_then_the_next_driver_locks(*args: Any, **kwargs: Any) -> None:
        release(*args, **kwargs)
        experiment.mkdir(parents=True, exist_ok=True)
        second.acquire()  # the next driver, in the instant after the first one's release

    first._lock.release = release_then_the_next_driver_locks
    first.__exit__(None, None, None)
    try:
        assert second.is_locked
        with pytest.raises(ExperimentInUse):
            DriverLock(str(experiment)).__enter__()
    finally:
        second.release()


# --- a corrupt latest checkpoint ----------------------------------------------------------------

FALLBACK_STEPS = 30


@pytest.mark.integration
def test_a_resumed_trial_whose_latest_checkpoint_is_corrupt_continues_from_the_one_before(tmp_path: Path) -> None:
    """A real sweep stopped (SIGINT) after its trial's second checkpoint; that checkpoint's adapter
    weights are then cut in half, as by a node lost mid-upload. `resume` continues from the first
    checkpoint (step 10), trains steps 11..30 again, and reports each round once."""
    from tests.fault_plugins import SLOW_STEPS

    spec = write_spec(
        tmp_path / "ckpt.yaml",
        make_spec_dict(
            name="ckpt",
            space={"r": 8, "lora_alpha": 16, "target_modules": "qv", "learning_rate": 3e-3},
            search={"num_samples": 1, "max_concurrent": 1},
            train={"max_steps": FALLBACK_STEPS, "eval_every": 10, "batch_size": 8, "callbacks": [SLOW_STEPS]},
        ),
    )
    experiment = tmp_path / "results" / "ckpt"
    log = tmp_path / "run.log"
    with private_ray_tmp() as ray_tmp:
        with open(log, "w") as out:
            driver = subprocess.Popen(
                [QLORA_SWEEP, "run", str(spec), "--storage", str(tmp_path / "results"), "--name", "ckpt"],
                env=cli_env(ray_tmp, **{SLOW_STEP_ENV: "2"}), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                deadline = time.time() + 300
                # The worker writes a checkpoint before it reports it (result.json follows later).
                while not list(experiment.glob("trial_*/checkpoint_000001/trainer_state.json")):
                    assert driver.poll() is None, log.read_text()[-3000:]
                    assert time.time() < deadline, "the trial never saved its second checkpoint"
                    time.sleep(0.2)
                time.sleep(3.0)  # the driver takes the round in; 20 s of slow steps remain before the third
                driver.send_signal(signal.SIGINT)
                assert driver.wait(timeout=180) == 130, log.read_text()[-3000:]
            finally:
                if driver.poll() is None:
                    os.killpg(driver.pid, signal.SIGKILL)
                    driver.wait()
        (trial_dir,) = experiment.glob("trial_*")
        checkpoints = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
        assert checkpoints == ["checkpoint_000000", "checkpoint_000001"], checkpoints
        rows = read_results(experiment)[trial_dir.name.removeprefix("trial_")]
        assert [r["step"] for r in rows] == [10, 20], "stopped too late to test the fallback"
        weights = trial_dir / "checkpoint_000001" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated upload

        resumed = run_cli(["resume", str(experiment)], ray_tmp, timeout=300, **{SLOW_STEP_ENV: None})
        assert processes_of(ray_tmp) == [], "Ray processes left behind"
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "latest checkpoint checkpoint_000001 is unreadable (adapter_model.safetensors" in resumed.output, resumed.output[-4000:]
    assert "continuing from checkpoint_000000 (step 10)" in resumed.output
    trials = read_trials_csv(experiment / "report" / "trials.csv")
    assert list(trials["status"]) == ["completed"], trials[["status", "error"]]
    rows = read_results(experiment)[trial_dir.name.removeprefix("trial_")]
    assert [r["step"] for r in rows] == [10, 20, 30], [r["step"] for r in rows]  # each round reported once
    assert [r["training_iteration"] for r in rows] == [1, 2, 3]
    assert "checkpoint_000000" in rows[-1]["checkpoint_fallback"]
    print(f"\n[checkpoint] resume continued from step 10 past the corrupt step-20 checkpoint in {resumed.wall_s:.0f} s")


def test_checkpoint_problem_reads_every_file_of_a_checkpoint(tmp_path: Path) -> None:
    """Truncated weights, a torch archive with a flipped byte and broken JSON are each found; a whole checkpoint passes."""
    import torch
    from safetensors.torch import save_file

    from trainables.checkpoints import checkpoint_problem, checkpoint_step

    def whole(folder: Path) -> Path:
        folder.mkdir()
        save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(folder / "adapter_model.safetensors"))
        torch.save({"state": torch.arange(4096, dtype=torch.float32)}, folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
        (folder / "qlora_sweep_state.json").write_text(json.dumps({"train_s": 1.0, "step": 20}))
        return folder

    assert checkpoint_problem(str(whole(tmp_path / "ok"))) is None
    assert checkpoint_step(str(tmp_path / "ok")) == 20
    cut = whole(tmp_path / "cut") / "adapter_model.safetensors"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert checkpoint_problem(str(cut.parent)).startswith("adapter_model.safetensors: ")
    flipped = whole(tmp_path / "flipped") / "optimizer.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert checkpoint_problem(str(flipped.parent)).startswith("optimizer.pt")
    broken = whole(tmp_path / "json") / "trainer_state.json"
    broken.write_text('{"global_step": 2')
    assert checkpoint_problem(str(broken.parent)).startswith("trainer_state.json: JSONDecodeError")
    assert checkpoint_step(str(broken.parent)) == 20  # from qlora_sweep_state.json


# --- a long task evaluation is progress, not a stall ---------------------------------------------

TASK_STALL_S = 3.0
SLOW_FORWARD_S = 0.25  # each generation forward; a batch of 1 row and 4 new tokens: at most 1 s + compute


@pytest.mark.integration
def test_a_task_evaluation_longer_than_stall_timeout_is_not_a_stall(tmp_path: Path) -> None:
    """Real training with task evaluation (generated exact match, one row per batch, every forward
    of generation slowed): the whole evaluation runs past stall_timeout_s, each batch does not, and
    the watchdog, beaten per batch, lets the healthy trial finish."""
    from transformers import TrainerCallback

    from sweeps.plan import trial_job
    from sweeps.spec import parse_spec
    from tests.conftest import TRIAL_CONFIG
    from trainables.qlora import run_trial
    from trainables.watchdog import TrialWatchdog

    raw = make_spec_dict(
        data={"path": str(REPO / "sweeps" / "data" / "smoke_answers.jsonl"), "eval_size": 40, "max_seq_length": 64},
        train={"max_steps": 10, "eval_every": 10, "checkpoint": False},
        eval={
            "metrics": [{"type": "exact_match", "mode": "generate"}],
            "max_examples": 10, "batch_size": 1, "max_new_tokens": 4, "when": "every_round",
        },
    )
    job = trial_job(parse_spec(raw, base_dir=tmp_path))
    reports: list[dict] = []
    exits: list[float] = []
    watchdog = TrialWatchdog(
        None, TASK_STALL_S, lambda m, c=None: reports.append(m),
        exit_process=lambda: (exits.append(time.time()), watchdog.close()),  # not the test process
    )

    def slow_generation(context):
        class SlowGeneration(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                def pause(module, inputs, kw):
                    if not module.training and kw.get("labels") is None:  # task evaluation, not the eval loss
                        time.sleep(SLOW_FORWARD_S)

                model.get_base_model().register_forward_pre_hook(pause, with_kwargs=True)
                watchdog.start()  # the clock starts with training: start-up gaps are not what is tested

        return SlowGeneration()

    try:
        run_trial(
            {**TRIAL_CONFIG, "learning_rate": 1e-2}, job, report=watchdog.report,
            callbacks=[watchdog.callback, slow_generation],
        )
    finally:
        watchdog.close()
    assert exits == [], f"the watchdog ended a healthy trial during its task evaluation: {reports[-1]}"
    (last,) = reports
    assert "trial_status" not in last and last["step"] == 10, last  # a normal report, not a terminal one
    # The evaluation really was longer than the stall limit: the test would catch a missing beat.
    assert last["task_eval_s"] > 1.5 * TASK_STALL_S, last["task_eval_s"]
    print(f"\n[watchdog] task evaluation took {last['task_eval_s']:.1f} s with stall_timeout_s={TASK_STALL_S}: not a stall")


def test_past_trial_timeout_a_report_in_progress_is_let_finish_before_the_hard_path() -> None:
    """A checkpoint upload (the report) running past trial_timeout_s + grace is not cut off; once it
    returns, a trial that reaches no step end is still ended after the grace, and a report that
    never returns is ended REPORT_WAIT_S past the limit. The report here stands in for Tune's."""
    from trainables.watchdog import REPORT_WAIT_S, TrialWatchdog

    limit_s, grace_s, upload_s = 0.2, 0.3, 1.5
    seen: dict[str, object] = {}

    def upload(metrics, checkpoint_dir=None):
        if metrics.get("trial_status") == "timed_out":
            seen["terminal"] = metrics
            return
        now = time.monotonic()
        limit = watchdog.started + limit_s
        seen["would_cut_at_grace"] = watchdog._past_grace(now=limit + grace_s + 1)
        seen["cut_at_wait"] = watchdog._past_grace(now=limit + REPORT_WAIT_S + 1)
        time.sleep(upload_s)
        seen["fired_during_upload"] = watchdog.fired.is_set()

    watchdog = TrialWatchdog(limit_s, None, upload, exit_process=lambda: seen.setdefault("exit", time.monotonic()), grace_s=grace_s)
    watchdog.start()
    try:
        time.sleep(0.1)
        watchdog.report({"step": 10, "eval_loss": 1.0}, "/checkpoint")  # crosses limit + grace while uploading
        returned = time.monotonic()
        assert seen["fired_during_upload"] is False, "the hard path cut off a checkpoint upload in progress"
        assert seen["would_cut_at_grace"] is False and seen["cut_at_wait"] is True
        deadline = returned + grace_s + 5
        while "exit" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watchdog.close()
    assert "exit" in seen, "no step end after the upload, and the hard path never came"
    assert seen["exit"] - returned >= grace_s  # the grace counts from the upload's end
    assert seen["terminal"]["timeout_reason"] == "trial_timeout"
