"""Security: Ray on loopback only, secrets never written anywhere, remote code off unless the spec
says so, and report/resume reading only experiment folders.

The loopback and secret checks watch one real sweep started the way a user starts it
(`qlora-sweep run` in its own process, without the test suite's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER),
with fake secrets planted in its environment. Every check has a control showing it can fail.
docs/reliability.md tabulates them.
"""

from __future__ import annotations

import ast
import hashlib
import ipaddress
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.cli_runs import QLORA_SWEEP, CliRun, cli_env, private_ray_tmp, processes_of, run_cli
from tests.conftest import REPO, make_spec_dict, write_spec

# The secrets planted in the sweep's environment (sweeps/driver.py SECRET_ENV).
PLANTED = ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY")


# --- listening sockets --------------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    process: str
    ip: str
    port: int


def listening_sockets(pids: Iterable[int]) -> set[Listener]:
    """The TCP sockets these processes listen on."""
    found = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add(Listener(proc.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how gRPC reports IPv4 loopback
    return (mapped or address).is_loopback


def not_on_loopback(listeners: Iterable[Listener]) -> list[Listener]:
    return sorted((l for l in listeners if not is_loopback(l.ip)), key=lambda l: (l.process, l.port))


def run_processes(driver_pid: int | None, ray_tmp: Path) -> set[int]:
    """The driver, its descendants, and any process naming the run's Ray temp folder (GCS, raylet)."""
    pids = set()
    try:
        if driver_pid is not None:
            driver = psutil.Process(driver_pid)
            pids = {driver_pid, *(p.pid for p in driver.children(recursive=True))}
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(ray_tmp) in " ".join(proc.info["cmdline"] or []):
                pids.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


# --- grepping written files ---------------------------------------------------------------------


def files_containing(needle: bytes, roots: Iterable[Path]) -> list[Path]:
    """Every regular file under the roots whose bytes contain `needle`."""
    hits = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(path)
    return hits


# --- one watched sweep, shared by the loopback and secret tests -----------------------------------


@dataclass
class WatchedSweep:
    run: CliRun
    experiment: Path
    ray_tmp: Path
    planted: dict[str, str]
    listeners: set[Listener] = field(default_factory=set)
    process_names: set[str] = field(default_factory=set)
    new_default_sessions: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def watched_sweep(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[WatchedSweep]:
    root = tmp_path_factory.mktemp("watched")
    spec = write_spec(root / "secure.yaml", make_spec_dict(name="secure"))
    planted = {name: f"{'hf_' if name == 'HF_TOKEN' else ''}{secrets.token_hex(20)}" for name in PLANTED}
    default_sessions = set(Path("/tmp/ray").glob("session_2*"))
    with private_ray_tmp() as ray_tmp:
        # As a user runs it: no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (tests/conftest.py sets it for the
        # test process); qlora-sweep itself must keep a local cluster on loopback.
        env = cli_env(ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=None, **planted)
        started = time.time()
        proc = subprocess.Popen(
            [QLORA_SWEEP, "run", str(spec), "--storage", str(root / "results"), "--name", "secure"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        watched = WatchedSweep(run=None, experiment=root / "results" / "secure", ray_tmp=ray_tmp, planted=planted)  # type: ignore[arg-type]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                pids = run_processes(proc.pid, ray_tmp)
                watched.listeners |= listening_sockets(pids)
                for pid in pids:
                    try:
                        watched.process_names.add(psutil.Process(pid).name())
                    except psutil.NoSuchProcess:
                        pass
                stop.wait(0.25)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            stop.set()
            watcher.join(timeout=30)
            if proc.poll() is None:
                proc.kill()
        watched.run = CliRun(proc.returncode, stdout, stderr, ray_tmp, time.time() - started)
        watched.new_default_sessions = sorted(set(Path("/tmp/ray").glob("session_2*")) - default_sessions)
        assert processes_of(ray_tmp) == [], "the sweep left Ray processes behind"
        yield watched


@pytest.mark.integration
def test_every_ray_listener_of_a_local_sweep_is_on_loopback(watched_sweep: WatchedSweep) -> None:
    run = watched_sweep.run
    assert run.returncode == 0, run.output[-4000:]
    names = watched_sweep.process_names
    # The watcher really saw the cluster: its services and a trial worker, each listening somewhere.
    assert {"gcs_server", "raylet"} <= names, names
    assert any(n.startswith("ray::") for n in names), names
    listening = {l.process for l in watched_sweep.listeners}
    assert {"gcs_server", "raylet"} <= listening, watched_sweep.listeners
    # The port the driver printed (8265 unless that was taken, then Ray picks another).
    shown = re.search(r"dashboard: http://[^\s:]+:(\d+)", run.output)
    assert shown, run.output[-4000:]
    assert any(l.port == int(shown.group(1)) for l in watched_sweep.listeners), "the dashboard was not seen"
    assert not_on_loopback(watched_sweep.listeners) == []
    print(f"\n[loopback] {len(watched_sweep.listeners)} listening sockets, all loopback: "
          f"{sorted({l.process for l in watched_sweep.listeners})}")


def test_the_loopback_check_catches_a_listener_on_all_interfaces() -> None:
    """Control: the same collection and check, on sockets this test opens."""
    everywhere = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    loopback = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        everywhere.bind(("0.0.0.0", 0))
        everywhere.listen()
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        found = listening_sockets([os.getpid()])
        flagged = not_on_loopback(found)
        assert [l.port for l in flagged] == [everywhere.getsockname()[1]]
        assert loopback.getsockname()[1] in {l.port for l in found}
    finally:
        everywhere.close()
        loopback.close()
    assert not is_loopback("::") and not is_loopback("192.0.2.7") and is_loopback("::ffff:127.0.0.1") and is_loopback("::1")


@pytest.mark.integration
def test_no_written_file_holds_a_secret(watched_sweep: WatchedSweep) -> None:
    run, experiment = watched_sweep.run, watched_sweep.experiment
    assert run.returncode == 0, run.output[-4000:]
    sessions = run.ray_sessions
    assert len(sessions) == 1, sessions
    # What the grep covers really holds what a leak would land in.
    logs = sessions[0] / "logs"
    assert (logs / "runtime_env_agent.log").is_file() and list(logs.glob("python-core-worker-*.log"))
    assert list(experiment.glob("trial_*/events.out.tfevents.*")), "no TensorBoard files to search"
    assert (experiment / "optuna.db").is_file() and (experiment / "report" / "report.html").is_file()
    assert list(experiment.glob("trial_*/checkpoint_*/adapter_model.safetensors"))
    roots = [experiment, watched_sweep.ray_tmp, *watched_sweep.new_default_sessions]
    for name, value in watched_sweep.planted.items():
        assert files_containing(value.encode(), roots) == [], f"{name} was written"
        assert value not in run.output, f"{name} was printed"


@pytest.mark.integration
def test_the_secret_grep_finds_a_planted_token(watched_sweep: WatchedSweep, tmp_path: Path) -> None:
    """Control: the grep above fails when a secret is written, even inside a binary file."""
    copy = tmp_path / "copy"
    shutil.copytree(watched_sweep.experiment, copy)
    events = sorted(copy.glob("trial_*/events.out.tfevents.*"))[0]
    token = watched_sweep.planted["HF_TOKEN"].encode()
    events.write_bytes(events.read_bytes() + b"\x00\x17" + token + b"\x00")
    assert files_containing(token, [copy]) == [events]


# --- secrets reach the workers of a cluster started elsewhere, without Ray logging them -----------

HEAD = """
import sys, ray
context = ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
print(context.address_info["gcs_address"], flush=True)
sys.stdin.read()
ray.shutdown()
"""

# mode "qlora-sweep": join as `qlora-sweep run --address` does; "plain": join without passing
# anything; "runtime_env": pass HF_TOKEN as a runtime_env env var (how secrets used to travel).
PROBE = """
import hashlib, os, sys
import ray
mode, address = sys.argv[1], sys.argv[2]
if mode == "qlora-sweep":
    from sweeps.driver import connect_ray
    assert connect_ray(address)[0] == "joined"
elif mode == "plain":
    ray.init(address=address)
else:
    ray.init(address=address, runtime_env={"env_vars": {"HF_TOKEN": os.environ["HF_TOKEN"]}})

@ray.remote
def token_hash():
    return hashlib.sha256(os.environ.get("HF_TOKEN", "").encode()).hexdigest()

print("worker-token-sha256", ray.get(token_hash.remote()))
ray.shutdown()
"""


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.mark.integration
def test_secrets_reach_workers_of_a_cluster_started_elsewhere_and_are_not_logged() -> None:
    token, control_token = f"hf_{secrets.token_hex(20)}", f"hf_{secrets.token_hex(20)}"
    with private_ray_tmp() as ray_tmp:
        # A cluster started without the token, like `ray start` on a cloud node: its workers cannot
        # inherit it. Its own auth token keeps it apart from ~/.ray/auth_token of other sessions.
        env = cli_env(ray_tmp, HF_TOKEN=None, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        head = subprocess.Popen([sys.executable, "-c", HEAD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            address = head.stdout.readline().strip()
            assert address, "the head did not start"

            def probe(mode: str, secret: str) -> str:
                done = subprocess.run(
                    [sys.executable, "-c", PROBE, mode, address],
                    env={**env, "HF_TOKEN": secret}, capture_output=True, text=True, timeout=300, cwd=REPO,
                )
                assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
                assert secret not in done.stdout + done.stderr
                return done.stdout.split("worker-token-sha256 ", 1)[1].split()[0]

            # Control: joining passes nothing by itself; the head's workers do not have the token.
            assert probe("plain", token) == sha("")
            # qlora-sweep's driver brings it to them.
            assert probe("qlora-sweep", token) == sha(token)
            # Control: the runtime_env way brings it too, and Ray writes it into its logs.
            assert probe("runtime_env", control_token) == sha(control_token)
        finally:
            head.stdin.close()
            head.wait(timeout=120)
        logged = files_containing(control_token.encode(), [ray_tmp])
        assert any(p.name == "runtime_env_agent.log" for p in logged), "the grep cannot see Ray's runtime_env logging"
        assert files_containing(token.encode(), [ray_tmp]) == [], "qlora-sweep's secret reached Ray's files"


# --- trust_remote_code ----------------------------------------------------------------------------

SOURCE_DIRS = ("sweeps", "trainables", "analysis")
LOADERS = ("from_pretrained", "from_config")


def remote_code_violations(source: str, filename: str) -> list[str]:
    """Calls that could run a model's own code without the spec saying so.

    Every `Auto*.from_pretrained(...)` must pass trust_remote_code explicitly (omitted, transformers
    asks on a terminal instead of refusing), and nothing may pass a literal True.
    """
    problems = []
    tree = ast.parse(source, filename)
    dict_kwargs = {}  # name -> the keys of a dict literal assigned to it (for **kwargs)
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if len(targets) == 1 and isinstance(targets[0], ast.Name) and isinstance(node.value, ast.Dict):
            dict_kwargs[targets[0].id] = {
                k.value: v for k, v in zip(node.value.keys, node.value.values) if isinstance(k, ast.Constant)
            }
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOADERS):
            continue
        receiver = ast.unparse(node.func.value)
        where = f"{filename}:{node.lineno} {receiver}.{node.func.attr}"
        values = [k.value for k in node.keywords if k.arg == "trust_remote_code"]
        for k in node.keywords:
            if k.arg is None and isinstance(k.value, ast.Name) and "trust_remote_code" in dict_kwargs.get(k.value.id, {}):
                values.append(dict_kwargs[k.value.id]["trust_remote_code"])
        if any(isinstance(v, ast.Constant) and v.value is True for v in values):
            problems.append(f"{where}: trust_remote_code=True")
        elif receiver.startswith("Auto") and node.func.attr == "from_pretrained" and not values:
            problems.append(f"{where}: trust_remote_code not passed")
        elif values and not all(ast.unparse(v).endswith("trust_remote_code") for v in values):
            problems.append(f"{where}: trust_remote_code={ast.unparse(values[0])}, not the spec's")
    return problems


def test_every_model_loader_passes_the_specs_trust_remote_code() -> None:
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    calls = 0
    problems = []
    for path in files:
        source = path.read_text()
        calls += sum(source.count(f".{name}(") for name in LOADERS)
        problems += remote_code_violations(source, str(path.relative_to(REPO)))
    assert calls >= 6, "the loaders were not found; did the check stop looking?"
    assert problems == []


def test_the_loader_check_catches_unsafe_calls() -> None:
    """Control: the same check on calls that must fail it."""
    bad = """
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path)
kwargs = {"revision": None, "trust_remote_code": True}
config = AutoConfig.from_pretrained(path, **kwargs)
other = AutoConfig.from_pretrained(path, trust_remote_code=allow)
ok = AutoConfig.from_pretrained(path, trust_remote_code=spec.model.trust_remote_code)
"""
    found = remote_code_violations(bad, "bad.py")
    assert sorted(int(p.split(":")[1].split()[0]) for p in found) == [2, 3, 5, 6], found


def custom_code_model(tmp_path: Path, marker: Path) -> Path:
    """The tiny Llama with a config class of its own: loading it runs evil_config.py, which leaves `marker`."""
    from trainables.tiny_models import materialize

    folder = tmp_path / "custom-model"
    shutil.copytree(materialize("builtin:tiny-llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="qsweep_custom", auto_map={"AutoConfig": "evil_config.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil_config.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the model ran its own code')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class CustomConfig(LlamaConfig):\n"
        "    model_type = 'qsweep_custom'\n"
    )
    return folder


@pytest.mark.integration
@pytest.mark.parametrize("trusted", [False, True])
def test_a_models_own_code_runs_only_if_the_spec_trusts_it(tmp_path: Path, trusted: bool) -> None:
    marker = tmp_path / "ran"
    model = custom_code_model(tmp_path, marker)
    spec = write_spec(tmp_path / "spec.yaml", make_spec_dict(model={"path": str(model), "trust_remote_code": trusted}))
    with private_ray_tmp() as ray_tmp:
        done = run_cli(["validate", str(spec)], ray_tmp, HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert "Traceback" not in done.output
    if not trusted:
        assert done.returncode == 2, done.output
        assert "needs its own Python code to load" in done.stderr and "model.trust_remote_code: true" in done.stderr
        assert not marker.exists(), "the model's code ran although the spec does not trust it"
    else:  # control: the same model does run its code once trusted (the check above can fail)
        assert marker.read_text() == "the model ran its own code"


@pytest.mark.integration
def test_the_report_says_when_trust_remote_code_was_on(tmp_path: Path, recorded_sweep: Any) -> None:
    from analysis.report import write_report

    lines = {}
    for trusted in (False, True):
        copy = tmp_path / f"trusted-{trusted}"
        shutil.copytree(recorded_sweep.path, copy, ignore=shutil.ignore_patterns("report", "checkpoint_*"))
        spec = yaml.safe_load((copy / "sweep_spec.yaml").read_text())
        spec["model"]["trust_remote_code"] = trusted
        (copy / "sweep_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        outcome = write_report(str(copy))
        lines[trusted] = [line for line in outcome.summary_lines if "trust_remote_code" in line]
        report_md = (copy / "report" / "report.md").read_text()
        report_html = (copy / "report" / "report.html").read_text()
        assert ("trust_remote_code was ON" in report_md) is trusted
        assert ("trust_remote_code was ON" in report_html) is trusted
    assert lines[False] == [] and len(lines[True]) == 1


# --- report and resume read only experiment folders -------------------------------------------


class _Tripwire:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_report_refuses_a_folder_that_is_not_an_experiment(tmp_path: Path) -> None:
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    marker = tmp_path / "unpickled"
    (elsewhere / "tuner.pkl").write_bytes(pickle.dumps(_Tripwire(marker)))
    (elsewhere / "experiment_state-2026.json").write_text("{}")
    for target in (elsewhere, tmp_path / "missing"):
        with private_ray_tmp() as ray_tmp:
            done = run_cli(["report", str(target)], ray_tmp)
        assert done.returncode == 2, done.output
        assert f"error: {target} is not a qlora-sweep experiment folder (no sweep_spec.yaml)" in done.stderr
        assert "Traceback" not in done.output
    assert not marker.exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["experiment_state-2026.json", "tuner.pkl"], "report wrote into it"


@pytest.mark.integration
def test_report_never_unpickles_what_an_experiment_folder_holds(tmp_path: Path, recorded_sweep: Any) -> None:
    copy = tmp_path / "experiment"
    shutil.copytree(recorded_sweep.path, copy, ignore=shutil.ignore_patterns("report", "checkpoint_*"))
    marker = tmp_path / "unpickled"
    pickles = [*copy.glob("*.pkl"), *copy.glob("trial_*/*.pkl")]
    assert any(p.name == "tuner.pkl" for p in pickles) and any(p.name.startswith("searcher-state") for p in pickles)
    for path in pickles:
        path.write_bytes(pickle.dumps(_Tripwire(marker)))
    with private_ray_tmp() as ray_tmp:
        done = run_cli(["report", str(copy)], ray_tmp)
    assert done.returncode == 0, done.output[-3000:]
    assert not marker.exists(), "the report unpickled a file from the experiment"
    pickle.loads(pickles[0].read_bytes())  # control: the tripwire does fire when unpickled
    assert marker.exists()


def test_the_run_plan_redacts_credentials_in_locations() -> None:
    """run_plan.json names where results and the study live; passwords and keys in them are masked."""
    from sweeps.plan import redact_location, redact_url

    assert redact_location("s3://AKIA:verysecret@bucket/p?endpoint_override=x&secret_key=abc&region=r") == (
        "s3://AKIA:***@bucket/p?endpoint_override=x&secret_key=***&region=r"
    )
    assert redact_location("/tmp/results/exp") == "/tmp/results/exp"
    assert "pw" not in redact_url("postgresql://user:pw@host/db") and redact_url("memory") == "memory"


# --- credentials inside URLs: storage and study --------------------------------------------------


@dataclass
class AuthS3:
    """A moto S3 server in its own process that checks every request's signature."""

    client: Any  # boto3 S3 client signed with the issued key
    endpoint: str  # host:port
    bucket: str
    key_id: str
    secret: str

    def objects(self) -> dict[str, bytes]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {
            o["Key"]: self.client.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])
        }


@contextmanager
def moto_s3_with_auth() -> Iterator[AuthS3]:
    """moto with IAM auth on: after 3 unauthenticated calls (user, key, policy), only the issued key
    and secret work, so a sweep that lost the URL's credentials anywhere (driver, trial workers,
    report) fails instead of passing on an open server."""
    import boto3
    from tests.test_s3_storage import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        boot = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "boot", "aws_secret_access_key": "boot"}
        iam = boto3.client("iam", **boot)
        iam.create_user(UserName="sweeper")
        key = iam.create_access_key(UserName="sweeper")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="sweeper", PolicyName="all", PolicyDocument=json.dumps(policy))
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"],
        )
        client.create_bucket(Bucket="creds-bucket")
        yield AuthS3(client, f"127.0.0.1:{port}", "creds-bucket", key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def secret_forms(secret: str) -> list[bytes]:
    """The secret as bytes, percent-encoded (in a URL) and hex-encoded (Tune stores pickled objects
    in experiment_state-*.json as hex)."""
    from urllib.parse import quote

    forms = {secret.encode(), quote(secret, safe="").encode()}
    return sorted(forms | {f.hex().encode() for f in forms})


def where_secrets_are(planted: dict[str, str], roots: Iterable[Path], objects: dict[str, bytes], console: str) -> dict[str, list[str]]:
    """For each planted secret: the files, bucket objects and console that hold it in any form."""
    found: dict[str, list[str]] = {}
    for name, secret in planted.items():
        hits: set[str] = set()
        for form in secret_forms(secret):
            hits |= {str(p) for p in files_containing(form, roots)}
            hits |= {f"s3:{key}" for key, body in objects.items() if form in body}
            if form.decode() in console:
                hits.add("console")
        if hits:
            found[name] = sorted(hits)
    return found


# Where the sweep writes without credentials in the environment: the URL must carry them.
NO_AWS_ENV: dict[str, str | None] = {
    "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
    "AWS_ENDPOINT_URL": None, "AWS_ENDPOINT_URL_S3": None, "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@dataclass
class CredentialedSweep:
    s3: AuthS3
    work: Path  # everything written locally outside Ray: the cwd, the study, the export
    ray_tmp: Path
    experiment: str  # the experiment URI as the user gives it: keys inside
    clean: str  # the same without them, as qlora-sweep prints it
    planted: dict[str, str]
    runs: dict[str, CliRun]
    objects: dict[str, bytes]


@pytest.fixture(scope="module")
def credentialed_sweep(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[CredentialedSweep]:
    """One sweep on an S3 that checks signatures, its keys only in --storage
    (s3://KEY:SECRET@bucket/prefix?endpoint_override=...; no AWS_* keys in the environment), and a
    password in the study URL; then `export` and `resume` of the experiment URI with the keys in it."""
    from urllib.parse import quote

    root = tmp_path_factory.mktemp("credentials")
    password = f"pw{secrets.token_hex(16)}"
    # The user's own spec holds the password; it is input, not searched. Everything else is.
    given, work = root / "given", root / "work"
    given.mkdir()
    work.mkdir()
    study = work / "study" / "creds.db"
    spec = write_spec(
        given / "creds.yaml",
        make_spec_dict(name="creds", search={"optuna_storage": f"sqlite:///{study}?password={password}"}),
    )
    with moto_s3_with_auth() as s3, private_ray_tmp() as ray_tmp:
        query = f"endpoint_override={s3.endpoint}&scheme=http"
        keys = f"{s3.key_id}:{quote(s3.secret, safe='')}@"
        storage_url = f"s3://{keys}{s3.bucket}/sweeps?{query}"
        runs = {"run": run_cli(["run", str(spec), "--storage", storage_url, "--name", "creds", "--address", "local"],
                               ray_tmp, cwd=work, **NO_AWS_ENV)}
        assert runs["run"].returncode == 0, runs["run"].output[-4000:]
        experiment = f"s3://{keys}{s3.bucket}/sweeps/creds?{query}"
        runs["export"] = run_cli(["export", experiment, "--out", str(work / "export")], ray_tmp, cwd=work, **NO_AWS_ENV)
        # Resume: Tuner.restore through the filesystem that holds the keys (every trial finished: nothing reruns).
        runs["resume"] = run_cli(["resume", experiment, "--address", "local"], ray_tmp, cwd=work, **NO_AWS_ENV)
        clean = f"s3://{s3.bucket}/sweeps/creds?{query}"
        # The printed URI has no keys, and none are in the environment: resume says where keys come from.
        runs["resume without keys"] = run_cli(["resume", clean], ray_tmp, cwd=work, **NO_AWS_ENV)
        yield CredentialedSweep(
            s3, work, ray_tmp, experiment, clean, {"AWS secret key": s3.secret, "study password": password},
            runs, s3.objects(),
        )


@pytest.mark.integration
def test_credentials_in_the_storage_and_study_urls_are_written_nowhere(credentialed_sweep: CredentialedSweep) -> None:
    """Every file written locally (the cwd, the study, the export, Ray's session), every object in the
    bucket and the console of run, export and resume are searched for the secrets, pickles included."""
    sweep = credentialed_sweep
    for name in ("run", "export", "resume"):
        assert sweep.runs[name].returncode == 0, (name, sweep.runs[name].output[-4000:])
    # What the search covers really holds what a leak would land in.
    names = {k.removeprefix("sweeps/creds/") for k in sweep.objects}
    assert {"sweep_spec.yaml", "run_plan.json", "tuner.pkl", "optuna.db", "report/report.html", "report/report.md",
            "report/trials.csv", "report/trials.parquet"} <= names, sorted(names)
    assert any(n.startswith("searcher-state-") for n in names) and any(n.startswith("experiment_state-") for n in names)
    assert any(n.endswith("adapter_model.safetensors") for n in names), "trial workers wrote no checkpoint"
    assert (sweep.work / "export" / "README.md").is_file() and (sweep.work / "study" / "creds.db").is_file()
    assert f"experiment: {sweep.clean}" in sweep.runs["run"].stdout  # printed without the keys
    assert "2 trials, 0 failed" in sweep.runs["resume"].stdout, sweep.runs["resume"].output[-3000:]
    console = "".join(run.output for run in sweep.runs.values())
    found = where_secrets_are(sweep.planted, [sweep.work, sweep.ray_tmp], sweep.objects, console)
    print(f"\n[credentials] {len(sweep.objects)} objects and the local files searched; secrets found in: {found}")
    assert found == {}


@pytest.mark.integration
def test_resume_without_the_keys_says_where_credentials_come_from(credentialed_sweep: CredentialedSweep) -> None:
    done = credentialed_sweep.runs["resume without keys"]
    assert done.returncode == 2, done.output[-3000:]
    assert "Traceback" not in done.output
    assert f"resume: cannot read {credentialed_sweep.clean}" in done.stderr, done.stderr
    assert "AWS_ACCESS_KEY_ID" in done.stderr and "qlora-sweep resume s3://<access key>:<secret key>@bucket/" in done.stderr
    print(f"\n[resume without keys] {' '.join(done.stderr.split())}")


@pytest.mark.integration
def test_a_study_password_is_masked_in_the_saved_spec_and_the_export_readme(
    credentialed_sweep: CredentialedSweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL study URL (no server needed): its password is masked in sweep_spec.yaml (driver's
    `saved_spec`) and in the export README (and export.json), read from the sweep above."""
    import analysis.export
    from analysis.export import export_trial
    from sweeps.driver import Preflight, saved_spec
    from sweeps.spec import parse_spec

    password = f"pg{secrets.token_hex(12)}"
    url = f"postgresql://sweeper:{password}@db.example:5432/studies"
    spec = parse_spec(make_spec_dict(search={"optuna_storage": url}))
    saved = yaml.safe_dump(saved_spec(Preflight(spec, "builtin:tiny-llama", "llama", None), "/tmp/results"))
    assert password not in saved and "postgresql://sweeper:***@db.example:5432/studies" in saved
    # The experiment of the sweep above, local, as if its study had lived in PostgreSQL.
    experiment = tmp_path / "creds"
    for key, body in credentialed_sweep.objects.items():
        if key.endswith("/"):
            continue  # pyarrow's empty folder markers
        target = experiment / key.removeprefix("sweeps/creds/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    raw = yaml.safe_load((experiment / "sweep_spec.yaml").read_text())
    raw["search"]["optuna_storage"] = url
    (experiment / "sweep_spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    export_trial(str(experiment), str(tmp_path / "export"), log=lambda line: None)
    assert url.replace(password, "***") in (tmp_path / "export" / "README.md").read_text()
    assert files_containing(password.encode(), [tmp_path / "export"]) == []
    # Control: without the redaction the same export writes the password into the README.
    monkeypatch.setattr(analysis.export, "redact", lambda text: text)
    export_trial(str(experiment), str(tmp_path / "unredacted"), log=lambda line: None)
    assert [p.name for p in files_containing(password.encode(), [tmp_path / "unredacted"])] == ["README.md"]


def test_the_secret_search_finds_a_planted_credential(tmp_path: Path) -> None:
    """Control: the search above finds a secret in a file, a pickle, Tune's hex encoding, an object
    and the console."""
    import pyarrow.fs as pafs

    secret = "ab+c/" + secrets.token_hex(8)
    fs = pafs.S3FileSystem(access_key="AKIA", secret_key=secret, endpoint_override="127.0.0.1:1", scheme="http")
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps({"storage_filesystem": fs}))
    (tmp_path / "state.json").write_text(json.dumps({"storage": pickle.dumps(fs).hex()}))
    (tmp_path / "clean.txt").write_text("nothing here")
    found = where_secrets_are({"s": secret}, [tmp_path], {"k": b"x" + secret.encode()}, f"s3://A:{secret}@b")
    assert found == {"s": sorted([str(tmp_path / "tuner.pkl"), str(tmp_path / "state.json"), "s3:k", "console"])}


def test_redact_masks_url_passwords_and_secret_options_in_any_text() -> None:
    from core.redact import redact, redact_data

    cases = {
        "s3://AKIA:s3cr%2Bt@bucket/p?endpoint_override=h:9000&scheme=http": "s3://AKIA:***@bucket/p?endpoint_override=h:9000&scheme=http",
        "postgresql+psycopg2://user:pass@host:5432/db": "postgresql+psycopg2://user:***@host:5432/db",
        "sqlite:////tmp/s.db?password=pw&timeout=3": "sqlite:////tmp/s.db?password=***&timeout=3",
        "https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Security-Token=t#x": "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Security-Token=***#x",
        # inside prose, quotes and HTML (& escaped as &amp;)
        "run `qlora-sweep resume 's3://K:S@b/e'` or see <a href=\"mysql://u:p@h/d?x=1&amp;token=t\">":
            "run `qlora-sweep resume 's3://K:***@b/e'` or see <a href=\"mysql://u:***@h/d?x=1&amp;token=***\">",
        # a password with a raw "/" or "+" (AWS secret keys often hold them) is masked whole
        "s3://AKIA:ab/cd+ef/gh@bucket/p?region=x": "s3://AKIA:***@bucket/p?region=x",
        "postgresql://u:pa/ss@h/db": "postgresql://u:***@h/db",
        # nothing to mask: a user without password, a local path with @, an ordinary query,
        # a path with ":" and "@" (its "user" would hold a "/")
        "https://example.com/a:b@c/d": "https://example.com/a:b@c/d",
        "http://127.0.0.1:5000/api/@x/runs": "http://127.0.0.1:5000/api/@x/runs",
        "https://user@github.com/x /tmp/a:b@c/d s3://b/p?region=us-east-1 memory": "https://user@github.com/x /tmp/a:b@c/d s3://b/p?region=us-east-1 memory",
    }
    for text, masked in cases.items():
        assert redact(text) == masked, text
    assert redact_data({"storage": "s3://K:S@b/p", "n": 1, "l": ["postgresql://u:p@h/d"]}) == {
        "storage": "s3://K:***@b/p", "n": 1, "l": ["postgresql://u:***@h/d"]}


def test_s3_keys_of_a_uri_stay_in_memory_and_out_of_every_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs as pafs
    import ray.cloudpickle

    from core import storage

    monkeypatch.setattr(storage, "_CREDENTIALS", {})
    secret = f"ab+c/{secrets.token_hex(8)}"
    uri = f"s3://AKIATEST:{secret.replace('+', '%2B').replace('/', '%2F')}@bkt/p?endpoint_override=127.0.0.1:9&scheme=http"
    assert storage.without_credentials(uri) == "s3://bkt/p?endpoint_override=127.0.0.1:9&scheme=http"
    # A raw "/" in the secret (not percent-encoded) is part of it, not the start of the bucket's path.
    assert storage.without_credentials("s3://AKIATEST:ab/cd@bkt2/p") == "s3://bkt2/p"
    assert storage._CREDENTIALS[("bkt2", "")] == ("AKIATEST", "ab/cd")
    path, fs = storage.for_ray(storage.join(storage.without_credentials(uri), "exp"))
    assert path == "bkt/p/exp" and isinstance(fs, storage.S3FileSystemKeysInMemory)
    assert pafs.S3FileSystem.__reduce__(fs)[1][0]["secret_key"] == secret  # it holds them
    for dumps in (pickle.dumps, ray.cloudpickle.dumps):
        assert secret.encode() not in dumps(fs)
        # In this process (the driver, a trial worker given the keys by the setup hook) it gets them back...
        assert pafs.S3FileSystem.__reduce__(pickle.loads(dumps(fs)))[1][0]["secret_key"] == secret
    # ...elsewhere it falls back to the AWS default chain (environment, profile).
    monkeypatch.setattr(storage, "_CREDENTIALS", {})
    assert pafs.S3FileSystem.__reduce__(pickle.loads(pickle.dumps(fs)))[1][0].get("secret_key") in ("", None)
    assert storage.for_ray("s3://bkt/p") == ("s3://bkt/p", None) and storage.for_ray("/tmp/r") == ("/tmp/r", None)
    # Control: pyarrow's own filesystem from the same URI pickles the secret (what Ray used to get).
    assert secret.encode() in pickle.dumps(pafs.FileSystem.from_uri(uri)[0])


def test_the_study_storage_pickles_without_the_password_of_its_url(tmp_path: Path) -> None:
    import warnings

    import optuna

    from sweeps import searcher

    password = f"pw{secrets.token_hex(8)}"
    url = f"sqlite:///{tmp_path / 's.db'}?password={password}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqlite ignores the option, and SQLAlchemy says so
        study_storage = searcher.open_storage(url)
        assert password.encode() not in pickle.dumps(study_storage)
        assert pickle.loads(pickle.dumps(study_storage)).url == url  # the driver keeps the real URL in memory
        # Control: Optuna's own storage pickles it.
        assert password.encode() in pickle.dumps(optuna.storages.RDBStorage(url))
    # A masked password (a resumed sweep's saved spec) is left out: the database driver's own sources apply.
    assert searcher.unmasked_study_url("postgresql://u:***@h/db") == "postgresql://u@h/db"
