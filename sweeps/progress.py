"""A compact live view of a sweep: one line per event, and a status line every so often.

Replaces Tune's verbose tables, which print every metric of every trial in boxes. The Ray
dashboard (and TensorBoard on the experiment folder) remain there for the full detail.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, Callable

from ray.tune import Callback

from core.numbers import is_finite_number
from core.status import TrialStatus
from trainables.params import KNOBS

# How a trial ended that counts as failed in the status line.
_FAILED = (TrialStatus.FAILED, TrialStatus.OOM, TrialStatus.DIVERGED, TrialStatus.TIMED_OUT)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if (value != 0 and abs(value) < 1e-2) else f"{value:g}"
    return str(value)


class SweepProgress(Callback):
    """Prints trial starts, evaluations, stops and errors, and a periodic summary.

    Args:
        num_samples: Trials the sweep will run, for "[3/12]" counters.
        max_rounds: Evaluation rounds in a full trial, to tell ASHA stops from completions.
        metric: The objective (lower is better).
        status_every_s: Seconds between status lines.
        out: Where lines go (print to stdout by default).
        config_keys: The trial-config keys a start line shows (the driver passes the knobs the
            space searches); default: every knob of the registry (trainables/params.py).
    """

    def __init__(
        self,
        num_samples: int,
        max_rounds: int,
        metric: str,
        status_every_s: float = 30.0,
        out: Callable[[str], None] | None = None,
        config_keys: Sequence[str] | None = None,
        mode: str = "min",
    ):
        self.mode = mode  # "max" for a higher-is-better metric (a task metric such as exact_match)
        self.num_samples = num_samples
        self.config_keys = tuple(config_keys) if config_keys is not None else tuple(k.name for k in KNOBS)
        self.max_rounds = max_rounds
        self.metric = metric
        self.status_every_s = status_every_s
        self.out = out or (lambda line: print(line, file=sys.stdout, flush=True))
        # Counters are derived from Tune's trial list, not from counting events: a retried trial starts
        # again, and a resumed sweep's callback (unpickled from tuner.pkl) has seen none of the trials
        # that ran before the resume.
        self.numbers: dict[str, int] = {}  # trial id -> its "[trial k/N]" number, in launch order
        self.best: tuple[float, str] | None = None
        self.last_status = time.time()
        self.ended: dict[str, str] = {}

    def _config(self, trial: Any) -> str:
        config = trial.config
        return " ".join(f"{k}={_fmt(config[k])}" for k in self.config_keys if k in config)

    def _catch_up(self, trials: list) -> None:
        """Count the trials that ran before this callback saw them (a resumed sweep), once."""
        for each in trials:
            if each.trial_id in self.numbers or each.status == "PENDING":
                continue
            self.numbers[each.trial_id] = len(self.numbers) + 1
            if each.status in ("TERMINATED", "ERROR"):
                self.ended.setdefault(each.trial_id, self._how_ended(each))
            self._note_best(each.trial_id, self._best_value(each))

    def _best_value(self, trial: Any) -> Any:
        analysis = getattr(trial, "metric_analysis", None) or {}
        value = analysis.get(self.metric, {}).get(self.mode)
        return value if value is not None else (trial.last_result or {}).get(self.metric)

    def _note_best(self, trial_id: str, value: Any) -> None:
        better = (lambda a, b: a > b) if getattr(self, "mode", "min") == "max" else (lambda a, b: a < b)
        if is_finite_number(value) and (self.best is None or better(value, self.best[0])):
            self.best = (value, trial_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._catch_up([t for t in trials if t is not trial])
        if trial.trial_id in self.numbers:  # a retry after an error, or a trial the resume continues
            again = f"attempt {trial.num_failures + 1}" if trial.num_failures else "resumed from its checkpoint"
            self.out(f"[trial {self.numbers[trial.trial_id]}/{self.num_samples}] {trial.trial_id} restarted ({again})")
            self.ended.pop(trial.trial_id, None)
            return
        self.numbers[trial.trial_id] = len(self.numbers) + 1
        number = self.numbers[trial.trial_id]
        rounds = (trial.last_result or {}).get("training_iteration")
        how = f"resumed after round {rounds}" if rounds else "started"  # a resume continues a trial it restored
        self.out(f"[trial {number}/{self.num_samples}] {trial.trial_id} {how}: {self._config(trial)}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.out(f"[trial {trial.trial_id}] failed (failure {trial.num_failures}); Tune retries it from its last checkpoint")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        self._note_best(trial.trial_id, value)
        best = f"best {self.best[0]:.4f} ({self.best[1]})" if self.best else "best n/a"
        memory = result.get("peak_memory_mib")
        kind = result.get("memory_kind", "")
        memory_text = f"  peak {memory:,.0f} MiB {kind}" if isinstance(memory, (int, float)) else ""
        self.out(
            f"  {trial.trial_id} round {result.get('training_iteration')}/{self.max_rounds} "
            f"step {result.get('step')}: {self.metric} {_fmt(value)}{memory_text}   [{best}]"
        )

    def _how_ended(self, trial: Any) -> str:
        if trial.status == "ERROR":
            return str(TrialStatus.FAILED)
        last = trial.last_result or {}
        rounds = last.get("training_iteration", 0)
        status = last.get("trial_status")
        if status:
            return str(status)
        if rounds >= self.max_rounds:
            return str(TrialStatus.COMPLETED)
        return f"stopped early by ASHA after round {rounds}"

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        how = self._how_ended(trial)
        self.ended[trial.trial_id] = how
        self.out(f"[trial {trial.trial_id}] {how}: {self.metric} {_fmt(last.get(self.metric))} at step {last.get('step')}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = str(TrialStatus.FAILED)
        error = getattr(trial, "error_file", None) or getattr(trial, "error_filename", None) or ""
        self.out(f"[trial {trial.trial_id}] FAILED; see {error or 'its error.txt in the experiment folder'}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        if now - self.last_status < self.status_every_s:
            return
        self.last_status = now
        self.out(self.status_line(trials))

    def status_line(self, trials: list) -> str:
        self._catch_up(trials)
        running = sum(1 for t in trials if t.status == "RUNNING")
        done = len(self.ended)
        early = sum(1 for how in self.ended.values() if how.startswith("stopped early"))
        failed = sum(1 for how in self.ended.values() if how in _FAILED)
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else "no evaluation yet"
        return (
            f"[status] {done}/{self.num_samples} done ({early} stopped early, {failed} failed), "
            f"{running} running; {best}"
        )
