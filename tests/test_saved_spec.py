"""The lenient, typed view of a saved sweep_spec.yaml that analysis reads (analysis/saved_spec.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from analysis.saved_spec import SavedSpec, trial_settings
from analysis.summary import asha_rung_steps
from sweeps.spec import parse_spec
from tests.conftest import make_spec_dict


def saved() -> dict:
    return parse_spec(make_spec_dict()).model_dump(mode="json")


def test_a_saved_spec_reads_the_keys_analysis_needs() -> None:
    raw = saved()
    view = SavedSpec.from_raw(raw)
    assert view.train.max_steps == raw["train"]["max_steps"] and view.train.eval_every == raw["train"]["eval_every"]
    assert view.model.path == raw["model"]["path"] and view.search.metric == raw["search"]["metric"]
    asha = raw["scheduler"]["asha"] or {}
    assert view.max_rounds == (asha.get("max_t") or raw["train"]["max_steps"] // raw["train"]["eval_every"])
    assert view.space_spec() is not None and view.config_columns()[:2] == ["r", "lora_alpha"]
    assert SavedSpec.from_raw(view) is view


def test_a_section_that_does_not_read_gets_its_defaults_and_a_note() -> None:
    raw = {**saved(), "train": {"max_steps": "many"}, "from_a_newer_version": 1}
    notes: list[str] = []
    view = SavedSpec.from_raw(raw, notes)
    assert view.train == SavedSpec().train and view.model.path == raw["model"]["path"]
    assert len(notes) == 1 and "train.max_steps does not read" in notes[0]


def test_asha_rungs_and_rounds_without_asha() -> None:
    raw = saved()
    raw["train"].update(max_steps=80, eval_every=10)
    raw["scheduler"] = {"asha": {"max_t": None, "grace_period": 1, "reduction_factor": 2}}
    assert asha_rung_steps(raw) == [10, 20, 40]
    raw["scheduler"] = {"asha": None}
    assert asha_rung_steps(raw) == [] and SavedSpec.from_raw(raw).max_rounds == 8


def test_trial_settings_parse_strictly_with_the_trainables_models() -> None:
    raw = saved()
    settings = trial_settings(raw)
    assert settings.model.path == raw["model"]["path"] and settings.train.max_steps == raw["train"]["max_steps"]
    with pytest.raises(ValidationError):
        trial_settings({**raw, "train": {**raw["train"], "no_such_key": 1}})
