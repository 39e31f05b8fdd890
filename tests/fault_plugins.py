"""Fault injectors for tests, plugged into trials through the generic callback seam (train.callbacks).

Production code never names these. A test writes e.g. `train: {callbacks: ["tests.fault_plugins:oom_above"]}`
into its spec and sets the variable below in its own environment *before Ray starts*: local Ray
workers inherit the environment of the process that starts Ray (the test process, or the CLI it
runs), and they import `tests.fault_plugins` from the driver's working directory, which Ray puts
on every local worker's sys.path (run the tests from the repository root).

    oom_above       raise torch.OutOfMemoryError at the first training step of an attempt whose
                    predicted memory is above $QLORA_SWEEP_TEST_OOM_ABOVE_MIB (MiB)
    slow_teardown   sleep $QLORA_SWEEP_TEST_SLOW_TEARDOWN_S seconds in the attempt's teardown,
                    after its last report, while the trial would be freeing memory
    oom_in_forward  raise RuntimeError($QLORA_SWEEP_TEST_OOM_MESSAGE) from inside the model's forward
                    pass in the first training step of the first attempt: the allocation failures
                    that are not torch.OutOfMemoryError (cuBLAS, cuDNN, the CPU allocator)
    fail_one_trial  raise RuntimeError at the first training step of every attempt of one trial, the
                    first to start (it claims the file $QLORA_SWEEP_TEST_FAIL_ONE with its learning
                    rate): an ordinary failure (a bug, a bad node), whatever the sampler proposes
    hang_or_slow    the first trial to start (claim file hang.claim in $QLORA_SWEEP_TEST_HANG_DIR)
                    hangs for good at the start of training step HANG_AT_STEP, in the trainer's own
                    thread, after writing hang.json (its pid, the time); the second (slow.claim)
                    sleeps $QLORA_SWEEP_TEST_SLOW_STEP_S seconds at the end of every training step
                    (slow but alive); the others train normally
    slow_steps      every trial sleeps $QLORA_SWEEP_TEST_SLOW_STEP_S seconds at the end of every
                    training step (time for a test to act between two checkpoints)
    crash_once      end the trial's worker process at once (os._exit, no cleanup: what a killed worker
                    or a lost node looks like to Tune) at the start of training step N, the first time
                    any attempt gets there; $QLORA_SWEEP_TEST_CRASH_ONCE is "CLAIM_FILE:N"
"""

from __future__ import annotations

import os
import time
from typing import Any

OOM_ABOVE_ENV = "QLORA_SWEEP_TEST_OOM_ABOVE_MIB"
SLOW_TEARDOWN_ENV = "QLORA_SWEEP_TEST_SLOW_TEARDOWN_S"
OOM_MESSAGE_ENV = "QLORA_SWEEP_TEST_OOM_MESSAGE"
OOM_ABOVE = "tests.fault_plugins:oom_above"
SLOW_TEARDOWN = "tests.fault_plugins:slow_teardown"
OOM_IN_FORWARD = "tests.fault_plugins:oom_in_forward"
FAIL_ONE_ENV = "QLORA_SWEEP_TEST_FAIL_ONE"
FAIL_ONE_TRIAL = "tests.fault_plugins:fail_one_trial"
HANG_DIR_ENV = "QLORA_SWEEP_TEST_HANG_DIR"
SLOW_STEP_ENV = "QLORA_SWEEP_TEST_SLOW_STEP_S"
HANG_OR_SLOW = "tests.fault_plugins:hang_or_slow"
HANG_AT_STEP = 2
SLOW_STEPS = "tests.fault_plugins:slow_steps"
CRASH_ONCE_ENV = "QLORA_SWEEP_TEST_CRASH_ONCE"
CRASH_ONCE = "tests.fault_plugins:crash_once"


def _number(name: str, unit: str) -> float | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of {unit}; unset it or write e.g. 12.5") from None


def oom_above(context: Any) -> Any:
    """A callback that runs the attempt out of memory when its prediction is above the threshold, else None.

    Raises:
        ValueError: If the variable is set but is not a number of MiB.
    """
    threshold = _number(OOM_ABOVE_ENV, "MiB")
    predicted = context.predicted_memory_mib
    if threshold is None or predicted is None or predicted <= threshold:
        return None
    from transformers import TrainerCallback

    message = f"injected by {OOM_ABOVE_ENV}={os.environ[OOM_ABOVE_ENV]}: predicted {predicted:.1f} MiB is above it"

    class InjectedOutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            import torch

            raise torch.OutOfMemoryError(message)

    return InjectedOutOfMemory()


def slow_teardown(context: Any) -> Any:
    """A callback whose `on_teardown` sleeps $QLORA_SWEEP_TEST_SLOW_TEARDOWN_S seconds, or None when unset.

    The trainable calls `on_teardown` after the attempt has freed its memory, also when Tune stopped
    the trial at its last report (Tune's function trainables end the trial's thread there with
    SystemExit, so TrainerCallback.on_train_end would never run). It stands in for a slow teardown
    (freeing a large model, a busy machine), which decides whether Tune can reuse the worker in time.
    """
    seconds = _number(SLOW_TEARDOWN_ENV, "seconds")
    if not seconds:
        return None
    from transformers import TrainerCallback

    class SlowTeardown(TrainerCallback):
        def on_teardown(self, context: Any) -> None:
            time.sleep(seconds)

    return SlowTeardown()


def oom_in_forward(context: Any) -> Any:
    """A callback that makes the first attempt's first training forward raise RuntimeError with the
    message in $QLORA_SWEEP_TEST_OOM_MESSAGE (from a forward hook on the model's first decoder layer,
    so the step is under way: activations allocated, autograd recording), or None when unset."""
    message = os.environ.get(OOM_MESSAGE_ENV)
    if not message or context.attempt != 1:
        return None
    from transformers import TrainerCallback

    class RaiseInForward(TrainerCallback):
        def __init__(self) -> None:
            self.hook: Any = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if self.hook is not None or model is None:
                return
            layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))

            def raise_it(module: Any, inputs: Any, output: Any) -> None:
                raise RuntimeError(message)

            self.hook = layer.register_forward_hook(raise_it)

        def on_teardown(self, context: Any) -> None:
            if self.hook is not None:
                self.hook.remove()

    return RaiseInForward()


def fail_one_trial(context: Any) -> Any:
    """A callback that fails every attempt of the first trial to start, else None (see the module doc)."""
    claim = os.environ.get(FAIL_ONE_ENV)
    if not claim:
        return None
    mine = repr(context.trial.learning_rate)
    try:
        with open(claim, "x") as f:
            f.write(mine)
    except FileExistsError:
        with open(claim) as f:
            if f.read() != mine:
                return None
    from transformers import TrainerCallback

    class InjectedFailure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise RuntimeError(f"injected by {FAIL_ONE_ENV} (learning rate {mine})")

    return InjectedFailure()


def _claim(folder: str, role: str, mine: str) -> bool:
    """Whether `role` is this trial's: claimed now (first come), or claimed by it before (a later attempt)."""
    path = os.path.join(folder, f"{role}.claim")
    try:
        with open(path, "x") as f:
            f.write(mine)
        return True
    except FileExistsError:
        with open(path) as f:
            return f.read() == mine


def hang_or_slow(context: Any) -> Any:
    """A callback that hangs the first trial to start and slows the second (see the module doc), else None."""
    folder = os.environ.get(HANG_DIR_ENV)
    if not folder:
        return None
    mine = repr(context.trial.learning_rate)
    if _claim(folder, "hang", mine):
        role = "hang"
    elif _claim(folder, "slow", mine):
        role = "slow"
    else:
        return None
    slow_s = _number(SLOW_STEP_ENV, "seconds") or 0.0
    from transformers import TrainerCallback

    class HangOrSlow(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if role == "hang" and state.global_step == HANG_AT_STEP:
                import json

                with open(os.path.join(folder, "hang.json"), "w") as f:
                    json.dump({"pid": os.getpid(), "at": time.time(), "step": state.global_step}, f)
                while True:  # a wedged data loader, a deadlocked collective: no step ever ends
                    time.sleep(3600)

        def on_step_end(self, args, state, control, **kwargs):
            if role == "slow":
                time.sleep(slow_s)

    return HangOrSlow()


def slow_steps(context: Any) -> Any:
    """A callback that sleeps $QLORA_SWEEP_TEST_SLOW_STEP_S seconds after every training step, or None when unset."""
    seconds = _number(SLOW_STEP_ENV, "seconds")
    if not seconds:
        return None
    from transformers import TrainerCallback

    class SlowSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(seconds)

    return SlowSteps()
def crash_once(context: Any) -> Any:
    """A callback that ends this worker process at step N the first time an attempt reaches it (see the module doc)."""
    setting = os.environ.get(CRASH_ONCE_ENV)
    if not setting:
        return None
    claim, _, step = setting.rpartition(":")
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 != int(step):
                return
            try:
                with open(claim, "x") as f:
                    f.write(str(os.getpid()))
            except FileExistsError:
                return  # crashed once already: this is the retry
            os._exit(1)

    return Crash()
