"""Orchestration overhead: K trials through the full sweep driver vs the same K trainings in a plain loop.

Run from the repository root, holding the machine-wide lock so nothing else competes for the CPU:

    flock /tmp/qlora-heavy.lock .venv/bin/python benchmarks/orchestration_overhead.py --repeats 5 \
        --out /tmp/orchestration_overhead.json

Each repetition runs three fresh Python processes, interleaved, and times each from spawn to exit:

* plain:      K x `trainables.qlora.run_trial` back to back, no-op report, data prepared once.
* driver c=1: `sweeps.driver.run_sweep` with K trials, max_concurrent 1 (a local Ray is started and
              stopped, results and checkpoints are written, the report is rendered).
* driver c=2: the same with max_concurrent 2 (2 CPU cores here: two trials at once).

Every trial has the same fixed config (the tiny Llama, NF4, r=8 on q,v, 20 steps, one evaluation
and one checkpoint every 10 steps), so the two sides do identical training. The difference in wall
time is what the driver costs. It is split with timestamps the trials report (`started_at`,
`elapsed_s`) and the driver's log lines into start-up (process start to the first trial),
per-trial time inside the trainable (Tune reporting and checkpoint persistence), gaps between
trials (scheduling), and teardown (last trial to process exit, including the report). The model
load and quantization that both sides pay every trial is timed separately, in a fresh process per
repetition (the first load, which pays lazy imports, is dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

SCRIPT = Path(__file__).resolve()
TARGET_S_PER_TRIAL = 1.0  # issue 7: at most 1 s of orchestration per trial, model load excluded
RAY_RATIO_LIMIT = 1.2  # Ray's Tune scalability tests: flag more than 20% over the theoretical minimum


# --- the child processes -----------------------------------------------------------------------


def _trial_spec(trials: int, concurrent: int, steps: int) -> Any:
    from sweeps.spec import parse_spec

    return parse_spec(
        _common.spec_dict(
            name="overhead",
            search={"num_samples": trials, "max_concurrent": concurrent},
            train={"max_steps": steps, "eval_every": min(10, steps)},
        )
    )


def run_plain(trials: int, steps: int, spawned_at: float) -> dict[str, Any]:
    """K trainings back to back in this process, with the data prepared once (as the driver does)."""
    main_at = time.time()
    from sweeps.plan import trial_job
    from trainables.data import prepare_data
    from trainables.qlora import run_trial
    from trainables.training_setup import load_tokenizer

    spec = _trial_spec(trials, 1, steps)
    model_path = _common.warm_model_cache()
    imported_at = time.time()
    data = prepare_data(str(_common.SMOKE_DATA), spec.data, load_tokenizer(model_path, spec.model))
    job = trial_job(spec)
    spans = []
    for _ in range(trials):
        last = run_trial(dict(_common.TINY_TRIAL), job, report=lambda metrics, checkpoint_dir=None: None, data=data)
        # The trial's own clock, exactly as a Tune trial reports it (started_at is taken inside run_trial).
        spans.append((float(last["started_at"]), float(last["started_at"]) + float(last["elapsed_s"]), float(last["train_s"])))
    return {"spawned_at": spawned_at, "main_at": main_at, "imported_at": imported_at, "spans": spans}


def run_loads(loads: int) -> dict[str, Any]:
    """`loads` + 1 model loads in a fresh process; the first (which pays lazy imports) is dropped."""
    from sweeps.spec import parse_spec

    spec = parse_spec(_common.spec_dict())
    model_path = _common.warm_model_cache()
    times = [_time_model_load(spec, model_path) for _ in range(loads + 1)]
    return {"first_s": times[0], "warm_s": times[1:]}


def _time_model_load(spec: Any, model_path: str) -> float:
    """One model load as a trial does it: 4-bit NF4 load + prepare_model_for_kbit_training + CPU fix."""
    import torch

    from trainables.memory_probe import free_memory
    from trainables.training_setup import TrainingSetup

    torch.set_num_threads(1)  # as in a trial (cpus_per_trial 1)
    setup = TrainingSetup.resolve(spec.model, spec.train, "cpu")
    start = time.time()
    model = setup.load_model(model_path, spec.model)
    took = time.time() - start
    del model
    free_memory("cpu")
    return took


def run_driver(trials: int, concurrent: int, steps: int, spawned_at: float, storage: str) -> dict[str, Any]:
    """K trials through run_sweep on a fresh local Ray; the parent reads the experiment afterwards."""
    main_at = time.time()
    from sweeps.driver import run_sweep

    spec = _trial_spec(trials, concurrent, steps)
    _common.warm_model_cache()
    imported_at = time.time()
    logs: list[tuple[float, str]] = []
    outcome = run_sweep(
        spec, storage_override=storage, name="overhead", address="local", log=lambda line: logs.append((time.time(), line))
    )
    return {
        "spawned_at": spawned_at,
        "main_at": main_at,
        "imported_at": imported_at,
        "returned_at": time.time(),
        "logs": logs,
        "experiment_dir": outcome.experiment_dir,
        "errors": outcome.num_errors,
    }


def read_driver_experiment(raw: dict[str, Any]) -> None:
    """Add the trials' spans (from their last results) and a re-timed report to a driver run's record."""
    from analysis.report import write_report
    from analysis.results import load_experiment

    frame = load_experiment(raw["experiment_dir"]).trials
    spans = []
    for trial_dir in frame["trial_dir"]:
        last = _last_result(trial_dir)
        start = float(last["started_at"])
        spans.append((start, start + float(last["elapsed_s"]), float(last["train_s"])))
    raw["spans"] = sorted(spans)
    raw["statuses"] = sorted(frame["status"].astype(str))
    started = time.time()
    write_report(raw["experiment_dir"], out_dir=raw["experiment_dir"] + "-report-again")
    raw["report_s"] = time.time() - started


def _last_result(trial_dir: str) -> dict[str, Any]:
    lines = [line for line in Path(trial_dir, "result.json").read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])


# --- the parent: spawn, time, decompose ----------------------------------------------------------


def spawn(side: str, trials: int, steps: int, concurrent: int, storage: str | None = None, loads: int = 5) -> dict[str, Any]:
    """Run one side in a fresh interpreter; returns its timestamps plus the wall time seen from here."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, str(SCRIPT), "--side", side, "--trials", str(trials), "--steps", str(steps),
           "--concurrent", str(concurrent), "--loads", str(loads), "--result", result_path]
    if storage:
        cmd += ["--storage", storage]
    spawned = time.time()
    proc = subprocess.run([*cmd, "--spawned-at", repr(spawned)], capture_output=True, text=True)
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{side} (c={concurrent}) failed with status {proc.returncode}:\n{proc.stderr[-4000:]}")
    with open(result_path) as f:
        out = json.load(f)
    os.unlink(result_path)
    out["exited_at"] = exited
    out["wall_s"] = exited - spawned
    return out


def decompose(run: dict[str, Any]) -> dict[str, float]:
    """Phases of one run, in seconds, from its timestamps."""
    spans = sorted(run["spans"])
    first_start, last_end = spans[0][0], max(end for _, end, _ in spans)
    in_trial = sum(end - start for start, end, _ in spans)
    out = {
        "wall_s": run["wall_s"],
        "interpreter_and_imports_s": run["imported_at"] - run["spawned_at"],
        "startup_s": first_start - run["spawned_at"],
        "in_trial_s": in_trial,
        "train_s": sum(t for _, _, t in spans),
        "trials_span_s": last_end - first_start,
        "teardown_s": run["exited_at"] - last_end,
    }
    # Gaps between one trial's end and the next one's start (only meaningful one at a time).
    out["gaps_s"] = sum(max(0.0, spans[i + 1][0] - spans[i][1]) for i in range(len(spans) - 1))
    out["outside_training_per_trial_s"] = (in_trial - out["train_s"]) / len(spans)
    if "returned_at" in run:
        out["after_return_s"] = run["exited_at"] - run["returned_at"]
        out["report_s"] = run["report_s"]
        ray_up = next((t for t, line in run["logs"] if "Ray cluster" in line), None)
        checking = next((t for t, line in run["logs"] if "checking spec" in line), None)
        if ray_up is not None and checking is not None:
            out["preflight_and_ray_init_s"] = ray_up - checking
            out["ray_up_to_first_trial_s"] = first_start - ray_up
    return out


def main() -> int:
    p = _common.parser(__doc__.split("\n\n")[0], repeats=5)
    p.add_argument("--trials", type=int, default=8, help="trials per run, K (default 8)")
    p.add_argument("--steps", type=int, default=20, help="training steps per trial (default 20)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="driver max_concurrent values (default 1 2)")
    # The child processes' options.
    p.add_argument("--side", choices=["plain", "driver", "load"], help=argparse.SUPPRESS)
    p.add_argument("--concurrent", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--loads", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.side:
        if args.side == "plain":
            out = run_plain(args.trials, args.steps, args.spawned_at)
        elif args.side == "load":
            out = run_loads(args.loads)
        else:
            out = run_driver(args.trials, args.concurrent, args.steps, args.spawned_at, args.storage)
        with open(args.result, "w") as f:
            json.dump(out, f)
        return 0

    loads_per_repeat = 5
    if args.quick:
        args.trials, args.steps, args.repeats, args.concurrency, loads_per_repeat = 1, 10, 1, [1], 0
    _common.warm_model_cache()
    before = set(_common.ray_processes())
    runs: dict[str, list[dict[str, float]]] = {"plain": [], **{f"driver_c{c}": [] for c in args.concurrency}}
    loads: list[float] = []
    storage = tempfile.mkdtemp(prefix="bench-overhead-")
    try:
        for repeat in range(args.repeats):
            # Interleaved, so a slow phase of the machine hits every side alike.
            order = ["plain", *[f"driver_c{c}" for c in args.concurrency]]
            for name in order if repeat % 2 == 0 else reversed(order):
                if name == "plain":
                    raw = spawn("plain", args.trials, args.steps, 1)
                else:
                    c = int(name.removeprefix("driver_c"))
                    raw = spawn("driver", args.trials, args.steps, c, storage=os.path.join(storage, f"{name}-{repeat}"))
                    left = _common.wait_for_ray_to_exit(before)
                    if left:
                        raise RuntimeError(f"Ray processes left behind by {name}: {left}")
                    read_driver_experiment(raw)
                    if raw["errors"] or any(s != "completed" for s in raw["statuses"]):
                        raise RuntimeError(f"{name}: not every trial completed: {raw['statuses']}, {raw['errors']} errors")
                phases = decompose(raw)
                runs[name].append(phases)
                print(f"[repeat {repeat + 1}/{args.repeats}] {name}: wall {phases['wall_s']:.2f} s", file=sys.stderr, flush=True)
            if loads_per_repeat:
                loads += spawn("load", 0, args.steps, 1, loads=loads_per_repeat)["warm_s"]
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    summary = summarize(runs, args.trials)
    summary["model_load_s"] = _common.stats(loads)
    print(render(summary, args, _common.machine()))
    _common.write_json(args.out, {"trials": args.trials, "steps": args.steps, "repeats": args.repeats,
                                  "summary": summary, "runs": runs})
    return 0


def summarize(runs: dict[str, list[dict[str, float]]], k: int) -> dict[str, Any]:
    """Medians of every phase, and the overhead figures (medians of per-repetition differences)."""
    keys = sorted({key for rs in runs.values() for r in rs for key in r})
    med = {name: {key: _common.stats([r.get(key) for r in rs]) for key in keys} for name, rs in runs.items()}
    plain = runs["plain"]
    summary: dict[str, Any] = {"phases": med, "overhead": {}}
    for name, rs in runs.items():
        if name == "plain":
            continue
        c = int(name.removeprefix("driver_c"))
        # Pair repetition i of the driver with repetition i of the plain loop (they ran side by side).
        pairs = list(zip(rs, plain))
        total = [d["wall_s"] - p["wall_s"] for d, p in pairs]
        startup = [d["startup_s"] - p["startup_s"] for d, p in pairs]
        teardown = [d["teardown_s"] - p["teardown_s"] for d, p in pairs]
        in_trial = [d["in_trial_s"] - p["in_trial_s"] for d, p in pairs]
        gaps = [d["gaps_s"] - p["gaps_s"] for d, p in pairs]
        # The theoretical minimum: the plain loop's own start-up and teardown, and its training time
        # spread over c workers (the trials themselves are identical).
        minimum = [p["startup_s"] + p["trials_span_s"] / c + p["teardown_s"] for p in plain]
        ratio = [d["wall_s"] / m for d, m in zip(rs, minimum)]
        entry = {
            "concurrency": c,
            "total_s": _common.stats(total),
            "total_per_trial_s": _common.stats([t / k for t in total]),
            "startup_s": _common.stats(startup),
            "teardown_s": _common.stats(teardown),
            "startup_teardown_per_trial_s": _common.stats([(s + t) / k for s, t in zip(startup, teardown)]),
            "theoretical_minimum_s": _common.stats(minimum),
            "ratio_to_minimum": _common.stats(ratio),
        }
        if c == 1:
            entry["in_trial_per_trial_s"] = _common.stats([x / k for x in in_trial])
            entry["gaps_per_trial_s"] = _common.stats([g / (k - 1) for g in gaps] if k > 1 else [0.0])
            entry["scheduling_reporting_per_trial_s"] = _common.stats([(x + g) / k for x, g in zip(in_trial, gaps)])
        summary["overhead"][name] = entry
    summary["plain_per_trial_s"] = _common.stats([r["in_trial_s"] / k for r in plain])
    return summary


def render(summary: dict[str, Any], args: Any, info: dict[str, Any]) -> str:
    ph, s = summary["phases"], _common.spread
    lines = [
        f"## Orchestration overhead: {args.trials} trials x {args.steps} steps, median of {args.repeats} runs",
        "",
        f"Machine: {_common.describe_machine(info)}",
        "",
        "Phases (seconds; median, min–max over repetitions):",
        "",
    ]
    rows = []
    labels = [
        ("wall_s", "wall time, spawn to exit"),
        ("interpreter_and_imports_s", "interpreter + imports"),
        ("startup_s", "start-up: spawn to first trial start"),
        ("preflight_and_ray_init_s", "  of which preflight + Ray start"),
        ("ray_up_to_first_trial_s", "  of which Tune setup + worker start"),
        ("in_trial_s", "inside the trainable, all trials"),
        ("train_s", "  of which training steps (trainer's clock)"),
        ("outside_training_per_trial_s", "  per trial, outside the training steps"),
        ("gaps_s", "gaps between trials"),
        ("teardown_s", "teardown: last trial end to exit"),
        ("report_s", "  of which rendering the report"),
    ]
    names = list(ph)
    for key, label in labels:
        rows.append([label, *[s(ph[n][key]) if key in ph[n] else "—" for n in names]])
    lines.append(_common.table(["phase", *names], rows))
    lines += ["", f"Model load + 4-bit quantization + prepare_model_for_kbit_training, per trial (both sides pay it): "
              f"{s(summary['model_load_s'])} s; a whole plain trial: {s(summary['plain_per_trial_s'])} s", ""]
    rows = []
    for name, o in summary["overhead"].items():
        rows.append([
            name,
            s(o["total_s"]),
            s(o["total_per_trial_s"]),
            s(o["startup_s"]),
            s(o["teardown_s"]),
            s(o.get("scheduling_reporting_per_trial_s", {"n": 0})),
            s(o["theoretical_minimum_s"]),
            s(o["ratio_to_minimum"], 3),
        ])
    lines.append("Overhead against the plain loop (driver minus plain, paired by repetition):")
    lines.append("")
    lines.append(_common.table(
        ["run", "total (s)", "total per trial (s)", "start-up (s)", "teardown (s)",
         "scheduling + reporting per trial (s)", "theoretical minimum (s)", "wall / minimum"],
        rows,
    ))
    c1 = summary["overhead"].get("driver_c1")
    if c1:
        steady = c1["scheduling_reporting_per_trial_s"]["median"]
        allin = c1["total_per_trial_s"]["median"]
        ratio = c1["ratio_to_minimum"]["median"]
        lines += [
            "",
            f"Target (<= {TARGET_S_PER_TRIAL:g} s per trial, model load excluded): scheduling + reporting "
            f"{steady:.2f} s/trial -> {'met' if steady <= TARGET_S_PER_TRIAL else 'missed'}; all-in with start-up and "
            f"teardown amortized over {args.trials} trials {allin:.2f} s/trial -> "
            f"{'met' if allin <= TARGET_S_PER_TRIAL else 'missed'}.",
            f"Ray's 20% criterion (wall <= {RAY_RATIO_LIMIT:g} x theoretical minimum) at c=1: {ratio:.3f} -> "
            f"{'within' if ratio <= RAY_RATIO_LIMIT else 'over'}.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
