"""What one task evaluation costs on the smoke model, per metric type, and its share of a trial's time.

Run from the repository root:

    .venv/bin/python benchmarks/task_metrics_cost.py --repeats 1 --out docs/benchmark-results/task_metrics_cost.json

For each metric type, one real trial (`trainables.qlora.run_trial`, the builtin tiny NF4 Llama,
LoRA r=8 on q/v, 1 CPU thread) trains on the smoke task (GSM8K-shaped variant for the extracting
metrics) with `eval.max_examples` rows (default 64) measured after every round (`when: every_round`)
and reports `task_eval_s` and `task_eval_peak_mib` (the trial's memory kind: host RSS on CPU) for each
evaluation. The share of the trial is the task evaluation's seconds over the trial's wall time, at
every_round (an upper bound for the default `when: rungs`, which measures fewer rounds).

`--sweep` measures the issue's target instead: the shipped sweeps/examples/smoke-exact-match.yaml
(the defaults: `when: rungs`, 40 rows, ASHA on exact match) run through the real driver on a local
Ray; per trial, task-evaluation seconds (`task_eval_total_s`) over the trial's wall time (`wall_s`,
model loading included), and over the whole sweep the sum of one over the sum of the other.

    .venv/bin/python benchmarks/task_metrics_cost.py --sweep --repeats 2 --out /tmp/task_share.json
"""

from __future__ import annotations

import json
import time
from typing import Any

import _common

ANSWERS = _common.REPO / "sweeps" / "data" / "smoke_answers.jsonl"
GENERAL = _common.REPO / "sweeps" / "data" / "smoke_general.txt"

CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "exact_match (teacher-forced)": (_common.SMOKE_DATA, {"type": "exact_match"}),
    "exact_match (generated)": (_common.SMOKE_DATA, {"type": "exact_match", "mode": "generate"}),
    "exact_match (extract ###)": (ANSWERS, {"type": "exact_match", "extract": "### (.+)", "normalize": ["strip"]}),
    "rouge_l": (ANSWERS, {"type": "rouge_l"}),
    "math_verify (extract ###)": (ANSWERS, {"type": "math_verify", "extract": "### (.+)"}),
    "forgetting": (_common.SMOKE_DATA, {"type": "forgetting", "path": str(GENERAL)}),
}


def one(data: Any, metric: dict[str, Any], steps: int, max_examples: int) -> dict[str, Any]:
    from sweeps.plan import trial_job
    from sweeps.spec import parse_spec
    from trainables.qlora import run_trial

    spec = parse_spec(
        _common.spec_dict(
            name="taskcost",
            data={"path": str(data), "eval_size": max_examples, "max_seq_length": 64},
            train={"max_steps": steps, "eval_every": 10, "checkpoint": False},
            eval={"metrics": [metric], "max_examples": max_examples, "when": "every_round"},
        )
    )
    reports: list[dict[str, Any]] = []
    began = time.time()
    run_trial(dict(_common.TINY_TRIAL), trial_job(spec), report=lambda m, c=None: reports.append(m))
    wall = time.time() - began
    seconds = [r["task_eval_s"] for r in reports]
    return {
        "eval_s": seconds,
        "peak_mib": [r["task_eval_peak_mib"] for r in reports],
        "memory_kind": reports[-1]["memory_kind"],
        "trial_peak_mib": reports[-1]["peak_memory_mib"],
        "trial_wall_s": wall,
        "share": sum(seconds) / wall,
    }


EXAMPLE = _common.REPO / "sweeps" / "examples" / "smoke-exact-match.yaml"
TARGET_SHARE = 0.20  # the issue's: task evaluation at most 20% of a trial's time at the defaults


def sweep_share(storage: str, name: str) -> dict[str, Any]:
    """One run of the shipped exact-match example; each trial's task-evaluation share of its wall time."""
    import contextlib
    import sys

    from analysis.results import load_experiment
    from sweeps.driver import run_sweep
    from sweeps.spec import load_spec

    spec = load_spec(EXAMPLE)
    with contextlib.redirect_stdout(sys.stderr):  # the live view to stderr: stdout is for the table
        outcome = run_sweep(spec, storage_override=storage, name=name, address="local", log=lambda _: None)
    trials = load_experiment(outcome.experiment_dir).trials
    rows = [
        {"trial_id": str(r["trial_id"]), "status": str(r["status"]), "steps": int(r["steps"]),
         "task_eval_s": float(r["task_eval_total_s"]), "wall_s": float(r["wall_s"]),
         "share": float(r["task_eval_total_s"]) / float(r["wall_s"])}
        for r in trials.to_dict("records")
    ]
    total_eval, total_wall = sum(r["task_eval_s"] for r in rows), sum(r["wall_s"] for r in rows)
    return {"trials": rows, "task_eval_s": total_eval, "wall_s": total_wall, "share": total_eval / total_wall}


def main_sweep(args: Any) -> None:
    import shutil
    import tempfile

    _common.warm_model_cache()
    folder = tempfile.mkdtemp(prefix="bench-task-share-")
    try:
        runs = [sweep_share(folder, f"share-{i}") for i in range(args.repeats)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for i, run in enumerate(runs):
        shares = _common.stats([t["share"] for t in run["trials"]])
        rows.append([str(i + 1), str(len(run["trials"])), _common.fmt(run["task_eval_s"], 1), _common.fmt(run["wall_s"], 1),
                     f"{100 * run['share']:.1f}%", f"{100 * shares['median']:.1f}% ({100 * shares['min']:.1f}-{100 * shares['max']:.1f}%)",
                     "met" if run["share"] <= TARGET_SHARE else "missed"])
    print(f"## Task evaluation's share of trial time at the defaults ({EXAMPLE.name})\n")
    print(f"{_common.describe_machine(_common.machine())}\n")
    print(_common.table(["run", "trials", "task eval s (sum)", "trial wall s (sum)", "share, whole sweep",
                         "share per trial, median (min-max)", f"<= {TARGET_SHARE:.0%}"], rows))
    _common.write_json(args.out, {"target_share": TARGET_SHARE, "runs": runs})


def main() -> None:
    parser = _common.parser(__doc__, repeats=1)
    parser.add_argument("--sweep", action="store_true", help="the share of trial time at the defaults, on the shipped example sweep")
    args = parser.parse_args()
    if args.sweep:
        main_sweep(args)
        return
    _common.warm_model_cache()
    steps, max_examples = (20, 8) if args.quick else (30, 64)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, (data, metric) in CASES.items():
            runs[name].append(one(data, metric, steps, max_examples))
    rows = []
    for name, results in runs.items():
        evals = _common.stats([s for r in results for s in r["eval_s"][1:]])  # the first one warms up
        peaks = _common.stats([p for r in results for p in r["peak_mib"]])
        share = _common.stats([r["share"] for r in results])
        rows.append([name, _common.spread(evals), _common.fmt(peaks["max"], 0), results[0]["memory_kind"],
                     _common.fmt(results[0]["trial_peak_mib"], 0), f"{100 * share['median']:.1f}%"])
    command = "python benchmarks/task_metrics_cost.py" + (" --quick" if args.quick else "") + f" --repeats {args.repeats}"
    info = _common.machine()
    print("## Task metrics: cost per evaluation on the smoke model\n")
    print(f"{max_examples} eval rows, {steps} steps, evaluation after every 10; {_common.describe_machine(info)}\n")
    print(_common.table(["metric", "s per evaluation, median (min-max)", "peak MiB", "kind", "trial peak MiB",
                         "share of trial time"], rows))
    if args.out:
        args.out.write_text(json.dumps({"command": command, "machine": info, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
