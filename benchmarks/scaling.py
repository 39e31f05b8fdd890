"""Scaling: trials per hour with 1, 2 and 3 concurrent trials, and the efficiency against linear.

Run from the repository root, holding the machine-wide lock so nothing else competes for the CPU:

    flock /tmp/qlora-heavy.lock .venv/bin/python benchmarks/scaling.py --repeats 3 --out /tmp/scaling.json

Every configuration runs the same K trials (default 12) of one fixed config (the tiny Llama, NF4,
r=8 on q,v, 80 steps with an evaluation and a checkpoint every 10: a full smoke-sweep trial, no
early stopping) through `sweeps.driver.run_sweep`, 1 CPU per trial:

* local c=1:   a local Ray (started by run_sweep, all cores), max_concurrent 1.
* local c=2:   the same, max_concurrent 2 (this machine has 2 cores: one trial per core).
* cluster c=3: a `ray.cluster_utils.Cluster` of three Ray nodes on this machine (head + 2 workers,
               1 CPU each), started before the sweep, which joins it; max_concurrent 3. Three trials
               on two cores oversubscribe the CPU: this measures Ray's multi-node path, not more compute.

Throughput is trials per hour in steady state, K / (last trial end - first trial start), from the
timestamps the trials report; end to end, K / run_sweep's wall time, is given too (it includes
starting the local Ray for the local runs, but not the cluster's start-up, which is timed apart).
Efficiency = throughput_n / (n x throughput_1), per repetition, then the median.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import _common

CONFIGS = ("local_c1", "local_c2", "cluster_c3")


def scaling_spec(name: str, trials: int, concurrent: int, steps: int) -> Any:
    from sweeps.spec import parse_spec

    return parse_spec(
        _common.spec_dict(
            name=name,
            search={"num_samples": trials, "max_concurrent": concurrent},
            train={"max_steps": steps, "eval_every": min(10, steps)},
        )
    )


def run_local(concurrent: int, trials: int, steps: int, storage: str) -> dict[str, Any]:
    from sweeps.driver import run_sweep

    spec = scaling_spec(f"scaling-local-c{concurrent}", trials, concurrent, steps)
    start = time.time()
    outcome = run_sweep(spec, storage_override=storage, name=spec.name, address="local", log=lambda _: None)
    return _collect(outcome, time.time() - start, None)


def run_cluster(nodes: int, trials: int, steps: int, storage: str) -> dict[str, Any]:
    """A head and nodes - 1 workers, 1 CPU each, all on this machine; the sweep joins it."""
    import ray
    from ray.cluster_utils import Cluster

    from sweeps.driver import LOOPBACK_ENV, run_sweep

    spec = scaling_spec(f"scaling-cluster-c{nodes}", trials, nodes, steps)
    up = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cluster_start_s = time.time() - up
        # The nodes above were started with the loopback switch on; joining leaves it alone (as a
        # sweep joining someone else's cluster would).
        saved = os.environ.pop(LOOPBACK_ENV, None)
        try:
            start = time.time()
            outcome = run_sweep(spec, storage_override=storage, name=spec.name, address=cluster.address, log=lambda _: None)
            wall = time.time() - start
        finally:
            if saved is not None:
                os.environ[LOOPBACK_ENV] = saved
        return _collect(outcome, wall, cluster_start_s)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _collect(outcome: Any, wall: float, cluster_start_s: float | None) -> dict[str, Any]:
    from analysis.results import load_experiment

    frame = load_experiment(outcome.experiment_dir).trials
    statuses = sorted(frame["status"].astype(str))
    if outcome.num_errors or set(statuses) != {"completed"}:
        raise RuntimeError(f"not every trial completed: {statuses}, {outcome.num_errors} errors")
    starts, ends = frame["started_at"].astype(float), frame["ended_at"].astype(float)
    trials = len(frame)
    span = float(ends.max() - starts.min())
    return {
        "trials": trials,
        "wall_s": wall,
        "span_s": span,
        "trials_per_hour": trials / span * 3600,
        "trials_per_hour_end_to_end": trials / wall * 3600,
        "trial_s": _common.stats(list(ends - starts))["median"],
        "nodes_used": int(frame["node_id"].nunique()),
        "cluster_start_s": cluster_start_s,
    }


def main() -> int:
    p = _common.parser(__doc__.split("\n\n")[0], repeats=3)
    p.add_argument("--trials", type=int, default=12, help="trials per run, K (default 12: divisible by 1, 2 and 3)")
    p.add_argument("--steps", type=int, default=80, help="training steps per trial (default 80)")
    args = p.parse_args()
    configs = CONFIGS
    if args.quick:
        # local_c2 runs the same code as local_c1; the quick run skips it.
        args.trials, args.steps, args.repeats, configs = 2, 10, 1, ("local_c1", "cluster_c3")

    _common.warm_model_cache()
    before = set(_common.ray_processes())
    storage = tempfile.mkdtemp(prefix="bench-scaling-")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    try:
        for repeat in range(args.repeats):
            order = configs if repeat % 2 == 0 else tuple(reversed(configs))
            for name in order:
                where = os.path.join(storage, f"r{repeat}")
                # The live view goes to stderr: stdout is for the tables.
                with contextlib.redirect_stdout(sys.stderr):
                    if name == "cluster_c3":
                        result = run_cluster(3, args.trials, args.steps, where)
                    else:
                        result = run_local(int(name[-1]), args.trials, args.steps, where)
                left = _common.wait_for_ray_to_exit(before)
                if left:
                    raise RuntimeError(f"Ray processes left behind by {name}: {left}")
                runs[name].append(result)
                print(f"[repeat {repeat + 1}/{args.repeats}] {name}: {result['trials_per_hour']:.0f} trials/h "
                      f"(span {result['span_s']:.1f} s, wall {result['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    summary = summarize(runs)
    print(render(summary, args, _common.machine()))
    _common.write_json(args.out, {"trials": args.trials, "steps": args.steps, "repeats": args.repeats,
                                  "summary": summary, "runs": runs})
    return 0


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    keys = ("trials_per_hour", "trials_per_hour_end_to_end", "span_s", "wall_s", "trial_s", "nodes_used", "cluster_start_s")
    summary: dict[str, Any] = {name: {k: _common.stats([r[k] for r in rs]) for k in keys} for name, rs in runs.items()}
    base = runs["local_c1"]
    for name in runs:
        n = {"local_c1": 1, "local_c2": 2, "cluster_c3": 3}[name]
        pairs = list(zip(runs[name], base))
        summary[name]["workers"] = n
        summary[name]["efficiency"] = _common.stats([r["trials_per_hour"] / (n * b["trials_per_hour"]) for r, b in pairs])
        summary[name]["efficiency_end_to_end"] = _common.stats(
            [r["trials_per_hour_end_to_end"] / (n * b["trials_per_hour_end_to_end"]) for r, b in pairs]
        )
    return summary


def render(summary: dict[str, Any], args: Any, info: dict[str, Any]) -> str:
    s = _common.spread
    lines = [
        f"## Scaling: {args.trials} trials x {args.steps} steps per configuration, median of {args.repeats} runs",
        "",
        f"Machine: {_common.describe_machine(info)}",
        "",
    ]
    rows = []
    for name in (n for n in CONFIGS if n in summary):
        v = summary[name]
        rows.append([name, v["workers"], s(v["trials_per_hour"], 0), s(v["efficiency"], 3), s(v["trials_per_hour_end_to_end"], 0),
                     s(v["efficiency_end_to_end"], 3), s(v["trial_s"]), s(v["nodes_used"], 0),
                     s(v["cluster_start_s"], 1) if v["cluster_start_s"]["n"] else "—"])
    lines.append(_common.table(
        ["configuration", "concurrent trials", "trials/h (steady state)", "efficiency vs linear",
         "trials/h (end to end)", "efficiency, end to end", "one trial (s)", "Ray nodes used", "cluster start (s)"], rows))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
