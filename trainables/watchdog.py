"""The trial watchdog: a trial past train.trial_timeout_s, or stalled for train.stall_timeout_s, ends as timed_out.

Ray Tune has no per-trial timeout (ray-project/ray#47475), so a hung trial (a stuck download, a
deadlocked collective, a wedged data loader) would hold its GPU until someone kills the sweep.
`train_qlora` (trainables/qlora.py) runs each trial attempt under a `TrialWatchdog` when either
limit is set; the clock starts with the attempt (model loading included).

* **Progress.** The attempt's start, its data being ready (its callbacks are built), the start of
  training (the model loaded), every training step (and gradient-accumulation micro-step),
  evaluation batch (task evaluation batches included), log, save and report is a beat
  (`TrialWatchdog.callback`, a TrainerCallback, and `TrialWatchdog.report`).
  The stall clock does not run while the trial is inside a report (Tune may hold it there).
* **Slow but alive (trial_timeout_s): cooperative.** At the end of the first step past the limit the
  callback sets `should_training_stop`; the Trainer finishes that step (and the evaluation and save it
  triggers), `run_trial` returns, and the trainable reports the terminal timed_out result itself.
* **Hung (stall_timeout_s, or trial_timeout_s not honoured within GRACE_S).** A report in progress
  past trial_timeout_s (Tune uploading a checkpoint) is let finish first, up to REPORT_WAIT_S. The
  watchdog thread reports the terminal result from its own thread, marked `done`. This rests on Ray 2.60's function
  trainables (ray/train/_internal/session.py): the session is one object per worker process, and
  `report` only queues the result for the actor's main thread, which hands it to the driver whatever
  thread queued it. `done` makes Tune stop the trial as TERMINATED (Trial.should_stop): not an error,
  so train.max_failures never retries it; Tune's stop (FunctionTrainable.cleanup -> session.finish)
  releases the report, and the resources Tune booked for the trial are freed when that stop resolves,
  so the next trial can start. A hung thread cannot be stopped from the outside, and it holds the
  model and its activations, so once Tune has taken the result the watchdog ends the worker process
  (`os._exit`), which frees its memory, GPU memory included. The driver runs trials without actor
  reuse when a watchdog is set (sweeps/driver.py): no other trial is ever handed this worker, and
  Tune never waits on a hung thread to reuse it.

Every terminal timed_out report carries `trial_status: timed_out`, `timeout_reason` (`trial_timeout`
or `stall`) and `timeout_message`, with NaN quality (as an OOM's), and the figures of the last report.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

from core.status import TrialStatus


TRIAL_TIMEOUT = "trial_timeout"
STALL = "stall"
# After trial_timeout_s, how long the cooperative stop (at the next step end) may take before the
# watchdog ends the trial itself, as it would a stalled one.
GRACE_S = 30.0
# After trial_timeout_s, a report in progress (Tune copying a checkpoint to storage, which for a large
# adapter on cloud storage takes minutes) is let finish, up to this long past the limit: ending the
# process mid-upload would lose the round and leave a partial checkpoint behind. The grace then
# counts from the report's return.
REPORT_WAIT_S = 600.0
# After the watchdog's terminal report: how long to wait for Tune to take it (its stop releases the
# report) before ending the process anyway, and how long to let the stop task finish after it.
DELIVERY_WAIT_S = 60.0
SETTLE_S = 1.0
# The exit status of a worker the watchdog ended.
EXIT_STATUS = 3


def _exit_process() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(EXIT_STATUS)  # no cleanup: a hung thread may hold locks that any cleanup would wait for


class TrialWatchdog:
    """Watches one trial attempt in its worker process (see the module doc).

    Args:
        trial_timeout_s: Wall-clock limit from the watchdog's creation (the trial's start), or None.
        stall_timeout_s: Longest time without a beat, or None.
        report: The trainable's `report(metrics, checkpoint_dir)` (tune.report underneath).
        exit_process: Ends the worker process after the hard path's report (tests pass their own).
        grace_s: See GRACE_S.
    """

    def __init__(
        self,
        trial_timeout_s: float | None,
        stall_timeout_s: float | None,
        report: Callable[..., None],
        *,
        exit_process: Callable[[], None] = _exit_process,
        grace_s: float = GRACE_S,
    ) -> None:
        self.trial_timeout_s = trial_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._report = report
        self._exit_process = exit_process
        self.grace_s = grace_s
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._lock = threading.Lock()
        self._last_beat = self.started
        self._in_report = 0
        self._report_ended = self.started  # when the last report returned (monotonic)
        self.step = 0
        self.last_metrics: dict[str, Any] = {}
        # (reason, message) once a limit was passed; set by the callback (cooperative) or the thread (hard).
        self.expired: tuple[str, str] | None = None
        self.fired = threading.Event()  # the hard path took over: the trial's own reports are held
        self._closed = threading.Event()
        limits = [t for t in (trial_timeout_s, stall_timeout_s) if t is not None]
        self._poll_s = min(1.0, max(0.05, min(limits) / 20)) if limits else 1.0
        self._thread: threading.Thread | None = None

    @classmethod
    def for_train(cls, train: Any, report: Callable[..., None], **kwargs: Any) -> TrialWatchdog | None:
        """The watchdog a trial of `train` (a TrainSpec) runs under, None when neither limit is set."""
        if train.trial_timeout_s is None and train.stall_timeout_s is None:
            return None
        return cls(train.trial_timeout_s, train.stall_timeout_s, report, **kwargs)

    # --- progress ---------------------------------------------------------------------------------

    def beat(self, step: int | None = None) -> None:
        with self._lock:
            self._last_beat = time.monotonic()
            if step is not None:
                self.step = int(step)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """The report the trial uses: a beat, and the stall clock paused while Tune holds the trial in it."""
        if self.fired.is_set():
            # The watchdog already reported the trial's end; nothing may follow it. The process is
            # about to end; `close` releases this only outside Tune (tests).
            self._closed.wait()
            return
        with self._lock:
            self.last_metrics = dict(metrics)
            self._in_report += 1
            self._last_beat = time.monotonic()
        try:
            self._report(metrics, checkpoint_dir)
        finally:
            with self._lock:
                self._in_report -= 1
                self._last_beat = self._report_ended = time.monotonic()

    def due(self, now: float | None = None) -> tuple[str, str] | None:
        """The limit passed at `now`, with what was seen, or None."""
        now = time.monotonic() if now is None else now
        with self._lock:
            elapsed, quiet, in_report, step = now - self.started, now - self._last_beat, self._in_report, self.step
        if self.trial_timeout_s is not None and elapsed >= self.trial_timeout_s:
            return TRIAL_TIMEOUT, f"ran {elapsed:.0f} s, past train.trial_timeout_s={self.trial_timeout_s:g} (at step {step})"
        if self.stall_timeout_s is not None and not in_report and quiet >= self.stall_timeout_s:
            return STALL, (
                f"no training step, evaluation batch or report for {quiet:.0f} s, past "
                f"train.stall_timeout_s={self.stall_timeout_s:g} (after step {step})"
            )
        return None

    def final_metrics(self, done: bool = True) -> dict[str, Any]:
        """The terminal timed_out report: the last report's figures, NaN quality, the reason.

        Args:
            done: Mark it `done`, so Tune stops the trial on it (the hard path). The cooperative path
                reports it from the trial's own thread and then returns, which ends the trial as well.
        """
        reason, message = self.expired or ("", "")
        last = {k: v for k, v in self.last_metrics.items() if k != "trial_status"}
        return {
            "started_at": round(self.started_wall, 3),
            **last,
            # Every result carries the objectives (Tune checks); NaN marks "no quality measured".
            "eval_loss": float("nan"),
            "perplexity": float("nan"),
            "trial_status": TrialStatus.TIMED_OUT.value,
            "timeout_reason": reason,
            "timeout_message": message,
            "step": max(self.step, int(last.get("step") or 0)),
            "elapsed_s": round(time.time() - self.started_wall, 3),
            # Tune stops the trial on it (TERMINATED, not an error: never retried).
            **({"done": True} if done else {}),
        }

    # --- the two paths --------------------------------------------------------------------------

    def callback(self, context: Any = None) -> Any:
        """A callback factory for run_trial: beats, and the cooperative stop past trial_timeout_s."""
        from transformers import TrainerCallback

        watchdog = self
        self.beat()  # called when the attempt builds its callbacks: the tokenizer and data are ready

        class WatchdogBeats(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                watchdog.beat(state.global_step)

            def on_step_begin(self, args, state, control, **kwargs):
                watchdog.beat(state.global_step)

            def on_substep_end(self, args, state, control, **kwargs):
                watchdog.beat()

            def on_step_end(self, args, state, control, **kwargs):
                watchdog.beat(state.global_step)
                due = watchdog.due()
                if due is not None and due[0] == TRIAL_TIMEOUT and state.global_step < state.max_steps:
                    watchdog.expired = watchdog.expired or due
                    control.should_training_stop = True  # this step's evaluation and save still run

            def on_prediction_step(self, args, state, control, **kwargs):
                watchdog.beat()

            def on_evaluate(self, args, state, control, **kwargs):
                watchdog.beat()

            def on_log(self, args, state, control, **kwargs):
                watchdog.beat()

            def on_save(self, args, state, control, **kwargs):
                watchdog.beat()

        return WatchdogBeats()

    def start(self) -> TrialWatchdog:
        self._thread = threading.Thread(target=self._watch, name="qlora-sweep-watchdog", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """The attempt is over (run_trial returned or raised): stop watching."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread() and not self.fired.is_set():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._closed.wait(self._poll_s):
            due = self.due()
            if due is None:
                continue
            if due[0] == TRIAL_TIMEOUT and not self._past_grace():
                continue  # the next step end stops the trial cooperatively
            if self._closed.is_set():
                return
            self._end_hung_trial(due)
            return

    def _past_grace(self, now: float | None = None) -> bool:
        """Past trial_timeout_s, has the cooperative stop had its chance? (See GRACE_S and REPORT_WAIT_S.)"""
        assert self.trial_timeout_s is not None
        now = time.monotonic() if now is None else now
        limit = self.started + self.trial_timeout_s
        with self._lock:
            in_report, report_ended = self._in_report, self._report_ended
        if in_report:
            return now >= limit + REPORT_WAIT_S
        return now >= max(limit, report_ended) + self.grace_s

    def _end_hung_trial(self, due: tuple[str, str]) -> None:
        """Report timed_out from this thread, let Tune take it, then end the process (see the module doc)."""
        self.expired = due
        self.fired.set()
        result = self.final_metrics()
        taken = threading.Event()

        def deliver() -> None:
            try:
                self._report(result, None)
            except BaseException:  # SystemExit: Tune stopped the trial after taking the result
                pass
            finally:
                taken.set()

        print(f"[watchdog] trial timed out ({due[0]}): {due[1]}; reporting it and ending worker process "
              f"{os.getpid()}", file=sys.stderr, flush=True)
        threading.Thread(target=deliver, name="qlora-sweep-watchdog-report", daemon=True).start()
        if taken.wait(DELIVERY_WAIT_S):
            time.sleep(SETTLE_S)
        self._exit_process()
