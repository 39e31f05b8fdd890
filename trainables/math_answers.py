"""math_verify scoring in a child process, where math-verify's own timeouts work.

math-verify bounds each `parse` and `verify` with `signal.alarm`, which only works in a process's
main thread; a trial runs in a Tune worker thread, where the package asks its callers to turn the
timeouts off "and handle the timeouting yourself". Without them one pathological generation (sympy
simplifying a huge expression) can hold the trial for ever. So the answers are scored in a child
Python process, in its main thread, with math-verify's timeouts on: an expression past them counts
as not verified, as math-verify itself decides. The child lives as long as its `MathVerifier`
(one per trial's evaluator) and ends when it is closed or collected, or when this process ends
(its stdin closes). A child that answers nothing within `deadline_s` is killed and the evaluation
fails with a message that says so.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
import weakref

# math-verify's own defaults: 3 s to parse an expression, 5 s to compare two.
PARSING_TIMEOUT_S = 3
VERIFY_TIMEOUT_S = 5
# Starting the child (importing math-verify and sympy) on a busy machine.
START_S = 120.0

_CHILD = r"""
import json, sys
from math_verify import parse, verify

parsing_timeout, verify_timeout = int(sys.argv[1]), int(sys.argv[2])

def hit(want, got):
    try:
        return bool(verify(parse(want, parsing_timeout=parsing_timeout), parse(got, parsing_timeout=parsing_timeout),
                           timeout_seconds=verify_timeout))
    except Exception:
        return False

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    pairs = json.loads(line)
    print(json.dumps({"hits": [hit(want, got) for want, got in pairs]}), flush=True)
"""


class MathVerifyError(RuntimeError):
    """The child scoring math answers died or stopped answering."""


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


class MathVerifier:
    """Scores (reference answer, generated answer) pairs with math-verify in a child process."""

    def __init__(self, parsing_timeout_s: int = PARSING_TIMEOUT_S, verify_timeout_s: int = VERIFY_TIMEOUT_S) -> None:
        self.parsing_timeout_s = parsing_timeout_s
        self.verify_timeout_s = verify_timeout_s
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    def deadline_s(self, pairs: int) -> float:
        """The longest a batch of `pairs` may take: every timeout of math-verify's own, with room to spare."""
        return 30.0 + 2 * pairs * (2 * self.parsing_timeout_s + self.verify_timeout_s)

    def hits(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Whether each generated answer verifies against its reference."""
        if not pairs:
            return []
        proc = self._child()
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(pairs) + "\n")
            proc.stdin.flush()
        except OSError:
            pass  # the child is gone; reading says so
        reply = self._read(proc, self.deadline_s(len(pairs)), f"scoring {len(pairs)} answers")
        return [bool(h) for h in reply["hits"]]

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._finalizer = None

    def _child(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self.close()
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(self.parsing_timeout_s), str(self.verify_timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self._proc, self._finalizer = proc, weakref.finalize(self, _end, proc)
        self._read(proc, START_S, "starting")
        return proc

    def _read(self, proc: subprocess.Popen, deadline_s: float, doing: str) -> dict:
        assert proc.stdout is not None
        end = time.monotonic() + deadline_s
        while True:
            left = end - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
            line = proc.stdout.readline() if ready else ""
            if line:
                return json.loads(line)
            if ready or left <= 0 or proc.poll() is not None:
                self.close()
                what = f"exited with status {proc.returncode}" if proc.returncode is not None and ready else (
                    f"gave no answer within {deadline_s:.0f} s"
                )
                raise MathVerifyError(
                    f"eval.metrics math_verify: the math-verify process {what} while {doing}; "
                    "check that math-verify is installed on every worker (pip install math-verify)"
                )
