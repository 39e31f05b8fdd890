"""The search space: the spec's `space` section as an Optuna define-by-run function.

A list in the spec is a categorical choice, a scalar is fixed, `{loguniform|uniform: [lo, hi]}`
is a float range, and `lora_alpha: {ratio: [...]}` draws alpha as a multiple of the trial's rank.
Fixed values are returned as constants, so every trial's params.json holds its whole config.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from sweeps.spec import SpaceSpec, SweepSpec
from trainables.targets import choice_label

# Order matters for define-by-run: r comes before lora_alpha, which may depend on it.
SEARCHED = (
    "r",
    "lora_alpha",
    "target_modules",
    "learning_rate",
    "lora_dropout",
    "weight_decay",
    "warmup_ratio",
    "lr_scheduler_type",
    "batch_size",
)


def _suggest(trial: Any, name: str, value: Any, constants: dict[str, Any]) -> Any:
    """Suggest one parameter from its spec value; fixed values go to `constants`."""
    if isinstance(value, dict) and "loguniform" in value:
        low, high = value["loguniform"]
        return trial.suggest_float(name, float(low), float(high), log=True)
    if isinstance(value, dict) and "uniform" in value:
        low, high = value["uniform"]
        return trial.suggest_float(name, float(low), float(high))
    if isinstance(value, list):
        if len(value) == 1:
            constants[name] = value[0]
            return value[0]
        return trial.suggest_categorical(name, value)
    constants[name] = value
    return value


def define_by_run(trial: Any, space: SpaceSpec, default_batch_size: int) -> dict[str, Any]:
    """Optuna define-by-run space. Returns the constants Tune merges into the trial config."""
    constants: dict[str, Any] = {}
    r = _suggest(trial, "r", space.r, constants)
    if isinstance(space.lora_alpha, dict):
        ratios = space.lora_alpha["ratio"]
        ratios = ratios if isinstance(ratios, list) else [ratios]
        ratio = _suggest(trial, "lora_alpha_ratio", [float(x) for x in ratios], constants)
        constants["lora_alpha"] = float(ratio) * int(r)
    else:
        _suggest(trial, "lora_alpha", space.lora_alpha, constants)
    targets = space.target_modules
    labels = [choice_label(targets)] if isinstance(targets, str) else [choice_label(c) for c in targets]
    _suggest(trial, "target_modules", labels, constants)
    for name in ("learning_rate", "lora_dropout", "weight_decay", "warmup_ratio", "lr_scheduler_type"):
        _suggest(trial, name, getattr(space, name), constants)
    _suggest(trial, "batch_size", space.batch_size if space.batch_size is not None else default_batch_size, constants)
    return constants


def space_function(spec: SweepSpec) -> Callable[[Any], dict[str, Any]]:
    """The picklable define-by-run function for `OptunaSearch(space=...)`."""
    return partial(define_by_run, space=spec.space, default_batch_size=spec.train.batch_size)


def config_columns(spec: SweepSpec) -> list[str]:
    """The trial-config columns of the trials table, in a stable order."""
    columns = ["r", "lora_alpha"]
    if isinstance(spec.space.lora_alpha, dict):
        columns.append("lora_alpha_ratio")
    return columns + [name for name in SEARCHED if name not in ("r", "lora_alpha")]
