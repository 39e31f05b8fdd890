"""The hyperparameter registry (trainables/params.py) is the one source of each knob, and what
derives from it agrees with it: the space schema, Optuna's distributions, the trial config, the
trials-table columns, the peft/trl arguments and the README's table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import optuna
import pytest

from trainables import metrics
from trainables.params import (
    ALPHA_RATIO_PARAM,
    KNOBS,
    MEMORY_KNOBS,
    AlphaRatio,
    Choice,
    Fixed,
    LogUniform,
    SpaceSpec,
    TrialConfig,
    Uniform,
    markdown_table,
    memory_corners,
    space_from_raw,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_space_table_is_the_registry():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- space-table:start -->\n(.*?)\n<!-- space-table:end -->", text, re.S)
    assert match, "README.md lost its <!-- space-table:start/end --> markers"
    assert match.group(1).strip() == markdown_table().strip(), "regenerate with trainables.params.markdown_table()"


def test_trial_config_and_columns_come_from_the_registry():
    assert [f.name for f in dataclasses.fields(TrialConfig)] == [k.name for k in KNOBS]
    for knob in KNOBS:
        assert metrics.COLUMNS[knob.name].dtype == knob.column_dtype
    assert ALPHA_RATIO_PARAM in metrics.COLUMNS


def test_no_column_is_declared_twice():
    # The trials table may reuse a reported metric's Column, but never declare the name again.
    declared = [c.name for c in (*metrics.REPORTED_METRICS, *metrics.CONFIG_COLUMNS)]
    declared += [c.name for c in metrics.TRIAL_COLUMNS if c not in metrics.REPORTED_METRICS]
    assert len(declared) == len(set(declared)), sorted({n for n in declared if declared.count(n) > 1})


def test_each_knob_feeds_a_real_peft_or_trl_argument():
    import importlib

    from peft import LoraConfig
    from trl import SFTConfig

    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    for knob in KNOBS:
        if knob.peft_arg or knob.trl_arg:
            assert (knob.peft_arg in lora_fields) or (knob.trl_arg in sft_fields), knob.name
        else:  # a function that shapes the train dataset with it (packing: trl's packer)
            module, _, function = knob.feeds.rpartition(".")
            assert callable(getattr(importlib.import_module(module), function)), knob.name


@pytest.mark.parametrize(
    "raw, kind",
    [
        ({"r": 8}, Fixed(8)),
        ({"r": [8]}, Fixed(8)),
        ({"r": [8, 16, 8]}, Choice((8, 16))),
        ({"learning_rate": {"loguniform": [1e-4, 1e-3]}}, LogUniform(1e-4, 1e-3)),
        ({"lora_dropout": {"uniform": [0, 0.1]}}, Uniform(0.0, 0.1)),
        ({"lora_alpha": {"ratio": 2}}, AlphaRatio(Fixed(2.0))),
        ({"target_modules": ["qv", ["q_proj", "k_proj"]]}, Choice(("qv", "q_proj+k_proj"))),
        ({"use_dora": [False, True]}, Choice((False, True))),
    ],
)
def test_space_values_parse_into_kinds(raw, kind):
    ((name, _),) = raw.items()
    space = SpaceSpec.model_validate(raw)
    assert getattr(space, name) == kind
    # The YAML form comes back out, so a saved spec parses to the same space.
    assert space_from_raw(space.model_dump(mode="json")) == space


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"r": [0]}, "0 is not positive"),
        ({"r": 2.5}, "positive whole number"),
        ({"r": {"loguniform": [1, 8]}}, "'loguniform' is not a form r takes"),
        ({"learning_rate": {"logunif": [1e-4, 1e-3]}}, "did you mean 'loguniform'"),
        ({"learning_rate": {"loguniform": [1e-3, 1e-4]}}, "must be below high"),
        ({"lora_dropout": {"loguniform": [0, 0.1]}}, "loguniform needs low > 0"),
        ({"lora_alpha": {"ratio": [0]}}, "ratio needs positive numbers"),
        ({"use_rslora": "yes"}, "not true or false"),
        ({"lr_scheduler_type": "cosinus"}, "allowed values: constant, linear, cosine"),
        ({"target_modules": []}, "empty list"),
    ],
)
def test_bad_space_values_say_what_to_write(raw, message):
    with pytest.raises(Exception, match=re.escape(message)):
        SpaceSpec.model_validate(raw)


def test_distributions_describe_what_define_by_run_samples():
    space = SpaceSpec.model_validate({"use_dora": [False, True], "batch_size": [2, 4]})
    distributions = space.distributions(default_batch_size=8)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        constants = space.define_by_run(trial, default_batch_size=8)
        assert set(trial.params) == set(distributions)
        for name, value in trial.params.items():
            assert distributions[name]._contains(distributions[name].to_internal_repr(value))
        config = TrialConfig.from_tune({**trial.params, **constants}, default_batch_size=8)
        assert config.lora_alpha == trial.params[ALPHA_RATIO_PARAM] * config.r
        study.tell(trial, 0.0)


def test_omitted_batch_size_is_the_train_batch_size():
    space = SpaceSpec()
    assert "batch_size" not in space.distributions(default_batch_size=8)
    trial = optuna.create_study().ask()
    assert space.define_by_run(trial, default_batch_size=6)["batch_size"] == 6


def test_memory_corners_cover_every_memory_knob():
    space = SpaceSpec.model_validate({"r": [4, 16, 64], "batch_size": [2, 8], "use_dora": [False, True]})
    found = memory_corners(space, default_batch_size=8)
    names = {k.name for k in MEMORY_KNOBS}
    assert all(set(row) == names for row in found.smallest + found.corners)
    assert {row["target_modules"] for row in found.smallest} == set(space.target_labels())
    assert all(row["r"] == 4 and row["batch_size"] == 2 and row["use_dora"] is False for row in found.smallest)
    # r and batch span their ends, every target choice, the costly end of dropout and DoRA.
    assert {(row["r"], row["batch_size"]) for row in found.corners} == {(4, 2), (4, 8), (64, 2), (64, 8)}
    assert all(row["use_dora"] is True and row["lora_dropout"] == 0.05 for row in found.corners)
    assert len(found.corners) == 4 * len(space.target_labels())


def test_a_saved_space_without_the_newer_knobs_still_loads():
    old = {"r": [8, 16], "lora_alpha": {"ratio": [1, 2]}, "target_modules": ["qv"], "learning_rate": 1e-4}
    space = space_from_raw(old)
    assert space.use_dora == Fixed(False) and space.use_rslora == Fixed(False)
    config = TrialConfig.from_tune({"r": 8, "lora_alpha": 8, "target_modules": "qv", "learning_rate": 1e-4,
                                    "lora_dropout": 0.0, "weight_decay": 0.0, "warmup_ratio": 0.0,
                                    "lr_scheduler_type": "cosine"}, default_batch_size=4)
    assert config.use_dora is False and config.batch_size == 4
