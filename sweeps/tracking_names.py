"""The names the trackers' runs carry (tags, metric groups) and a trial's end status, shared by
sweeps/tracking.py and sweeps/tracking_callbacks.py."""

from __future__ import annotations

from typing import Any

from trainables.metrics import REPORTED_METRICS

# Tags on the MLflow runs: which sweep a run belongs to, what it is, and how a trial ended.
EXPERIMENT_TAG = "qlora_sweep_experiment"
ROLE_TAG = "qlora_sweep_role"  # "sweep" (the parent) or "trial"
TRIAL_TAG = "trial_id"
STATUS_TAG = "status"
# Numeric metrics go to the trackers' metric histories; the descriptive string ones (memory_kind,
# trial_status, ...) become tags (MLflow) or config entries (W&B).
NUMERIC_METRICS = tuple(c.name for c in REPORTED_METRICS if c.dtype in ("float64", "Int64"))
TEXT_METRICS = tuple(c.name for c in REPORTED_METRICS if c.dtype == "string")
ROUND_KEYS = ("training_iteration", "time_total_s")
MAX_TAG_CHARS = 500


def trial_status(result: dict[str, Any] | None, failed: bool, raw_spec: dict[str, Any]) -> str:
    """How a trial ended, as trials.csv will say (analysis/results.py decides; core/status.py names)."""
    from analysis.results import _status
    from analysis.saved_spec import SavedSpec

    return _status("ERROR" if failed else "TERMINATED", dict(result or {}), None, SavedSpec.from_raw(raw_spec)).value
