"""Know the memory before the GPU does: admission, GPU packing and OOM-aware search.

Every figure here comes from the sweep's `MemoryPlan` (sweeps/memory_plan.py, which needs no Ray):
`trainables.trial_memory.estimate_for_trial` with the training setup resolved once, so what is
admitted, how much of a GPU a trial gets and what each trial reports as predicted_memory_mib are the
same prediction. This module adds what applies the plan during a sweep, on Ray's side.

* **Admission.** When the GPU a sweep targets is known (`resources.gpu_memory_gib`, or read from
  the cluster by `detect_gpu_size`), a configuration whose prediction (with task metrics, the larger
  of its training step and its task evaluation), CUDA context included and grown by
  `resources.memory_margin`, exceeds it is never launched: `AdmissionSearch` records it in
  `<experiment>/infeasible.jsonl` (the report lists it as status "infeasible", with the reason), tells
  the searcher the proposal is infeasible, and asks again.
* **OOM-aware search.** A trial that ran out of memory reports trial_status "oom" (see
  trainables/qlora.py). Memory only grows with the registry's memory knobs (rank, targeted layers,
  dropout, micro-batch, DoRA; trainables/params.py) and the sequence length, so any proposal at least
  as large in each of them is rejected before launch too, as "dominated by OOM config <trial id>".
* **Packing.** With `resources.pack`, `trial_resources` asks Ray for the fraction of a GPU each trial's
  prediction needs, so small trials share a GPU.

How the searcher learns: rejected proposals and OOM trials are told to Optuna as PRUNED with a
constraint above 0 (`Trial.set_constraint`, from the parameters), which Optuna's samplers steer away
from and `study.best_trials` leaves out. Admitted trials get their (negative) memory constraint too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from ray.tune.search import Searcher

from core import experiment_folder, storage
from core.experiment_folder import INFEASIBLE_FILE
from core.status import TrialStatus

from sweeps.memory_plan import MemoryPlan
from trainables.memory_estimator import MemoryEstimate
from trainables.trial_memory import MemoryKnobs, predicted_mib

if TYPE_CHECKING:
    from ray.tune.execution.placement_groups import PlacementGroupFactory

# Optuna constraint names (Trial.set_constraint); above 0 means infeasible.
MEMORY_CONSTRAINT = "memory_gib_over_gpu"
OOM_CONSTRAINT = "out_of_memory"
# Proposals in a row that may be rejected before the search gives up (the space is then, as far as
# the searcher can find, all infeasible).
MAX_REJECTIONS = 100


def trial_resources(config: dict[str, Any], *, plan: MemoryPlan) -> PlacementGroupFactory:
    """What a packed trial asks Ray for: its CPUs and the GPU share its predicted peak needs.

    Given to `tune.with_resources` (with functools.partial), which calls it with each trial's config.
    """
    from ray.tune import PlacementGroupFactory

    resources = plan.spec.resources
    share = plan.gpu_fraction(plan.knobs(config))
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
            knobs = self.plan.knobs(config)
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
        append_line(experiment_folder.file(self.experiment_dir, INFEASIBLE_FILE), json.dumps(row))
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
            knobs = self.plan.knobs(result["config"])
        if knobs is None:
            return
        batch = result.get("oom_batch_size")
        if isinstance(batch, int) and 0 < batch < knobs.batch_size:
            knobs = dataclasses.replace(knobs, batch_size=batch)
        self.ooms[trial_id] = knobs

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("trial_status") == TrialStatus.OOM:
            self._note_oom(trial_id, result)
            return  # no quality to report; on_trial_complete tells the searcher
        self.searcher.on_trial_result(self._inner_id(trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        inner_id = self._inner_id(trial_id)
        if result and result.get("trial_status") == TrialStatus.OOM:
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
