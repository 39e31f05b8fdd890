"""What a trial worker receives: the slice of the run plan one trial needs, never the whole spec.

The driver (sweeps/plan.py) builds one `TrialJob` per sweep after preflight has resolved every
path and read the model config; Tune hands it to each trial with the trial's sampled config. It
is small, frozen and picklable, and it holds nothing a trial would have to resolve again.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from trainables.settings import DataSpec, ModelSpec, TrainSpec
from trainables.task_metrics import EvalJob


class TrialJob(BaseModel):
    """The settings every trial of one sweep trains with.

    Attributes:
        model: The model section; `model.path` is as the user wrote it (hub id, builtin:..., path).
        model_path: Where to load it from: an absolute local folder, a hub id, or a builtin: name
            (built on the worker's own disk, so multi-node trials need no shared folder).
        base_config: The base model's config.json as a dict, for this trial's memory prediction
            (None when the driver could not read it).
        data: The data section with `data.path` and `data.eval_path` resolved (absolute, or hub ids).
        train: The train section.
        cpus_per_trial: Threads the trial's torch may use.
        gpus_per_trial: GPUs (or a share) each trial asks for; 0 trains on CPU.
        pack: Whether trials share GPUs by predicted memory (resources.pack).
        eval: The task metrics and when to measure them (spec `eval:`); None without any.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSpec
    model_path: str
    base_config: dict[str, Any] | None = None
    data: DataSpec
    train: TrainSpec
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    pack: bool = False
    eval: EvalJob | None = None
