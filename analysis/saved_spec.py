"""A typed, lenient view of the saved spec (sweep_spec.yaml) for what analysis reads.

The driver saves the whole spec as it ran (`SweepSpec.model_dump`); analysis only needs a few of
its keys: the training budget (for statuses and ASHA's rungs), the search's objectives and study,
the model and data named in the report's header, and the space (for the config columns and the
importances' distributions). `SavedSpec` reads exactly those, with defaults, and ignores the rest,
so experiments written by older or newer versions still open: an unreadable section falls back to
its defaults with a note instead of failing the report. `Experiment.spec` keeps the raw dict for
callers that want the rest (compare's spec differences).

The view never imports the sweep schema (sweeps/spec.py sits above analysis): defaults of the
model/data/train sections come from trainables.settings, where those sections are defined.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError

from core.experiment_folder import SPEC_FILE
from trainables import params
from trainables.metrics import OBJECTIVE
from trainables.settings import DataSpec, ModelSpec, TrainSpec


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].default


class _View(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())


class SavedModel(_View):
    path: str = "?"
    quantization: str = _default(ModelSpec, "quantization")
    double_quant: bool = _default(ModelSpec, "double_quant")
    trust_remote_code: bool = _default(ModelSpec, "trust_remote_code")


class SavedData(_View):
    path: str = "?"
    format: str = _default(DataSpec, "format")


class SavedTrain(_View):
    max_steps: int = _default(TrainSpec, "max_steps")
    eval_every: int = _default(TrainSpec, "eval_every")
    batch_size: int = _default(TrainSpec, "batch_size")

    @property
    def rounds(self) -> int:
        """Evaluation rounds of a trial that runs to the full budget."""
        return self.max_steps // self.eval_every if self.eval_every else 0


class SavedAsha(_View):
    max_t: int | None = None
    grace_period: float | None = None
    reduction_factor: float | None = None


class SavedScheduler(_View):
    asha: SavedAsha | None = SavedAsha()


class SavedSearch(_View):
    metric: str = OBJECTIVE
    objectives: list[str] | None = None
    optuna_storage: str | None = None
    optuna_study_name: str | None = None


class SavedEval(_View):
    metrics: list[Any] = []


class SavedResources(_View):
    gpus_per_trial: float = 0.0


class SavedSpec(_View):
    """The keys of sweep_spec.yaml that analysis reads.

    Attributes:
        name: The sweep's name (None in a hand-written spec without one).
        space: The `space:` section as saved (a raw dict; `space_spec()` parses it).
    """

    name: str | None = None
    model: SavedModel = SavedModel()
    data: SavedData = SavedData()
    train: SavedTrain = SavedTrain()
    scheduler: SavedScheduler = SavedScheduler()
    search: SavedSearch = SavedSearch()
    resources: SavedResources = SavedResources()
    eval: SavedEval = SavedEval()
    space: dict[str, Any] = {}

    @classmethod
    def from_raw(cls, raw: Any, notes: list[str] | None = None) -> SavedSpec:
        """The view of a saved spec dict; a section that does not read is replaced by its defaults (noted)."""
        if isinstance(raw, SavedSpec):
            return raw
        raw = dict(raw) if isinstance(raw, Mapping) else {}
        try:
            return cls.model_validate(raw)
        except ValidationError:
            pass
        good: dict[str, Any] = {}
        for name in cls.model_fields:
            if name not in raw:
                continue
            try:
                cls.model_validate({name: raw[name]})
            except ValidationError as exc:
                if notes is not None:
                    problem = exc.errors()[0]
                    where = ".".join(str(p) for p in (name, *problem["loc"][1:]))
                    notes.append(f"{SPEC_FILE}: {where} does not read ({problem['msg']}); its defaults were used")
            else:
                good[name] = raw[name]
        return cls.model_validate(good)

    @property
    def task_metrics(self) -> dict[str, str]:
        """The task metrics of `eval.metrics` and their directions ({} when none, or unreadable)."""
        from trainables.task_metrics import EvalSpec

        try:
            spec = EvalSpec.model_validate({"metrics": self.eval.metrics})
        except ValueError:
            return {}
        return {m.metric_name: m.better for m in spec.metrics}

    def direction(self, metric: str) -> str:
        """lower or higher is better for a searched metric: a task metric's, or trainables/metrics.py's."""
        from trainables.metrics import direction

        return self.task_metrics.get(metric) or direction(metric)

    @property
    def objective_column(self) -> str:
        """The trials-table column ranked by the objective: best_<search.metric>."""
        return f"best_{self.search.metric}"

    @property
    def asha(self) -> SavedAsha | None:
        return self.scheduler.asha

    @property
    def max_rounds(self) -> int:
        """Rounds after which a trial counts as complete: ASHA's max_t, or the full budget."""
        return int((self.asha.max_t if self.asha else None) or self.train.rounds)

    def _parsed_space(self) -> tuple[Any, str | None]:
        try:
            return params.space_from_raw(self.space), None
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            return None, _first_problem(exc)

    def space_spec(self, notes: list[str] | None = None) -> Any:
        """The saved space parsed by the hyperparameter registry (trainables.params.SpaceSpec), None if it
        does not parse with this version (noted). Knobs added since the experiment ran (use_rslora,
        use_dora) take the registry's defaults."""
        space, problem = self._parsed_space()
        if space is None and notes is not None:
            notes.append(f"the saved space does not parse with this version ({problem})")
        return space

    def config_columns(self, notes: list[str] | None = None) -> list[str]:
        """The trial-config columns of the trials table, from the registry.

        A space that does not parse gets the registry's whole column list (the alpha-ratio column
        only when lora_alpha is written as a ratio), with a note.
        """
        space, problem = self._parsed_space()
        if space is not None:
            return space.config_columns()
        if notes is not None:
            notes.append(
                f"the saved space ({SPEC_FILE}) does not parse with this version ({problem}); "
                "every known config column is shown"
            )
        columns = []
        for knob in params.KNOBS:
            columns.append(knob.name)
            if knob.name == "lora_alpha" and isinstance(self.space.get("lora_alpha"), Mapping):
                columns.append(params.ALPHA_RATIO_PARAM)
        return columns


def _first_problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "space"
        return f"{where}: {problem['msg']}"
    return f"{type(exc).__name__}: {exc}"


class TrialSettings(NamedTuple):
    """The saved spec's model, data and train sections, validated by the trainable's own models."""

    model: ModelSpec
    data: DataSpec
    train: TrainSpec


def trial_settings(raw: Mapping[str, Any]) -> TrialSettings:
    """Strictly parse the model/data/train sections of a saved spec (for export, which trains and
    evaluates like a trial did). Paths in a saved spec are already absolute.

    Raises:
        pydantic.ValidationError: If a section does not validate with this version.
    """
    return TrialSettings(
        model=ModelSpec.model_validate(raw.get("model") or {}),
        data=DataSpec.model_validate(raw.get("data") or {}),
        train=TrainSpec.model_validate(raw.get("train") or {}),
    )
