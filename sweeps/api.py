"""The Python API: run a sweep, or read a finished one, from a script or a notebook.

    from sweeps.api import run_sweep, load_experiment

    result = run_sweep("sweeps/smoke.yaml", search__num_samples=2, storage="results")
    result.trials            # one row per trial (the columns of trials.csv)
    result.best              # the best trial's row, or None
    result.pareto_front      # the trials no other beats in both quality and memory
    result.experiment_dir    # where everything is; load_experiment(result.experiment_dir) reads it again

Importing this module sets nothing. A call leaves the process as it found it: the environment
variables, logging levels and handlers, signal handlers and Ray settings that a sweep changes while
it runs (to quiet progress bars, keep Ray on loopback, keep secrets out of trial environments) are
put back afterwards, and a local Ray cluster the sweep started is shut down. See docs/python-api.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from sweeps.spec import SweepSpec

# The signals a sweep handles while it runs (sweeps/driver.py StopSignals, and Tune's own).
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@dataclass(frozen=True)
class SweepResult:
    """A sweep's results, as its report computes them.

    Attributes:
        experiment_dir: The experiment folder or URI.
        report_dir: Where the report files are.
        trials: One row per trial: the columns of trials.csv (trainables/metrics.py), typed.
        best: The best rankable trial's row (best quality, ties to lower memory), or None.
        pareto_front: The rankable trials on the quality-vs-memory Pareto front.
        summary: What `qlora-sweep report --json` prints (docs/scripting.md).
        exit_status: What `qlora-sweep run` would have exited with (0 all trials fine, 1 some failed,
            130/143 interrupted); None for `load_experiment`.
        interrupted: "SIGINT" or "SIGTERM" if a signal stopped the sweep early, else None.
    """

    experiment_dir: str
    report_dir: str | None
    trials: pd.DataFrame
    best: pd.Series | None
    pareto_front: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    exit_status: int | None = None
    interrupted: str | None = None


def run_sweep(
    spec: str | Path | Mapping[str, Any] | SweepSpec,
    *,
    storage: str | None = None,
    name: str | None = None,
    address: str | None = None,
    log: Callable[[str], None] | None = print,
    **overrides: Any,
) -> SweepResult:
    """Run a sweep and write its report, as `qlora-sweep run` does, and return its results.

    Args:
        spec: A spec file, a spec mapping (as the YAML would parse), or a SweepSpec.
        storage: Where experiments go (a folder or s3:// URI), instead of the spec's `storage`.
        name: The experiment folder's name (default: SPEC_NAME-YYYYmmdd-HHMMSS).
        address: The Ray cluster to join (as `--address`; default: a running one, else a local one).
        log: Where the console lines go (None: nowhere).
        **overrides: Spec keys to set, with `__` for the dots (`search__num_samples=4`), or as
            `**{"search.num_samples": 4}`; checked by the schema with the rest of the spec and recorded
            in run_plan.json and the report, like `--set`.

    Raises:
        SpecError: Before anything starts, if the spec, an override, the model, data or storage is
            unusable (the same messages the CLI prints).
    """
    from sweeps import driver

    checked_spec = _spec_with({key.replace("__", "."): value for key, value in overrides.items()}, spec)
    with _process_state_restored():
        outcome = driver.run_sweep(
            checked_spec, storage_override=storage, name=name, address=address, log=log or (lambda line: None)
        )
    from sweeps.cli import _exit_status

    result = load_experiment(outcome.experiment_dir)
    return SweepResult(
        experiment_dir=result.experiment_dir,
        report_dir=outcome.report_dir,
        trials=result.trials,
        best=result.best,
        pareto_front=result.pareto_front,
        summary=outcome.summary or result.summary,
        exit_status=_exit_status(outcome),
        interrupted=outcome.interrupted,
    )


def load_experiment(path: str | Path) -> SweepResult:
    """Read a finished (or running) sweep's results; writes nothing.

    Raises:
        NotAnExperiment: If `path` is not a folder that qlora-sweep wrote.
    """
    from analysis.results import load_experiment as load
    from analysis.summary import analyze
    from core import experiment_folder

    analysis = analyze(load(str(path)))
    front = analysis.ranked[analysis.ranked["on_front"]] if "on_front" in analysis.ranked else analysis.ranked.iloc[:0]
    return SweepResult(
        experiment_dir=analysis.exp.path,
        report_dir=experiment_folder.file(analysis.exp.path, experiment_folder.REPORT_DIR),
        trials=analysis.exp.trials,
        best=analysis.best,
        pareto_front=front.reset_index(drop=True),
        summary=analysis.json_summary(),
    )


def _spec_with(overrides: dict[str, Any], spec: str | Path | Mapping[str, Any] | SweepSpec) -> SweepSpec:
    from sweeps.cli import find_spec
    from sweeps.spec import SweepSpec, load_spec, spec_with_overrides

    if isinstance(spec, SweepSpec):
        return spec_with_overrides(spec.model_dump(mode="json"), overrides, base_dir=spec.base_dir) if overrides else spec
    if isinstance(spec, Mapping):
        return spec_with_overrides(dict(spec), overrides, base_dir=Path.cwd())
    return load_spec(find_spec(str(spec)), overrides)


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """Put back what a sweep changes process-wide: environment variables, the levels and handlers of
    the loggers that existed before it (Optuna's and bitsandbytes' among them, which the sweep
    quiets), signal handlers, and the module-level Ray settings that sweeps/driver.py sets."""
    import optuna

    optuna.logging.get_verbosity()  # Optuna sets up its logger on first use; the sweep uses it
    logging.getLogger("bitsandbytes")  # the driver quiets it
    environ = dict(os.environ)
    manager = logging.Logger.manager
    levels = {name: lg.level for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    handlers = {name: list(lg.handlers) for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    propagate = {name: lg.propagate for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root = logging.getLogger()
    root_state = (root.level, list(root.handlers))
    signals = {sig: signal.getsignal(sig) for sig in _HANDLED_SIGNALS}
    ray_settings = _ray_settings()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for name, lg in list(manager.loggerDict.items()):
            # Loggers that appeared during the sweep are as the libraries that made them set them up.
            if isinstance(lg, logging.Logger) and name in levels:
                lg.setLevel(levels[name])
                lg.handlers[:] = handlers[name]
                lg.propagate = propagate[name]
        root.setLevel(root_state[0])
        root.handlers[:] = root_state[1]
        for sig, handler in signals.items():
            if handler is not None:
                signal.signal(sig, handler)
        _restore_ray_settings(ray_settings)


def _ray_settings() -> dict[str, Any]:
    """The module-level Ray settings sweeps/driver.py changes, as they are before the sweep (the
    sweep imports these modules anyway)."""
    from ray._private import ray_constants
    from ray.tune.execution import class_cache

    return {
        "ENABLE_RAY_CLUSTER": ray_constants.ENABLE_RAY_CLUSTER,
        "ENV_VARS_TO_PROPAGATE": class_cache.ENV_VARS_TO_PROPAGATE,
    }


def _restore_ray_settings(settings: dict[str, Any]) -> None:
    from ray._private import ray_constants
    from ray.tune.execution import class_cache

    ray_constants.ENABLE_RAY_CLUSTER = settings["ENABLE_RAY_CLUSTER"]
    class_cache.ENV_VARS_TO_PROPAGATE = settings["ENV_VARS_TO_PROPAGATE"]
