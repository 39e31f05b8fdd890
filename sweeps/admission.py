"""Know the memory before the GPU does: admission, GPU packing and OOM-aware search.

Every figure here comes from `trainables.trial_memory.estimate_for_trial`, the estimator set up as
the trainable trains, so what is admitted, how much of a GPU a trial gets and what each trial
reports as predicted_memory_mib are the same prediction.

* **Admission.** When the GPU a sweep targets is known (`resources.gpu_memory_gib`, or read from
  the cluster by `detect_gpu_size`), a configuration whose prediction, CUDA context included and
  grown by `resources.memory_margin`, exceeds it is never launched: `AdmissionSearch` records it in
  `<experiment>/infeasible.jsonl` (the report lists it as status "infeasible", with the reason), tells
  the searcher the proposal is infeasible, and asks again.
* **OOM-aware search.** A trial that ran out of memory reports trial_status "oom" (see
  trainables/qlora.py). Memory only grows with rank, targeted layers, micro-batch and sequence length,
  so any proposal at least as large in each of them is rejected before launch too, as "dominated by
  OOM config <trial id>".
* **Packing.** With `resources.pack`, `trial_resources` asks Ray for the fraction of a GPU each trial's
  prediction needs, so small trials share a GPU.

How the searcher learns: rejected proposals and OOM trials are told to Optuna as PRUNED with a
constraint above 0 (`Trial.set_constraint`, from the parameters), which Optuna's samplers steer away
from and `study.best_trials` leaves out. Admitted trials get their (negative) memory constraint too.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ray.tune.search import Searcher

from core import storage
from sweeps.spec import SpecError, SweepSpec
from trainables.memory_estimator import MemoryEstimate
from trainables.trial_memory import MemoryKnobs, estimate_for_trial, predicted_mib, targeted_layers

if TYPE_CHECKING:
    from ray.tune.execution.placement_groups import PlacementGroupFactory

INFEASIBLE_FILE = "infeasible.jsonl"
# Optuna constraint names (Trial.set_constraint); above 0 means infeasible.
MEMORY_CONSTRAINT = "memory_gib_over_gpu"
OOM_CONSTRAINT = "out_of_memory"
# Proposals in a row that may be rejected before the search gives up (the space is then, as far as
# the searcher can find, all infeasible).
MAX_REJECTIONS = 100

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


@dataclass(frozen=True)
class GpuSize:
    """The GPU memory admission and packing plan for, and where that number came from."""

    gib: float
    source: str


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
    types = [k.split(":", 1)[1] for k in (cluster_resources or {}) if k.startswith("accelerator_type:")]
    known = sorted((KNOWN_GPU_MEMORY_GIB[t], t) for t in types if t in KNOWN_GPU_MEMORY_GIB)
    if known:
        gib, name = known[0]
        return GpuSize(gib, f"Ray accelerator_type:{name} ({gib:g} GiB; set resources.gpu_memory_gib to override)")
    if local:
        try:
            import torch

            if torch.cuda.is_available():
                sizes = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
                smallest = min(sizes, key=lambda p: p.total_memory)
                gib = math.floor(smallest.total_memory / 2**30 * 10) / 10
                return GpuSize(gib, f"torch.cuda on this machine ({smallest.name})")
        except Exception:  # a broken CUDA install must not stop a sweep that could run on CPU
            return None
    return None


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
    """

    spec: SweepSpec
    model_config: Any
    gpu: GpuSize | None
    predictable: bool = True
    _targets: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    @property
    def margin(self) -> float:
        return float(self.spec.resources.memory_margin)

    def estimate(self, knobs: MemoryKnobs) -> MemoryEstimate | None:
        """The trial's predicted memory on a CUDA GPU, or None when it cannot be predicted."""
        if not self.predictable:
            return None
        try:
            return estimate_for_trial(self.model_config, self.spec, knobs, "cuda")
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
        return (
            f"predicted not to fit: {_gib(estimate.total_with_context_gib)} GiB with CUDA context "
            f"(+{self.margin:.0%} margin = {_gib(needed)} GiB) > {self.gpu.gib:g} GiB GPU ({self.gpu.source})",
            estimate,
        )

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

        Rank, micro-batch and sequence length compare as numbers; target modules by inclusion of
        the layers they adapt (qv within attention within all-linear; mlp within all-linear; lists
        by their layers); dropout by whether it is on (its masks cost the same at any rate).
        """
        if large.r < small.r or large.batch_size < small.batch_size or large.seq_len < small.seq_len:
            return False
        if small.lora_dropout > 0 and not large.lora_dropout > 0:
            return False
        if small.target_modules == large.target_modules:
            return True
        small_layers, large_layers = self.targets(small.target_modules), self.targets(large.target_modules)
        return small_layers is not None and large_layers is not None and small_layers <= large_layers


def _gib(value: float) -> str:
    """GiB with enough digits to tell a prediction from a GPU size (tiny test models differ by MiB)."""
    return f"{value:.2f}" if value >= 10 else f"{value:.4g}"


def memory_plan(spec: SweepSpec, model_config: Any, gpu: GpuSize | None) -> MemoryPlan:
    """The sweep's memory plan, checked before any trial starts.

    Raises:
        SpecError: If resources.pack cannot be honoured (GPU size unknown, architecture not
            modelled), or if even the smallest configuration of the space is predicted not to fit.
    """
    plan = MemoryPlan(spec=spec, model_config=model_config, gpu=gpu)
    smallest = smallest_knobs(spec)
    try:
        estimate_for_trial(model_config, spec, smallest[0], "cuda")
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
        raise SpecError(
            "admission",
            [f"every configuration of the space is predicted not to fit: the smallest ({smallest[least].describe()}) is "
             f"{verdicts[least][0]}. Lower data.max_seq_length or the micro-batch (space.batch_size / "
             "train.batch_size), turn on train.gradient_checkpointing, or target a larger GPU (resources.gpu_memory_gib)"],
        )
    return plan


def smallest_knobs(spec: SweepSpec) -> list[MemoryKnobs]:
    """For each target-module choice, the smallest configuration of the space in every other dimension."""
    batch = spec.space.batch_size if spec.space.batch_size is not None else spec.train.batch_size
    return [
        MemoryKnobs(
            r=min(int_choices(spec.space.r)),
            target_modules=label,
            batch_size=min(int_choices(batch)),
            seq_len=spec.data.max_seq_length,
            lora_dropout=min(float_bounds(spec.space.lora_dropout)),
        )
        for label in space_target_labels(spec)
    ]


def int_choices(value: Any) -> list[int]:
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def float_bounds(value: Any) -> list[float]:
    """The values (or the two bounds of a distribution) a float parameter can take."""
    if isinstance(value, dict):
        (bounds,) = value.values()
        return [float(b) for b in bounds]
    return [float(v) for v in (value if isinstance(value, list) else [value])]


def space_target_labels(spec: SweepSpec) -> list[str]:
    """The target-module labels of the space, as the search carries them, in the spec's order."""
    from trainables.targets import choice_label

    choices = spec.space.target_modules
    return [choice_label(choices)] if isinstance(choices, str) else [choice_label(c) for c in choices]


def trial_resources(config: dict[str, Any], *, plan: MemoryPlan) -> PlacementGroupFactory:
    """What a packed trial asks Ray for: its CPUs and the GPU share its predicted peak needs.

    Given to `tune.with_resources` (with functools.partial), which calls it with each trial's config.
    """
    from ray.tune import PlacementGroupFactory

    resources = plan.spec.resources
    share = plan.gpu_fraction(MemoryKnobs.from_config(config, plan.spec))
    return PlacementGroupFactory([{"CPU": float(resources.cpus_per_trial), "GPU": share, **resources.custom}])


# --- the searcher wrapper ---------------------------------------------------------------------


def _print_line(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


class AdmissionSearch(Searcher):
    """Wraps the sweep's searcher: proposals predicted not to fit, or at least as large as a
    configuration that ran out of memory, are recorded as infeasible and replaced before launch.

    Composes with Tune's save/restore like ConcurrencyLimiter: Tune pickles this object (with the
    wrapped searcher) in tuner.pkl, saves `get_state()` with the search-algorithm state, and on
    resume calls `set_state()` here and `restore_from_dir()` on the wrapped searcher.

    Args:
        searcher: The searcher to wrap (sweeps.searcher.OptunaStudySearch; any Tune Searcher works,
            the Optuna-specific `set_constraint` / `link_tune_trial` are used when it has them).
        plan: Predictions and the GPU size.
        experiment_dir: Where infeasible.jsonl goes.
        max_rejections: Proposals in a row that may be rejected before the search stops.
        out: Where the one-line notices go (stdout).
    """

    def __init__(
        self,
        searcher: Searcher,
        plan: MemoryPlan,
        experiment_dir: str,
        max_rejections: int = MAX_REJECTIONS,
        out: Callable[[str], None] = _print_line,
    ):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.plan = plan
        self.experiment_dir = experiment_dir
        self.max_rejections = max_rejections
        self.out = out
        # Everything below changes during the sweep and is what get_state/set_state carry.
        self.asked: dict[str, int] = {}  # Tune trial id -> proposals asked for it
        self.aliases: dict[str, str] = {}  # Tune trial id -> id the wrapped searcher knows its proposal by
        self.knobs: dict[str, MemoryKnobs] = {}  # Tune trial id -> memory knobs of its config
        self.ooms: dict[str, MemoryKnobs] = {}  # Tune trial id -> knobs it ran out of memory with
        self.rejected = {"memory": 0, "oom_dominated": 0}
        self.finished = False

    _STATE = ("asked", "aliases", "knobs", "ooms", "rejected", "finished")

    # Tune reads these from the outermost searcher; they are the wrapped searcher's.
    @property
    def metric(self) -> Any:
        return self.searcher.metric

    @property
    def mode(self) -> Any:
        return self.searcher.mode

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def _inner_id(self, trial_id: str) -> str:
        return self.aliases.get(trial_id, trial_id)

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.finished:
            return Searcher.FINISHED
        for _ in range(self.max_rejections):
            asked = self.asked.get(trial_id, 0)
            self.asked[trial_id] = asked + 1
            # A proposal the wrapped searcher has already been told about cannot be asked again
            # under the same id, so each further proposal for this Tune trial gets its own.
            inner_id = trial_id if asked == 0 else f"{trial_id}.{asked}"
            config = self.searcher.suggest(inner_id)
            if not isinstance(config, dict):
                return config  # None (not now) or FINISHED
            knobs = MemoryKnobs.from_config(config, self.plan.spec)
            reason, kind, estimate = self._verdict(knobs)
            if reason is None:
                if inner_id != trial_id:
                    self.aliases[trial_id] = inner_id
                    self._call("link_tune_trial", inner_id, trial_id)
                self.knobs[trial_id] = knobs
                self._constrain_memory(inner_id, estimate)
                return config
            self._reject(f"{trial_id}.x{asked}", inner_id, config, knobs, reason, kind, estimate)
        self.finished = True
        self.out(
            f"[qlora-sweep] stopping the search: the last {self.max_rejections} proposals were all rejected before "
            f"launch (see {INFEASIBLE_FILE}); the space left looks infeasible for this GPU. Shrink the space or "
            "target a larger GPU (resources.gpu_memory_gib)"
        )
        return Searcher.FINISHED

    def _verdict(self, knobs: MemoryKnobs) -> tuple[str | None, str, MemoryEstimate | None]:
        for oom_id, oom_knobs in self.ooms.items():
            if self.plan.at_least_as_large(oom_knobs, knobs):
                reason = f"dominated by OOM config {oom_id} ({oom_knobs.describe()})"
                return reason, "oom_dominated", self.plan.estimate(knobs)
        reason, estimate = self.plan.admit(knobs)
        return reason, "memory", estimate

    def _reject(
        self,
        row_id: str,
        inner_id: str,
        config: dict[str, Any],
        knobs: MemoryKnobs,
        reason: str,
        kind: str,
        estimate: MemoryEstimate | None,
    ) -> None:
        self.rejected[kind] += 1
        row = {
            "trial_id": row_id,
            **{k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))},
            "predicted_memory_mib": predicted_mib(estimate) if estimate is not None else None,
            "infeasible_reason": reason,
            "rejected_at": round(time.time(), 3),
        }
        append_line(storage.join(self.experiment_dir, INFEASIBLE_FILE), json.dumps(row))
        self.out(f"[infeasible] {knobs.describe()}: {reason}")
        if kind == "memory":
            self._constrain_memory(inner_id, estimate)
        else:
            self._call("set_constraint", inner_id, OOM_CONSTRAINT, 1.0)
        # The Optuna trial is named after its infeasible.jsonl row, not after the Tune trial that asked.
        self._call("link_tune_trial", inner_id, row_id)
        # No result: the wrapped Optuna searcher tells the trial PRUNED; the constraint marks it infeasible.
        self.searcher.on_trial_complete(inner_id, result=None, error=False)

    def _constrain_memory(self, inner_id: str, estimate: MemoryEstimate | None) -> None:
        """Optuna constraint from the parameters: GiB needed beyond the GPU (<= 0 fits)."""
        if estimate is not None and self.plan.gpu is not None:
            self._call("set_constraint", inner_id, MEMORY_CONSTRAINT, self.plan.needed_gib(estimate) - self.plan.gpu.gib)

    def _call(self, method: str, *args: Any) -> None:
        function = getattr(self.searcher, method, None)
        if function is not None:
            function(*args)

    def _note_oom(self, trial_id: str, result: dict[str, Any]) -> None:
        """Remember what a trial ran out of memory with (its micro-batch at the OOM, after any retry)."""
        if trial_id in self.ooms:
            return
        knobs = self.knobs.get(trial_id)
        if knobs is None and isinstance(result.get("config"), dict):
            knobs = MemoryKnobs.from_config(result["config"], self.plan.spec)
        if knobs is None:
            return
        batch = result.get("oom_batch_size")
        if isinstance(batch, int) and 0 < batch < knobs.batch_size:
            knobs = MemoryKnobs(knobs.r, knobs.target_modules, batch, knobs.seq_len, knobs.lora_dropout)
        self.ooms[trial_id] = knobs

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("trial_status") == "oom":
            self._note_oom(trial_id, result)
            return  # no quality to report; on_trial_complete tells the searcher
        self.searcher.on_trial_result(self._inner_id(trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        inner_id = self._inner_id(trial_id)
        if result and result.get("trial_status") == "oom":
            self._note_oom(trial_id, result)
            self._call("set_constraint", inner_id, OOM_CONSTRAINT, 1.0)
            self.searcher.on_trial_complete(inner_id, result=None, error=False)
            return
        self.searcher.on_trial_complete(inner_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        return self.searcher.add_evaluated_point(*args, **kwargs)

    def get_state(self) -> dict:
        return copy.deepcopy({name: getattr(self, name) for name in self._STATE})

    def set_state(self, state: dict) -> None:
        for name in self._STATE:
            if name in state:
                setattr(self, name, state[name])

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def append_line(location: str, line: str) -> None:
    """Append one line to a text file, local or in object storage (where it is rewritten whole)."""
    if storage.is_uri(location):
        text = storage.read_text(location) if storage.exists(location) else ""
        storage.write_text(location, text + line + "\n")
        return
    from pathlib import Path

    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
