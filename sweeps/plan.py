"""The run plan: what preflight resolved, made once and handed to every consumer.

* `trial_job` is the slice a trial worker receives (trainables/job.py): the model path, the model
  config read once, the data section with its path absolute, the train section and the resources.
* `make_run_plan` is what the experiment keeps (core/run_plan.py, saved as run_plan.json next to
  sweep_spec.yaml): where results and the study live, a summary of the model, the memory plan, the
  training setup per device kind, and the provenance (versions, commit, Python, GPUs).

Nothing here needs Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core import provenance
from core.redact import redact
from core.run_plan import PLAN_FORMAT_VERSION, MemorySummary, ModelSummary, RunPlan
from sweeps.spec import SweepSpec
from trainables.job import TrialJob
from trainables.settings import DataSpec
from trainables.task_metrics import EvalFilesError, EvalJob, build_eval_job
from trainables.tiny_models import is_builtin
from trainables.training_setup import TrainingSetup
from trainables.trial_memory import not_modelled

if TYPE_CHECKING:
    from sweeps.memory_plan import MemoryPlan

# What a trial's device kind is called in run_plan.json's training_setup.
DEVICE_KINDS = ("cuda", "cpu")


def trial_model_path(spec: SweepSpec, resolved: str | None = None) -> str:
    """Where trials load the model from: a builtin: name stays a name (each worker builds it on
    its own disk, so multi-node trials need no shared folder); anything else is preflight's path."""
    if is_builtin(spec.model.path):
        return spec.model.path
    return resolved or spec.resolve_path(spec.model.path)


def resolved_data(spec: SweepSpec) -> DataSpec:
    """The data section with data.path and data.eval_path resolved against the spec file's folder
    (hub ids stay ids)."""
    update = {"path": spec.resolve_path(spec.data.path)}
    if spec.data.eval_path:
        update["eval_path"] = spec.resolve_path(spec.data.eval_path)
    return spec.data.model_copy(update=update)


def trial_job(spec: SweepSpec, *, model_path: str | None = None, model_config: Any = None) -> TrialJob:
    """The job every trial of this sweep receives: paths resolved, the model config read once.

    Args:
        spec: The validated spec.
        model_path: Where preflight found the model (its resolved path); default: the spec's
            model.path resolved against the spec file's folder. Builtin models stay builtin: names.
        model_config: The base model's transformers config (or config.json dict), if read.
    """
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else model_config
    return TrialJob(
        model=spec.model,
        model_path=trial_model_path(spec, model_path),
        base_config=dict(config) if config is not None else None,
        data=resolved_data(spec),
        train=spec.train,
        cpus_per_trial=spec.resources.cpus_per_trial,
        gpus_per_trial=spec.resources.gpus_per_trial,
        pack=spec.resources.pack,
        eval=eval_job(spec),
    )


def eval_job(spec: SweepSpec) -> EvalJob | None:
    """The task evaluation every trial runs (trainables/task_metrics.py `build_eval_job`: the files
    eval.metrics names, read here and carried in the job), its paths relative to the spec file.
    None without task metrics.

    Raises:
        SpecError: Naming the metric, the file and the fix (see build_eval_job).
    """
    from sweeps.spec import SpecError

    if not spec.eval.metrics:
        return None
    try:
        return build_eval_job(spec.eval, spec.task_eval_rounds, spec.resolve_path)
    except EvalFilesError as exc:
        raise SpecError("eval", exc.problems) from None


def model_summary(spec: SweepSpec, model_path: str | None, model_config: Any) -> ModelSummary:
    """The base model as preflight read it (sizes from its config; no weights are loaded)."""
    config: dict[str, Any] = {}
    if model_config is not None:
        config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    return ModelSummary(
        path=spec.model.path,
        resolved_path=trial_model_path(spec, model_path),
        model_type=config.get("model_type"),
        revision=spec.model.revision,
        num_layers=_first_int(config, "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=_first_int(config, "hidden_size", "n_embd", "d_model"),
        vocab_size=_first_int(config, "vocab_size"),
        parameters=_parameter_count(model_config),
    )


def _first_int(config: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _parameter_count(model_config: Any) -> int | None:
    """Parameters of the base model, from its shape on the meta device (None if it cannot be built)."""
    if model_config is None:
        return None
    from trainables.memory_estimator import model_shape

    try:
        shape = model_shape(model_config)
    except (ValueError, TypeError):
        return None
    return sum(layer.numel for layer in shape.linears) + shape.other_params


def training_setups(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """The resolved training setup per device kind: trials train with "cuda" when they get a GPU,
    "cpu" otherwise (compute dtype auto on CUDA assumes bf16 unless this machine's GPU says not)."""
    return {device: TrainingSetup.resolve(spec.model, spec.train, device).describe() for device in DEVICE_KINDS}


def memory_summary(spec: SweepSpec, memory: MemoryPlan | None) -> MemorySummary:
    gpu = memory.gpu if memory is not None else None
    return MemorySummary(
        gpu_gib=gpu.gib if gpu is not None else None,
        gpu_source=gpu.source if gpu is not None else None,
        predictable=memory.predictable if memory is not None else None,
        not_modelled=not_modelled(spec.space),
    )


def make_run_plan(
    spec: SweepSpec,
    *,
    model_path: str | None,
    model_config: Any,
    experiment_name: str,
    experiment_dir: str,
    storage_path: str,
    memory: MemoryPlan | None,
    gpu_names: list[str] | None = None,
) -> RunPlan:
    """The run plan of one sweep, as preflight and the Ray connection resolved it.

    Args:
        spec: The checked spec, its study resolved (search.optuna_storage / optuna_study_name).
        model_path: Where preflight found the model.
        model_config: The base model's config, if read.
        experiment_name, experiment_dir, storage_path: Where results go.
        memory: The memory plan (None when the model config was not read).
        gpu_names: The GPUs trials run on (sweeps.memory_plan.gpu_names), for provenance.
    """
    return RunPlan(
        format_version=PLAN_FORMAT_VERSION,
        experiment_name=experiment_name,
        experiment_dir=redact_location(experiment_dir),
        storage_path=redact_location(storage_path),
        study_url=redact_url(spec.search.optuna_storage),
        study_name=spec.search.optuna_study_name,
        model=model_summary(spec, model_path, model_config),
        memory=memory_summary(spec, memory),
        training_setup=training_setups(spec),
        provenance=provenance.collect(gpu_names),
        overrides=[redact_location(item) for item in spec.overrides],
    )


def redact_url(url: str | None) -> str | None:
    """A study URL with its credentials masked (core/redact.py); "memory" and None pass through."""
    return redact(url) if url else url


def redact_location(location: str) -> str:
    """A storage path, URI or `--set` item with any credentials in it masked (core/redact.py)."""
    return redact(location)
