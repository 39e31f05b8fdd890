"""Memory admission, OOM dominance and GPU shares (sweeps/admission.py), with the real Optuna searcher.

No Ray cluster: the searchers are plain objects driven the way Tune drives them (suggest, then
on_trial_complete), and Tune's own SearchGenerator saves and restores them. Predictions come from the
real estimator on a Llama config built in the test (no weights).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import optuna
import pytest
from transformers import LlamaConfig

from sweeps.admission import MEMORY_CONSTRAINT, OOM_CONSTRAINT, AdmissionSearch, trial_resources
from sweeps.memory_plan import GpuSize, MemoryPlan, detect_gpu_size, memory_plan
from sweeps.driver import make_sampler
from sweeps.searcher import make_searcher, search_space
from sweeps.spec import SpecError, parse_spec
from tests.conftest import make_spec_dict
from trainables.training_setup import TrainingSetup
from trainables.trial_memory import MemoryKnobs, estimate_for_trial

# A small Llama (weights are never built: the estimator reads shapes on the meta device).
CONFIG = LlamaConfig(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
SEQ = 1024


def spec_for(sampler: str = "random", objectives: list[str] | None = None, **resources: object):
    search = {"num_samples": 12, "optuna_storage": "memory", "sampler": sampler, "seed": 3}
    if objectives:
        search["objectives"] = objectives
    return parse_spec(
        make_spec_dict(
            space={"r": [4, 64], "target_modules": ["qv", "attention", "all-linear"], "batch_size": [2, 64]},
            data={"max_seq_length": SEQ},
            search=search,
            resources={"gpus_per_trial": 0, **resources},
        )
    )


def knobs(r: int, targets: str, batch: int, seq: int = SEQ, dropout: float = 0.0, dora: bool = False) -> MemoryKnobs:
    return MemoryKnobs(r=r, target_modules=targets, batch_size=batch, seq_len=seq, lora_dropout=dropout, use_dora=dora)


def knobs_of(spec, config: dict) -> MemoryKnobs:
    """The memory knobs of a trial config as Tune passes it."""
    return MemoryKnobs.from_config(config, spec.train.batch_size, spec.data.max_seq_length)


def needed(spec, knobs: MemoryKnobs) -> float:
    plan = MemoryPlan(spec, CONFIG, None)
    return plan.needed_gib(plan.estimate(knobs))


def midpoint_gpu(spec) -> GpuSize:
    """A GPU between the space's smallest and largest prediction, so both outcomes happen."""
    low = needed(spec, knobs(4, "qv", 2))
    high = needed(spec, knobs(64, "all-linear", 64))
    assert low < high
    return GpuSize((low + high) / 2, "test")


def searcher_for(spec, plan: MemoryPlan, folder: Path) -> tuple[AdmissionSearch, list[str]]:
    lines: list[str] = []
    inner = make_searcher(spec, search_space(spec), make_sampler(spec), "min")
    return AdmissionSearch(inner, plan, str(folder), out=lines.append), lines


def rows(folder: Path) -> list[dict]:
    path = folder / "infeasible.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finish(search: AdmissionSearch, trial_id: str, loss: float, memory: float = 100.0) -> None:
    search.on_trial_complete(trial_id, {"eval_loss": loss, "peak_memory_mib": memory, "training_iteration": 1})


# --- the one mapping -----------------------------------------------------------------------------


def estimator_arguments(spec, trial: MemoryKnobs, device: str, bf16_supported: bool = True) -> dict:
    setup = TrainingSetup.resolve(spec.model, spec.train, device, bf16_supported=bf16_supported)
    return setup.estimator_arguments(trial, CONFIG.model_type)


def test_estimator_arguments_follow_the_trainable_setup_per_device() -> None:
    spec = spec_for()
    trial = knobs(8, "qv", 4, dropout=0.05)
    cuda = estimator_arguments(spec, trial, "cuda")
    assert cuda["compute_dtype"] == "bfloat16" and cuda["autocast"] and cuda["lora_dtype"] == "bfloat16"
    assert cuda["optimizer"] == "paged_adamw_32bit" and cuda["upcast_non_quantized"] and cuda["fused_lm_head"]
    assert cuda["target_modules"] == ["q_proj", "v_proj"] and cuda["batch_size"] == 4 and cuda["seq_len"] == SEQ
    old_gpu = estimator_arguments(spec, trial, "cuda", bf16_supported=False)
    assert old_gpu["compute_dtype"] == "float16" and old_gpu["lora_dtype"] == "bfloat16"  # TRL's cast
    cpu = estimator_arguments(spec, trial, "cpu")
    assert cpu["compute_dtype"] == "float32" and not cpu["autocast"] and cpu["lora_dtype"] == "float32"
    assert cpu["optimizer"] == "adamw_torch"
    baseline = spec.model_copy(update={"model": spec.model.model_copy(update={"quantization": "none"})})
    plain = estimator_arguments(baseline, trial, "cuda")
    assert plain["lora_dtype"] == "float32" and not plain["upcast_non_quantized"]  # PEFT's fp32 adapters


# --- dominance ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("small", "large", "expected"),
    [
        (knobs(8, "qv", 4), knobs(8, "attention", 4), True),
        (knobs(8, "attention", 4), knobs(8, "all-linear", 4), True),
        (knobs(8, "mlp", 4), knobs(8, "all-linear", 4), True),
        (knobs(8, "mlp", 4), knobs(8, "attention", 4), False),  # neither contains the other
        (knobs(8, "attention", 4), knobs(8, "qv", 4), False),
        (knobs(8, "q_proj+v_proj", 4), knobs(8, "qv", 4), True),  # a list vs its preset
        (knobs(8, "q_proj", 4), knobs(16, "q_proj+k_proj", 8, 2 * SEQ), True),
        (knobs(16, "qv", 4), knobs(8, "all-linear", 64), False),  # smaller rank
        (knobs(8, "qv", 8), knobs(8, "all-linear", 4), False),  # smaller micro-batch
        (knobs(8, "qv", 4), knobs(8, "qv", 4, SEQ // 2), False),  # shorter sequences
        (knobs(8, "qv", 4, dropout=0.05), knobs(8, "qv", 4, dropout=0.0), False),  # dropout masks gone
        (knobs(8, "qv", 4, dropout=0.05), knobs(8, "qv", 4, dropout=0.1), True),
        # use_dora is a memory knob of the registry (a "flag"): DoRA on is at least as large as off.
        (knobs(8, "qv", 4), knobs(8, "qv", 4, dora=True), True),
        (knobs(8, "qv", 4, dora=True), knobs(8, "all-linear", 4), False),  # DoRA's vectors gone
    ],
)
def test_at_least_as_large_in_every_memory_dimension(small: MemoryKnobs, large: MemoryKnobs, expected: bool) -> None:
    plan = MemoryPlan(spec_for(), CONFIG, None)
    assert plan.at_least_as_large(small, large) is expected
    if expected:  # what the ordering promises: the estimator agrees memory does not shrink
        assert estimate_for_trial(CONFIG, plan.setup, large).reserved_bytes >= estimate_for_trial(CONFIG, plan.setup, small).reserved_bytes


# --- admission ---------------------------------------------------------------------------------------


def test_proposals_predicted_not_to_fit_are_recorded_and_replaced(tmp_path: Path) -> None:
    spec = spec_for()
    gpu = midpoint_gpu(spec)
    plan = MemoryPlan(spec, CONFIG, gpu)
    search, lines = searcher_for(spec, plan, tmp_path)
    admitted = []
    for i in range(8):
        config = search.suggest(f"t{i}")
        admitted.append(config)
        finish(search, f"t{i}", loss=1.0 + i / 10)
    for config in admitted:
        assert needed(spec, knobs_of(spec, config)) <= gpu.gib, config
    rejected = rows(tmp_path)
    assert rejected, "with half the space too large, some proposals must have been rejected"
    assert search.rejected["memory"] == len(rejected) == len(lines)
    for row in rejected:
        assert needed(spec, knobs_of(spec, row)) > gpu.gib
        assert row["predicted_memory_mib"] > 0 and row["trial_id"].startswith("t")
        assert row["infeasible_reason"].startswith("predicted not to fit:") and f"> {gpu.gib:g} GiB GPU" in row["infeasible_reason"]
    assert len({row["trial_id"] for row in rejected}) == len(rejected)

    study = search.searcher._ot_study
    trials = study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == len(rejected) and all(t.constraints[MEMORY_CONSTRAINT] > 0 for t in pruned)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8 and all(t.constraints[MEMORY_CONSTRAINT] <= 0 for t in complete)
    # Constraints come from the parameters, so Optuna's best trial is a real, feasible one.
    assert study.best_trials and study.best_trial.number in {t.number for t in complete}
    # Tune trial ids map back to the Optuna trials that ran them, also after a re-ask.
    assert {t.user_attrs["ray_trial_id"] for t in complete} == {f"t{i}" for i in range(8)}
    assert {t.user_attrs["ray_trial_id"] for t in pruned} == {row["trial_id"] for row in rejected}


def test_tpe_learns_from_infeasible_proposals(tmp_path: Path) -> None:
    """With constraints set from the parameters, TPE proposes fewer infeasible configurations than random."""
    counts = {}
    for sampler in ("random", "tpe"):
        spec = spec_for(sampler=sampler)
        search, _ = searcher_for(spec, MemoryPlan(spec, CONFIG, midpoint_gpu(spec)), tmp_path / sampler)
        for i in range(30):
            search.suggest(f"t{i}")
            finish(search, f"t{i}", loss=1.0)
        counts[sampler] = search.rejected["memory"]
    assert counts["tpe"] < counts["random"], counts


def test_a_space_where_nothing_fits_stops_before_launch() -> None:
    spec = spec_for()
    smallest = needed(spec, knobs(4, "qv", 2))
    with pytest.raises(SpecError, match=r"every configuration of the space is predicted not to fit: the smallest \(r=4, target_modules=qv, batch_size=2"):
        memory_plan(spec, CONFIG, GpuSize(smallest * 0.9, "test"))
    memory_plan(spec, CONFIG, GpuSize(smallest * 1.01, "test"))  # the smallest fits: fine


def test_the_search_gives_up_with_a_message_when_proposals_keep_being_rejected(tmp_path: Path) -> None:
    spec = spec_for()
    plan = MemoryPlan(spec, CONFIG, GpuSize(0.01, "test"))  # nothing fits (memory_plan would refuse it)
    search, lines = searcher_for(spec, plan, tmp_path)
    search.max_rejections = 5
    assert search.suggest("t0") == "FINISHED"
    assert len(rows(tmp_path)) == 5 and "stopping the search: the last 5 proposals" in lines[-1]
    assert search.suggest("t1") == "FINISHED"


# --- OOM-aware search ------------------------------------------------------------------------------


def test_proposals_at_least_as_large_as_an_oom_config_are_rejected(tmp_path: Path) -> None:
    spec = spec_for()
    search, _ = searcher_for(spec, MemoryPlan(spec, CONFIG, None), tmp_path)  # GPU unknown: OOMs only
    oom_id = None
    for i in range(20):  # the first qv proposal runs out of memory (at micro-batch 2, after a retry)
        config = search.suggest(f"pre{i}")
        if config["target_modules"] == "qv":
            oom_id = f"pre{i}"
            break
        finish(search, f"pre{i}", loss=1.0)
    assert oom_id is not None
    oom = knobs_of(spec, {**config, "batch_size": 2})
    result = {"trial_status": "oom", "eval_loss": float("nan"), "peak_memory_mib": 5.0, "training_iteration": 1, "oom_batch_size": 2}
    search.on_trial_result(oom_id, result)
    search.on_trial_complete(oom_id, result)
    assert search.ooms == {oom_id: oom}
    plan = search.plan
    for i in range(25):
        config = search.suggest(f"t{i}")
        assert not plan.at_least_as_large(oom, knobs_of(spec, config)), (oom, config)
        finish(search, f"t{i}", loss=1.0)
    dominated = rows(tmp_path)
    assert dominated and search.rejected == {"memory": 0, "oom_dominated": len(dominated)}
    for row in dominated:
        assert plan.at_least_as_large(oom, knobs_of(spec, row))
        assert row["infeasible_reason"].startswith(f"dominated by OOM config {oom_id} (")
    study = search.searcher._ot_study
    oom_trial = next(t for t in study.trials if t.user_attrs.get("ray_trial_id") == oom_id)
    assert oom_trial.state == optuna.trial.TrialState.PRUNED and oom_trial.constraints[OOM_CONSTRAINT] > 0
    assert study.best_trials and oom_trial.number not in {t.number for t in study.best_trials}


def test_an_oom_after_a_retry_counts_with_the_micro_batch_that_failed(tmp_path: Path) -> None:
    spec = spec_for()
    search, _ = searcher_for(spec, MemoryPlan(spec, CONFIG, None), tmp_path)
    config = search.suggest("t0")
    proposed = knobs_of(spec, config)
    search.on_trial_complete("t0", {"trial_status": "oom", "eval_loss": float("nan"), "oom_batch_size": 1})
    assert search.ooms["t0"] == dataclasses.replace(proposed, batch_size=1)


def test_admission_state_survives_tunes_save_and_restore(tmp_path: Path) -> None:
    """Tune pickles the searcher chain in tuner.pkl at the start, saves each wrapper's get_state() and
    the base searcher with the experiment, and on resume restores both into the unpickled chain."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.search_generator import SearchGenerator

    spec = spec_for()
    search, _ = searcher_for(spec, MemoryPlan(spec, CONFIG, midpoint_gpu(spec)), tmp_path / "exp")
    limiter = ConcurrencyLimiter(search, max_concurrent=2)
    at_start = pickle.dumps(limiter)  # what tuner.pkl holds (TuneConfig.search_alg)
    generator = SearchGenerator(limiter)
    for i in range(6):
        limiter.suggest(f"t{i}")
        if i == 0:
            limiter.on_trial_complete("t0", {"trial_status": "oom", "eval_loss": float("nan"), "oom_batch_size": 2})
        else:
            limiter.on_trial_complete(f"t{i}", {"eval_loss": 1.0, "training_iteration": 1})
    running = None  # the first trial that runs under an alias (its first proposal was rejected) is
    for i in range(6, 30):  # still running when the driver dies
        assert limiter.suggest(f"t{i}") is not None
        if f"t{i}" in search.aliases:
            running = f"t{i}"
            break
        limiter.on_trial_complete(f"t{i}", {"eval_loss": 1.0, "training_iteration": 1})
    assert running is not None
    checkpoint = tmp_path / "state"
    checkpoint.mkdir()
    generator.save_to_dir(str(checkpoint), session_str="s")

    restored = SearchGenerator(pickle.loads(at_start))
    restored.restore_from_dir(str(checkpoint))
    again = restored.searcher.searcher
    assert isinstance(again, AdmissionSearch)
    assert again.ooms == search.ooms and again.aliases == search.aliases and again.rejected == search.rejected
    assert running in again.aliases
    # The continued trial reports to the Optuna trial it was proposed under, through its alias.
    again.on_trial_complete(running, {"eval_loss": 0.5, "training_iteration": 1})
    study = again.searcher._ot_study
    done = [t for t in study.trials if t.user_attrs.get("ray_trial_id") == running]
    assert [t.state for t in done] == [optuna.trial.TrialState.COMPLETE] and done[0].value == 0.5
    # And the restored wrapper still filters what the OOM dominates.
    for i in range(30, 38):
        config = restored.searcher.suggest(f"t{i}")
        assert not again.plan.at_least_as_large(search.ooms["t0"], knobs_of(spec, config))
        restored.searcher.on_trial_complete(f"t{i}", {"eval_loss": 1.0, "training_iteration": 1})


# --- multi-objective -----------------------------------------------------------------------------


def test_multi_objective_study_has_two_directions_and_a_front_despite_infeasible_trials(tmp_path: Path) -> None:
    spec = spec_for(sampler="tpe", objectives=["eval_loss", "peak_memory"])
    search, _ = searcher_for(spec, MemoryPlan(spec, CONFIG, midpoint_gpu(spec)), tmp_path)
    assert search.metric == ["eval_loss", "peak_memory_mib"] and search.mode == ["min", "min"]
    for i in range(10):
        search.suggest(f"t{i}")
        finish(search, f"t{i}", loss=2.0 - i / 10, memory=100.0 + 10 * (i % 3))
    search.suggest("oom")
    search.on_trial_complete("oom", {"trial_status": "oom", "eval_loss": float("nan"), "peak_memory_mib": 9.0})
    search.suggest("nan")  # e.g. a diverged trial: incomplete values end PRUNED instead of staying RUNNING
    search.on_trial_complete("nan", {"eval_loss": float("nan"), "peak_memory_mib": 100.0})
    study = search.searcher._ot_study
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    front = study.best_trials
    assert front and all(t.state == optuna.trial.TrialState.COMPLETE and len(t.values) == 2 for t in front)
    assert rows(tmp_path), "the infeasible half of the space was proposed and rejected"


# --- GPU size and packing ------------------------------------------------------------------------


def test_gpu_size_comes_from_the_spec_then_the_cluster() -> None:
    gpu_spec = spec_for(gpus_per_trial=1)
    assert detect_gpu_size(spec_for(gpu_memory_gib=24), {}, local=False) == GpuSize(24.0, "resources.gpu_memory_gib")
    found = detect_gpu_size(gpu_spec, {"GPU": 8, "accelerator_type:A100": 1, "accelerator_type:L4": 1}, local=False)
    assert found is not None and found.gib == 22.0 and "accelerator_type:L4" in found.source  # the smaller GPU
    assert detect_gpu_size(gpu_spec, {"GPU": 1, "accelerator_type:Quantum-9000": 1}, local=False) is None
    assert detect_gpu_size(spec_for(), {"accelerator_type:A100": 1}, local=False) is None  # CPU trials


def test_packed_trials_ask_for_the_gpu_share_their_prediction_needs() -> None:
    spec = spec_for(gpus_per_trial=1, pack=True, gpu_memory_gib=8, memory_margin=0.2)
    plan = memory_plan(spec, CONFIG, GpuSize(8.0, "resources.gpu_memory_gib"))
    small = {"r": 4, "target_modules": "qv", "batch_size": 2, "lora_dropout": 0.0}
    large = {"r": 64, "target_modules": "all-linear", "batch_size": 64, "lora_dropout": 0.0}
    shares = {}
    for name, config in (("small", small), ("large", large)):
        estimate = estimate_for_trial(CONFIG, plan.setup, knobs_of(spec, config))
        want = estimate.total_with_context_gib * 1.2 / 8
        request = trial_resources(config, plan=plan).required_resources
        assert request["CPU"] == 1.0 and want <= request["GPU"] < want + 0.01, (request, want)
        shares[name] = request["GPU"]
    assert shares["small"] < shares["large"] < 1


def test_pack_without_a_known_gpu_size_is_a_spec_error() -> None:
    spec = spec_for(gpus_per_trial=1, pack=True)
    with pytest.raises(SpecError, match=r"resources\.pack: the GPU size is unknown .* set resources\.gpu_memory_gib"):
        memory_plan(spec, CONFIG, None)


def test_run_refuses_a_space_that_cannot_fit_the_spec_gpu_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sweeps.cli import main
    from tests.conftest import ray_processes, write_spec

    spec_file = write_spec(tmp_path / "tiny.yaml", make_spec_dict(resources={"gpus_per_trial": 0, "gpu_memory_gib": 0.1}))
    before = {p.pid for p in ray_processes()}
    code = main(["run", str(spec_file), "--storage", str(tmp_path / "results"), "--name", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "every configuration of the space is predicted not to fit: the smallest (r=4, target_modules=qv" in err
    assert "> 0.1 GiB GPU (resources.gpu_memory_gib)" in err and "target a larger GPU" in err
    assert {p.pid for p in ray_processes()} <= before  # no Ray started
    assert not (tmp_path / "results" / "nope").exists()
