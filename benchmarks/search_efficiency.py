"""Search efficiency: ASHA + Optuna TPE against full-budget random search and a grid, in training steps.

Run from the repository root, holding the machine-wide lock (about 20 minutes on 2 cores):

    flock /tmp/qlora-heavy.lock .venv/bin/python benchmarks/search_efficiency.py --seeds 0 1 2 \
        --plot docs/search-efficiency.png --out /tmp/search_efficiency.json

The smoke task (builtin tiny Llama, NF4, the shipped instruction data), 80 steps per full trial,
an evaluation every 10 steps, 2 trials at once, and one discrete space for every method:
r in {4, 16}, lora_alpha = 2r, target_modules in {qv, attention, all-linear}, learning_rate in
{3e-4, 1e-3, 3e-3, 1e-2, 3e-2}, dropout 0: 30 points. Each method runs 30 trials through the real
driver (`sweeps.driver.run_sweep`):

* asha_tpe: Optuna TPE proposes, ASHA stops (grace 2, reduction factor 2, max_t 8 rounds).
* random:   Optuna's random sampler, every trial to 80 steps (no early stopping).
* grid:     every point of the grid once, to 80 steps, in an order shuffled by the seed (Optuna's
            GridSampler passed to run_sweep in place of the spec's sampler).

`--space large` is the ASHA paper's regime instead: more configurations than a full-budget search
can afford. r in {4, 8, 16, 32}, the same targets, 8 learning rates from 3e-4 to 3e-2: 96 points.
Random search and the grid (a seeded, shuffled subset, no repeats) run 24 full trials; ASHA + TPE
runs 64 trials, about the same compute once ASHA has stopped most of them early.

`--space issue` is issue 16's: 72 discrete combinations x a continuous learning rate (>= 216
effective points), the default search (baseline + default sampler + ASHA), warm start from another
seed's default sweep, random search and each sampler (tpe_mv, gp, cmaes), every run cut at random
search's compute; per seed the steps to 1% and 5% of the best and the best at 1/3 of the budget
(docs/benchmarks.md, section 3c). `--methods` runs a subset.

A seed sets search.seed (the sampler's seed, and the grid's order); train.seed stays 0, so a
configuration trains identically whichever method proposes it.

The measure. Order a run's trials by the time they finished (`ended_at`). After the i-th trial,
the compute spent is the sum of the optimizer steps the first i trials ran (a trial stopped by
ASHA counts the steps it ran), and the best loss found is the lowest eval_loss any of them
reported at any evaluation. The reference L* is the lowest eval_loss any trial of any method and
seed reported. "Compute to reach the target" is the compute spent when the best loss found first
falls within 1% of L* (<= 1.01 L*); a run that never gets there is reported as not reached.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

METHODS = ("asha_tpe", "random", "grid")
TARGET_COMPUTE_RATIO = 1 / 3  # issue 7: ASHA + TPE needs at most 1/3 of full random search's compute
TOLERANCE = 0.01  # within 1% of the best loss any method found
# Looser targets, reported beside the 1% one: they show how far from the single best configuration
# each method gets, and when.
LOOSER_TOLERANCES = (0.15, 0.50)

FULL_SPACE: dict[str, Any] = {
    "r": [4, 16],
    "lora_alpha": {"ratio": [2]},
    "target_modules": ["qv", "attention", "all-linear"],
    "learning_rate": [3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2],
    "lora_dropout": 0.0,
}
QUICK_SPACE: dict[str, Any] = {**FULL_SPACE, "r": [4], "target_modules": ["qv", "all-linear"], "learning_rate": [1.0e-2]}
# The ASHA paper's regime: more configurations than full-budget search can afford. 96 points;
# random search and the grid get 24 full trials, ASHA + TPE 64 trials for about the same compute.
LARGE_SPACE: dict[str, Any] = {
    "r": [4, 8, 16, 32],
    "lora_alpha": {"ratio": [2]},
    "target_modules": ["qv", "attention", "all-linear"],
    "learning_rate": [3.0e-4, 6.0e-4, 1.0e-3, 2.0e-3, 3.0e-3, 6.0e-3, 1.0e-2, 3.0e-2],
    "lora_dropout": 0.0,
}
LARGE_TRIALS = {"asha_tpe": 64, "random": 24, "grid": 24}

# `--space issue` (issue 16): a space where random search does not get lucky. 4 ranks x 2 alpha
# ratios x 3 target sets x 3 dropouts = 72 discrete combinations, times a continuous learning rate
# over 2.5 decades: more than 200 effective points at any resolution finer than 3 rates per decade.
ISSUE_SPACE: dict[str, Any] = {
    "r": [4, 8, 16, 32],
    "lora_alpha": {"ratio": [1, 2]},
    "target_modules": ["qv", "attention", "all-linear"],
    "learning_rate": {"loguniform": [1.0e-4, 3.0e-2]},
    "lora_dropout": [0.0, 0.05, 0.1],
}
ISSUE_EFFECTIVE_POINTS = 72 * 3  # the discrete combinations x 3 learning rates per decade (a lower bound)
# Each method of the issue space: its search section and whether ASHA stops trials. "default" is
# the spec's defaults (baseline on, search.sampler's default, ASHA); "warm" is that plus a warm
# start from the default sweep of another seed. Every method gets the same compute budget: random's
# ISSUE_RANDOM_TRIALS full trials; the others get more trials and are cut at that budget.
ISSUE_METHODS: dict[str, dict[str, Any]] = {
    # method_spec turns the baseline off (the older methods ran without it): these turn it back on.
    "default": {"search": {"baseline": True, "sampler": "default"}, "asha": True},
    "warm": {"search": {"baseline": True, "sampler": "default"}, "asha": True},
    "random": {"search": {"sampler": "random", "baseline": False}, "asha": False},
    "tpe_mv": {"search": {"baseline": True, "sampler": "tpe",
                          "tpe": {"multivariate": True, "group": True, "constant_liar": True}}, "asha": True},
    "gp": {"search": {"baseline": True, "sampler": "gp"}, "asha": True},
    "cmaes": {"search": {"baseline": True, "sampler": "cmaes"}, "asha": True},
}
ISSUE_RANDOM_TRIALS = 24
ISSUE_ASHA_TRIALS = 64
ISSUE_TOLERANCES = (0.01, 0.05)
ISSUE_TARGET_SEEDS = 4  # of 5: the default reaches 1% within 1/3 of random's budget in at least this many


def grid_points(space: dict[str, Any]) -> dict[str, list[Any]]:
    """The searched parameters of a discrete space (lists of two or more values), as GridSampler takes them."""
    return {name: list(values) for name, values in space.items() if isinstance(values, list) and len(values) > 1}


def method_spec(method: str, seed: int, space: dict[str, Any], trials: int, steps: int, asha: dict[str, Any],
                search: dict[str, Any] | None = None, use_asha: bool | None = None) -> Any:
    """The spec of one method's sweep; `search` overrides the search section (the issue space's methods)."""
    from sweeps.spec import parse_spec

    return parse_spec(
        _common.spec_dict(
            name=f"search-{method}-s{seed}",
            data={"eval_size": 0.1},  # the smoke sweep's split (120 eval rows)
            space=space,
            # asha_tpe, random and grid as they were measured (no baseline); the issue-space methods set
            # their own search section (the default method: the spec's own sampler and baseline).
            search={"num_samples": trials, "max_concurrent": 2, "seed": seed, "baseline": False,
                    **({"sampler": "tpe" if method == "asha_tpe" else "random"} if method in METHODS else {}),
                    **(search or {})},
            scheduler={"asha": asha if (method == "asha_tpe" if use_asha is None else use_asha) else None},
            train={"max_steps": steps, "eval_every": 10},
        )
    )


def grid_sampler(space: dict[str, Any], seed: int) -> Any:
    from sweeps.searcher import TuneGridSampler  # search.sampler: grid's sampler, also for run_sweep(sampler=...)

    return TuneGridSampler(grid_points(space), seed=seed)


def run_method(method: str, seed: int, space: dict[str, Any], trials: int, steps: int, asha: dict[str, Any],
               storage: str, search: dict[str, Any] | None = None, use_asha: bool | None = None) -> dict[str, Any]:
    """One sweep through the driver; its trials in completion order."""
    from analysis.results import load_experiment
    from sweeps.driver import run_sweep

    if search and search.get("sampler") == "default":
        # The spec's default sampler (sweeps/spec.py), whatever it is: the default search as a user gets it.
        from sweeps.spec import SearchSpec

        search = {**search, "sampler": SearchSpec().sampler, "tpe": SearchSpec().tpe.model_dump()}
    spec = method_spec(method, seed, space, trials, steps, asha, search, use_asha)
    sampler = grid_sampler(space, seed) if method == "grid" else None
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # the live view goes to stderr: stdout is for the tables
        outcome = run_sweep(spec, storage_override=storage, name=spec.name, address="local", log=lambda _: None,
                            sampler=sampler)
    wall = time.time() - started
    frame = load_experiment(outcome.experiment_dir).trials.sort_values("ended_at", kind="stable")
    rows = []
    for _, row in frame.iterrows():
        loss = row["best_eval_loss"]
        rows.append({
            "trial_id": str(row["trial_id"]),
            "status": str(row["status"]),
            "ended_at": float(row["ended_at"]),
            "steps": int(row["steps"]) if not _missing(row["steps"]) else 0,
            "best_eval_loss": None if _missing(loss) else float(loss),
            "r": int(row["r"]),
            "target_modules": str(row["target_modules"]),
            "learning_rate": float(row["learning_rate"]),
            "lora_alpha": float(row["lora_alpha"]),
            "lora_dropout": float(row["lora_dropout"]),
            "baseline": bool(row["baseline"]),
        })
    return {"method": method, "seed": seed, "wall_s": wall, "errors": outcome.num_errors, "trials": rows,
            "experiment_dir": outcome.experiment_dir}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value) in ("<NA>", "nan")


def trajectory(run: dict[str, Any]) -> list[tuple[int, float]]:
    """(cumulative steps, best loss so far) after each trial, in completion order."""
    out, spent, best = [], 0, math.inf
    for t in run["trials"]:
        spent += t["steps"]
        if t["best_eval_loss"] is not None:
            best = min(best, t["best_eval_loss"])
        out.append((spent, best))
    return out


def compute_to_target(run: dict[str, Any], target: float) -> int | None:
    for spent, best in trajectory(run):
        if best <= target:
            return spent
    return None


def best_at(run: dict[str, Any], budget: int) -> float | None:
    """The best loss found by the trials completed within `budget` cumulative steps."""
    best = None
    for spent, loss in trajectory(run):
        if spent > budget:
            break
        best = loss if math.isfinite(loss) else best
    return best


def repeats(run: dict[str, Any]) -> dict[str, int]:
    """Trials (and their steps) that re-ran a configuration an earlier trial of the run already ran."""
    seen, trials, steps = set(), 0, 0
    for t in run["trials"]:
        key = (t["r"], t["target_modules"], t["learning_rate"], t.get("lora_alpha"), t.get("lora_dropout"))
        if key in seen:
            trials += 1
            steps += t["steps"]
        seen.add(key)
    return {"trials": trials, "steps": steps, "distinct": len(seen)}


def summarize(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    reference = min(t["best_eval_loss"] for r in runs for t in r["trials"] if t["best_eval_loss"] is not None)
    target = reference * (1 + TOLERANCE)
    by = {(r["method"], r["seed"]): r for r in runs}
    per_method: dict[str, Any] = {}
    for m in methods:
        mr = [by[(m, s)] for s in seeds if (m, s) in by]
        reach = [compute_to_target(r, target) for r in mr]
        per_method[m] = {
            "compute_to_target": reach,
            "compute_to_target_stats": _common.stats([x for x in reach if x is not None]),
            "reached": sum(x is not None for x in reach),
            "runs": len(mr),
            "total_steps": _common.stats([trajectory(r)[-1][0] for r in mr]),
            "best_loss": _common.stats([trajectory(r)[-1][1] for r in mr]),
            "wall_s": _common.stats([r["wall_s"] for r in mr]),
            "early_stopped": _common.stats([sum(t["status"] == "early_stopped" for t in r["trials"]) for r in mr]),
            "diverged": _common.stats([sum(t["status"] == "diverged" for t in r["trials"]) for r in mr]),
            "distinct_configs": _common.stats([repeats(r)["distinct"] for r in mr]),
            "repeated_trials": _common.stats([repeats(r)["trials"] for r in mr]),
            "steps_on_repeats": _common.stats([repeats(r)["steps"] for r in mr]),
        }
    ratios = {}
    for base in (b for b in ("random", "grid") if b in methods):
        values = []
        for s in seeds:
            a, b = compute_to_target(by[("asha_tpe", s)], target), compute_to_target(by[(base, s)], target)
            values.append(None if a is None or b is None else a / b)
        ratios[f"asha_tpe_over_{base}"] = {"per_seed": values, "stats": _common.stats([v for v in values if v is not None])}
    looser = {}
    for tol in LOOSER_TOLERANCES:
        bound = reference * (1 + tol)
        entry: dict[str, Any] = {"target_loss": bound}
        for m in methods:
            reach = [compute_to_target(by[(m, s)], bound) for s in seeds if (m, s) in by]
            entry[m] = {"per_seed": reach, "stats": _common.stats([x for x in reach if x is not None])}
        looser[f"{tol:.0%}"] = entry
    # The paper-style view at the compute the target allows: what each method has found after a
    # third of full random search's compute.
    budget = int(per_method["random"]["total_steps"]["median"] * TARGET_COMPUTE_RATIO) if "random" in per_method else None
    at_budget = None
    if budget:
        at_budget = {"steps": budget, **{m: _common.stats([best_at(by[(m, s)], budget) for s in seeds if (m, s) in by])
                                         for m in methods}}
    # Per seed: the compute ASHA + TPE needed to find a loss as good as full random search's final
    # best, against the compute random search needed to find it (Li et al.'s comparison).
    match_random = None
    if "random" in per_method and "asha_tpe" in per_method:
        match_random = []
        for s in seeds:
            goal = trajectory(by[("random", s)])[-1][1]
            a, b = compute_to_target(by[("asha_tpe", s)], goal), compute_to_target(by[("random", s)], goal)
            match_random.append({"seed": s, "random_best": goal, "asha_tpe_steps": a, "random_steps": b,
                                 "random_total_steps": trajectory(by[("random", s)])[-1][0]})
    best = min((t for r in runs for t in r["trials"] if t["best_eval_loss"] is not None), key=lambda t: t["best_eval_loss"])
    within = sorted({(t["r"], t["target_modules"], t["learning_rate"]) for r in runs for t in r["trials"]
                     if t["best_eval_loss"] is not None and t["best_eval_loss"] <= target})
    ranking = sorted({(t["r"], t["target_modules"], t["learning_rate"], t["best_eval_loss"]) for r in runs
                      if r["method"] == "grid" for t in r["trials"] if t["best_eval_loss"] is not None}, key=lambda x: x[3])
    return {"reference_loss": reference, "target_loss": target, "best_config": best, "configs_within_target": within,
            "methods": per_method, "ratios": ratios, "looser_targets": looser, "best_at_third_of_random": at_budget,
            "grid_ranking": ranking, "match_random_best": match_random}


def within_budget(run: dict[str, Any], budget: int) -> dict[str, Any]:
    """The run cut at `budget` cumulative steps: the trials completed within it."""
    kept, spent = [], 0
    for t in run["trials"]:
        spent += t["steps"]
        if spent > budget:
            break
        kept.append(t)
    return {**run, "trials": kept}


def summarize_issue(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The issue-16 figures: per method and seed, within the same compute budget (random's total),
    the steps to within 1% and 5% of the best loss any run found and the best at 1/3 of the budget."""
    by = {(r["method"], r["seed"]): r for r in runs}
    methods = [m for m in ISSUE_METHODS if any(r["method"] == m for r in runs)]
    budget = int(_common.stats([trajectory(by[("random", s)])[-1][0] for s in seeds if ("random", s) in by])["median"]) \
        if any(("random", s) in by for s in seeds) else max(trajectory(r)[-1][0] for r in runs)
    cut = {key: within_budget(run, budget) for key, run in by.items()}
    reference = min(t["best_eval_loss"] for r in runs for t in r["trials"] if t["best_eval_loss"] is not None)
    third = budget // 3
    per_method: dict[str, Any] = {}
    for m in methods:
        mine = [s for s in seeds if (m, s) in cut]
        entry: dict[str, Any] = {"seeds": mine}
        for tol in ISSUE_TOLERANCES:
            reach = [compute_to_target(cut[(m, s)], reference * (1 + tol)) for s in mine]
            entry[f"steps_to_{tol:.0%}"] = reach
            entry[f"reached_{tol:.0%}"] = sum(x is not None for x in reach)
            entry[f"within_third_{tol:.0%}"] = sum(x is not None and x <= third for x in reach)
        entry["best_at_third"] = [best_at(cut[(m, s)], third) for s in mine]
        entry["best_at_budget"] = [best_at(cut[(m, s)], budget) for s in mine]
        entry["steps_used"] = [trajectory(cut[(m, s)])[-1][0] if cut[(m, s)]["trials"] else 0 for s in mine]
        entry["wall_s"] = [by[(m, s)]["wall_s"] for s in mine]
        per_method[m] = entry
    verdict: dict[str, Any] = {}
    if "default" in per_method:
        met = per_method["default"]["within_third_1%"]
        verdict["default_1pct_within_third"] = f"{met}/{len(per_method['default']['seeds'])}"
        verdict["default_target_met"] = met >= ISSUE_TARGET_SEEDS
    if "default" in per_method and "warm" in per_method:
        halved = []
        for s in seeds:
            if ("default", s) in cut and ("warm", s) in cut:
                d = compute_to_target(cut[("default", s)], reference * 1.01)
                w = compute_to_target(cut[("warm", s)], reference * 1.01)
                halved.append(None if d is None or w is None else w <= d / 2)
        verdict["warm_halves_default"] = halved
    return {"reference_loss": reference, "target_loss": reference * 1.01, "budget_steps": budget,
            "best_at_third_of_random": {"steps": third}, "methods": per_method, "verdict": verdict}


def render_issue(summary: dict[str, Any], seeds: list[int], info: dict[str, Any]) -> str:
    def seq(values: list[Any], digits: int | None = None) -> str:
        return " / ".join("—" if v is None else (f"{v:.{digits}f}" if digits is not None else f"{v:,}") for v in values)

    lines = [
        f"## Search efficiency, issue-16 space ({ISSUE_EFFECTIVE_POINTS}+ effective points), seeds {seeds}",
        "",
        f"Machine: {_common.describe_machine(info) if info.get('versions') else 'not recorded'}",
        "",
        f"Budget per method: {summary['budget_steps']:,} steps (random search's {ISSUE_RANDOM_TRIALS} full trials); "
        f"1/3 of it: {summary['best_at_third_of_random']['steps']:,}. Best loss any run found L* = "
        f"{summary['reference_loss']:.4f}.",
        "",
        "| method | steps to 1% of L*, per seed | within 1/3 budget | steps to 5%, per seed | within 1/3 budget "
        "| best at 1/3 budget, per seed | best at the budget, per seed | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, e in summary["methods"].items():
        n = len(e["seeds"])
        lines.append(
            f"| {m} | {seq(e['steps_to_1%'])} | {e['within_third_1%']}/{n} | {seq(e['steps_to_5%'])} | "
            f"{e['within_third_5%']}/{n} | {seq(e['best_at_third'], 4)} | {seq(e['best_at_budget'], 4)} | "
            f"{seq([round(w) for w in e['wall_s']])} |"
        )
    v = summary["verdict"]
    if "default_1pct_within_third" in v:
        lines += ["", f"Target (default search within 1% using <= 1/3 of random's budget in >= {ISSUE_TARGET_SEEDS} "
                      f"of 5 seeds): {v['default_1pct_within_third']} -> {'met' if v['default_target_met'] else 'missed'}"]
    if "warm_halves_default" in v:
        lines.append(f"Warm start halves the default's steps to 1%, per seed: {v['warm_halves_default']}")
    return "\n".join(lines)


def run_issue(args: Any, storage: str) -> list[dict[str, Any]]:
    """The issue-16 methods, each seed; "warm" starts from the default sweep of the next seed."""
    steps, asha = 80, {"max_t": 8, "grace_period": 2, "reduction_factor": 2}
    methods = [m for m in ISSUE_METHODS if m in (args.methods or ISSUE_METHODS)]
    runs: list[dict[str, Any]] = []

    def one(method: str, seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        setting = ISSUE_METHODS[method]
        trials = ISSUE_RANDOM_TRIALS if not setting["asha"] else ISSUE_ASHA_TRIALS
        run = run_method(method, seed, ISSUE_SPACE, trials, steps, asha, storage,
                         search={**setting["search"], **(extra or {})}, use_asha=setting["asha"])
        if run["errors"]:
            raise RuntimeError(f"{method} seed {seed}: {run['errors']} trials errored")
        spent, best = trajectory(run)[-1]
        print(f"[seed {seed}] {method}: {len(run['trials'])} trials, {spent} steps, best {best:.4f}, "
              f"{run['wall_s']:.0f} s", file=sys.stderr, flush=True)
        runs.append(run)
        if args.out:  # the runs so far, analysable with --from-json if the whole run cannot finish
            _common.write_json(Path(f"{args.out}.partial"), {"space_name": "issue", "seeds": args.seeds, "space": ISSUE_SPACE,
                                                            "max_steps": steps, "runs": runs})
        return run

    # First the default search and random search for every seed (the main target), then warm start
    # (each seed from the default sweep of the next seed), then the other samplers.
    defaults = {}
    for seed in args.seeds:
        if "default" in methods or "warm" in methods:
            defaults[seed] = one("default", seed)
        if "random" in methods:
            one("random", seed)
    for method in (m for m in methods if m not in ("default", "random")):
        for i, seed in enumerate(args.seeds):
            if method == "warm":
                one(method, seed, {"warm_start": [defaults[args.seeds[(i + 1) % len(args.seeds)]]["experiment_dir"]]})
            else:
                one(method, seed)
    if "default" not in methods:
        runs = [r for r in runs if r["method"] != "default"]
    return runs


def space_size(space: dict[str, Any]) -> int:
    return math.prod(len(v) for v in grid_points(space).values())


def trials_by_method(trials: int | dict[str, int], methods: Any) -> dict[str, int]:
    """Trials per method; runs saved before the large space had one count for every method."""
    return dict(trials) if isinstance(trials, dict) else {m: trials for m in methods}


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path, points: int) -> None:
    """Best loss against cumulative steps: median over seeds, min–max band, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colors = {"asha_tpe": "tab:blue", "random": "tab:orange", "grid": "tab:green", "default": "tab:blue",
              "warm": "tab:purple", "tpe_mv": "tab:cyan", "gp": "tab:red", "cmaes": "tab:brown"}
    labels = {"asha_tpe": "ASHA + TPE", "random": "random, full budget", "grid": "grid, full budget",
              "default": "default (baseline + TPE + ASHA)", "warm": "default + warm start", "tpe_mv": "multivariate TPE + ASHA",
              "gp": "GP + ASHA", "cmaes": "CMA-ES + ASHA"}
    top = max(trajectory(r)[-1][0] for r in runs)
    xs = np.linspace(0, top, 400)
    for m in (m for m in dict.fromkeys((*METHODS, *ISSUE_METHODS)) if any(r["method"] == m for r in runs)):
        curves, ends = [], []
        for r in (r for r in runs if r["method"] == m):
            traj = trajectory(r)
            steps = np.array([p[0] for p in traj])
            best = np.array([p[1] if math.isfinite(p[1]) else np.nan for p in traj])
            # Step function: the best loss found by the trials completed within x steps. Past the run's
            # last trial it stays flat (that is still the best found within x); a dot marks the end.
            idx = np.searchsorted(steps, xs, side="right") - 1
            ys = np.where(idx >= 0, best[np.clip(idx, 0, None)], np.nan)
            curves.append(ys)
            ends.append((steps[-1], best[-1]))
        arr = np.array(curves)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med, lo, hi = np.nanmedian(arr, axis=0), np.nanmin(arr, axis=0), np.nanmax(arr, axis=0)
        ax.plot(xs, med, color=colors[m], label=f"{labels[m]} (median of {len(curves)} seeds)")
        ax.fill_between(xs, lo, hi, color=colors[m], alpha=0.18, linewidth=0)
        ax.scatter([e[0] for e in ends], [e[1] for e in ends], color=colors[m], s=14, zorder=3)
    ax.axhline(summary["target_loss"], color="black", linestyle="--", linewidth=1,
               label=f"within {TOLERANCE:.0%} of the best loss found ({summary['reference_loss']:.4f})")
    third = (summary.get("best_at_third_of_random") or {}).get("steps")
    if third:
        ax.axvline(third, color="grey", linestyle=":", linewidth=1, label=f"1/3 of full random search's compute ({third} steps)")
    budget = summary.get("budget_steps")
    if budget and budget < top:  # --space issue: every method is judged at random search's budget
        ax.axvline(budget, color="black", linestyle=":", linewidth=1, label=f"the budget every method is judged at ({budget:,} steps)")
    ax.set_xlabel("cumulative training steps (trials in completion order; dots: where each run ended)")
    ax.set_ylabel("best eval loss found so far")
    ax.set_yscale("log")
    ax.set_title(f"Smoke task, {points}-point space: best loss vs compute (band: min–max over seeds)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = _common.parser(__doc__.split("\n\n")[0], repeats=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (default 0 1 2)")
    p.add_argument("--plot", type=Path, default=None, help="write the curves as a PNG here")
    p.add_argument("--storage", default=None, help="keep the experiments here (default: a temporary folder, deleted)")
    p.add_argument("--space", choices=("small", "large", "issue"), default="small",
                   help="small: 30 points, 30 trials per method (default); large: 96 points, 64 ASHA + TPE trials "
                        "against 24 full-budget random and grid trials; issue: the issue-16 space (72 combinations x a "
                        "continuous learning rate), the default search, warm start and each sampler against random "
                        "search at the same compute budget")
    p.add_argument("--methods", nargs="+", choices=tuple(ISSUE_METHODS), default=None,
                   help="--space issue: run only these methods (default: all)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="analyse (and plot) the runs saved by an earlier --out instead of running sweeps")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        args.seeds = saved["seeds"]
        if saved.get("space_name") == "issue":
            # A partial run (its .partial file) holds the seeds it got to.
            args.seeds = [seed for seed in args.seeds if any(r["seed"] == seed for r in saved["runs"])]
            summary = summarize_issue(saved["runs"], args.seeds)
            if args.plot:
                plot(saved["runs"], summary, args.plot, ISSUE_EFFECTIVE_POINTS)
            print(render_issue(summary, args.seeds, saved.get("machine") or {}))
            _common.write_json(args.out, {**{k: v for k, v in saved.items() if k not in ("command", "machine", "finished_at")},
                                          "analysed": str(args.from_json), "summary": summary})
            return 0
        summary = summarize(saved["runs"], args.seeds)
        if args.plot:
            plot(saved["runs"], summary, args.plot, space_size(saved.get("space", FULL_SPACE)))
        print(render(summary, args, saved["trials_per_method"], saved["max_steps"], saved["machine"]))
        _common.write_json(args.out, {**{k: v for k, v in saved.items() if k not in ("command", "machine", "finished_at")},
                                      "analysed": str(args.from_json), "summary": summary})
        return 0
    if args.space == "issue":
        return main_issue(args)
    space, steps, asha, methods = FULL_SPACE, 80, {"max_t": 8, "grace_period": 2, "reduction_factor": 2}, METHODS
    if args.quick:
        # Random search runs the same code as ASHA + TPE minus the scheduler; the quick run skips it.
        space, steps, asha, args.seeds = QUICK_SPACE, 20, {"max_t": 2, "grace_period": 1, "reduction_factor": 2}, [0]
        methods = ("asha_tpe", "grid")
    trials = {m: math.prod(len(v) for v in grid_points(space).values()) for m in methods}
    if args.space == "large" and not args.quick:
        space, trials = LARGE_SPACE, dict(LARGE_TRIALS)

    runs = []
    with local_ray(args.storage, "bench-search-") as storage:
        for seed in args.seeds:
            for method in methods:
                run = run_method(method, seed, space, trials[method], steps, asha, storage)
                if run["errors"]:
                    raise RuntimeError(f"{method} seed {seed}: {run['errors']} trials errored")
                runs.append(run)
                spent, best = trajectory(run)[-1]
                print(f"[seed {seed}] {method}: {len(run['trials'])} trials, {spent} steps, best {best:.4f}, "
                      f"{run['wall_s']:.0f} s", file=sys.stderr, flush=True)

    summary = summarize(runs, args.seeds)
    if args.plot:
        plot(runs, summary, args.plot, space_size(space))
    print(render(summary, args, trials, steps, _common.machine()))
    _common.write_json(args.out, {"seeds": args.seeds, "space": space, "trials_per_method": trials, "max_steps": steps,
                                  "asha": asha, "summary": summary, "runs": runs})
    return 0


@contextlib.contextmanager
def local_ray(storage: str | None, prefix: str) -> Any:
    """One local Ray for every sweep of the run (run_sweep joins it: its start-up is not what is
    measured), and the storage folder to use (a temp one, removed after, unless --storage gave one).
    Raises if Ray leaves a process behind."""
    import ray

    from sweeps.driver import connect_ray

    _common.warm_model_cache()
    before = set(_common.ray_processes())
    folder = storage or tempfile.mkdtemp(prefix=prefix)
    connect_ray("local", num_cpus=2)
    try:
        yield folder
    finally:
        ray.shutdown()
        if not storage:
            shutil.rmtree(folder, ignore_errors=True)
    left = _common.wait_for_ray_to_exit(before)
    if left:
        raise RuntimeError(f"Ray processes left behind: {left}")


def main_issue(args: Any) -> int:
    with local_ray(args.storage, "bench-search-issue-") as storage:
        runs = run_issue(args, storage)
    summary = summarize_issue(runs, args.seeds)
    if args.plot:
        plot(runs, summary, args.plot, ISSUE_EFFECTIVE_POINTS)
    info = _common.machine()
    print(render_issue(summary, args.seeds, info))
    _common.write_json(args.out, {"space_name": "issue", "seeds": args.seeds, "space": ISSUE_SPACE, "methods": list(ISSUE_METHODS),
                                  "max_steps": 80, "summary": summary, "runs": runs})
    return 0


def render(summary: dict[str, Any], args: Any, trials: int | dict[str, int], steps: int, info: dict[str, Any]) -> str:
    s = _common.spread
    m = summary["methods"]
    best = summary["best_config"]
    counts = ", ".join(f"{name} {n}" for name, n in trials_by_method(trials, m).items() if name in m)
    lines = [
        f"## Search efficiency: trials per method {counts}; {steps} steps per full trial, seeds {args.seeds}",
        "",
        f"Machine: {_common.describe_machine(info) if info.get('versions') else 'not recorded'}",
        "",
        f"Best eval loss any trial found, L* = {summary['reference_loss']:.4f} (r={best['r']}, "
        f"{best['target_modules']}, lr={best['learning_rate']:g}); target <= {summary['target_loss']:.4f} (1.01 L*), "
        f"met by {len(summary['configs_within_target'])} configuration(s): "
        + ", ".join(f"r={r} {t} lr={lr:g}" for r, t, lr in summary["configs_within_target"]),
        "",
    ]
    rows = []
    for name in m:
        v = m[name]
        per_seed = ", ".join("not reached" if x is None else str(x) for x in v["compute_to_target"])
        rows.append([name, f"{v['reached']}/{v['runs']}", per_seed, s(v["compute_to_target_stats"], 0),
                     s(v["total_steps"], 0), s(v["best_loss"], 4), s(v["early_stopped"], 0), s(v["wall_s"], 0)])
    lines.append(_common.table(
        ["method", "reached target", "steps to target, per seed", "median (min–max)", "total steps",
         "best loss found", "trials stopped early", "wall s"], rows))
    lines.append("")
    for key, r in summary["ratios"].items():
        per_seed = ", ".join("n/a" if v is None else f"{v:.3f}" for v in r["per_seed"])
        lines.append(f"{key}: per seed {per_seed}; median {s(r['stats'], 3)}")
    if summary["looser_targets"]:
        lines += ["", "Looser targets (steps to reach, per seed; same runs):", ""]
        rows = []
        for tol, entry in summary["looser_targets"].items():
            for name in m:
                per_seed = ", ".join("not reached" if x is None else str(x) for x in entry[name]["per_seed"])
                rows.append([f"within {tol} (<= {entry['target_loss']:.4f})", name, per_seed, s(entry[name]["stats"], 0)])
        lines.append(_common.table(["target", "method", "steps to target, per seed", "median (min–max)"], rows, "llrr"))
    at = summary["best_at_third_of_random"]
    if at:
        lines += ["", f"Best loss found within {at['steps']} cumulative steps (1/3 of full random search's compute):", ""]
        lines.append(_common.table(["method", "best loss, median (min–max) over seeds"],
                                   [[name, s(at[name], 4)] for name in m]))
    if summary.get("match_random_best"):
        lines += ["", "Compute to find a loss as good as full random search's final best, per seed:", ""]
        rows = [[str(e["seed"]), f"{e['random_best']:.4f}", f"{e['random_steps']} of {e['random_total_steps']}",
                 "not reached" if e["asha_tpe_steps"] is None else str(e["asha_tpe_steps"]),
                 "n/a" if e["asha_tpe_steps"] is None else f"{e['asha_tpe_steps'] / e['random_total_steps']:.3f}"]
                for e in summary["match_random_best"]]
        lines.append(_common.table(["seed", "random's best", "random: steps to it", "ASHA + TPE: steps to it",
                                    "ASHA + TPE / random's full budget"], rows))
    lines += ["", _common.table(
        ["method", "distinct configurations", "trials repeating an earlier configuration", "steps spent on repeats"],
        [[name, s(v["distinct_configs"], 0), s(v["repeated_trials"], 0), s(v["steps_on_repeats"], 0)] for name, v in m.items()])]
    lines.append("")
    ratio = summary["ratios"].get("asha_tpe_over_random", {"stats": {"median": None}})["stats"]["median"]
    if ratio is None:
        lines.append("Target (ASHA + TPE <= 1/3 of random's compute): not decidable (random search did not run, or a method never reached the target)")
    else:
        lines.append(f"Target (ASHA + TPE <= 1/3 of random's compute): median ratio {ratio:.3f} -> "
                     f"{'met' if ratio <= TARGET_COMPUTE_RATIO else 'missed'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
