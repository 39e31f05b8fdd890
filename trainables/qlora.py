"""The per-trial QLoRA function that Ray Tune runs.

One trial: load the base model quantized as the spec says (bitsandbytes NF4/FP4, double quant,
compute dtype), prepare it for k-bit training, attach LoRA adapters built from the trial's
config, train with trl's SFTTrainer, and report to Tune after every evaluation. Every training
decision comes from the trial's `TrainingSetup` (trainables/training_setup.py), resolved once per
trial. The same code runs on CUDA and on CPU (bitsandbytes >= 0.48 has a CPU path); it picks CUDA
when the trial was given a GPU and CUDA is really there, and falls back to CPU otherwise.

Extra trainer callbacks come through one seam: `train.callbacks` names factories
("package.module:factory") that are called once per attempt with a `TrialContext` and return a
transformers TrainerCallback (or None). A callback may also define `on_teardown(context)`, which
runs after the attempt has freed its memory, however it ended (finished, out of memory, failed,
or stopped by Tune). Every metric a trial reports is assembled by `TrialReport`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from core.status import TrialStatus
from trainables.checkpoints import STATE_FILE, checkpoint_problem, checkpoint_step, older_checkpoints
from trainables.data import PreparedData, prepare_data, trained_as_prepared
from trainables.job import TrialJob
from trainables.memory_probe import (
    TENSOR_PEAK_EVAL_BATCHES,
    MemoryReading,
    PeakMemoryProbe,
    TensorPeakProbe,
    TensorPeakReading,
    free_memory,
)
from trainables.params import TrialConfig
from trainables.settings import CALLBACK_PATTERN, CheckpointInterval, ModelSpec
from trainables.task_metrics import TaskEvaluator, TaskSchedule
from trainables.tiny_models import is_builtin, materialize
from trainables.training_setup import TrainingSetup, load_tokenizer
from trainables.trial_memory import MemoryKnobs, estimate_for_trial, predicted_allocated_mib, predicted_mib
from trainables.watchdog import TrialWatchdog
from trainables.workarounds import (
    defer_sigterm_out_of_callbacks,
    keep_adapters_in_compute_dtype,
    remove_printer_callback,
    skip_model_card,
)

# STATE_FILE: written into each checkpoint next to the Trainer's own state (its home: trainables/checkpoints.py).


def pick_device(gpus_per_trial: float) -> str:
    """CUDA when the trial asked for a GPU and one is usable, else CPU.

    Ray sets CUDA_VISIBLE_DEVICES for a trial that requested GPUs even on a node that only
    declares them (tests, misconfigured nodes); torch then finds no device and we train on CPU.
    """
    import torch

    if gpus_per_trial > 0 and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def quiet_libraries() -> None:
    """Trials run side by side; per-step progress bars and warnings from each would drown the live view."""
    import logging
    import warnings

    # bitsandbytes warns at import on AVX512-BF16 CPUs that an optional kernels package is missing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- the callback seam ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialContext:
    """What a callback factory of train.callbacks is called with, once per training attempt.

    Attributes:
        trial: The trial's hyperparameters for this attempt (an OOM retry halves batch_size).
        job: The sweep's settings for every trial (trainables/job.py).
        setup: The resolved training setup.
        predicted_memory_mib: This attempt's predicted peak VRAM (on CPU, what a GPU would need);
            None when the estimator cannot model the model.
        attempt: 1 for the first attempt, 2 for an in-process OOM retry.
        grad_accum: Gradient accumulation steps of this attempt.
    """

    trial: Any
    job: TrialJob
    setup: TrainingSetup
    predicted_memory_mib: float | None
    attempt: int
    grad_accum: int

    @property
    def device(self) -> str:
        return self.setup.device


CallbackFactory = Callable[[TrialContext], Any]


def load_callback_factories(names: Sequence[str]) -> list[CallbackFactory]:
    """Import the factories that train.callbacks names ("package.module:factory").

    Raises:
        ValueError: Naming the entry that is malformed, cannot be imported, or is not callable.
    """
    factories = []
    for name in names:
        if not CALLBACK_PATTERN.match(name):
            raise ValueError(f"train.callbacks: {name!r} is not 'package.module:factory'")
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"train.callbacks: cannot import {name!r} ({exc}); the module must be importable on every worker"
            ) from exc
        if not callable(factory):
            raise ValueError(f"train.callbacks: {name!r} is not callable; name a factory taking a TrialContext")
        factories.append(factory)
    return factories


# --- the trial's report ---------------------------------------------------------------------------


@dataclass
class TrialReport:
    """Every metric a trial reports, assembled here and nowhere else (names: trainables/metrics.py).

    Facts are kept as they become known: for the whole trial (start time, GPU share, an OOM retry),
    for the loaded model (parameter counts, device, dtypes, data sizes) and for the attempt
    (micro-batch, gradient accumulation, predicted memory). `evaluation` and `out_of_memory` build
    the dicts that go to Tune.
    """

    started: float
    # Every key a task evaluation reports (trainables/task_metrics.py): NaN in reports without one.
    task_names: tuple[str, ...] = ()
    trial_facts: dict[str, Any] = field(default_factory=dict)
    model_facts: dict[str, Any] = field(default_factory=dict)
    attempt_facts: dict[str, Any] = field(default_factory=dict)

    def start_attempt(self, *, batch_size: int, grad_accum: int, predicted_memory_mib: float | None) -> None:
        self.attempt_facts = {
            "micro_batch_size": batch_size,
            "grad_accum": grad_accum,
            "predicted_memory_mib": predicted_memory_mib,
        }

    def note_oom_retry(self, note: str) -> None:
        self.trial_facts["oom_retry"] = note

    def tensor_peak(self, reading: TensorPeakReading, predicted_mib: float | None) -> None:
        """A CPU attempt's tensor peak (trainables/memory_probe.py) and the estimator's allocated bytes for it.

        Kept with the attempt, so every later report of the attempt (and an OOM's) carries it.
        """
        self.attempt_facts.update(reading.as_metrics())
        self.attempt_facts["predicted_tensor_peak_mib"] = predicted_mib

    def model_loaded(self, trainer: Any, setup: TrainingSetup, trial: Any, data: PreparedData) -> None:
        trainable, total = trainer.model.get_nb_trainable_parameters()
        self.model_facts = {
            "trainable_params": int(trainable),
            "total_params": int(total),
            "device": setup.device,
            "compute_dtype": setup.compute_dtype,
            "optimizer": setup.optimizer,
            "lora_alpha_value": trial.lora_alpha,
            "train_rows": data.train_rows,
            "eval_rows": data.eval_rows,
            "skipped_rows": len(data.skipped),
        }

    @property
    def facts(self) -> dict[str, Any]:
        return {**self.model_facts, **self.trial_facts, **self.attempt_facts}

    def evaluation(
        self,
        *,
        eval_loss: float,
        step: int,
        tokens_seen: int,
        train_s: float,
        train_losses: list[float],
        reading: MemoryReading,
        status: TrialStatus | None = None,
        task: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One evaluation's report (or a diverged trial's terminal one, with `status`); `task`: the task
        metrics measured after this evaluation, if any (NaN for each otherwise)."""
        finite = [x for x in train_losses if math.isfinite(x)]
        metrics: dict[str, Any] = {"eval_loss": eval_loss, **{n: float("nan") for n in self.task_names}, **(task or {})}
        if status is not None:
            metrics["trial_status"] = status.value
        metrics.update(
            perplexity=math.exp(min(eval_loss, 50.0)) if math.isfinite(eval_loss) else float("nan"),
            train_loss=(sum(finite) / len(finite)) if finite else float("nan"),
            step=int(step),
            tokens_seen=int(tokens_seen),
            tokens_per_s=tokens_seen / train_s if train_s > 0 else 0.0,
            train_s=round(train_s, 3),
            elapsed_s=round(time.time() - self.started, 3),
        )
        return {**metrics, **reading.as_metrics(), **self.facts}

    def out_of_memory(
        self, *, last: dict[str, Any], message: str, batch_size: int, reading: MemoryReading | None
    ) -> dict[str, Any]:
        """The terminal report of a trial that ran out of memory: its measured figures, NaN quality."""
        return {
            **{k: v for k, v in last.items() if k != "trial_status"},
            # Every result carries the objectives (Tune checks); NaN marks "no quality measured".
            "eval_loss": float("nan"),
            "perplexity": float("nan"),
            **{n: float("nan") for n in self.task_names},
            "trial_status": TrialStatus.OOM.value,
            "oom_message": message,
            "oom_batch_size": batch_size,
            "step": int(last.get("step", 0)),
            "elapsed_s": round(time.time() - self.started, 3),
            **self.facts,
            **(reading.as_metrics() if reading is not None else {}),
        }


# --- the trial -----------------------------------------------------------------------------------


def train_qlora(config: dict[str, Any], job: TrialJob, data: PreparedData | None = None) -> None:
    """Ray Tune function trainable: one QLoRA fine-tuning trial.

    Args:
        config: The trial's sampled hyperparameters (see trainables.params.TrialConfig).
        job: What every trial of the sweep trains with (trainables/job.py), passed with tune.with_parameters.
        data: The train/eval examples the driver prepared (through the object store), so workers
            need not see the data file. None reads and checks it here.
    """
    import ray
    from ray import tune

    defer_sigterm_out_of_callbacks()  # a stopped trial's worker exits quietly, even mid-teardown
    # Tune's node_ip cannot tell apart nodes that share an address (several raylets on one
    # machine, NAT); the Ray node id can.
    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # Copies the checkpoint to storage before returning.
        tune.report({**metrics, "node_id": node_id}, checkpoint=checkpoint)

    # With resources.pack the trial's GPU share comes from its predicted peak (sweeps/admission.py);
    # run_trial enforces it on CUDA. Which GPU it shares (a logical one on a CPU node) is reported
    # too, so the report can count trials per GPU.
    gpu_fraction = None
    if job.pack:
        gpu_fraction = float(tune.get_context().get_trial_resources().required_resources.get("GPU", 0.0))
        gpu_ids = ",".join(str(i) for i in ray.get_gpu_ids())
        inner_report = report

        def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
            inner_report({**metrics, "gpu_ids": gpu_ids}, checkpoint_dir)

    # train.trial_timeout_s / stall_timeout_s: the attempt runs under a watchdog (trainables/watchdog.py).
    watchdog = TrialWatchdog.for_train(job.train, report)
    callbacks: list[CallbackFactory] = []
    if watchdog is not None:
        report = watchdog.report
        callbacks.append(watchdog.callback)
        watchdog.start()
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            run_trial(config, job, report=report, data=data, gpu_fraction=gpu_fraction, callbacks=callbacks)
        else:
            with ExitStack() as stack:
                restored, report = _readable_checkpoint(checkpoint, stack, report)
                run_trial(
                    config, job, report=report, data=data, resume_from=restored, gpu_fraction=gpu_fraction,
                    callbacks=callbacks,
                )
        if watchdog is not None and watchdog.expired is not None:
            # Stopped cooperatively past train.trial_timeout_s: its terminal report, then the trial ends.
            report(watchdog.final_metrics(done=False), None)
    finally:
        if watchdog is not None:
            watchdog.close()


def _readable_checkpoint(checkpoint: Any, stack: ExitStack, report: Any) -> tuple[str, Any]:
    """The folder of the latest readable checkpoint of a restored trial, and the report to train with.

    When the latest checkpoint is unreadable (trainables/checkpoints.py), the newest older one that
    is readable: a note goes to the console and into every report (`checkpoint_fallback`), and the
    rounds up to the latest checkpoint's step, which Tune has seen, are trained again without being
    reported again.

    Raises:
        RuntimeError: If no checkpoint of the trial is readable (Tune retries or fails the trial).
    """
    latest = stack.enter_context(checkpoint.as_directory())
    problem = checkpoint_problem(latest)
    if problem is None:
        return latest, report
    latest_name = checkpoint.path.rstrip("/").rpartition("/")[2]
    latest_step = checkpoint_step(latest)
    for older in older_checkpoints(checkpoint):
        folder = stack.enter_context(older.as_directory())
        if checkpoint_problem(folder) is not None:
            continue
        note = (
            f"latest checkpoint {latest_name} is unreadable ({problem}); continuing from "
            f"{older.path.rstrip('/').rpartition('/')[2]} (step {checkpoint_step(folder)})"
            + (f", training again up to step {latest_step} without reporting those rounds again" if latest_step else "")
        )
        print(f"[qlora-sweep] trial {_trial_id()}: {note}", flush=True)
        inner = report

        def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
            if latest_step is not None and int(metrics.get("step") or 0) <= latest_step and not metrics.get("trial_status"):
                return  # a round Tune has already seen (with the checkpoint that is now unreadable)
            inner({**metrics, "checkpoint_fallback": note}, checkpoint_dir)

        return folder, report
    raise RuntimeError(f"no readable checkpoint to continue from: the latest, {latest_name}, is unreadable ({problem})")


def _trial_id() -> str:
    from ray import tune

    try:
        return tune.get_context().get_trial_id()
    except Exception:
        return "?"


def run_trial(
    config: dict[str, Any],
    job: TrialJob,
    report: Any,
    data: PreparedData | None = None,
    resume_from: str | None = None,
    gpu_fraction: float | None = None,
    callbacks: Sequence[CallbackFactory] = (),
) -> dict[str, Any]:
    """Train one trial, calling `report(metrics, checkpoint_dir)` after every evaluation.

    Separate from `train_qlora` so benchmarks and tests can run the identical training outside Tune.

    A trial that runs out of memory (torch.OutOfMemoryError) does not raise: it frees what it
    held, reports a final result with trial_status "oom" and its measured figures, and returns, so
    Tune does not retry it as is (a raised error would be, see train.max_failures) and the next
    trial on this worker starts clean. With train.oom_retry it first tries once more in-process
    with half the micro-batch and twice the gradient accumulation (the same effective batch).

    Args:
        config: The trial's hyperparameters.
        job: The sweep's settings for every trial (sweeps.plan.trial_job builds it).
        report: Called with the metrics and, when train.checkpoint is on, the folder of a
            checkpoint (adapter + tokenizer + optimizer/scheduler/RNG state, the Hugging Face
            Trainer layout that `PeftModel.from_pretrained` loads).
        data: Prepared examples; None reads the data file.
        resume_from: A checkpoint folder to continue from (what Tune restored).
        gpu_fraction: The share of a GPU Ray gave this trial (resources.pack); below 1 it caps
            PyTorch's allocator on CUDA. On CPU nothing is enforced, and the report says so.
        callbacks: Callback factories besides those train.callbacks names (called the same way).

    Returns:
        The last metrics reported.
    """
    import torch

    quiet_libraries()
    trial = TrialConfig.from_tune(config, job.train.batch_size)
    device = pick_device(job.gpus_per_trial)
    torch.set_num_threads(max(1, int(job.cpus_per_trial)))
    setup = TrainingSetup.resolve(job.model, job.train, device)  # asks the GPU about bf16 once
    # On CPU the prediction is still what the trial would need on a GPU.
    prediction_setup = setup if setup.on_cuda else TrainingSetup.resolve(job.model, job.train, "cuda", bf16_supported=True)
    factories = [*load_callback_factories(job.train.callbacks), *callbacks]
    started = time.time()
    model_path = materialize(job.model_path) if is_builtin(job.model_path) else job.model_path
    model_config = job.base_config if job.base_config is not None else _read_model_config(model_path, job.model)
    tokenizer = load_tokenizer(model_path, job.model)
    if data is None or not data.tokenized:
        # Without the driver's tokens (a direct call, a driver without the tokenizer) the trial
        # prepares the data itself, the same way preflight does.
        data = prepare_data(job.data.path, job.data, tokenizer)
    trial_report = TrialReport(started=started, task_names=TaskSchedule(job.eval).names, trial_facts={"started_at": round(started, 3), **_gpu_share(device, gpu_fraction)})
    grad_accum = job.train.grad_accum
    attempt = 0
    while True:
        attempt += 1
        context = TrialContext(
            trial=trial,
            job=job,
            setup=setup,
            predicted_memory_mib=_predicted_memory_mib(model_config, prediction_setup, trial, job),
            attempt=attempt,
            grad_accum=grad_accum,
        )
        trial_report.start_attempt(
            batch_size=trial.batch_size, grad_accum=grad_accum, predicted_memory_mib=context.predicted_memory_mib
        )
        predict = None if setup.on_cuda else _tensor_peak_predictor(model_config, setup, trial)
        last, oom, reading = _attempt(
            context, model_path, tokenizer, data, trial_report, report, resume_from, factories, predict
        )
        if oom is None:
            return last
        if job.train.oom_retry and attempt == 1 and not last and trial.batch_size > 1:
            # Nothing reported yet (the usual case: the peak comes with the first optimizer step),
            # so starting again does not repeat evaluation rounds Tune has already seen.
            trial_report.note_oom_retry(
                f"micro-batch {trial.batch_size} -> {trial.batch_size // 2}, grad_accum {grad_accum} -> "
                f"{grad_accum * 2} after: {oom}"
            )
            trial = replace(trial, batch_size=trial.batch_size // 2)
            grad_accum *= 2
            continue
        final = trial_report.out_of_memory(last=last, message=oom, batch_size=trial.batch_size, reading=reading)
        report(final, None)
        return final


def _read_model_config(model_path: str, model: ModelSpec) -> Any:
    """The base model's config, read once per trial when the job does not carry it."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path, revision=model.revision, trust_remote_code=model.trust_remote_code)


def _gpu_share(device: str, gpu_fraction: float | None) -> dict[str, Any]:
    """Enforce a packed trial's GPU share on CUDA, and say what was done."""
    if not gpu_fraction:
        return {}
    if device.startswith("cuda"):
        import torch

        # Set every time: a reused worker may have run a trial with another share before.
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_fraction), device)
        return {"gpu_fraction": gpu_fraction, "gpu_fraction_enforced": True}
    return {
        "gpu_fraction": gpu_fraction,
        "gpu_fraction_enforced": False,
        "gpu_fraction_note": "CPU trial: the GPU share is logical only (no torch.cuda memory cap applied)",
    }


def _predicted_memory_mib(model_config: Any, setup: TrainingSetup, trial: Any, job: TrialJob) -> float | None:
    """This attempt's predicted peak VRAM (trainables/trial_memory.py): its training step or its task
    evaluation, whichever is larger, as admission predicted it; None where the estimator cannot model it."""
    from dataclasses import asdict

    from trainables.trial_memory import task_eval_workload

    seq_len = job.data.max_seq_length
    workload = task_eval_workload(job.eval.spec if job.eval is not None else None, seq_len)
    try:
        knobs = MemoryKnobs.from_config(asdict(trial), trial.batch_size, seq_len)
        return predicted_mib(estimate_for_trial(model_config, setup, knobs, workload))
    except ValueError:
        return None  # an architecture the estimator does not model: no prediction, training goes on


def _tensor_peak_predictor(model_config: Any, setup: TrainingSetup, trial: Any) -> Callable[[int, int], float | None]:
    """The estimator's allocated bytes (MiB) for a CPU attempt, at the batch shape its profiled steps saw.

    The VRAM prediction uses data.max_seq_length; batches are padded to their longest row only, so
    the comparison with the measured tensor peak takes the padded length the window really trained on.
    """
    from dataclasses import asdict

    def predict(batch_size: int, seq_len: int) -> float | None:
        try:
            knobs = MemoryKnobs.from_config({**asdict(trial), "batch_size": batch_size}, batch_size, seq_len)
            return predicted_allocated_mib(estimate_for_trial(model_config, setup, knobs))
        except ValueError:
            return None  # an architecture the estimator does not model

    return predict


def _attempt(
    context: TrialContext,
    model_path: str,
    tokenizer: Any,
    data: PreparedData,
    trial_report: TrialReport,
    report: Any,
    resume_from: str | None,
    factories: Sequence[CallbackFactory],
    predict_tensor_peak: Callable[[int, int], float | None] | None = None,
) -> tuple[dict[str, Any], str | None, MemoryReading | None]:
    """Train once. Returns (last metrics reported, OOM message or None, the memory reading at the OOM)."""
    import torch

    probe = PeakMemoryProbe(context.device)
    probe.reset()
    # On CPU also the tensor peak of the first steps and evaluation (host RSS hides the model).
    tensor_probe = TensorPeakProbe() if predict_tensor_peak is not None else None
    last: dict[str, Any] = {}

    def report_and_keep(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        last.clear()
        last.update(metrics)
        report(metrics, checkpoint_dir)

    output_dir = tempfile.mkdtemp(prefix="qlora-sweep-trial-")
    trainer = None
    extra: list[Any] = []
    oom, reading = None, None
    try:
        extra = [callback for callback in (factory(context) for factory in factories) if callback is not None]
        trainer, reporter = _build_trainer(
            context, model_path, tokenizer, data, probe, trial_report, report_and_keep, output_dir, extra,
            tensor_probe, predict_tensor_peak,
        )
        if resume_from:
            reporter.restore(resume_from)
        trainer.train(resume_from_checkpoint=resume_from)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        # Only the message is kept: the traceback (and the tensors its frames hold) dies with `exc`
        # at the end of this block, before the finally below frees the memory.
        oom = (str(exc).strip().splitlines() or ["out of memory"])[0][:300]
        reading = probe.read()
    finally:
        # Runs on normal end, on OOM, on error, and when Tune stops the trial (it raises SystemExit in report).
        trainer = None
        probe.close()
        if tensor_probe is not None:
            tensor_probe.close()
        free_memory(context.device)
        shutil.rmtree(output_dir, ignore_errors=True)
        for callback in extra:
            teardown = getattr(callback, "on_teardown", None)
            if callable(teardown):
                teardown(context)
    return dict(last), oom, reading


# Allocation failures that do not surface as torch.OutOfMemoryError, besides those accelerate knows
# (accelerate.utils.memory.should_reduce_batch_size: " out of memory.", cuDNN's NOT_SUPPORTED, the
# CPU allocator's "can't allocate memory"): a CUDA runtime error raised as RuntimeError, and cuBLAS
# failing to allocate its workspace or handle.
OUT_OF_MEMORY_MESSAGES = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception raised while training means the attempt ran out of memory."""
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is the same class
        return True
    if not isinstance(exc, Exception):
        return False
    if should_reduce_batch_size(exc):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OUT_OF_MEMORY_MESSAGES)


def _build_trainer(
    context: TrialContext,
    model_path: str,
    tokenizer: Any,
    data: PreparedData,
    probe: PeakMemoryProbe,
    trial_report: TrialReport,
    report: Any,
    output_dir: str,
    callbacks: Sequence[Any] = (),
    tensor_probe: TensorPeakProbe | None = None,
    predict_tensor_peak: Callable[[int, int], float | None] | None = None,
) -> tuple[Any, Any]:
    from trl import SFTTrainer

    setup, trial, job = context.setup, context.trial, context.job
    model = setup.load_model(model_path, job.model)
    # Token ids with labels (-100 off the loss), already cut to max_seq_length: trl takes them as they are.
    trainer = SFTTrainer(
        model=model,
        args=setup.sft_config(trial, job.train, job.data, output_dir, context.grad_accum, **trained_as_prepared(data)),
        **data.trainer_inputs(tokenizer, pack_to=job.data.max_seq_length if trial.packing else None),
        processing_class=tokenizer,
        peft_config=setup.lora_config(trial, model.config.model_type),
    )
    if setup.quantized and setup.compute_dtype == "float32":
        keep_adapters_in_compute_dtype(trainer.model)
    skip_model_card(trainer.model)
    remove_printer_callback(trainer)
    trial_report.model_loaded(trainer, setup, trial, data)
    task = None
    if job.eval is not None:
        task = TaskEvaluator(job.eval, tokenizer, data.eval_tokens, job.data.max_seq_length)
    reporter = _tune_reporter_class()(
        report=report,
        probe=probe,
        trial_report=trial_report,
        checkpointing=job.train.checkpoint,
        checkpoint_interval=job.train.checkpoint_interval,
        tensor_probe=tensor_probe,
        predict_tensor_peak=predict_tensor_peak,
        task=task,
        schedule=TaskSchedule(job.eval),
        eval_every=job.train.eval_every,
    )
    trainer.add_callback(reporter)
    for callback in callbacks:
        trainer.add_callback(callback)
    reporter.events = trainer.callback_handler
    return trainer, reporter


@lru_cache(maxsize=1)
def _tune_reporter_class() -> type:
    """Build the trainer callback lazily: importing transformers' trainer costs seconds."""
    from transformers import TrainerCallback

    class TuneReporter(TrainerCallback):
        """Turns trainer events into Tune reports: one per evaluation, plus a terminal one on divergence."""

        def __init__(
            self,
            report: Any,
            probe: PeakMemoryProbe,
            trial_report: TrialReport,
            checkpointing: bool,
            checkpoint_interval: CheckpointInterval | None = None,
            tensor_probe: TensorPeakProbe | None = None,
            predict_tensor_peak: Callable[[int, int], float | None] | None = None,
            task: TaskEvaluator | None = None,
            schedule: TaskSchedule | None = None,
            eval_every: int = 1,
        ):
            self.task = task
            self.events: Any = None  # the trainer's CallbackHandler, set once the trainer has it
            self.schedule = schedule or TaskSchedule(None)
            self.eval_every = eval_every
            self.report = report
            self.probe = probe
            self.trial_report = trial_report
            self.checkpointing = checkpointing
            # train.checkpoint_every, counted from the last checkpoint or the attempt's start (a resumed
            # attempt starts at its checkpoint).
            self.checkpoint_interval = checkpoint_interval or CheckpointInterval(rounds=1)
            self.rounds_since_checkpoint = 0
            self.last_checkpoint = time.monotonic()
            self.tensor_probe = tensor_probe
            self.predict_tensor_peak = predict_tensor_peak
            self.pending: dict[str, Any] | None = None
            self.train_losses: list[float] = []
            self.train_seconds = 0.0
            self.segment_start = time.time()
            self.diverged_at: int | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if self.tensor_probe is not None and model is not None:
                self.tensor_probe.start("train", model, optimizer)
                if self.tensor_probe.unavailable:
                    self.trial_report.attempt_facts["tensor_peak_unavailable"] = self.tensor_probe.unavailable
            self.segment_start = time.time()

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            """The tensor-peak windows: the first optimizer steps, then the step that triggers the first evaluation."""
            tensor = self.tensor_probe
            if tensor is None or model is None:
                return
            tensor.step_done()
            if tensor.phase == "train" and tensor.steps_in_window >= tensor.steps:
                self._close_tensor_window()
            if control.should_evaluate and not tensor.eval_done and not tensor.active:
                began = time.time()
                tensor.start("eval", model, optimizer)
                self.segment_start += time.time() - began  # not training time

        def on_prediction_step(self, args, state, control, **kwargs):
            """The eval window covers the first evaluation's first TENSOR_PEAK_EVAL_BATCHES batches (bounded cost)."""
            tensor = self.tensor_probe
            if tensor is not None and tensor.phase == "eval":
                tensor.step_done()
                if tensor.steps_in_window >= TENSOR_PEAK_EVAL_BATCHES:
                    self._close_tensor_window(in_evaluation=True)

        def on_train_end(self, args, state, control, **kwargs):
            self._close_tensor_window()

        def _close_tensor_window(self, in_evaluation: bool = False) -> None:
            tensor = self.tensor_probe
            if tensor is None or not tensor.active:
                return
            began = time.time()
            tensor.stop()
            reading = tensor.reading()
            if reading is not None:
                predicted = None
                if self.predict_tensor_peak is not None and reading.batch_size and reading.seq_len:
                    predicted = self.predict_tensor_peak(reading.batch_size, reading.seq_len)
                self.trial_report.tensor_peak(reading, predicted)
            if not in_evaluation:  # evaluation time is off the throughput clock already
                # The profiler's bookkeeping is not training: keep it off the throughput clock.
                self.segment_start += time.time() - began

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            self.train_losses.append(float(loss))
            if not math.isfinite(float(loss)):
                self.diverged_at = state.global_step
                control.should_training_stop = True
                control.should_evaluate = False
                self.report(self._metrics(state, float("nan"), TrialStatus.DIVERGED))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.tensor_probe is not None and self.tensor_probe.active:
                self.tensor_probe.eval_done = True  # an evaluation inside the train window counts as its eval
                self._close_tensor_window(in_evaluation=True)
            if self.diverged_at is not None:
                return
            metrics = metrics or {}
            eval_loss = float(metrics.get("eval_loss", float("nan")))
            self.train_seconds += time.time() - self.segment_start - float(metrics.get("eval_runtime", 0.0))
            status = None
            if not math.isfinite(eval_loss):
                self.diverged_at = state.global_step
                control.should_training_stop = True
                status = TrialStatus.DIVERGED
            task = None
            if status is None and self.task is not None and self.schedule.due(state.global_step // self.eval_every):
                # Off the throughput clock: segment_start restarts below.
                # Each batch is a prediction step for every callback: the watchdog's beat among them.
                events = self.events
                on_batch = None if events is None else (lambda: events.on_prediction_step(args, state, control))
                task = self.task.evaluate(kwargs["model"], self.probe, on_batch=on_batch)
            self.rounds_since_checkpoint += 1
            due = self.checkpointing and status is None and self.checkpoint_interval.due(
                self.rounds_since_checkpoint,
                time.monotonic() - self.last_checkpoint,
                last_round=state.global_step >= state.max_steps,
            )
            # The save that save_steps (= eval_every) asked for happens only when train.checkpoint_every says so.
            control.should_save = due
            if due:
                self.pending = self._metrics(state, eval_loss, task=task)  # reported from on_save, with its checkpoint
            else:
                self.report(self._metrics(state, eval_loss, status, task=task))
            self.segment_start = time.time()

        def on_save(self, args, state, control, **kwargs):
            if self.pending is None:
                return
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"train_s": self.train_seconds, "step": state.global_step}, f)
            metrics, self.pending = self.pending, None
            self.report(metrics, folder)
            self.rounds_since_checkpoint = 0
            self.last_checkpoint = time.monotonic()

        def restore(self, checkpoint_dir: str) -> None:
            """Continue the throughput clock of a resumed trial."""
            path = os.path.join(checkpoint_dir, STATE_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    self.train_seconds = float(json.load(f).get("train_s", 0.0))

        def _metrics(
            self, state: Any, eval_loss: float, status: TrialStatus | None = None, task: dict[str, Any] | None = None
        ) -> dict[str, Any]:
            metrics = self.trial_report.evaluation(
                eval_loss=eval_loss,
                step=state.global_step,
                tokens_seen=int(state.num_input_tokens_seen or 0),
                train_s=self.train_seconds,
                train_losses=self.train_losses,
                reading=self.probe.read(),
                status=status,
                task=task,
            )
            self.train_losses = []
            return metrics

    return TuneReporter
