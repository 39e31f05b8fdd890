"""search.skip_repeats: a proposal identical to a finished trial is answered from it, not trained again.

No Ray cluster: the real OptunaStudySearch (Ray's OptunaSearch with a real Optuna study) is driven
the way Tune drives it, suggest then on_trial_complete, in a 4-point discrete space.
"""

from __future__ import annotations

import itertools
from typing import Any

import optuna

from sweeps.driver import make_sampler
from sweeps.searcher import MAX_REPEAT_SKIPS, REPEAT_ATTR, OptunaStudySearch, make_searcher, search_space
from sweeps.spec import parse_spec
from tests.conftest import make_spec_dict

POINTS = 4  # r x target_modules below


def searcher(skip_repeats: bool, sampler: str = "random", seed: int = 0) -> OptunaStudySearch:
    spec = parse_spec(
        make_spec_dict(
            space={"r": [4, 8], "target_modules": ["qv", "all-linear"], "learning_rate": 1e-3, "lora_alpha": [16]},
            search={"num_samples": 12, "optuna_storage": "memory", "sampler": sampler, "seed": seed,
                    "skip_repeats": skip_repeats},
        )
    )
    return make_searcher(spec, search_space(spec), make_sampler(spec), "min")


def key(config: dict[str, Any]) -> tuple[Any, ...]:
    return config["r"], config["target_modules"]


def loss_of(config: dict[str, Any]) -> float:
    """A deterministic 'training result' per configuration, as seeded training gives."""
    return {4: 1.0, 8: 0.5}[config["r"]] + {"qv": 0.25, "all-linear": 0.0}[config["target_modules"]]


def run_trials(search: OptunaStudySearch, count: int) -> list[tuple[Any, ...]]:
    """Suggest and complete `count` trials one after another; the configurations trained, in order."""
    trained = []
    for number in range(count):
        trial_id = f"t{number}"
        config = search.suggest(trial_id)
        trained.append(key(config))
        search.on_trial_complete(trial_id, {"eval_loss": loss_of(config), "training_iteration": 1})
    return trained


def study(search: OptunaStudySearch) -> optuna.Study:
    return search._ot_study


def test_no_configuration_is_trained_twice_while_untrained_ones_remain() -> None:
    search = searcher(skip_repeats=True)
    trained = run_trials(search, POINTS)
    assert sorted(trained) == sorted(itertools.product([4, 8], ["qv", "all-linear"]))
    # Each answered repeat is in the study with the value of the trial it repeats.
    trials = study(search).get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    answered = [t for t in trials if REPEAT_ATTR in t.user_attrs]
    assert answered, "the seeded random sampler re-proposes in a 4-point space; nothing was answered"
    assert search.repeats_skipped == len(answered)
    for t in answered:
        earlier = by_number[t.user_attrs[REPEAT_ATTR]]
        assert t.state == optuna.trial.TrialState.COMPLETE and REPEAT_ATTR not in earlier.user_attrs
        assert t.params == earlier.params and t.values == earlier.values
    # Only the trials Tune trains carry a Tune trial id.
    assert sorted(t.user_attrs.get("ray_trial_id") for t in trials if REPEAT_ATTR not in t.user_attrs) == [
        f"t{n}" for n in range(POINTS)
    ]


def test_without_skip_repeats_the_same_sampler_trains_repeats() -> None:
    """The control: the same seeded sampler, with skipping off, trains some configuration twice."""
    trained = run_trials(searcher(skip_repeats=False), POINTS)
    assert len(set(trained)) < POINTS


def test_an_exhausted_space_trains_a_repeat_after_the_allowed_answers() -> None:
    search = searcher(skip_repeats=True)
    run_trials(search, POINTS)
    before = search.repeats_skipped
    config = search.suggest("extra")
    assert key(config) in set(itertools.product([4, 8], ["qv", "all-linear"]))
    assert search.repeats_skipped - before == MAX_REPEAT_SKIPS
    (extra,) = [t for t in study(search).get_trials(deepcopy=False) if t.user_attrs.get("ray_trial_id") == "extra"]
    assert extra.state == optuna.trial.TrialState.RUNNING and REPEAT_ATTR not in extra.user_attrs


def test_tpe_with_skip_repeats_covers_the_space_in_as_many_trials() -> None:
    for seed in range(3):
        trained = run_trials(searcher(skip_repeats=True, sampler="tpe", seed=seed), POINTS)
        assert len(set(trained)) == POINTS, f"seed {seed}: {trained}"


def test_importance_reads_the_stored_study_without_the_answered_repeats(tmp_path) -> None:
    from analysis.importance import _load_copy

    db = tmp_path / "optuna.db"
    spec = parse_spec(
        make_spec_dict(
            space={"r": [4, 8], "target_modules": ["qv", "all-linear"], "learning_rate": 1e-3, "lora_alpha": [16]},
            search={"num_samples": 12, "optuna_storage": f"sqlite:///{db}", "optuna_study_name": "s", "sampler": "random"},
        )
    )
    search = make_searcher(spec, search_space(spec), make_sampler(spec), "min")
    run_trials(search, POINTS)
    stored = study(search).get_trials(deepcopy=False)
    assert len(stored) == POINTS + search.repeats_skipped and search.repeats_skipped > 0
    loaded = _load_copy(str(db), "s").get_trials(deepcopy=False)
    assert len(loaded) == POINTS and all(REPEAT_ATTR not in t.user_attrs for t in loaded)
