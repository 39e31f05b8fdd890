"""The settings one trial trains with: the spec's model, data and train sections.

They live here, at the bottom, because the trainable needs them (a trial's job carries them, see
trainables/job.py) and must not import the sweep schema above it. sweeps/spec.py composes them
into the whole sweep spec, which adds the search, scheduler, resources and storage sections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

# Seeds feed numpy (Optuna's samplers, transformers' set_seed), which takes 0 <= seed < 2**32.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# Step counts: ASHA computes with them as floats, so an absurd count must stop here, not after launch.
StepCount = Annotated[int, Field(gt=0, lt=2**31)]


# A checkpoint interval of train.checkpoint_every: whole evaluation rounds (an int) or wall time ("90s", "10m", "1h").
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*$")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
DEFAULT_CHECKPOINT_EVERY = "5m"


def _checkpoint_every(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(
            f"{value!r} is not an interval; give evaluation rounds as a whole number (e.g. 2) or a time with its "
            "unit (e.g. '90s', '10m', '1h')"
        )
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{value} rounds: give at least 1 (a checkpoint at every evaluation round), or a time such as '10m'")
        return value
    match = _DURATION.match(value)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"{value!r} is not an interval; give evaluation rounds as a number (e.g. 2) or a positive time with its unit "
            "(e.g. '90s', '10m', '1h')"
        )
    return value.strip()


CheckpointEvery = Annotated[int | str, BeforeValidator(_checkpoint_every)]


@dataclass(frozen=True)
class CheckpointInterval:
    """When a trial saves a checkpoint (train.checkpoint_every), at an evaluation round's end.

    Tune takes checkpoints only with a report, so one can come only at the end of a round; ASHA still
    decides at every round. The round that ends training always checkpoints (`export` needs an adapter).
    """

    rounds: int | None = None  # every this many evaluation rounds
    seconds: float | None = None  # at the first round ending this long (wall time) after the last checkpoint

    @classmethod
    def parse(cls, value: int | str) -> CheckpointInterval:
        if isinstance(value, int):
            return cls(rounds=value)
        match = _DURATION.match(value)
        assert match is not None, value  # validated by the spec (_checkpoint_every)
        return cls(seconds=float(match.group(1)) * _DURATION_UNITS[match.group(2)])

    def due(self, rounds_since: int, seconds_since: float, *, last_round: bool) -> bool:
        """Whether the round that just ended saves a checkpoint, `rounds_since` rounds (this one
        included) and `seconds_since` seconds after the last checkpoint (or the attempt's start)."""
        if last_round:
            return True
        if self.rounds is not None:
            return rounds_since >= self.rounds
        return self.seconds is not None and seconds_since >= self.seconds


def _usable_path(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL character (\\x00), which no path or URI can hold; remove it")
    longest = max((len(part.encode("utf-8")) for part in value.split("/")), default=0)
    if longest > 255:
        raise ValueError(f"has a name of {longest} bytes; file systems allow 255 per folder or file name")
    if len(value.encode("utf-8")) > 4096:
        raise ValueError(f"is {len(value.encode('utf-8'))} bytes long; paths are limited to 4096")
    return value


# A trainer-callback factory named by its import path, "package.module:factory" (train.callbacks).
CALLBACK_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def _callback_path(value: str) -> str:
    if not CALLBACK_PATTERN.match(value):
        raise ValueError(
            f"{value!r} is not an import path of a callback factory; write 'package.module:factory', "
            "e.g. 'my_plugins.callbacks:log_gradients'"
        )
    return value


CallbackPath = Annotated[str, AfterValidator(_callback_path)]


# Paths and URIs, checked here because the operating system refuses a NUL byte or an over-long
# name with errors (ValueError, ENAMETOOLONG) that would otherwise surface as tracebacks.
PathText = Annotated[str, AfterValidator(_usable_path)]


class Strict(BaseModel):
    # allow_inf_nan=False: an inf or NaN number is a typo or a broken generator, never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)



class ModelSpec(Strict):
    """The base model and how it is quantized."""

    path: PathText = Field(description="Hub id, local directory, or builtin:tiny-<family>.")
    quantization: Literal["nf4", "fp4", "none"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


# A split as the datasets library names it, optionally sliced: train, train[:2000], test[10%:20%],
# train[-500:], and parts joined with '+'.
_SPLIT_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]*(\[(-?\d+%?)?:(-?\d+%?)?\])?"
SPLIT_PATTERN = re.compile(rf"^{_SPLIT_PART}(\+{_SPLIT_PART})*$")


def _split(value: str) -> str:
    if not SPLIT_PATTERN.match(value):
        raise ValueError(
            "not a split: write a split name, optionally sliced, e.g. train, train[:2000], train[10%:20%], "
            "test[-500:] (parts may be joined with '+')"
        )
    return value


Split = Annotated[str, AfterValidator(_split)]
DEFAULT_EVAL_SIZE = 0.1


class DataSpec(Strict):
    """The training data and how each row becomes a training example."""

    path: PathText = Field(description="Local .jsonl/.json/.csv/.parquet file or folder, or a hub dataset id.")
    format: Literal["instruction", "text", "chat"] = "instruction"
    name: str | None = Field(default=None, min_length=1, description="The hub dataset's configuration, e.g. main.")
    # A tuple, so the frozen spec stays hashable; YAML may write one file or a list.
    data_files: tuple[PathText, ...] | None = Field(
        default=None,
        description="Files of a hub dataset to read (globs), or of a local data.path folder.",
    )
    split: Split = "train"
    eval_size: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="Held-out rows carved out of data.path: a fraction, or a whole number of rows. Omitted: 0.1.",
    )
    eval_split: Split | None = Field(
        default=None, description="A held-out split of the same hub dataset (or of eval_path), e.g. test or test[:500]."
    )
    eval_path: PathText | None = Field(default=None, description="A separate held-out file or hub dataset.")
    max_rows: PositiveInt | None = Field(
        default=None, description="Train on a seeded random sample of this many rows of the split (data.seed)."
    )
    max_seq_length: PositiveInt = 256
    seed: Seed = 0
    on_bad_rows: Literal["error", "skip"] = "error"
    on_long_rows: Literal["error", "skip", "truncate"] | None = Field(
        default=None,
        description="Rows longer than max_seq_length: error, skip, or truncate (the response). Omitted: as on_bad_rows.",
    )
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    text_field: str = "text"
    messages_field: str = "messages"

    @field_validator("data_files", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and not value:
            raise ValueError("an empty list names no files; list at least one, or leave data_files out")
        return value

    @field_validator("eval_size")
    @classmethod
    def _fraction_or_count(cls, value: float | None) -> float | None:
        if value is not None and value >= 1 and value != int(value):
            raise ValueError(f"{value} is neither a fraction in (0, 1) nor a whole number of rows")
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSpec:
        if self.eval_size is not None and (self.eval_split or self.eval_path):
            given = "eval_split" if self.eval_split else "eval_path"
            raise ValueError(
                f"data.eval_size carves held-out rows out of data.path, and data.{given} names a held-out set of its "
                f"own; keep one: remove eval_size to evaluate on {given}, or remove {given}"
            )
        return self

    @property
    def long_rows(self) -> str:
        """What happens to a row longer than max_seq_length: on_long_rows, or on_bad_rows when omitted."""
        return self.on_long_rows or self.on_bad_rows

    @property
    def eval_amount(self) -> float:
        """eval_size as used: a fraction (below 1) or a row count; 0.1 when omitted."""
        return DEFAULT_EVAL_SIZE if self.eval_size is None else self.eval_size

    @property
    def held_out(self) -> bool:
        """Whether the eval rows come from their own split or file (not carved out by eval_size)."""
        return bool(self.eval_split or self.eval_path)


class TrainSpec(Strict):
    """Per-trial training settings shared by every trial."""

    max_steps: StepCount = 80
    eval_every: StepCount = 10
    batch_size: PositiveInt = 8
    eval_batch_size: PositiveInt | None = None
    grad_accum: PositiveInt = 1
    gradient_checkpointing: bool = True
    optimizer: Literal["auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "auto"
    max_grad_norm: PositiveFloat = 1.0
    seed: Seed = 0
    # Save adapter + optimizer state (every checkpoint_every), so a retried or resumed trial continues
    # from its last checkpoint instead of step 0 (and `export` has an adapter to copy).
    checkpoint: bool = True
    checkpoint_every: CheckpointEvery = Field(
        default=DEFAULT_CHECKPOINT_EVERY,
        description=(
            "How often a trial saves its checkpoint (with train.checkpoint): evaluation rounds (e.g. 2), or wall "
            "time since the last one, checked at each round's end (e.g. '90s', '10m', '1h'). The last round always "
            "saves one. A trial that is retried or resumed redoes what came after its last checkpoint: at the default "
            "'5m', at most about five minutes and one round. ASHA still decides at every round."
        ),
    )
    max_failures: NonNegativeInt = Field(
        default=2,
        description=(
            "How often Tune retries a trial that raised or whose worker/node died, continuing from its latest "
            "checkpoint (tune.FailureConfig). 0 marks the trial failed at the first error."
        ),
    )
    oom_retry: bool = Field(
        default=False,
        description=(
            "A trial that runs out of GPU memory before its first evaluation tries once more in-process with half "
            "the micro-batch and twice the gradient accumulation (same effective batch). Off: it ends as status oom "
            "(never retried as is; the searcher stops proposing configurations at least as large)."
        ),
    )
    trial_timeout_s: PositiveFloat | None = Field(
        default=None,
        description=(
            "Wall-clock limit of one trial attempt, in seconds (model loading included). Past it the trial stops at the "
            "end of its current step (its evaluation and checkpoint still run) and ends as status timed_out; one that "
            "does not reach a step end within 30 s more is ended as a hung one. Never retried; counts as failed "
            "(exit 1). Omitted: no limit."
        ),
    )
    stall_timeout_s: PositiveFloat | None = Field(
        default=None,
        description=(
            "A trial with no training step, evaluation batch, log, save or report for this many seconds (a stuck "
            "download, a deadlocked collective, a wedged data loader) is hung: its watchdog reports it as timed_out "
            "and ends its worker process, which frees its GPU and host memory, and the search moves on. The clock "
            "starts with the trial, so set it above the time a trial takes to load its model. Never retried; counts "
            "as failed (exit 1). Omitted: no limit."
        ),
    )
    # A tuple, so the frozen spec stays hashable; YAML and JSON write it as a list.
    callbacks: tuple[CallbackPath, ...] = Field(
        default=(),
        description=(
            "Extra transformers TrainerCallbacks for every trial, as 'package.module:factory' import paths. Each "
            "factory is called once per training attempt with a trainables.qlora.TrialContext (trial config, job, "
            "device, predicted memory, attempt) and returns a TrainerCallback or None; the module must be importable "
            "on every worker."
        ),
    )

    @model_validator(mode="after")
    def _rounds(self) -> TrainSpec:
        if self.eval_every > self.max_steps:
            raise ValueError(
                f"eval_every ({self.eval_every}) exceeds max_steps ({self.max_steps}); "
                "a trial would never be evaluated. Lower eval_every."
            )
        if self.max_steps % self.eval_every:
            raise ValueError(
                f"max_steps ({self.max_steps}) is not a multiple of eval_every ({self.eval_every}); "
                f"ASHA counts whole evaluation rounds. Try max_steps: "
                f"{self.max_steps - self.max_steps % self.eval_every or self.eval_every}"
            )
        return self

    @property
    def checkpoint_interval(self) -> CheckpointInterval:
        return CheckpointInterval.parse(self.checkpoint_every)

    @property
    def rounds(self) -> int:
        """Evaluation rounds in a full trial: the unit ASHA's max_t and grace_period count in."""
        return self.max_steps // self.eval_every


