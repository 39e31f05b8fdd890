"""The hyperparameters a sweep can search: one registry entry per knob, and the typed kinds of value.

Each knob (`Knob`) is declared once in `KNOBS` with its name, the value kinds it accepts, its dtype,
its doc line, the peft/trl argument it feeds and how it moves memory. Everything else derives from
that table: the spec's `space:` schema (`SpaceSpec`), the trial config (`TrialConfig`), the
LoraConfig/SFTConfig arguments (trainables/training_setup.py), the memory knobs
(trainables/trial_memory.py), the trials table's config columns (trainables/metrics.py), the corners
of `qlora-sweep estimate` and admission's smallest configurations (`memory_corners`), the
distributions the report's importance analysis rebuilds (`distributions`), and the README's space
table (`markdown_table`, checked by tests/test_params.py).

A value in `space:` is parsed once, at the boundary, into one of these kinds:

    Fixed        a scalar: every trial uses it
    Choice       a list: Optuna picks one (a one-element list is Fixed)
    LogUniform   {loguniform: [low, high]}: a float drawn on a log scale
    Uniform      {uniform: [low, high]}: a float drawn uniformly
    AlphaRatio   lora_alpha only: {ratio: [1, 2]} draws alpha as ratio x r
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, create_model

from core.numbers import is_finite_number
from trainables.targets import choice_label

# --- the kinds of value ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """One value for every trial."""

    value: Any

    def values(self) -> list[Any]:
        return [self.value]

    def dump(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Choice:
    """A categorical choice among at least two values."""

    options: tuple[Any, ...]

    def values(self) -> list[Any]:
        return list(self.options)

    def dump(self) -> Any:
        return list(self.options)


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float

    def values(self) -> list[float]:
        """The bounds: what memory corners and admission look at."""
        return [self.low, self.high]

    def dump(self) -> Any:
        return {"loguniform": [self.low, self.high]}


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def values(self) -> list[float]:
        return [self.low, self.high]

    def dump(self) -> Any:
        return {"uniform": [self.low, self.high]}


@dataclass(frozen=True)
class AlphaRatio:
    """lora_alpha = ratio x r, the ratio fixed or chosen (Optuna parameter `lora_alpha_ratio`)."""

    ratios: Fixed | Choice

    def values(self) -> list[float]:
        return self.ratios.values()

    def dump(self) -> Any:
        return {"ratio": self.ratios.dump()}


Kind = Fixed | Choice | LogUniform | Uniform | AlphaRatio
KIND_NAMES: dict[type, str] = {Fixed: "fixed", Choice: "choice", LogUniform: "loguniform", Uniform: "uniform", AlphaRatio: "ratio"}
# Optuna parameter that AlphaRatio adds in place of lora_alpha.
ALPHA_RATIO_PARAM = "lora_alpha_ratio"

# --- the knobs ---------------------------------------------------------------------------------

MemoryOrder = Literal["numeric", "flag", "layers"]


@dataclass(frozen=True)
class Knob:
    """One searchable hyperparameter.

    Attributes:
        name: Key in `space:`, in the trial config, params.json and trials.csv.
        dtype: Python type of one trial's value (int, float, str, bool).
        default: The spec's default, as written in YAML.
        kinds: Value kinds accepted ("fixed", "choice", "loguniform", "uniform", "ratio").
        doc: One line for the README and the report legend.
        feeds: The argument it becomes: "LoraConfig.<arg>" or "SFTConfig.<arg>"; or the function that
            shapes the trial's train dataset with it ("trl.data_utils.pack_dataset").
        check: Problem with one value (None if fine); numbers arrive already cast to `dtype`.
        memory: How it moves peak memory, or None if it does not: "numeric" (more is more),
            "flag" (True costs more), "layers" (more targeted layers cost more).
        corner: Which of its values `qlora-sweep estimate` predicts: "span" (lowest and highest),
            "each" (every choice), "max" (the costlier end only).
        example: A value for the README table.
    """

    name: str
    dtype: type
    default: Any
    kinds: tuple[str, ...]
    doc: str
    feeds: str
    check: Callable[[Any], str | None] | None = None
    memory: MemoryOrder | None = None
    corner: Literal["span", "each", "max"] | None = None
    example: str = ""

    @property
    def column_dtype(self) -> str:
        """The pandas dtype of its trials-table column."""
        return {int: "Int64", float: "float64", bool: "boolean"}.get(self.dtype, "string")

    @property
    def peft_arg(self) -> str | None:
        return self.feeds.removeprefix("LoraConfig.") if self.feeds.startswith("LoraConfig.") else None

    @property
    def trl_arg(self) -> str | None:
        return self.feeds.removeprefix("SFTConfig.") if self.feeds.startswith("SFTConfig.") else None

    def cast(self, value: Any) -> Any:
        """One trial's value as its dtype (Tune and JSON hand back ints as floats and so on)."""
        if self.dtype is bool:
            return bool(value)
        if self.dtype is int:
            return int(value)
        if self.dtype is float:
            return float(value)
        return str(value)


def _positive(what: str) -> Callable[[Any], str | None]:
    return lambda v: None if v > 0 else f"{v:g} is not positive ({what})"


def _within(low: float, high: float, hint: str) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v < high else f"{v:g} is outside [{low:g}, {high:g}); {hint}"


LR_SCHEDULERS = ("constant", "linear", "cosine", "constant_with_warmup")
TARGET_MODULE_EXAMPLES = "a preset (qv, attention, mlp, all-linear) or a list of module names like [q_proj, v_proj]"
_FRACTION = _within(0.0, 1.0, "use a fraction such as 0.05")

# Order matters for define-by-run: r comes before lora_alpha, which may depend on it.
KNOBS: tuple[Knob, ...] = (
    Knob("r", int, [8, 16, 32], ("fixed", "choice"), "LoRA rank.", "LoraConfig.r",
         check=_positive("LoRA rank"), memory="numeric", corner="span", example="[8, 16, 32]"),
    Knob("lora_alpha", float, {"ratio": [1, 2]}, ("fixed", "choice", "ratio"),
         "LoRA alpha; the adapter output is scaled by alpha / r (alpha / sqrt(r) with use_rslora).",
         "LoraConfig.lora_alpha", check=_positive("LoRA alpha"), example="{ratio: [1, 2]} or [16, 32]"),
    Knob("target_modules", str, ["qv", "attention", "all-linear"], ("fixed", "choice"),
         f"Layers that get adapters: {TARGET_MODULE_EXAMPLES}.", "LoraConfig.target_modules",
         memory="layers", corner="each", example="[qv, all-linear, [q_proj, k_proj]]"),
    Knob("learning_rate", float, {"loguniform": [5.0e-5, 5.0e-4]}, ("fixed", "choice", "loguniform", "uniform"),
         "Peak learning rate.", "SFTConfig.learning_rate",
         check=_within(1e-8, 1.0, "typical QLoRA learning rates are 1e-4 to 3e-4"), example="{loguniform: [5e-5, 5e-4]}"),
    Knob("lora_dropout", float, [0.0, 0.05], ("fixed", "choice", "loguniform", "uniform"),
         "Dropout on the LoRA input.", "LoraConfig.lora_dropout", check=_FRACTION, memory="numeric", corner="max",
         example="[0.0, 0.05]"),
    Knob("weight_decay", float, 0.0, ("fixed", "choice", "loguniform", "uniform"), "AdamW weight decay.",
         "SFTConfig.weight_decay", check=_FRACTION, example="0.0"),
    Knob("warmup_ratio", float, 0.03, ("fixed", "choice", "loguniform", "uniform"),
         "Warmup, as a fraction of train.max_steps.", "SFTConfig.warmup_steps", check=_FRACTION, example="0.03"),
    Knob("lr_scheduler_type", str, "cosine", ("fixed", "choice"), f"Learning-rate schedule: {', '.join(LR_SCHEDULERS)}.",
         "SFTConfig.lr_scheduler_type",
         check=lambda v: None if v in LR_SCHEDULERS else f"allowed values: {', '.join(LR_SCHEDULERS)} (or a list of them), not {v!r}",
         example="[cosine, linear]"),
    Knob("batch_size", int, None, ("fixed", "choice"), "Micro-batch size per optimizer micro-step; omitted: train.batch_size.",
         "SFTConfig.per_device_train_batch_size", check=_positive("micro-batch size; omit to use train.batch_size"),
         memory="numeric", corner="span", example="[4, 8]"),
    Knob("use_rslora", bool, False, ("fixed", "choice"),
         "Rank-stabilized LoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r.", "LoraConfig.use_rslora",
         example="[false, true]"),
    Knob("use_dora", bool, False, ("fixed", "choice"),
         "DoRA: learn a magnitude vector per adapted layer besides the low-rank update (peft, works on 4-bit layers).",
         "LoraConfig.use_dora", memory="flag", corner="max", example="[false, true]"),
    Knob("packing", bool, False, ("fixed", "choice"),
         "Sequence packing: train rows packed best-fit-decreasing into data.max_seq_length (trl's packer), "
         "position ids restarting per row, no attention across rows; eval rows stay unpacked.",
         "trl.data_utils.pack_dataset", memory="flag", corner="max", example="[false, true]"),
)
KNOB_BY_NAME: dict[str, Knob] = {k.name: k for k in KNOBS}
MEMORY_KNOBS: tuple[Knob, ...] = tuple(k for k in KNOBS if k.memory)

# --- parsing one space value -------------------------------------------------------------------

_FORMS = {
    "fixed": "a single value",
    "choice": "a list of values",
    "loguniform": "{loguniform: [low, high]}",
    "uniform": "{uniform: [low, high]}",
    "ratio": "{ratio: [1, 2]} for alpha = ratio x r",
}


def _forms(knob: Knob) -> str:
    forms = [_FORMS[k] for k in knob.kinds]
    return ", ".join(forms[:-1]) + f" or {forms[-1]}" if len(forms) > 1 else forms[0]


def _scalar(knob: Knob, value: Any) -> Any:
    """One value of the knob's dtype, checked; raises ValueError naming the fix."""
    if knob.name == "target_modules":
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value and all(isinstance(m, str) and m.strip() for m in value):
            return choice_label(value)
        raise ValueError(f"choice {value!r} targets nothing; use {TARGET_MODULE_EXAMPLES}")
    if knob.dtype is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false; write true, false or [false, true]")
        return value
    if knob.dtype is str:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a name; write {_forms(knob)}")
        problem = knob.check(value) if knob.check else None
    elif knob.dtype is int:
        fix = f"write a positive whole number or a list of them, e.g. [8, 16, 32] ({knob.doc.rstrip('.')})"
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(fix)
        problem = knob.check(value) if knob.check else None
        problem = f"{fix}; {problem}" if problem else None
    else:
        if not is_finite_number(value):
            raise ValueError(f"{value!r} is not a number; write {_forms(knob)}")
        value = float(value)
        problem = knob.check(value) if knob.check else None
    if problem:
        raise ValueError(problem)
    return value


def _discrete(knob: Knob, value: Any) -> Fixed | Choice:
    if isinstance(value, list):
        if not value:
            raise ValueError(f"an empty list offers nothing to choose; write {_forms(knob)}")
        if "choice" not in knob.kinds:
            raise ValueError(f"write {_forms(knob)}")
        options = tuple(dict.fromkeys(_scalar(knob, v) for v in value))
        return Fixed(options[0]) if len(options) == 1 else Choice(options)
    return Fixed(_scalar(knob, value))


def parse_value(knob: Knob, value: Any) -> Kind:
    """Parse one `space:` value of `knob` into its kind.

    Raises:
        ValueError: Saying what is wrong and what to write instead.
    """
    if isinstance(value, (Fixed, Choice, LogUniform, Uniform, AlphaRatio)):
        return value  # already parsed (model_copy, a plan built in code)
    if isinstance(value, dict):
        if len(value) != 1:
            raise ValueError(f"a distribution has exactly one key; write {_forms(knob)}")
        ((form, bounds),) = value.items()
        if form not in knob.kinds or form in ("fixed", "choice"):
            allowed = [k for k in knob.kinds if k not in ("fixed", "choice")]
            close = difflib.get_close_matches(str(form), allowed, n=1)
            did = f"did you mean '{close[0]}'? " if close else ""
            what = f"'{form}' is not a form {knob.name} takes" if form in _FORMS else f"unknown distribution '{form}'"
            raise ValueError(f"{what}. {did}Write {_forms(knob)}")
        if form == "ratio":
            listed = bounds if isinstance(bounds, list) else [bounds]
            if not listed or not all(is_finite_number(v) and v > 0 for v in listed):
                raise ValueError(f"ratio needs positive numbers, e.g. {{ratio: [1, 2]}}, got {bounds!r}")
            options = tuple(dict.fromkeys(float(v) for v in listed))
            return AlphaRatio(Fixed(options[0]) if len(options) == 1 else Choice(options))
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(is_finite_number(b) for b in bounds)):
            raise ValueError(f"{form} needs two numbers [low, high], got {bounds!r}")
        low, high = float(bounds[0]), float(bounds[1])
        if low >= high:
            raise ValueError(f"low ({low:g}) must be below high ({high:g}); write [{min(low, high):g}, {max(low, high):g}]")
        if form == "loguniform" and low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {low:g}; use uniform for ranges that include 0")
        for v in (low, high):
            _scalar(knob, v)
        return LogUniform(low, high) if form == "loguniform" else Uniform(low, high)
    return _discrete(knob, value)


# --- the space ---------------------------------------------------------------------------------


def _field(knob: Knob) -> Any:
    def parse(value: Any) -> Any:
        return None if value is None and knob.default is None else parse_value(knob, value)

    annotation = Annotated[Any, BeforeValidator(parse), PlainSerializer(lambda v: None if v is None else v.dump())]
    default = None if knob.default is None else parse_value(knob, knob.default)
    return (annotation, default)


class _SpaceBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    def kinds(self, default_batch_size: int) -> Iterator[tuple[Knob, Kind]]:
        """(knob, kind) in registry order; an omitted batch_size is train.batch_size."""
        for knob in KNOBS:
            kind = getattr(self, knob.name)
            yield knob, (Fixed(default_batch_size) if kind is None else kind)

    def target_labels(self) -> list[str]:
        """The target-module labels the search carries, in the spec's order."""
        return [str(v) for v in self.target_modules.values()]

    def define_by_run(self, trial: Any, default_batch_size: int) -> dict[str, Any]:
        """Optuna define-by-run space. Returns the constants Tune merges into the trial config."""
        constants: dict[str, Any] = {}
        drawn: dict[str, Any] = {}
        for knob, kind in self.kinds(default_batch_size):
            if isinstance(kind, AlphaRatio):
                ratio = _suggest(trial, ALPHA_RATIO_PARAM, kind.ratios, constants)
                constants[knob.name] = float(ratio) * int(drawn["r"])
                drawn[knob.name] = constants[knob.name]
            else:
                drawn[knob.name] = _suggest(trial, knob.name, kind, constants)
        return constants

    def distributions(self, default_batch_size: int) -> dict[str, Any]:
        """The Optuna distribution of every searched (not fixed) parameter, by Optuna parameter name."""
        import optuna.distributions as od

        out: dict[str, Any] = {}
        for knob, kind in self.kinds(default_batch_size):
            name = knob.name
            if isinstance(kind, AlphaRatio):
                name, kind = ALPHA_RATIO_PARAM, kind.ratios
            if isinstance(kind, Choice):
                out[name] = od.CategoricalDistribution(kind.options)
            elif isinstance(kind, (LogUniform, Uniform)):
                out[name] = od.FloatDistribution(kind.low, kind.high, log=isinstance(kind, LogUniform))
        return out

    def config_columns(self) -> list[str]:
        """The trial-config columns of the trials table, in a stable order."""
        columns = []
        for knob in KNOBS:
            columns.append(knob.name)
            if knob.name == "lora_alpha" and isinstance(self.lora_alpha, AlphaRatio):
                columns.append(ALPHA_RATIO_PARAM)
        return columns


def _suggest(trial: Any, name: str, kind: Kind, constants: dict[str, Any]) -> Any:
    if isinstance(kind, LogUniform):
        return trial.suggest_float(name, kind.low, kind.high, log=True)
    if isinstance(kind, Uniform):
        return trial.suggest_float(name, kind.low, kind.high)
    if isinstance(kind, Choice):
        return trial.suggest_categorical(name, list(kind.options))
    constants[name] = kind.value
    return kind.value


SpaceSpec: type[_SpaceBase] = create_model(  # type: ignore[call-overload]
    "SpaceSpec",
    __base__=_SpaceBase,
    __doc__="What Optuna searches (one field per knob of trainables/params.py). A list is a choice, a scalar is fixed.",
    **{knob.name: _field(knob) for knob in KNOBS},
)


def space_from_raw(raw: Mapping[str, Any] | None) -> _SpaceBase:
    """The space of a saved spec (sweep_spec.yaml's `space`); raises pydantic's ValidationError."""
    return SpaceSpec.model_validate(dict(raw or {}))


# --- one trial ---------------------------------------------------------------------------------


def _from_tune(cls: type, config: Mapping[str, Any], default_batch_size: int) -> Any:
    values = {}
    for knob in KNOBS:
        value = config.get(knob.name)
        if value is None and knob.name == "batch_size":
            value = default_batch_size
        elif value is None and isinstance(knob.default, (bool, int, float, str)):
            value = knob.default  # a knob added after the experiment was written (e.g. use_dora)
        elif value is None:
            raise KeyError(f"the trial config has no {knob.name!r}")
        values[knob.name] = knob.cast(value)
    return cls(**values)


TrialConfig = make_dataclass(
    "TrialConfig",
    [(k.name, k.dtype) for k in KNOBS],
    frozen=True,
    namespace={
        "__doc__": "The hyperparameters of one trial (one field per knob of trainables/params.py), after sampling.",
        "from_tune": classmethod(_from_tune),
    },
)
TrialConfig.__module__ = __name__


# --- memory corners ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryCorners:
    """The values of the memory knobs that `estimate` predicts and admission checks first.

    Attributes:
        smallest: Per target-module label, the least demanding value of every other memory knob.
        corners: The configurations `qlora-sweep estimate` predicts (each knob's `corner` rule).
    """

    smallest: list[dict[str, Any]] = field(default_factory=list)
    corners: list[dict[str, Any]] = field(default_factory=list)


def _least(knob: Knob, values: list[Any]) -> Any:
    return min(values) if knob.memory in ("numeric", "flag") else values[0]


def memory_corners(space: _SpaceBase, default_batch_size: int) -> MemoryCorners:
    """Memory-knob values (by knob name) for admission's smallest configurations and estimate's corners."""
    kinds = dict((k.name, kind) for k, kind in space.kinds(default_batch_size) if k.memory)
    smallest = []
    for label in space.target_labels():
        row = {k.name: _least(k, [k.cast(v) for v in kinds[k.name].values()]) for k in MEMORY_KNOBS}
        row["target_modules"] = label
        smallest.append(row)
    axes: list[tuple[str, list[Any]]] = []
    for knob in MEMORY_KNOBS:
        values = sorted({knob.cast(v) for v in kinds[knob.name].values()}) if knob.memory != "layers" else []
        if knob.corner == "span":
            axes.append((knob.name, list(dict.fromkeys([values[0], values[-1]]))))
        elif knob.corner == "each":
            axes.append((knob.name, space.target_labels()))
        else:  # "max": the costlier end only
            axes.append((knob.name, [values[-1]]))
    corners: list[dict[str, Any]] = [{}]
    for name, values in axes:
        corners = [{**c, name: v} for c in corners for v in values]
    return MemoryCorners(smallest=smallest, corners=corners)


# --- documentation -----------------------------------------------------------------------------


def markdown_table() -> str:
    """The README's table of `space:` keys, made from the registry."""
    lines = [
        "| key | default | forms | feeds | changes memory | what it is |",
        "|---|---|---|---|---|---|",
    ]
    for k in KNOBS:
        default = "train.batch_size" if k.default is None else _yaml_inline(k.default)
        lines.append(
            f"| `{k.name}` | `{default}` | {', '.join(k.kinds)} | `{k.feeds}` | {'yes' if k.memory else 'no'} | {k.doc} |"
        )
    return "\n".join(lines)


def _yaml_inline(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_inline(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
