"""What mattered: hyperparameter importance from the sweep's Optuna study.

The study the searcher wrote (`<experiment>/optuna.db`, or the spec's search.optuna_storage) is
used when it can be read; it is opened from a temporary copy, so a report never writes to a running
sweep's database. Otherwise an in-memory study is rebuilt from the trials table, with the exact
distributions the sweep sampled from (the saved space's `SpaceSpec.distributions`, from the
hyperparameter registry in trainables/params.py), and each trial's best value of the objective
(best_eval_loss, or best_<task metric>; analysis.pareto.Quality) as its value.
The report says which source was used.

Importances are Optuna's `get_param_importances` with its default evaluator (PED-ANOVA in
Optuna 5), normalized to sum to 1. Parameters fixed in the spec are not searched and have none.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.pareto import Quality
from analysis.results import Experiment
from core import experiment_folder, storage
from core.experiment_folder import REPEAT_ATTR  # a study trial answered from an identical earlier one
from core.numbers import is_finite_number
from core.status import RANKABLE_STATUSES

MIN_TRIALS = 2
FEW_TRIALS = 10  # below this, say the importances are a rough guide only


@dataclass
class Importance:
    """Parameter importances and where they came from.

    Attributes:
        values: Parameter -> importance (normalized, descending); empty when none could be computed.
        source: One line saying which study was used.
        trials: Completed trials the importances are computed from.
        evaluator: The Optuna evaluator's class name.
        target: What each trial's value is (what the importances explain).
        notes: Caveats to show next to the chart.
    """

    values: dict[str, float]
    source: str
    trials: int = 0
    evaluator: str = ""
    target: str = ""
    notes: list[str] = field(default_factory=list)


def param_importances(exp: Experiment) -> Importance:
    """Importances from the sweep's stored Optuna study if readable, else from a rebuilt one.

    Optuna's INFO lines (one per trial of a rebuilt study) are silenced while this runs; the
    caller's Optuna verbosity is put back afterwards.
    """
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return _param_importances(exp)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _param_importances(exp: Experiment) -> Importance:
    import optuna

    notes: list[str] = []
    study, source = _stored_study(exp, notes)
    metric = exp.saved_spec.search.metric
    target = f"{metric} as the searcher recorded it (each trial's last report)"
    if study is None or _complete(study) < MIN_TRIALS:
        if study is not None:
            notes.append(f"{source} has fewer than {MIN_TRIALS} completed trials; rebuilt from the trials table instead")
        study, source = _rebuilt_study(exp, notes)
        target = Quality.of(exp.saved_spec).column
    if study is None:
        return Importance({}, source, notes=notes)
    count = _complete(study)
    if count < MIN_TRIALS:
        return Importance({}, source, count, target=target, notes=[*notes, f"need at least {MIN_TRIALS} trials with a result"])
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except (RuntimeError, ValueError) as exc:  # e.g. no parameter was searched
            return Importance({}, source, count, type(evaluator).__name__, target, [*notes, f"not computed: {exc}"])
    notes += [str(w.message) for w in caught if "importance" in str(w.message).lower()]
    if count < FEW_TRIALS:
        notes.append(f"only {count} trials: treat these importances as a rough guide")
    return Importance({k: float(v) for k, v in values.items()}, source, count, type(evaluator).__name__, target, notes)


def _complete(study: Any) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _stored_study(exp: Experiment, notes: list[str]) -> tuple[Any, str]:
    """The study the searcher wrote, opened from a temporary copy; (None, reason) if unavailable."""
    import optuna

    search = exp.saved_spec.search
    name = search.optuna_study_name
    url = search.optuna_storage
    candidates = [experiment_folder.file(exp.path, experiment_folder.STUDY_FILE)]
    if isinstance(url, str) and url.startswith("sqlite:///"):
        candidates.append(url.removeprefix("sqlite:///"))
    for location in candidates:
        if not storage.exists(location):
            continue
        try:
            return _load_copy(location, name), f"the sweep's Optuna study ({location})"
        except Exception as exc:  # locked, corrupt, older schema: fall back rather than fail the report
            notes.append(f"could not read the Optuna study in {location} ({type(exc).__name__}: {exc}); rebuilt instead")
            return None, ""
    if isinstance(url, str) and url != "memory" and not url.startswith("sqlite:"):
        try:
            study = _trained_trials_only(optuna.load_study(study_name=name, storage=url))
            return study, f"the sweep's Optuna study '{name}' in {url.split('@')[-1]}"
        except Exception as exc:  # unreachable database server
            notes.append(f"could not open the Optuna storage ({type(exc).__name__}); rebuilt instead")
    return None, ""


def _trained_trials_only(study: Any) -> Any:
    """An in-memory copy of `study` without the trials answered from an identical earlier one
    (search.skip_repeats): they would count that trial twice."""
    import optuna

    memory = optuna.create_study(directions=study.directions)
    memory.add_trials([t for t in study.get_trials(deepcopy=False) if REPEAT_ATTR not in t.user_attrs])
    return memory


def _load_copy(location: str, name: str | None) -> Any:
    import optuna

    fs, path = storage.filesystem(location)
    with fs.open_input_stream(path) as f:
        data = f.read()
    handle, copy = tempfile.mkstemp(suffix=".db", prefix="qlora-sweep-study-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        url = f"sqlite:///{copy}"
        names = optuna.study.get_all_study_names(storage=url)
        if name not in names:
            if len(names) != 1:
                raise LookupError(f"study '{name}' not found; the database holds {names}")
            name = names[0]
        # Copied into memory, so the temporary file can go.
        return _trained_trials_only(optuna.load_study(study_name=name, storage=url))
    finally:
        os.remove(copy)


def _rebuilt_study(exp: Experiment, notes: list[str]) -> tuple[Any, str]:
    """An in-memory study of the rankable trials, with the sweep's own distributions."""
    import optuna

    problems: list[str] = []
    space = exp.saved_spec.space_spec(problems)
    if space is None:
        notes.append(f"{problems[0]}; no importances")
        return None, "none"
    distributions = space.distributions(exp.saved_spec.train.batch_size)
    quality = Quality.of(exp.saved_spec)
    source = f"an in-memory Optuna study rebuilt from the trials table (value: {quality.column})"
    if not distributions:
        notes.append("every parameter is fixed in the spec; nothing was searched")
        return None, source
    study = optuna.create_study(direction="minimize" if quality.lower_is_better else "maximize")
    rows = exp.trials[exp.trials["status"].isin([s.value for s in RANKABLE_STATUSES])]
    skipped = 0
    for row in rows.to_dict("records"):
        value = row.get(quality.column)
        params = {name: _param_value(row.get(name), dist) for name, dist in distributions.items()}
        if not is_finite_number(value) or any(v is None for v in params.values()):
            skipped += 1
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(value)))
    if skipped:
        notes.append(f"{skipped} trials without a result or outside the spec's space were left out")
    return study, source


def _param_value(value: Any, distribution: Any) -> Any:
    """A table value as the distribution's own value (categorical choices matched by equality), or None."""
    import optuna

    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        for choice in distribution.choices:
            if choice == value or (is_finite_number(choice) and is_finite_number(value) and math.isclose(choice, value)):
                return choice
        return None
    if not is_finite_number(value):
        return None
    value = int(value) if isinstance(distribution, optuna.distributions.IntDistribution) else float(value)
    return value if distribution.low <= value <= distribution.high else None

