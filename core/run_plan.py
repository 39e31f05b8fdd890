"""run_plan.json: what preflight resolved for one sweep, saved in the experiment (versioned).

The driver writes it once, before Ray starts (sweeps/plan.py builds it); analysis reads it back
through `load_run_plan`, which is lenient: every field has a default and unknown keys are kept
out of the way, so experiments written by older (no file at all) or newer versions still open.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from core import experiment_folder, storage

# Bump when a field changes meaning; readers accept every version up to this one.
PLAN_FORMAT_VERSION = 1


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())


class Provenance(_Lenient):
    """What produced an experiment: package versions, the project's commit, Python, the machine."""

    qlora_sweep: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    python: str | None = None
    platform: str | None = None
    packages: dict[str, str | None] = {}
    gpus: list[str] = []
    hostname: str | None = None
    created_at: str | None = None


class ModelSummary(_Lenient):
    """The base model as preflight read it."""

    path: str | None = None  # as the spec names it
    resolved_path: str | None = None  # what trials load
    model_type: str | None = None
    revision: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    parameters: int | None = None


class MemorySummary(_Lenient):
    """The memory plan: GPU size admission uses, and whether the estimator models this model."""

    gpu_gib: float | None = None
    gpu_source: str | None = None
    predictable: bool | None = None
    not_modelled: list[str] = []


class RunPlan(_Lenient):
    """One sweep as the driver resolved it.

    Attributes:
        format_version: PLAN_FORMAT_VERSION of the writer.
        experiment_name, experiment_dir, storage_path: Where results go (secrets redacted).
        study_url, study_name: The Optuna study (redacted URL).
        model: The base model summary.
        memory: The memory plan's summary.
        training_setup: The resolved training setup per device kind ({"cuda": {...}, "cpu": {...}}).
        provenance: Versions and hardware.
        overrides: The `--set KEY=VALUE` overrides the spec was run with, as given (secrets redacted).
    """

    format_version: int = 0
    experiment_name: str | None = None
    experiment_dir: str | None = None
    storage_path: str | None = None
    study_url: str | None = None
    study_name: str | None = None
    model: ModelSummary = ModelSummary()
    memory: MemorySummary = MemorySummary()
    training_setup: dict[str, dict[str, Any]] = {}
    provenance: Provenance = Provenance()
    overrides: list[str] = []


def write_run_plan(experiment_dir: str, plan: RunPlan) -> None:
    storage.write_text(
        experiment_folder.file(experiment_dir, experiment_folder.PLAN_FILE), plan.model_dump_json(indent=2)
    )


def load_run_plan(experiment_dir: str, notes: list[str] | None = None) -> RunPlan:
    """The experiment's run plan; an empty one (format_version 0) if it has none or it is unreadable."""
    location = experiment_folder.file(experiment_dir, experiment_folder.PLAN_FILE)
    if not storage.exists(location):
        return RunPlan()
    try:
        return RunPlan.model_validate(json.loads(storage.read_text(location)))
    except (json.JSONDecodeError, ValidationError, OSError) as exc:
        if notes is not None:
            notes.append(f"{experiment_folder.PLAN_FILE} is unreadable ({type(exc).__name__}); provenance not shown")
        return RunPlan()
