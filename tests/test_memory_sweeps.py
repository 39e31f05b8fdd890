"""Memory-aware sweeps end to end: OOM handling in the trainable, OOM-aware search and admission,
GPU packing, and multi-objective search, with real Ray and real tiny QLoRA training on CPU.

OOMs are fault-injected through the trainable's callback seam (train.callbacks with
tests/fault_plugins.py's `oom_above`: a trial whose predicted memory is above
$QLORA_SWEEP_TEST_OOM_ABOVE_MIB raises torch.OutOfMemoryError at its first training step), and
thresholds are derived from the estimator's own predictions, so no figure is hard-coded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sweeps.plan import trial_job
from sweeps.spec import parse_spec
from tests.conftest import TRIAL_CONFIG, make_spec_dict, ray_pids, wait_for_no_ray_processes
from tests.fault_plugins import OOM_ABOVE, OOM_ABOVE_ENV

pytestmark = pytest.mark.integration

TRIAL = TRIAL_CONFIG
INJECT = OOM_ABOVE_ENV


def tiny_config() -> Any:
    from transformers import AutoConfig

    from trainables.tiny_models import materialize

    return AutoConfig.from_pretrained(materialize("builtin:tiny-llama"))


def predicted(spec, config: dict[str, Any]) -> float:
    from trainables.training_setup import TrainingSetup
    from trainables.trial_memory import MemoryKnobs, estimate_for_trial, predicted_mib

    setup = TrainingSetup.resolve(spec.model, spec.train, "cuda", bf16_supported=True)
    knobs = MemoryKnobs.from_config(config, spec.train.batch_size, spec.data.max_seq_length)
    return predicted_mib(estimate_for_trial(tiny_config(), setup, knobs))


def between(low: float, high: float) -> str:
    assert low < high, (low, high)
    return str((low + high) / 2)


@pytest.fixture
def inject_oom(monkeypatch: pytest.MonkeyPatch):
    def set_threshold(mib: str) -> None:
        monkeypatch.setenv(INJECT, mib)

    return set_threshold


def result_lines(trial_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


# --- the trainable ----------------------------------------------------------------------------------


def test_an_oom_trial_reports_oom_and_returns_and_the_next_trial_trains(inject_oom) -> None:
    from trainables.qlora import run_trial

    spec = parse_spec(make_spec_dict(train={"max_steps": 20, "eval_every": 10, "batch_size": 8, "callbacks": [OOM_ABOVE]}))
    small = {**TRIAL, "batch_size": 2}
    inject_oom(between(predicted(spec, small), predicted(spec, TRIAL)))
    reports: list[dict[str, Any]] = []
    last = run_trial(TRIAL, trial_job(spec), report=lambda m, c=None: reports.append(m))  # returns: no exception for Tune to retry
    assert [r["trial_status"] for r in reports] == ["oom"] and last is not None
    oom = reports[0]
    assert oom["oom_message"].startswith(f"injected by {INJECT}=") and oom["oom_batch_size"] == 8
    assert math.isnan(oom["eval_loss"]) and oom["peak_memory_mib"] > 0 and oom["memory_kind"] == "host_rss"
    assert oom["predicted_memory_mib"] == predicted(spec, TRIAL)

    # The same process trains the next trial normally: nothing of the OOM trial is left in the way.
    reports.clear()
    last = run_trial(small, trial_job(spec), report=lambda m, c=None: reports.append(m))
    assert [r["step"] for r in reports] == [10, 20] and "trial_status" not in last
    assert last["predicted_memory_mib"] == predicted(spec, small) and last["micro_batch_size"] == 2


def test_oom_retry_halves_the_micro_batch_and_keeps_the_effective_batch(inject_oom) -> None:
    from trainables.qlora import run_trial

    spec = parse_spec(make_spec_dict(train={
        "max_steps": 20, "eval_every": 10, "batch_size": 8, "grad_accum": 1, "oom_retry": True, "callbacks": [OOM_ABOVE],
    }))
    inject_oom(between(predicted(spec, {**TRIAL, "batch_size": 4}), predicted(spec, TRIAL)))
    reports: list[dict[str, Any]] = []
    last = run_trial(TRIAL, trial_job(spec), report=lambda m, c=None: reports.append(m))
    assert [r["step"] for r in reports] == [10, 20] and "trial_status" not in last
    assert last["micro_batch_size"] == 4 and last["grad_accum"] == 2  # 8 x 1 = 4 x 2 examples per step
    assert last["oom_retry"].startswith("micro-batch 8 -> 4, grad_accum 1 -> 2 after: injected by")
    assert last["predicted_memory_mib"] == predicted(spec, {**TRIAL, "batch_size": 4})


# --- sweeps ---------------------------------------------------------------------------------------


def test_oom_aware_sweep_never_trains_what_an_oom_dominates(tmp_path: Path, inject_oom) -> None:
    """Admission (GPU size in the spec) and injected OOMs in one small sweep on one worker process."""
    from analysis.report import write_report
    from analysis.results import load_experiment
    from sweeps.memory_plan import MemoryPlan
    from sweeps.driver import run_sweep
    from trainables.trial_memory import MemoryKnobs

    raw = make_spec_dict(
        space={"r": [4, 16], "target_modules": ["qv", "attention", "all-linear"], "batch_size": [2, 4, 8]},
        # Seeded proposals that put an OOM before a completed trial on the one worker (check (d) below);
        # plain TPE, as when this seed was chosen, not the default's multivariate options.
        search={"num_samples": 5, "max_concurrent": 1, "seed": 1,
                "tpe": {"multivariate": False, "group": False, "constant_liar": False}},
        train={"max_steps": 20, "eval_every": 10, "max_failures": 2, "callbacks": [OOM_ABOVE]},
    )
    base = parse_spec(raw)
    config = tiny_config()
    plan = MemoryPlan(base, config, None)
    knobs = [
        MemoryKnobs(r=r, target_modules=t, batch_size=b, seq_len=64)
        for r in (4, 16) for t in ("qv", "attention", "all-linear") for b in (2, 4, 8)
    ]
    mib = {k: predicted(base, {"r": k.r, "target_modules": k.target_modules, "batch_size": k.batch_size}) for k in knobs}
    need = {k: plan.needed_gib(plan.estimate(k)) for k in knobs}
    # Micro-batch 2 trains, 4 runs out of memory (injected), 8 is predicted not to fit the GPU.
    inject_oom(between(max(v for k, v in mib.items() if k.batch_size == 2), min(v for k, v in mib.items() if k.batch_size == 4)))
    gpu = float(between(max(v for k, v in need.items() if k.batch_size <= 4), min(v for k, v in need.items() if k.batch_size == 8)))
    spec = parse_spec({**raw, "resources": {**raw["resources"], "gpu_memory_gib": gpu}})

    before = ray_pids()
    outcome = run_sweep(spec, storage_override=str(tmp_path), name="oom", address="local", log=lambda _: None)
    assert not wait_for_no_ray_processes(ignore=before)
    experiment = Path(outcome.experiment_dir)
    trials = load_experiment(str(experiment)).trials.set_index("trial_id")
    launched = trials[trials["status"] != "infeasible"]
    assert len(launched) == 5 and outcome.num_errors == 0  # (a) the sweep finished, nothing crashed
    statuses = launched["status"].value_counts().to_dict()
    assert statuses.get("oom", 0) >= 1 and statuses.get("completed", 0) >= 1, statuses

    def knobs_of(row: pd.Series) -> MemoryKnobs:
        return MemoryKnobs(
            r=int(row["r"]), target_modules=str(row["target_modules"]), batch_size=int(row["batch_size"]), seq_len=64,
            lora_dropout=float(row["lora_dropout"]),
        )

    ooms = launched[launched["status"] == "oom"]
    for trial_id, row in launched.iterrows():
        assert (row["status"] == "oom") == (int(row["batch_size"]) == 4), (trial_id, row["status"], row["batch_size"])
        assert int(row["batch_size"]) != 8, "a configuration predicted not to fit was launched"
        for oom_id, oom in ooms.iterrows():
            if oom_id != trial_id and oom["ended_at"] <= row["started_at"]:
                # (b) nothing an earlier OOM dominates was trained, and (c) no OOM config ran twice
                assert not plan.at_least_as_large(knobs_of(oom), knobs_of(row)), (oom_id, trial_id)
    assert (ooms["error"].str.startswith(f"injected by {INJECT}")).all()

    rejected = trials[trials["status"] == "infeasible"]
    assert len(rejected) >= 1, "the space is two-thirds infeasible or dominated; proposals must have been rejected"
    for row_id, row in rejected.iterrows():
        reason = row["infeasible_reason"]
        if reason.startswith("dominated by OOM config "):
            oom_id = reason.split()[4]
            assert trials.loc[oom_id, "status"] == "oom" and plan.at_least_as_large(knobs_of(trials.loc[oom_id]), knobs_of(row))
        else:
            assert reason.startswith("predicted not to fit") and need[knobs_of(row)] > gpu, (row_id, reason)
            assert row["predicted_memory_mib"] == mib[knobs_of(row)]

    # (d) The OOM did not poison the worker: with reuse_actors a later trial in the same process trained.
    runs = {tid: result_lines(experiment / f"trial_{tid}") for tid in launched.index}
    pid = {tid: lines[-1]["pid"] for tid, lines in runs.items()}
    assert any(
        pid[ok] == pid[oom] and launched.loc[ok, "started_at"] >= launched.loc[oom, "ended_at"]
        for oom in ooms.index
        for ok in launched.index[launched["status"] == "completed"]
    ), (pid, launched[["status", "started_at", "ended_at"]])
    for tid in ooms.index:
        assert [line.get("trial_status") for line in runs[tid]] == ["oom"]  # reported once, never retried

    report = (Path(write_report(str(experiment)).report_dir) / "report.md").read_text()
    assert "## Memory: predicted vs measured" in report and "n/a (measured host RSS, not comparable)" in report
    plural = lambda n, noun: f"{n} {noun}{'' if n == 1 else 's'}"  # noqa: E731
    assert f"{plural(len(rejected), 'configuration')} rejected before launch" in report
    assert f"{plural(len(ooms), 'trial')} ran out of memory" in report
    assert "dominated by OOM config" in report or "predicted not to fit" in report


def test_packing_shares_one_logical_gpu_between_trials(tmp_path: Path) -> None:
    """A local Ray declaring one GPU on a CPU machine: trials ask for the share their prediction needs."""
    import ray

    from analysis.memory_report import packing_summary
    from analysis.report import write_report
    from analysis.results import load_experiment
    from sweeps.admission import trial_resources
    from sweeps.memory_plan import GpuSize, memory_plan
    from sweeps.driver import run_sweep

    spec = parse_spec(
        make_spec_dict(
            space={"r": [4, 16], "target_modules": ["qv", "all-linear"]},
            search={"num_samples": 3, "max_concurrent": 2, "seed": 0},
            resources={"gpus_per_trial": 1, "cpus_per_trial": 1, "pack": True, "gpu_memory_gib": 2},
        )
    )
    plan = memory_plan(spec, tiny_config(), GpuSize(2.0, "resources.gpu_memory_gib"))
    before = ray_pids()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        outcome = run_sweep(spec, storage_override=str(tmp_path), name="packed", address="auto", log=lambda _: None)
    finally:
        ray.shutdown()
    assert not wait_for_no_ray_processes(ignore=before)
    trials = load_experiment(outcome.experiment_dir).trials
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}
    for row in trials.to_dict("records"):
        config = {k: row[k] for k in ("r", "target_modules", "batch_size", "lora_dropout")}
        share = trial_resources(config, plan=plan).required_resources["GPU"]
        assert 0 < share < 0.5 and row["gpu_fraction"] == pytest.approx(share)  # what Tune gave the trial
        assert row["gpu_ids"] == "0" and row["device"] == "cpu"  # the one logical GPU; training ran on CPU
    lines = result_lines(Path(trials["trial_dir"].iloc[0]))
    assert lines[-1]["gpu_fraction_enforced"] is False and "logical only" in lines[-1]["gpu_fraction_note"]
    summary = packing_summary(trials)
    assert summary is not None and summary.gpus == 1 and summary.max_per_gpu >= 2 and summary.logical
    assert summary.busy_gpu_hours < summary.unpacked_gpu_hours
    report = (Path(write_report(outcome.experiment_dir).report_dir) / "report.md").read_text()
    assert "## GPU packing" in report and "this was a CPU run: the GPU was logical" in report


def test_multi_objective_sweep_finds_a_pareto_front(tmp_path: Path) -> None:
    import optuna

    from analysis.report import write_report
    from sweeps.driver import run_sweep

    spec = parse_spec(
        make_spec_dict(
            search={"num_samples": 3, "max_concurrent": 2, "seed": 0, "objectives": ["eval_loss", "peak_memory"]},
            scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}},
        )
    )
    before = ray_pids()
    outcome = run_sweep(spec, storage_override=str(tmp_path), name="pareto", address="local", log=lambda _: None)
    assert not wait_for_no_ray_processes(ignore=before)
    assert outcome.num_trials == 3 and outcome.num_errors == 0
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{Path(outcome.experiment_dir) / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert study.best_trials and all(len(t.values) == 2 for t in study.best_trials)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    report = (Path(write_report(outcome.experiment_dir).report_dir) / "report.md").read_text()
    assert "Objectives: eval_loss, peak_memory_mib (multi-objective; ASHA on eval_loss)" in report
    assert "## Pareto front of the searched objectives (multi-objective mode)" in report
    front_ids = {t.user_attrs["ray_trial_id"] for t in study.best_trials}
    section = report.split("## Pareto front of the searched objectives")[1].split("\n## ")[0]
    assert any(tid in section for tid in front_ids)


def test_injected_oom_threshold_must_be_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fault_plugins import oom_above
    from trainables.params import TrialConfig
    from trainables.qlora import TrialContext
    from trainables.training_setup import TrainingSetup

    spec = parse_spec(make_spec_dict(train={"callbacks": [OOM_ABOVE]}))

    def context(predicted_mib: float) -> TrialContext:
        return TrialContext(
            trial=TrialConfig.from_tune(TRIAL, spec.train.batch_size), job=trial_job(spec),
            setup=TrainingSetup.resolve(spec.model, spec.train, "cpu"), predicted_memory_mib=predicted_mib,
            attempt=1, grad_accum=1,
        )

    monkeypatch.setenv(INJECT, "lots")
    with pytest.raises(ValueError, match=rf"{INJECT}='lots' is not a number of MiB"):
        oom_above(context(10.0))
    monkeypatch.setenv(INJECT, "20")
    assert oom_above(context(10.0)) is None  # below the threshold: no callback
    assert oom_above(context(30.0)) is not None
    monkeypatch.delenv(INJECT)
    assert oom_above(context(1e9)) is None  # unset: never injects
    assert os.environ.get(INJECT) is None
