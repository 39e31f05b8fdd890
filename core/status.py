"""The statuses a trial can end up with, in the order the report lists them."""

from __future__ import annotations

from enum import Enum


class TrialStatus(str, Enum):
    """A trial's status in trials.csv and the report.

    A `str` enum: members compare equal to their values, so tables and JSON keep plain strings.
    """

    COMPLETED = "completed"  # trained to the full budget
    EARLY_STOPPED = "early_stopped"  # stopped by ASHA
    RUNNING = "running"
    PENDING = "pending"
    PAUSED = "paused"
    FAILED = "failed"  # raised (after train.max_failures retries) or lost its node for good
    OOM = "oom"  # ran out of memory (reported by the trial itself)
    INFEASIBLE = "infeasible"  # rejected before launch by memory admission
    DIVERGED = "diverged"  # NaN/inf loss (reported by the trial itself)
    # Past train.trial_timeout_s, or no progress for train.stall_timeout_s (reported by the trial's
    # watchdog, trainables/watchdog.py): ended and its resources freed; never retried.
    TIMED_OUT = "timed_out"

    def __str__(self) -> str:
        return self.value

    # Enum hashes by member name; hash by value so a member and its string are one dict key,
    # one set element and one pandas `isin` match.
    def __hash__(self) -> int:
        return hash(self.value)


# Statuses a trial reports itself in its last result (metric trial_status); the others are inferred.
REPORTED_STATUSES: tuple[TrialStatus, ...] = (
    TrialStatus.OOM, TrialStatus.DIVERGED, TrialStatus.INFEASIBLE, TrialStatus.TIMED_OUT,
)
# Trials whose quality figures are real and can be ranked.
RANKABLE_STATUSES: tuple[TrialStatus, ...] = (
    TrialStatus.COMPLETED, TrialStatus.EARLY_STOPPED, TrialStatus.RUNNING, TrialStatus.PAUSED,
)
ALL_STATUSES: tuple[TrialStatus, ...] = tuple(TrialStatus)
# Trials that ended for a reason outside the search: they make `run` and `resume` exit 1. An OOM, a
# diverged or an infeasible trial is an answer of the search about its configuration, not a failure.
# A timed-out trial is a failure: a hung download, a deadlocked collective or a slow node says
# nothing about its configuration, and the user must notice it (the search moved on without it).
FAILURE_STATUSES: tuple[TrialStatus, ...] = (TrialStatus.FAILED, TrialStatus.TIMED_OUT)

# Tune's trial status -> ours, when the trial's own reports do not say more.
FROM_TUNE: dict[str, TrialStatus] = {
    "PENDING": TrialStatus.PENDING,
    "RUNNING": TrialStatus.RUNNING,
    "PAUSED": TrialStatus.PAUSED,
    "ERROR": TrialStatus.FAILED,
}
