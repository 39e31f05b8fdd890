"""Trial placement on a real multi-node Ray cluster: three raylets on this machine, one declaring GPUs.

`ray.cluster_utils.Cluster` starts a head and two workers as separate Ray nodes on 127.0.0.1, so
every node has the same IP; the trials table tells them apart by Ray node id. The "GPU" worker
declares 2 GPUs it does not have: Ray schedules GPU trials there and sets CUDA_VISIBLE_DEVICES for
them, and the trainable must notice that CUDA is not really there and train on CPU.

Which trials overlapped in time comes from each trial's result.json: it ended at `timestamp`
(whole seconds) after running `time_total_s`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analysis.results import read_trials_csv
from core import storage
from sweeps.spec import parse_spec
from tests.conftest import make_spec_dict, wait_for_no_ray_processes

pytestmark = pytest.mark.integration

# Tune's `timestamp` is truncated to whole seconds, so two back-to-back trials can seem to overlap
# by up to a second; a real overlap of concurrent 20-step trials lasts many seconds.
OVERLAP_SLACK_S = 1.5


@dataclass
class Nodes:
    address: str
    head: str  # node ids
    cpu_worker: str
    gpu_worker: str


@pytest.fixture(scope="module")
def cluster() -> Iterator[Nodes]:
    """Head (1 CPU), a CPU worker (1 CPU) and a fake-GPU worker (1 CPU, 2 GPUs), joined by the driver."""
    import ray
    from ray.cluster_utils import Cluster

    from sweeps.driver import LOOPBACK_ENV, connect_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cpu_worker = cluster.add_node(num_cpus=1)
        gpu_worker = cluster.add_node(num_cpus=1, num_gpus=2)
        cluster.wait_for_nodes()
        # Joining an existing cluster must not touch the loopback switch (it is for clusters we start).
        saved = os.environ.pop(LOOPBACK_ENV)
        try:
            mode, _ = connect_ray(cluster.address)
            assert mode == "joined"
            assert LOOPBACK_ENV not in os.environ
        finally:
            os.environ[LOOPBACK_ENV] = saved
        assert ray.cluster_resources()["CPU"] == 3 and ray.cluster_resources()["GPU"] == 2
        yield Nodes(cluster.address, cluster.head_node.node_id, cpu_worker.node_id, gpu_worker.node_id)
    finally:
        ray.shutdown()
        cluster.shutdown()
    leftover = wait_for_no_ray_processes()
    assert not leftover, f"Ray processes left behind: {leftover}"


def run(nodes: Nodes, tmp_path: Path, name: str, *, trials: int, cpus: float, gpus: float) -> pd.DataFrame:
    """A tiny sweep (20 steps per trial, all trials allowed at once) on the cluster; its trials table."""
    from analysis.results import load_experiment
    from sweeps.driver import run_sweep

    spec = parse_spec(
        make_spec_dict(
            name=name,
            search={"num_samples": trials, "max_concurrent": trials},
            resources={"cpus_per_trial": cpus, "gpus_per_trial": gpus},
        )
    )
    outcome = run_sweep(spec, storage_override=str(tmp_path), name=name, address=nodes.address, log=lambda _: None)
    assert (outcome.num_trials, outcome.num_errors) == (trials, 0)
    frame = load_experiment(outcome.experiment_dir).trials
    assert set(frame["status"]) == {"completed"}, frame[["trial_id", "status", "error"]]
    # trials.csv carries the node id too, for reading placement without Python.
    csv = read_trials_csv(Path(outcome.report_dir) / "trials.csv")
    assert sorted(csv["node_id"]) == sorted(frame["node_id"])
    frame["start"], frame["end"] = zip(*(span(d) for d in frame["trial_dir"]))
    return frame


def span(trial_dir: str) -> tuple[float, float]:
    """(start, end) wall-clock seconds of a trial, from its last result."""
    last = json.loads(storage.read_text(storage.join(trial_dir, "result.json")).splitlines()[-1])
    return last["timestamp"] - last["time_total_s"], float(last["timestamp"])


def max_overlap(frame: pd.DataFrame) -> int:
    """The most trials of `frame` that ran at the same time, ignoring overlaps shorter than the slack."""
    # Shrunk by half the slack at each end, intervals that overlapped by less than the slack are disjoint;
    # the most intervals covering one point is then reached at one of their starts.
    low, high = frame["start"] + OVERLAP_SLACK_S / 2, frame["end"] - OVERLAP_SLACK_S / 2
    return max(int(((low <= t) & (high > t)).sum()) for t in low)


def test_a_gpu_trial_on_a_node_without_cuda_sees_cuda_visible_devices_and_picks_cpu(cluster: Nodes) -> None:
    import ray

    from trainables.qlora import pick_device

    spec = parse_spec(make_spec_dict(resources={"gpus_per_trial": 0.5, "cpus_per_trial": 0.25}))

    @ray.remote(num_gpus=0.5, num_cpus=0.25)
    def probe() -> tuple[str, str | None, bool, str]:
        import torch

        return (ray.get_runtime_context().get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                torch.cuda.is_available(), pick_device(spec.resources.gpus_per_trial))

    node, visible, cuda, device = ray.get(probe.remote(), timeout=120)
    assert node == cluster.gpu_worker
    assert visible in ("0", "1")  # Ray assigned a (declared) GPU ...
    assert (cuda, device) == (False, "cpu")  # ... that torch cannot use, so the trial trains on CPU


def test_whole_gpu_trials_land_only_on_the_gpu_worker_and_train_on_cpu(cluster: Nodes, tmp_path: Path) -> None:
    trials = run(cluster, tmp_path, "whole-gpu", trials=2, cpus=0.5, gpus=1)
    assert set(trials["node_id"]) == {cluster.gpu_worker}
    assert set(trials["device"]) == {"cpu"}
    assert max_overlap(trials) == 2  # two GPUs declared, one per trial: both at once


def test_fractional_gpu_trials_pack_two_per_gpu_on_the_gpu_worker(cluster: Nodes, tmp_path: Path) -> None:
    trials = run(cluster, tmp_path, "half-gpu", trials=3, cpus=0.25, gpus=0.5)
    assert set(trials["node_id"]) == {cluster.gpu_worker}
    assert set(trials["device"]) == {"cpu"}
    # Three trials at once on a node with two GPUs: at least two of them share one GPU.
    assert max_overlap(trials) == 3


def test_a_sweep_uses_every_node_and_never_more_trials_than_cpus(cluster: Nodes, tmp_path: Path) -> None:
    """Measurable outcome: on a 3-node cluster of 1 CPU each, 1-CPU trials run on all three nodes,
    one at a time per node; the fourth trial waits for a free CPU instead of doubling up."""
    trials = run(cluster, tmp_path, "cpu-spread", trials=4, cpus=1, gpus=0)
    assert set(trials["node_id"]) == {cluster.head, cluster.cpu_worker, cluster.gpu_worker}
    assert trials["node"].nunique() == 1  # all 127.0.0.1: only the node id tells them apart
    assert max_overlap(trials) == 3
    for node_id, on_node in trials.groupby("node_id"):
        assert max_overlap(on_node) == 1, f"node {node_id} ran trials side by side on its 1 CPU"


def test_trials_on_nodes_without_aws_settings_write_to_s3(
    cluster: Nodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raylets started without any AWS_* variable; only the driver has the S3 endpoint, keys and
    region, yet the trials on every node upload their checkpoints to the bucket themselves. (Tune ships
    its storage filesystem to the trials with the endpoint the driver resolved; the keys travel as
    environment variables, through Tune's own list and the driver's FORWARDED_ENV.)"""
    monkeypatch.setenv("QLORA_SWEEP_STUDIES", str(tmp_path / "studies"))  # the driver-side Optuna study
    import psutil
    import ray

    from analysis.results import load_experiment
    from sweeps.driver import run_sweep
    from tests.test_s3_storage import BUCKET, keys, moto_s3

    raylets = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"]
    assert raylets and not any("AWS_ENDPOINT_URL" in p.environ() for p in raylets)
    ray.shutdown()  # the driver joins again below, now with the S3 settings in its environment
    with moto_s3() as s3:
        spec = parse_spec(make_spec_dict(name="s3-spread", search={"num_samples": 3, "max_concurrent": 3}))
        uri = f"s3://{BUCKET}/multinode"
        outcome = run_sweep(spec, storage_override=uri, name="s3-spread", address=cluster.address, log=lambda _: None)
        assert (outcome.num_trials, outcome.num_errors) == (3, 0)
        trials = load_experiment(outcome.experiment_dir).trials
        assert set(trials["node_id"]) == {cluster.head, cluster.cpu_worker, cluster.gpu_worker}
        assert set(trials["status"]) == {"completed"}
        stored = keys(s3, "multinode/s3-spread/")
        for trial_id in trials["trial_id"]:
            assert any(k.startswith(f"multinode/s3-spread/trial_{trial_id}/checkpoint_") for k in stored), trial_id
        assert "multinode/s3-spread/report/trials.csv" in stored
