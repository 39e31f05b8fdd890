"""One trial's predicted GPU memory, with the estimator set up exactly as the trainable trains.

`trainables/memory_estimator.py` predicts peak memory from a description of a training setup;
`trainables/qlora.py` is the setup this sweep actually runs. `estimate_for_trial` is the one place
that turns (model config, sweep spec, a trial's memory knobs, device kind) into the estimator's
arguments, so the `estimate` command, admission before launch, GPU packing, the OOM fault-injection
hook and the prediction each trial reports all use the same numbers, and none of them can drift from
the trainable without this file changing too.

How the trainable trains, and what that means for the estimator (see docs/memory.md, "Predicting
this sweep's trials"):

* 4-bit models go through peft's `prepare_model_for_kbit_training`, which upcasts every parameter
  but the 4-bit weights to fp32: `upcast_non_quantized=True`.
* TRL's SFTTrainer casts the LoRA weights of 4-bit models to bf16; with fp32 compute (CPU) the
  trainable casts them back: `lora_dtype` is "bfloat16", or "float32" with fp32 compute. PEFT's fp32
  adapters stay for `quantization: none`.
* SFTTrainer computes the loss with its fused LM head: `fused_lm_head=True`.
* On CUDA a 16-bit compute dtype runs under autocast (Trainer bf16/fp16=True); on CPU it does not.
* `compute_dtype: auto` is bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 on CPU;
  `optimizer: auto` is paged AdamW (32-bit) on CUDA and plain AdamW on CPU (`resolve_optimizer`).
* Sequences are cut at data.max_seq_length and padded per batch: the prediction uses the cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainables.memory_estimator import MIB, MemoryEstimate, estimate_peak_memory, lora_target_layers

if TYPE_CHECKING:
    from sweeps.spec import SweepSpec


@dataclass(frozen=True)
class MemoryKnobs:
    """The settings of one trial that change its memory; the rest (learning rate, ...) do not.

    Attributes:
        r: LoRA rank.
        target_modules: Target-module label as the search carries it ("qv", "all-linear", "q_proj+v_proj").
        batch_size: Micro-batch size per optimizer micro-step.
        seq_len: Longest sequence in tokens (data.max_seq_length).
        lora_dropout: LoRA dropout (above 0 each targeted layer keeps a dropped copy of its input).
    """

    r: int
    target_modules: str
    batch_size: int
    seq_len: int
    lora_dropout: float = 0.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], spec: SweepSpec) -> MemoryKnobs:
        """The knobs of a trial config as Tune passes it (a missing batch_size means train.batch_size)."""
        return cls(
            r=int(config["r"]),
            target_modules=str(config["target_modules"]),
            batch_size=int(config.get("batch_size") or spec.train.batch_size),
            seq_len=int(spec.data.max_seq_length),
            lora_dropout=float(config.get("lora_dropout") or 0.0),
        )

    def describe(self) -> str:
        return f"r={self.r}, target_modules={self.target_modules}, batch_size={self.batch_size}, seq_len={self.seq_len}"


def compute_dtype_name(name: str, device: str, bf16_supported: bool = True) -> str:
    """The compute dtype a trial on `device` uses for the spec's model.compute_dtype `name`.

    Args:
        name: "auto" or an explicit dtype name.
        device: "cuda", "cuda:N" or "cpu".
        bf16_supported: Whether the GPU supports bf16 (torch.cuda.is_bf16_supported()); a driver
            without a GPU assumes it does (Ampere and newer).
    """
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16" if bf16_supported else "float16"
    return "float32"


def estimator_arguments(
    model_config: Any, spec: SweepSpec, knobs: MemoryKnobs, device: str = "cuda", *, bf16_supported: bool = True
) -> dict[str, Any]:
    """The keyword arguments of `estimate_peak_memory` (besides the config) for one trial of this sweep.

    Raises:
        ValueError: If the target-module label is a preset the model family does not define.
    """
    from trainables.qlora import resolve_optimizer
    from trainables.targets import resolve_targets

    on_cuda = device.startswith("cuda")
    quantized = spec.model.quantization != "none"
    compute = compute_dtype_name(spec.model.compute_dtype, device, bf16_supported)
    model_type = getattr(model_config, "model_type", None) or dict(model_config).get("model_type", "")
    return {
        "quantization": spec.model.quantization,
        "double_quant": spec.model.double_quant,
        "compute_dtype": compute,
        "r": knobs.r,
        "target_modules": resolve_targets(knobs.target_modules, model_type),
        "batch_size": knobs.batch_size,
        "seq_len": knobs.seq_len,
        "gradient_checkpointing": spec.train.gradient_checkpointing,
        "optimizer": resolve_optimizer(spec.train.optimizer, device),
        "lora_dropout": knobs.lora_dropout,
        "autocast": on_cuda and compute != "float32",
        "lora_dtype": ("float32" if compute == "float32" else "bfloat16") if quantized else "float32",
        "upcast_non_quantized": quantized,
        "fused_lm_head": True,
    }


def estimate_for_trial(
    model_config: Any, spec: SweepSpec, knobs: MemoryKnobs, device: str = "cuda", *, bf16_supported: bool = True
) -> MemoryEstimate:
    """Predict the peak GPU memory of one trial of this sweep, set up as trainables/qlora.py trains it.

    Args:
        model_config: The base model's transformers config (or its config.json dict).
        spec: The sweep spec (quantization, compute dtype, optimizer, checkpointing, ...).
        knobs: The trial's rank, target modules, micro-batch, sequence length and dropout.
        device: "cuda" (what admission, packing and reports use) or "cpu".
        bf16_supported: See `compute_dtype_name`.

    Returns:
        The estimate; `.reserved_bytes` predicts torch.cuda.max_memory_reserved.

    Raises:
        ValueError: If the architecture or the target modules cannot be modelled.
    """
    args = estimator_arguments(model_config, spec, knobs, device, bf16_supported=bf16_supported)
    return estimate_peak_memory(model_config, **args)


def predicted_mib(estimate: MemoryEstimate) -> float:
    """The figure a trial reports as predicted_memory_mib: predicted torch.cuda.max_memory_reserved."""
    return round(estimate.reserved_bytes / MIB, 1)


def targeted_layers(model_config: Any, label: str) -> frozenset[str]:
    """Names of the layers a target-module label adapts in this model, for ordering labels by inclusion.

    qv adapts a subset of what attention adapts, which is a subset of all-linear, and so on; explicit
    lists compare by the layers they match.

    Raises:
        ValueError: If the label matches nothing in this model.
    """
    from trainables.targets import resolve_targets

    model_type = getattr(model_config, "model_type", None) or dict(model_config).get("model_type", "")
    return frozenset(layer.name for layer in lora_target_layers(model_config, resolve_targets(label, model_type)))
