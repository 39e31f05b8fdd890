"""The baseline trial: the standard QLoRA recipe, mapped to the nearest point of the sweep's space.

The recipe is that of the PEFT and QLoRA documentation: rank 16, lora_alpha = 2 x rank, adapters
on all linear layers, learning rate 2e-4, dropout 0.05. With search.baseline on (the default) the
driver enqueues it as the study's first trial (sweeps/driver.py `build_tuner`), ASHA never stops
it (`BASELINE_KEY` in its config, sweeps/driver.py `BaselineASHA`), and the report says how much
the best trial beats it (analysis/summary.py). A mapping in search.baseline changes values of the
recipe; the knobs it does not name keep their recipe value, or the space's own when the recipe has none.

Mapping to the space, knob by knob: a fixed knob keeps the space's value; a choice takes the
option nearest the recipe's value (on a log scale for learning rate, rank and alpha; the recipe's
own when it is an option; for target_modules the recipe's preset if listed, else the option
listed last); a range clips the value into it; an alpha ratio takes the ratio nearest
recipe-alpha / chosen-rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from core.numbers import is_finite_number
from trainables.metrics import BASELINE_COLUMN
from trainables.params import ALPHA_RATIO_PARAM, KNOB_BY_NAME, AlphaRatio, Choice, Fixed, Kind, LogUniform, Uniform

# The standard QLoRA recipe (PEFT / QLoRA documentation). lora_alpha is written as its ratio to r.
STANDARD_RECIPE: dict[str, Any] = {
    "r": 16,
    ALPHA_RATIO_PARAM: 2.0,
    "target_modules": "all-linear",
    "learning_rate": 2.0e-4,
    "lora_dropout": 0.05,
}
# The key of the baseline trial's Tune config (and params.json, and the trials table's column).
BASELINE_KEY = BASELINE_COLUMN
# Optuna user attribute of the enqueued baseline trial.
BASELINE_ATTR = "baseline"
# Knobs drawn on a log scale when the nearest option is chosen.
_LOG_SCALE = {"r", "lora_alpha", "learning_rate", ALPHA_RATIO_PARAM}


def recipe_problem(values: dict[str, Any]) -> str | None:
    """A problem with a search.baseline mapping (unknown knob, not one value of the knob's type), else None."""
    allowed = [*KNOB_BY_NAME, ALPHA_RATIO_PARAM]
    for name, value in values.items():
        if name not in allowed:
            return f"unknown hyperparameter {name!r} in the baseline; use names of space: keys ({', '.join(allowed)})"
        dtype = float if name == ALPHA_RATIO_PARAM else KNOB_BY_NAME[name].dtype
        if isinstance(value, (list, dict)) or value is None:
            return f"{name}: the baseline is one configuration; write one value, not {value!r}"
        if dtype is str and not isinstance(value, str):
            return f"{name}: {value!r} is not a name"
        if dtype is bool and not isinstance(value, bool):
            return f"{name}: {value!r} is not true or false"
        if dtype is int and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return f"{name}: {value!r} is not a positive whole number"
        if dtype is float and (isinstance(value, bool) or not is_finite_number(value)):
            return f"{name}: {value!r} is not a number"
    return None


@dataclass
class Baseline:
    """The baseline as the study's first trial.

    Attributes:
        params: Optuna parameters of the searched knobs (what `enqueue_trial` takes).
        config: Every knob's value, for the log.
        moved: One line per recipe value the space did not offer, and where it was moved.
    """

    params: dict[str, Any]
    config: dict[str, Any]
    moved: list[str] = field(default_factory=list)


def recipe(setting: bool | dict[str, Any]) -> dict[str, Any] | None:
    """The recipe search.baseline asks for; None when it is off."""
    if setting is False:
        return None
    values = dict(STANDARD_RECIPE)
    if isinstance(setting, dict):
        if "lora_alpha" in setting and ALPHA_RATIO_PARAM not in setting:
            values.pop(ALPHA_RATIO_PARAM)  # an absolute alpha replaces the ratio
        values.update(setting)
    return values


def _nearest(name: str, options: list[Any], wanted: Any) -> Any:
    if wanted in options:
        return wanted
    if name == "target_modules" or not all(is_finite_number(o) and not isinstance(o, bool) for o in options):
        return options[-1] if name == "target_modules" else options[0]
    if name in _LOG_SCALE and wanted > 0 and all(o > 0 for o in options):
        return min(options, key=lambda o: abs(math.log(o) - math.log(wanted)))
    return min(options, key=lambda o: abs(o - wanted))


def _place(name: str, kind: Kind, wanted: Any) -> tuple[Any, bool]:
    """(value in the space, whether it is an Optuna parameter) for one knob."""
    if isinstance(kind, Fixed):
        return kind.value, False
    if isinstance(kind, Choice):
        return _nearest(name, list(kind.options), wanted), True
    assert isinstance(kind, (LogUniform, Uniform))
    return min(max(float(wanted), kind.low), kind.high), True


def map_to_space(space: Any, default_batch_size: int, setting: bool | dict[str, Any]) -> Baseline | None:
    """The baseline of search.baseline in this space (see the module doc); None when it is off."""
    wanted = recipe(setting)
    if wanted is None:
        return None
    params: dict[str, Any] = {}
    config: dict[str, Any] = {}
    moved: list[str] = []
    for knob, kind in space.kinds(default_batch_size):
        name = knob.name
        if isinstance(kind, AlphaRatio):
            r = config["r"]
            ratio = wanted[ALPHA_RATIO_PARAM] if ALPHA_RATIO_PARAM in wanted else float(wanted["lora_alpha"]) / r
            value, searched = _place(ALPHA_RATIO_PARAM, kind.ratios, float(ratio))
            if searched:
                params[ALPHA_RATIO_PARAM] = value
            if float(value) != float(ratio):
                moved.append(f"lora_alpha ratio {ratio:g} -> {value:g} (the space's nearest)")
            config[name] = float(value) * r
            continue
        if name == "lora_alpha":
            want = wanted.get("lora_alpha", float(wanted.get(ALPHA_RATIO_PARAM, 2.0)) * config["r"])
        elif name in wanted:
            want = wanted[name]
        else:
            # Not part of the recipe: the knob's default when the space offers it, else the space's first value.
            default = knob.default if isinstance(knob.default, (bool, int, float, str)) else None
            want = default if default is not None and default in kind.values() else kind.values()[0]
        value, searched = _place(name, kind, want)
        value = knob.cast(value)
        if searched:
            params[name] = value
        if name in wanted or name == "lora_alpha":
            same = value == want if not is_finite_number(want) else math.isclose(float(value), float(want))
            if not same:
                moved.append(f"{name} {want!r} -> {value!r} (" + ("fixed in the space" if not searched else "the space's nearest") + ")")
        config[name] = value
    return Baseline(params=params, config=config, moved=moved)
