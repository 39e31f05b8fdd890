"""The embedded default, end to end: `qlora-sweep run sweeps/smoke.yaml` on a local Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from analysis.results import read_trials_csv
from tests.conftest import REPO, ray_processes, wait_for_no_ray_processes

pytestmark = pytest.mark.integration


def test_smoke_sweep_runs_end_to_end_and_writes_its_report(tmp_path: Path) -> None:
    assert not ray_processes(), "a Ray of this test run is still up; this test must see its own processes only"
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "run", "sweeps/smoke.yaml", "--storage", str(tmp_path), "--name", "smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    experiment = tmp_path / "smoke"
    assert f"report:     {experiment / 'report'}" in result.stdout

    trials = read_trials_csv(experiment / "report" / "trials.csv")
    assert len(trials) == 12
    assert trials["status"].notna().all()
    assert set(trials["status"]) <= {"completed", "early_stopped"}, trials["status"].value_counts()
    assert (trials["status"] == "early_stopped").sum() >= 1, "ASHA stopped no trial early"
    assert (trials["status"] == "completed").sum() >= 1
    early = trials[trials["status"] == "early_stopped"]
    assert (early["steps"] < 80).all() and (trials.loc[trials["status"] == "completed", "steps"] == 80).all()

    best, worst = trials["best_eval_loss"].min(), trials["best_eval_loss"].max()
    assert best < 0.5 * worst, f"configurations should differ visibly: best {best}, worst {worst}"
    # Optuna proposed different configurations, over every searched dimension.
    for column in ("r", "lora_alpha", "target_modules", "learning_rate"):
        assert trials[column].nunique() > 1, column
    # Every number comes from a real CPU run, labelled as host RSS, never as VRAM.
    assert set(trials["memory_kind"]) == {"host_rss"}
    assert (trials["peak_memory_mib"] > 100).all() and (trials["trainable_params"] > 0).all()
    assert (trials["node"] == "127.0.0.1").all()
    assert "host RSS (CPU, not VRAM)" in (experiment / "report" / "report.md").read_text()
    # Beside host RSS every trial measured its CPU tensor peak, which moves with the configuration
    # (RSS barely does) and which the estimator's CPU prediction meets within 10%.
    assert set(trials["tensor_peak_kind"]) == {"cpu_tensor_peak"}
    assert (trials["tensor_peak_mib"] > 0).all() and trials["tensor_peak_mib"].nunique() > 1
    error = (trials["predicted_tensor_peak_mib"] - trials["tensor_peak_mib"]) / trials["tensor_peak_mib"]
    assert (error.abs() <= 0.10).all(), trials[["trial_id", "tensor_peak_mib", "predicted_tensor_peak_mib"]]
    assert (trials["tensor_peak_error_pct"] - 100 * error).abs().max() < 1e-6
    # Larger r on the same targets costs more, measured and predicted alike.
    same = trials.sort_values("r").groupby(["target_modules", "lora_dropout"])
    for _, group in same:
        for lower, higher in zip(group.itertuples(), group.iloc[1:].itertuples()):
            if higher.r > lower.r:
                assert higher.predicted_tensor_peak_mib > lower.predicted_tensor_peak_mib
                assert higher.tensor_peak_mib > lower.tensor_peak_mib, (lower.trial_id, higher.trial_id)
    report = (experiment / "report" / "report.md").read_text()
    assert "## CPU tensor peak: predicted vs measured" in report and "cpu_tensor_peak" in report
    assert (experiment / "report" / "plots" / "predicted_vs_measured.png").exists()

    # Preflight's run plan is saved next to sweep_spec.yaml, with the provenance the report shows.
    from core.run_plan import load_run_plan

    plan = load_run_plan(str(experiment))
    assert plan.format_version >= 1 and plan.experiment_dir == str(experiment) and plan.study_name == "smoke"
    assert plan.model.path == "builtin:tiny-llama" and plan.model.model_type == "llama" and plan.model.num_layers
    assert set(plan.training_setup) == {"cuda", "cpu"} and plan.training_setup["cpu"]["compute_dtype"] == "float32"
    assert plan.provenance.packages.get("torch") and plan.provenance.python and plan.provenance.gpus == []
    assert "## Provenance" in (experiment / "report" / "report.md").read_text()

    leftover = wait_for_no_ray_processes()
    assert not leftover, f"Ray processes left behind: {leftover}"
