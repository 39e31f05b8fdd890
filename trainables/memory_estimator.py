"""Predict the peak GPU memory of one QLoRA trial from the model's config alone.

The prediction is a sum of named parts, each in bytes, so a reader can see where the memory goes
and which knob moves it:

    linear_weights      frozen linear layers bitsandbytes quantizes: 4-bit packed, numel / 2
    quant_constants     their absmax constants (fp32 per 64-block, or 8-bit + fp32 per 256 with
                        double quantization) and lookup tables
    other_weights       embeddings, lm_head unless tied, norms, biases and buffers (compute dtype)
    lora_weights        A (r x in) and B (out x r) per targeted layer, fp32 by default; with DoRA
                        also one fp32 magnitude per output feature of each targeted layer
    lora_grads          their gradients, same dtypes
    optimizer_state     AdamW moments held by PyTorch's allocator
    paged_optimizer     AdamW moments in CUDA unified memory (bitsandbytes paged optimizers)
    activations         tensors saved for backward (per-layer formula, see docs/memory.md)
    logits              fp32 log-probabilities saved by the loss, their gradient and the
                        gradient of the logits: 12 bytes per token per vocabulary entry (or, with
                        TRL's fused LM head, one logits tile and per-token state)
    dequant_workspace   one 16-bit copy of the largest quantized weight, dequantized for a matmul
    allocator_overhead  caching-allocator fragmentation, a fraction of the parts above
    cuda_context        CUDA context and kernels; not seen by torch.cuda.max_memory_reserved

A trial with task metrics (spec section `eval:`) also gets `MemoryEstimate.task_eval`: the task
evaluation, run while training is paused, holds the weights, adapters and optimizer states (no
gradients) plus, per phase, the KV cache and last-position logits of batched greedy generation, or
the full logits of a teacher-forced / forgetting forward, and no-grad activations (`task_eval_phases`).
The estimate's totals are then the larger of training and evaluation.

`MemoryEstimate.total_gib` predicts torch.cuda.max_memory_reserved (what a trial reports as
peak_memory_mib with memory_kind "cuda_reserved"); `total_with_context_gib` adds the CUDA context
and the paged optimizer states, which is closer to what nvidia-smi shows.

Layer shapes come from instantiating the model on the meta device (no weights, no memory), so
every architecture transformers knows is counted exactly; the activation formula needs the
decoder block's structure and supports llama-style gated-MLP decoders (llama, mistral, qwen2,
...) and gpt2. docs/memory.md derives each formula and lists the assumptions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Quantization = Literal["nf4", "fp4", "none"]
ComputeDType = Literal["bfloat16", "float16", "float32"]
Optimizer = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]

QUANTIZATIONS: tuple[str, ...] = ("nf4", "fp4", "none")
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
OPTIMIZERS: tuple[str, ...] = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
ALL_LINEAR = "all-linear"

# bitsandbytes' 4-bit layout (bitsandbytes/functional.py: quantize_4bit).
BNB_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZE = 64
DEFAULT_NESTED_BLOCKSIZE = 256
_CODE_4BIT_BYTES = 16 * 4  # the NF4/FP4 lookup table, fp32, one per quantized layer
_CODE_NESTED_BYTES = 256 * 4  # the 8-bit map of the nested absmax, fp32, one per layer
_OFFSET_BYTES = 4  # the mean subtracted before the nested quantization, fp32 scalar

# bitsandbytes' optimizers (bitsandbytes/optim/optimizer.py): tensors under min_8bit_size keep
# fp32 states even in an 8-bit optimizer, only tensors of at least 1e5 elements are paged, and
# 8-bit states carry one fp32 absmax per 256 elements for each of the two moments.
_BNB_MIN_8BIT_SIZE = 4096
_BNB_PAGED_MIN_NUMEL = 100_000
_BNB_STATE_BLOCKSIZE = 256

# PEFT keeps adapter weights in fp32 by default (get_peft_model's autocast_adapter_dtype=True
# upcasts bf16/fp16 adapters).
LORA_PARAM_BYTES = 4
# DoRA's magnitude vectors (peft lora_magnitude_vector, one value per output feature) stay fp32:
# peft upcasts them with the adapters and trl's bf16 cast of QLoRA adapters leaves them out.
DORA_MAGNITUDE_BYTES = 4
# CUDA's native_dropout keeps a bool mask; CPU's dropout keeps a mask in the input's dtype
# (estimate_peak_memory(device="cpu")).
_DROPOUT_MASK_BYTES = 1
DEVICES: tuple[str, ...] = ("cuda", "cpu")

# TRL's fused LM head (trl/kernels/chunked_logprob.py): logits tiles of 4096 tokens x 32768
# vocabulary entries, and per token seven fp32 statistics plus the int64 target.
_TRL_TOKEN_TILE = 4096
_TRL_VOCAB_TILE = 32768
_TRL_PER_TOKEN_STATS = 7 * 4 + 8

DEFAULT_CUDA_CONTEXT_MIB = 512
DEFAULT_FRAGMENTATION = 0.10
DEFAULT_FIT_MARGIN = 0.10

MIB = 1 << 20
GIB = 1 << 30

# Meta-Llama-3-8B's config.json shape values: the reference model of the hand-computed breakdown
# in docs/memory.md, which the tests, `estimate` examples and benchmarks all use (no weights needed).
LLAMA3_8B_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}

# Sibling projections that read the same input tensor, so LoRA on any of them keeps that input once.
_SHARED_INPUT_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
)
# Output projections whose input is the attention output, which SDPA already keeps for backward.
_ATTENTION_OUTPUT_PROJECTIONS: tuple[str, ...] = ("self_attn.o_proj", "attn.c_proj")


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer of the model, as the meta-device instance shows it.

    Attributes:
        name: Full module name, e.g. "model.layers.0.self_attn.q_proj".
        in_features: Input width.
        out_features: Output width.
        has_bias: Whether the layer has a bias (kept in the compute dtype, never quantized).
        quantized: Whether `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))`
            replaces it with a bitsandbytes Linear4bit (lm_head and tied layers are skipped).
        lora_candidate: Whether peft's "all-linear" targets it (every Linear/Conv1D but the output head).
    """

    name: str
    in_features: int
    out_features: int
    has_bias: bool
    quantized: bool
    lora_candidate: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a model, read once from its config.

    Attributes:
        model_type: The config's model_type ("llama", "gpt2", ...).
        family: "gated" (llama-style decoder: RMSNorm, RoPE, SwiGLU, GQA), "gpt2", or "other"
            (weights and LoRA are counted, activations are not modelled).
        hidden: Hidden size h.
        intermediate: MLP width I.
        layers: Number of decoder blocks L.
        heads: Attention heads a.
        kv_heads: Key/value heads (GQA); equal to heads without GQA.
        head_dim: Width of one head d.
        vocab: Vocabulary size V.
        linears: Every nn.Linear / transformers Conv1D of the model.
        other_params: Elements of every parameter that is not a quantizable linear weight
            (embeddings, lm_head, norms, biases), tied weights counted once.
        buffer_bytes: Bytes of the model's buffers (e.g. RoPE inverse frequencies, fp32).
        resid_dropout: gpt2's resid_pdrop (masks kept for backward when positive).
    """

    model_type: str
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linears: tuple[LinearLayer, ...]
    other_params: int
    buffer_bytes: int
    resid_dropout: float = 0.0


@dataclass(frozen=True)
class TaskEvalWorkload:
    """What a trial's task evaluation (spec section `eval:`) runs, in the sizes its memory depends on.

    trainables/trial_memory.py (`task_eval_workload`) builds it from the eval spec and the length
    bounds the data allows; zero rows means the evaluation has no such phase.

    Attributes:
        generate_rows: Rows per batched greedy generation (metrics that read generated text).
        prompt_len: Tokens of the longest prompt of a generation batch (the batch is left-padded to it).
        new_tokens: Tokens generated per row (eval.max_new_tokens).
        forward_rows: Rows per teacher-forced exact-match forward (prompt + reference, one pass).
        forward_len: Tokens of the longest prompt + reference of such a batch.
        loss_rows: Rows per forgetting forward (the cross-entropy of general held-out texts).
        loss_len: Tokens of the longest such text (cut to data.max_seq_length).
        forward_keeps_previous: Whether there is more than one teacher-forced batch: the evaluator's
            loop names the last batch's logits until the next forward returns, so a second batch's
            forward runs with them still allocated.
        loss_keeps_previous: The same for the forgetting batches (the last batch's fp32 logits).
    """

    generate_rows: int = 0
    prompt_len: int = 0
    new_tokens: int = 0
    forward_rows: int = 0
    forward_len: int = 0
    loss_rows: int = 0
    loss_len: int = 0
    forward_keeps_previous: bool = False
    loss_keeps_previous: bool = False


# What each part of a task-evaluation phase is called where a user reads it (EvalPhase.describe).
EVAL_PART_LABELS: dict[str, str] = {
    "kv_cache": "KV cache",
    "logits": "logits",
    "activations": "activations",
    "attention": "attention workspace",
}


@dataclass(frozen=True)
class EvalPhase:
    """One moment of a task evaluation: the bytes it adds to what the paused trial holds, by part.

    Attributes:
        name: Where in the evaluation, e.g. "generation prefill, decoder blocks", "generation decode,
            attention", "teacher-forced forward, output head" (`task_eval_phases` lists them all).
        rows: Rows of the batch.
        positions: Sequence positions at that moment (the prompt at prefill, prompt + new tokens at the
            last decode step, the whole row for a forward).
        parts: (part, bytes) in EVAL_PART_LABELS order; they add up to `bytes`.
    """

    name: str
    rows: int
    positions: int
    parts: tuple[tuple[str, int], ...]

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.parts)

    def describe(self) -> str:
        """"generation decode, output head (16 rows x 768 positions): KV cache 3,072.0 MiB, logits 23.5 MiB"."""
        parts = ", ".join(f"{EVAL_PART_LABELS[name]} {n / MIB:,.1f} MiB" for name, n in self.parts if n)
        return f"{self.name} ({self.rows} rows x {self.positions} positions): {parts}"


@dataclass(frozen=True)
class TaskEvalEstimate:
    """Predicted peak of a trial's task evaluation, which runs while training is paused.

    Training leaves allocated what it will need again: the weights, the LoRA adapters and the
    optimizer states (`held_bytes`); the Trainer zeroes gradients with set_to_none after every
    optimizer step, before it evaluates, so no gradients are held. Each phase adds its own tensors
    (`phases`); bitsandbytes still dequantizes one weight per matmul. The peak is the largest phase.

    Attributes:
        held_bytes: Weights (4-bit, constants, the rest), LoRA weights, optimizer states on the allocator.
        dequant_workspace_bytes: One dequantized copy of the largest 4-bit weight (as in training).
        phases: Every moment modelled, see `EvalPhase`.
        fragmentation: The caching-allocator overhead fraction the training estimate uses.
    """

    held_bytes: int
    dequant_workspace_bytes: int
    phases: tuple[EvalPhase, ...]
    fragmentation: float

    @property
    def peak(self) -> EvalPhase:
        """The phase with the most bytes."""
        return max(self.phases, key=lambda phase: phase.bytes)

    @property
    def allocated_bytes(self) -> int:
        return self.held_bytes + self.dequant_workspace_bytes + self.peak.bytes

    @property
    def allocator_overhead_bytes(self) -> int:
        return round(self.fragmentation * self.allocated_bytes)

    @property
    def reserved_bytes(self) -> int:
        """The evaluation's predicted torch.cuda.max_memory_reserved."""
        return self.allocated_bytes + self.allocator_overhead_bytes

    def describe(self) -> str:
        """The peak phase by part, for messages and the `estimate` table."""
        return f"task eval peak {self.reserved_bytes / MIB:,.1f} MiB reserved at {self.peak.describe()}"

    def as_dict(self) -> dict[str, Any]:
        """Totals and every phase's parts in bytes and MiB, JSON-serializable."""
        return {
            "held_bytes": self.held_bytes,
            "dequant_workspace_bytes": self.dequant_workspace_bytes,
            "allocated_bytes": self.allocated_bytes,
            "allocator_overhead_bytes": self.allocator_overhead_bytes,
            "reserved_bytes": self.reserved_bytes,
            "reserved_mib": round(self.reserved_bytes / MIB, 3),
            "peak_phase": self.peak.name,
            "phases": [
                {
                    "name": phase.name,
                    "rows": phase.rows,
                    "positions": phase.positions,
                    "bytes": phase.bytes,
                    **{f"{name}_bytes": n for name, n in phase.parts},
                    **{f"{name}_mib": round(n / MIB, 3) for name, n in phase.parts},
                }
                for phase in self.phases
            ],
        }


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak GPU memory of one trial, part by part, in bytes.

    The training parts are disjoint and add up: `training_allocated_bytes` is the sum of the tensor
    parts, `training_reserved_bytes` adds the allocator overhead. A trial with task metrics also
    predicts its task evaluation (`task_eval`, which runs while training is paused); then
    `allocated_bytes` and `reserved_bytes` are the larger of the two phases, so everything that
    reads the estimate (fits, admission, packing, `estimate`) sees the trial's real peak.
    Without task metrics both equal the training figures. See the module docstring for what each
    part holds and docs/memory.md for the formulas.
    """

    linear_weights_bytes: int
    quant_constants_bytes: int
    other_weights_bytes: int
    lora_weights_bytes: int
    lora_grads_bytes: int
    optimizer_state_bytes: int
    paged_optimizer_state_bytes: int
    activations_bytes: int
    logits_bytes: int
    dequant_workspace_bytes: int
    allocator_overhead_bytes: int
    cuda_context_bytes: int
    lora_params: int
    quantized_params: int
    task_eval: TaskEvalEstimate | None = None

    @property
    def training_allocated_bytes(self) -> int:
        """Tensors held through PyTorch's caching allocator at the training step's peak."""
        return (
            self.linear_weights_bytes
            + self.quant_constants_bytes
            + self.other_weights_bytes
            + self.lora_weights_bytes
            + self.lora_grads_bytes
            + self.optimizer_state_bytes
            + self.activations_bytes
            + self.logits_bytes
            + self.dequant_workspace_bytes
        )

    @property
    def training_reserved_bytes(self) -> int:
        """The training step's predicted torch.cuda.max_memory_reserved: allocations plus fragmentation."""
        return self.training_allocated_bytes + self.allocator_overhead_bytes

    @property
    def peak_phase(self) -> str:
        """"training", or "task eval" when the task evaluation needs more."""
        if self.task_eval is not None and self.task_eval.reserved_bytes > self.training_reserved_bytes:
            return "task eval"
        return "training"

    @property
    def allocated_bytes(self) -> int:
        """Tensors held through PyTorch's caching allocator at the peak (max_memory_allocated)."""
        if self.task_eval is None:
            return self.training_allocated_bytes
        return max(self.training_allocated_bytes, self.task_eval.allocated_bytes)

    @property
    def reserved_bytes(self) -> int:
        """The predicted torch.cuda.max_memory_reserved: allocations plus fragmentation, at the peak phase."""
        if self.task_eval is None:
            return self.training_reserved_bytes
        return max(self.training_reserved_bytes, self.task_eval.reserved_bytes)

    @property
    def total_gib(self) -> float:
        """Primary prediction, GiB: torch.cuda.max_memory_reserved (no CUDA context, no paged states)."""
        return self.reserved_bytes / GIB

    @property
    def total_with_context_gib(self) -> float:
        """Device memory the process occupies, GiB: reserved + paged optimizer states + CUDA context.

        Paged optimizer states stay allocated (in unified memory) while a task evaluation runs too.
        """
        return (self.reserved_bytes + self.paged_optimizer_state_bytes + self.cuda_context_bytes) / GIB

    @property
    def training_with_context_gib(self) -> float:
        """`total_with_context_gib` of the training step alone (equal to it without a task evaluation)."""
        return (self.training_reserved_bytes + self.paged_optimizer_state_bytes + self.cuda_context_bytes) / GIB

    def as_dict(self) -> dict[str, Any]:
        """Every part in bytes and MiB plus the totals (and the task evaluation's phases), JSON-serializable."""
        parts = asdict(self)
        parts.pop("task_eval")
        out: dict[str, Any] = dict(parts)
        for name, value in parts.items():
            if name.endswith("_bytes"):
                out[name.removesuffix("_bytes") + "_mib"] = round(value / MIB, 3)
        out["allocated_bytes"] = self.allocated_bytes
        out["reserved_bytes"] = self.reserved_bytes
        out["training_reserved_bytes"] = self.training_reserved_bytes
        out["peak_phase"] = self.peak_phase
        out["task_eval"] = self.task_eval.as_dict() if self.task_eval is not None else None
        out["total_gib"] = round(self.total_gib, 4)
        out["total_with_context_gib"] = round(self.total_with_context_gib, 4)
        return out


# --- the model's shape -----------------------------------------------------------------------

_SHAPE_CACHE: dict[str, ModelShape] = {}


def _as_config(config: Any) -> Any:
    """Return a transformers PretrainedConfig for a config object or a config.json dict."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        model_type = config.get("model_type")
        if not model_type:
            raise ValueError(
                "config: the dict has no 'model_type'; pass a config.json dict (it names its "
                "model_type, e.g. 'llama') or a transformers.PretrainedConfig"
            )
        return AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    raise TypeError(
        f"config: expected a transformers.PretrainedConfig or a config.json dict, got {type(config).__name__}"
    )


def model_shape(config: Any) -> ModelShape:
    """Read layer shapes and sizes from a config by building the model on the meta device.

    The meta device allocates nothing, so this takes well under a second even for 70B models.
    Results are cached per config content.

    Args:
        config: A transformers.PretrainedConfig or a config.json dict.

    Returns:
        The model's shape.

    Raises:
        ValueError: If a dict config has no model_type, or transformers cannot build the model.
    """
    config = _as_config(config)
    key = type(config).__name__ + json.dumps(config.to_dict(), sort_keys=True, default=str)
    shape = _SHAPE_CACHE.get(key)
    if shape is None:
        shape = _build_shape(config)
        _SHAPE_CACHE[key] = shape
    return shape


def _build_shape(config: Any) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        raise ValueError(f"config: transformers cannot build a causal LM from it ({err})") from err

    # The rule from_pretrained applies when it swaps layers for bitsandbytes' Linear4bit
    # (transformers/integrations/bitsandbytes.py): the output head, tied weights and the last
    # parameter's module stay in the compute dtype. Calling transformers' own helpers keeps the two
    # in step; tests/test_memory_estimator.py checks the result against a real quantized model.
    skip = get_keys_to_not_convert(model)
    output_head = model.get_output_embeddings()
    linears = []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
        else:
            in_features, out_features = module.in_features, module.out_features
        # bitsandbytes replaces exact nn.Linear and Conv1D, not subclasses of nn.Linear.
        convertible = type(module) is torch.nn.Linear or isinstance(module, Conv1D)
        linears.append(
            LinearLayer(
                name=name,
                in_features=in_features,
                out_features=out_features,
                has_bias=module.bias is not None,
                quantized=convertible and should_convert_module(name, skip),
                lora_candidate=module is not output_head,
            )
        )
    quantizable = sum(layer.numel for layer in linears if layer.quantized)
    # parameters() yields tied weights once, as get_memory_footprint counts them.
    total_params = sum(p.numel() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())

    hidden = config.hidden_size
    heads = config.num_attention_heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    names = {layer.name.rsplit(".", 1)[-1] for layer in linears}
    if config.model_type == "gpt2":
        family = "gpt2"
    elif {"gate_proj", "up_proj", "down_proj"} <= names and {"q_proj", "k_proj", "v_proj", "o_proj"} <= names:
        family = "gated"
    else:
        family = "other"
    return ModelShape(
        model_type=config.model_type,
        family=family,
        hidden=hidden,
        intermediate=intermediate,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        vocab=config.vocab_size,
        linears=tuple(linears),
        other_params=total_params - quantizable,
        buffer_bytes=buffer_bytes,
        resid_dropout=float(getattr(config, "resid_pdrop", 0.0) or 0.0) if family == "gpt2" else 0.0,
    )


# --- LoRA ------------------------------------------------------------------------------------


def lora_target_layers(config: Any, target_modules: str | Sequence[str]) -> list[LinearLayer]:
    """The linear layers PEFT wraps with LoRA for a target_modules setting.

    Args:
        config: A transformers.PretrainedConfig or a config.json dict.
        target_modules: "all-linear" (PEFT's meaning: every Linear/Conv1D except the output head)
            or module-name suffixes such as ["q_proj", "v_proj"]; a suffix matches a module whose
            name equals it or ends with "." + it, as in PEFT.

    Returns:
        The targeted layers, in model order.

    Raises:
        ValueError: If target_modules is empty, is a string other than "all-linear", or has a
            suffix that matches no linear layer (PEFT raises for those too).
    """
    shape = model_shape(config)
    if isinstance(target_modules, str):
        if target_modules.lower() != ALL_LINEAR:
            raise ValueError(
                f"target_modules: {target_modules!r} is not a list of module names; "
                f"allowed: {ALL_LINEAR!r} or a list of suffixes such as ['q_proj', 'v_proj']"
            )
        return [layer for layer in shape.linears if layer.lora_candidate]
    suffixes = list(target_modules)
    if not suffixes:
        raise ValueError("target_modules: an empty list targets nothing; use 'all-linear' or e.g. ['q_proj', 'v_proj']")

    def matches(name: str, suffix: str) -> bool:
        return name == suffix or name.endswith("." + suffix)

    targets = [layer for layer in shape.linears if any(matches(layer.name, s) for s in suffixes)]
    unknown = [s for s in suffixes if not any(matches(layer.name, s) for layer in shape.linears)]
    if unknown:
        linear_names = {layer.name.rsplit(".", 1)[-1] for layer in shape.linears}
        raise ValueError(
            f"target_modules: {unknown} match no linear layer of this {shape.model_type} model; "
            f"allowed: 'all-linear' or suffixes of its linear layers: {sorted(linear_names)}"
        )
    return targets


def count_lora_params(config: Any, r: int, target_modules: str | Sequence[str], use_dora: bool = False) -> int:
    """Trainable LoRA parameters: r * (in + out) per targeted layer (bias="none", as PEFT's default),
    plus with DoRA one magnitude per output feature of each targeted layer.

    Args:
        config: A transformers.PretrainedConfig or a config.json dict.
        r: LoRA rank.
        target_modules: "all-linear" or module-name suffixes; see `lora_target_layers`.
        use_dora: peft's DoRA (LoraConfig(use_dora=True)).

    Returns:
        The number PEFT's `get_nb_trainable_parameters()[0]` reports.

    Raises:
        ValueError: If r is not a positive integer or target_modules matches nothing.
    """
    _raise_if(_check_positive_int("r", r))
    targets = lora_target_layers(config, target_modules)
    return sum(r * (t.in_features + t.out_features) for t in targets) + sum(dora_magnitude_numels(targets, use_dora))


def dora_magnitude_numels(targets: Sequence[LinearLayer], use_dora: bool) -> list[int]:
    """Element count of each DoRA magnitude vector (peft's lora_magnitude_vector): out_features per targeted layer."""
    return [t.out_features for t in targets] if use_dora else []


# --- quantized weights -----------------------------------------------------------------------


def quantized_weight_parts(
    config: Any,
    quantization: str,
    double_quant: bool,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    nested_blocksize: int = DEFAULT_NESTED_BLOCKSIZE,
) -> tuple[int, int]:
    """Bytes of the 4-bit linear layers, split into (packed weights, quantization constants).

    Per quantized layer with n weights and k = ceil(n / blocksize) blocks:
    packed = ceil(n / 2) bytes; constants = 4k (fp32 absmax) without double quantization, or
    k (uint8 absmax) + 4 * ceil(k / nested_blocksize) (fp32 second level) + 4 (offset) + 1024
    (the 8-bit map) with it; plus 64 bytes for the NF4/FP4 lookup table either way.

    Args:
        config: A transformers.PretrainedConfig or a config.json dict.
        quantization: "nf4" or "fp4" (they store the same bytes).
        double_quant: bnb_4bit_use_double_quant.
        blocksize: Weights per absmax block (bitsandbytes' default 64).
        nested_blocksize: First-level constants per second-level block (bitsandbytes uses 256).

    Returns:
        (packed_bytes, constants_bytes).

    Raises:
        ValueError: On an unknown quantization (including "none": nothing is quantized) or blocksize.
    """
    problems = []
    if quantization not in ("nf4", "fp4"):
        problems.append(
            f"quantization: {quantization!r} stores no 4-bit weights; allowed here: 'nf4', 'fp4' "
            "(for 'none' the linear layers stay in the compute dtype)"
        )
    problems += _check_blocksizes(blocksize, nested_blocksize)
    _raise_if(problems)
    packed = constants = 0
    for layer in model_shape(config).linears:
        if not layer.quantized:
            continue
        blocks = math.ceil(layer.numel / blocksize)
        packed += (layer.numel + 1) // 2
        constants += _CODE_4BIT_BYTES
        if double_quant:
            constants += blocks + 4 * math.ceil(blocks / nested_blocksize) + _OFFSET_BYTES + _CODE_NESTED_BYTES
        else:
            constants += 4 * blocks
    return packed, constants


def quantized_weight_bytes(
    config: Any,
    quantization: str,
    double_quant: bool,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    nested_blocksize: int = DEFAULT_NESTED_BLOCKSIZE,
) -> int:
    """Bytes of the 4-bit linear layers: packed weights plus quantization constants.

    See `quantized_weight_parts` for the arithmetic and the arguments.
    """
    packed, constants = quantized_weight_parts(
        config, quantization, double_quant, blocksize=blocksize, nested_blocksize=nested_blocksize
    )
    return packed + constants


# --- optimizer states ------------------------------------------------------------------------


def optimizer_state_parts(
    lora_tensor_numels: Sequence[int], optimizer: str, *, param_bytes: int = LORA_PARAM_BYTES
) -> tuple[int, int]:
    """AdamW state bytes for the LoRA tensors, split into (PyTorch allocator, CUDA unified memory).

    adamw_torch keeps two moments in the parameters' dtype (8 bytes/param for fp32 adapters; the
    step counter lives on the CPU). bitsandbytes' 32-bit AdamW keeps two fp32 moments whatever
    the parameters' dtype; its 8-bit AdamW keeps two uint8 moments plus one fp32 absmax per 256
    elements each (2 + 1/32 bytes/param), except for tensors under 4096 elements, which keep fp32
    moments. Paged variants put moments of tensors with at least 1e5 elements in unified memory.

    Args:
        lora_tensor_numels: Element count of each trainable tensor (each LoRA A and B).
        optimizer: One of OPTIMIZERS.
        param_bytes: Bytes per element of the trainable tensors (4 for PEFT's fp32 adapters).

    Returns:
        (allocator_bytes, paged_bytes).

    Raises:
        ValueError: On an unknown optimizer.
    """
    _raise_if(_check_choice("optimizer", optimizer, OPTIMIZERS))
    paged = optimizer.startswith("paged_")
    eight_bit = optimizer.endswith("_8bit")
    on_allocator = in_unified = 0
    for n in lora_tensor_numels:
        if eight_bit and n >= _BNB_MIN_8BIT_SIZE:
            moments = 2 * n
            on_allocator += 2 * 4 * math.ceil(n / _BNB_STATE_BLOCKSIZE)
        elif optimizer == "adamw_torch":
            moments = 2 * param_bytes * n
        else:
            moments = 8 * n
        if paged and n >= _BNB_PAGED_MIN_NUMEL:
            in_unified += moments
        else:
            on_allocator += moments
    return on_allocator, in_unified


# --- activations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Precision:
    """Byte widths of the tensors a training step saves, from the dtype settings.

    Attributes:
        e: Compute dtype bytes (the 16-bit or 32-bit matmul inputs and outputs).
        autocast: Whether the forward runs under torch.autocast (16-bit compute only).
        lora: Bytes per LoRA weight element.
        upcast: Whether prepare_model_for_kbit_training upcast the non-4-bit parameters to fp32,
            which makes the residual stream and bitsandbytes' layer outputs fp32.
        cpu: Whether the step runs on CPU, where dropout is not fused: it keeps its mask in the
            dtype of its input instead of CUDA's bool mask.
    """

    e: int
    autocast: bool
    lora: int
    upcast: bool
    cpu: bool = False

    def mask(self, input_bytes: int) -> int:
        """Bytes per element of a dropout mask over an input of `input_bytes` per element."""
        return input_bytes if self.cpu else _DROPOUT_MASK_BYTES

    @property
    def attention(self) -> int:
        """Bytes of SDPA's inputs and output: autocast casts them to 16 bits, else the stream's dtype."""
        return 4 if self.upcast and not self.autocast else self.e

    @property
    def mlp(self) -> int:
        """Bytes of the MLP's activations: bitsandbytes returns its output in its input's dtype."""
        return 4 if self.upcast else self.e

    @property
    def stream(self) -> int:
        """Bytes of the residual stream and of what the projections return, keys and values included:
        fp32 once upcast (the fp32 norms feed bitsandbytes, which answers in its input's dtype), else e."""
        return 4 if self.upcast else self.e


def _no_activation_model(shape: ModelShape) -> ValueError:
    """The error for a model family whose activations (training or no-grad) are not modelled."""
    return ValueError(
        f"config: no activation model for model_type {shape.model_type!r}; supported: llama-style "
        "decoders with q/k/v/o_proj and gate/up/down_proj (llama, mistral, qwen2, ...) and gpt2"
    )


def _block_stages(shape: ModelShape, p: _Precision) -> list[tuple[tuple[str, ...], int]]:
    """What one decoder block saves for backward, in forward order, whatever LoRA targets.

    Each stage is (module suffixes whose LoRA input enters here, bytes per token saved by the ops
    from there to the next stage). A block whose first targeted layer comes late saves nothing
    before it when nothing upstream needs a gradient, which is how the first targeted block behaves.
    """
    h, inter, a, d = shape.hidden, shape.intermediate, shape.heads, shape.head_dim
    ea, em = p.attention, p.mlp
    if shape.family == "gated":
        # RMSNorm upcasts its input to fp32 and keeps it with rsqrt(var): 4h + 4. SDPA keeps q, k, v
        # after RoPE (k and v have kv_heads under GQA), the fp32 logsumexp (4a) and its output, which
        # o_proj's LoRA reuses. SwiGLU keeps gate_proj's output for SiLU and SiLU's and up_proj's
        # outputs for the product.
        qkv = ea * (a * d + 2 * shape.kv_heads * d) + 4 * a
        return [
            ((), 4 * h + 4),
            (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), qkv),
            (("self_attn.o_proj",), ea * a * d + 4 * h + 4),
            (("mlp.gate_proj", "mlp.up_proj"), 3 * em * inter),
            (("mlp.down_proj",), 0),
        ]
    if shape.family == "gpt2":
        # LayerNorm keeps its fp32 input (autocast upcasts it) with mean and rstd: 4h + 8. c_attn's
        # output stays whole because q, k, v are views of it, and SDPA adds its logsumexp and output.
        # The tanh GELU keeps its input and 0.5x in the MLP's dtype and tanh and 1 + tanh in fp32
        # (autocast runs pow and tanh in fp32). Resid dropout keeps a bool mask after each c_proj.
        mask = p.mask(em) * h if shape.resid_dropout > 0 else 0
        return [
            ((), 4 * h + 8),
            (("attn.c_attn",), 3 * ea * h + 4 * a),
            (("attn.c_proj",), ea * h + mask + 4 * h + 8),
            (("mlp.c_fc",), 2 * em * inter + 2 * 4 * inter),
            (("mlp.c_proj",), mask),
        ]
    raise _no_activation_model(shape)


def _lora_bytes_per_token(targets: Sequence[LinearLayer], r: int, p: _Precision, lora_dropout: float) -> int:
    """Bytes per token that LoRA adds to the saved activations of the targeted layers.

    lora_A keeps its input for the weight gradient and lora_B keeps lora_A's r-wide output. When
    the tensor a layer reads already has lora_A's dtype, lora_A keeps that very tensor: siblings
    reading it (q/k/v, gate/up) share it and an attention output projection reuses what SDPA
    keeps. Otherwise each layer keeps its own cast copy (autocast's, or PEFT's cast to the adapter
    dtype without autocast). With dropout each layer keeps its own dropped input and the mask.
    """
    total = 0
    shared_seen: set[tuple[str, frozenset[str]]] = set()
    for layer in targets:
        parent, _, leaf = layer.name.rpartition(".")
        reads_sdpa_output = any(layer.name.endswith("." + s) for s in _ATTENTION_OUTPUT_PROJECTIONS)
        reads = p.attention if reads_sdpa_output else (4 if p.upcast else p.e)
        lora_in = p.e if p.autocast else p.lora
        total += lora_in * r
        if lora_dropout > 0:
            total += (lora_in + p.mask(lora_in)) * layer.in_features
        elif reads != lora_in:
            total += lora_in * layer.in_features
        elif reads_sdpa_output:
            continue
        else:
            group = next((g for g in _SHARED_INPUT_GROUPS if leaf in g), None)
            if group is not None:
                if (parent, group) in shared_seen:
                    continue
                shared_seen.add((parent, group))
            total += reads * layer.in_features
    return total


def _skipped_before_first_target(
    shape: ModelShape,
    p: _Precision,
    stages: list[tuple[tuple[str, ...], int]],
    targets: Sequence[LinearLayer],
    lora_dropout: float,
) -> int:
    """Bytes per token the first targeted block does not save: what precedes its first target."""
    skipped = 0
    for suffixes, nbytes in stages:
        hit = {s for s in suffixes if any(t.name.endswith("." + s) for t in targets)}
        if not hit:
            skipped += nbytes
            continue
        if lora_dropout > 0:
            # These layers' inputs need no gradient, so their dropout keeps no mask.
            first = [t for t in targets if any(t.name.endswith("." + s) for s in hit)]
            skipped += p.mask(p.e if p.autocast else p.lora) * sum(t.in_features for t in first)
        if shape.family == "gated" and hit & {"mlp.gate_proj", "mlp.up_proj"} == hit:
            # SiLU(gate) * up keeps only the factor the other side's gradient needs: with LoRA on
            # gate_proj alone up's output is kept, on up_proj alone SiLU's output is.
            if hit == {"mlp.gate_proj"}:
                skipped += p.mlp * shape.intermediate
            elif hit == {"mlp.up_proj"}:
                skipped += 2 * p.mlp * shape.intermediate
        return skipped
    return 0  # a target outside the known stages: assume nothing is skipped


def activation_bytes(
    shape: ModelShape,
    targets: Sequence[LinearLayer],
    *,
    r: int,
    compute_bytes: int,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    autocast: bool = True,
    lora_dropout: float = 0.0,
    lora_bytes: int = LORA_PARAM_BYTES,
    upcast_non_quantized: bool = False,
    fused_lm_head: bool = False,
    device: str = "cuda",
    packing: bool = False,
) -> int:
    """Bytes of the tensors saved for backward at the start of the backward pass.

    Without checkpointing every block keeps its stages (`_block_stages`) and its LoRA inputs,
    except that nothing upstream of the first LoRA layer needs a gradient: blocks before it save
    nothing and its own block saves from its first targeted layer on. The final norm keeps its
    fp32 input. With checkpointing each block keeps only its input (e*h per token) and one
    block's full set is live again while it is recomputed. Both add the int64 labels, RoPE's
    cos/sin and, under 16-bit autocast, the 16-bit copies autocast makes of fp32 weights that
    matmuls keep for backward: the LoRA weights, and an upcast lm_head's unless the LM head is
    fused. The loss's own tensors are counted in the logits part, not here.

    Args:
        shape: From `model_shape`.
        targets: From `lora_target_layers`.
        r: LoRA rank.
        compute_bytes: 2 for bfloat16/float16, 4 for float32.
        batch_size: Micro batch size.
        seq_len: Tokens per sequence (padded length).
        gradient_checkpointing: Whether each decoder block is checkpointed.
        autocast: Whether the forward runs under torch.autocast in the compute dtype (Trainer
            bf16=True / fp16=True). Ignored for float32.
        lora_dropout: LoRA dropout probability.
        lora_bytes: Bytes per element of the LoRA weights (4 for PEFT's fp32 adapters).
        upcast_non_quantized: Whether peft's prepare_model_for_kbit_training upcast the model.
        fused_lm_head: Whether the LM head runs through TRL's fused, tiled log-prob kernel.
        device: "cuda" or "cpu" (CPU dropout keeps its masks in the input's dtype, not as bools).
        packing: Rows of packed examples with their own position ids: rope's cos/sin per row, and
            SDPA's block-diagonal boolean mask (b s^2).

    Returns:
        Bytes.

    Raises:
        ValueError: If the model's family has no activation model.
    """
    e = compute_bytes
    p = _Precision(e=e, autocast=autocast and e < 4, lora=lora_bytes, upcast=upcast_non_quantized, cpu=device == "cpu")
    tokens = batch_size * seq_len
    by_block: dict[int, list[LinearLayer]] = {}
    outside: list[LinearLayer] = []
    for layer in targets:
        index = _block_index(layer.name)
        (by_block.setdefault(index, []) if index is not None else outside).append(layer)
    stages = _block_stages(shape, p)
    base = sum(nbytes for _, nbytes in stages)
    per_block = [base + _lora_bytes_per_token(by_block.get(i, []), r, p, lora_dropout) for i in range(shape.layers)]
    final_norm = 4 * shape.hidden + (4 if shape.family == "gated" else 8)
    lora_outside = _lora_bytes_per_token(outside, r, p, lora_dropout)
    # Checkpointed blocks keep their inputs: the residual stream, fp32 once upcast.
    stream = 4 if p.upcast else e
    if gradient_checkpointing:
        per_token = shape.layers * stream * shape.hidden + max(per_block) + final_norm + lora_outside
    elif by_block:
        first = min(by_block)
        skipped = _skipped_before_first_target(shape, p, stages, by_block[first], lora_dropout)
        per_token = sum(per_block[first:]) - skipped + final_norm + lora_outside
    else:
        per_token = lora_outside  # only layers outside the blocks (e.g. lm_head) train
    labels = 8 * tokens
    rope = 2 * p.mlp * seq_len * shape.head_dim if shape.family == "gated" else 0
    mask = 0
    if packing:  # position ids per row: per-row rope tables, and the mask that keeps examples apart
        rope *= batch_size
        mask = batch_size * seq_len * seq_len
    lora_params = sum(r * (t.in_features + t.out_features) for t in targets)
    weight_copies = e * lora_params if p.autocast and e < lora_bytes else 0
    if p.autocast and p.upcast and not fused_lm_head:
        weight_copies += e * shape.vocab * shape.hidden  # the fp32 lm_head, cast for its matmul
    return per_token * tokens + labels + rope + mask + weight_copies


def logits_bytes(
    shape: ModelShape,
    *,
    compute_bytes: int,
    batch_size: int,
    seq_len: int,
    autocast: bool = True,
    upcast_non_quantized: bool = False,
    fused_lm_head: bool = False,
    device: str = "cuda",
) -> int:
    """Bytes the loss holds at its peak, at the start of backward.

    The model's own loss (labels passed to forward) upcasts the logits to fp32 and keeps the fp32
    log-softmax; its gradient and the fp32 logits' gradient join it in backward: 12 bytes per token
    and vocabulary entry. TRL's fused LM head (SFTTrainer, `fused_lm_head=True`) never builds the
    logits: it projects tiles of 4096 tokens x 32768 vocabulary entries, keeps a copy of the
    hidden states for backward and accumulates their gradient in fp32 (trl/kernels/chunked_logprob.py).
    It scores the shifted positions only (each row but its last token). On CUDA (Triton) it keeps
    just the labelled ones, a number the config cannot tell, so b x s stands as the bound there; on
    CPU it scores every shifted position, b x (s - 1).

    Args:
        shape: From `model_shape`.
        compute_bytes: 2 for bfloat16/float16, 4 for float32.
        batch_size: Micro batch size.
        seq_len: Tokens per sequence.
        autocast: Whether the forward runs under torch.autocast (16-bit compute only).
        upcast_non_quantized: Whether prepare_model_for_kbit_training upcast the model to fp32.
        fused_lm_head: Whether TRL's fused LM head computes the loss.
        device: "cuda" or "cpu" (how many positions the fused head scores, see above).

    Returns:
        Bytes.
    """
    tokens = batch_size * seq_len
    if not fused_lm_head:
        return 3 * 4 * tokens * shape.vocab
    if device == "cpu":
        tokens = batch_size * (seq_len - 1)
    autocast = autocast and compute_bytes < 4
    hidden = 4 if upcast_non_quantized else compute_bytes  # the final norm's output dtype
    tile_dtype = compute_bytes if autocast else hidden
    tile_tokens, tile_rows = min(tokens, _TRL_TOKEN_TILE), min(shape.vocab, _TRL_VOCAB_TILE)
    # trl allocates its tile buffer at the full tile width, whatever the vocabulary: a model with
    # fewer than 32768 entries (the builtin tiny ones) still holds tokens x 32768 values.
    tile = tile_tokens * _TRL_VOCAB_TILE * tile_dtype
    # Per-tile casts of the hidden states and the lm_head rows when their dtype differs.
    casts = (tile_tokens + tile_rows) * shape.hidden * tile_dtype if tile_dtype != hidden else 0
    per_token = shape.hidden * (hidden + 4) + _TRL_PER_TOKEN_STATS
    return tile + casts + per_token * tokens


# --- the task evaluation ---------------------------------------------------------------------
#
# trainables/task_metrics.py `TaskEvaluator` runs inside the Trainer's on_evaluate callback, under
# torch.no_grad, with training paused. Read from the installed libraries (transformers 5.24, peft
# 0.21, accelerate 1.16, torch 2.13):
#
# * generation (`model.generate`, peft's generate calling the base model's): greedy, left-padded,
#   use_cache=True. transformers passes logits_to_keep=1 to every forward (prefill included), so the
#   head computes the last position only, and `_sample` copies it to fp32 for the argmax. It calls the
#   base model directly, outside accelerate's autocast wrapper of the peft model's forward, so it runs
#   without autocast: after prepare_model_for_kbit_training the residual stream, the projections'
#   outputs and therefore the keys and values in the DynamicCache are fp32.
# * forwards (teacher-forced exact match, forgetting) call the peft model, whose forward accelerate
#   wrapped with autocast and an fp32 conversion of its outputs when the Trainer trains in 16 bits.
#   The Trainer sets config.use_cache=False, so they build no cache, and they compute the logits of
#   every position.
# * SDPA gets a padding mask, so for several queries (prefill, forwards) transformers repeats each
#   layer's keys and values to all heads (repeat_kv) before the kernel; a single decode query is
#   packed instead (pack_gqa). The DynamicCache grows by torch.cat: one layer's keys (then values)
#   exist twice for a moment at each step.
# * TaskEvaluator's forward loops name the last batch's logits until the next forward returns.
#
# The phases were checked against torch.profiler's allocator events on CPU (docs/memory.md).


def kv_cache_bytes(shape: ModelShape, *, rows: int, positions: int, kv_bytes: int) -> int:
    """Bytes of the KV cache: keys and values of every layer for `rows` x `positions` tokens.

    2 (K and V) x layers x num_key_value_heads x head_dim x kv_bytes per token.

    Args:
        shape: From `model_shape`.
        rows: Rows generated together (the generation batch).
        positions: Cached positions per row (prompt + tokens generated so far).
        kv_bytes: Bytes per element: the dtype k_proj / v_proj return (`_Precision.stream`).
    """
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_bytes * rows * positions


def _inference_moments(shape: ModelShape, targets: Sequence[LinearLayer], p: _Precision) -> tuple[int, int]:
    """Bytes per token a no-grad forward holds inside one decoder block: (attention moment, MLP moment).

    Nothing is saved for backward, so each tensor is freed once nothing refers to it any more; what
    stays is what a Python frame still names. Always alive: the token embeddings (the model's forward
    keeps `inputs_embeds`) and the block's input (the caller's reference); the position tables are
    counted apart (`_position_table_bytes`). Then:

    * attention: the normed input with q, k, v and RoPE's three q-sized temporaries, or at the kernel
      q/k/v (and their autocast copies), keys and values repeated to all heads, the output and its
      contiguous copy;
    * MLP: the residual after attention and its normed copy (gpt2 also keeps the attention output)
      with the MLP's temporaries: SiLU(gate) * up holds three I-wide tensors, and a LoRA on up_proj one
      more (peft adds the adapter's output to a clone of the base output: base, adapter output and sum
      are alive while SiLU(gate) waits); gpt2's tanh GELU holds its input and three temporaries.

    Checked against torch.profiler's allocator events on CPU (docs/memory.md).
    """
    h, inter, a, kv, d = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    w, ea = p.stream, p.attention
    adapted = {t.name.rsplit(".", 1)[-1] for t in targets}
    held = 2 * w * h
    if shape.family == "gated":
        rope = w * d * (a + 2 * kv) + 3 * w * a * d
        casts = ea * d * (a + 2 * kv) if ea != w else 0
        repeated = 2 * ea * a * d if a > kv else 0
        kernel = w * d * (a + 2 * kv) + casts + repeated + 2 * ea * a * d
        mlp = w * inter * (4 if "up_proj" in adapted else 3)
        return held + w * h + max(rope, kernel), held + 2 * w * h + mlp
    if shape.family == "gpt2":
        attention = 3 * w * h * (3 if "c_attn" in adapted else 1) + 2 * ea * h
        return held + w * h + attention, held + 3 * w * h + 4 * w * inter
    raise _no_activation_model(shape)


def _position_table_bytes(shape: ModelShape, p: _Precision) -> int:
    """Bytes per position of what a forward keeps per position id: RoPE's cos and sin, gpt2's position embeddings.

    Per row when the rows have their own position ids (generation derives them from the left-padded
    attention mask), once per position otherwise (the forwards pass none).
    """
    return p.stream * (shape.hidden if shape.family == "gpt2" else 2 * shape.head_dim)


def _inference_activation_bytes(
    shape: ModelShape, targets: Sequence[LinearLayer], p: _Precision, rows: int, queries: int, keys: int, per_row: bool
) -> int:
    """No-grad activations of a forward of rows x queries tokens attending to `keys` positions.

    The larger of the attention moment, with the additive mask SDPA makes of the bool padding mask
    (`keys` wide, in the attention dtype), and the MLP moment; plus the position tables.
    """
    attention, mlp = _inference_moments(shape, targets, p)
    tokens = rows * queries
    tables = _position_table_bytes(shape, p) * queries * (rows if per_row else 1)
    return max(tokens * attention + p.attention * tokens * keys, tokens * mlp) + tables


def _head_logits_bytes(shape: ModelShape, tokens: int, p: _Precision, head_bytes: int, loss: bool) -> int:
    """Bytes of the full-sequence logits a task-evaluation forward holds at its output head.

    Under accelerate's autocast the head's matmul runs in 16 bits (with a 16-bit copy of an fp32
    head's weight) and the wrapper converts the 16-bit logits to fp32: both are alive for a moment.
    Without autocast the logits come in the head's dtype. The forgetting loss then holds fp32 logits,
    the contiguous copy of all but the last position and cross-entropy's log-softmax: 12 bytes each.
    """
    values = tokens * shape.vocab
    if p.autocast:
        weight_copy = shape.vocab * shape.hidden * p.e if head_bytes != p.e else 0
        out = max(weight_copy + p.e * values, (p.e + 4) * values)
    else:
        out = head_bytes * values
    return max(out, 12 * values) if loss else out


def task_eval_phases(
    shape: ModelShape,
    targets: Sequence[LinearLayer],
    workload: TaskEvalWorkload,
    *,
    compute_bytes: int,
    autocast: bool = True,
    lora_bytes: int = LORA_PARAM_BYTES,
    upcast_non_quantized: bool = False,
    device: str = "cuda",
) -> tuple[EvalPhase, ...]:
    """The moments of a task evaluation, each with the bytes it adds to what the paused trial holds.

    Each phase is one moment; its parts are alive together and add up. Generation (b rows, prompt
    P, N new tokens, T = P + N positions; kv = 2 x layers x kv_heads x head_dim x stream bytes per
    token, `kv_cache_bytes`):

    * prefill, decoder blocks: KV cache b x P + no-grad activations of b x P tokens
      (`_inference_activation_bytes`) + the bool padding mask b x P x P;
    * prefill, output head: KV cache b x P + the final norm's output + the last position's logits
      (logits_to_keep=1: b x V in the head's dtype, and _sample's fp32 copy);
    * decode, attention (last step): KV cache b x T + one layer's keys again while torch.cat grows
      the cache (b x T x kv_heads x head_dim) + the last step's fp32 scores (b x V x 4);
    * decode, output head (last step): KV cache b x T + logits b x V x (head + 4 + 4).

    Forwards (teacher-forced exact match, forgetting; b rows of S tokens), each with the last batch's
    logits when there is one (`TaskEvalWorkload.forward_keeps_previous`):

    * decoder blocks: no-grad activations of b x S tokens + the padding mask b x S x S;
    * output head: the full b x S x V logits (`_head_logits_bytes`) + the final hidden states.

    Args:
        shape: From `model_shape`.
        targets: From `lora_target_layers`.
        workload: What the evaluation runs (rows and lengths; zero rows: no such phase).
        compute_bytes: 2 for bfloat16/float16, 4 for float32.
        autocast: Whether training runs under 16-bit autocast: accelerate then wraps the peft model's
            forward with it, which the forwards use and generation does not.
        lora_bytes: Bytes per LoRA weight element.
        upcast_non_quantized: Whether prepare_model_for_kbit_training upcast the model (fp32 stream,
            fp32 keys and values, fp32 head).
        device: "cuda" or "cpu".

    Returns:
        The phases, in the order the evaluation reaches them.

    Raises:
        ValueError: If the model's family has no activation model.
    """
    e = compute_bytes
    cpu = device == "cpu"
    gen = _Precision(e=e, autocast=False, lora=lora_bytes, upcast=upcast_non_quantized, cpu=cpu)
    fwd = _Precision(e=e, autocast=autocast and e < 4, lora=lora_bytes, upcast=upcast_non_quantized, cpu=cpu)
    head = 4 if upcast_non_quantized else e  # the output head is never quantized: the other weights' dtype
    d, vocab = shape.head_dim, shape.vocab
    phases: list[EvalPhase] = []
    if workload.generate_rows:
        b, prompt = workload.generate_rows, workload.prompt_len
        total = prompt + workload.new_tokens
        prefill_cache = kv_cache_bytes(shape, rows=b, positions=prompt, kv_bytes=gen.stream)
        phases.append(
            EvalPhase(
                "generation prefill, decoder blocks",
                b,
                prompt,
                (
                    ("kv_cache", prefill_cache),
                    ("activations", _inference_activation_bytes(shape, targets, gen, b, prompt, prompt, per_row=True)),
                    ("attention", b * prompt * prompt),  # the bool padding mask
                ),
            )
        )
        phases.append(
            EvalPhase(
                "generation prefill, output head",
                b,
                prompt,
                (
                    ("kv_cache", prefill_cache),
                    ("logits", b * vocab * (head + 4)),  # the last position only, and its fp32 copy
                    ("activations", b * prompt * shape.hidden * gen.stream),  # the final norm's output
                ),
            )
        )
        decode_cache = kv_cache_bytes(shape, rows=b, positions=total, kv_bytes=gen.stream)
        phases.append(
            EvalPhase(
                "generation decode, attention",
                b,
                total,
                (
                    ("kv_cache", decode_cache),
                    ("logits", b * vocab * 4),  # the last step's fp32 scores, still named by _sample's loop
                    ("activations", _inference_activation_bytes(shape, targets, gen, b, 1, total, per_row=True)),
                    # One layer's keys (then values) twice while torch.cat grows the cache, and the mask; a
                    # single query attends through pack_gqa, so the keys are not repeated to all heads.
                    ("attention", b * total * shape.kv_heads * d * gen.stream + b * total),
                ),
            )
        )
        phases.append(
            EvalPhase(
                "generation decode, output head",
                b,
                total,
                # This step's logits (last position), its fp32 copy, and the last step's scores.
                (("kv_cache", decode_cache), ("logits", b * vocab * (head + 8))),
            )
        )
    forwards = (
        ("teacher-forced forward", workload.forward_rows, workload.forward_len, False, workload.forward_keeps_previous),
        ("forgetting forward", workload.loss_rows, workload.loss_len, True, workload.loss_keeps_previous),
    )
    for name, b, length, loss, keeps_previous in forwards:
        if not b:
            continue
        tokens = b * length
        # The last batch's logits, as the evaluator holds them: fp32 after accelerate's conversion or the
        # loss's .float(), else the head's dtype.
        previous = tokens * vocab * (4 if fwd.autocast or loss else head) if keeps_previous else 0
        # The final norm's output, and under autocast its 16-bit copy for the head's matmul.
        hidden = tokens * shape.hidden * (fwd.stream + (fwd.e if fwd.autocast and fwd.stream != fwd.e else 0))
        activations = _inference_activation_bytes(shape, targets, fwd, b, length, length, per_row=False)
        phases.append(
            EvalPhase(
                f"{name}, decoder blocks",
                b,
                length,
                (("logits", previous), ("activations", activations), ("attention", b * length * length)),
            )
        )
        phases.append(
            EvalPhase(
                f"{name}, output head",
                b,
                length,
                (("logits", previous + _head_logits_bytes(shape, tokens, fwd, head, loss)), ("activations", hidden)),
            )
        )
    return tuple(phases)


def _check_workload(workload: Any) -> list[str]:
    if not isinstance(workload, TaskEvalWorkload):
        return [f"task_eval: expected a TaskEvalWorkload or None, got {type(workload).__name__}"]
    problems = []
    for f in fields(workload):
        value = getattr(workload, f.name)
        if f.name.endswith("_keeps_previous"):
            if not isinstance(value, bool):
                problems.append(f"task_eval.{f.name}: {value!r} must be True or False")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"task_eval.{f.name}: {value!r} must be a whole number >= 0")
    if problems:
        return problems
    for rows, lengths in (
        ("generate_rows", ("prompt_len", "new_tokens")),
        ("forward_rows", ("forward_len",)),
        ("loss_rows", ("loss_len",)),
    ):
        for length in lengths:
            if getattr(workload, rows) and not getattr(workload, length):
                problems.append(f"task_eval.{length}: must be positive when {rows} is {getattr(workload, rows)}")
    return problems


def _block_index(name: str) -> int | None:
    """The decoder block a module sits in ("model.layers.3.mlp.up_proj" -> 3), None outside blocks."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "layer", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


# --- the estimate ----------------------------------------------------------------------------


def estimate_peak_memory(
    config: Any,
    *,
    quantization: Quantization,
    double_quant: bool,
    compute_dtype: ComputeDType,
    r: int,
    target_modules: str | Sequence[str],
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    optimizer: Optimizer,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    packing: bool = False,
    autocast: bool = True,
    lora_dtype: ComputeDType = "float32",
    upcast_non_quantized: bool = False,
    fused_lm_head: bool = False,
    device: str = "cuda",
    task_eval: TaskEvalWorkload | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    nested_blocksize: int = DEFAULT_NESTED_BLOCKSIZE,
    fragmentation: float = DEFAULT_FRAGMENTATION,
    cuda_context_mib: int = DEFAULT_CUDA_CONTEXT_MIB,
) -> MemoryEstimate:
    """Predict the peak GPU memory of one QLoRA (or 16-bit LoRA) training trial.

    The setup modelled by default: transformers' from_pretrained with BitsAndBytesConfig (or no
    quantization) and dtype=compute_dtype, no prepare_model_for_kbit_training upcast, PEFT LoRA
    with default fp32 adapters, SDPA attention without a padding mask, use_cache=False, the model
    computing the loss from full logits (labels passed to forward), and one optimizer step already
    taken (its states exist). `upcast_non_quantized`, `lora_dtype` and `fused_lm_head` describe
    other setups, e.g. trainables/qlora.py's (prepare_model_for_kbit_training, then TRL's
    SFTTrainer, which casts QLoRA adapters to bf16 and fuses the LM head). docs/memory.md lists
    every assumption.

    Args:
        config: A transformers.PretrainedConfig or a config.json dict.
        quantization: "nf4" | "fp4" (4-bit base weights) | "none" (16-bit LoRA baseline: the
            linear layers stay in compute_dtype).
        double_quant: bnb_4bit_use_double_quant; ignored for "none".
        compute_dtype: "bfloat16" | "float16" | "float32": bnb_4bit_compute_dtype and the dtype of
            the non-quantized weights and activations.
        r: LoRA rank.
        target_modules: "all-linear" or module-name suffixes such as ["q_proj", "v_proj"].
        batch_size: Micro batch size (per optimizer micro-step; gradient accumulation adds nothing).
        seq_len: Padded sequence length in tokens.
        gradient_checkpointing: Whether decoder blocks are checkpointed.
        optimizer: "adamw_torch" | "adamw_8bit" | "paged_adamw_8bit" | "paged_adamw_32bit".
        lora_dropout: LoRA dropout probability; above 0 each targeted layer keeps its own dropped
            input and mask.
        use_dora: peft's DoRA: counts its magnitude vectors (fp32, out_features per targeted layer),
            their gradients and optimizer states. Not modelled: the activations DoRA adds for
            backward and its per-step weight-norm temporaries (trainables/trial_memory.py,
            `not_modelled`, says so to the user).
        packing: Sequence packing (the `packing` knob, trainables/data.py `PackedCollator`): each of the
            `batch_size` rows holds several examples, with position ids restarting per example, so
            rope's tables are per row (b x s instead of s) and SDPA gets a block-diagonal boolean
            mask (b s^2 bytes). Without packing every row counts as padded to seq_len (a bound); with
            it, rows fill seq_len, so the bound is what a step really holds.
        autocast: Whether a 16-bit compute dtype runs under torch.autocast (Trainer bf16/fp16=True).
            Without it PEFT casts each LoRA input to fp32, one copy per targeted layer.
        lora_dtype: dtype of the LoRA weights, their gradients and adamw_torch's moments:
            "float32" is PEFT's default (autocast_adapter_dtype=True); the compute dtype matches
            get_peft_model(..., autocast_adapter_dtype=False), TRL's SFTTrainer for 4-bit models
            and torchtune / Lit-GPT recipes.
        upcast_non_quantized: Whether peft's prepare_model_for_kbit_training ran: every parameter
            but the 4-bit weights becomes fp32, and so do the residual stream and bitsandbytes'
            layer outputs. Only for quantized models.
        fused_lm_head: Whether the loss comes from TRL's fused LM head (SFTTrainer in TRL 1.x passes
            fused_lm_head=True) instead of full (batch, seq, vocab) logits.
        device: "cuda" (the default: what every prediction of VRAM uses) or "cpu", for the tensor bytes
            of a CPU step (a trial's measured tensor peak): CPU dropout keeps its masks in the
            input's dtype instead of bools, and TRL's fused head scores all b x (s - 1) shifted
            positions. Nothing else differs; the dtypes are the caller's (fp32 on CPU).
        task_eval: The trial's task evaluation (eval.metrics), if it has one: its generation and
            forwards are predicted too (`task_eval_phases`), with the weights, adapters and optimizer
            states training leaves allocated, and the estimate's peak is the larger of training and
            evaluation. None: training only (the figures do not change).
        blocksize: 4-bit absmax block (64 in bitsandbytes).
        nested_blocksize: Double-quantization second-level block (256 in bitsandbytes).
        fragmentation: Caching-allocator overhead as a fraction of allocated bytes.
        cuda_context_mib: CUDA context, reported separately (max_memory_reserved does not see it).

    Returns:
        The estimate, part by part.

    Raises:
        ValueError: Listing every invalid argument with its value and the allowed values.
    """
    problems = []
    problems += _check_choice("quantization", quantization, QUANTIZATIONS)
    problems += _check_choice("compute_dtype", compute_dtype, tuple(DTYPE_BYTES))
    problems += _check_choice("optimizer", optimizer, OPTIMIZERS)
    problems += _check_choice("lora_dtype", lora_dtype, tuple(DTYPE_BYTES))
    problems += _check_choice("device", device, DEVICES)
    for name, value in (("r", r), ("batch_size", batch_size), ("seq_len", seq_len)):
        problems += _check_positive_int(name, value)
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        problems.append(f"lora_dropout: {lora_dropout!r} is outside [0, 1); use a fraction such as 0.05")
    for flag, value in (("use_dora", use_dora), ("packing", packing)):
        if not isinstance(value, bool):
            problems.append(f"{flag}: {value!r} must be True or False")
    if not isinstance(fragmentation, (int, float)) or fragmentation < 0:
        problems.append(f"fragmentation: {fragmentation!r} must be a fraction >= 0, e.g. 0.10")
    if not isinstance(cuda_context_mib, int) or cuda_context_mib < 0:
        problems.append(f"cuda_context_mib: {cuda_context_mib!r} must be a whole number of MiB >= 0")
    if task_eval is not None:
        problems += _check_workload(task_eval)
    if quantization in ("nf4", "fp4"):
        problems += _check_blocksizes(blocksize, nested_blocksize)
    elif upcast_non_quantized:
        problems.append(
            f"upcast_non_quantized: True needs a 4-bit model, got quantization={quantization!r}; "
            "prepare_model_for_kbit_training is for quantized models (set it False or use 'nf4'/'fp4')"
        )
    _raise_if(problems)

    shape = model_shape(config)
    targets = lora_target_layers(config, target_modules)
    e = DTYPE_BYTES[compute_dtype]
    lora_bytes = DTYPE_BYTES[lora_dtype]
    quantizable = [layer for layer in shape.linears if layer.quantized]
    quantized_params = sum(layer.numel for layer in quantizable)

    if quantization == "none":
        linear_bytes, constants_bytes, workspace = quantized_params * e, 0, 0
    else:
        linear_bytes, constants_bytes = quantized_weight_parts(
            config, quantization, double_quant, blocksize=blocksize, nested_blocksize=nested_blocksize
        )
        # bitsandbytes dequantizes the whole weight to the compute dtype for each matmul.
        workspace = max((layer.numel for layer in quantizable), default=0) * e

    lora_numels = [n for t in targets for n in (r * t.in_features, t.out_features * r)]
    magnitude_numels = dora_magnitude_numels(targets, use_dora)
    lora_params = sum(lora_numels) + sum(magnitude_numels)
    adapter_bytes = sum(lora_numels) * lora_bytes + sum(magnitude_numels) * DORA_MAGNITUDE_BYTES
    optimizer_bytes, paged_bytes = optimizer_state_parts(lora_numels, optimizer, param_bytes=lora_bytes)
    magnitude_optimizer, magnitude_paged = optimizer_state_parts(
        magnitude_numels, optimizer, param_bytes=DORA_MAGNITUDE_BYTES
    )
    optimizer_bytes += magnitude_optimizer
    paged_bytes += magnitude_paged
    activations = activation_bytes(
        shape,
        targets,
        r=r,
        compute_bytes=e,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        autocast=autocast,
        lora_dropout=lora_dropout,
        lora_bytes=lora_bytes,
        upcast_non_quantized=upcast_non_quantized,
        fused_lm_head=fused_lm_head,
        device=device,
        packing=packing,
    )
    logits = logits_bytes(
        shape,
        compute_bytes=e,
        batch_size=batch_size,
        seq_len=seq_len,
        autocast=autocast,
        upcast_non_quantized=upcast_non_quantized,
        fused_lm_head=fused_lm_head,
        device=device,
    )
    other_bytes = 4 if upcast_non_quantized else e

    parts = {
        "linear_weights_bytes": linear_bytes,
        "quant_constants_bytes": constants_bytes,
        "other_weights_bytes": shape.other_params * other_bytes + shape.buffer_bytes,
        "lora_weights_bytes": adapter_bytes,
        "lora_grads_bytes": adapter_bytes,
        "optimizer_state_bytes": optimizer_bytes,
        "activations_bytes": activations,
        "logits_bytes": logits,
        "dequant_workspace_bytes": workspace,
    }
    evaluation = None
    phases = () if task_eval is None else task_eval_phases(
        shape,
        targets,
        task_eval,
        compute_bytes=e,
        autocast=autocast,
        lora_bytes=lora_bytes,
        upcast_non_quantized=upcast_non_quantized,
        device=device,
    )
    if phases:
        # Training paused: its gradients are gone (zero_grad(set_to_none=True)), the rest stays.
        held = linear_bytes + constants_bytes + parts["other_weights_bytes"] + adapter_bytes + optimizer_bytes
        evaluation = TaskEvalEstimate(
            held_bytes=held, dequant_workspace_bytes=workspace, phases=phases, fragmentation=fragmentation
        )
    return MemoryEstimate(
        **parts,
        paged_optimizer_state_bytes=paged_bytes,
        allocator_overhead_bytes=round(fragmentation * sum(parts.values())),
        cuda_context_bytes=cuda_context_mib * MIB,
        lora_params=lora_params,
        quantized_params=quantized_params if quantization != "none" else 0,
        task_eval=evaluation,
    )


def fits(estimate: MemoryEstimate, gpu_memory_gib: float, margin: float = DEFAULT_FIT_MARGIN) -> bool:
    """Whether a trial is predicted to fit on a GPU with room to spare.

    Compares `total_with_context_gib` (reserved memory, paged optimizer states and the CUDA
    context) grown by `margin` against the GPU's memory.

    Args:
        estimate: From `estimate_peak_memory`.
        gpu_memory_gib: Total memory of the GPU in GiB, e.g.
            torch.cuda.get_device_properties(0).total_memory / 2**30.
        margin: Relative safety margin on the estimate, e.g. 0.10 for 10%.

    Returns:
        True if estimate * (1 + margin) <= gpu_memory_gib.

    Raises:
        ValueError: If gpu_memory_gib is not positive or margin is negative.
    """
    problems = []
    if not isinstance(gpu_memory_gib, (int, float)) or gpu_memory_gib <= 0:
        problems.append(f"gpu_memory_gib: {gpu_memory_gib!r} must be a positive number of GiB, e.g. 24")
    if not isinstance(margin, (int, float)) or margin < 0:
        problems.append(f"margin: {margin!r} must be a fraction >= 0, e.g. 0.10")
    _raise_if(problems)
    return estimate.total_with_context_gib * (1 + margin) <= gpu_memory_gib


# --- validation helpers ----------------------------------------------------------------------


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> list[str]:
    if value in allowed:
        return []
    return [f"{name}: {value!r} is not one of the allowed values {list(allowed)}"]


def _check_positive_int(name: str, value: Any) -> list[str]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return []
    return [f"{name}: {value!r} must be a positive integer"]


def _check_blocksizes(blocksize: Any, nested_blocksize: Any) -> list[str]:
    problems = []
    if blocksize not in BNB_BLOCKSIZES:
        problems.append(f"blocksize: {blocksize!r} is not a bitsandbytes blocksize; allowed: {list(BNB_BLOCKSIZES)}")
    if nested_blocksize != DEFAULT_NESTED_BLOCKSIZE:
        # bitsandbytes' MatMul4Bit raises NotImplementedError for any other second-level block.
        problems.append(
            f"nested_blocksize: {nested_blocksize!r} is not supported; allowed: [{DEFAULT_NESTED_BLOCKSIZE}] "
            "(bitsandbytes' 4-bit matmul only handles 256)"
        )
    return problems


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))
