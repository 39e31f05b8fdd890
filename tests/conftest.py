"""Shared fixtures: tiny specs, a model cache, and Ray on loopback with nothing left behind.

Tiers (see pyproject markers): unmarked tests are pure logic and fast; `integration` tests start
real Ray clusters and train real tiny quantized models; `gpu` tests skip without CUDA; `e2e`
drives `ray up`/`ray submit` and runs alone (`make test-e2e`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every process this test run starts inherits this variable (Ray's GCS, raylets and workers included),
# so the leftover checks below count only Ray processes of this run: a contributor's own Ray job, or a
# second test run, on the same machine is neither blamed nor waited for. Tests that build a subprocess
# environment from scratch must copy it (`RUN_MARKER`).
RUN_MARKER = "QLORA_SWEEP_TEST_RUN"
os.environ.setdefault(RUN_MARKER, uuid.uuid4().hex)
# Ray 2.60 turns token auth on for a new local cluster and, with no token given, writes one to the
# invoking user's ~/.ray/auth_token. The test run brings its own token, so no dotfile is written.
# This must happen before anything imports ray: ray's core reads RAY_AUTH_MODE once, so a process
# that imported ray first keeps "disabled" while the GCS it starts reads "token" from the
# environment, and every in-process ray.init / Cluster then fails with InvalidAuthToken (and leaves
# that GCS running). A CI run failed 36 tests that way after an import was added above this block.
if "ray" in sys.modules:
    raise RuntimeError("tests/conftest.py: ray was imported before the test run's Ray auth settings; "
                       "import project modules only after this block")
if "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex

import psutil  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from analysis.results import read_trials_csv  # noqa: E402
from sweeps.local_env import use_local_env  # noqa: E402

use_local_env()  # before anything imports ray: every local Ray service binds to 127.0.0.1 only

from sweeps.searcher import STUDIES_ENV  # noqa: E402  (after use_local_env: it imports ray)

REPO = Path(__file__).resolve().parent.parent
SMOKE_DATA = REPO / "sweeps" / "data" / "smoke_instructions.jsonl"

# Caches and settings that libraries keep in the home folder (matplotlib's font cache, MLflow's
# telemetry id, W&B's logs, Hugging Face's cache, our default Optuna study folder) go to a folder of
# this test run, so the suite writes nothing under ~/.cache, ~/.config or ~/.local. Set at import,
# before test modules import those libraries; subprocesses and Ray workers inherit it.
HOME_CACHES = Path(tempfile.mkdtemp(prefix="qlora-sweep-test-home-"))
atexit.register(shutil.rmtree, HOME_CACHES, ignore_errors=True)
for _name, _sub in (("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"),
                    ("MPLCONFIGDIR", "matplotlib"), ("WANDB_CACHE_DIR", "wandb-cache"),
                    ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_DATA_DIR", "wandb-data"),
                    (STUDIES_ENV, "studies")):
    (HOME_CACHES / _sub).mkdir()
    os.environ[_name] = str(HOME_CACHES / _sub)

# A small, fast sweep for integration tests that are not about the smoke sweep itself.
TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"path": "builtin:tiny-llama"},
    "data": {"path": str(SMOKE_DATA), "max_seq_length": 64, "eval_size": 40},
    "space": {
        "r": [4, 8],
        "lora_alpha": [16],
        "target_modules": ["qv", "all-linear"],
        "learning_rate": {"loguniform": [1.0e-3, 1.0e-2]},
        "lora_dropout": 0.0,
    },
    "search": {"num_samples": 2, "max_concurrent": 2, "seed": 0},
    "scheduler": {"asha": None},
    # A checkpoint at every round (the default, '5m', would leave these seconds-long trials only their last):
    # the fault and resume tests kill trials between rounds and check they continue from a checkpoint.
    "train": {"max_steps": 20, "eval_every": 10, "batch_size": 8, "checkpoint_every": 1},
    "resources": {"gpus_per_trial": 0, "cpus_per_trial": 1},
}


# One fixed trial configuration, for tests that call the trainable directly (no searcher).
TRIAL_CONFIG: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "target_modules": "qv",
    "learning_rate": 3e-3,
    "lora_dropout": 0.0,
    "weight_decay": 0.0,
    "warmup_ratio": 0.0,
    "lr_scheduler_type": "constant",
    "batch_size": 8,
}


def make_spec_dict(**overrides: Any) -> dict[str, Any]:
    """TINY_SPEC with sections overridden (a section's keys are merged, not replaced)."""
    from sweeps.spec import with_sections

    return with_sections(TINY_SPEC, **overrides)


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session", autouse=True)
def experiment_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The key that digests Tune's pickled state (core/integrity.py), in a temp folder: never the
    user's own ~/.config/qlora-sweep/experiment.key, nor a key the caller's environment names (tests
    rewrite and re-permission it). Subprocesses and Ray workers inherit it."""
    from core.integrity import KEY_ENV

    os.environ[KEY_ENV] = str(tmp_path_factory.mktemp("qlora-sweep-key") / "experiment.key")
    return Path(os.environ[KEY_ENV])


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builtin tiny models are built once per test session, in a private cache."""
    cache = Path(os.environ.get("QLORA_SWEEP_TEST_CACHE") or tmp_path_factory.mktemp("qlora-sweep-cache"))
    os.environ["QLORA_SWEEP_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session", autouse=True)
def home_left_as_found() -> Iterator[None]:
    """The suite creates nothing in the invoking user's home folder (the e2e test checks its files
    byte by byte while it runs; this checks the top level over the whole run)."""
    home = Path.home()
    before = set(os.listdir(home)) if home.is_dir() else set()
    yield
    added = sorted(set(os.listdir(home)) - before) if home.is_dir() else []
    if added:
        pytest.fail(
            f"the test run created {added} in the home folder {home}: give the program that writes it a home "
            "of its own (tests.conftest.own_home) or point its cache variable into HOME_CACHES",
            pytrace=False,
        )


def own_home(root: Path, env: dict[str, str]) -> dict[str, str]:
    """`env` with HOME set to a new folder under `root`, for a server that keeps files in ~ (gunicorn,
    under mlflow server and optuna-dashboard, puts its control socket in ~/.gunicorn)."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home)}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server the test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started_by_this_run(proc: psutil.Process) -> bool:
    """Whether `proc` descends from this test run: it, or a process above it, carries the run's marker.

    Ray's agents rename themselves (setproctitle reuses the memory /proc shows as their environment),
    so for them the marker is read from the raylet that started them.
    """
    marker = os.environ[RUN_MARKER]
    try:
        for each in [proc, *proc.parents()]:
            try:
                if each.environ().get(RUN_MARKER) == marker:
                    return True
            except (psutil.AccessDenied, psutil.ZombieProcess):
                continue
    except psutil.NoSuchProcess:
        return False
    return False


def ray_processes(any_run: bool = False) -> list[psutil.Process]:
    """Ray's own processes (GCS, raylet, dashboard, workers) that this test run started.

    Args:
        any_run: Count every Ray process on the machine, whoever started it.
    """
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            name = proc.info["name"] or ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not any_run and not started_by_this_run(proc):
            continue
        if (
            "gcs_server" in name
            or "raylet" in name
            or name.startswith("ray::")
            or "ray/dashboard/dashboard.py" in cmdline
            or "default_worker.py" in cmdline
            or "ray/_private/log_monitor.py" in cmdline
        ):
            found.append(proc)
    return found


def wait_for_no_ray_processes(timeout_s: float = 30.0, ignore: frozenset[int] = frozenset()) -> list[str]:
    """Wait for Ray processes to exit; return descriptions of any still alive, after ending them.

    Args:
        timeout_s: How long to wait.
        ignore: PIDs not to wait for: Ray processes that were running before the test started
            (`ray_pids()` then), which the test did not start and must not be blamed for.
    """
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        alive = [p for p in ray_processes() if p.pid not in ignore]
        if not alive:
            return []
        time.sleep(0.5)
    left = [p for p in ray_processes() if p.pid not in ignore]
    described = []
    for proc in left:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline()[:3])}")
        except psutil.Error:
            continue  # exited meanwhile
    # The calling test fails on these; they are this run's own (RUN_MARKER), so they are ended here
    # rather than left to break every later test that checks for a clean machine.
    end_processes(left)
    return described


def end_processes(processes: list[psutil.Process]) -> None:
    """Terminate `processes`, then kill those still alive after 15 s; wait for them to go."""
    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def ray_pids() -> frozenset[int]:
    """PIDs of the Ray processes running now (a baseline for `wait_for_no_ray_processes(ignore=...)`)."""
    return frozenset(p.pid for p in ray_processes())


@pytest.fixture
def ray_local() -> Iterator[None]:
    """A local Ray for one test, shut down afterwards, with a check that nothing was left behind."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        leftover = wait_for_no_ray_processes()
        assert not leftover, f"Ray processes left behind: {leftover}"


@dataclass
class RecordedSweep:
    """A real tiny sweep recorded once per session (see `recorded_sweep`).

    Attributes:
        path: The experiment folder.
        partial_reports: What `write_report` produced while the sweep was running: one
            (report folder, statuses seen, error or None) per attempt.
    """

    path: Path
    partial_reports: list[tuple[Path, list[str], str | None]]


@pytest.fixture(scope="session")
def recorded_sweep(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> RecordedSweep:
    """A real 4-trial sweep of the tiny model (20 steps, ASHA with grace_period 1), for report and export tests.

    While it runs, a background thread keeps writing reports of the unfinished experiment, as
    `qlora-sweep report` does during a sweep.
    """
    import threading

    from analysis.report import write_report
    from analysis.results import is_experiment
    from sweeps.driver import run_sweep
    from sweeps.spec import parse_spec

    assert not ray_processes(), "a Ray of this test run is still up; this fixture must start and stop its own"
    root = tmp_path_factory.mktemp("recorded-sweep")
    spec = parse_spec(
        make_spec_dict(
            search={"num_samples": 4, "max_concurrent": 2, "seed": 0},
            scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}},
            space={"r": [4, 16], "target_modules": ["qv", "all-linear"], "learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}},
        )
    )
    experiment = root / "results" / "recorded"
    partial: list[tuple[Path, list[str], str | None]] = []
    done = threading.Event()

    def report_while_running() -> None:
        while not done.is_set():
            if is_experiment(str(experiment)):
                out = root / f"partial-{len(partial)}"
                try:
                    write_report(str(experiment), out_dir=str(out))
                    statuses = read_trials_csv(out / "trials.csv")["status"].tolist()
                    partial.append((out, statuses, None))
                except Exception:  # recorded for the test to report, not swallowed
                    import traceback

                    partial.append((out, [], traceback.format_exc(limit=-4)))
            done.wait(1.0)

    poller = threading.Thread(target=report_while_running, daemon=True)
    poller.start()
    try:
        run_sweep(spec, storage_override=str(root / "results"), name="recorded", address="local", log=lambda _: None)
    finally:
        done.set()
        poller.join(timeout=120)
    leftover = wait_for_no_ray_processes()
    assert not leftover, f"Ray processes left behind: {leftover}"
    return RecordedSweep(path=experiment, partial_reports=partial)
