"""How a trial trains, resolved once: device, dtypes, optimizer, precision flags, and the objects built from them.

`TrainingSetup.resolve(model, train, device)` turns the spec's model and train sections and a device
into every decision the trainable makes (compute dtype for `auto`, optimizer for `auto`, autocast,
the adapters' dtype, peft's fp32 upcast, trl's fused LM head). Everything that trains or predicts
builds from it:

* the trainable (trainables/qlora.py): `load_model`, `lora_config`, `sft_config`, `load_tokenizer`;
* the memory prediction (trainables/trial_memory.py): `estimator_arguments`, so the estimator is set
  up exactly as the trainer trains and the two cannot drift apart;
* `qlora-sweep export --merge` (analysis/export.py): `load_model` and `eval_config`;
* the throughput benchmark (benchmarks/trainable_throughput.py);
* the run plan (sweeps/plan.py): `describe()` is saved in run_plan.json.

How the trainable trains, and what the estimator makes of it (docs/memory.md, "Predicting this
sweep's trials"):

* 4-bit models go through peft's `prepare_model_for_kbit_training`, which upcasts every parameter
  but the 4-bit weights to fp32: `upcast_non_quantized`.
* trl's SFTTrainer casts the LoRA weights of 4-bit models to bf16; with fp32 compute (CPU) the
  trainable casts them back (trainables/workarounds.py): `lora_dtype` is "bfloat16", or "float32"
  with fp32 compute. peft's fp32 adapters stay for `quantization: none`. DoRA's magnitude vectors
  stay fp32 either way (trl leaves them out of its cast).
* SFTTrainer computes the loss with its fused LM head: `fused_lm_head`.
* On CUDA a 16-bit compute dtype runs under autocast (Trainer bf16/fp16=True); on CPU it does not.
* `compute_dtype: auto` is bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 on CPU;
  `optimizer: auto` is paged AdamW (32-bit) on CUDA and plain AdamW on CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from trainables.params import KNOBS, MEMORY_KNOBS
from trainables.settings import DataSpec, ModelSpec, TrainSpec
from trainables.targets import resolve_targets
from trainables.workarounds import keep_4bit_layers_trainable_on_cpu


def compute_dtype_name(name: str, device: str, bf16_supported: bool = True) -> str:
    """The compute dtype a trial on `device` uses for model.compute_dtype `name`.

    Args:
        name: "auto" or an explicit dtype name.
        device: "cuda", "cuda:N" or "cpu".
        bf16_supported: Whether the GPU supports bf16 (torch.cuda.is_bf16_supported()).
    """
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16" if bf16_supported else "float16"
    return "float32"


def resolve_optimizer(name: str, device: str) -> str:
    """`auto` is the QLoRA paper's paged AdamW on CUDA; plain AdamW on CPU (no paging there)."""
    if name != "auto":
        return name
    return "paged_adamw_32bit" if device.startswith("cuda") else "adamw_torch"


def _cuda_supports_bf16() -> bool:
    """What this process's GPU says; a process without a usable GPU (a driver) assumes Ampere or newer."""
    import torch

    return bool(torch.cuda.is_bf16_supported()) if torch.cuda.is_available() else True


@dataclass(frozen=True)
class TrainingSetup:
    """Every training decision for one device kind, resolved once from the spec's model and train sections.

    Attributes:
        device: "cuda", "cuda:N" or "cpu".
        quantization: "nf4", "fp4" or "none" (16-bit LoRA).
        double_quant: bitsandbytes' double quantization of the absmax constants.
        compute_dtype: The resolved compute dtype ("bfloat16", "float16", "float32").
        optimizer: The resolved optimizer (transformers' `optim` name).
        autocast: Whether the forward runs under 16-bit autocast (Trainer bf16/fp16=True).
        lora_dtype: The dtype of the LoRA A/B weights while training.
        upcast_non_quantized: Whether prepare_model_for_kbit_training upcasts the non-4-bit parameters to fp32.
        fused_lm_head: Whether the loss comes from trl's fused LM head.
        gradient_checkpointing: train.gradient_checkpointing.
        max_grad_norm: train.max_grad_norm.
        seed: train.seed (the Trainer's seed and data_seed).
    """

    device: str
    quantization: str
    double_quant: bool
    compute_dtype: str
    optimizer: str
    autocast: bool
    lora_dtype: str
    upcast_non_quantized: bool
    fused_lm_head: bool
    gradient_checkpointing: bool
    max_grad_norm: float
    seed: int

    @classmethod
    def resolve(
        cls, model: ModelSpec, train: TrainSpec, device: str, *, bf16_supported: bool | None = None
    ) -> TrainingSetup:
        """The setup a trial on `device` trains with.

        Args:
            model: The spec's model section.
            train: The spec's train section.
            device: "cuda", "cuda:N" or "cpu". Admission and `estimate` pass "cuda" on a driver.
            bf16_supported: Whether the GPU supports bf16; None asks torch when this process sees a
                GPU and assumes it does otherwise (a driver predicting for its workers). Only read
                for compute_dtype auto on CUDA.
        """
        on_cuda = device.startswith("cuda")
        if on_cuda and model.compute_dtype == "auto" and bf16_supported is None:
            bf16_supported = _cuda_supports_bf16()
        compute = compute_dtype_name(model.compute_dtype, device, True if bf16_supported is None else bf16_supported)
        quantized = model.quantization != "none"
        return cls(
            device=device,
            quantization=model.quantization,
            double_quant=model.double_quant,
            compute_dtype=compute,
            optimizer=resolve_optimizer(train.optimizer, device),
            autocast=on_cuda and compute != "float32",
            # trl casts a quantized model's adapters to bf16; the trainable undoes it under fp32 compute.
            lora_dtype=("float32" if compute == "float32" else "bfloat16") if quantized else "float32",
            upcast_non_quantized=quantized,
            fused_lm_head=True,
            gradient_checkpointing=train.gradient_checkpointing,
            max_grad_norm=train.max_grad_norm,
            seed=train.seed,
        )

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.compute_dtype)

    def describe(self) -> dict[str, Any]:
        """The setup as JSON (run_plan.json's training_setup)."""
        return asdict(self)

    # --- the model --------------------------------------------------------------------------------

    def bnb_config(self) -> Any:
        """The BitsAndBytesConfig for 4-bit NF4/FP4 loading; None for `quantization: none`."""
        if not self.quantized:
            return None
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quantization,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.torch_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )

    def load_model(self, model_path: str, model: ModelSpec, *, for_training: bool = True, quantize: bool = True) -> Any:
        """Load the base model on this device: 4-bit as the spec says (or 16-bit), ready for k-bit training.

        Args:
            model_path: A local folder or hub id (builtin: names already materialized).
            model: The spec's model section (revision, trust_remote_code).
            for_training: Run peft's prepare_model_for_kbit_training on a 4-bit model (the trainable
                does; `export`'s evaluation of a saved adapter does not).
            quantize: False loads the base unquantized in the compute dtype (`export --merge`).
        """
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {
            "dtype": self.torch_dtype,
            "device_map": {"": self.device},
            "trust_remote_code": model.trust_remote_code,
            "revision": model.revision,
        }
        bnb = self.bnb_config() if quantize else None
        if bnb is not None:
            kwargs["quantization_config"] = bnb
        loaded = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        if bnb is not None:
            if for_training:
                from peft import prepare_model_for_kbit_training

                loaded = prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=self.gradient_checkpointing)
            if not self.on_cuda:
                keep_4bit_layers_trainable_on_cpu(loaded)
        return loaded

    # --- one trial's peft and trl configs ---------------------------------------------------------

    @staticmethod
    def lora_arguments(trial: Any, model_type: str) -> dict[str, Any]:
        """LoraConfig's arguments for a trial: every knob that feeds LoraConfig (trainables/params.py).

        Raises:
            ValueError: If the target-module label is a preset the model family does not define.
        """
        args = {knob.peft_arg: getattr(trial, knob.name) for knob in KNOBS if knob.peft_arg}
        args["target_modules"] = resolve_targets(trial.target_modules, model_type)
        return {**args, "bias": "none", "task_type": "CAUSAL_LM"}

    def lora_config(self, trial: Any, model_type: str) -> Any:
        """The peft LoraConfig of one trial (a trainables.params.TrialConfig)."""
        from peft import LoraConfig

        return LoraConfig(**self.lora_arguments(trial, model_type))

    def _runtime_arguments(self) -> dict[str, Any]:
        """SFTConfig's device and precision arguments, shared by training and `export`'s evaluation."""
        return {
            "report_to": [],
            "disable_tqdm": True,
            "use_cpu": not self.on_cuda,
            # Explicit both ways: trl otherwise turns bf16 autocast on, also on CPU.
            "bf16": self.autocast and self.compute_dtype == "bfloat16",
            "fp16": self.autocast and self.compute_dtype == "float16",
            "seed": self.seed,
            "dataloader_num_workers": 0,
            "dataloader_pin_memory": self.on_cuda,
        }

    def sft_arguments(
        self, trial: Any, train: TrainSpec, data: DataSpec, output_dir: str, grad_accum: int, **overrides: Any
    ) -> dict[str, Any]:
        """SFTConfig's arguments for a trial: the knobs that feed SFTConfig, the train settings, this setup.

        warmup_ratio feeds warmup_steps as the fraction it is: transformers' Trainer reads a
        warmup_steps below 1 as a fraction of max_steps.
        """
        args = {knob.trl_arg: getattr(trial, knob.name) for knob in KNOBS if knob.trl_arg}
        args.update(
            output_dir=output_dir,
            max_steps=train.max_steps,
            per_device_eval_batch_size=train.eval_batch_size or trial.batch_size,
            gradient_accumulation_steps=grad_accum,
            optim=self.optimizer,
            max_grad_norm=self.max_grad_norm,
            gradient_checkpointing=self.gradient_checkpointing,
            eval_strategy="steps",
            eval_steps=train.eval_every,
            logging_steps=1,  # every step, so a NaN loss stops the trial at once
            logging_nan_inf_filter=False,
            # A save is offered at every evaluation; the trainable keeps only those train.checkpoint_every
            # asks for (trainables/qlora.py TuneReporter). Tune copies it to storage: one local copy is enough.
            save_strategy="steps" if train.checkpoint else "no",
            save_steps=train.eval_every,
            save_total_limit=1,
            max_length=data.max_seq_length,
            data_seed=self.seed,
            include_num_input_tokens_seen="non_padding",
            **self._runtime_arguments(),
        )
        args.update(overrides)
        return args

    def sft_config(
        self, trial: Any, train: TrainSpec, data: DataSpec, output_dir: str, grad_accum: int, **overrides: Any
    ) -> Any:
        """The trl SFTConfig of one trial; `overrides` replace single arguments."""
        from trl import SFTConfig

        return SFTConfig(**self.sft_arguments(trial, train, data, output_dir, grad_accum, **overrides))

    def eval_config(self, data: DataSpec, output_dir: str, batch_size: int) -> Any:
        """An SFTConfig for evaluation only (`export`), with the trainable's precision and length settings."""
        from trl import SFTConfig

        return SFTConfig(
            output_dir=output_dir,
            per_device_eval_batch_size=batch_size,
            max_length=data.max_seq_length,
            gradient_checkpointing=False,
            **self._runtime_arguments(),
        )

    # --- the memory prediction --------------------------------------------------------------------

    def estimator_arguments(self, knobs: Any, model_type: str) -> dict[str, Any]:
        """`estimate_peak_memory`'s keyword arguments (besides the config) for a trial trained with this setup.

        Args:
            knobs: A trainables.trial_memory.MemoryKnobs (every memory knob of the registry + seq_len).
            model_type: The model's config model_type (for target-module presets).

        Raises:
            ValueError: If the target-module label is a preset the model family does not define.
        """
        args = {knob.name: getattr(knobs, knob.name) for knob in MEMORY_KNOBS}
        args["target_modules"] = resolve_targets(knobs.target_modules, model_type)
        return {
            **args,
            "seq_len": knobs.seq_len,
            "quantization": self.quantization,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
            "gradient_checkpointing": self.gradient_checkpointing,
            "optimizer": self.optimizer,
            "autocast": self.autocast,
            "lora_dtype": self.lora_dtype,
            "upcast_non_quantized": self.upcast_non_quantized,
            "fused_lm_head": self.fused_lm_head,
            # What differs on CPU (dropout masks, the positions trl's fused head scores): for the tensor peak.
            "device": "cuda" if self.on_cuda else "cpu",
        }


def load_tokenizer(model_path: str, model: ModelSpec) -> Any:
    """The model's tokenizer, with the one pad-token fallback: models without a pad token pad with EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
