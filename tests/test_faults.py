"""Fault injection: a diverging trial, bad data, unwritable or full storage, a report that cannot be written.

Each scenario runs `qlora-sweep` the way a user does (its own process, a private Ray temp folder,
see tests/cli_runs.py) and has a control run showing that its test can fail. docs/reliability.md
tabulates what each one proves and what it measured.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from analysis.results import read_trials_csv
from tests.cli_runs import CliRun, private_ray_tmp, processes_of, read_results, run_cli
from tests.conftest import SMOKE_DATA, make_spec_dict, write_spec
from tests.fault_plugins import SLOW_TEARDOWN, SLOW_TEARDOWN_ENV

GOOD_ROWS = SMOKE_DATA.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    with private_ray_tmp() as path:
        yield path


def assert_clean_failure(run: CliRun, storage: Path) -> None:
    """Exit 2 with a message and no traceback, before Ray started and before anything was written.

    The storage folder itself may exist (preflight's write probe makes it); nothing may be in it.
    """
    assert run.returncode == 2, run.output[-3000:]
    assert run.stderr.startswith("error: "), run.stderr[-3000:]
    assert "Traceback" not in run.output
    assert run.ray_sessions == [], f"Ray was started: {run.ray_sessions}"
    left = sorted(storage.rglob("*")) if storage.is_dir() else []
    assert left == [], f"half-written output under --storage: {left}"


# --- 1. a diverging trial -------------------------------------------------------------------------
#
# float16 compute on CPU with a learning rate of 0.5 (within the spec's < 1.0 typo guard, and with
# the default gradient clipping) overflows the float16 range within a few steps: the loss becomes
# NaN. Nothing in the training loop knows about tests; this is a real overflow. The same spec with
# learning rate 3e-3 (the control, in the same sweep) trains normally.

DIVERGE_LR, SANE_LR = 0.5, 0.003
DIVERGE_STEPS = 20


@pytest.mark.integration
def test_a_diverging_trial_stops_at_once_and_the_sweep_completes(tmp_path: Path, ray_tmp: Path) -> None:
    import optuna

    spec = write_spec(
        tmp_path / "diverge.yaml",
        make_spec_dict(
            name="diverge",
            model={"path": "builtin:tiny-llama", "compute_dtype": "float16"},
            space={"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "learning_rate": [DIVERGE_LR, SANE_LR]},
            search={"num_samples": 3, "max_concurrent": 2, "seed": 0, "sampler": "random"},
            scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}},
            train={"max_steps": DIVERGE_STEPS, "eval_every": 10, "batch_size": 8},
        ),
    )
    run = run_cli(["run", str(spec), "--storage", str(tmp_path / "results"), "--name", "diverge"], ray_tmp)
    assert run.returncode == 0, run.output[-4000:]
    assert "Traceback" not in run.output
    assert processes_of(ray_tmp) == [], "Ray processes left behind"
    experiment = tmp_path / "results" / "diverge"
    trials = read_trials_csv(experiment / "report" / "trials.csv")
    assert len(trials) == 3
    diverged = trials[trials["learning_rate"] == DIVERGE_LR]
    sane = trials[trials["learning_rate"] == SANE_LR]
    assert len(diverged) and len(sane), f"search.seed no longer draws both learning rates: {trials['learning_rate'].tolist()}"

    # The diverged trials stopped at the step their loss became non-finite, reported once, and
    # are marked diverged, not failed: a NaN is a result, not a crash.
    assert set(diverged["status"]) == {"diverged"}, diverged[["trial_id", "status"]]
    assert (diverged["steps"] < 10).all(), f"not stopped at once: {diverged['steps'].tolist()} of {DIVERGE_STEPS}"
    assert (diverged["iterations"] == 1).all()
    assert diverged["error"].isna().all()
    for trial_id in diverged["trial_id"]:
        results = [json.loads(line) for line in (experiment / f"trial_{trial_id}" / "result.json").read_text().splitlines()]
        assert len(results) == 1 and results[0]["trial_status"] == "diverged"
        assert math.isnan(results[0]["eval_loss"])
        assert not math.isfinite(results[0]["train_loss"]) or results[0]["step"] < 10

    # Control: the same spec with a sane learning rate trains normally, after and beside the NaN.
    assert set(sane["status"]) <= {"completed", "early_stopped"}, sane[["trial_id", "status"]]
    assert sane["best_eval_loss"].map(math.isfinite).all()
    assert (sane["steps"] >= 10).all()

    # Optuna was told at once (no stale RUNNING trial for the end-of-sweep settling to fix): a
    # diverged trial is PRUNED with its NaN as last intermediate value, which TPE ranks below every
    # other trial; the others are COMPLETE with their finite value.
    assert "is not acceptable" not in run.output, "Optuna rejected a NaN value"
    assert "settled Optuna trial" not in run.output, run.stdout
    study = optuna.load_study(study_name="diverge", storage=f"sqlite:///{experiment / 'optuna.db'}")
    states = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials(deepcopy=False)}
    for trial_id in diverged["trial_id"]:
        assert states[trial_id].state == optuna.trial.TrialState.PRUNED
        assert states[trial_id].user_attrs["trial_status"] == "diverged"
        assert math.isnan(states[trial_id].intermediate_values[1])
    for trial_id in sane["trial_id"]:
        assert states[trial_id].state == optuna.trial.TrialState.COMPLETE
        assert math.isfinite(states[trial_id].value)
    assert "diverged" in (experiment / "report" / "report.md").read_text()
    print(
        f"\n[diverge] {len(diverged)} diverged at steps {diverged['steps'].tolist()} of {DIVERGE_STEPS} "
        f"in {diverged['wall_s'].round(1).tolist()} s; {len(sane)} sane trials {sane['status'].tolist()} "
        f"in {sane['wall_s'].round(1).tolist()} s; sweep {run.wall_s:.0f} s"
    )


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # a rung holding only the NaN
def test_asha_cuts_other_trials_as_if_the_nan_trial_were_not_there() -> None:
    """A NaN result neither crashes ASHA nor moves its cutoff (numpy's nanpercentile skips it)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler

    def decisions(results: list[tuple[str, float]]) -> dict[str, str]:
        scheduler = ASHAScheduler(
            metric="eval_loss", mode="min", time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2
        )
        trials = {tid: Trial("qlora", stub=True, trial_id=tid) for tid, _ in results}
        for trial in trials.values():
            scheduler.on_trial_add(None, trial)
        return {
            tid: scheduler.on_trial_result(None, trials[tid], {"training_iteration": 1, "eval_loss": loss})
            for tid, loss in results
        }

    finite = [("good", 1.0), ("bad", 2.0), ("best", 0.5), ("worse", 3.0)]
    with_nan = decisions([("nan", math.nan), *finite])
    without = decisions(finite)
    assert with_nan["nan"] == "CONTINUE"  # the trial stops itself; ASHA need not
    assert {k: v for k, v in with_nan.items() if k != "nan"} == without
    # Control: the comparison can fail. A finite bad score in the NaN's place does change the cutoff.
    assert {k: v for k, v in decisions([("nan", 0.1), *finite]).items() if k != "nan"} != without


# --- 2. bad data: exit 2 before Ray starts, nothing written -------------------------------------

LONG_ROW = json.dumps({"instruction": "Repeat this. " + "word " * 200, "output": "ok"})
BAD_DATA = {
    # case: (file name, file bytes or None for no file, spec data overrides, what stderr must say)
    "missing file": ("missing.jsonl", None, {}, r"file not found: \S*missing\.jsonl"),
    "empty file": ("empty.jsonl", b"", {}, r"empty\.jsonl holds no rows"),
    "row missing a field": (
        "rows.jsonl",
        "\n".join([*GOOD_ROWS[:2], json.dumps({"instruction": "no answer"}), *GOOD_ROWS[2:60]]).encode(),
        {},
        r"rows\.jsonl row 3: missing field 'output'",
    ),
    "non-UTF-8 bytes": (
        "latin1.jsonl",
        b"\n".join([GOOD_ROWS[0].encode(), '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1"), *[r.encode() for r in GOOD_ROWS[1:60]]]),
        {},
        r"latin1\.jsonl row 2: bytes \d+-\d+ are not UTF-8",
    ),
    "row longer than max_seq_length": (
        "long.jsonl",
        "\n".join([*GOOD_ROWS[:3], LONG_ROW, *GOOD_ROWS[3:60]]).encode(),
        {},
        r"long\.jsonl row 4: \d+ tokens exceeds data\.max_seq_length \(64\)",
    ),
    "eval split would be empty": (
        "few.jsonl",
        "\n".join(GOOD_ROWS[:5]).encode(),
        {"eval_size": 0.1},
        r"few\.jsonl: 5 usable rows and data\.eval_size 0\.1 leave 0 eval",
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_stops_the_run_before_ray_starts(tmp_path: Path, ray_tmp: Path, case: str) -> None:
    name, content, data_overrides, message = BAD_DATA[case]
    data = tmp_path / name
    if content is not None:
        data.write_bytes(content)
    spec = write_spec(tmp_path / "spec.yaml", make_spec_dict(data={"path": str(data), **data_overrides}))
    storage = tmp_path / "results"
    run = run_cli(["run", str(spec), "--storage", str(storage)], ray_tmp)
    assert_clean_failure(run, storage)
    assert re.search(message, run.stderr), run.stderr
    assert data.name in run.stderr


# --- 2b. bad rows skipped: the sweep runs and the report counts them -----------------------------


@pytest.mark.integration
def test_skipped_bad_rows_are_counted_in_data_report_and_report(tmp_path: Path, ray_tmp: Path) -> None:
    rows = [
        *GOOD_ROWS[:20],
        json.dumps({"instruction": "no answer"}),  # row 21: missing field
        *GOOD_ROWS[20:40],
        LONG_ROW,  # row 42: too long
        *GOOD_ROWS[40:60],
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_bytes("\n".join(rows).encode() + b"\n" + b'{"instruction": "\xff", "output": "x"}\n')  # row 63: not UTF-8
    spec = write_spec(
        tmp_path / "skip.yaml",
        make_spec_dict(
            name="skip",
            data={"path": str(data), "on_bad_rows": "skip", "eval_size": 10},
            search={"num_samples": 1, "max_concurrent": 1},
            train={"max_steps": 10, "eval_every": 10},
        ),
    )
    run = run_cli(["run", str(spec), "--storage", str(tmp_path / "results"), "--name", "skip"], ray_tmp)
    assert run.returncode == 0, run.output[-4000:]
    assert "data: 50 train / 10 eval rows, 3 bad rows skipped" in run.stdout
    # Control for the bad-data tests above: a run that does start Ray is seen starting it.
    assert len(run.ray_sessions) == 1
    assert processes_of(ray_tmp) == [], "Ray processes left behind"

    experiment = tmp_path / "results" / "skip"
    found = json.loads((experiment / "data_report.json").read_text())
    assert found["rows_read"] == 63 and found["train_rows"] == 50 and found["eval_rows"] == 10
    assert found["skipped_rows"] == 3 and found["on_bad_rows"] == "skip"
    assert [m.split(":")[0] for m in found["skipped"]] == ["mixed.jsonl row 63", "mixed.jsonl row 21", "mixed.jsonl row 42"]
    assert "missing field 'output'" in found["skipped"][1] and "max_seq_length" in found["skipped"][2]

    report = (experiment / "report" / "report.md").read_text()
    assert "3 bad rows skipped (data.on_bad_rows: skip) of 63 read" in report
    assert "## Bad rows skipped" in report and "mixed.jsonl row 21: missing field 'output'" in report
    assert "3 bad rows skipped" in (experiment / "report" / "report.html").read_text()
    trial = read_trials_csv(experiment / "report" / "trials.csv").iloc[0]
    assert trial["status"] == "completed"
    result = json.loads((experiment / f"trial_{trial['trial_id']}" / "result.json").read_text().splitlines()[-1])
    assert result["skipped_rows"] == 3 and result["train_rows"] == 50


# --- 3. storage unwritable or full: exit 2 before launch, nothing half-written ---------------------


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def _in_private_mount(mount_point: Path, options: str, fill: bool = False) -> list[str]:
    """A wrapper command: a tmpfs at mount_point, visible only to the wrapped process (gone after)."""
    script = f'mount -t tmpfs -o {options} tmpfs "$0"'
    if fill:  # fill the tmpfs to the last byte: the next write fails with ENOSPC
        script += ' && (head -c 1048576 /dev/zero > "$0/fill" 2>/dev/null; true)'
    script += ' && "$@"; rc=$?; echo "--- left under $0:"; find "$0" -mindepth 1 ! -name fill; exit $rc'
    return ["unshare", "-m", "sh", "-c", script, str(mount_point)]


def _limit_file_size(limit: int) -> Any:
    def apply() -> None:  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.integration
@pytest.mark.parametrize("case", ["parent is a file", "file size limit", "read-only mount", "full disk"])
def test_unwritable_or_full_storage_stops_the_run_before_ray_starts(tmp_path: Path, ray_tmp: Path, case: str) -> None:
    from trainables.tiny_models import materialize

    materialize("builtin:tiny-llama")  # build the model now: the limited process must only read it
    spec = write_spec(tmp_path / "spec.yaml", make_spec_dict())
    mount = tmp_path / "mnt"
    mount.mkdir()
    if case == "parent is a file":
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where a folder should be")
        storage = blocker / "results"
        run = run_cli(["run", str(spec), "--storage", str(storage)], ray_tmp)
        assert blocker.read_text() == "a file where a folder should be"
        reason = "Not a directory"
    elif case == "file size limit":
        storage = mount / "results"
        run = run_cli(["run", str(spec), "--storage", str(storage)], ray_tmp, preexec_fn=_limit_file_size(1))
        reason = "File too large"
    else:
        if not _can_mount():
            pytest.skip("needs root and unshare to mount a private tmpfs")
        storage = mount / "results"
        options, fill, reason = ("ro,size=64k", False, "Read-only file system") if case == "read-only mount" else ("size=64k", True, "No space left on device")
        run = run_cli(["run", str(spec), "--storage", str(storage)], ray_tmp, prefix=_in_private_mount(mount, options, fill))
        left = run.stdout.split("--- left under", 1)[1].splitlines()[1:]
        # Only the storage folder itself may have been made (by the write probe); nothing in it.
        assert [line for line in left if line.strip() and line.strip() != str(storage)] == [], left
        run.stdout = run.stdout.split("--- left under", 1)[0]
    assert_clean_failure(run, storage)
    assert f"storage: cannot write to {storage}" in run.stderr
    assert reason in run.stderr, run.stderr


# --- 3b. a report that cannot be written completely never looks complete ------------------------


@pytest.mark.integration
def test_a_report_write_that_fails_midway_leaves_no_report_claiming_to_be_complete(
    tmp_path: Path, ray_tmp: Path, recorded_sweep: Any
) -> None:
    experiment = tmp_path / "experiment"
    shutil.copytree(recorded_sweep.path, experiment, ignore=shutil.ignore_patterns("report", "checkpoint_*"))
    out = tmp_path / "report"

    # Control: unlimited, the report is complete, and its files tell the limit below where to fail.
    first = run_cli(["report", str(experiment), "--out", str(out)], ray_tmp)
    assert first.returncode == 0, first.output[-3000:]
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert {"trials.csv", "report.md", "report.html"} <= set(sizes)
    before = (out / "trials.csv").stat().st_mtime_ns

    # Allow the small data files, fail on the first big one (a chart or report.html).
    small = max(sizes["trials.csv"], sizes.get("trials.parquet", 0))
    limit = small + 1
    assert limit < sizes["report.html"], sizes
    failed = run_cli(["report", str(experiment), "--out", str(out)], ray_tmp, preexec_fn=_limit_file_size(limit))
    assert failed.returncode == 2, failed.output[-3000:]
    assert "Traceback" not in failed.output
    assert f"error: cannot write the report to {out}" in failed.stderr and "File too large" in failed.stderr
    assert f"qlora-sweep report {experiment}" in failed.stderr
    assert (out / "trials.csv").stat().st_mtime_ns > before, "the failure was not midway: nothing was rewritten"
    assert not (out / "report.html").exists() and not (out / "report.md").exists(), "a stale or partial summary survived"
    assert not [p for p in out.rglob("*.tmp-*")], "a partial temp file was left behind"
    print(f"\n[report] limit {limit} bytes; failed with: {failed.stderr.strip()[:200]}")

    # And once there is room again the report is whole.
    again = run_cli(["report", str(experiment), "--out", str(out)], ray_tmp)
    assert again.returncode == 0 and (out / "report.html").exists()


# --- a slow trial teardown and Tune's worker reuse -----------------------------------------------

REUSE_ERROR = "Could not re-use actor"
SLOW_TEARDOWN_S = "4"  # above Ray's default 2 s wait for a finished trial's thread


def reuse_spec(tmp_path: Path) -> Path:
    """Three short trials one after another, so each next trial reuses the previous one's worker.

    Each trial's teardown is slowed by tests/fault_plugins.py's `slow_teardown` (train.callbacks),
    by $QLORA_SWEEP_TEST_SLOW_TEARDOWN_S seconds when the run's environment sets it."""
    return write_spec(
        tmp_path / "reuse.yaml",
        make_spec_dict(
            name="reuse",
            space={"r": 8, "lora_alpha": 16, "target_modules": "qv", "learning_rate": [1e-3, 3e-3, 1e-2]},
            search={"num_samples": 3, "max_concurrent": 1, "seed": 0, "sampler": "random"},
            train={"max_steps": 10, "eval_every": 10, "batch_size": 8, "callbacks": [SLOW_TEARDOWN]},
        ),
    )


def test_a_slow_trial_teardown_does_not_stall_the_sweep(tmp_path: Path, ray_tmp: Path) -> None:
    """Tune stops a trial at its last round while its thread still frees memory; the next trial
    reuses the worker only once that thread ends. sweeps/driver.py's WORKER_ENV lets it wait."""
    run = run_cli(
        ["run", str(reuse_spec(tmp_path)), "--storage", str(tmp_path / "results"), "--name", "reuse"], ray_tmp,
        timeout=300, **{SLOW_TEARDOWN_ENV: SLOW_TEARDOWN_S},
    )
    assert run.returncode == 0, run.output[-4000:]
    assert REUSE_ERROR not in run.output
    assert processes_of(ray_tmp) == [], "Ray processes left behind"
    trials = read_trials_csv(tmp_path / "results" / "reuse" / "report" / "trials.csv")
    assert list(trials["status"]) == ["completed"] * 3
    assert not list((tmp_path / "results" / "reuse").glob("trial_*/error.txt"))
    print(f"\n[reuse] 3 trials with a {SLOW_TEARDOWN_S} s teardown each: {run.wall_s:.0f} s")


def test_with_rays_default_wait_the_same_sweep_fails_to_reuse_and_stalls(tmp_path: Path, ray_tmp: Path) -> None:
    """The control: with TUNE_FUNCTION_THREAD_TIMEOUT_S=2 (Ray's default) the reuse fails. In Ray
    2.60 the sweep then hangs with no trial running, so it is killed once the error shows."""
    import signal

    import psutil

    from tests.cli_runs import QLORA_SWEEP, cli_env

    env = cli_env(ray_tmp, **{SLOW_TEARDOWN_ENV: SLOW_TEARDOWN_S}, TUNE_FUNCTION_THREAD_TIMEOUT_S="2")
    proc = subprocess.Popen(
        [QLORA_SWEEP, "run", str(reuse_spec(tmp_path)), "--storage", str(tmp_path / "results")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # a hang would stop here: the pytest-timeout of the suite bounds it
            seen.append(line)
            if REUSE_ERROR in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for leftover in psutil.process_iter(["cmdline"]):
            try:
                if str(ray_tmp) in " ".join(leftover.info["cmdline"] or []):
                    leftover.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    assert any(REUSE_ERROR in line for line in seen), "".join(seen)[-4000:]
    assert processes_of(ray_tmp) == [], "Ray processes left behind"


# --- 7. a train.callbacks plug-in that cannot be loaded ------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    "entry, message",
    [
        ("no_such_package.plugins:factory", r"train\.callbacks: cannot import 'no_such_package\.plugins:factory'"),
        ("tests.fault_plugins:no_such_factory", r"train\.callbacks: cannot import 'tests\.fault_plugins:no_such_factory'"),
    ],
)
def test_an_unloadable_callback_plugin_stops_the_run_before_ray_starts(
    tmp_path: Path, ray_tmp: Path, entry: str, message: str
) -> None:
    # The plug-in seam imports on every worker; preflight imports it first, so a typo costs no trial.
    spec = write_spec(tmp_path / "spec.yaml", make_spec_dict(train={"callbacks": [entry]}))
    storage = tmp_path / "results"
    run = run_cli(["run", str(spec), "--storage", str(storage)], ray_tmp, cwd=Path(__file__).resolve().parent.parent)
    assert_clean_failure(run, storage)
    assert re.search(message, run.stderr), run.stderr


# --- Ctrl-C and SIGTERM (issue 14) ---------------------------------------------------------------------

INTERRUPT_STEPS = 40


@pytest.mark.integration
@pytest.mark.parametrize("signals, exit_status", [(["SIGINT"], 130), (["SIGTERM"], 143), (["SIGINT", "SIGINT"], 130)])
def test_a_signal_stops_the_sweep_with_a_partial_report_and_resume_finishes_it(
    tmp_path: Path, ray_tmp: Path, signals: list[str], exit_status: int
) -> None:
    """The first signal: no new trial, running ones saved, the partial report, the resume command,
    exit 128 + signal; then `resume` completes every trial, none run twice (each reports rounds
    10..40 exactly once). A second signal a second later: stop now, the same status, no Ray left."""
    import signal
    import time

    from tests.cli_runs import QLORA_SWEEP, cli_env

    spec = write_spec(
        tmp_path / "sig.yaml",
        make_spec_dict(
            name="sig",
            search={"num_samples": 4, "max_concurrent": 2},
            train={"max_steps": INTERRUPT_STEPS, "eval_every": 10, "batch_size": 8, "grad_accum": 4},
        ),
    )
    experiment = tmp_path / "results" / "sig"
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [QLORA_SWEEP, "run", str(spec), "--storage", str(tmp_path / "results"), "--name", "sig"],
            env=cli_env(ray_tmp), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.time() + 300
            while not any(rows and rows[-1]["step"] < INTERRUPT_STEPS for rows in read_results(experiment).values()):
                assert driver.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "no trial reported a round"
                time.sleep(0.2)
            for i, name in enumerate(signals):
                if i:
                    time.sleep(1.0)
                driver.send_signal(getattr(signal, name))  # the driver alone, as `kill` does
            returncode = driver.wait(timeout=180)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    output = log.read_text()
    assert returncode == exit_status, output[-4000:]
    assert processes_of(ray_tmp) == [], "Ray processes left behind"
    if len(signals) == 1:
        assert f"stopped by {signals[0]}" in output and f"qlora-sweep resume {experiment}" in output, output[-3000:]
        assert (experiment / "report" / "report.md").exists()
        assert "Traceback" not in output
    at_stop = read_results(experiment)
    assert len(at_stop) < 4 or any(rows[-1]["step"] < INTERRUPT_STEPS for rows in at_stop.values())  # stopped early
    if len(signals) > 1:
        return  # stopped at once: what resume then does is the SIGKILL case (tests/test_resume.py)

    resumed = run_cli(["resume", str(experiment)], ray_tmp)
    assert resumed.returncode == 0, resumed.output[-4000:]
    trials = read_trials_csv(experiment / "report" / "trials.csv")
    assert len(trials) == 4 and set(trials["status"]) == {"completed"}, trials[["trial_id", "status", "error"]]
    for trial, rows in read_results(experiment).items():
        steps = [r["step"] for r in rows]
        assert steps == [10, 20, 30, 40], (trial, steps)  # continued from its checkpoint, never rerun


@pytest.mark.integration
def test_a_sweep_with_a_failed_trial_exits_1_and_counts_the_retry_once(tmp_path: Path, ray_tmp: Path) -> None:
    """Exit status 1 when some (not all) trials failed; the console numbers a retried trial once.
    Control: before, the exit status was 1 only when every trial errored, so this sweep exited 0;
    and the retry printed as a new trial ("[trial 3/2]")."""
    from tests.fault_plugins import FAIL_ONE_ENV, FAIL_ONE_TRIAL

    spec = write_spec(
        tmp_path / "partial.yaml",
        make_spec_dict(
            name="partial",
            space={"r": 8, "lora_alpha": 16, "target_modules": "qv", "learning_rate": {"loguniform": [1e-3, 1e-2]}},
            search={"num_samples": 2, "max_concurrent": 2, "seed": 0, "sampler": "random"},
            train={"max_steps": 10, "eval_every": 10, "batch_size": 8, "max_failures": 0, "callbacks": [FAIL_ONE_TRIAL]},
        ),
    )
    run = run_cli(  # --set rides along: the override is what allows the retry
        ["run", str(spec), "--storage", str(tmp_path / "results"), "--name", "partial", "--set", "train.max_failures=1",
         "--json"],
        ray_tmp,
        timeout=300, **{FAIL_ONE_ENV: str(tmp_path / "failing-trial")},
    )
    assert run.returncode == 1, run.output[-4000:]
    assert processes_of(ray_tmp) == [], "Ray processes left behind"
    trials = read_trials_csv(tmp_path / "results" / "partial" / "report" / "trials.csv")
    assert sorted(trials["status"]) == ["completed", "failed"]
    assert "[qlora-sweep] 2 trials, 1 failed" in run.output
    assert re.search(r"\[trial [12]/2\] \S+ restarted \(attempt 2\)", run.output), run.output[-4000:]
    assert "[trial 3/2]" not in run.output
    experiment = tmp_path / "results" / "partial"
    assert json.loads((experiment / "run_plan.json").read_text())["overrides"] == ["train.max_failures=1"]
    assert (experiment / "sweep_spec.yaml").read_text().startswith("# run with --set train.max_failures=1\n")
    assert "spec overrides: --set train.max_failures=1" in (experiment / "report" / "report.md").read_text()
    summary = json.loads(run.stdout)  # --json: stdout is one JSON object, the console went to stderr
    assert (summary["exit_status"], summary["failed"], summary["statuses"]) == (1, 1, {"completed": 1, "failed": 1})
    completed = trials[trials["status"] == "completed"].iloc[0]
    assert summary["best"]["trial_id"] == completed["trial_id"]
    assert summary["best"]["best_eval_loss"] == pytest.approx(completed["best_eval_loss"])
    assert summary["best"]["params"]["learning_rate"] == pytest.approx(completed["learning_rate"])
    assert summary["experiment_dir"] == str(experiment) and summary["interrupted"] is None
    assert "[qlora-sweep] 2 trials, 1 failed" in run.stderr
