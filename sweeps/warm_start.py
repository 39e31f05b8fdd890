"""Warm start (search.warm_start): earlier experiments' finished trials as prior trials of a new study.

Each folder listed is read as the report reads it (analysis/results.py). Its trials that finished
(completed, or stopped by ASHA) become finished Optuna trials of the new study with the value they
last reported (what the study records for its own trials, sweeps/searcher.py), so TPE, GP and
CMA-ES start informed instead of from random trials. They are not trained again, and skip_repeats
never answers a proposal from them (this sweep has no curve or adapter of theirs).

Compatibility, parameter by parameter of the new space (what `SpaceSpec.distributions` searches):

* a value outside the new choices or range leaves the trial out (counted per parameter);
* a parameter the earlier sweep searched and this one fixes (or does not have) is dropped from the
  prior trials, and the trials are kept with their other parameters (noted);
* a fixed value that differs between the two sweeps is noted: its trials are kept.

Experiments of another base model (model.path) are refused unless search.same_model_only is false.
Everything is checked in preflight, before Ray starts; problems name the folder and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core import experiment_folder, storage
from core.numbers import is_finite_number
from core.status import TrialStatus
from trainables.params import ALPHA_RATIO_PARAM, KNOB_BY_NAME, Fixed

# Optuna user attribute of a prior trial: the experiment folder it came from.
WARM_START_ATTR = "warm_start_from"
# Trial statuses whose last report is a finished trial's value.
FINISHED = (TrialStatus.COMPLETED.value, TrialStatus.EARLY_STOPPED.value)


@dataclass
class Source:
    """One earlier experiment the study started from, as warm_start.json records it."""

    path: str
    model: str
    trials: int  # added as prior trials
    left_out: int  # finished, but outside this space or without a value
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = f"warm start: {self.trials} trials from {self.path} (model {self.model}"
        text += f", {self.left_out} left out)" if self.left_out else ")"
        return text + ("; " + "; ".join(self.notes) if self.notes else "")


@dataclass
class WarmStart:
    """The prior trials (optuna FrozenTrials) and where they came from."""

    trials: list[Any]
    sources: list[Source]

    def lines(self) -> list[str]:
        return [s.line() for s in self.sources]

    def record(self) -> dict[str, Any]:
        return {"sources": [asdict(s) for s in self.sources]}


def _location(spec: Any, value: str) -> str:
    if storage.is_uri(value):
        return storage.without_credentials(value)
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (spec.base_dir / path).resolve())


def _cast(name: str, value: Any) -> Any:
    import pandas as pd

    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return float(value) if name == ALPHA_RATIO_PARAM else KNOB_BY_NAME[name].cast(value)


def _contains(dist: Any, value: Any) -> bool:
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        return any(type(c) is type(value) and c == value or (is_finite_number(c) and is_finite_number(value)
                                                            and not isinstance(c, bool) and float(c) == float(value))
                   for c in dist.choices)
    return dist.low <= float(value) <= dist.high


def _choice_value(dist: Any, value: Any) -> Any:
    """The option of a categorical distribution equal to `value` (Optuna stores the option's index)."""
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        for c in dist.choices:
            if c == value:
                return c
    return value


def load(spec: Any) -> tuple[WarmStart | None, list[str]]:
    """The prior trials of search.warm_start, and the problems that stop the sweep (one line each)."""
    import optuna

    from analysis.results import AnalysisInputError, NotAnExperiment, load_experiment

    search = spec.search
    if not search.warm_start:
        return None, []
    batch = spec.train.batch_size
    new_dists = spec.space.distributions(batch)
    new_fixed = {k.name: kind.value for k, kind in spec.space.kinds(batch) if isinstance(kind, Fixed)}
    metrics = search.objective_metrics
    trials: list[Any] = []
    sources: list[Source] = []
    problems: list[str] = []
    for given in search.warm_start:
        where = _location(spec, given)
        try:
            exp = load_experiment(where)
        except (NotAnExperiment, AnalysisInputError) as exc:
            problems.append(f"search.warm_start: {exc}")
            continue
        except OSError as exc:
            problems.append(f"search.warm_start: cannot read {given} ({type(exc).__name__}: {exc}); check the path")
            continue
        model = str(exp.saved_spec.model.path or "unknown")
        # The saved spec holds the model path as resolved (sweeps/driver.py saved_spec): compare it resolved.
        if search.same_model_only and model != spec.resolve_path(spec.model.path):
            problems.append(
                f"search.warm_start: {given} is a sweep of model {model}, this one trains {spec.model.path}; remove it, "
                "or set search.same_model_only: false to learn from another base model's trials"
            )
            continue
        notes: list[str] = []
        old_space = exp.saved_spec.space_spec(notes)
        old_batch = exp.saved_spec.train.batch_size or batch
        old_dists = old_space.distributions(old_batch) if old_space is not None else {}
        old_fixed = (
            {k.name: kind.value for k, kind in old_space.kinds(old_batch) if isinstance(kind, Fixed)} if old_space is not None else {}
        )
        dropped = [n for n in old_dists if n not in new_dists]
        if dropped:
            notes.append(", ".join(dropped) + " searched there, not here: dropped from its trials")
        differ = [f"{n} {old_fixed[n]!r} there, {v!r} here" for n, v in new_fixed.items() if n in old_fixed and old_fixed[n] != v]
        if differ:
            notes.append("fixed values differ (" + ", ".join(differ) + "); its trials are kept")
        left_out: dict[str, int] = {}
        used = 0
        finished = exp.trials[exp.trials["status"].isin(FINISHED)]
        for row in finished.to_dict("records"):
            results = experiment_folder.read_results(exp.path, str(row["trial_id"]))
            values = []
            for metric in metrics:
                reported = [r.get(metric) for r in results if r.get(metric) is not None]
                values.append(float(reported[-1]) if reported and is_finite_number(reported[-1]) else None)
            if any(v is None for v in values):
                left_out["no value"] = left_out.get("no value", 0) + 1
                continue
            params, distributions, outside = {}, {}, None
            for name, dist in new_dists.items():
                value = _cast(name, row.get(name))
                if value is None or not _contains(dist, value):
                    outside = name
                    break
                params[name], distributions[name] = _choice_value(dist, value), dist
            if outside is not None:
                left_out[f"{outside} outside this space"] = left_out.get(f"{outside} outside this space", 0) + 1
                continue
            trials.append(
                optuna.trial.create_trial(
                    params=params,
                    distributions=distributions,
                    **({"values": values} if len(values) > 1 else {"value": values[0]}),
                    user_attrs={WARM_START_ATTR: exp.path, "warm_start_trial": str(row["trial_id"])},
                )
            )
            used += 1
        if left_out:
            notes.append("left out: " + ", ".join(f"{n} {why}" for why, n in left_out.items()))
        sources.append(Source(exp.path, model, used, sum(left_out.values()), notes))
    return (WarmStart(trials, sources) if not problems else None), problems
