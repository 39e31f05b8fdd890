"""One trial's predicted GPU memory, with the estimator set up exactly as the trainable trains.

`trainables/memory_estimator.py` predicts peak memory from a description of a training setup;
`trainables/training_setup.py` is the setup this sweep actually trains with. `estimate_for_trial`
turns (model config, training setup, a trial's memory knobs) into a prediction with the setup's
own `estimator_arguments`, so the `estimate` command, admission before launch, GPU packing and the
prediction each trial reports all use the same numbers, and none of them can drift from the trainer.

The memory knobs are the registry's (trainables/params.py, `MEMORY_KNOBS`) plus the sequence length;
`not_modelled` says in plain words what the prediction leaves out for a trial or a search space.
Sequences are cut at data.max_seq_length and padded per batch: the prediction uses the cap.

A sweep with task metrics (spec section `eval:`) also predicts each trial's task evaluation:
`task_eval_workload` turns the eval section into the batch and lengths the estimator needs, with
length bounds from the spec alone (see its docstring), and the prediction admission, packing and
`estimate` use is the larger of the training step and the task evaluation. (The figure a trial reports
as predicted_memory_mib, trainables/qlora.py, does not pass a workload yet: it is the training step's.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field, fields, make_dataclass
from typing import TYPE_CHECKING, Any

from trainables.memory_estimator import MIB, MemoryEstimate, TaskEvalWorkload, estimate_peak_memory, lora_target_layers
from trainables.params import MEMORY_KNOBS, Choice, Fixed
from trainables.targets import resolve_targets
from trainables.training_setup import TrainingSetup

if TYPE_CHECKING:
    from trainables.task_metrics import EvalSpec

# The value of a memory knob that costs nothing extra, where there is one: MemoryKnobs' default, so
# that a knob added later (e.g. use_dora) need not be named by every caller.
_FREE_VALUE: dict[str, Any] = {"lora_dropout": 0.0, **{k.name: False for k in MEMORY_KNOBS if k.dtype is bool}}


def _from_config(cls: type, config: Mapping[str, Any], default_batch_size: int, seq_len: int) -> Any:
    """The knobs of a trial config as Tune passes it (a missing batch_size means train.batch_size)."""
    values: dict[str, Any] = {"seq_len": int(seq_len)}
    for knob in MEMORY_KNOBS:
        value = config.get(knob.name)
        if value is None and knob.name == "batch_size":
            value = default_batch_size
        elif value is None and knob.name in _FREE_VALUE:
            value = _FREE_VALUE[knob.name]  # e.g. an experiment written before the knob existed
        elif value is None:
            raise KeyError(f"the trial config has no {knob.name!r}")
        values[knob.name] = knob.cast(value)
    return cls(**values)


def _describe(self: Any) -> str:
    """"r=8, target_modules=qv, batch_size=4, seq_len=64"; knobs at their free value are left out."""
    parts = []
    for f in fields(self):
        value = getattr(self, f.name)
        if f.name in _FREE_VALUE and value == _FREE_VALUE[f.name]:
            continue
        parts.append(f"{f.name}={value}")
    return ", ".join(parts)


MemoryKnobs = make_dataclass(
    "MemoryKnobs",
    [
        (k.name, k.dtype, field(default=_FREE_VALUE[k.name])) if k.name in _FREE_VALUE else (k.name, k.dtype)
        for k in MEMORY_KNOBS
    ]
    + [("seq_len", int)],
    frozen=True,
    kw_only=True,
    namespace={
        "__doc__": (
            "The settings of one trial that change its memory (the registry's memory knobs) and the sequence length.\n\n"
            "Construct with keywords: MemoryKnobs(r=8, target_modules='qv', batch_size=4, seq_len=64); lora_dropout\n"
            "defaults to 0.0 and use_dora to False. `from_config(config, default_batch_size, seq_len)` reads a trial\n"
            "config as Tune passes it. Frozen and hashable: admission keys its predictions by it."
        ),
        "from_config": classmethod(_from_config),
        "describe": _describe,
    },
)
MemoryKnobs.__module__ = __name__


def estimate_for_trial(
    model_config: Any, setup: TrainingSetup, knobs: Any, task_eval: TaskEvalWorkload | None = None
) -> MemoryEstimate:
    """Predict the peak GPU memory of one trial trained with `setup`.

    Args:
        model_config: The base model's transformers config (or its config.json dict).
        setup: The training setup, resolved for "cuda" (what admission, packing and reports predict).
        knobs: The trial's MemoryKnobs.
        task_eval: The trial's task evaluation (`task_eval_workload`), or None for training alone.

    Returns:
        The estimate; `.reserved_bytes` predicts torch.cuda.max_memory_reserved (with a task
        evaluation, the larger of training and evaluation; `.task_eval` has the evaluation's phases).

    Raises:
        ValueError: If the architecture or the target modules cannot be modelled.
    """
    arguments = setup.estimator_arguments(knobs, _model_type(model_config))
    return estimate_peak_memory(model_config, **arguments, task_eval=task_eval)


def task_eval_workload(eval_spec: EvalSpec | None, max_seq_length: int) -> TaskEvalWorkload | None:
    """What a trial's task evaluation runs (trainables/task_metrics.py `TaskEvaluator`), in the sizes memory needs.

    Nothing here reads the data, so the lengths are the bounds the spec guarantees:

    * rows per batch: eval.batch_size, at most eval.max_examples (the subset is that large at most);
      forgetting batches its texts by eval.batch_size too;
    * a row, prompt plus reference (EOS included), has at most data.max_seq_length tokens (longer rows
      are refused or cut, data.on_long_rows), so a generation prompt and a teacher-forced row are
      bounded by max_seq_length;
    * generation adds eval.max_new_tokens tokens, or, when it is not set, up to max_seq_length (the
      trial then generates as many tokens as the subset's longest reference, which is shorter);
    * forgetting texts are cut to max_seq_length;
    * a forward loop with a second batch runs it while the first batch's logits are still named: for
      teacher-forced exact match when eval.max_examples exceeds eval.batch_size, for forgetting always
      (its set is read by the driver, not here).

    Args:
        eval_spec: The spec's eval section (None or no metrics: no task evaluation).
        max_seq_length: data.max_seq_length.

    Returns:
        The workload, or None when the trial measures no task metric.
    """
    if eval_spec is None or not eval_spec.metrics:
        return None
    rows = min(eval_spec.batch_size, eval_spec.max_examples)
    generates = any(m.generates for m in eval_spec.metrics)
    teacher_forced = any(m.teacher_forced for m in eval_spec.metrics)
    forgetting = any(m.type == "forgetting" for m in eval_spec.metrics)
    return TaskEvalWorkload(
        generate_rows=rows if generates else 0,
        prompt_len=max_seq_length if generates else 0,
        new_tokens=(eval_spec.max_new_tokens or max_seq_length) if generates else 0,
        forward_rows=rows if teacher_forced else 0,
        forward_len=max_seq_length if teacher_forced else 0,
        loss_rows=eval_spec.batch_size if forgetting else 0,
        loss_len=max_seq_length if forgetting else 0,
        forward_keeps_previous=teacher_forced and eval_spec.max_examples > eval_spec.batch_size,
        loss_keeps_previous=forgetting,  # how many texts the set has is not known here: assume more than a batch
    )


def predicted_mib(estimate: MemoryEstimate) -> float:
    """The figure a trial reports as predicted_memory_mib: predicted torch.cuda.max_memory_reserved."""
    return round(estimate.reserved_bytes / MIB, 1)


def predicted_allocated_mib(estimate: MemoryEstimate) -> float:
    """The estimate's tensor bytes (allocated_bytes, MiB): what a CPU trial's measured tensor peak is compared with.

    On CPU there is no caching allocator, so no fragmentation part: every byte is a live tensor.
    """
    return round(estimate.allocated_bytes / MIB, 4)


def targeted_layers(model_config: Any, label: str) -> frozenset[str]:
    """Names of the layers a target-module label adapts in this model, for ordering labels by inclusion.

    qv adapts a subset of what attention adapts, which is a subset of all-linear, and so on; explicit
    lists compare by the layers they match.

    Raises:
        ValueError: If the label matches nothing in this model.
    """
    return frozenset(
        layer.name for layer in lora_target_layers(model_config, resolve_targets(label, _model_type(model_config)))
    )


# What the estimator leaves out, per memory knob value that brings it in.
NOT_MODELLED: dict[tuple[str, Any], str] = {
    ("use_dora", True): (
        "use_dora: DoRA's magnitude vectors (one fp32 value per output feature of every adapted layer), their "
        "gradients and optimizer states are counted; not modelled are the activations DoRA keeps for backward "
        "(the base layer's output and the low-rank output again, 2 x out_features values per token and adapted "
        "layer; with lora_dropout > 0 also a dequantized copy of each adapted layer's weight for its extra matmul) "
        "and the per-step temporaries of its weight norm (the dequantized weight plus B x A, out x in values). "
        "Predictions for use_dora trials are low; leave headroom (resources.gpu_memory_gib) or measure one trial"
    ),
}


def not_modelled(knobs_or_space: Any) -> list[str]:
    """Human-readable lines on what the memory prediction leaves out for these trials.

    Args:
        knobs_or_space: One trial's MemoryKnobs, a trial config mapping, or a search space
            (trainables.params.SpaceSpec): a line appears when any value the space can take brings
            in something the estimator does not model.

    Returns:
        One line per gap (empty when the prediction covers everything it claims to).
    """
    lines = []
    for (name, value), line in NOT_MODELLED.items():
        if value in _values_of(knobs_or_space, name):
            lines.append(line)
    return lines


def _values_of(source: Any, name: str) -> list[Any]:
    if isinstance(source, Mapping):
        return [source.get(name)]
    kind = getattr(source, name, None)
    if isinstance(kind, (Fixed, Choice)):
        return kind.values()
    return [kind]


def _model_type(model_config: Any) -> str:
    return getattr(model_config, "model_type", None) or dict(model_config).get("model_type", "")
