"""Search that starts from what is known (issue 16): the baseline trial, warm starts, the samplers.

Pure logic first (the recipe's mapping to a space, the spec's checks, ASHA's exemption, the
searcher's first proposal), then real sweeps of the builtin tiny model sharing one local Ray: a
sweep with the baseline and ASHA, a sweep warm-started from it, and one sweep per sampler.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml

from analysis.results import load_experiment, read_trials_csv
from sweeps.baseline import BASELINE_KEY, map_to_space
from sweeps.driver import make_sampler
from sweeps.searcher import BaselineASHAScheduler, make_searcher, search_space
from sweeps.spec import SpecError, parse_spec
from tests.conftest import make_spec_dict, wait_for_no_ray_processes

# --- the recipe in a space -----------------------------------------------------------------------


def spec_with(space: dict[str, Any] | None = None, **search: Any) -> Any:
    return parse_spec(make_spec_dict(space=space or {}, search={"optuna_storage": "memory", **search}))


def test_the_standard_recipe_in_the_default_space_is_itself() -> None:
    spec = parse_spec({"name": "d", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "x.jsonl"}})
    base = map_to_space(spec.space, spec.train.batch_size, True)
    assert base is not None and base.moved == []
    assert (base.config["r"], base.config["lora_alpha"], base.config["target_modules"]) == (16, 32.0, "all-linear")
    assert math.isclose(base.config["learning_rate"], 2e-4) and base.config["lora_dropout"] == 0.05
    assert base.params == {"r": 16, "lora_alpha_ratio": 2.0, "target_modules": "all-linear",
                           "learning_rate": 2e-4, "lora_dropout": 0.05}


def test_the_recipe_moves_to_the_nearest_point_and_says_so() -> None:
    spec = spec_with({"r": [4, 8], "lora_alpha": {"ratio": [1, 4]}, "target_modules": ["qv", "attention"],
                      "learning_rate": {"loguniform": [1e-3, 1e-2]}, "lora_dropout": [0.0, 0.1]})
    base = map_to_space(spec.space, spec.train.batch_size, True)
    assert base.params == {"r": 8, "lora_alpha_ratio": 1.0, "target_modules": "attention",
                           "learning_rate": 1e-3, "lora_dropout": 0.0}
    assert base.config["lora_alpha"] == 8.0
    moved = " ".join(base.moved)
    for name in ("r 16 -> 8", "ratio 2 -> 1", "target_modules 'all-linear' -> 'attention'", "learning_rate", "lora_dropout"):
        assert name in moved


def test_a_mapping_changes_the_recipe_and_false_turns_it_off() -> None:
    spec = spec_with({"r": [4, 8, 16], "lora_alpha": [8, 16, 32]}, baseline={"r": 4, "lora_alpha": 8})
    base = map_to_space(spec.space, spec.train.batch_size, spec.search.baseline)
    assert base.params["r"] == 4 and base.params["lora_alpha"] == 8.0
    assert map_to_space(spec.space, spec.train.batch_size, False) is None


@pytest.mark.parametrize(
    ("search", "space", "words"),
    [
        ({"baseline": {"rank": 8}}, None, ["search.baseline", "unknown hyperparameter 'rank'"]),
        ({"baseline": {"r": [8, 16]}}, None, ["search.baseline", "one value"]),
        ({"sampler": "grid"}, {"learning_rate": {"loguniform": [1e-4, 1e-3]}}, ["grid", "learning_rate is a range"]),
        ({"sampler": "bayes"}, None, ["search.sampler", "tpe", "gp", "cmaes"]),
        ({"tpe": {"multivariate": False, "group": True}}, None, ["search.tpe", "multivariate"]),
    ],
)
def test_bad_search_settings_name_the_field_and_the_fix(search: dict, space: dict | None, words: list[str]) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(make_spec_dict(search=search, **({"space": space} if space else {})))
    text = str(caught.value)
    for word in words:
        assert word in text, text


# --- the first proposal and ASHA's exemption ----------------------------------------------------


def test_the_first_proposal_is_the_baseline_and_only_it_is_marked() -> None:
    spec = spec_with({"r": [4, 8], "learning_rate": {"loguniform": [1e-3, 1e-2]}}, sampler="random")
    search = make_searcher(spec, search_space(spec), make_sampler(spec), "min")
    search.seed_study(map_to_space(spec.space, spec.train.batch_size, True), [])
    first, second = search.suggest("a"), search.suggest("b")
    assert first[BASELINE_KEY] is True and first["r"] == 8 and math.isclose(first["learning_rate"], 1e-3)
    assert BASELINE_KEY not in second


def test_a_warm_start_trial_is_never_the_answer_to_a_repeat() -> None:
    """skip_repeats answers a proposal from this sweep's own finished trials only: a warm-start trial
    (another experiment's) has no curve or adapter here, so its configuration is trained."""
    from sweeps.warm_start import WARM_START_ATTR

    spec = spec_with({"r": [4, 8], "target_modules": "qv", "learning_rate": 1e-3}, sampler="random", skip_repeats=True)
    search = make_searcher(spec, search_space(spec), make_sampler(spec), "min")
    dists = spec.space.distributions(spec.train.batch_size)
    priors = [optuna.trial.create_trial(params={"r": r}, distributions=dists, value=1.0 / r,
                                        user_attrs={WARM_START_ATTR: "/earlier"}) for r in (4, 8)]
    search.seed_study(None, priors)
    config = search.suggest("a")
    assert config is not None and config["r"] in (4, 8) and search.repeats_skipped == 0


def asha_stops_baseline(scheduler_class: type) -> str:
    """Two good trials reach round 1 first; then the baseline arrives with a worse loss."""
    scheduler = scheduler_class(time_attr="training_iteration", metric="eval_loss", mode="min", max_t=4,
                                grace_period=1, reduction_factor=2)
    trials = {name: SimpleNamespace(trial_id=name, config={BASELINE_KEY: True} if name == "base" else {})
              for name in ("good1", "good2", "base")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    for name, loss in (("good1", 1.0), ("good2", 1.1)):
        scheduler.on_trial_result(None, trials[name], {"training_iteration": 1, "eval_loss": loss})
    return scheduler.on_trial_result(None, trials["base"], {"training_iteration": 1, "eval_loss": 5.0})


def test_asha_never_stops_the_baseline() -> None:
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    assert asha_stops_baseline(BaselineASHAScheduler) == TrialScheduler.CONTINUE
    # The control: Ray's ASHA stops the same trial.
    assert asha_stops_baseline(ASHAScheduler) == TrialScheduler.STOP


# --- real sweeps ----------------------------------------------------------------------------------

SPACE = {"r": [4, 8], "lora_alpha": {"ratio": [1, 2]}, "target_modules": ["qv", "all-linear"],
         "learning_rate": {"loguniform": [2e-4, 2e-2]}, "lora_dropout": [0.0, 0.05]}


@pytest.fixture(scope="module")
def shared_ray() -> Any:
    """One local Ray for the sweeps of this module (run_sweep joins it, and leaves it up)."""
    import ray

    from sweeps.driver import connect_ray

    connect_ray("local", num_cpus=2)  # the driver's own start: the workers get its environment (WORKER_ENV)
    try:
        yield
    finally:
        ray.shutdown()
        assert not wait_for_no_ray_processes(), "Ray processes left behind"


def sweep(root: Path, name: str, **sections: Any) -> tuple[Any, list[str]]:
    from sweeps.driver import run_sweep

    spec = parse_spec(make_spec_dict(**{"space": SPACE, "train": {"max_steps": 10, "eval_every": 5, "batch_size": 8},
                                        **sections}))
    lines: list[str] = []
    outcome = run_sweep(spec, storage_override=str(root), name=name, log=lines.append)
    assert outcome.num_errors == 0, "\n".join(lines)
    return outcome, lines


@pytest.fixture(scope="module")
def baseline_sweep(shared_ray: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[str]]:
    """4 trials under ASHA (grace 1 round of 2), the baseline first."""
    return sweep(tmp_path_factory.mktemp("start"), "with-baseline",
                 search={"num_samples": 4, "max_concurrent": 2, "seed": 1},
                 scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}})


@pytest.mark.integration
def test_a_sweep_trains_the_baseline_first_to_the_full_budget(baseline_sweep: tuple[Any, list[str]]) -> None:
    outcome, lines = baseline_sweep
    trials = read_trials_csv(Path(outcome.report_dir) / "trials.csv")
    base = trials[trials["baseline"].fillna(False).astype(bool)]
    assert len(base) == 1, trials[["trial_id", "baseline"]]
    row = base.iloc[0]
    assert (row["r"], row["lora_alpha"], row["target_modules"], row["lora_dropout"]) == (8, 16.0, "all-linear", 0.05)
    assert math.isclose(row["learning_rate"], 2e-4)
    assert row["status"] == "completed" and row["steps"] == 10
    assert any("baseline (trial 0, trained to the full budget)" in line and "r 16 -> 8" in line for line in lines), lines
    # The report's first line compares the best with the baseline, in the objective and in memory.
    report = (Path(outcome.report_dir) / "report.md").read_text()
    first = next(line for line in report.splitlines() if line.startswith("- "))
    assert first.startswith("- vs baseline:") and "eval_loss" in first, first
    summary = outcome.summary["summary"]
    assert summary[0].startswith("vs baseline:") and "recommended:" in summary[1]
    assert outcome.summary["baseline"]["trial_id"] == row["trial_id"] and outcome.summary["recommended"]
    if "best trial" in summary[0]:
        assert "peak memory" in summary[0] and "% lower" in summary[0]


@pytest.mark.integration
def test_a_sweep_warm_starts_from_an_earlier_one(baseline_sweep: tuple[Any, list[str]], tmp_path: Path) -> None:
    earlier, _ = baseline_sweep
    finished = load_experiment(earlier.experiment_dir).trials
    finished = finished[finished["status"].isin(["completed", "early_stopped"])]
    # This space fixes dropout (searched there) and narrows the learning rate: trials above 5e-3 are left out.
    space = {**SPACE, "lora_dropout": 0.05, "learning_rate": {"loguniform": [2e-4, 5e-3]}}
    outside = int((finished["learning_rate"] > 5e-3).sum())
    outcome, lines = sweep(tmp_path, "warm", space=space,
                           search={"num_samples": 2, "max_concurrent": 2, "seed": 2, "baseline": False, "sampler": "tpe",
                                   "warm_start": [earlier.experiment_dir]})
    study = optuna.load_study(study_name="warm", storage=f"sqlite:///{Path(outcome.experiment_dir) / 'optuna.db'}")
    priors = [t for t in study.trials if "warm_start_from" in t.user_attrs]
    assert len(priors) == len(finished) - outside and len(priors) > 0
    assert all("lora_dropout" not in t.params for t in priors)
    assert {t.user_attrs["warm_start_trial"] for t in priors} <= set(finished["trial_id"])
    # The new sweep trained only its own trials.
    assert len(read_trials_csv(Path(outcome.report_dir) / "trials.csv")) == 2
    text = "\n".join(outcome.summary["summary"])
    assert f"warm start: {len(priors)} prior trials from {earlier.experiment_dir}" in text
    assert "lora_dropout searched there, not here: dropped" in text
    if outside:
        assert f"{outside} learning_rate outside this space" in text


@pytest.mark.integration
def test_warm_start_refuses_another_model_unless_asked(baseline_sweep: tuple[Any, list[str]], tmp_path: Path) -> None:
    from sweeps.warm_start import load

    earlier, _ = baseline_sweep
    spec = parse_spec(make_spec_dict(model={"path": "builtin:tiny-gpt2"}, space=SPACE,
                                     search={"warm_start": [earlier.experiment_dir, str(tmp_path)]}))
    # What preflight raises as a SpecError before Ray starts (sweeps/driver.py `preflight`).
    prior, problems = load(spec)
    text = "\n".join(problems)
    assert prior is None and len(problems) == 2, text
    assert "search.same_model_only: false" in text and "is not a qlora-sweep experiment folder" in text
    allowed = spec.model_copy(update={"search": spec.search.model_copy(update={"same_model_only": False, "warm_start": [earlier.experiment_dir]})})
    prior, problems = load(allowed)
    assert problems == [] and prior is not None and prior.trials and prior.sources[0].model == "builtin:tiny-llama"


@pytest.mark.integration
def test_warm_start_knows_a_local_model_given_by_a_relative_path(baseline_sweep: tuple[Any, list[str]], tmp_path: Path) -> None:
    """The saved spec records a local model by its absolute path; a new spec naming the same folder
    relative to itself is the same model. A copy of the baseline sweep stands for a local-model sweep."""
    from sweeps.warm_start import load

    earlier, _ = baseline_sweep
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    copy = tmp_path / "local-model-sweep"
    shutil.copytree(earlier.experiment_dir, copy, ignore=shutil.ignore_patterns("checkpoint_*"))
    saved = yaml.safe_load((copy / "sweep_spec.yaml").read_text())
    saved["model"]["path"] = str(model)
    (copy / "sweep_spec.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    spec = parse_spec(make_spec_dict(model={"path": "models/tiny"}, space=SPACE, search={"warm_start": [str(copy)]}),
                      base_dir=tmp_path)
    prior, problems = load(spec)
    assert problems == [] and prior is not None and prior.trials, problems
    assert prior.sources[0].model == str(model)
    # Another folder is still another model.
    (tmp_path / "models" / "other").mkdir()
    other = spec.model_copy(update={"model": spec.model.model_copy(update={"path": "models/other"})})
    assert "search.same_model_only: false" in "\n".join(load(other)[1])


SAMPLERS = [
    ("tpe", {"tpe": {"multivariate": True, "group": True, "constant_liar": True}}, optuna.samplers.TPESampler),
    ("gp", {}, optuna.samplers.GPSampler),
    ("cmaes", {}, optuna.samplers.CmaEsSampler),
    ("random", {}, optuna.samplers.RandomSampler),
    ("grid", {}, optuna.samplers.GridSampler),
]


@pytest.mark.integration
@pytest.mark.parametrize(("sampler", "options", "cls"), SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_each_sampler_runs_a_real_sweep(sampler: str, options: dict, cls: type, baseline_sweep: tuple[Any, list[str]],
                                        tmp_path: Path) -> None:
    """Two trials per sampler, warm-started from the baseline sweep, so the model-based samplers
    (TPE, GP, CMA-ES) model from their first proposal."""
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    earlier, _ = baseline_sweep
    space = {**SPACE, "learning_rate": [2e-4, 2e-3, 2e-2]} if sampler == "grid" else SPACE
    search = {"num_samples": 2, "max_concurrent": 2, "seed": 3, "baseline": False, "sampler": sampler, **options,
              "warm_start": [] if sampler == "grid" else [earlier.experiment_dir]}
    outcome, lines = sweep(tmp_path, f"s-{sampler}", space=space, train={"max_steps": 5, "eval_every": 5, "batch_size": 8},
                           search=search)
    trials = read_trials_csv(Path(outcome.report_dir) / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}, trials[["trial_id", "status"]]
    spec = parse_spec(make_spec_dict(space=space, search={**search, "optuna_storage": "memory", "warm_start": []}))
    assert isinstance(make_sampler(spec), cls)
    study = optuna.load_study(study_name=f"s-{sampler}", storage=f"sqlite:///{Path(outcome.experiment_dir) / 'optuna.db'}")
    own = [t for t in study.trials if "warm_start_from" not in t.user_attrs]
    assert len(own) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in own)
