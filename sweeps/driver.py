"""The Tune driver: preflight checks, Ray connection, the Tuner (Optuna + ASHA), and the report.

`qlora-sweep run SPEC` and `python sweeps/sweep.py --config SPEC` (what `ray submit` runs) both
call `run_sweep`; `resume` calls `resume_sweep`. Both check everything that can be wrong with the
input in `preflight` before Ray starts, so bad input costs no GPU time and leaves no half-written
experiment behind, and then share one path (`_sweep`): connect to Ray, make the memory plan and the
run plan (sweeps/plan.py, saved as run_plan.json), fit the Tuner with the sweep's TrialJob bound to
the trainable, settle the Optuna study, write the report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from core import experiment_folder, storage
from core.redact import redact, redact_data
from core.run_plan import write_run_plan
from sweeps.driver_lock import DriverLock
from sweeps.baseline import STANDARD_RECIPE, map_to_space
from sweeps.local_env import QUIET_ENV
from sweeps.memory_plan import MemoryPlan, detect_gpu_size, gpu_names, memory_plan
from sweeps.plan import make_run_plan, redact_location, resolved_data, trial_job, trial_model_path
from sweeps.spec import SpecError, SweepSpec, name_problem, safe_yaml
from sweeps.tracking import SECRET_ENV as TRACKER_SECRET_ENV
from trainables.job import TrialJob
from trainables.params import Fixed
from trainables.trial_memory import not_modelled

if TYPE_CHECKING:
    from sweeps.warm_start import WarmStart
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
    # Prior trials from earlier experiments (search.warm_start; sweeps/warm_start.py), None without.
    warm_start: WarmStart | None = None


def preflight(spec: SweepSpec, *, check_storage: bool = True, offline: bool = False, warm_start: bool = True) -> Preflight:
    """Check everything about a spec that can be checked before training, and prepare the data.

    Args:
        spec: The validated spec.
        check_storage: Also check that results can be written.
        offline: Skip (and list in `Preflight.skipped`) the checks that need a model or dataset hub
            or cloud storage, for validating specs meant for another machine.
        warm_start: Read search.warm_start's experiments (a resumed sweep's study already has them).

    Raises:
        SpecError: With every problem found: model config, target modules, data rows, storage.
    """
    from trainables.data import DataError, prepare_data
    from trainables.targets import check_targets
    from trainables.tiny_models import is_builtin

    problems: list[str] = []
    skipped: list[str] = []
    model_path, config, tokenizer = spec.model.path, None, None
    hub_model = not is_builtin(spec.model.path) and spec.is_hub_id(spec.model.path)
    if offline and hub_model:
        skipped.append(f"model config, tokenizer and target modules of hub model '{spec.model.path}'")
    else:
        model_path, config, problem = read_model_config(spec)
        if problem is None:
            tokenizer, problem = _load_tokenizer(spec, model_path)
        if problem:
            problems.append(problem)
    if config is not None:
        for label in spec.space.target_labels():
            problem = check_targets(label, config)
            if problem:
                problems.append(f"space.target_modules: {problem}")
    if tokenizer is not None and spec.data.format == "chat" and not getattr(tokenizer, "chat_template", None):
        problems.append(
            f"data.format: 'chat' needs a tokenizer with a chat template, and {spec.model.path} has none; "
            "use format: instruction or text, or a chat model"
        )
        tokenizer = None  # the rows are still checked; without a template they cannot be tokenized
    data = None
    data_path = spec.resolve_path(spec.data.path)
    data_spec = resolved_data(spec)
    hub_data = [p for p in (spec.data.path, spec.data.eval_path) if p and spec.is_hub_id(p)]
    if offline and hub_data:
        skipped.extend(f"rows of hub dataset '{p}'" for p in hub_data)
    else:
        if tokenizer is None and not problems:
            skipped.append("row lengths against data.max_seq_length (they need the tokenizer)")
        try:
            # Every row is read, checked and tokenized here, once: trials train on these tokens.
            data = prepare_data(data_path, data_spec, tokenizer)
        except DataError as exc:
            problems.extend(f"data: {p}" for p in exc.problems[:10])
            if exc.total > 10:
                problems.append(f"data: ... and {exc.total - 10} more bad rows")
    if spec.train.callbacks:
        from trainables.qlora import load_callback_factories

        # Ray puts the driver's working directory on every local worker's sys.path (ray/_private/
        # worker.py, `_py_driver_sys_path`), so a plug-in module beside the user's shell is found
        # there; check it the same way. One that cannot load here will not load on the workers.
        added = os.getcwd() not in sys.path
        if added:
            sys.path.append(os.getcwd())
        try:
            load_callback_factories(spec.train.callbacks)
        except ValueError as exc:
            problems.append(str(exc))
        finally:
            if added:
                sys.path.remove(os.getcwd())
    if spec.eval.metrics:
        from sweeps.plan import eval_job

        try:
            eval_job(spec)  # reads the forgetting sets and python metric files, as trial_job will
        except SpecError as exc:
            problems.extend(exc.problems)
    if spec.tracking.mlflow is not None or spec.tracking.wandb is not None:
        from sweeps.tracking import problems as tracking_problems

        problems.extend(tracking_problems(spec, offline=offline))
    if check_storage and offline and storage.is_uri(spec.storage):
        skipped.append(f"that storage {spec.storage} is writable")
    elif check_storage:
        problem = storage.check_writable(storage.absolute(spec.storage))
        if problem:
            problems.append(problem)
    if spec.search.sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
        problems.append(
            "search.sampler: cmaes needs the cmaes package, which is not installed; pip install 'qlora-sweep[cmaes]' "
            "(or pip install cmaes), or choose tpe, gp, random or grid"
        )
    prior = None
    if warm_start and spec.search.warm_start:
        from sweeps.warm_start import load as load_warm_start

        prior, warm_problems = load_warm_start(spec)
        problems.extend(warm_problems)
    if problems:
        raise SpecError("preflight", problems)
    return Preflight(
        spec=spec,
        model_path=model_path,
        model_type=config.model_type if config is not None else "unknown",
        data=data,
        skipped=skipped,
        model_config=config,
        warm_start=prior,
    )


def read_model_config(spec: SweepSpec) -> tuple[str, Any, str | None]:
    """The one loader of the base model's config (preflight's and `estimate`'s).

    Builtin tiny models are built locally first; only config.json is read (no weights).

    Returns:
        (model path, config, None), or (model path as far as resolved, None, the problem).
    """
    from transformers import AutoConfig

    from trainables.tiny_models import materialize

    try:
        model_path = materialize(spec.resolve_path(spec.model.path))
    except ValueError as exc:
        return spec.model.path, None, f"model.path: {exc}"
    try:
        config = AutoConfig.from_pretrained(
            model_path, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code
        )
    except Exception as exc:  # missing folder, offline hub, gated model, remote code refused
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "custom code" in first and not spec.model.trust_remote_code:
            return model_path, None, (
                f"model.path: '{spec.model.path}' needs its own Python code to load ({first.split('. ')[0]}), "
                "and model.trust_remote_code is false, so it was not run. Read that code; only if you trust it, "
                "set model.trust_remote_code: true"
            )
        if spec.is_hub_id(spec.model.path):
            from core.hub import hub_advice

            revision = f" at revision {spec.model.revision!r}" if spec.model.revision else ""
            return model_path, None, (
                f"model.path: cannot read the model config of '{spec.model.path}'{revision}, a hub model id that "
                f"could not be reached ({first}). {hub_advice('model')}"
            )
        return model_path, None, (
            f"model.path: cannot read the model config of '{spec.model.path}' ({first}). "
            "Use a local folder with config.json (weights are not needed to plan), a reachable hub id, "
            "or builtin:tiny-llama"
        )
    return model_path, config, None


def load_model_config(spec: SweepSpec) -> tuple[str, Any]:
    """(model path, config) through `read_model_config`.

    Raises:
        SpecError: Naming model.path, if the config cannot be read.
    """
    model_path, config, problem = read_model_config(spec)
    if problem:
        raise SpecError("model.path", [problem])
    return model_path, config


def _load_tokenizer(spec: SweepSpec, model_path: str) -> tuple[Any, str | None]:
    from trainables.training_setup import load_tokenizer

    try:
        return load_tokenizer(model_path, spec.model), None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"model.path: cannot load the tokenizer of '{spec.model.path}' ({first})"


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
# secrets stay in the environment. (Test fault injection does not travel here: tests name their
# plug-ins in train.callbacks, see tests/fault_plugins.py.)
FORWARDED_ENV = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "QLORA_SWEEP_CACHE",
    # S3 storage: cloud nodes use instance profiles and set none of these, but an S3-compatible
    # endpoint (MinIO, moto) or explicit keys must reach the workers, which write results directly.
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
)
# QUIET_ENV (sweeps/local_env.py): no progress bars from trials side by side, Tune's quiet console.


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
    *TRACKER_SECRET_ENV,  # MLflow and W&B credentials (sweeps/tracking.py)
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
    # S3 keys that came inside the storage URI (core/storage.py `without_credentials`) travel the same way.
    keys = storage.remembered_credentials()
    hook: Any = "trainables.qlora.quiet_libraries" if not (secrets or keys) else _secret_setup_hook(secrets, keys)
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


def _secret_setup_hook(secrets: dict[str, str], keys: dict[Any, Any] | None = None) -> Callable[[], None]:
    def qlora_sweep_worker_setup() -> None:
        os.environ.update(secrets)
        if keys:
            from core import storage as worker_storage

            worker_storage.remember_credentials(keys)
        from trainables.qlora import quiet_libraries

        quiet_libraries()

    return qlora_sweep_worker_setup


# --- the Tuner --------------------------------------------------------------------------------


def _quietly_experimental(build: Callable[[], Any]) -> Any:
    """Build an Optuna object without its ExperimentalWarning (TPE's `group`, on by default, is marked
    experimental): a default should not print a warning at every sweep."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return build()


def make_sampler(spec: SweepSpec) -> Any:
    """The Optuna sampler search.sampler names (search.tpe: TPE's options); model-based samplers start
    after a few random trials scaled to the sweep size. Prior trials (search.warm_start) count toward
    that start, so a warm-started TPE models from its first proposal."""
    import optuna

    from sweeps.searcher import TuneGridSampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = spec.search
    startup = min(10, max(3, search.num_samples // 3))
    tpe = search.tpe
    samplers: dict[str, Callable[[], Any]] = {
        "tpe": lambda: _quietly_experimental(lambda: optuna.samplers.TPESampler(
            seed=search.seed, n_startup_trials=startup, multivariate=tpe.multivariate, group=tpe.group,
            constant_liar=tpe.constant_liar,
        )),
        "gp": lambda: optuna.samplers.GPSampler(seed=search.seed, n_startup_trials=startup, warn_independent_sampling=False),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(
            seed=search.seed, n_startup_trials=startup, warn_independent_sampling=False
        ),
        "random": lambda: optuna.samplers.RandomSampler(seed=search.seed),
        "grid": lambda: TuneGridSampler(
            {name: list(d.choices) for name, d in spec.space.distributions(spec.train.batch_size).items()}, seed=search.seed
        ),
    }
    return samplers[search.sampler]()


def make_scheduler(spec: SweepSpec) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    from sweeps.searcher import BaselineASHAScheduler

    asha = spec.scheduler.asha
    if asha is None:
        return FIFOScheduler()
    # One Tune iteration is one evaluation round (one tune.report per evaluation). The baseline trial
    # (search.baseline) is never stopped early: it trains to the full budget, a fair reference.
    # Its own metric (scheduler.asha.metric, else search.metric): Tune then takes none from TuneConfig.
    return BaselineASHAScheduler(
        metric=spec.asha_metric,
        mode=spec.tune_mode(spec.asha_metric),
        time_attr="training_iteration",
        max_t=spec.max_rounds,
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


def build_tuner(
    checked: Preflight,
    job: TrialJob,
    experiment_name: str,
    storage_path: str,
    plan: MemoryPlan | None = None,
    sampler: Any = None,
    log: Callable[[str], None] = print,
) -> Any:
    """The Tuner of a new sweep. `sampler` (an Optuna sampler) replaces the one search.sampler names.

    Its study starts from the warm-start trials (search.warm_start) and runs the baseline first
    (search.baseline, sweeps/baseline.py)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from sweeps.admission import AdmissionSearch
    from sweeps.progress import SweepProgress
    from sweeps.searcher import make_searcher, search_space, study_snapshots
    from sweeps.tune_state import SignedSearchGenerator
    from sweeps.tracking import callbacks as tracking_callbacks

    spec = checked.spec
    # The searcher optimizes search.metric (in multi-objective mode, search.objectives: make_searcher);
    # ASHA stops on its own metric (make_scheduler: scheduler.asha.metric, else search.metric), so
    # TuneConfig names none, and the kept checkpoints are ranked apart (checkpoint_metric).
    metric = spec.search.metric
    mode = spec.tune_mode(metric)
    # The study lives in search.optuna_storage (resolved by `_with_study`), where optuna-dashboard reads it.
    searcher = make_searcher(spec, search_space(spec), sampler or make_sampler(spec), mode)
    baseline = map_to_space(spec.space, spec.train.batch_size, spec.search.baseline)
    prior = checked.warm_start
    searcher.seed_study(baseline, prior.trials if prior else [])
    for line in prior.lines() if prior else []:
        log(f"[qlora-sweep] {line}")
    if baseline is not None:
        shown = ", ".join(f"{k} {v}" for k, v in baseline.config.items() if k in (*STANDARD_RECIPE, "lora_alpha"))
        moved = f"; moved to fit the space: {'; '.join(baseline.moved)}" if baseline.moved else ""
        log(f"[qlora-sweep] baseline (trial 0, trained to the full budget): {shown}{moved}")
    snapshots = study_snapshots(spec, storage.join(storage_path, experiment_name))
    searcher.snapshots = snapshots[0] if snapshots else None
    if plan is not None:
        # Rejects proposals predicted not to fit, or as large as one that ran out of memory, before launch.
        searcher = AdmissionSearch(searcher, plan, storage.join(storage_path, experiment_name))
    # Start lines show what the space searches (every knob with more than one value).
    searched = [knob.name for knob, kind in spec.space.kinds(spec.train.batch_size) if not isinstance(kind, Fixed)]
    progress = SweepProgress(spec.search.num_samples, spec.max_rounds, metric, config_keys=searched, mode=mode)
    return tune.Tuner(
        make_trainable(checked, job, plan),
        tune_config=tune.TuneConfig(
            # Digests of the pickled experiment state are written with every save (sweeps/tune_state.py).
            search_alg=SignedSearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)),
            scheduler=make_scheduler(spec),
            num_samples=spec.search.num_samples,
            # Reusing a trial's worker process saves re-importing torch/transformers per trial;
            # the trainable frees its memory in a finally block, so trials do not leak into each other.
            # Not with a trial watchdog (train.trial_timeout_s / stall_timeout_s): it may end a hung
            # trial's worker process (trainables/watchdog.py), which no other trial may then be handed.
            reuse_actors=not has_watchdog(spec),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment_name,
            # With S3 keys from the URI: a filesystem that holds them and pickles without them.
            **dict(zip(("storage_path", "storage_filesystem"), storage.for_ray(storage_path))),
            stop={"training_iteration": spec.max_rounds},
            # A trial that raised or lost its node is retried from its latest checkpoint.
            failure_config=tune.FailureConfig(max_failures=spec.train.max_failures),
            # Per trial: the best two checkpoints by the objective (export copies the best's adapter)
            # and, always, the latest (what a retried or resumed trial continues from). Two, so that
            # an older one is kept whenever the latest is also the best: a restored trial whose
            # latest checkpoint is unreadable continues from it (trainables/checkpoints.py).
            # A task metric measured only at some rounds (eval.when) is NaN at the others: rank by eval_loss then.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=checkpoint_metric(spec),
                checkpoint_score_order=spec.tune_mode(checkpoint_metric(spec)),
            ),
            callbacks=[
                progress,
                # A study kept outside the experiment (cloud storage) is published into it at every trial
                # end (and, by the searcher, at every proposal).
                *snapshots,
                *tracking_callbacks(spec, experiment_name, storage.join(storage_path, experiment_name), print),
            ],
            verbose=0,  # SweepProgress prints a compact live view instead of Tune's tables
        ),
    )


def has_watchdog(spec: SweepSpec) -> bool:
    """Whether trials run under a watchdog (train.trial_timeout_s or train.stall_timeout_s)."""
    return spec.train.trial_timeout_s is not None or spec.train.stall_timeout_s is not None


def checkpoint_metric(spec: SweepSpec) -> str:
    """What a trial's kept checkpoint is ranked by: search.metric, unless it is a task metric that is
    not measured every round (NaN in between), then eval_loss."""
    metric = spec.search.metric
    if metric in spec.eval.names and spec.eval.when != "every_round":
        return "eval_loss"
    return metric


def make_trainable(checked: Preflight, job: TrialJob, plan: MemoryPlan | None = None) -> Any:
    """The trial function with the sweep's TrialJob and the prepared data bound (data goes through
    the object store, so call this after connecting to Ray) and the resources each trial asks for:
    with resources.pack, a GPU share computed from each trial's predicted memory (sweeps/admission.py)."""
    from functools import partial

    from ray import tune

    from sweeps.admission import trial_resources
    from trainables.qlora import train_qlora

    spec = checked.spec
    resources: Any = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial, **spec.resources.custom}
    if spec.resources.pack and plan is not None:
        resources = partial(trial_resources, plan=plan)
    # The tokens preflight made, without their text: trials train on them and never re-tokenize.
    data = checked.data.for_trials() if checked.data is not None else None
    return tune.with_resources(tune.with_parameters(train_qlora, job=job, data=data), resources)


def trial_dirname(trial: Any) -> str:
    """Short trial folder names; the config lives in params.json, not in the folder name."""
    return experiment_folder.trial_dirname(trial.trial_id)


# --- the whole run ----------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    experiment_dir: str
    report_dir: str
    num_trials: int
    num_errors: int
    interrupted: str | None = None  # "SIGINT" or "SIGTERM" when a signal stopped the sweep early
    num_failed: int = 0  # trials with a status of core.status.FAILURE_STATUSES, as the report counts them
    summary: dict[str, Any] = field(default_factory=dict)  # the report's JSON summary (analysis.summary)


# Exit statuses of an interrupted sweep (README, "Exit statuses"): 128 + the signal's number.
INTERRUPTED_EXIT = {"SIGINT": 130, "SIGTERM": 143}


class StopSignals:
    """Ctrl-C and SIGTERM while Tune runs: the first stops the sweep the way Tune stops on Ctrl-C (no
    new trials; the running ones checkpointed and left to resume; the experiment state saved), and
    the sweep then writes its partial report; the second stops at once.

    Tune's own handler (ray/tune/tune.py `_setup_signal_catching`) takes SIGINT while `fit` runs and,
    on the first one, puts back the handler it found: this one, which so learns that the first came,
    and turns a second into KeyboardInterrupt. SIGTERM, which Tune does not handle, is recorded and
    passed on as SIGUSR1, which Tune handles as it handles a first Ctrl-C.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        # One bound method object each, so `getsignal(...) is self._on_sigint` can recognise it.
        self._on_sigint = self._sigint
        self._on_sigterm = self._sigterm

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            signal.signal(signal.SIGINT, self._on_sigint)
            signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        self.interrupted()  # read before the handlers are put back
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def interrupted(self) -> str | None:
        """The signal that stopped the sweep, once `fit` has returned; None if it ran to the end."""
        import signal

        if self.received is None and self._previous and signal.getsignal(signal.SIGINT) is self._on_sigint:
            self.received = "SIGINT"  # Tune's handler ran, and handed SIGINT back
        return self.received

    def _sigint(self, signum: int, frame: Any) -> None:
        self.received = self.received or "SIGINT"
        raise KeyboardInterrupt  # the second Ctrl-C (Tune took the first): stop at once

    def _sigterm(self, signum: int, frame: Any) -> None:
        import signal

        if self.received is not None:
            raise SystemExit(INTERRUPTED_EXIT["SIGTERM"])  # the second signal: stop at once
        self.received = "SIGTERM"
        os.kill(os.getpid(), signal.SIGUSR1)


def default_experiment_name(spec: SweepSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def saved_spec(checked: Preflight, storage_path: str) -> dict[str, Any]:
    """The spec as it ran, with paths made absolute so report/resume work from any folder."""
    spec = checked.spec
    raw = spec.model_dump(mode="json")
    raw["model"]["path"] = trial_model_path(spec, checked.model_path)
    raw["data"]["path"] = spec.resolve_path(spec.data.path)
    if spec.data.eval_path:
        raw["data"]["eval_path"] = spec.resolve_path(spec.data.eval_path)
    # The files task metrics name (forgetting texts, a python: metric's file, lm_eval tasks) are relative to the spec
    # file: resume and export read them from the saved spec, wherever they are run from.
    for metric, saved in zip(spec.eval.metrics, raw.get("eval", {}).get("metrics") or []):
        if metric.path:
            saved["path"] = spec.resolve_path(metric.path)
        if metric.include_path:
            saved["include_path"] = spec.resolve_path(metric.include_path)
        target, _, function = (metric.python or "").rpartition(":")
        if target.endswith(".py"):
            saved["python"] = f"{spec.resolve_path(target)}:{function}"
    raw["storage"] = storage_path
    return redact_data(raw)  # e.g. a password in search.optuna_storage (core/redact.py)


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
        "on_long_rows": spec.data.long_rows,
        "rows_read": data.rows_read,
        "train_rows": data.train_rows,
        "eval_rows": data.eval_rows,
        "skipped_rows": len(data.skipped),
        "skipped": data.skipped[:MAX_SKIPPED_KEPT],
        "truncated_rows": len(data.truncated),
        "truncated": data.truncated[:MAX_SKIPPED_KEPT],
        "max_seq_length": spec.data.max_seq_length,
        **(
            {"train_tokens": data.train_tokens.tokens, "train_loss_tokens": data.train_tokens.loss_tokens}
            if data.train_tokens is not None
            else {}
        ),
    }


@dataclass(frozen=True)
class _Experiment:
    """Where a sweep's results go, and whether it starts or continues."""

    directory: str
    name: str
    storage_path: str
    resuming: bool = False
    restart_errored: bool = False


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
    problem = name_problem(name) if name is not None else None
    if problem:  # --name names a folder inside the storage, as the spec's name does
        raise SpecError("--name", [f"--name: {problem}"])
    if storage_override:
        spec = spec.model_copy(update={"storage": storage_override})
    # S3 keys in the location stay in this process's memory; what flows on (and is written) has none.
    spec = spec.model_copy(update={"storage": storage.without_credentials(spec.storage)})
    log = _redacting(log)
    log(f"[qlora-sweep] checking spec '{spec.name}': model, target modules, data, storage")
    checked = preflight(spec)
    storage_path = storage.absolute(spec.storage)
    experiment_name = name or default_experiment_name(spec)
    experiment_dir = storage.join(storage_path, experiment_name)
    # One driver per experiment folder (sweeps/driver_lock.py), held until the report is written.
    with DriverLock(experiment_dir):
        if experiment_folder.is_experiment(experiment_dir):
            raise SpecError(
                "--name",
                [
                    f"{experiment_dir} already holds a sweep; continue it with `qlora-sweep resume {experiment_dir}` "
                    "or choose another --name"
                ],
            )
        checked = _with_study(checked, experiment_dir, experiment_name, resuming=False)
        log(
            f"[qlora-sweep] data: {checked.data.train_rows} train / {checked.data.eval_rows} eval rows"
            + (f", {len(checked.data.skipped)} bad rows skipped" if checked.data.skipped else "")
            + (f", {len(checked.data.truncated)} long rows truncated" if checked.data.truncated else "")
        )
        return _sweep(checked, _Experiment(experiment_dir, experiment_name, storage_path), address, log, sampler)


def resume_sweep(
    path: str,
    *,
    restart_errored: bool = False,
    address: str | None = None,
    log: Callable[[str], None] = print,
    trust_experiment: bool = False,
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
        trust_experiment: Resume even if Tune's pickled state has no valid digest under this
            machine's key (sweeps/tune_state.py); its digests are then recorded as they are.

    Raises:
        NotAnExperiment: If `path` was not written by qlora-sweep.
        UntrustedExperiment: If Tune's pickled state lacks a valid digest, without `trust_experiment`.
        SpecError: Before Ray starts, if the saved spec, model, data, storage or study is unusable.
    """
    from analysis.results import NotAnExperiment
    from sweeps.spec import parse_spec

    quiet_driver()
    log = _redacting(log)
    experiment_dir = storage.absolute(storage.without_credentials(path))
    _check_readable(experiment_dir)
    if not storage.exists(experiment_dir):
        raise NotAnExperiment(f"cannot resume {experiment_dir}: no such folder. Pass the folder that `run` printed")
    if not experiment_folder.is_experiment(experiment_dir):
        raise NotAnExperiment(
            f"refusing to resume {experiment_dir}: it is not a qlora-sweep experiment folder "
            f"(no {experiment_folder.SPEC_FILE}). Resuming unpickles the folder's {experiment_folder.TUNER_FILE} and "
            "searcher state, which can run arbitrary code, so only folders written by `qlora-sweep run` are accepted. "
            "Pass the folder that `run` printed"
        )
    with DriverLock(experiment_dir):  # one driver per experiment folder (sweeps/driver_lock.py)
        if not storage.exists(experiment_folder.file(experiment_dir, experiment_folder.TUNER_FILE)):
            raise SpecError(
                "resume",
                [f"{experiment_dir} has no {experiment_folder.TUNER_FILE}: the sweep stopped before Ray Tune started, so "
                 "there is nothing to resume. Start it again with `qlora-sweep run SPEC --name NEW_NAME`"],
            )
        from sweeps import tune_state

        if trust_experiment:
            vouched = tune_state.trust(experiment_dir)
            log(f"[qlora-sweep] {tune_state.TRUST_FLAG}: unpickling {len(vouched)} files of Tune state without checking "
                "who wrote them; their digests are recorded now")
        else:
            tune_state.verify(experiment_dir)  # before anything of the folder is unpickled
        spec_file = experiment_folder.file(experiment_dir, experiment_folder.SPEC_FILE)
        raw = safe_yaml(storage.read_text(spec_file), spec_file)
        if isinstance(raw, dict) and isinstance(raw.get("search"), dict):
            # Experiments saved before studies had a database kept theirs in Ray's searcher state.
            raw["search"].setdefault("optuna_storage", "memory")
        storage_path, experiment_name = _split_experiment(experiment_dir)
        spec = parse_spec(raw, source=spec_file).model_copy(update={"storage": storage_path})
        log(f"[qlora-sweep] resuming '{experiment_name}': checking model, target modules, data, storage, study")
        checked = _with_study(preflight(spec, warm_start=False), experiment_dir, experiment_name, resuming=True, log=log)
        experiment = _Experiment(experiment_dir, experiment_name, storage_path, resuming=True, restart_errored=restart_errored)
        return _sweep(checked, experiment, address, log)


def _sweep(
    checked: Preflight,
    experiment: _Experiment,
    address: str | None,
    log: Callable[[str], None],
    sampler: Any = None,
) -> SweepOutcome:
    """What `run` and `resume` share once preflight passed: connect, plan, fit, settle, finish.

    A new sweep writes sweep_spec.yaml, data_report.json and run_plan.json and builds its Tuner; a
    resumed one keeps the files it has (writing run_plan.json only if it has none, i.e. it was made
    before run plans existed) and restores its Tuner from the folder.
    """
    spec = checked.spec
    # With the GPU named in the spec, an infeasible space is refused before Ray starts; the cluster
    # cannot change that plan, so it is made once.
    plan = _memory_plan(checked, None, local=False) if spec.resources.gpu_memory_gib else None
    mode, dashboard = connect_ray(address)
    try:
        import ray

        _check_cluster_resources(spec, mode)
        where = "started a local Ray cluster" if mode == "local" else "joined the Ray cluster"
        log(f"[qlora-sweep] {where}; dashboard: {'http://' + dashboard if dashboard else 'not running'}")
        cluster = ray.cluster_resources()
        local = mode == "local"
        if plan is None:
            # On resume the restored searcher keeps its own plan (pickled in tuner.pkl); this one
            # sizes packed trials.
            plan = _memory_plan(checked, cluster, local=local)
        _log_memory_plan(checked, plan, log)
        _write_experiment_files(checked, experiment, plan, gpu_names=gpu_names(spec, cluster, local))
        log(f"[qlora-sweep] experiment: {experiment.directory}")
        if not storage.is_uri(experiment.directory):
            log(f"[qlora-sweep] live curves: tensorboard --logdir {experiment.directory}")
        _log_study(spec, log)
        job = trial_job(checked.spec, model_path=checked.model_path, model_config=checked.model_config)
        if experiment.resuming:
            from ray import tune

            _settle_study(spec, experiment.directory, log, finished=False)
            restore_path, restore_fs = storage.for_ray(experiment.directory)
            tuner = tune.Tuner.restore(
                restore_path,
                storage_filesystem=restore_fs,
                trainable=make_trainable(checked, job, plan),
                resume_unfinished=True,
                restart_errored=experiment.restart_errored,
            )
        else:
            tuner = build_tuner(checked, job, experiment.name, experiment.storage_path, plan, sampler, log)
            from sweeps import tune_state

            tune_state.sign(experiment.directory)  # Tune wrote tuner.pkl as the Tuner was built
        with StopSignals() as signals:
            results = tuner.fit()
            interrupted = signals.interrupted()
        _settle_study(spec, experiment.directory, log, finished=True)
        outcome = _finish(experiment.directory, len(results), results.num_errors, log, interrupted=interrupted)
        if interrupted:
            log(
                f"[qlora-sweep] stopped by {interrupted}: no new trials were started, the running ones were saved at "
                f"their last checkpoint, and the report above is partial. Continue with:\n"
                f"    qlora-sweep resume {experiment.directory}"
            )
        return outcome
    finally:
        if mode == "local":
            import ray

            ray.shutdown()  # a cluster we started ends with the sweep: no Ray processes left behind


def _write_experiment_files(
    checked: Preflight, experiment: _Experiment, plan: MemoryPlan | None, gpu_names: list[str]
) -> None:
    """sweep_spec.yaml, data_report.json and run_plan.json (core/experiment_folder.py names them)."""
    folder = experiment.directory
    plan_file = experiment_folder.file(folder, experiment_folder.PLAN_FILE)
    if not experiment.resuming:
        header = "".join(f"# run with --set {redact_location(item)}\n" for item in checked.spec.overrides)
        storage.write_text(
            experiment_folder.file(folder, experiment_folder.SPEC_FILE),
            header + yaml.safe_dump(saved_spec(checked, experiment.storage_path), sort_keys=False),
        )
        storage.write_text(
            experiment_folder.file(folder, experiment_folder.DATA_REPORT_FILE),
            json.dumps(data_report(checked), indent=2),
        )
        if checked.warm_start is not None:
            storage.write_text(
                experiment_folder.file(folder, experiment_folder.WARM_START_FILE),
                json.dumps(redact_data(checked.warm_start.record()), indent=2),
            )
    elif storage.exists(plan_file):
        return  # the plan of the run that started the experiment stays
    run_plan = make_run_plan(
        checked.spec,
        model_path=checked.model_path,
        model_config=checked.model_config,
        experiment_name=experiment.name,
        experiment_dir=folder,
        storage_path=experiment.storage_path,
        memory=plan,
        gpu_names=gpu_names,
    )
    write_run_plan(folder, run_plan)


def _redacting(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` with credentials in URLs masked (core/redact.py)."""
    return lambda line: log(redact(line))


def _check_readable(experiment_dir: str) -> None:
    """A clear error when the experiment's storage cannot be read, e.g. S3 keys that were not saved.

    Raises:
        SpecError: Naming the location (redacted) and where credentials come from.
    """
    try:
        storage.exists(experiment_dir)
    except OSError as exc:
        first = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        keys = (
            " Keys given inside a storage URI are never saved with the experiment: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give them in the experiment URI again: "
            "`qlora-sweep resume s3://<access key>:<secret key>@bucket/prefix/EXPERIMENT?...`"
            if storage.is_uri(experiment_dir) else ""
        )
        raise SpecError("resume", [f"resume: cannot read {redact(experiment_dir)} ({type(exc).__name__}: {first}).{keys}"]) from None


def _split_experiment(experiment_dir: str) -> tuple[str, str]:
    """(storage path, experiment name) of an experiment folder or URI (a URI keeps its ?query)."""
    if storage.is_uri(experiment_dir):
        base, sep, query = experiment_dir.partition("?")
        parent, _, name = base.rstrip("/").rpartition("/")
        return parent + sep + query, name
    return str(Path(experiment_dir).parent), Path(experiment_dir).name


def _with_study(
    checked: Preflight, experiment_dir: str, experiment_name: str, *, resuming: bool, log: Callable[[str], None] = print
) -> Preflight:
    """Resolve where the Optuna study lives and check it is usable, before Ray starts. A resumed sweep
    whose sqlite study is not on this machine (a new head node) gets it back from the experiment."""
    from sweeps.searcher import check_study, resolve_study, restore_study

    spec = resolve_study(checked.spec, experiment_dir, experiment_name)
    if resuming:
        spec, restored = restore_study(spec, experiment_dir, experiment_name)
        if restored:
            log(f"[qlora-sweep] {restored}")
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
    the sweep is over, publish a last snapshot of a study kept outside the experiment into it."""
    from sweeps.searcher import publish_study, settle_study

    for line in settle_study(spec, experiment_dir):
        log(f"[qlora-sweep] settled {line}")
    copied = publish_study(spec, experiment_dir) if finished else None
    if copied:
        log(f"[qlora-sweep] optuna study published to {copied}")


def _finish(
    experiment_dir: str, num_trials: int, num_errors: int, log: Callable[[str], None], *, interrupted: str | None = None
) -> SweepOutcome:
    from analysis.report import write_report

    from core.status import FAILURE_STATUSES

    report = write_report(experiment_dir)
    from sweeps.tracking import publish as publish_to_trackers

    publish_to_trackers(experiment_dir, report, log, interrupted=interrupted)  # the sweep's MLflow run
    num_failed = sum(report.statuses.get(str(status), 0) for status in FAILURE_STATUSES)
    log(f"[qlora-sweep] {num_trials} trials, {num_failed} failed")
    for line in report.summary_lines:
        log(f"[qlora-sweep] {line}")
    log(f"[qlora-sweep] experiment: {experiment_dir}")
    log(f"[qlora-sweep] report:     {report.report_dir}")
    return SweepOutcome(experiment_dir, report.report_dir, num_trials, num_errors, interrupted, num_failed, report.summary)


def _memory_plan(checked: Preflight, cluster_resources: dict[str, float] | None, *, local: bool) -> MemoryPlan | None:
    """Predictions, the GPU size (spec or cluster) and the pre-launch checks of admission and packing.

    Args:
        cluster_resources: `ray.cluster_resources()` once connected; None before (only the spec's
            GPU size is known then).
        local: Whether the cluster was started on this machine.

    Returns:
        The plan; None when the model config was not read.

    Raises:
        SpecError: If packing cannot be sized, or no configuration of the space is predicted to fit.
    """
    if checked.model_config is None:
        return None
    spec = checked.spec
    # The plan travels with the searcher into tuner.pkl (sweeps/admission.py) and needs no study URL:
    # its copy of the spec has the URL's credentials masked (core/redact.py).
    study_url = spec.search.optuna_storage
    if study_url:
        spec = spec.model_copy(update={"search": spec.search.model_copy(update={"optuna_storage": redact(study_url)})})
    return memory_plan(spec, checked.model_config, detect_gpu_size(spec, cluster_resources, local=local))


def _log_memory_plan(checked: Preflight, plan: MemoryPlan | None, log: Callable[[str], None]) -> None:
    if plan is None:
        return
    spec = checked.spec
    if not plan.predictable:
        log(f"[qlora-sweep] memory: the estimator does not model '{checked.model_type}': no predictions, no admission")
    elif plan.gpu is None:
        log("[qlora-sweep] memory: GPU size unknown (resources.gpu_memory_gib): no admission; OOM-aware search is on")
    else:
        log(
            f"[qlora-sweep] memory: admitting configurations predicted to fit {plan.gpu.gib:g} GiB ({plan.gpu.source}) "
            f"with a {spec.resources.memory_margin:.0%} margin"
            + ("; packing trials onto GPUs by predicted memory" if spec.resources.pack else "")
        )
    if plan.predictable:
        for line in not_modelled(spec.space):
            log(f"[qlora-sweep] memory: not modelled: {line}")


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
