"""Experiments on S3: a real sweep writes to a local S3 server (moto) and the report reads it back.

The endpoint reaches pyarrow (Tune's and our storage layer), boto3 and every trial worker through
the standard AWS_ENDPOINT_URL environment variable; the storage URI stays a plain s3://bucket/prefix.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core import storage
from tests.conftest import free_port, make_spec_dict, wait_for_no_ray_processes, write_spec

BUCKET = "qlora-sweep-test"
QLORA_SWEEP = str(Path(sys.executable).with_name("qlora-sweep"))



@dataclass
class S3:
    client: Any  # boto3 S3 client for the test server
    secret: str  # AWS_SECRET_ACCESS_KEY of this run


@contextmanager
def moto_s3() -> Iterator[S3]:
    """A moto S3 server on 127.0.0.1 with one bucket; AWS_* env pointed at it; a boto3 client.

    The secret key is unique per run, so a test can prove it never lands in the results.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": f"secret-{uuid.uuid4().hex}",
        "AWS_DEFAULT_REGION": "us-east-1",
        # No real AWS: no instance metadata lookups, no ~/.aws files of whoever runs the tests.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield S3(client, env["AWS_SECRET_ACCESS_KEY"])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with moto_s3() as server:
        yield server


def keys(s3: S3, prefix: str) -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_join_keeps_a_uri_query_at_the_end() -> None:
    uri = "s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "exp", "trial_1") == "s3://b/p/exp/trial_1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("s3://b/p/", "exp") == "s3://b/p/exp"


def test_the_s3_endpoint_and_region_are_forwarded_to_trial_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeps.driver import FORWARDED_ENV, _forwarded_env

    settings = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9001",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SOMETHING_ELSE", "x")
    forwarded = _forwarded_env()
    assert {name: forwarded.get(name) for name in settings} == settings
    assert "AWS_SOMETHING_ELSE" not in forwarded  # a fixed list, not the whole environment
    # Keys reach the workers too (how is the driver's business: not as plain runtime_env values).
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} <= set(FORWARDED_ENV)


def test_storage_helpers_round_trip_on_s3(s3: S3) -> None:
    base = f"s3://{BUCKET}/helpers"
    assert storage.check_writable(base) is None
    storage.write_text(storage.join(base, "exp", "a.txt"), "hello")
    assert storage.read_text(storage.join(base, "exp", "a.txt")) == "hello"
    assert storage.exists(storage.join(base, "exp", "a.txt"))
    assert storage.list_dirs(base) == ["exp"] and storage.list_files(storage.join(base, "exp")) == ["a.txt"]
    # The write probe left nothing behind (pyarrow also writes empty "folder/" marker objects).
    assert [k for k in keys(s3, "helpers/") if not k.endswith("/")] == ["helpers/exp/a.txt"]


def test_the_endpoint_can_also_ride_in_the_uri_query(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the query says where S3 is
    base = f"s3://{BUCKET}/query?endpoint_override={endpoint.removeprefix('http://')}&scheme=http"
    assert storage.check_writable(base) is None
    storage.write_text(storage.join(base, "exp", "b.txt"), "hi")
    assert storage.read_text(storage.join(base, "exp", "b.txt")) == "hi"
    assert storage.list_files(storage.join(base, "exp")) == ["b.txt"]
    assert "query/exp/b.txt" in keys(s3, "query/")


def test_a_missing_bucket_is_a_preflight_error_naming_the_bucket(
    s3: S3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sweeps.cli import main

    spec = write_spec(tmp_path / "s3.yaml", make_spec_dict(storage="s3://no-such-bucket-here/sweeps"))
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "storage: bucket 'no-such-bucket-here' of s3://no-such-bucket-here/sweeps does not exist" in err
    assert "aws s3 mb s3://no-such-bucket-here" in err
    assert os.environ["AWS_ENDPOINT_URL"] in err  # says which S3 it asked
    assert "Traceback" not in err
    assert [b["Name"] for b in s3.client.list_buckets()["Buckets"]] == [BUCKET]  # none created on the way


@pytest.mark.integration
def test_a_sweep_writes_to_s3_and_the_report_reads_it_back(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from analysis.results import load_experiment

    # A cloud experiment keeps its Optuna study on the driver; here, not in the home folder.
    monkeypatch.setenv("QLORA_SWEEP_STUDIES", str(tmp_path / "studies"))
    spec = write_spec(tmp_path / "tiny.yaml", make_spec_dict())
    storage_uri, name = f"s3://{BUCKET}/sweeps", "tiny-s3"
    run = subprocess.run(
        [QLORA_SWEEP, "run", str(spec), "--storage", storage_uri, "--name", name, "--address", "local"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"experiment: {storage_uri}/{name}" in run.stdout
    assert not wait_for_no_ray_processes(), "the local cluster of the run was left behind"

    stored = keys(s3, f"sweeps/{name}/")
    relative = [k.removeprefix(f"sweeps/{name}/") for k in stored]
    assert "sweep_spec.yaml" in relative
    assert any(k.startswith("experiment_state-") and k.endswith(".json") for k in relative)
    trials = sorted({k.split("/")[0] for k in relative if k.startswith("trial_")})
    assert len(trials) == 2, relative
    for trial in trials:
        for name_in_trial in ("params.json", "result.json"):
            assert f"{trial}/{name_in_trial}" in relative
        # The Hugging Face Trainer layout, uploaded by the trial worker itself.
        assert any(k.startswith(f"{trial}/checkpoint_") and k.endswith("adapter_model.safetensors") for k in relative)
    assert not list(tmp_path.glob("**/trial_*")), "nothing of the experiment should land on local disk"
    secret = s3.secret.encode()
    for key in stored:
        assert secret not in s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), f"the secret key leaked into {key}"

    # Rewrite the report from the bucket alone, as someone without the local run would.
    s3.client.delete_object(Bucket=BUCKET, Key=f"sweeps/{name}/report/trials.csv")
    report = subprocess.run(
        [QLORA_SWEEP, "report", f"{storage_uri}/{name}"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert report.returncode == 0, report.stderr
    body = s3.client.get_object(Bucket=BUCKET, Key=f"sweeps/{name}/report/trials.csv")["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 2
    assert {row["status"] for row in rows} == {"completed"}
    assert all(row["node_id"] for row in rows)

    exp = load_experiment(f"{storage_uri}/{name}")
    assert sorted(exp.trials["trial_id"]) == sorted(t.removeprefix("trial_") for t in trials)
    assert list(exp.trials["status"]) == ["completed", "completed"]
    assert (exp.trials["steps"] == 20).all() and exp.trials["best_eval_loss"].notna().all()
    assert len(exp.curves) == 4  # 2 trials x 2 evaluations
    assert exp.spec["storage"] == storage_uri
