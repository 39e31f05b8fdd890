"""The Tune driver: preflight checks, Ray connection, the Tuner (Optuna + ASHA), and the report.

`qlora-sweep run SPEC` and `python sweeps/sweep.py --config SPEC` (what `ray submit` runs) both
call `run_sweep`. Everything that can be wrong with the input is checked in `preflight` before
Ray starts, so bad input costs no GPU time and leaves no half-written experiment behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from core import storage
from sweeps.spec import SpecError, SweepSpec
from trainables.metrics import tune_mode

if TYPE_CHECKING:
    from sweeps.admission import MemoryPlan
    from trainables.data import PreparedData

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# --- preflight --------------------------------------------------------------------------------


@dataclass
class Preflight:
    """What preflight learned, reused by the sweep so nothing is read twice."""

    spec: SweepSpec
    model_path: str
    model_type: str
    data: PreparedData | None
    skipped: list[str] = field(default_factory=list)
    # The base model's transformers config, for memory predictions (None when not read, e.g. --offline).
    model_config: Any = None


def preflight(spec: SweepSpec, *, check_storage: bool = True, offline: bool = False) -> Preflight:
    """Check everything about a spec that can be checked before training, and prepare the data.

    Args:
        spec: The validated spec.
        check_storage: Also check that results can be written.
        offline: Skip (and list in `Preflight.skipped`) the checks that need a model or dataset hub
            or cloud storage, for validating specs meant for another machine.

    Raises:
        SpecError: With every problem found: model config, target modules, data rows, storage.
    """
    from trainables.data import DataError, is_local_data, prepare_data
    from trainables.targets import check_targets, choice_label
    from trainables.tiny_models import is_builtin, materialize

    problems: list[str] = []
    skipped: list[str] = []
    model_path, config, tokenizer = spec.model.path, None, None
    hub_model = not is_builtin(spec.model.path) and not Path(spec.resolve_path(spec.model.path)).exists()
    if offline and hub_model:
        skipped.append(f"model config, tokenizer and target modules of hub model '{spec.model.path}'")
    else:
        try:
            model_path = materialize(spec.resolve_path(spec.model.path))
        except ValueError as exc:
            problems.append(f"model.path: {exc}")
    if not problems and not skipped:
        config, tokenizer, problem = _load_config_and_tokenizer(spec, model_path)
        if problem:
            problems.append(problem)
    if config is not None:
        choices = spec.space.target_modules
        for choice in [choices] if isinstance(choices, str) else choices:
            problem = check_targets(choice_label(choice), config)
            if problem:
                problems.append(f"space.target_modules: {problem}")
    if tokenizer is not None and spec.data.format == "chat" and not getattr(tokenizer, "chat_template", None):
        problems.append(
            f"data.format: 'chat' needs a tokenizer with a chat template, and {spec.model.path} has none; "
            "use format: instruction or text, or a chat model"
        )
    data = None
    data_path = spec.resolve_path(spec.data.path)
    if offline and not is_local_data(data_path):
        skipped.append(f"rows of hub dataset '{spec.data.path}'")
    else:
        if tokenizer is None and not problems:
            skipped.append("row lengths against data.max_seq_length (they need the tokenizer)")
        try:
            data = prepare_data(data_path, spec.data, tokenizer)
        except DataError as exc:
            problems.extend(f"data: {p}" for p in exc.problems[:10])
            if exc.total > 10:
                problems.append(f"data: ... and {exc.total - 10} more bad rows")
    if check_storage and offline and storage.is_uri(spec.storage):
        skipped.append(f"that storage {spec.storage} is writable")
    elif check_storage:
        problem = storage.check_writable(storage.absolute(spec.storage))
        if problem:
            problems.append(problem)
    if problems:
        raise SpecError("preflight", problems)
    return Preflight(
        spec=spec,
        model_path=model_path,
        model_type=config.model_type if config is not None else "unknown",
        data=data,
        skipped=skipped,
        model_config=config,
    )


def _load_config_and_tokenizer(spec: SweepSpec, model_path: str) -> tuple[Any, Any, str | None]:
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(model_path, **kwargs)
    except Exception as exc:  # missing folder, offline hub, gated model, remote code refused
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "custom code" in first and not spec.model.trust_remote_code:
            return None, None, (
                f"model.path: '{spec.model.path}' needs its own Python code to load ({first.split('. ')[0]}), "
                "and model.trust_remote_code is false, so it was not run. Read that code; only if you trust it, "
                "set model.trust_remote_code: true"
            )
        return None, None, (
            f"model.path: cannot read the model config of '{spec.model.path}' ({first}). "
            "Use a local folder with config.json, a reachable hub id, or builtin:tiny-llama"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, **kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return config, None, f"model.path: cannot load the tokenizer of '{spec.model.path}' ({first})"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return config, tokenizer, None


# --- Ray --------------------------------------------------------------------------------------


def _running_cluster_address() -> str | None:
    """The address of a Ray cluster already running here, found without importing ray.

    `ray start --head` (and therefore `ray up`) writes /tmp/ray/ray_current_cluster.
    """
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    tmp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    address_file = Path(tmp or "/tmp", "ray", "ray_current_cluster")
    if address_file.exists() and address_file.read_text().strip():
        return "auto"
    return None


def connect_ray(address: str | None, num_cpus: int | None = None) -> tuple[str, str | None]:
    """Join a running cluster, or start a local one bound to 127.0.0.1.

    Args:
        address: None joins a running cluster if there is one and starts a local one otherwise;
            "local" always starts a local one; anything else is passed to ray.init.
        num_cpus: CPUs for a new local cluster (default: all).

    Returns:
        ("joined" or "local", the dashboard URL if known).
    """
    joining = address not in (None, "local") or (address is None and _running_cluster_address() is not None)
    if not joining:
        # With this variable "0" every local Ray service binds to 127.0.0.1 only. Ray reads it at
        # import: the processes it starts import it fresh from this environment, and this process
        # may have imported ray already (the Optuna searcher does), so its copy is set too.
        os.environ[LOOPBACK_ENV] = "0"
    import ray

    if not joining:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        return "joined", None
    _keep_secrets_out_of_trial_env()
    runtime_env = _runtime_env()
    if joining:
        target = address or _running_cluster_address()
        try:
            context = ray.init(address=target, runtime_env=runtime_env, log_to_driver=True)
        except ConnectionError as exc:
            raise SystemExit(
                f"error: could not join the Ray cluster at {target!r} ({exc}). "
                "Start it (`ray start --head`), or pass --address local for a new local cluster"
            ) from None
        return "joined", context.dashboard_url
    context = ray.init(
        address="local",  # never a cluster that ray.init would otherwise find and join
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    return "local", context.dashboard_url


# Environment variables forwarded to every trial worker, never written to params.json or results:
# secrets stay in the environment.
FORWARDED_ENV = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "QLORA_SWEEP_CACHE",
    # S3 storage: cloud nodes use instance profiles and set none of these, but an S3-compatible
    # endpoint (MinIO, moto) or explicit keys must reach the workers, which write results directly.
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    # Testing hook: fault-inject an OOM into trials predicted above this many MiB (trainables/qlora.py).
    "QLORA_SWEEP_INJECT_OOM_ABOVE_MIB",
    # Testing hook: a slow end of trial (trainables/qlora.py, slow_teardown_for_testing).
    "QLORA_SWEEP_SLOW_TEARDOWN_S",
)
# Trials run side by side: per-step and per-file progress bars from each would drown the live view.
# RAY_AIR_NEW_OUTPUT=0 selects Tune's legacy console output, which (unlike the new one) is silent
# at verbose=0, leaving the console to SweepProgress.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Every trial checkpoint forces an experiment-state snapshot (CheckpointConfig(num_to_keep=1)).
    # That is what resume needs (trial statuses never lag the checkpoints), so Tune's warning that
    # snapshots are frequent is noise here.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


# How long Tune waits for a finished trial's thread before reusing its worker for the next trial
# (reuse_actors). Ray's default, 2 s, is shorter than a trial's teardown (freeing the model, gc,
# removing its output folder) on a busy machine; a reuse that times out errors the next trial, and
# with Ray 2.60 the sweep then stalled with no trial running (seen in benchmarks/search_efficiency.py).
# Set in the environment, the caller's value is kept.
WORKER_ENV = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")}


def quiet_driver() -> None:
    """Quiet progress bars and import-time warnings in this process (workers get QUIET_ENV too)."""
    import logging

    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# The secrets among FORWARDED_ENV. Ray writes runtime_env env_vars in plain text to
# runtime_env_agent.log on every node and shows them on the dashboard's job page, so secrets travel
# inside the worker setup hook instead (see _runtime_env).
SECRET_ENV = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
)


def _forwarded_env() -> dict[str, str]:
    """The non-secret variables workers get through runtime_env env_vars."""
    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ and name not in SECRET_ENV}
    return {**QUIET_ENV, **WORKER_ENV, **forwarded}


def _runtime_env() -> dict[str, Any]:
    """The job's runtime_env: plain env vars, and a setup hook that quiets libraries and sets secrets.

    A callable setup hook is pickled into the GCS (in memory on the head node; in Redis if GCS
    fault tolerance is configured) and run by every worker process before its first task; Ray logs
    only its name. A local cluster's workers would inherit the secrets from this process anyway;
    the hook is what brings them to the workers of a cluster started elsewhere.
    """
    secrets = {name: os.environ[name] for name in SECRET_ENV if os.environ.get(name)}
    hook: Any = "trainables.qlora.quiet_libraries" if not secrets else _secret_setup_hook(secrets)
    return {"env_vars": _forwarded_env(), "worker_process_setup_hook": hook}


def _keep_secrets_out_of_trial_env() -> None:
    """Stop Ray Tune from copying this process's AWS keys into every trial actor's runtime_env.

    Tune (ray/tune/execution/class_cache.py) propagates AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    the session tokens as runtime_env env_vars, which Ray logs in plain text; the setup hook of
    `_runtime_env` delivers them to the workers instead. tests/test_security.py catches a Ray
    version where this no longer holds.
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - set(SECRET_ENV)


def _secret_setup_hook(secrets: dict[str, str]) -> Callable[[], None]:
    def qlora_sweep_worker_setup() -> None:
        os.environ.update(secrets)
        from trainables.qlora import quiet_libraries

        quiet_libraries()

    return qlora_sweep_worker_setup


# --- the Tuner --------------------------------------------------------------------------------


def make_sampler(spec: SweepSpec) -> Any:
    """Optuna sampler by name; TPE starts after a few random trials scaled to the sweep size."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers: dict[str, Callable[[], Any]] = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=spec.search.seed, n_startup_trials=min(10, max(3, spec.search.num_samples // 3))
        ),
        "random": lambda: optuna.samplers.RandomSampler(seed=spec.search.seed),
    }
    return samplers[spec.search.sampler]()


def make_scheduler(spec: SweepSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = spec.scheduler.asha
    if asha is None:
        return FIFOScheduler()
    # One Tune iteration is one evaluation round (one tune.report per evaluation).
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=spec.max_rounds,
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


def build_tuner(
    checked: Preflight, experiment_name: str, storage_path: str, plan: MemoryPlan | None = None, sampler: Any = None
) -> Any:
    """The Tuner of a sweep. `sampler` (an Optuna sampler) replaces the one search.sampler names."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from sweeps.admission import AdmissionSearch

    from sweeps.progress import SweepProgress
    from sweeps.searcher import make_searcher
    from sweeps.space import space_function

    spec = checked.spec
    # Tune, ASHA and checkpoint ranking take one metric. In multi-objective mode (search.objectives)
    # only the searcher gets the list (make_searcher); ASHA stops on search.metric (docs/multi-objective.md).
    metric = spec.search.metric
    mode = tune_mode(metric)
    # The study lives in search.optuna_storage (resolved by run_sweep), where optuna-dashboard reads it.
    searcher = make_searcher(spec, space_function(spec), sampler or make_sampler(spec), mode)
    if plan is not None:
        # Rejects proposals predicted not to fit, or as large as one that ran out of memory, before launch.
        searcher = AdmissionSearch(searcher, plan, storage.join(storage_path, experiment_name))
    trainable = make_trainable(checked, plan)
    progress = SweepProgress(spec.search.num_samples, spec.max_rounds, metric)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent),
            scheduler=make_scheduler(spec),
            num_samples=spec.search.num_samples,
            # Reusing a trial's worker process saves re-importing torch/transformers per trial;
            # the trainable frees its memory in a finally block, so trials do not leak into each other.
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment_name,
            storage_path=storage_path,
            stop={"training_iteration": spec.max_rounds},
            # A trial that raised or lost its node is retried from its latest checkpoint.
            failure_config=tune.FailureConfig(max_failures=spec.train.max_failures),
            # Per trial: the best checkpoint by the objective (export copies its adapter) and,
            # always, the latest (what a retried or resumed trial continues from).
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            callbacks=[progress],
            verbose=0,  # SweepProgress prints a compact live view instead of Tune's tables
        ),
    )


def make_trainable(checked: Preflight, plan: MemoryPlan | None = None) -> Any:
    """The trial function with the spec and prepared data bound (data goes through the object store,
    so call this after connecting to Ray) and the resources each trial asks for: with
    resources.pack, a GPU share computed from each trial's predicted memory (sweeps/admission.py)."""
    from functools import partial

    from ray import tune

    from sweeps.admission import trial_resources
    from trainables.qlora import train_qlora

    spec = checked.spec
    resources: Any = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial, **spec.resources.custom}
    if spec.resources.pack and plan is not None:
        resources = partial(trial_resources, plan=plan)
    return tune.with_resources(tune.with_parameters(train_qlora, spec=spec, data=checked.data), resources)


def trial_dirname(trial: Any) -> str:
    """Short trial folder names; the config lives in params.json, not in the folder name."""
    return f"trial_{trial.trial_id}"


# --- the whole run ----------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    experiment_dir: str
    report_dir: str
    num_trials: int
    num_errors: int


def default_experiment_name(spec: SweepSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def saved_spec(checked: Preflight, storage_path: str) -> dict[str, Any]:
    """The spec as it ran, with paths made absolute so report/resume work from any folder."""
    spec = checked.spec
    raw = spec.model_dump(mode="json")
    raw["model"]["path"] = spec.model.path if spec.model.path.startswith("builtin:") else checked.model_path
    raw["data"]["path"] = spec.resolve_path(spec.data.path)
    raw["storage"] = storage_path
    return raw


# Skipped-row messages kept in data_report.json; the count is always exact.
MAX_SKIPPED_KEPT = 100


def data_report(checked: Preflight) -> dict[str, Any]:
    """What preflight found in the data, saved next to sweep_spec.yaml for the report."""
    data, spec = checked.data, checked.spec
    if data is None:
        return {"path": spec.data.path, "checked": False}
    return {
        "path": spec.resolve_path(spec.data.path),
        "checked": True,
        "on_bad_rows": spec.data.on_bad_rows,
        "rows_read": data.rows_read,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "skipped_rows": len(data.skipped),
        "skipped": data.skipped[:MAX_SKIPPED_KEPT],
    }


def run_sweep(
    spec: SweepSpec,
    *,
    storage_override: str | None = None,
    name: str | None = None,
    address: str | None = None,
    log: Callable[[str], None] = print,
    sampler: Any = None,
) -> SweepOutcome:
    """Preflight, start or join Ray, run the Tuner, write the report.

    `sampler`, an Optuna sampler, replaces the one search.sampler names (benchmarks/search_efficiency.py
    runs a grid this way); sweep_spec.yaml still records search.sampler.

    Raises:
        SpecError: Before anything starts, if the spec, model, data or storage is unusable.
    """
    quiet_driver()
    if storage_override:
        spec = spec.model_copy(update={"storage": storage_override})
    log(f"[qlora-sweep] checking spec '{spec.name}': model, target modules, data, storage")
    checked = preflight(spec)
    storage_path = storage.absolute(spec.storage)
    experiment_name = name or default_experiment_name(spec)
    experiment_dir = storage.join(storage_path, experiment_name)
    if storage.exists(storage.join(experiment_dir, storage.SPEC_FILE)):
        raise SpecError(
            "--name",
            [
                f"{experiment_dir} already holds a sweep; continue it with `qlora-sweep resume {experiment_dir}` "
                "or choose another --name"
            ],
        )
    checked = _with_study(checked, experiment_dir, experiment_name, resuming=False)
    log(
        f"[qlora-sweep] data: {len(checked.data.train)} train / {len(checked.data.eval)} eval rows"
        + (f", {len(checked.data.skipped)} bad rows skipped" if checked.data.skipped else "")
    )
    if spec.resources.gpu_memory_gib:
        _memory_plan(checked, None, log)  # the spec names the GPU: refuse an infeasible space before Ray starts
    mode, dashboard = connect_ray(address)
    try:
        _check_cluster_resources(spec, mode)
        where = "started a local Ray cluster" if mode == "local" else "joined the Ray cluster"
        log(f"[qlora-sweep] {where}; dashboard: {'http://' + dashboard if dashboard else 'not running'}")
        plan = _memory_plan(checked, mode, log)
        storage.write_text(
            storage.join(experiment_dir, storage.SPEC_FILE),
            yaml.safe_dump(saved_spec(checked, storage_path), sort_keys=False),
        )
        storage.write_text(
            storage.join(experiment_dir, storage.DATA_REPORT_FILE), json.dumps(data_report(checked), indent=2)
        )
        log(f"[qlora-sweep] experiment: {experiment_dir}")
        if not storage.is_uri(experiment_dir):
            log(f"[qlora-sweep] live curves: tensorboard --logdir {experiment_dir}")
        _log_study(checked.spec, log)
        tuner = build_tuner(checked, experiment_name, storage_path, plan, sampler)
        results = tuner.fit()
        _settle_study(checked.spec, experiment_dir, log, finished=True)
        return _finish(experiment_dir, len(results), results.num_errors, log)
    finally:
        if mode == "local":
            import ray

            ray.shutdown()  # a cluster we started ends with the sweep: no Ray processes left behind


def resume_sweep(
    path: str,
    *,
    restart_errored: bool = False,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> SweepOutcome:
    """Continue an interrupted sweep: unfinished trials resume from their latest checkpoints,
    finished ones are kept, and the searcher continues with its Optuna study. Writes the report.

    Only a folder that `qlora-sweep run` wrote (it holds sweep_spec.yaml) is accepted, because
    Tuner.restore unpickles the folder's tuner.pkl and searcher state, and unpickling can run code.

    Args:
        path: The experiment folder or URI that `run` printed.
        restart_errored: Run errored trials again from scratch (Tune gives them new trial ids)
            instead of keeping them failed.
        address: The Ray cluster, as for `run_sweep`.

    Raises:
        NotAnExperiment: If `path` was not written by qlora-sweep.
        SpecError: Before Ray starts, if the saved spec, model, data, storage or study is unusable.
    """
    from analysis.results import NotAnExperiment, is_experiment
    from sweeps.spec import parse_spec

    quiet_driver()
    experiment_dir = storage.absolute(path)
    if not storage.exists(experiment_dir):
        raise NotAnExperiment(f"cannot resume {experiment_dir}: no such folder. Pass the folder that `run` printed")
    if not is_experiment(experiment_dir):
        raise NotAnExperiment(
            f"refusing to resume {experiment_dir}: it is not a qlora-sweep experiment folder (no {storage.SPEC_FILE}). "
            "Resuming unpickles the folder's tuner.pkl and searcher state, which can run arbitrary code, so only "
            "folders written by `qlora-sweep run` are accepted. Pass the folder that `run` printed"
        )
    if not storage.exists(storage.join(experiment_dir, "tuner.pkl")):
        raise SpecError(
            "resume",
            [f"{experiment_dir} has no tuner.pkl: the sweep stopped before Ray Tune started, so there is nothing "
             "to resume. Start it again with `qlora-sweep run SPEC --name NEW_NAME`"],
        )
    spec_file = storage.join(experiment_dir, storage.SPEC_FILE)
    raw = yaml.safe_load(storage.read_text(spec_file))
    if isinstance(raw, dict) and isinstance(raw.get("search"), dict):
        # Experiments saved before studies had a database kept theirs in Ray's searcher state.
        raw["search"].setdefault("optuna_storage", "memory")
    storage_path, experiment_name = _split_experiment(experiment_dir)
    spec = parse_spec(raw, source=spec_file).model_copy(update={"storage": storage_path})
    log(f"[qlora-sweep] resuming '{experiment_name}': checking model, target modules, data, storage, study")
    checked = _with_study(preflight(spec), experiment_dir, experiment_name, resuming=True)
    mode, dashboard = connect_ray(address)
    try:
        _check_cluster_resources(checked.spec, mode)
        where = "started a local Ray cluster" if mode == "local" else "joined the Ray cluster"
        log(f"[qlora-sweep] {where}; dashboard: {'http://' + dashboard if dashboard else 'not running'}")
        # The restored searcher keeps its own plan (pickled in tuner.pkl); this one sizes packed trials.
        plan = _memory_plan(checked, mode, log)
        _log_study(checked.spec, log)
        _settle_study(checked.spec, experiment_dir, log, finished=False)
        from ray import tune

        tuner = tune.Tuner.restore(
            experiment_dir,
            trainable=make_trainable(checked, plan),
            resume_unfinished=True,
            restart_errored=restart_errored,
        )
        results = tuner.fit()
        _settle_study(checked.spec, experiment_dir, log, finished=True)
        return _finish(experiment_dir, len(results), results.num_errors, log)
    finally:
        if mode == "local":
            import ray

            ray.shutdown()


def _split_experiment(experiment_dir: str) -> tuple[str, str]:
    """(storage path, experiment name) of an experiment folder or URI (a URI keeps its ?query)."""
    if storage.is_uri(experiment_dir):
        base, sep, query = experiment_dir.partition("?")
        parent, _, name = base.rstrip("/").rpartition("/")
        return parent + sep + query, name
    return str(Path(experiment_dir).parent), Path(experiment_dir).name


def _with_study(checked: Preflight, experiment_dir: str, experiment_name: str, *, resuming: bool) -> Preflight:
    """Resolve where the Optuna study lives and check it is usable, before Ray starts."""
    from dataclasses import replace

    from sweeps.searcher import check_study, resolve_study

    spec = resolve_study(checked.spec, experiment_dir, experiment_name)
    problem = check_study(spec, resuming=resuming)
    if problem:
        raise SpecError("optuna study", [problem])
    return replace(checked, spec=spec)


def _log_study(spec: SweepSpec, log: Callable[[str], None]) -> None:
    from sweeps.searcher import dashboard_command

    command = dashboard_command(spec.search.optuna_storage)
    if command:
        log(f"[qlora-sweep] optuna study '{spec.search.optuna_study_name}': {command}")


def _settle_study(spec: SweepSpec, experiment_dir: str, log: Callable[[str], None], *, finished: bool) -> None:
    """Leave no stale RUNNING trial in the Optuna study (see sweeps.searcher.settle_study); once
    the sweep is over, copy a driver-local study into a cloud experiment."""
    from sweeps.searcher import publish_study, settle_study

    for line in settle_study(spec, experiment_dir):
        log(f"[qlora-sweep] settled {line}")
    copied = publish_study(spec, experiment_dir) if finished else None
    if copied:
        log(f"[qlora-sweep] optuna study copied to {copied}")


def _finish(experiment_dir: str, num_trials: int, num_errors: int, log: Callable[[str], None]) -> SweepOutcome:
    from analysis.report import write_report

    report = write_report(experiment_dir)
    log(f"[qlora-sweep] {num_trials} trials, {num_errors} errored")
    for line in report.summary_lines:
        log(f"[qlora-sweep] {line}")
    log(f"[qlora-sweep] experiment: {experiment_dir}")
    log(f"[qlora-sweep] report:     {report.report_dir}")
    return SweepOutcome(experiment_dir, report.report_dir, num_trials, num_errors)


def _memory_plan(checked: Preflight, mode: str | None, log: Callable[[str], None]) -> MemoryPlan | None:
    """Predictions, the GPU size (spec or cluster) and the pre-launch checks of admission and packing.

    Args:
        mode: "local" or "joined" once connected to Ray; None before (only the spec's GPU size is known).

    Raises:
        SpecError: If packing cannot be sized, or no configuration of the space is predicted to fit.
    """
    from sweeps.admission import detect_gpu_size, memory_plan

    spec = checked.spec
    if checked.model_config is None:
        return None
    if mode is None:
        return memory_plan(spec, checked.model_config, detect_gpu_size(spec, None, local=False))
    import ray

    gpu = detect_gpu_size(spec, ray.cluster_resources(), local=mode == "local")
    plan = memory_plan(spec, checked.model_config, gpu)
    if not plan.predictable:
        log(f"[qlora-sweep] memory: the estimator does not model '{checked.model_type}': no predictions, no admission")
    elif gpu is None:
        log("[qlora-sweep] memory: GPU size unknown (resources.gpu_memory_gib): no admission; OOM-aware search is on")
    else:
        log(
            f"[qlora-sweep] memory: admitting configurations predicted to fit {gpu.gib:g} GiB ({gpu.source}) "
            f"with a {spec.resources.memory_margin:.0%} margin"
            + ("; packing trials onto GPUs by predicted memory" if spec.resources.pack else "")
        )
    return plan


def _check_cluster_resources(spec: SweepSpec, mode: str) -> None:
    """A local cluster without GPUs would leave GPU trials pending forever; say so instead."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if mode == "local" and spec.resources.gpus_per_trial > gpus:
        raise SpecError(
            "resources.gpus_per_trial",
            [
                f"resources.gpus_per_trial: {spec.resources.gpus_per_trial} but this machine has {gpus:g} GPUs; "
                "set it to 0 to train on CPU, or run on a GPU cluster (see README, 'On a GPU cluster')"
            ],
        )
