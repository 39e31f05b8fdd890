"""The benchmark scripts still run: each in its tiny `--quick` mode, checked for structure only.

Quick-mode numbers mean nothing (one repetition, a few steps), so nothing here looks at a timing;
the real figures are in docs/benchmarks.md with the commands that produced them. What is checked
besides structure are exact properties that must hold at any size: the bare peft + trl loop trains
the same numbers as the trainable, and the measured quantization-constant bytes equal the estimator's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, ray_pids, wait_for_no_ray_processes

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def no_ray_left_behind() -> Any:
    before = ray_pids()
    yield
    leftover = wait_for_no_ray_processes(ignore=before)
    assert not leftover, f"Ray processes left behind: {leftover}"


def run_quick(script: str, tmp_path: Path, *extra: str) -> tuple[str, dict[str, Any]]:
    """Run `python benchmarks/<script>.py --quick --out ...` from the repository root."""
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--quick", "--out", str(out), *extra],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stderr[-4000:]}"
    payload = json.loads(out.read_text())
    assert payload["command"].startswith(f"python benchmarks/{script}.py --quick")
    assert {"cpu_model", "logical_cpus", "ram_gib", "versions"} <= set(payload["machine"])
    return proc.stdout, payload


def test_orchestration_overhead_quick(tmp_path: Path) -> None:
    stdout, payload = run_quick("orchestration_overhead", tmp_path)
    assert "## Orchestration overhead" in stdout and "Target (<= 1 s per trial" in stdout
    assert set(payload["runs"]) == {"plain", "driver_c1"}
    for name in ("plain", "driver_c1"):
        (run,) = payload["runs"][name]
        assert {"wall_s", "startup_s", "in_trial_s", "train_s", "gaps_s", "teardown_s"} <= set(run)
    assert {"report_s", "preflight_and_ray_init_s", "ray_up_to_first_trial_s"} <= set(payload["runs"]["driver_c1"][0])
    overhead = payload["summary"]["overhead"]["driver_c1"]
    for key in ("total_per_trial_s", "startup_s", "teardown_s", "scheduling_reporting_per_trial_s", "ratio_to_minimum"):
        assert overhead[key]["n"] == 1


def test_trainable_throughput_quick_trains_the_same_numbers_as_the_bare_loop(tmp_path: Path) -> None:
    stdout, payload = run_quick("trainable_throughput", tmp_path)
    assert "## Trainable throughput" in stdout
    summary = payload["summary"]
    assert set(payload["runs"]) == {"ours", "bare", "ours_no_ckpt"}
    for name in ("ours_over_bare", "ours_no_ckpt_over_bare"):
        assert summary[name]["tokens_per_s"]["n"] == 1
        # Same model, data, seed, arguments and fp32 compute: the training losses are identical.
        assert summary[name]["loss_diff"]["median"] == 0.0
    runs = payload["runs"]
    assert runs["ours"][0]["tokens"] == runs["bare"][0]["tokens"] == runs["ours_no_ckpt"][0]["tokens"]


def test_search_efficiency_quick(tmp_path: Path) -> None:
    png = tmp_path / "curves.png"
    stdout, payload = run_quick("search_efficiency", tmp_path, "--plot", str(png))
    assert "## Search efficiency" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    methods = {run["method"]: run for run in payload["runs"]}
    assert set(methods) == {"asha_tpe", "grid"}
    # The grid runs every point of the (2-point) quick space exactly once.
    grid = methods["grid"]["trials"]
    assert sorted(t["target_modules"] for t in grid) == ["all-linear", "qv"]
    summary = payload["summary"]
    assert summary["target_loss"] == pytest.approx(summary["reference_loss"] * 1.01)
    assert set(summary["methods"]) == {"asha_tpe", "grid"} and "asha_tpe_over_grid" in summary["ratios"]


def test_scaling_quick(tmp_path: Path) -> None:
    stdout, payload = run_quick("scaling", tmp_path)
    assert "## Scaling" in stdout
    summary = payload["summary"]
    assert set(payload["runs"]) == {"local_c1", "cluster_c3"}
    assert summary["local_c1"]["efficiency"]["median"] == 1.0
    for name in ("local_c1", "cluster_c3"):
        assert {"trials_per_hour", "trials_per_hour_end_to_end", "efficiency", "trial_s"} <= set(summary[name])
    assert summary["cluster_c3"]["cluster_start_s"]["n"] == 1


def test_memory_effects_quick(tmp_path: Path) -> None:
    stdout, payload = run_quick("memory_effects", tmp_path)
    assert "## Memory effects" in stdout and "PREDICTED VRAM" in stdout and "MEASURED host RSS" in stdout
    assert len(payload["predicted_8b"]["by_rank"]) == 2 * 5 * 2  # targets x ranks x double quant
    for dq in ("True", "False"):
        measured = payload["tiny_quant_state"][dq]
        assert measured["constants_bytes"] == measured["predicted_constants_bytes"]
    (rss,) = payload["tiny_rss"].values()
    assert rss["memory_kind"] == "host_rss" and rss["peak_rss_mib"]["n"] == 1
    assert len(payload["target_quality"]["rows"]) == 1


def test_preflight_quick(tmp_path: Path) -> None:
    # "before" is trainables/data.py as of the benchmark's BEFORE_REV, read from git history.
    rev = re.search(r'^BEFORE_REV = "([0-9a-f]{40})"', (REPO / "benchmarks" / "preflight.py").read_text(), re.M)
    assert rev, "benchmarks/preflight.py names its BEFORE_REV"
    if subprocess.run(["git", "cat-file", "-e", f"{rev.group(1)}^{{commit}}"], cwd=REPO, capture_output=True).returncode:
        pytest.skip(f"a shallow clone: commit {rev.group(1)[:7]} (the 'before' data module) is not in its history")
    stdout, payload = run_quick("preflight", tmp_path)
    assert "## Preflight of 2,000 instruction rows" in stdout and "## A trial's data setup" in stdout
    assert payload["before_rev"] and set(payload["runs"]) == {"tiny-llama", "bpe"}
    for tokenizer in ("tiny-llama", "bpe"):
        (before,) = payload["runs"][tokenizer]["before"]
        (after,) = payload["runs"][tokenizer]["after"]
        # The same rows either way; only the new data module keeps their tokens.
        assert before["train_rows"] == after["train_rows"] == 1000 and not before["tokenized"] and after["tokenized"]
    (before,) = payload["runs"]["tiny-llama"]["before"]
    (after,) = payload["runs"]["tiny-llama"]["after"]
    assert before["trial"]["train_rows"] == after["trial"]["train_rows"] == 1000


def test_packing_quick(tmp_path: Path) -> None:
    stdout, payload = run_quick("packing", tmp_path)
    assert "## Sequence packing: useful tokens/s" in stdout and "Target (>= 1.5x useful tokens/s" in stdout
    assert set(payload["runs"]) == {"smoke", "long-tailed"}
    for data in ("smoke", "long-tailed"):
        runs = payload["runs"][data]
        assert set(runs) == {"off", "on", "padding-free"}
        # Packed rows carry more examples per step; both packed variants train on the same tokens.
        assert runs["on"][0]["tokens"] == runs["padding-free"][0]["tokens"] > runs["off"][0]["tokens"]


def test_search_efficiency_issue_analysis_from_json(tmp_path: Path) -> None:
    """The issue-16 figures from saved runs (no training): the same budget for every method (random's
    total), steps to 1% and 5% of the best, the best at 1/3 of the budget, and the verdicts."""

    def trial(steps: int, loss: float, i: int) -> dict[str, Any]:
        return {"trial_id": f"t{i}", "status": "completed", "ended_at": float(i), "steps": steps, "best_eval_loss": loss,
                "r": 4, "target_modules": "qv", "learning_rate": 1e-3, "lora_alpha": 8.0, "lora_dropout": 0.0,
                "baseline": i == 0}

    runs = []
    for seed in range(5):
        # random: 24 full trials of 80 steps (1,920), the best (1.0) found by its last trial.
        runs.append({"method": "random", "seed": seed, "wall_s": 1.0,
                     "trials": [trial(80, 2.0 - (i == 23) * 1.0, i) for i in range(24)]})
        # default: 20-step trials, 1.0 found at trial 10 (220 steps) in 4 seeds, never in seed 4;
        # its trials past the budget (64 x 20 = 1,280 < 1,920 here) are all inside it.
        hit = 10 if seed < 4 else None
        runs.append({"method": "default", "seed": seed, "wall_s": 1.0,
                     "trials": [trial(20, 1.0 if i == hit else 1.5, i) for i in range(64)]})
        # warm: 1.0 at its 5th trial (100 steps): halves the default's 220.
        runs.append({"method": "warm", "seed": seed, "wall_s": 1.0,
                     "trials": [trial(20, 1.0 if i == 4 else 1.5, i) for i in range(64)]})
    saved = tmp_path / "issue.json"
    saved.write_text(json.dumps({"space_name": "issue", "seeds": list(range(5)), "runs": runs, "machine": {}}))
    out = tmp_path / "analysis.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "search_efficiency.py"), "--from-json", str(saved), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["budget_steps"] == 1920 and summary["best_at_third_of_random"]["steps"] == 640
    default = summary["methods"]["default"]
    assert default["steps_to_1%"] == [220, 220, 220, 220, None] and default["within_third_1%"] == 4
    assert summary["methods"]["random"]["steps_to_1%"] == [1920] * 5
    assert default["best_at_third"] == [1.0, 1.0, 1.0, 1.0, 1.5]
    assert summary["verdict"]["default_target_met"] is True
    assert summary["verdict"]["warm_halves_default"] == [True, True, True, True, None]
    assert "4/5 -> met" in proc.stdout
