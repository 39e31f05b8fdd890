"""Experiment trackers (sweeps/tracking.py): one real sweep logs to a real `mlflow server` on 127.0.0.1,
started by the test, and to W&B in offline mode; both are read back (the MLflow client; the offline
run files through wandb's own protobuf records). Tracker secrets planted in the environment are written
nowhere. Without the tracking extra, a tracking spec is bad input (exit 2) before Ray starts.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli_runs import CliRun, private_ray_tmp, processes_of, read_results, run_cli
from tests.conftest import REPO, free_port, make_spec_dict, own_home, write_spec

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")



@dataclass
class MlflowServer:
    uri: str
    root: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` on a free loopback port, one worker, its own process group; stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = own_home(root, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield MlflowServer(uri, root)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this test started: the server and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(1)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # nothing of the server's group is left


@dataclass
class TrackedSweep:
    run: CliRun
    experiment: Path
    server: MlflowServer
    planted: dict[str, str]


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer, model_cache: Path) -> Iterator[TrackedSweep]:
    root = tmp_path_factory.mktemp("tracked")
    spec = write_spec(
        root / "tracked.yaml",
        make_spec_dict(
            name="tracked",
            tracking={"mlflow": {"uri": mlflow_server.uri, "experiment": "qs-test"}, "wandb": {"project": "qs-test", "mode": "offline"}},
        ),
    )
    planted = {name: secrets.token_hex(20) for name in ("MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY")}
    with private_ray_tmp() as ray_tmp:
        run = run_cli(["run", str(spec), "--storage", str(root / "results"), "--name", "tracked"], ray_tmp,
                      cwd=root, WANDB_DIR=None, **planted)
        yield TrackedSweep(run, root / "results" / "tracked", mlflow_server, planted)
        assert processes_of(ray_tmp) == [], "the sweep left Ray processes behind"


def trials_table(experiment: Path) -> Any:
    from analysis.results import read_trials_csv

    return read_trials_csv(experiment / "report" / "trials.csv")


pytestmark = pytest.mark.integration


def test_every_trial_is_an_mlflow_run_under_the_sweeps_run(tracked_sweep: TrackedSweep) -> None:
    run = tracked_sweep.run
    assert run.returncode == 0, run.output[-4000:]
    client = mlflow.MlflowClient(tracking_uri=tracked_sweep.server.uri)
    experiment = client.get_experiment_by_name("qs-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("qlora_sweep_role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("qlora_sweep_role") == "trial"]
    assert len(parents) == 1 and len(children) == 2, [(r.info.run_name, r.data.tags) for r in runs]
    parent = parents[0]
    assert parent.info.run_name == "tracked" and parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/trials.csv", "report/plots"} <= artifacts, artifacts

    trials = trials_table(tracked_sweep.experiment).set_index("trial_id")
    results = read_results(tracked_sweep.experiment)
    config_columns = [c for c in ("r", "lora_alpha", "target_modules", "learning_rate", "lora_dropout") if c in trials]
    for child in children:
        tags, trial_id = child.data.tags, child.data.tags["trial_id"]
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name == f"trial_{trial_id}" and child.info.status == "FINISHED"
        row = trials.loc[trial_id]
        assert tags["status"] == row["status"] == "completed"
        assert tags["memory_kind"] == row["memory_kind"] == "host_rss"
        # params: the trial's config, as trials.csv has it
        for column in config_columns:
            value = row[column]
            assert float(child.data.params[column]) == pytest.approx(float(value)) if not isinstance(value, str) \
                else child.data.params[column] == value, column
        # metrics: every evaluation round, with the round as the step, equal to result.json
        history = client.get_metric_history(child.info.run_id, "eval_loss")
        expected = [(r["training_iteration"], r["eval_loss"]) for r in results[trial_id] if "eval_loss" in r]
        got = sorted((m.step, m.value) for m in history)
        assert [s for s, _ in got] == [s for s, _ in expected] and [v for _, v in got] == pytest.approx([v for _, v in expected])
        assert len(expected) == 2
        for name in ("tokens_per_s", "peak_memory_mib", "perplexity"):
            assert len(client.get_metric_history(child.info.run_id, name)) == 2, name
    print(f"\n[mlflow] 1 sweep run + {len(children)} trial runs read back; sweep wall {run.wall_s:.0f} s")


# --- W&B offline run files --------------------------------------------------------------------


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (.wandb): a 7-byte header, then 32 KiB blocks of chunks
    (crc32, length, type: full/first/middle/last), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_run(path: Path) -> dict[str, Any]:
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "tags": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, group=record.run.run_group, project=record.run.project)
            run["tags"] = list(record.run.tags) or run["tags"]
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return run


def test_every_trial_is_a_wandb_offline_run_in_the_experiments_group(tracked_sweep: TrackedSweep) -> None:
    run = tracked_sweep.run
    assert run.returncode == 0, run.output[-4000:]
    files = sorted((tracked_sweep.experiment / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    trials = trials_table(tracked_sweep.experiment).set_index("trial_id")
    results = read_results(tracked_sweep.experiment)
    for path in files:
        offline = read_offline_run(path)
        trial_id = offline["id"]
        row = trials.loc[trial_id]
        assert offline["group"] == "tracked" and offline["project"] == "qs-test"
        assert offline["config"]["r"] == row["r"] and offline["config"]["target_modules"] == row["target_modules"]
        assert offline["config"]["learning_rate"] == pytest.approx(row["learning_rate"])
        assert offline["config"]["memory_kind"] == "host_rss"
        expected = [r["eval_loss"] for r in results[trial_id] if "eval_loss" in r]
        assert [h["eval_loss"] for h in offline["history"] if "eval_loss" in h] == pytest.approx(expected)
        assert offline["tags"] == [row["status"]] and offline["summary"]["status"] == row["status"]


def test_tracker_secrets_are_written_nowhere(tracked_sweep: TrackedSweep) -> None:
    """MLFLOW_TRACKING_TOKEN and WANDB_API_KEY were in the sweep's environment: no file of the experiment
    (W&B's offline runs included), of Ray's session (runtime_env_agent.log) or of the MLflow server
    holds them, and nothing printed them."""
    from tests.test_security import files_containing

    run = tracked_sweep.run
    assert run.returncode == 0, run.output[-4000:]
    sessions = run.ray_sessions
    assert len(sessions) == 1 and (sessions[0] / "logs" / "runtime_env_agent.log").is_file()
    assert list((tracked_sweep.experiment / "wandb").glob("offline-run-*/run-*.wandb"))
    roots = [tracked_sweep.experiment, run.ray_tmp, tracked_sweep.server.root]
    for name, value in tracked_sweep.planted.items():
        assert files_containing(value.encode(), roots) == [], f"{name} was written"
        assert value not in run.output, f"{name} was printed"


def test_the_wandb_callback_gives_the_key_no_runtime_env() -> None:
    """Control for the test above: Ray's own WandbLoggerCallback puts WANDB_API_KEY in the logging actor's
    runtime_env (which Ray logs in plain text); ours does not."""
    import ast
    import inspect
    import textwrap

    from ray.air.integrations.wandb import WandbLoggerCallback

    from sweeps.tracking_callbacks import TrialRunsToWandb

    def runtime_env_keywords(method: Any) -> list[str]:
        """The runtime_env= arguments of the calls in `method`, as source text."""
        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        return [ast.unparse(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                for k in node.keywords if k.arg == "runtime_env"]

    assert runtime_env_keywords(WandbLoggerCallback._start_logging_actor) == ["{'env_vars': env_vars}"]
    assert runtime_env_keywords(TrialRunsToWandb._start_logging_actor) == []
    from sweeps.driver import SECRET_ENV

    assert {"MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY"} <= set(SECRET_ENV)


# --- without the tracking extra, or with a server that does not answer: bad input ---------------


def run_without(package: str, args: list[str], ray_tmp: Path) -> subprocess.CompletedProcess[str]:
    """`qlora-sweep ARGS` in a process where `package` cannot be imported (as if not installed)."""
    code = f"import sys; sys.modules[{package!r}] = None; from sweeps.cli import main; sys.exit(main({args!r}))"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_tracking_spec_without_the_package_is_bad_input_before_ray(tmp_path: Path, model_cache: Path) -> None:
    spec = write_spec(tmp_path / "t.yaml", make_spec_dict(tracking={"mlflow": {"uri": "http://127.0.0.1:9"}}))
    with private_ray_tmp() as ray_tmp:
        done = run_without("mlflow", ["run", str(spec), "--storage", str(tmp_path / "results")], ray_tmp)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "tracking.mlflow: the mlflow package is not installed; pip install 'qlora-sweep[tracking]'" in done.stderr
        assert "Traceback" not in done.stderr
        assert not list((ray_tmp / "ray").glob("session_2*")), "Ray started"


def test_the_missing_package_check_names_each_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeps import tracking
    from sweeps.spec import parse_spec

    spec = parse_spec(make_spec_dict(tracking={"mlflow": {"uri": "http://127.0.0.1:9"}, "wandb": {"project": "p", "mode": "offline"}}))
    monkeypatch.setattr(tracking, "installed", lambda package: False)
    found = tracking.problems(spec)
    assert [p.split(":")[0] for p in found] == ["tracking.mlflow", "tracking.wandb"]
    assert all("pip install 'qlora-sweep[tracking]'" in p for p in found)
    monkeypatch.setattr(tracking, "installed", lambda package: True)  # control: installed, offline -> none
    assert tracking.problems(spec, offline=True) == []


def test_an_mlflow_server_that_does_not_answer_is_bad_input(tmp_path: Path, model_cache: Path) -> None:
    port = free_port()  # nothing listens there
    spec = write_spec(tmp_path / "t.yaml", make_spec_dict(tracking={"mlflow": {"uri": f"http://127.0.0.1:{port}"}}))
    with private_ray_tmp() as ray_tmp:
        started = time.time()
        done = run_cli(["validate", str(spec)], ray_tmp)
        assert done.returncode == 2, done.output[-3000:]
        assert f"tracking.mlflow.uri: cannot reach the MLflow tracking server at http://127.0.0.1:{port}" in done.stderr
        assert "Traceback" not in done.stderr and time.time() - started < 120
