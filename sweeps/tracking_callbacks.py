"""The Ray Tune logger callbacks behind sweeps/tracking.py: Ray's own MLflow and W&B callbacks, adapted.

Imported only when a spec has a `tracking:` section (it imports Ray, and Ray imports the trackers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem, _WandbLoggingActor

from core import experiment_folder
from core.redact import redact
from sweeps.tracking_names import (
    EXPERIMENT_TAG,
    MAX_TAG_CHARS,
    NUMERIC_METRICS,
    ROUND_KEYS,
    STATUS_TAG,
    TEXT_METRICS,
    TRIAL_TAG,
    trial_status,
)

logger = logging.getLogger(__name__)


def _guarded(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A tracker call that fails is logged and skipped: the sweep and its folder go on without it."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                first = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
                logger.warning("qlora-sweep: %s failed (%s); the sweep goes on, its folder keeps every result", what, first)
                return None

        return call

    return wrap




class TrialRunsToMLflow(MLflowLoggerCallback):
    """Ray Tune's MLflowLoggerCallback, one run per trial named after its folder, children of the sweep run.

    A resumed trial continues the run it had. The metrics are the trial's reported numeric metrics
    with the evaluation round as the step; text metrics (memory_kind) are tags; `status` at the end.
    """

    def __init__(self, *, spec_for_status: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_for_status = spec_for_status

    @_guarded("MLflow: starting a trial run")
    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs:
            name = experiment_folder.trial_dirname(trial.trial_id)
            client = self.mlflow_util._get_client()
            earlier = client.search_runs(
                [self.mlflow_util.experiment_id],
                filter_string=f"tags.{EXPERIMENT_TAG} = '{self.tags[EXPERIMENT_TAG]}' and tags.{TRIAL_TAG} = '{trial.trial_id}'",
            )
            if earlier:
                self._trial_runs[trial] = earlier[0].info.run_id
                client.update_run(earlier[0].info.run_id, status="RUNNING")
            else:
                tags = {**self.tags, TRIAL_TAG: trial.trial_id, "trial_name": str(trial)}
                self._trial_runs[trial] = self.mlflow_util.start_run(tags=tags, run_name=name).info.run_id
                self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=trial.config)

    @_guarded("MLflow: logging a round")
    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        run_id = self._trial_runs[trial]
        numbers = {k: result[k] for k in (*NUMERIC_METRICS, *ROUND_KEYS) if result.get(k) is not None}
        self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=numbers, step=result.get("training_iteration") or iteration)
        client = self.mlflow_util._get_client()
        for key in TEXT_METRICS:
            if isinstance(result.get(key), str):
                client.set_tag(run_id, key, result[key][:MAX_TAG_CHARS])

    @_guarded("MLflow: ending a trial run")
    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        run_id = self._trial_runs.get(trial)
        if run_id is None:
            return
        status = trial_status(trial.last_result, failed, self.spec_for_status)
        self.mlflow_util._get_client().set_tag(run_id, STATUS_TAG, status)
        self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed else "FINISHED")


# A result item that carries the trial's end status to its W&B logging actor instead of metrics.
_STATUS_ITEM = "__qlora_sweep_status__"


class _WandbTrialActor(_WandbLoggingActor):
    """Ray's W&B logging actor, which also takes the trial's end status: a run tag and a summary entry."""

    def _handle_result(self, result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        if _STATUS_ITEM in result:
            run = self._wandb.run
            status = result[_STATUS_ITEM]
            run.tags = (*(run.tags or ()), status)
            run.summary[STATUS_TAG] = status
            step = result.get("training_iteration")
            return ({"training_iteration": step} if step else {}), {STATUS_TAG: status}
        return super()._handle_result(result)


class TrialRunsToWandb(WandbLoggerCallback):
    """Ray Tune's WandbLoggerCallback, without its runtime_env copy of WANDB_API_KEY, with the end status.

    The key reaches the logging actors through the driver's worker setup hook (and, on the driver's
    node, the inherited environment). Offline and disabled runs need no key at all.
    """

    _logger_actor_cls = _WandbTrialActor
    # Text metrics are not loggable as W&B history; the config keeps their latest value.
    AUTO_CONFIG_KEYS = [*WandbLoggerCallback.AUTO_CONFIG_KEYS, *TEXT_METRICS]

    def __init__(self, *, spec_for_status: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_for_status = spec_for_status

    def setup(self, *args: Any, **kwargs: Any) -> None:
        if self.kwargs.get("mode") in ("offline", "disabled"):
            # Ray's setup asks for an API key unless WANDB_MODE says offline; these modes need none.
            self.api_key_file = None
            return
        super().setup(*args, **kwargs)

    def _start_logging_actor(self, trial: Any, exclude_results: list[str], **wandb_init_kwargs: Any) -> None:
        if not self._remote_logger_class:
            import ray
            from ray.air.util.node import _force_on_current_node

            # Ray's version adds runtime_env={"env_vars": {"WANDB_API_KEY": ...}}, logged in plain text.
            self._remote_logger_class = ray.remote(
                num_cpus=0, **_force_on_current_node(), max_restarts=-1, max_task_retries=-1
            )(self._logger_actor_cls)
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial in self._trial_queues:
            status = trial_status(trial.last_result, failed, self.spec_for_status)
            last = (trial.last_result or {}).get("training_iteration")
            self._trial_queues[trial].put((_QueueItem.RESULT, {_STATUS_ITEM: status, "training_iteration": last}))
        super().log_trial_end(trial, failed)
