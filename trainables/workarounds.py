"""Every workaround for third-party behaviour, with the version it applies to and the test that guards it.

Each is a small function the training setup (trainables/training_setup.py) or the trainable
(trainables/qlora.py) calls by name, so a reader finds the quirk here, not buried in the code that
needs it. When a library changes, the guarding test fails; check the version column, then remove
or adapt the workaround.

| workaround | library, version | what it works around | where | guarded by |
|---|---|---|---|---|
| `keep_4bit_layers_trainable_on_cpu` | bitsandbytes 0.50 (CPU backend, >= 0.48) | `Linear4bit` repacks its weight into an AVX512-BF16 inference layout at the first eval-mode forward without grad; later training forwards use `gemv_4bit`, which has no autograd, so gradients through frozen 4-bit layers are zero | here; called by `TrainingSetup.load_model` on CPU | tests/test_trainable.py::test_qv_adapters_keep_learning_after_the_first_evaluation |
| `keep_adapters_in_compute_dtype` | trl 1.16 (SFTTrainer) | SFTTrainer casts a quantized model's trainable adapters (not DoRA's magnitude vector) to bf16, the QLoRA paper's setting for bf16 compute; under fp32 compute (CPU) that only loses precision | here; called by trainables/qlora.py after building the trainer | tests/test_trainable.py::test_adapters_stay_in_the_compute_dtype_and_checkpoints_skip_the_model_card |
| `skip_model_card` | peft 0.21 (`PeftModel.save_pretrained`) | peft renders a model card (a Jinja template compiled afresh) into every checkpoint: half a checkpoint's time on a small adapter (benchmarks/trainable_throughput.py); `export` writes its own README | here; called by trainables/qlora.py | tests/test_trainable.py::test_adapters_stay_in_the_compute_dtype_and_checkpoints_skip_the_model_card |
| `defer_sigterm_out_of_callbacks` | ray 2.60 (worker `sigterm_handler`), CPython (`sys.unraisablehook`) | a Ray worker's SIGTERM handler raises SystemExit; when the signal lands while the main thread runs a weakref callback or `__del__` (a trial's teardown frees the model), Python prints "Exception ignored" with a traceback and the worker ignores the SIGTERM, so a stopped trial's worker lives on until SIGKILL and its traceback ends the sweep's output | here; called by trainables/qlora.py `train_qlora` in each trial worker | tests/test_watchdog.py::test_a_sigterm_inside_a_weakref_callback_still_ends_the_worker_quietly |
| `remove_printer_callback` | transformers 5.x (Trainer) | with tqdm disabled the Trainer adds `PrinterCallback`, which prints every log line of every trial into the sweep's console | here; called by trainables/qlora.py and analysis/export.py | tests/test_trainable.py::test_adapters_stay_in_the_compute_dtype_and_checkpoints_skip_the_model_card (nothing printed) |
| `WORKER_ENV` (`TUNE_FUNCTION_THREAD_TIMEOUT_S=120`) | ray 2.60 (Tune function trainables, `reuse_actors`) | Tune waits 2 s for a stopped trial's thread before reusing its worker; a slower teardown fails the reuse and in Ray 2.60 stalls the sweep with no trial running | sweeps/driver.py (`WORKER_ENV`, needs ray) | tests/test_faults.py::test_a_slow_trial_teardown_does_not_stall_the_sweep, ::test_with_rays_default_wait_the_same_sweep_fails_to_reuse_and_stalls |
| `_keep_secrets_out_of_trial_env` (`class_cache.ENV_VARS_TO_PROPAGATE`) | ray 2.60 (ray/tune/execution/class_cache.py) | Tune copies the driver's AWS keys into every trial actor's runtime_env env_vars, which Ray logs in plain text; the worker setup hook delivers them instead | sweeps/driver.py (`_keep_secrets_out_of_trial_env`, needs ray) | tests/test_security.py |

The Ray workarounds stay in sweeps/driver.py because they need ray and the driver's environment;
they are listed here so that this table is the one place to look.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

# defer_sigterm_out_of_callbacks: how long after a dropped SIGTERM it is sent again.
SIGTERM_AGAIN_S = 0.05


def keep_4bit_layers_trainable_on_cpu(model: Any) -> int:
    """Stop bitsandbytes' CPU inference repacking, which silently breaks backward passes.

    bitsandbytes 0.50 `Linear4bit.forward` repacks its weight into an AVX512-BF16 inference
    layout the first time it runs in eval mode without grad (i.e. during evaluation). Later
    training forwards then use `gemv_4bit`, which has no autograd, so every gradient that must
    flow *through* a frozen 4-bit layer becomes zero: q/v adapters stop learning after the first
    evaluation. Turning the flag off keeps the autograd path. Returns the layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def keep_adapters_in_compute_dtype(model: Any) -> int:
    """Undo trl's bf16 cast of a quantized model's adapters when the compute dtype is fp32 (CPU).

    trl's SFTTrainer casts every trainable parameter of a quantized model (but DoRA's magnitude
    vectors) to bf16, the QLoRA paper's setting for bf16 compute. With fp32 compute that only loses
    precision, so the adapters go back to fp32. Call only under fp32 compute. Returns the tensors cast.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != _float32():
            param.data = param.data.float()
            cast += 1
    return cast


def skip_model_card(model: Any) -> None:
    """Stop peft writing its generic model card (README.md) into every checkpoint.

    Rendering it compiles a Jinja template each time: half of a small adapter's checkpoint time.
    `qlora-sweep export` writes its own README.
    """
    model.create_or_update_model_card = lambda output_dir: None


def remove_printer_callback(trainer: Any) -> None:
    """Stop the Trainer printing every log line (it adds PrinterCallback when tqdm is off)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def defer_sigterm_out_of_callbacks() -> None:
    """In a Ray worker, act on a SIGTERM that arrived inside a weakref callback or `__del__` instead of dropping it.

    Ray 2.60's worker turns SIGTERM into SystemExit (marked `ray_terminate_msg`) raised in the main
    thread wherever it is. Raised inside a weakref callback or a finalizer, the exception is
    "unraisable": CPython prints it with its traceback and carries on, so the worker the raylet asked
    to stop keeps running until SIGKILL. This hook sends the signal again instead, so that Ray's handler
    runs once the callback has returned (a callback that runs on gets it again) and the worker exits
    as Ray meant it to. Every other
    unraisable exception goes to the previous hook. Calling it again in the same process changes nothing.
    """
    previous = sys.unraisablehook
    if getattr(previous, "defers_sigterm", False):
        return

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, SystemExit) and hasattr(unraisable.exc_value, "ray_terminate_msg"):
            # From another thread, a moment later: sent from here, the handler would run at once,
            # still inside the callback.
            again = threading.Timer(SIGTERM_AGAIN_S, os.kill, (os.getpid(), signal.SIGTERM))
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    hook.defers_sigterm = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _float32() -> Any:
    import torch

    return torch.float32
