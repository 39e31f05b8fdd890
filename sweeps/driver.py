"""The Tune driver: preflight checks, Ray connection, the Tuner (Optuna + ASHA), and the report.

`qlora-sweep run SPEC` and `python sweeps/sweep.py --config SPEC` (what `ray submit` runs) both
call `run_sweep`. Everything that can be wrong with the input is checked in `preflight` before
Ray starts, so bad input costs no GPU time and leaves no half-written experiment behind.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from sweeps import storage
from sweeps.spec import SpecError, SweepSpec
from trainables.metrics import tune_mode

if TYPE_CHECKING:
    from trainables.data import PreparedData

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# --- preflight --------------------------------------------------------------------------------


@dataclass
class Preflight:
    """What preflight learned, reused by the sweep so nothing is read twice."""

    spec: SweepSpec
    model_path: str
    model_type: str
    data: PreparedData


def preflight(spec: SweepSpec, *, check_storage: bool = True) -> Preflight:
    """Check everything about a spec that can be checked before training, and prepare the data.

    Raises:
        SpecError: With every problem found: model config, target modules, data rows, storage.
    """
    from trainables.data import DataError, prepare_data
    from trainables.targets import check_targets, choice_label
    from trainables.tiny_models import materialize

    problems: list[str] = []
    model_path, config, tokenizer = spec.model.path, None, None
    try:
        model_path = materialize(spec.resolve_path(spec.model.path))
    except ValueError as exc:
        problems.append(f"model.path: {exc}")
    if not problems:
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
    try:
        data = prepare_data(spec.resolve_path(spec.data.path), spec.data, tokenizer)
    except DataError as exc:
        problems.extend(f"data: {p}" for p in exc.problems[:10])
        if exc.total > 10:
            problems.append(f"data: ... and {exc.total - 10} more bad rows")
    if check_storage:
        problem = storage.check_writable(storage.absolute(spec.storage))
        if problem:
            problems.append(problem)
    if problems:
        raise SpecError("preflight", problems)
    return Preflight(spec=spec, model_path=model_path, model_type=config.model_type, data=data)


def _load_config_and_tokenizer(spec: SweepSpec, model_path: str) -> tuple[Any, Any, str | None]:
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(model_path, **kwargs)
    except Exception as exc:  # missing folder, offline hub, gated model, remote code refused
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
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
    if not joining and "ray" not in sys.modules:
        # Must be set before ray is imported: it makes every local Ray service bind to loopback.
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    if ray.is_initialized():
        return "joined", None
    runtime_env = {"env_vars": _forwarded_env(), "worker_process_setup_hook": "trainables.qlora.quiet_libraries"}
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
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    return "local", context.dashboard_url


# Environment variables forwarded to every trial worker through runtime_env, never written to
# params.json or results: secrets stay in the environment.
FORWARDED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "QLORA_SWEEP_CACHE")
# Trials run side by side: per-step and per-file progress bars from each would drown the live view.
# RAY_AIR_NEW_OUTPUT=0 selects Tune's legacy console output, which (unlike the new one) is silent
# at verbose=0, leaving the console to SweepProgress.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_AIR_NEW_OUTPUT": "0",
}


def quiet_driver() -> None:
    """Quiet progress bars and import-time warnings in this process (workers get QUIET_ENV too)."""
    import logging

    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _forwarded_env() -> dict[str, str]:
    return {**QUIET_ENV, **{name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}}


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


def build_tuner(checked: Preflight, experiment_name: str, storage_path: str) -> Any:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.progress import SweepProgress
    from sweeps.space import space_function
    from trainables.qlora import train_qlora

    spec = checked.spec
    metric = spec.search.metric
    mode = tune_mode(metric)
    searcher = OptunaSearch(space=space_function(spec), metric=metric, mode=mode, sampler=make_sampler(spec))
    trainable = tune.with_resources(
        tune.with_parameters(train_qlora, spec=spec, data=checked.data),
        {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial, **spec.resources.custom},
    )
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
            failure_config=tune.FailureConfig(max_failures=0),
            # Per trial: the best checkpoint by the objective (export copies its adapter) and,
            # always, the latest (what a retried or resumed trial continues from).
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            callbacks=[progress],
            verbose=0,  # SweepProgress prints a compact live view instead of Tune's tables
        ),
    )


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


def run_sweep(
    spec: SweepSpec,
    *,
    storage_override: str | None = None,
    name: str | None = None,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> SweepOutcome:
    """Preflight, start or join Ray, run the Tuner, write the report.

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
    log(
        f"[qlora-sweep] data: {len(checked.data.train)} train / {len(checked.data.eval)} eval rows"
        + (f", {len(checked.data.skipped)} bad rows skipped" if checked.data.skipped else "")
    )
    mode, dashboard = connect_ray(address)
    try:
        _check_cluster_resources(spec, mode)
        where = "started a local Ray cluster" if mode == "local" else "joined the Ray cluster"
        log(f"[qlora-sweep] {where}; dashboard: {'http://' + dashboard if dashboard else 'not running'}")
        storage.write_text(
            storage.join(experiment_dir, storage.SPEC_FILE),
            yaml.safe_dump(saved_spec(checked, storage_path), sort_keys=False),
        )
        log(f"[qlora-sweep] experiment: {experiment_dir}")
        if not storage.is_uri(experiment_dir):
            log(f"[qlora-sweep] live curves: tensorboard --logdir {experiment_dir}")
        tuner = build_tuner(checked, experiment_name, storage_path)
        results = tuner.fit()
        return _finish(experiment_dir, len(results), results.num_errors, log)
    finally:
        if mode == "local":
            import ray

            ray.shutdown()  # a cluster we started ends with the sweep: no Ray processes left behind


def _finish(experiment_dir: str, num_trials: int, num_errors: int, log: Callable[[str], None]) -> SweepOutcome:
    from analysis.report import write_report

    report = write_report(experiment_dir)
    log(f"[qlora-sweep] {num_trials} trials, {num_errors} errored")
    for line in report.summary_lines:
        log(f"[qlora-sweep] {line}")
    log(f"[qlora-sweep] experiment: {experiment_dir}")
    log(f"[qlora-sweep] report:     {report.report_dir}")
    return SweepOutcome(experiment_dir, report.report_dir, num_trials, num_errors)


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
