"""`qlora-sweep estimate SPEC`: a sweep's peak GPU memory, predicted before any GPU is involved.

The corners of the search space (each memory knob of the registry, trainables/params.py, by its
`corner` rule: smallest and largest rank x every target-module choice x smallest and largest
micro-batch, with dropout on and DoRA on if the space allows them; at data.max_seq_length) are
predicted with `trainables.trial_memory.estimate_for_trial` and the training setup resolved for a
CUDA GPU, and checked against a list of GPU sizes with the rule admission uses
(`sweeps.memory_plan.MemoryPlan`). With task metrics (eval.metrics) each corner's task evaluation is
predicted too and the table gains its column; the lines under it name the evaluation's terms (KV
cache, logits, ...) at the largest corner. Only the model's config is read, with the loader preflight
uses: no weights, no GPU, no Ray.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from sweeps.driver import load_model_config
from sweeps.memory_plan import MemoryPlan, task_eval_fix
from sweeps.spec import SpecError, SweepSpec
from trainables import params
from trainables.memory_estimator import MIB, MemoryEstimate
from trainables.training_setup import TrainingSetup
from trainables.trial_memory import MemoryKnobs, estimate_for_trial, not_modelled, task_eval_workload

DEFAULT_GPU_SIZES_GIB: tuple[float, ...] = (8, 16, 24, 40, 48, 80)

# Table columns: (header, parts of MemoryEstimate summed into it): the training step's parts, which add
# up to its reserved memory (torch.cuda.max_memory_reserved). With task metrics a column "task_eval"
# follows (the evaluation's reserved memory) and "reserved" is the larger of the two.
PART_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("4bit_w", ("linear_weights_bytes", "quant_constants_bytes")),
    ("other_w", ("other_weights_bytes",)),
    ("lora_w+g", ("lora_weights_bytes", "lora_grads_bytes")),
    ("optim", ("optimizer_state_bytes",)),
    ("activ", ("activations_bytes",)),
    ("logits", ("logits_bytes",)),
    ("wksp+alloc", ("dequant_workspace_bytes", "allocator_overhead_bytes")),
)


@dataclass(frozen=True)
class CornerEstimate:
    """One corner configuration, its prediction and which GPU sizes it fits."""

    knobs: MemoryKnobs
    estimate: MemoryEstimate
    needed_gib: float
    fits: dict[float, bool]

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.knobs),
            **self.estimate.as_dict(),
            "needed_gib": round(self.needed_gib, 4),
            "fits": {f"{gib:g}": ok for gib, ok in self.fits.items()},
            "not_modelled": not_modelled(self.knobs),
        }


def corner_configurations(spec: SweepSpec) -> list[MemoryKnobs]:
    """The configurations `estimate` predicts (`params.memory_corners`), at data.max_seq_length."""
    corners = params.memory_corners(spec.space, spec.train.batch_size)
    return [MemoryKnobs(**row, seq_len=spec.data.max_seq_length) for row in corners.corners]


def estimate_corners(
    spec: SweepSpec, model_config: Any, gpu_sizes_gib: list[float] | tuple[float, ...] = DEFAULT_GPU_SIZES_GIB
) -> list[CornerEstimate]:
    """Predict every corner configuration and check it against each GPU size.

    Raises:
        SpecError: If the estimator cannot model this architecture or a target-module choice.
    """
    plan = MemoryPlan(spec=spec, model_config=model_config, gpu=None)
    out = []
    for knobs in corner_configurations(spec):
        try:
            estimate = estimate_for_trial(model_config, plan.setup, knobs, plan.task_eval)
        except ValueError as exc:
            raise SpecError(
                "estimate",
                [f"cannot predict the memory of {knobs.describe()} for model_type "
                 f"'{getattr(model_config, 'model_type', '?')}': {exc}"],
            ) from None
        needed = plan.needed_gib(estimate)
        out.append(CornerEstimate(knobs, estimate, needed, {float(g): needed <= g for g in gpu_sizes_gib}))
    return out


def render_table(spec: SweepSpec, corners: list[CornerEstimate], model_type: str) -> str:
    """The breakdown as a plain-text table (MiB per part), then which GPU sizes each corner fits."""
    setup = TrainingSetup.resolve(spec.model, spec.train, "cuda")
    sizes = list(corners[0].fits) if corners else []
    margin = spec.resources.memory_margin
    dora = any(c.knobs.use_dora for c in corners)  # a column only when the space turns DoRA on
    evaluated = [c for c in corners if c.estimate.task_eval is not None]  # a column only with task metrics
    lines = [
        f"model: {spec.model.path} ({model_type}), {spec.model.quantization}"
        f"{' + double quant' if spec.model.double_quant and spec.model.quantization != 'none' else ''}, "
        f"compute {setup.compute_dtype} on CUDA, optimizer {setup.optimizer}, gradient checkpointing "
        f"{'on' if setup.gradient_checkpointing else 'off'}, seq_len {spec.data.max_seq_length}",
        "predicted for a CUDA GPU as trainables/qlora.py trains (trainables/trial_memory.py); MiB per part.",
        "reserved = torch.cuda.max_memory_reserved (the measured peak_memory_mib); +ctx adds paged optimizer "
        f"states and the CUDA context; 'fits' compares +ctx x {1 + margin:g} (resources.memory_margin) with each GPU.",
        "",
    ]
    headers = [
        "r", "targets", "batch", *(["dora"] if dora else []), *[h for h, _ in PART_COLUMNS],
        *(["task_eval"] if evaluated else []), "reserved", "+ctx", "GiB", "fits",
    ]
    rows = []
    for c in corners:
        parts = [sum(getattr(c.estimate, name) for name in names) / MIB for _, names in PART_COLUMNS]
        fits = " ".join(f"{g:g}" for g in sizes if c.fits[g]) or "none"
        rows.append(
            [
                str(c.knobs.r),
                c.knobs.target_modules,
                str(c.knobs.batch_size),
                *(["on" if c.knobs.use_dora else "off"] if dora else []),
                *[f"{p:,.1f}" for p in parts],
                *([_task_eval_mib(c.estimate)] if evaluated else []),
                f"{c.estimate.reserved_bytes / MIB:,.1f}",
                f"{(c.estimate.total_with_context_gib * 1024):,.1f}",
                f"{c.estimate.total_with_context_gib:.2f}",
                fits,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    right = set(range(len(headers))) - {1, len(headers) - 1}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines += [line(headers), line(["-" * w for w in widths]), *[line(r) for r in rows], ""]
    lines.append(
        "configurations that fit, by GPU size: "
        + ", ".join(f"{g:g} GiB {sum(c.fits[g] for c in corners)}/{len(corners)}" for g in sizes)
    )
    if spec.resources.gpu_memory_gib:
        target = float(spec.resources.gpu_memory_gib)
        ok = sum(c.needed_gib <= target for c in corners)
        lines.append(
            f"resources.gpu_memory_gib = {target:g}: {ok}/{len(corners)} corners would be admitted"
            + ("; the others would be recorded as infeasible, never launched" if ok < len(corners) else "")
        )
    if evaluated:
        lines += task_eval_lines(spec, evaluated)
    lines += [f"not modelled: {line}" for line in not_modelled(spec.space)]
    return "\n".join(lines)


def _task_eval_mib(estimate: MemoryEstimate) -> str:
    """The task_eval column: the evaluation's predicted reserved memory, MiB."""
    return f"{estimate.task_eval.reserved_bytes / MIB:,.1f}" if estimate.task_eval is not None else "-"


def task_eval_lines(spec: SweepSpec, corners: list[CornerEstimate]) -> list[str]:
    """What the task evaluation adds, phase by phase, at the corner where it needs the most."""
    workload = task_eval_workload(spec.eval, spec.data.max_seq_length)
    largest = max(corners, key=lambda c: c.estimate.task_eval.reserved_bytes)  # type: ignore[union-attr]
    evaluation = largest.estimate.task_eval
    if workload is None or evaluation is None:  # corners with a task evaluation come from a spec with metrics
        return []
    bounds = []
    if workload.generate_rows:
        new = "eval.max_new_tokens" if spec.eval.max_new_tokens else "no eval.max_new_tokens: data.max_seq_length"
        bounds.append(
            f"generation of {workload.generate_rows} rows a batch, prompts <= {workload.prompt_len} tokens "
            f"(data.max_seq_length) + {workload.new_tokens} new tokens ({new})"
        )
    if workload.forward_rows:
        bounds.append(f"teacher-forced forwards of {workload.forward_rows} rows x {workload.forward_len} tokens")
    if workload.loss_rows:
        bounds.append(f"forgetting forwards of {workload.loss_rows} rows x {workload.loss_len} tokens")
    peaks = [c for c in corners if c.estimate.peak_phase == "task eval"]
    lines = [
        "",
        f"task eval (eval.metrics; length bounds from the spec, the data is not read): {'; '.join(bounds)}.",
        f"task eval at r={largest.knobs.r}, {largest.knobs.target_modules}, batch {largest.knobs.batch_size}: "
        f"{evaluation.describe()}; held through it: weights, adapters and optimizer states "
        f"{evaluation.held_bytes / MIB:,.1f} MiB (no gradients), dequantization workspace "
        f"{evaluation.dequant_workspace_bytes / MIB:,.1f} MiB, allocator overhead "
        f"{evaluation.allocator_overhead_bytes / MIB:,.1f} MiB.",
    ]
    lines += [f"  task eval: {phase.describe()}" for phase in evaluation.phases]
    lines.append(
        f"the task evaluation is the peak of {len(peaks)}/{len(corners)} corners"
        + (f"; to shrink it, {task_eval_fix(evaluation.peak)}" if peaks else "")
    )
    return lines


def run_estimate(spec: SweepSpec, gpu_sizes_gib: list[float], as_json: bool) -> str:
    """What `qlora-sweep estimate` prints.

    Raises:
        SpecError: If the model config cannot be read or its memory cannot be predicted.
    """
    _, config = load_model_config(spec)
    corners = estimate_corners(spec, config, gpu_sizes_gib)
    if as_json:
        return json.dumps([c.as_dict() for c in corners], indent=2)
    return render_table(spec, corners, getattr(config, "model_type", "?"))

