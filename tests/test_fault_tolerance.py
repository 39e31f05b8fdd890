"""A worker node dies mid-trial: with train.max_failures the trial continues from its checkpoint
on another node; with max_failures 0 (the control) it fails.

A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head with no CPUs for
trials and two 1-CPU workers), a real 2-trial sweep, and a real node death: the node's raylet and
every process under it are killed without a graceful shutdown. The retry then runs on the
surviving worker once it is free.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from analysis.results import read_trials_csv
from sweeps.spec import parse_spec
from tests.conftest import make_spec_dict, ray_pids, wait_for_no_ray_processes

pytestmark = pytest.mark.integration

MAX_STEPS = 40


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # being written
    return rows


@dataclass
class NodeDeath:
    """What the node killer saw and did."""

    trial_id: str | None = None
    node_id: str | None = None
    seen_step: int | None = None
    killed_at: float | None = None
    leftover_processes: list[str] = field(default_factory=list)
    error: BaseException | None = None


def kill_a_worker_mid_trial(
    cluster: Any, workers: list[Any], experiment: Path, death: NodeDeath, stop: threading.Event
) -> None:
    """Wait for a trial on a worker to report a checkpoint, then kill that worker node hard."""
    from ray._private import ray_constants

    try:
        by_id = {node.node_id: node for node in workers}
        while not stop.is_set():
            for result in experiment.glob("trial_*/result.json"):
                rows = read_rows(result)
                last = rows[-1] if rows else {}
                node = by_id.get(last.get("node_id"))
                if node is None or not last.get("checkpoint_dir_name") or last.get("step", MAX_STEPS) >= MAX_STEPS:
                    continue
                raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
                tree = psutil.Process(raylet).children(recursive=True)
                death.trial_id = result.parent.name.removeprefix("trial_")
                death.node_id = node.node_id
                death.seen_step = last["step"]
                cluster.remove_node(node, allow_graceful=False)
                death.killed_at = time.time()
                # remove_node kills the raylet and its own helpers; the trial's worker process
                # must die with it, or it would keep training as a ghost.
                _, alive = psutil.wait_procs(tree, timeout=10)
                alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
                death.leftover_processes = [f"{p.pid} {p.name()}" for p in alive]
                for p in alive:
                    p.kill()
                # No replacement node (Cluster.add_node needs the main thread): the retry waits
                # for the surviving worker, as it would on a cluster that cannot scale up.
                return
            time.sleep(0.05)
    except BaseException as exc:  # reported by the test, not lost in the thread
        death.error = exc


def sweep_with_a_node_death(tmp_path: Path, max_failures: int) -> tuple[Any, NodeDeath, Path]:
    import ray
    from ray.cluster_utils import Cluster

    from sweeps.driver import run_sweep

    spec = parse_spec(
        make_spec_dict(
            search={"num_samples": 2, "max_concurrent": 2},
            # 8 micro-batches per step: a round of 10 steps (~2 s here) must outlast noticing its
            # checkpoint and killing the node, or the trial could finish before its node dies.
            train={
                "max_steps": MAX_STEPS, "eval_every": 10, "batch_size": 8, "grad_accum": 8, "max_failures": max_failures
            },
        )
    )
    name = f"node-death-{max_failures}"
    experiment = tmp_path / "results" / name
    already_running = ray_pids()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    death, stop = NodeDeath(), threading.Event()
    try:
        workers = [cluster.add_node(num_cpus=1, include_dashboard=False) for _ in range(2)]
        cluster.wait_for_nodes()
        killer = threading.Thread(
            target=kill_a_worker_mid_trial, args=(cluster, workers, experiment, death, stop), daemon=True
        )
        killer.start()
        outcome = run_sweep(spec, storage_override=str(tmp_path / "results"), name=name, address=cluster.address)
        stop.set()
        killer.join(timeout=60)
    finally:
        stop.set()
        ray.shutdown()
        cluster.shutdown()
    leftover = wait_for_no_ray_processes(ignore=already_running)
    assert not leftover, f"Ray processes left behind: {leftover}"
    if death.error is not None:
        raise death.error
    assert death.trial_id is not None, "no trial reported a checkpoint on a worker before the sweep ended"
    return outcome, death, experiment


def num_failures(experiment: Path) -> dict[str, int]:
    """trial_id -> how often Tune saw it fail, from the JSON experiment state."""
    (state_file,) = sorted(experiment.glob("experiment_state-*.json"))[-1:]
    state = json.loads(state_file.read_text())
    return {json.loads(t)["trial_id"]: json.loads(r).get("num_failures", 0) for t, r in state["trial_data"]}


def test_trial_on_a_dead_node_continues_from_its_checkpoint(tmp_path: Path) -> None:
    from analysis.results import load_experiment

    outcome, death, experiment = sweep_with_a_node_death(tmp_path, max_failures=2)
    assert death.leftover_processes == [], f"processes of the dead node kept running: {death.leftover_processes}"
    assert outcome.num_trials == 2 and outcome.num_errors == 0
    trials = load_experiment(str(experiment)).trials
    assert set(trials["status"]) == {"completed"}, trials[["trial_id", "status", "error"]]

    rows = read_rows(experiment / f"trial_{death.trial_id}" / "result.json")
    steps = [r["step"] for r in rows]
    # Every round once, in order: the retry went on from the checkpoint, it did not start over.
    assert steps == list(range(10, MAX_STEPS + 1, 10)), steps
    before = [r for r in rows if r["node_id"] == death.node_id]
    after = rows[len(before):]
    assert before and after, "the trial was not cut short by the node death"
    assert all(r["node_id"] != death.node_id for r in after)  # it went on on the other node
    assert after[0]["step"] == before[-1]["step"] + 10  # from the checkpoint of its last round
    assert after[0]["iterations_since_restore"] == 1  # a restore happened here
    assert num_failures(experiment)[death.trial_id] == 1
    print(
        f"node killed on seeing step {death.seen_step}, after step {before[-1]['step']} of trial {death.trial_id}; "
        f"it continued at step "
        f"{after[0]['step']} on the other node about {after[0]['timestamp'] - death.killed_at:.0f} s later"
    )


def test_without_retries_the_trial_on_a_dead_node_fails(tmp_path: Path) -> None:
    import pandas as pd

    outcome, death, experiment = sweep_with_a_node_death(tmp_path, max_failures=0)
    assert outcome.num_errors >= 1
    table = read_trials_csv(experiment / "report" / "trials.csv")
    status = dict(zip(table["trial_id"], table["status"], strict=True))
    assert status[death.trial_id] == "failed"
    assert (experiment / f"trial_{death.trial_id}" / "error.txt").exists()
    rows = read_rows(experiment / f"trial_{death.trial_id}" / "result.json")
    assert rows and all(r["node_id"] == death.node_id for r in rows)  # it never came back
    assert rows[-1]["step"] < MAX_STEPS
