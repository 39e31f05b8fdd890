"""The per-trial QLoRA function that Ray Tune runs.

One trial: load the base model quantized as the spec says (bitsandbytes NF4/FP4, double quant,
compute dtype), prepare it for k-bit training, attach LoRA adapters built from the trial's
config, train with trl's SFTTrainer, and report to Tune after every evaluation. The same code
runs on CUDA and on CPU (bitsandbytes >= 0.48 has a CPU path); it picks CUDA when the trial was
given a GPU and CUDA is really there, and falls back to CPU otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from trainables.memory_probe import PeakMemoryProbe, free_memory

# Written into each checkpoint next to the Trainer's own state: what the Trainer does not keep.
STATE_FILE = "qlora_sweep_state.json"

if TYPE_CHECKING:
    from sweeps.spec import SweepSpec
    from trainables.data import PreparedData


@dataclass(frozen=True)
class TrialConfig:
    """The hyperparameters of one trial, after the search space has been sampled."""

    r: int
    lora_alpha: float
    target_modules: str
    learning_rate: float
    lora_dropout: float
    weight_decay: float
    warmup_ratio: float
    lr_scheduler_type: str
    batch_size: int

    @classmethod
    def from_tune(cls, config: dict[str, Any], spec: SweepSpec) -> TrialConfig:
        return cls(
            r=int(config["r"]),
            lora_alpha=float(config["lora_alpha"]),
            target_modules=str(config["target_modules"]),
            learning_rate=float(config["learning_rate"]),
            lora_dropout=float(config["lora_dropout"]),
            weight_decay=float(config["weight_decay"]),
            warmup_ratio=float(config["warmup_ratio"]),
            lr_scheduler_type=str(config["lr_scheduler_type"]),
            batch_size=int(config.get("batch_size") or spec.train.batch_size),
        )


def pick_device(spec: SweepSpec) -> str:
    """CUDA when the trial asked for a GPU and one is usable, else CPU.

    Ray sets CUDA_VISIBLE_DEVICES for a trial that requested GPUs even on a node that only
    declares them (tests, misconfigured nodes); torch then finds no device and we train on CPU.
    """
    import torch

    if spec.resources.gpus_per_trial > 0 and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def resolve_compute_dtype(name: str, device: str) -> Any:
    import torch

    # The same rule the memory predictions use (trainables/trial_memory.py).
    from trainables.trial_memory import compute_dtype_name

    bf16 = torch.cuda.is_bf16_supported() if device.startswith("cuda") and name == "auto" else True
    return getattr(torch, compute_dtype_name(name, device, bf16))


def resolve_optimizer(name: str, device: str) -> str:
    """`auto` is the QLoRA paper's paged AdamW on CUDA; plain AdamW on CPU (no paging there)."""
    if name != "auto":
        return name
    return "paged_adamw_32bit" if device.startswith("cuda") else "adamw_torch"


def load_quantized_model(spec: SweepSpec, model_path: str, device: str, compute_dtype: Any) -> Any:
    """Load the base model as the spec says: 4-bit NF4/FP4 with bitsandbytes, or 16-bit for `none`."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {
        "dtype": compute_dtype,
        "device_map": {"": device},
        "trust_remote_code": spec.model.trust_remote_code,
        "revision": spec.model.revision,
    }
    if spec.model.quantization != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.model.quantization,
            bnb_4bit_use_double_quant=spec.model.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


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


def train_qlora(config: dict[str, Any], spec: SweepSpec, data: PreparedData | None = None) -> None:
    """Ray Tune function trainable: one QLoRA fine-tuning trial.

    Args:
        config: The trial's sampled hyperparameters (see TrialConfig).
        spec: The whole sweep spec, passed with tune.with_parameters.
        data: The train/eval examples the driver prepared (through the object store), so workers
            need not see the data file. None reads and checks it here.
    """
    import ray
    from ray import tune

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
    if spec.resources.pack:
        gpu_fraction = float(tune.get_context().get_trial_resources().required_resources.get("GPU", 0.0))
        gpu_ids = ",".join(str(i) for i in ray.get_gpu_ids())
        inner_report = report

        def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
            inner_report({**metrics, "gpu_ids": gpu_ids}, checkpoint_dir)

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_trial(config, spec, report=report, data=data, gpu_fraction=gpu_fraction)
    else:
        with checkpoint.as_directory() as restored:
            run_trial(config, spec, report=report, data=data, resume_from=restored, gpu_fraction=gpu_fraction)


def run_trial(
    config: dict[str, Any],
    spec: SweepSpec,
    report: Any,
    data: PreparedData | None = None,
    resume_from: str | None = None,
    gpu_fraction: float | None = None,
) -> dict[str, Any]:
    """Train one trial, calling `report(metrics, checkpoint_dir)` after every evaluation.

    Separate from `train_qlora` so benchmarks can run the identical training outside Tune.

    A trial that runs out of memory (torch.OutOfMemoryError) does not raise: it frees what it
    held, reports a final result with trial_status "oom" and its measured figures, and returns, so
    Tune does not retry it as is (a raised error would be, see train.max_failures) and the next
    trial on this worker starts clean. With train.oom_retry it first tries once more in-process
    with half the micro-batch and twice the gradient accumulation (the same effective batch).

    Args:
        config: The trial's hyperparameters.
        spec: The sweep spec.
        report: Called with the metrics and, when train.checkpoint is on, the folder of a
            checkpoint (adapter + tokenizer + optimizer/scheduler/RNG state, the Hugging Face
            Trainer layout that `PeftModel.from_pretrained` loads).
        data: Prepared examples; None reads the data file.
        resume_from: A checkpoint folder to continue from (what Tune restored).
        gpu_fraction: The share of a GPU Ray gave this trial (resources.pack); below 1 it caps
            PyTorch's allocator on CUDA. On CPU nothing is enforced, and the report says so.

    Returns:
        The last metrics reported.
    """
    import torch

    from trainables.tiny_models import materialize

    quiet_libraries()
    trial = TrialConfig.from_tune(config, spec)
    device = pick_device(spec)
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
    compute_dtype = resolve_compute_dtype(spec.model.compute_dtype, device)
    started = time.time()
    model_path = materialize(spec.resolve_path(spec.model.path))
    static: dict[str, Any] = {"started_at": round(started, 3), **_gpu_share(device, gpu_fraction)}
    grad_accum = spec.train.grad_accum
    retried = False
    while True:
        static.update(
            micro_batch_size=trial.batch_size,
            grad_accum=grad_accum,
            predicted_memory_mib=_predicted_memory_mib(spec, model_path, trial, device),
        )
        last, oom, reading = _attempt(
            spec, trial, grad_accum, model_path, device, compute_dtype, report, started, data, resume_from, static
        )
        if oom is None:
            return last
        if spec.train.oom_retry and not retried and not last and trial.batch_size > 1:
            # Nothing reported yet (the usual case: the peak comes with the first optimizer step),
            # so starting again does not repeat evaluation rounds Tune has already seen.
            static["oom_retry"] = (
                f"micro-batch {trial.batch_size} -> {trial.batch_size // 2}, grad_accum {grad_accum} -> "
                f"{grad_accum * 2} after: {oom}"
            )
            trial = replace(trial, batch_size=trial.batch_size // 2)
            grad_accum *= 2
            retried = True
            continue
        final = {
            **{k: v for k, v in last.items() if k not in ("trial_status",)},
            # Every result carries the objectives (Tune checks); NaN marks "no quality measured".
            "eval_loss": float("nan"),
            "perplexity": float("nan"),
            "trial_status": "oom",
            "oom_message": oom,
            "oom_batch_size": trial.batch_size,
            "step": int(last.get("step", 0)),
            "elapsed_s": round(time.time() - started, 3),
            **static,
            **reading.as_metrics(),
        }
        report(final, None)
        return final


OOM_INJECTION_ENV = "QLORA_SWEEP_INJECT_OOM_ABOVE_MIB"


def inject_oom_for_testing(predicted_mib: float | None) -> None:
    """Testing hook (fault injection): raise torch.OutOfMemoryError when $QLORA_SWEEP_INJECT_OOM_ABOVE_MIB
    is set and this trial's predicted memory is above it.

    Lets tests on a CPU machine drive the OOM path (trial status "oom", OOM-aware search) with
    real training. Read once per attempt, right before training starts; never in the training loop.
    The driver forwards the variable to trial workers (sweeps/driver.py, FORWARDED_ENV).

    Raises:
        ValueError: If the variable is set but is not a number of MiB.
    """
    value = os.environ.get(OOM_INJECTION_ENV)
    if not value or predicted_mib is None:
        return
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"{OOM_INJECTION_ENV}={value!r} is not a number of MiB; unset it or write e.g. 12.5") from None
    if predicted_mib > threshold:
        import torch

        raise torch.OutOfMemoryError(
            f"injected by {OOM_INJECTION_ENV}={value}: predicted {predicted_mib:.1f} MiB is above it"
        )


SLOW_TEARDOWN_ENV = "QLORA_SWEEP_SLOW_TEARDOWN_S"


def slow_teardown_for_testing() -> None:
    """Testing hook: sleep $QLORA_SWEEP_SLOW_TEARDOWN_S seconds in a trial's teardown, after its last report.

    Stands in for a slow teardown (freeing a large model, a busy machine), which is what decides
    whether Tune can reuse the trial's worker in time (sweeps/driver.py, WORKER_ENV).
    """
    value = os.environ.get(SLOW_TEARDOWN_ENV)
    if value:
        time.sleep(float(value))


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


def _predicted_memory_mib(spec: SweepSpec, model_path: str, trial: TrialConfig, device: str) -> float | None:
    """This trial's predicted peak VRAM (trainables/trial_memory.py); on CPU, what it would need on a GPU."""
    from dataclasses import asdict

    from transformers import AutoConfig

    from trainables.trial_memory import MemoryKnobs, estimate_for_trial, predicted_mib

    on_cuda = device.startswith("cuda")
    try:
        model_config = AutoConfig.from_pretrained(
            model_path, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code
        )
        knobs = MemoryKnobs.from_config(asdict(trial), spec)
        import torch

        bf16 = torch.cuda.is_bf16_supported() if on_cuda else True
        return predicted_mib(estimate_for_trial(model_config, spec, knobs, device if on_cuda else "cuda", bf16_supported=bf16))
    except ValueError:
        return None  # an architecture the estimator does not model: no prediction, training goes on


def _attempt(
    spec: SweepSpec,
    trial: TrialConfig,
    grad_accum: int,
    model_path: str,
    device: str,
    compute_dtype: Any,
    report: Any,
    started: float,
    data: PreparedData | None,
    resume_from: str | None,
    static: dict[str, Any],
) -> tuple[dict[str, Any], str | None, Any]:
    """Train once. Returns (last metrics reported, OOM message or None, the memory reading at the OOM)."""
    import torch

    probe = PeakMemoryProbe(device)
    probe.reset()
    last: dict[str, Any] = {}

    def report_and_keep(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        last.clear()
        last.update(metrics)
        report(metrics, checkpoint_dir)

    output_dir = tempfile.mkdtemp(prefix="qlora-sweep-trial-")
    trainer = None
    oom, reading = None, None
    try:
        trainer, reporter = _build_trainer(
            spec, trial, model_path, device, compute_dtype, probe, report_and_keep, started, data, output_dir,
            grad_accum=grad_accum, extra_static=static,
        )
        if resume_from:
            reporter.restore(resume_from)
        inject_oom_for_testing(static.get("predicted_memory_mib"))
        trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError as exc:  # torch.cuda.OutOfMemoryError is the same class
        # Only the message is kept: the traceback (and the tensors its frames hold) dies with `exc`
        # at the end of this block, before the finally below frees the memory.
        oom = (str(exc).strip().splitlines() or ["out of memory"])[0][:300]
        reading = probe.read()
    finally:
        # Runs on normal end, on OOM, on error, and when Tune stops the trial (it raises SystemExit in report).
        trainer = None
        probe.close()
        free_memory(device)
        shutil.rmtree(output_dir, ignore_errors=True)
        slow_teardown_for_testing()
    return dict(last), oom, reading


def _build_trainer(
    spec: SweepSpec,
    trial: TrialConfig,
    model_path: str,
    device: str,
    compute_dtype: Any,
    probe: PeakMemoryProbe,
    report: Any,
    started: float,
    data: PreparedData | None,
    output_dir: str,
    grad_accum: int | None = None,
    extra_static: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trainables.data import prepare_data
    from trainables.targets import resolve_targets

    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if data is None:
        data = prepare_data(spec.resolve_path(spec.data.path), spec.data, tokenizer)

    model = load_quantized_model(spec, model_path, device, compute_dtype)
    quantized = spec.model.quantization != "none"
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.train.gradient_checkpointing
        )
        if device == "cpu":
            keep_4bit_layers_trainable_on_cpu(model)

    lora = LoraConfig(
        r=trial.r,
        lora_alpha=trial.lora_alpha,
        target_modules=resolve_targets(trial.target_modules, model.config.model_type),
        lora_dropout=trial.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    optimizer = resolve_optimizer(spec.train.optimizer, device)
    on_cuda = device.startswith("cuda")
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=spec.train.max_steps,
        per_device_train_batch_size=trial.batch_size,
        per_device_eval_batch_size=spec.train.eval_batch_size or trial.batch_size,
        gradient_accumulation_steps=grad_accum or spec.train.grad_accum,
        learning_rate=trial.learning_rate,
        weight_decay=trial.weight_decay,
        warmup_steps=trial.warmup_ratio,
        lr_scheduler_type=trial.lr_scheduler_type,
        optim=optimizer,
        max_grad_norm=spec.train.max_grad_norm,
        gradient_checkpointing=spec.train.gradient_checkpointing,
        eval_strategy="steps",
        eval_steps=spec.train.eval_every,
        logging_steps=1,  # every step, so a NaN loss stops the trial at once
        logging_nan_inf_filter=False,
        # A checkpoint per evaluation; Tune copies it to storage, so one local copy is enough.
        save_strategy="steps" if spec.train.checkpoint else "no",
        save_steps=spec.train.eval_every,
        save_total_limit=1,
        report_to=[],
        disable_tqdm=True,
        max_length=spec.data.max_seq_length,
        use_cpu=not on_cuda,
        bf16=on_cuda and compute_dtype == torch.bfloat16,
        fp16=on_cuda and compute_dtype == torch.float16,
        seed=spec.train.seed,
        data_seed=spec.train.seed,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataloader_pin_memory=on_cuda,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval),
        processing_class=tokenizer,
        peft_config=lora,
    )
    if quantized and compute_dtype == torch.float32:
        # trl casts QLoRA adapters to bf16 (the paper's setting for bf16 compute). With fp32
        # compute (CPU) that only loses precision, so keep adapters in the compute dtype.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    # peft renders a model card (a Jinja template compiled afresh) into every checkpoint: half of
    # a checkpoint's time on a small adapter (benchmarks/trainable_throughput.py). `export` writes
    # its own README, so the checkpoints skip it.
    trainer.model.create_or_update_model_card = lambda output_dir: None
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log line when tqdm is off
    trainable, total = trainer.model.get_nb_trainable_parameters()
    reporter = _tune_reporter_class()(
            report=report,
            probe=probe,
            started=started,
            checkpointing=spec.train.checkpoint,
            static={
                "trainable_params": int(trainable),
                "total_params": int(total),
                "device": device,
                "compute_dtype": str(compute_dtype).removeprefix("torch."),
                "optimizer": optimizer,
                "lora_alpha_value": trial.lora_alpha,
                "train_rows": len(data.train),
                "eval_rows": len(data.eval),
                "skipped_rows": len(data.skipped),
                **(extra_static or {}),
            },
    )
    trainer.add_callback(reporter)
    return trainer, reporter


@lru_cache(maxsize=1)
def _tune_reporter_class() -> type:
    """Build the trainer callback lazily: importing transformers' trainer costs seconds."""
    from transformers import TrainerCallback

    class TuneReporter(TrainerCallback):
        """Turns trainer events into Tune reports: one per evaluation, plus a terminal one on divergence."""

        def __init__(
            self, report: Any, probe: PeakMemoryProbe, started: float, static: dict[str, Any], checkpointing: bool
        ):
            self.report = report
            self.probe = probe
            self.started = started
            self.static = static
            self.checkpointing = checkpointing
            self.pending: dict[str, Any] | None = None
            self.train_losses: list[float] = []
            self.train_seconds = 0.0
            self.segment_start = time.time()
            self.diverged_at: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.segment_start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            self.train_losses.append(float(loss))
            if not math.isfinite(float(loss)):
                self.diverged_at = state.global_step
                control.should_training_stop = True
                control.should_evaluate = False
                self._send(state, {"eval_loss": float("nan"), "trial_status": "diverged"})

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.diverged_at is not None:
                return
            metrics = metrics or {}
            eval_loss = float(metrics.get("eval_loss", float("nan")))
            self.train_seconds += time.time() - self.segment_start - float(metrics.get("eval_runtime", 0.0))
            extra: dict[str, Any] = {"eval_loss": eval_loss}
            if not math.isfinite(eval_loss):
                self.diverged_at = state.global_step
                control.should_training_stop = True
                extra["trial_status"] = "diverged"
            if self.checkpointing and "trial_status" not in extra:
                self.pending = self._metrics(state, extra)  # reported from on_save, with its checkpoint
            else:
                self._send(state, extra)
            self.segment_start = time.time()

        def on_save(self, args, state, control, **kwargs):
            if self.pending is None:
                return
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"train_s": self.train_seconds}, f)
            metrics, self.pending = self.pending, None
            self.report(metrics, folder)

        def restore(self, checkpoint_dir: str) -> None:
            """Continue the throughput clock of a resumed trial."""
            path = os.path.join(checkpoint_dir, STATE_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    self.train_seconds = float(json.load(f).get("train_s", 0.0))

        def _send(self, state: Any, extra: dict[str, Any]) -> None:
            self.report(self._metrics(state, extra))

        def _metrics(self, state: Any, extra: dict[str, Any]) -> dict[str, Any]:
            eval_loss = extra["eval_loss"]
            finite = [x for x in self.train_losses if math.isfinite(x)]
            tokens = int(state.num_input_tokens_seen or 0)
            metrics = {
                **extra,
                "perplexity": math.exp(min(eval_loss, 50.0)) if math.isfinite(eval_loss) else float("nan"),
                "train_loss": (sum(finite) / len(finite)) if finite else float("nan"),
                "step": int(state.global_step),
                "tokens_seen": tokens,
                "tokens_per_s": tokens / self.train_seconds if self.train_seconds > 0 else 0.0,
                "train_s": round(self.train_seconds, 3),
                "elapsed_s": round(time.time() - self.started, 3),
                **self.probe.read().as_metrics(),
                **self.static,
            }
            self.train_losses = []
            return metrics

    return TuneReporter
