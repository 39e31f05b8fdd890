"""Which linear layers LoRA adapts: named presets per model family, checked against the model.

A search-space choice is a preset name (`qv`, `attention`, `mlp`, `all-linear`) or an explicit
list of module-name suffixes. Optuna only handles primitive categorical choices, so an explicit
list travels through the search as a label joining its names with "+" (e.g. "q_proj+v_proj").
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

ALL_LINEAR = "all-linear"

_LLAMA_STYLE = {
    "qv": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}

# model_type (from config.json) -> preset name -> module-name suffixes.
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "mixtral": {**_LLAMA_STYLE, "mlp": ("w1", "w2", "w3")},
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "phi3": {"qv": ("qkv_proj",), "attention": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")},
    "gpt2": {"qv": ("c_attn",), "attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
}

PRESET_NAMES = ("qv", "attention", "mlp", ALL_LINEAR)


def choice_label(choice: str | list[str]) -> str:
    """The categorical label a target-module choice travels under in the search."""
    return choice if isinstance(choice, str) else "+".join(choice)


def resolve_targets(label: str, model_type: str) -> list[str] | str:
    """Turn a label into what `peft.LoraConfig(target_modules=...)` takes.

    Returns "all-linear" for that preset (peft resolves it), else a list of module suffixes.

    Raises:
        ValueError: For a preset the model family does not define.
    """
    if label == ALL_LINEAR:
        return ALL_LINEAR
    if label in PRESET_NAMES:
        family = PRESETS.get(model_type)
        if family is None:
            known = ", ".join(sorted(PRESETS))
            raise ValueError(
                f"target_modules preset '{label}' is not defined for model_type '{model_type}' "
                f"(presets exist for: {known}); list the module names instead, e.g. [q_proj, v_proj], or use all-linear"
            )
        return list(family[label])
    return label.split("+")


@lru_cache(maxsize=16)
def _linear_module_names(config_key: str, config_json: str) -> tuple[str, ...]:
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(config_json))
    # The meta device gives every module its real shape without allocating or reading weights.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt"):
            names.append(name)
    return tuple(names)


def linear_module_names(config: Any) -> list[str]:
    """Every linear layer's qualified name in a model built from `config` on the meta device."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    import json

    return list(_linear_module_names(as_dict.get("model_type", ""), json.dumps(as_dict, sort_keys=True, default=str)))


def check_targets(label: str, config: Any) -> str | None:
    """Return a problem message if `label` would adapt no layer of this model, else None."""
    model_type = getattr(config, "model_type", None) or config.get("model_type", "")
    try:
        targets = resolve_targets(label, model_type)
    except ValueError as exc:
        return str(exc)
    if targets == ALL_LINEAR:
        return None
    names = linear_module_names(config)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names if n.rsplit(".", 1)[-1] != "lm_head"})
        return (
            f"target_modules '{label}': no layer named {', '.join(missing)} in this {model_type} model; "
            f"its linear layers are: {', '.join(suffixes)}"
        )
    return None
