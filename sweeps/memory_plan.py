"""A sweep's memory plan: what each trial is predicted to need, and the GPU it is compared with.

Every figure comes from `trainables.trial_memory.estimate_for_trial`, with the training setup
resolved for a CUDA GPU (`trainables.training_setup.TrainingSetup`), so what `estimate` prints,
what admission refuses, the GPU share a packed trial asks for and the prediction each trial
reports are the same number. With task metrics (eval.metrics) that number is the larger of the
training step and the task evaluation (`MemoryPlan.task_eval`), so a configuration whose
evaluation would not fit is refused like one whose training would not. This module needs no Ray:
`qlora-sweep estimate` uses it as is; sweeps/admission.py adds the searcher that applies it during a sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sweeps.spec import SpecError, SweepSpec
from trainables import params
from trainables.memory_estimator import EvalPhase, MemoryEstimate, TaskEvalWorkload
from trainables.training_setup import TrainingSetup
from trainables.trial_memory import MemoryKnobs, estimate_for_trial, targeted_layers, task_eval_workload

# GPU memory by Ray's accelerator_type (ray.util.accelerators), in GiB as torch.cuda reports a card's
# total memory, rounded down. A type sold with several sizes maps to the smallest: a trial admitted
# for it fits on the larger ones too. resources.gpu_memory_gib overrides this table.
KNOWN_GPU_MEMORY_GIB: dict[str, float] = {
    "K80": 11.0,
    "P4": 7.4,
    "P100": 11.9,  # 12 GB and 16 GB variants
    "V100": 15.7,  # 16 GB and 32 GB variants
    "T4": 14.7,
    "A10G": 22.0,
    "L4": 22.0,
    "L40S": 44.0,
    "A100": 39.0,  # 40 GB and 80 GB variants
    "A100-40G": 39.0,
    "A100-80G": 79.0,
    "H100": 79.0,
    "H200": 139.0,
    "H20": 94.0,
    "B200": 178.0,
    "RTX-PRO-6000": 94.0,
}
_ACCELERATOR_PREFIX = "accelerator_type:"


@dataclass(frozen=True)
class GpuSize:
    """The GPU memory admission and packing plan for, and where that number came from."""

    gib: float
    source: str


def _accelerator_types(cluster_resources: dict[str, float] | None) -> list[str]:
    return sorted(k[len(_ACCELERATOR_PREFIX):] for k in (cluster_resources or {}) if k.startswith(_ACCELERATOR_PREFIX))


def _local_cuda_devices() -> list[Any]:
    """torch.cuda's device properties on this machine ([] without CUDA, or with a broken install)."""
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA install must not stop a sweep that could run on CPU
        pass
    return []


def detect_gpu_size(spec: SweepSpec, cluster_resources: dict[str, float] | None, local: bool) -> GpuSize | None:
    """The memory of the GPU a sweep's trials run on, if it can be known.

    In order: resources.gpu_memory_gib; for trials that use GPUs, the smallest GPU among Ray's
    `accelerator_type:<type>` node resources (KNOWN_GPU_MEMORY_GIB), then, on a local cluster,
    the smallest GPU torch.cuda sees on this machine. None: unknown (no admission).

    Args:
        spec: The sweep spec.
        cluster_resources: `ray.cluster_resources()`, or None when not connected.
        local: Whether the cluster was started on this machine (its GPUs are this machine's).
    """
    if spec.resources.gpu_memory_gib:
        return GpuSize(float(spec.resources.gpu_memory_gib), "resources.gpu_memory_gib")
    if spec.resources.gpus_per_trial <= 0:
        return None  # CPU trials: a GPU on the cluster is not where they run
    known = sorted((KNOWN_GPU_MEMORY_GIB[t], t) for t in _accelerator_types(cluster_resources) if t in KNOWN_GPU_MEMORY_GIB)
    if known:
        gib, name = known[0]
        return GpuSize(gib, f"Ray accelerator_type:{name} ({gib:g} GiB; set resources.gpu_memory_gib to override)")
    if local:
        devices = _local_cuda_devices()
        if devices:
            smallest = min(devices, key=lambda p: p.total_memory)
            gib = math.floor(smallest.total_memory / 2**30 * 10) / 10
            return GpuSize(gib, f"torch.cuda on this machine ({smallest.name})")
    return None


def gpu_names(spec: SweepSpec, cluster_resources: dict[str, float] | None, local: bool) -> list[str]:
    """The GPUs the sweep's trials run on, for provenance: Ray's accelerator types, else (on a
    local cluster) torch.cuda's device names; [] when trials train on CPU."""
    if spec.resources.gpus_per_trial <= 0:
        return []
    types = _accelerator_types(cluster_resources)
    if types:
        return types
    return [p.name for p in _local_cuda_devices()] if local else []


# --- the plan ---------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Predictions for this sweep's trials, and what they are compared with. Picklable (Ray pickles
    it with the searcher and the trainable's resource function).

    Attributes:
        spec: The sweep spec.
        model_config: The base model's transformers config.
        gpu: The GPU size admission and packing use; None: unknown (no admission, no packing).
        predictable: Whether the estimator models this architecture (see trainables/memory_estimator.py).
        setup: The training setup predictions assume: the spec's, resolved for a CUDA GPU.
    """

    spec: SweepSpec
    model_config: Any
    gpu: GpuSize | None
    predictable: bool = True
    setup: TrainingSetup | None = None
    _targets: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.setup is None:
            self.setup = TrainingSetup.resolve(self.spec.model, self.spec.train, "cuda")

    @property
    def margin(self) -> float:
        return float(self.spec.resources.memory_margin)

    @property
    def task_eval(self) -> TaskEvalWorkload | None:
        """What each trial's task evaluation runs, in the bounds the spec allows; None without task metrics.

        Derived from the spec each time (not stored), so a plan pickled before it existed still works.
        """
        return task_eval_workload(self.spec.eval, self.spec.data.max_seq_length)

    def knobs(self, config: dict[str, Any]) -> MemoryKnobs:
        """The memory knobs of a trial config as Tune passes it (no batch_size: train.batch_size)."""
        return MemoryKnobs.from_config(config, self.spec.train.batch_size, self.spec.data.max_seq_length)

    def estimate(self, knobs: MemoryKnobs) -> MemoryEstimate | None:
        """The trial's predicted memory on a CUDA GPU, or None when it cannot be predicted."""
        if not self.predictable:
            return None
        try:
            return estimate_for_trial(self.model_config, self.setup, knobs, self.task_eval)
        except ValueError:
            return None

    def needed_gib(self, estimate: MemoryEstimate) -> float:
        """GPU memory a trial needs: reserved + paged optimizer states + CUDA context, with the margin."""
        return estimate.total_with_context_gib * (1 + self.margin)

    def admit(self, knobs: MemoryKnobs) -> tuple[str | None, MemoryEstimate | None]:
        """(None, estimate) if the trial may launch, else (why not, estimate)."""
        estimate = self.estimate(knobs)
        if self.gpu is None or estimate is None:
            return None, estimate
        needed = self.needed_gib(estimate)
        if needed <= self.gpu.gib:
            return None, estimate
        over = (
            f"{_gib(estimate.total_with_context_gib)} GiB with CUDA context "
            f"(+{self.margin:.0%} margin = {_gib(needed)} GiB) > {self.gpu.gib:g} GiB GPU ({self.gpu.source})"
        )
        if estimate.task_eval is None or estimate.peak_phase == "training":
            return f"predicted not to fit: {over}", estimate
        advice = self._task_eval_advice(estimate)
        return f"predicted not to fit in its task evaluation (eval.metrics): {over}; {advice}", estimate

    def _task_eval_advice(self, estimate: MemoryEstimate) -> str:
        """Where the task evaluation peaks, what to lower, and whether training alone would fit."""
        peak = estimate.task_eval.peak  # type: ignore[union-attr]
        fix = task_eval_fix(peak)
        training = estimate.training_with_context_gib
        if training * (1 + self.margin) <= self.gpu.gib:  # type: ignore[union-attr]
            alone = f"training alone needs {_gib(training)} GiB and fits"
        else:
            alone = f"training alone needs {_gib(training)} GiB and does not fit either"
        return f"it peaks at {peak.describe()}; {fix} ({alone})"

    def gpu_fraction(self, knobs: MemoryKnobs) -> float:
        """The share of a GPU a packed trial asks for: its need over the GPU size, rounded up to 1%,
        at most resources.gpus_per_trial."""
        cap = float(self.spec.resources.gpus_per_trial)
        estimate = self.estimate(knobs)
        if self.gpu is None or estimate is None:
            return cap
        share = math.ceil(self.needed_gib(estimate) / self.gpu.gib * 100 - 1e-9) / 100
        return min(cap, max(0.01, share))

    def targets(self, label: str) -> frozenset[str] | None:
        """The layers a target-module label adapts, or None if that cannot be resolved."""
        if label not in self._targets:
            try:
                self._targets[label] = targeted_layers(self.model_config, label)
            except ValueError:
                return None
        return self._targets[label]

    def at_least_as_large(self, small: MemoryKnobs, large: MemoryKnobs) -> bool:
        """Whether `large` needs at least the memory of `small` in every dimension memory grows with.

        The dimensions are the registry's memory knobs (trainables/params.py, `Knob.memory`) and
        the sequence length: "numeric" knobs (rank, micro-batch, dropout) and seq_len compare as
        numbers, "flag" knobs (use_dora) by on beating off, and "layers" (target modules) by
        inclusion of the layers they adapt (qv within attention within all-linear; mlp within
        all-linear; lists by their layers).
        """
        if large.seq_len < small.seq_len:
            return False
        for knob in params.MEMORY_KNOBS:
            a, b = getattr(small, knob.name), getattr(large, knob.name)
            if knob.memory == "numeric" and b < a:
                return False
            if knob.memory == "flag" and bool(a) and not bool(b):
                return False
            if knob.memory == "layers" and a != b:
                small_layers, large_layers = self.targets(a), self.targets(b)
                if small_layers is None or large_layers is None or not small_layers <= large_layers:
                    return False
        return True


def task_eval_fix(peak: EvalPhase) -> str:
    """What shrinks a task evaluation that peaks at `peak`: the decode steps by the batch and the generated
    length; the prefill and the forwards by the batch and the prompt / row bound, data.max_seq_length
    (eval.max_new_tokens does not shorten them)."""
    if peak.name.startswith("generation decode"):
        return "lower eval.batch_size or eval.max_new_tokens"
    if peak.name.startswith("generation prefill"):
        return ("lower eval.batch_size, or data.max_seq_length, which bounds the prompts "
                "(eval.max_new_tokens does not shorten the prefill)")
    forward = peak.name.split(",")[0]
    return f"lower eval.batch_size or data.max_seq_length (eval.max_new_tokens does not shorten a {forward})"


def _gib(value: float) -> str:
    """GiB with enough digits to tell a prediction from a GPU size (tiny test models differ by MiB)."""
    return f"{value:.2f}" if value >= 10 else f"{value:.4g}"


def smallest_knobs(spec: SweepSpec) -> list[MemoryKnobs]:
    """For each target-module choice, the smallest configuration of the space in every other dimension."""
    corners = params.memory_corners(spec.space, spec.train.batch_size)
    return [MemoryKnobs(**row, seq_len=spec.data.max_seq_length) for row in corners.smallest]


def memory_plan(
    spec: SweepSpec, model_config: Any, gpu: GpuSize | None, setup: TrainingSetup | None = None
) -> MemoryPlan:
    """The sweep's memory plan, checked before any trial starts.

    Raises:
        SpecError: If resources.pack cannot be honoured (GPU size unknown, architecture not
            modelled), or if even the smallest configuration of the space is predicted not to fit.
    """
    plan = MemoryPlan(spec=spec, model_config=model_config, gpu=gpu, setup=setup)
    smallest = smallest_knobs(spec)
    try:
        estimate_for_trial(model_config, plan.setup, smallest[0], plan.task_eval)
    except ValueError as exc:
        plan.predictable = False
        if spec.resources.pack:
            raise SpecError(
                "resources.pack", [f"resources.pack: the memory of this model cannot be predicted ({exc}); set pack: false"]
            ) from None
    if spec.resources.pack and gpu is None:
        raise SpecError(
            "resources.pack",
            ["resources.pack: the GPU size is unknown (no resources.gpu_memory_gib, and the cluster reports no known "
             "accelerator_type), so trial shares cannot be computed; set resources.gpu_memory_gib, e.g. 24"],
        )
    verdicts = [plan.admit(knobs) for knobs in smallest]
    if all(reason for reason, _ in verdicts):
        # All rejected, so every estimate exists; name the least demanding configuration.
        least = min(range(len(smallest)), key=lambda i: verdicts[i][1].reserved_bytes)
        if verdicts[least][1].peak_phase == "task eval":
            fix = ("Lower eval.batch_size, eval.max_new_tokens or data.max_seq_length (the task evaluation is what "
                   "does not fit), or target a larger GPU (resources.gpu_memory_gib)")
        else:
            fix = ("Lower data.max_seq_length or the micro-batch (space.batch_size / train.batch_size), turn on "
                   "train.gradient_checkpointing, or target a larger GPU (resources.gpu_memory_gib)")
        raise SpecError(
            "admission",
            [f"every configuration of the space is predicted not to fit: the smallest ({smallest[least].describe()}) is "
             f"{verdicts[least][0]}. {fix}"],
        )
    return plan
