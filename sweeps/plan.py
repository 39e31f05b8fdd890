"""The run plan: what preflight resolved, made once and handed to every consumer.

`trial_job` is the slice a trial worker receives (trainables/job.py).
"""

from __future__ import annotations

from typing import Any

from sweeps.spec import SweepSpec
from trainables.job import TrialJob


def trial_job(spec: SweepSpec, *, model_path: str | None = None, model_config: Any = None) -> TrialJob:
    """The job every trial of this sweep receives: paths resolved, the model config read once.

    Args:
        spec: The validated spec.
        model_path: Where trials load the model from (preflight's resolved path); default: the
            spec's model.path resolved against the spec file's folder.
        model_config: The base model's transformers config (or config.json dict), if read.
    """
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else model_config
    return TrialJob(
        model=spec.model,
        model_path=model_path or spec.resolve_path(spec.model.path),
        base_config=dict(config) if config is not None else None,
        data=spec.data.model_copy(update={"path": spec.resolve_path(spec.data.path)}),
        train=spec.train,
        cpus_per_trial=spec.resources.cpus_per_trial,
        gpus_per_trial=spec.resources.gpus_per_trial,
        pack=spec.resources.pack,
    )
