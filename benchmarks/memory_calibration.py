"""CPU calibration of trainables.memory_estimator against the real libraries, as markdown tables.

Run from the repository root (a few seconds of CPU; no GPU, no network):

    flock /tmp/qlora-heavy.lock .venv/bin/python benchmarks/memory_calibration.py > /tmp/memory_calibration.md

It prints the tables docs/memory.md quotes:

1. 4-bit weights: the estimator's packed bytes plus non-quantized weights against
   `get_memory_footprint()` of tiny models that bitsandbytes quantizes on CPU, and its quantization
   constants against the bytes of the layers' quant states.
2. LoRA parameters: `count_lora_params` against PEFT's `get_nb_trainable_parameters()`.
3. Activations: the activation part plus the loss's fp32 log-probs against the bytes autograd
   saves for backward in one forward pass (saved-tensor hooks, distinct storages, parameters
   excluded), without autocast and in the sweep's own setup (prepare_model_for_kbit_training, bf16
   adapters, CPU autocast); docs/memory.md explains why these match what CUDA saves.
4. The estimator's predictions for the settings of the published measurements docs/memory.md cites.
"""

from __future__ import annotations

import tempfile
import warnings

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config
from transformers.utils import logging as hf_logging

from trainables.memory_estimator import (
    GIB,
    count_lora_params,
    estimate_peak_memory,
    lora_target_layers,
    quantized_weight_parts,
)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def tiny_config(family: str, *, tied: bool = False) -> object:
    """The 2-layer, hidden-64 models the tests use."""
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    if family == "gpt2":
        return GPT2Config(vocab_size=256, n_embd=64, n_inner=192, n_layer=2, n_head=4,
                          attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family](**common)


def quantized_model(config: object, double_quant: bool, dtype: torch.dtype) -> torch.nn.Module:
    """Save a randomly initialised model and load it back through bitsandbytes' 4-bit NF4 on CPU."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=dtype,
            ),
            dtype=dtype,
            device_map={"": "cpu"},
        )


def quant_state_bytes(model: torch.nn.Module) -> int:
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is None:
            continue
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def saved_bytes(model: torch.nn.Module, batch: int, seq: int, vocab: int) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


def pct(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.2f}%"


def weights_table() -> list[str]:
    rows = [
        "| model | double quant | predicted packed + other (B) | get_memory_footprint() (B) | diff "
        "| predicted constants (B) | quant_state tensors (B) | diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("llama", "llama (tied)", "qwen2", "mistral", "gpt2"):
        config = tiny_config(name.split()[0], tied="tied" in name)
        for double_quant in (False, True):
            model = quantized_model(config, double_quant, torch.float32)
            packed, constants = quantized_weight_parts(config, "nf4", double_quant)
            est = estimate_peak_memory(
                config, quantization="nf4", double_quant=double_quant, compute_dtype="float32", r=8,
                target_modules="all-linear", batch_size=1, seq_len=1, gradient_checkpointing=False,
                optimizer="adamw_torch",
            )
            footprint, states = model.get_memory_footprint(), quant_state_bytes(model)
            predicted = packed + est.other_weights_bytes
            rows.append(
                f"| {name} | {double_quant} | {predicted:,} | {footprint:,} | {pct(predicted, footprint)} "
                f"| {constants:,} | {states:,} | {pct(constants, states)} |"
            )
    return rows


LORA_CASES = [
    ("llama", 8, "all-linear"), ("llama", 4, ["q_proj", "v_proj"]), ("qwen2", 8, "all-linear"),
    ("qwen2", 2, ["k_proj", "gate_proj"]), ("mistral", 8, "all-linear"), ("mistral", 32, ["q_proj", "o_proj"]),
    ("gpt2", 8, "all-linear"), ("gpt2", 4, ["c_attn"]), ("gpt2", 16, ["attn.c_proj", "c_fc"]),
]


def lora_table() -> list[str]:
    from peft import LoraConfig, get_peft_model

    rows = ["| model | r | target_modules | predicted | PEFT | diff |", "|---|---:|---|---:|---:|---:|"]
    for family, r, targets in LORA_CASES:
        config = tiny_config(family)
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=r, target_modules=targets))
        predicted, actual = count_lora_params(config, r, targets), model.get_nb_trainable_parameters()[0]
        rows.append(f"| {family} | {r} | {targets} | {predicted:,} | {actual:,} | {pct(predicted, actual)} |")
    return rows


ACTIVATION_CASES = [
    ("llama", torch.float32, torch.float32, "all-linear", 0.0),
    ("llama", torch.bfloat16, torch.bfloat16, "all-linear", 0.0),
    ("llama", torch.bfloat16, torch.float32, "all-linear", 0.0),
    ("llama", torch.bfloat16, torch.bfloat16, ["q_proj", "v_proj"], 0.0),
    ("llama", torch.bfloat16, torch.bfloat16, ["o_proj", "down_proj"], 0.0),
    ("llama", torch.bfloat16, torch.bfloat16, "all-linear", 0.05),
    ("qwen2", torch.bfloat16, torch.bfloat16, "all-linear", 0.0),
    ("mistral", torch.float32, torch.float32, ["k_proj", "up_proj"], 0.0),
    ("gpt2", torch.float32, torch.float32, "all-linear", 0.0),
    ("gpt2", torch.float32, torch.float32, ["c_attn"], 0.05),
]


def activations_table(batch: int = 2, seq: int = 32) -> list[str]:
    from peft import LoraConfig, get_peft_model

    rows = [
        "| model | dtype | adapters | target_modules | lora_dropout | predicted (B) | saved by autograd (B) | diff (B) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for family, dtype, adapter_dtype, targets, dropout in ACTIVATION_CASES:
        config = tiny_config(family)
        model = quantized_model(config, True, dtype)
        model = get_peft_model(
            model, LoraConfig(r=8, target_modules=targets, lora_dropout=dropout),
            autocast_adapter_dtype=adapter_dtype == torch.float32,
        )
        model.train()
        measured = saved_bytes(model, batch, seq, 256)
        est = estimate_peak_memory(
            config, quantization="nf4", double_quant=True, compute_dtype=DTYPE_NAMES[dtype],
            lora_dtype=DTYPE_NAMES[adapter_dtype], autocast=False, r=8, target_modules=targets,
            batch_size=batch, seq_len=seq, gradient_checkpointing=False, optimizer="adamw_torch",
            lora_dropout=dropout,
        )
        predicted = est.activations_bytes + 4 * batch * seq * 256  # + the loss's fp32 log-probs
        if dropout > 0:
            # CPU's dropout keeps its mask in the dtype of its input (the adapter dtype here), CUDA's
            # native_dropout a bool: add the difference to compare like with like.
            # Masks are kept for every targeted layer but those of the first block's first stage,
            # whose inputs need no gradient (the estimator models that too).
            layers = lora_target_layers(config, targets)
            first_stage = {"q_proj", "k_proj", "v_proj", "c_attn"} if targets == "all-linear" else set(targets)
            kept = [t for t in layers if not (t.name.split(".")[2] == "0" and t.name.rsplit(".", 1)[-1] in first_stage)]
            mask = adapter_dtype.itemsize - 1
            predicted += mask * batch * seq * sum(t.in_features for t in kept)
        rows.append(
            f"| {family} | {DTYPE_NAMES[dtype]} | {DTYPE_NAMES[adapter_dtype]} | {targets} | {dropout} "
            f"| {predicted:,} | {measured:,} | {predicted - measured:+,} |"
        )
    return rows


SWEEP_SETUP_CASES = [
    ("llama", "all-linear"), ("llama", ["q_proj", "v_proj"]), ("llama", ["o_proj", "down_proj"]),
    ("qwen2", ["gate_proj"]), ("mistral", "all-linear"), ("gpt2", "all-linear"), ("gpt2", ["c_attn"]),
]


def sweep_setup_table(batch: int = 2, seq: int = 32) -> list[str]:
    """trainables/qlora.py's setup: prepare_model_for_kbit_training, bf16 adapters (TRL), bf16 autocast."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    rows = [
        "| model | target_modules | predicted (B) | saved by autograd (B) | diff (B) |",
        "|---|---|---:|---:|---:|",
    ]
    for family, targets in SWEEP_SETUP_CASES:
        config = tiny_config(family)
        model = prepare_model_for_kbit_training(quantized_model(config, True, torch.bfloat16), False)
        model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)  # what TRL's SFTTrainer does for 4-bit models
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measured = saved_bytes(model, batch, seq, 256)
        est = estimate_peak_memory(
            config, quantization="nf4", double_quant=True, compute_dtype="bfloat16", lora_dtype="bfloat16",
            upcast_non_quantized=True, r=8, target_modules=targets, batch_size=batch, seq_len=seq,
            gradient_checkpointing=False, optimizer="adamw_torch",
        )
        predicted = est.activations_bytes + 4 * batch * seq * 256  # + the loss's fp32 log-probs
        rows.append(f"| {family} | {targets} | {predicted:,} | {measured:,} | {predicted - measured:+,} |")
    return rows


# --- published settings ----------------------------------------------------------------------

LLAMA_65B = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=64, tie_word_embeddings=False)
LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
LLAMA31_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)


def published_table() -> list[str]:
    rows = [
        "| source | setting | published | our figure | predicted | diff | without logits part |",
        "|---|---|---:|---|---:|---:|---:|",
    ]

    def add(source: str, setting: str, published_gib: float, published_text: str, kind: str, **kwargs: object) -> None:
        est = estimate_peak_memory(**kwargs)
        value = {
            "reserved": est.reserved_bytes,
            "allocated": est.allocated_bytes,
            "reserved + context": est.reserved_bytes + est.cuda_context_bytes,
            "reserved + context + paged": est.reserved_bytes + est.cuda_context_bytes + est.paged_optimizer_state_bytes,
        }[kind]
        # The logits part and its share of the allocator overhead (10%), for recipes with chunked losses.
        no_logits = value - est.logits_bytes * (1.1 if kind != "allocated" else 1.0)
        rows.append(
            f"| {source} | {setting} | {published_text} | {kind} | {value / GIB:.2f} GiB "
            f"| {pct(value / GIB, published_gib)} | {no_logits / GIB:.2f} GiB |"
        )

    # QLoRA paper: Guanaco 65B on one 48 GB GPU (scripts/finetune_guanaco_65b.sh, qlora.py defaults).
    guanaco_65b = dict(
        config=LLAMA_65B, quantization="nf4", double_quant=True, compute_dtype="bfloat16", r=64,
        target_modules="all-linear", batch_size=4, seq_len=528, gradient_checkpointing=True,
        optimizer="paged_adamw_32bit", lora_dropout=0.05, lora_dtype="bfloat16",
    )
    setting = "LLaMA-65B, NF4+DQ, bf16, r=64 all-linear, b=4, s<=528, ckpt, paged_adamw_32bit, dropout 0.05, bf16 LoRA"
    for kind in ("reserved + context", "reserved + context + paged"):
        add("QLoRA paper (65B on one 48 GB GPU)", setting, 48.0, "< 48 GB (bound; 48 GiB assumed)", kind, **guanaco_65b)
    # Raschka / Lightning: Lit-GPT, Llama 2 7B, r=8 on q and v, micro batch 1, bf16-true, no checkpointing,
    # max_memory_allocated / 1e9. The sequence length is the longest Alpaca sample, not stated: 3 guesses.
    for seq in (512, 1024, 2048):
        add("Raschka, LoRA", f"Llama-2-7B bf16, r=8 q,v, b=1, s={seq}, no ckpt, adamw, dropout 0.05",
            21.33e9 / GIB, "21.33 GB", "allocated", config=LLAMA2_7B, quantization="none", double_quant=False,
            compute_dtype="bfloat16", r=8, target_modules=["q_proj", "v_proj"], batch_size=1, seq_len=seq,
            gradient_checkpointing=False, optimizer="adamw_torch", lora_dropout=0.05, lora_dtype="bfloat16",
            autocast=False)
        add("Raschka, QLoRA", f"same, NF4 (no DQ), paged AdamW 32-bit, s={seq}", 14.18e9 / GIB, "14.18 GB",
            "allocated", config=LLAMA2_7B, quantization="nf4", double_quant=False, compute_dtype="bfloat16", r=8,
            target_modules=["q_proj", "v_proj"], batch_size=1, seq_len=seq, gradient_checkpointing=False,
            optimizer="paged_adamw_32bit", lora_dropout=0.05, lora_dtype="bfloat16", autocast=False)
    # torchtune README: Llama 3.1 8B QLoRA on one RTX 4090, batch 2, packed to 2048, torch.compile.
    add("torchtune README", "Llama-3.1-8B, NF4 (torchao, DQ-like), bf16, r=8 q,k,v,o + MLP, b=2, s=2048, ckpt, "
        "AdamW, bf16 LoRA", 7.4, "7.4 GiB", "reserved", config=LLAMA31_8B, quantization="nf4", double_quant=True,
        compute_dtype="bfloat16", r=8, target_modules="all-linear", batch_size=2, seq_len=2048,
        gradient_checkpointing=True, optimizer="adamw_torch", lora_dtype="bfloat16", autocast=False)
    return rows


def main() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}; tables generated by benchmarks/memory_calibration.py\n")
    print("### 4-bit weights: estimator vs bitsandbytes (CPU, NF4, fp32 load)\n")
    print("\n".join(weights_table()))
    print("\n### LoRA parameters: estimator vs PEFT\n")
    print("\n".join(lora_table()))
    print("\n### Activations: estimator vs tensors saved for backward (CPU, b=2, s=32, r=8, no checkpointing)\n")
    print("\n".join(activations_table()))
    print("\n### Activations in the sweep's setup (upcast, bf16 adapters, CPU bf16 autocast, b=2, s=32, r=8)\n")
    print("\n".join(sweep_setup_table()))
    print("\n### Published settings: estimator predictions\n")
    print("\n".join(published_table()))


if __name__ == "__main__":
    main()
