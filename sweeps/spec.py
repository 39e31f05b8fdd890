"""The sweep spec: one YAML file, one typed schema at the boundary.

Every section has sensible defaults, so a sweep file says only what differs. Unknown keys are
errors (``extra="forbid"``), and `load_spec` reports every problem at once, each naming the key
path, the bad value, what is allowed and how to fix it.

The sections a trial needs live below the sweep layer and are composed here: `model`, `data` and
`train` (trainables/settings.py) and `space`, the hyperparameter registry's typed SpaceSpec
(trainables/params.py, which parses each value into its kind and words the space's messages).
This module adds the search, scheduler, resources, storage and tracking sections and the error rendering.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from core import yaml_limits
from core.errors import ProblemsError
from core.hub import is_hub_id
from trainables.metrics import COLUMNS, OBJECTIVE, direction
from trainables.params import SpaceSpec
from trainables.settings import DataSpec, ModelSpec, PathText, Seed, TrainSpec
from trainables.settings import Strict as _Strict
from trainables.task_metrics import EvalSpec, MetricSpec, asha_rounds

# The spec's `name` (and `--name`): it names a folder inside the storage, so no separators, no
# leading dot (no "..", no hidden folder).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
NAME_MAX_LENGTH = 100
NAME_RULE = "use letters, digits, '_', '.', '-', starting with a letter or digit (it names the results folder)"
# A spec is a few KB (hostile input: see also core/yaml_limits.py for alias bombs).
MAX_SPEC_BYTES = 1_000_000

# search.objectives: metrics with a direction that every trial reports, and the short names accepted
# (besides the task metrics of `eval.metrics`, trainables/task_metrics.py).
OBJECTIVE_METRICS = ("eval_loss", "perplexity", "peak_memory_mib", "tokens_per_s")
# search.metric: what ASHA stops on and a single-objective search optimizes (or an eval.metrics name).
SEARCH_METRICS = ("eval_loss", "perplexity")
OBJECTIVE_ALIASES = {"peak_memory": "peak_memory_mib"}


class SpecError(ProblemsError):
    """A sweep spec is invalid. Holds every problem found, one line each."""

    noun = "the sweep spec"


# search.sampler: the Optuna samplers a spec can name (built by sweeps/driver.py `make_sampler`).
SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid")


class TPEOptions(_Strict):
    """Options of Optuna's TPESampler (search.sampler: tpe).

    All three are on by default: in the issue-16 benchmark (docs/benchmarks.md section 3c, 5 seeds, the
    same 1,920-step budget) TPE with them found a median best eval loss of 0.0871 (worst seed 0.0908)
    against 0.0896 (worst 0.1007) with them off, in about the same wall time (median 138 s against 128 s
    a sweep); GPSampler matched it at 2-3x the wall time.
    """

    multivariate: bool = Field(
        default=True,
        description="Model the parameters jointly (Optuna's multivariate TPE) instead of one at a time.",
    )
    group: bool = Field(
        default=True,
        description="With multivariate: model each group of parameters that occur together separately. Needs multivariate.",
    )
    constant_liar: bool = Field(
        default=True,
        description=(
            "Treat trials in flight as if they had the worst value, so parallel trials (search.max_concurrent > 1) "
            "are not proposed on top of each other."
        ),
    )

    @model_validator(mode="after")
    def _group_needs_multivariate(self) -> TPEOptions:
        if self.group and not self.multivariate:
            raise ValueError("group: true needs multivariate: true (Optuna groups parameters only in multivariate TPE)")
        return self


class SearchSpec(_Strict):
    """How many trials, how many at once, and which sampler proposes them."""

    num_samples: PositiveInt = 12
    max_concurrent: PositiveInt = 2
    seed: Seed = 0
    sampler: Literal[SAMPLERS] = Field(  # type: ignore[valid-type]
        default="tpe",
        description=(
            "tpe (Optuna's TPESampler, options under search.tpe), gp (GPSampler, Gaussian process), cmaes "
            "(CmaEsSampler; needs the cmaes package, and draws categorical parameters at random), random, or grid "
            "(every point of a space of lists once, in an order shuffled by search.seed)."
        ),
    )
    tpe: TPEOptions = TPEOptions()
    baseline: bool | dict[str, Any] = Field(
        default=True,
        description=(
            "Train the standard QLoRA recipe first (r 16, lora_alpha 2r, all-linear, learning_rate 2e-4, "
            "lora_dropout 0.05; sweeps/baseline.py), mapped to the nearest point of the space, to the full "
            "budget (ASHA never stops it); the report compares the best trial with it. false: no baseline. A "
            "mapping, e.g. {r: 8, learning_rate: 1e-4}, changes those values of the recipe."
        ),
    )
    warm_start: list[str] = Field(
        default_factory=list,
        description=(
            "Earlier experiment folders whose finished trials the new study starts from (as prior Optuna trials, "
            "not retrained): trials outside this space are left out, parameters this space does not search are "
            "dropped, with a note."
        ),
    )
    same_model_only: bool = Field(
        default=True,
        description="warm_start: use only experiments of the same model.path; false: of any base model.",
    )
    metric: str = Field(
        default=OBJECTIVE,
        description=(
            "What ASHA early-stops on and a single-objective search optimizes: eval_loss, perplexity, or the name of "
            "a task metric of eval.metrics (e.g. exact_match), whose direction it takes."
        ),
    )
    optuna_storage: str | None = Field(
        default=None,
        description=(
            "Where the Optuna study lives, so optuna-dashboard can show it live and resume can continue it. "
            "Omitted: sqlite:///<experiment folder>/optuna.db for local storage; for s3:// or gs:// storage a "
            "sqlite file on the driver machine ($QLORA_SWEEP_STUDIES, default ~/.local/share/qlora-sweep/studies/"
            "<experiment>.db), copied into the experiment when the sweep ends. Any SQLAlchemy URL "
            "(postgresql://user@host/db) shares one database between sweeps and machines. 'memory' keeps the "
            "study only inside Ray's pickled searcher state (no dashboard)."
        ),
    )
    optuna_study_name: str | None = Field(
        default=None, description="Name of the study in optuna_storage. Omitted: the experiment folder name."
    )
    skip_repeats: bool = Field(
        default=True,
        description=(
            "When the sampler proposes exactly the parameters of a trial the study has already finished, answer "
            "it from that trial (same value, Optuna user attribute repeat_of) and ask again, up to 10 times per "
            "trial, instead of training the same configuration twice. Training is seeded, so a repeat reproduces a "
            "known curve; in a discrete space TPE spent 48% of its compute on repeats (docs/benchmarks.md). false: "
            "train repeats (e.g. to see run-to-run noise on GPUs)."
        ),
    )
    objectives: list[str] | None = Field(
        default=None,
        description=(
            "Multi-objective mode, e.g. [eval_loss, peak_memory]: Optuna searches the Pareto front of these "
            "metrics (directions from trainables/metrics.py). It must include `metric`, which ASHA still early-stops "
            "on (docs/multi-objective.md). Omitted: one objective, `metric`."
        ),
    )

    @field_validator("objectives", mode="before")
    @classmethod
    def _objectives(cls, value: Any) -> Any:
        if value is None:
            return None
        names = [value] if isinstance(value, str) else value
        allowed = ", ".join(OBJECTIVE_METRICS)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"write a list of metric names, e.g. [eval_loss, peak_memory]; allowed: {allowed}")
        # Unknown names are checked with the eval section (SweepSpec._metrics_known): task metrics count.
        resolved = [OBJECTIVE_ALIASES.get(n, n) for n in names]
        if len(set(resolved)) != len(resolved):
            raise ValueError("an objective is listed twice; list each metric once")
        if len(resolved) < 2:
            raise ValueError("multi-objective mode needs at least two metrics; for one, set search.metric and leave objectives out")
        return resolved

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, value: Any) -> Any:
        if isinstance(value, dict):
            from sweeps.baseline import recipe_problem

            problem = recipe_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _metric_among_objectives(self) -> SearchSpec:
        if self.objectives is not None and self.metric not in self.objectives:
            raise ValueError(
                f"search.objectives {self.objectives} must include search.metric ({self.metric}), the metric ASHA "
                f"early-stops on; add it, e.g. objectives: [{self.metric}, peak_memory]"
            )
        return self

    @property
    def multi_objective(self) -> bool:
        return self.objectives is not None

    @property
    def objective_metrics(self) -> list[str]:
        """What the searcher optimizes: the objectives, or [metric]."""
        return list(self.objectives) if self.objectives is not None else [self.metric]

    @field_validator("optuna_storage")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is None or value == "memory":
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a SQLAlchemy URL; write e.g. sqlite:////abs/path/optuna.db or postgresql://user@host/db, "
                "'memory', or leave it out for sqlite next to the experiment"
            ) from None
        return value


class ASHASpec(_Strict):
    """Asynchronous successive halving, in evaluation rounds (one round = train.eval_every steps)."""

    max_t: PositiveInt | None = None
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    metric: str | None = Field(
        default=None,
        description=(
            "What ASHA compares trials on: eval_loss, perplexity or a task metric of eval.metrics. Omitted: "
            "search.metric. E.g. search.metric: exact_match with asha.metric: eval_loss stops weak trials on the "
            "loss of every round while Optuna optimizes exact match (measured at ASHA's rungs and the last round)."
        ),
    )


class SchedulerSpec(_Strict):
    """Early stopping. `asha: null` runs every trial to train.max_steps."""

    asha: ASHASpec | None = ASHASpec()


class ResourcesSpec(_Strict):
    """What each trial asks Ray for."""

    gpus_per_trial: NonNegativeFloat = 0.0
    cpus_per_trial: PositiveFloat = 1.0
    # Extra Ray resources each trial asks for, e.g. {gpu_mem_48gb: 1} to land on the 48 GB
    # worker class that cluster.yaml declares.
    custom: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$")], PositiveFloat] = {}
    gpu_memory_gib: PositiveFloat | None = Field(
        default=None,
        description=(
            "Memory of the GPU each trial runs on, GiB. Configurations predicted not to fit (with memory_margin) "
            "are rejected before launch as 'infeasible' (docs/memory.md, 'Admission'). Omitted: read from the "
            "cluster (Ray accelerator_type resources, or torch.cuda on a local driver) when trials use GPUs; "
            "when unknown there is no admission."
        ),
    )
    pack: bool = Field(
        default=False,
        description=(
            "Share GPUs between trials: each trial asks Ray for the fraction of a GPU its predicted peak needs "
            "(plus memory_margin), at most gpus_per_trial, and the trainable caps PyTorch's allocator at it."
        ),
    )
    memory_margin: NonNegativeFloat = Field(
        default=0.10,
        description="Safety margin on memory predictions for admission and packing, as a fraction (0.10 = 10%).",
    )

    @field_validator("gpus_per_trial")
    @classmethod
    def _fraction_or_whole(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"{value} GPUs: above 1, ask for whole GPUs (Ray packs fractions only below 1)")
        return value

    @field_validator("memory_margin")
    @classmethod
    def _sane_margin(cls, value: float) -> float:
        if value >= 1:
            raise ValueError(f"{value:g} would double the predictions or more; write a fraction such as 0.10 for 10%")
        return value

    @model_validator(mode="after")
    def _pack_shares_one_gpu(self) -> ResourcesSpec:
        if self.pack and not 0 < self.gpus_per_trial <= 1:
            raise ValueError(
                f"resources.pack shares GPUs between trials, but gpus_per_trial is {self.gpus_per_trial:g}; "
                "set gpus_per_trial: 1 (the most one packed trial may take), or pack: false"
            )
        return self


# tracking.mlflow.uri: where MLflow runs go. Credentials never go in the URI (the spec is saved with the
# experiment): they come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN.
MLFLOW_URI_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


class MLflowSpec(_Strict):
    """An MLflow tracking server: every trial a run, children of one run for the sweep (sweeps/tracking.py)."""

    uri: str = Field(
        description=(
            "The tracking URI, e.g. http://mlflow.internal:5000 (an `mlflow server`), or a store the driver "
            "writes itself (sqlite:////abs/mlflow.db, file:///abs/mlruns). Credentials come from the environment "
            "(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN), never from the URI."
        )
    )
    experiment: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="The MLflow experiment the runs go to, created if missing. Omitted: the spec's name.",
    )

    @field_validator("uri")
    @classmethod
    def _tracking_uri(cls, value: str) -> str:
        from urllib.parse import urlsplit

        allowed = ", ".join(f"{s}://" if s != "databricks" else s for s in MLFLOW_URI_SCHEMES)
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        if value.strip() != value or scheme not in MLFLOW_URI_SCHEMES:
            raise ValueError(f"not an MLflow tracking URI; write e.g. http://127.0.0.1:5000 (schemes: {allowed})")
        if scheme in ("http", "https") and not parts.hostname:
            raise ValueError("an http(s) tracking URI needs a host, e.g. http://127.0.0.1:5000")
        if parts.password is not None or (scheme in ("http", "https") and parts.username is not None):
            raise ValueError(
                "credentials do not go in the URI (the spec is saved with the experiment); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, in the environment"
            )
        return value


class WandbSpec(_Strict):
    """Weights & Biases: every trial a run, grouped under the experiment's name (sweeps/tracking.py)."""

    project: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)] = Field(
        description="The W&B project the runs go to."
    )
    mode: Literal["online", "offline", "disabled"] = Field(
        default="online",
        description=(
            "online: log to the W&B server (the key comes from WANDB_API_KEY or `wandb login`); offline: write run "
            "files only, to upload later with `wandb sync`; disabled: log nothing. Offline runs go to $WANDB_DIR, "
            "or to <experiment folder>/wandb for local storage."
        ),
    )


class TrackingSpec(_Strict):
    """Experiment trackers the sweep also logs to; results stay in the experiment folder as always."""

    mlflow: MLflowSpec | None = None
    wandb: WandbSpec | None = None


class SweepSpec(_Strict):
    """A whole sweep. See README "Sweep spec reference" for every key."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH)]
    model: ModelSpec
    data: DataSpec
    space: SpaceSpec = SpaceSpec()
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    train: TrainSpec = TrainSpec()
    resources: ResourcesSpec = ResourcesSpec()
    storage: PathText = "./results"
    tracking: TrackingSpec = TrackingSpec()
    eval: EvalSpec = EvalSpec()

    # Where the spec file lives; relative data/model paths resolve against it. Not a YAML key.
    base_dir: Path = Field(default=Path("."), exclude=True, repr=False)
    # The `--set KEY=VALUE` overrides applied on top of the file, as given; run_plan.json and the report
    # record them. Not a YAML key.
    overrides: tuple[str, ...] = Field(default=(), exclude=True, repr=False)

    @model_validator(mode="after")
    def _metrics_known(self) -> SweepSpec:
        task = self.eval.names
        single = [*SEARCH_METRICS, *task]
        if self.search.metric not in single:
            close = difflib.get_close_matches(self.search.metric, single, n=1)
            did = f"did you mean '{close[0]}'? " if close else ""
            hint = "" if task else " (or add a task metric, e.g. eval: {metrics: [exact_match]})"
            raise ValueError(
                f"search.metric: got {self.search.metric!r}. {did}Allowed: {', '.join(single)}{hint}"
            )
        asha = self.scheduler.asha
        if asha is not None and asha.metric is not None and asha.metric not in single:
            close = difflib.get_close_matches(asha.metric, single, n=1)
            did = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"scheduler.asha.metric: got {asha.metric!r}. {did}Allowed: {', '.join(single)}, or leave it out for search.metric")
        if self.search.objectives is not None:
            allowed = [*OBJECTIVE_METRICS, *task]
            unknown = [n for n in self.search.objectives if n not in allowed]
            if unknown:
                close = difflib.get_close_matches(unknown[0], [*allowed, *OBJECTIVE_ALIASES], n=1)
                did = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(
                    f"search.objectives: got {self.search.objectives!r}; unknown objective {unknown[0]!r}. {did}"
                    f"Allowed: {', '.join(allowed)} "
                    "(peak_memory = peak_memory_mib; task metrics come from eval.metrics)"
                )
        reserved = [n for m in self.eval.metrics for n in (m.metric_name, *m.extra_names()) if n in COLUMNS]
        if reserved:
            raise ValueError(f"eval.metrics: {reserved[0]!r} is a name the trial already reports; give the metric another `name:`")
        answering = [m for m in self.eval.metrics if m.reads_eval_rows]
        if answering and self.data.format == "text":
            raise ValueError(
                f"eval.metrics: {answering[0].metric_name!r} answers the eval rows' prompts, and data.format text has "
                "none; use data.format instruction or chat, or with text data only forgetting and lm_eval"
            )
        return self

    def direction(self, metric: str) -> Literal["lower", "higher"]:
        """Whether lower or higher is better: a task metric's from eval.metrics, else trainables/metrics.py."""
        if metric in self.eval.names:
            return self.eval.direction(metric)
        return direction(metric)

    def tune_mode(self, metric: str) -> Literal["min", "max"]:
        return "min" if self.direction(metric) == "lower" else "max"

    @property
    def asha_metric(self) -> str:
        """What ASHA compares trials on: scheduler.asha.metric, else search.metric."""
        asha = self.scheduler.asha
        return (asha.metric if asha is not None else None) or self.search.metric

    @property
    def task_eval_rounds(self) -> tuple[int, ...]:
        """The evaluation rounds after which trials measure their task metrics (eval.when): where ASHA can
        stop a trial plus the last round, every round, or the last only."""
        last = self.max_rounds
        if self.eval.when == "every_round":
            return tuple(range(1, last + 1))
        rounds = {last}
        asha = self.scheduler.asha
        if self.eval.when == "rungs" and asha is not None:
            rounds.update(r for r in asha_rounds(asha.grace_period, asha.reduction_factor, last) if r <= last)
        return tuple(sorted(rounds))

    @model_validator(mode="after")
    def _asha_fits_rounds(self) -> SweepSpec:
        asha = self.scheduler.asha
        if asha is None:
            return self
        rounds = self.train.rounds
        if asha.max_t is not None and asha.max_t > rounds:
            raise ValueError(
                f"scheduler.asha.max_t ({asha.max_t}) exceeds the {rounds} evaluation rounds of a trial "
                f"(train.max_steps / train.eval_every); set max_t <= {rounds} or leave it out"
            )
        if asha.grace_period > (asha.max_t or rounds):
            raise ValueError(
                f"scheduler.asha.grace_period ({asha.grace_period}) exceeds max_t ({asha.max_t or rounds}); "
                "no trial could ever be stopped early. Lower grace_period."
            )
        if self.eval.when == "final" and self.asha_metric in self.eval.names and self.max_rounds > 1:
            raise ValueError(
                f"eval.when: final measures {self.asha_metric!r} after the last round only, so scheduler.asha, which "
                "compares trials on it, could stop no trial early; use eval.when: rungs, or scheduler.asha.metric: "
                "eval_loss (Optuna still optimizes search.metric), or remove scheduler.asha"
            )
        return self

    @model_validator(mode="after")
    def _grid_needs_lists(self) -> SweepSpec:
        if self.search.sampler != "grid":
            return self
        from trainables.params import LogUniform, Uniform

        continuous = [k.name for k, kind in self.space.kinds(self.train.batch_size) if isinstance(kind, (LogUniform, Uniform))]
        if continuous:
            raise ValueError(
                f"search.sampler: grid needs a space of lists, and {', '.join(continuous)} is a range; write a list "
                f"of values (e.g. learning_rate: [1e-4, 2e-4, 5e-4]) or choose another sampler (tpe, gp, random)"
            )
        return self

    @property
    def max_rounds(self) -> int:
        asha = self.scheduler.asha
        return (asha.max_t if asha and asha.max_t else None) or self.train.rounds

    def resolve_path(self, value: str) -> str:
        """Resolve a data/model path written in the spec against the spec file's folder.

        Hub ids (core/hub.py: `namespace/name` that is not a local path), builtin: names and URIs
        pass through unchanged.
        """
        if value.startswith("builtin:") or "://" in value or self.is_hub_id(value):
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (self.base_dir / path).resolve())

    def is_hub_id(self, value: str) -> bool:
        """Whether a model or data path of this spec names a hub repository (see core/hub.py)."""
        return not value.startswith("builtin:") and "://" not in value and is_hub_id(value, self.base_dir)


# --- loading and error rendering --------------------------------------------------------------

_SECTION_MODELS: dict[tuple[str, ...], type[BaseModel]] = {
    (): SweepSpec,
    ("model",): ModelSpec,
    ("data",): DataSpec,
    ("space",): SpaceSpec,
    ("search",): SearchSpec,
    ("search", "tpe"): TPEOptions,
    ("scheduler",): SchedulerSpec,
    ("scheduler", "asha"): ASHASpec,
    ("train",): TrainSpec,
    ("resources",): ResourcesSpec,
    ("tracking",): TrackingSpec,
    ("tracking", "mlflow"): MLflowSpec,
    ("tracking", "wandb"): WandbSpec,
    ("eval",): EvalSpec,
    ("eval", "metrics"): MetricSpec,
}


def load_spec(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> SweepSpec:
    """Read and validate a sweep YAML file, with overrides applied before validation.

    Args:
        path: The spec file.
        overrides: `--set` strings ("search.num_samples=4", the value read as YAML), or a mapping of
            dotted keys to Python values ({"search.num_samples": 4}, the Python API's form).

    Raises:
        SpecError: With every problem found, if the file is missing, is not YAML, breaks the schema,
            or an override is malformed.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(
                str(path), [f"{path} is {size:,} bytes; a sweep spec is a few KB (at most {MAX_SPEC_BYTES:,}). Is it the right file?"]
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), [f"file not found: {path}. Pass the path to a sweep YAML, e.g. sweeps/smoke.yaml"])
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"cannot read {path}: {exc}"])
    return spec_with_overrides(safe_yaml(text, str(path)), overrides, source=str(path), base_dir=path.resolve().parent)


def spec_with_overrides(
    raw: Any, overrides: Sequence[str] | Mapping[str, Any], *, source: str = "<spec>", base_dir: Path | None = None
) -> SweepSpec:
    """Validate the spec mapping `raw` with `overrides` (see load_spec) set in it, recording them."""
    problems: list[str] = []
    pairs = parse_overrides(overrides, problems) if not isinstance(overrides, Mapping) else list(overrides.items())
    if pairs:
        raw = set_keys(raw, pairs, problems)
    if problems:
        raise SpecError("--set", problems)
    spec = parse_spec(raw, source=source, base_dir=base_dir)
    return spec.model_copy(update={"overrides": tuple(override_text(k, v) for k, v in pairs)}) if pairs else spec


OVERRIDE_HELP = (
    "set one spec key, e.g. --set search.num_samples=4 --set model.path=Org/Model (repeatable); the value is read "
    "as YAML ([4, 8], {loguniform: [1e-4, 1e-3]}, null) and checked by the schema with the rest of the spec"
)


def parse_overrides(items: Sequence[str], problems: list[str]) -> list[tuple[str, Any]]:
    """`--set` strings as (dotted key, value) pairs, values read as YAML within core/yaml_limits.py's
    bounds, so the schema types and checks them as it does the file's own values. Each item that is
    not KEY=VALUE or whose value is not YAML is left out and named in `problems`."""
    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: write KEY=VALUE with a dotted key, e.g. --set search.num_samples=4")
            continue
        try:
            pairs.append((key.strip(), yaml_limits.load(text) if text.strip() else ""))
        except ValueError as exc:
            problems.append(f"--set {key}: {exc}")
    return pairs


def override_text(key: str, value: Any) -> str:
    """An override as `--set` would write it (what run_plan.json and the report record)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def set_keys(raw: Any, pairs: Sequence[tuple[str, Any]], problems: list[str]) -> Any:
    """A copy of the spec mapping `raw` with each (dotted key, value) set in it. Missing sections are
    created, so an unknown key is reported by the schema like one in the file. A key with an empty
    part, or one that goes through a value that is not a mapping, is named in `problems`."""
    if not isinstance(raw, dict):
        return raw  # parse_spec reports that the spec is not a mapping
    result = copy.deepcopy(raw)
    for key, value in pairs:
        parts = key.split(".")
        if not all(part.strip() for part in parts):
            problems.append(f"--set {key + '=' + str(value)!r}: write KEY=VALUE with a dotted key, e.g. --set search.num_samples=4")
            continue
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                problems.append(f"--set {key}: {where} is {child!r} in the spec, not a mapping; set {where}=... instead")
                break
            node = child
        else:
            node[parts[-1]] = copy.deepcopy(value)
    return result


def safe_yaml(text: str, source: str = "<spec>") -> Any:
    """Parse a spec's YAML within core/yaml_limits.py's bounds.

    Raises:
        SpecError: If the text is not YAML, expands too far through its aliases, or nests too deeply.
    """
    try:
        return yaml_limits.load(text)
    except ValueError as exc:
        raise SpecError(source, [str(exc)]) from None


def name_problem(name: str) -> str | None:
    """What is wrong with an experiment name (the spec's `name`, or `--name`), or None."""
    if len(name) > NAME_MAX_LENGTH:
        return f"got a name of {len(name)} characters; at most {NAME_MAX_LENGTH}"
    if not re.match(NAME_PATTERN, name):
        return f"got {name!r}; {NAME_RULE}"
    return None


def with_sections(raw: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A copy of the spec mapping `raw` with sections overridden: a mapping's keys are merged into
    the section's, anything else replaces it (`with_sections(base, train={"max_steps": 20})`)."""
    spec = copy.deepcopy(raw)
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(section), dict):
            spec[section] = {**spec[section], **value}
        else:
            spec[section] = value
    return spec


def parse_spec(raw: Any, *, source: str = "<spec>", base_dir: Path | None = None) -> SweepSpec:
    """Validate an already-parsed spec mapping.

    Raises:
        SpecError: With every schema problem found.
    """
    if not isinstance(raw, dict):
        raise SpecError(
            source, [f"the spec must be a mapping of sections (name, model, data, ...), got {type(raw).__name__}"]
        )
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(source, [_render_error(err, raw) for err in _dedupe_union_errors(exc.errors())])
    if base_dir is not None:
        spec = spec.model_copy(update={"base_dir": base_dir})
    return spec


def _dedupe_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep one error per key path (a union reports one error per branch)."""
    seen: dict[tuple, dict[str, Any]] = {}
    for err in errors:
        loc = _clean_loc(err["loc"])
        if err["type"] == "extra_forbidden" and err["loc"]:
            # The last part is the user's unknown key itself, even if it looks like a branch tag ('Model').
            loc = (*_clean_loc(err["loc"][:-1]), err["loc"][-1])
        seen.setdefault(loc, {**err, "loc": loc})
    return list(seen.values())


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch tags (e.g. 'list[int]', 'LogUniform') from a location."""
    cleaned = []
    for part in loc:
        if isinstance(part, int):
            cleaned.append(part)
        elif isinstance(part, str) and ("[" in part or part[:1].isupper() or part.startswith("function-")):
            continue
        elif part in ("constrained-float", "constrained-int", "float", "int", "str", "bool", "literal"):
            continue
        else:
            cleaned.append(part)
    return tuple(cleaned)


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _value_at(raw: Any, loc: tuple) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _render_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = err["loc"]
    where = _format_loc(loc)
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        key = loc[-1]
        section = tuple(p for p in loc[:-1] if not isinstance(p, int))
        allowed = sorted(_SECTION_MODELS.get(section, SweepSpec).model_fields.keys() - {"base_dir"})
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{where}: unknown key '{key}'. {hint}Allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{where}: required key is missing. Add it to the spec (see README, 'Sweep spec reference')"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    shown = value if value is not None else _value_at(raw, loc)
    if kind == "value_error" and tuple(loc) in _SECTION_MODELS:
        # A rule spanning several keys: the message names them.
        return msg if where == "(top level)" else f"{where}: {msg}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{where}: got {shown!r}; allowed values: {expected}"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "name":
        return f"{where}: got {shown!r}; {NAME_RULE}"
    return f"{where}: got {shown!r}; {msg[0].lower() + msg[1:] if msg else 'invalid value'}"
