"""The console's counters: right after a retry and after a resume.

Pure logic: Tune's trial objects are stood in for by plain records holding the attributes the callback
reads (trial_id, status, config, last_result, num_failures, metric_analysis), and the callback's
hooks are called in the order Tune calls them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from sweeps.progress import SweepProgress


def trial(trial_id: str, status: str = "PENDING", rounds: int = 0, loss: float | None = None, **extra: Any) -> Any:
    last = {"training_iteration": rounds, "eval_loss": loss} if rounds else {}
    analysis = {"eval_loss": {"min": loss}} if loss is not None else {}
    return SimpleNamespace(
        trial_id=trial_id, status=status, config={"r": 8}, last_result=last, num_failures=0,
        metric_analysis=analysis, **extra,
    )


def progress(lines: list[str]) -> SweepProgress:
    return SweepProgress(num_samples=3, max_rounds=4, metric="eval_loss", out=lines.append, status_every_s=0)


def test_a_retried_trial_keeps_its_number_and_is_not_counted_twice() -> None:
    lines: list[str] = []
    view = progress(lines)
    a, b = trial("a"), trial("b")
    trials = [a, b]
    for each in trials:
        each.status = "RUNNING"
        view.on_trial_start(0, trials, each)
    a.num_failures = 1
    view.on_trial_recover(0, trials, a)
    view.on_trial_start(0, trials, a)  # Tune starts the same trial again
    c = trial("c", status="RUNNING")
    trials.append(c)
    view.on_trial_start(0, trials, c)
    assert lines[0].startswith("[trial 1/3] a started")
    assert lines[1].startswith("[trial 2/3] b started")
    assert "Tune retries it" in lines[2]
    assert lines[3] == "[trial 1/3] a restarted (attempt 2)"
    assert lines[4].startswith("[trial 3/3] c started")  # not 4/3
    for each in trials:
        each.status, each.last_result = "TERMINATED", {"training_iteration": 4, "eval_loss": 1.0}
        view.on_trial_complete(0, trials, each)
    assert view.status_line(trials).startswith("[status] 3/3 done (0 stopped early, 0 failed), 0 running")


def test_a_resumed_sweep_counts_the_trials_that_ran_before_it() -> None:
    lines: list[str] = []
    view = progress(lines)  # a callback unpickled from tuner.pkl has seen nothing
    done = trial("a", status="TERMINATED", rounds=4, loss=0.5)
    stopped = trial("b", status="TERMINATED", rounds=1, loss=0.9)
    unfinished = trial("c", status="PENDING", rounds=2, loss=0.7)
    trials = [done, stopped, unfinished]
    unfinished.status = "RUNNING"
    view.on_trial_start(0, trials, unfinished)
    assert lines[0].startswith("[trial 3/3] c resumed after round 2")
    assert view.status_line(trials) == (
        "[status] 2/3 done (1 stopped early, 0 failed), 1 running; best eval_loss 0.5000 (a)"
    )
    unfinished.status, unfinished.last_result = "TERMINATED", {"training_iteration": 4, "eval_loss": 0.4}
    view.on_trial_result(0, trials, unfinished, unfinished.last_result)
    view.on_trial_complete(0, trials, unfinished)
    assert view.status_line(trials) == (
        "[status] 3/3 done (1 stopped early, 0 failed), 0 running; best eval_loss 0.4000 (c)"
    )


def test_a_trial_that_failed_before_the_resume_counts_as_failed() -> None:
    lines: list[str] = []
    view = progress(lines)
    trials = [trial("a", status="ERROR", rounds=1, loss=2.0), trial("b", status="RUNNING")]
    view.on_trial_start(0, trials, trials[1])
    assert lines[0].startswith("[trial 2/3] b started")
    assert view.status_line(trials).startswith("[status] 1/3 done (0 stopped early, 1 failed), 1 running")
