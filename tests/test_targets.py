"""Target-module presets resolve to layers that exist, checked from the config on the meta device."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from trainables.targets import check_targets, choice_label, linear_module_names, resolve_targets
from trainables.tiny_models import materialize

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["qv", "attention", "mlp", "all-linear"])
def test_every_preset_resolves_to_existing_layers(family: str, preset: str) -> None:
    config = AutoConfig.from_pretrained(materialize(f"builtin:{family}"))
    assert check_targets(preset, config) is None


def test_linear_layers_are_read_without_weights() -> None:
    config = AutoConfig.from_pretrained(materialize("builtin:tiny-llama"))
    names = linear_module_names(config)
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" in names


def test_explicit_lists_travel_as_labels() -> None:
    assert choice_label(["q_proj", "v_proj"]) == "q_proj+v_proj"
    assert resolve_targets("q_proj+v_proj", "llama") == ["q_proj", "v_proj"]
    assert resolve_targets("qv", "gpt2") == ["c_attn"]
    assert resolve_targets("all-linear", "anything") == "all-linear"


def test_unknown_layers_are_named_with_the_real_ones() -> None:
    config = AutoConfig.from_pretrained(materialize("builtin:tiny-gpt2"))
    problem = check_targets("q_proj+v_proj", config)
    assert problem is not None
    assert "no layer named q_proj, v_proj in this gpt2 model" in problem and "c_attn" in problem


def test_presets_for_an_unknown_family_say_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"preset 'qv' is not defined for model_type 'falcon'.*list the module names"):
        resolve_targets("qv", "falcon")
