"""Tests for trainables.memory_estimator: pure arithmetic plus checks against real tiny models.

Every model is built from a config in the test (no hub access). The real-library checks compare
with PEFT's own trainable-parameter count, with bitsandbytes' quantized tensors on CPU, and with
the tensors autograd actually saves for backward during a forward pass.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from trainables.memory_estimator import (
    LLAMA3_8B_CONFIG,
    MemoryEstimate,
    count_lora_params,
    estimate_peak_memory,
    fits,
    lora_target_layers,
    model_shape,
    quantized_weight_bytes,
    quantized_weight_parts,
)

# --- configs ---------------------------------------------------------------------------------

LLAMA3_8B = LlamaConfig(**{k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "model_type"})


def tiny(family: str, *, tied: bool = False, layers: int = 2) -> object:
    """A 2-layer model config with hidden size 64 (a multiple of the 64-weight 4-bit block)."""
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "gpt2":
        # attn_pdrop=0 keeps CPU SDPA on its flash kernel (CUDA's flash kernel does dropout itself).
        return GPT2Config(vocab_size=256, n_embd=64, n_inner=192, n_layer=layers, n_head=4,
                          attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    raise ValueError(family)


TINY_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")

BASE = dict(
    quantization="nf4",
    double_quant=True,
    compute_dtype="bfloat16",
    r=16,
    target_modules="all-linear",
    batch_size=2,
    seq_len=512,
    gradient_checkpointing=True,
    optimizer="adamw_8bit",
)


def estimate(config: object = LLAMA3_8B, **overrides: object) -> MemoryEstimate:
    return estimate_peak_memory(config, **{**BASE, **overrides})


# --- the Llama-3-8B hand calculation ---------------------------------------------------------


def test_llama3_8b_breakdown_by_hand() -> None:
    """Each part for Llama-3-8B, NF4 + double quant, bf16, r=16 all-linear, b=1, s=2048, ckpt, adamw_8bit.

    h=4096, I=14336, L=32, a=32 heads, kv=8 heads of d=128, V=128256, untied lm_head.
    """
    # Linear weights per block: q 4096*4096 = 16,777,216; k = v = 4096*1024 = 4,194,304;
    # o = 16,777,216; gate = up = down = 4096*14336 = 58,720,256.
    per_block = 2 * 16_777_216 + 2 * 4_194_304 + 3 * 58_720_256
    assert per_block == 218_103_808
    quantized = 32 * per_block
    assert quantized == 6_979_321_856
    packed = quantized // 2  # 4 bits each
    assert packed == 3_489_660_928

    # Constants without double quant: one fp32 absmax per 64 weights (0.5 bit/param) plus a
    # 16-entry fp32 NF4 table per layer (224 layers).
    blocks = quantized // 64
    assert blocks == 109_051_904
    plain_constants = 4 * blocks + 224 * 64
    assert plain_constants == 436_221_952
    # With double quant: uint8 absmax per 64 weights, fp32 per 256 of those (0.127 bit/param),
    # per layer 4 + 1024 + 64 bytes (offset, 8-bit map, NF4 table). Second-level blocks per
    # block: q, o 16,777,216/64/256 = 1024; k, v 256; gate, up, down 3584.
    second_level = 32 * 4 * (2 * 1024 + 2 * 256 + 3 * 3584)
    assert second_level == 1_703_936
    dq_constants = blocks + second_level + 224 * (4 + 1024 + 64)
    assert dq_constants == 111_000_448
    assert 32 / 64 == 0.5 and round(8 / 64 + 32 / (64 * 256), 3) == 0.127  # QLoRA §2

    # Embedding and lm_head 128256*4096 each, 65 RMSNorm weights of 4096, in bf16; two fp32
    # RoPE buffers of 64.
    other = (2 * 128_256 * 4096 + 65 * 4096) * 2 + 2 * 64 * 4
    assert other == 2_101_879_296

    # LoRA r=16 all-linear: r*(in+out) per layer.
    lora_per_block = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert lora_per_block == 1_310_720
    lora = 32 * lora_per_block
    assert lora == 41_943_040

    # adamw_8bit: 2 bytes/param + two fp32 absmax per 256 elements = 1/32 byte/param.
    optimizer = 2 * lora + lora // 32
    assert optimizer == 85_196_800

    # Activations, bytes per token per block (e = 2): RMSNorms 2*(4*4096 + 4) = 32,776;
    # SDPA q 2*4096 + k,v 2*2*1024 + out 2*4096 + lse 4*32 = 20,608; SwiGLU 3*2*14336 = 86,016;
    # LoRA inputs q/k/v 2*4096 + gate/up 2*4096 + down 2*14336 = 45,056 (o reuses SDPA's output);
    # lora_A outputs 7*2*16 = 224.
    block = 32_776 + 20_608 + 86_016 + 45_056 + 224
    assert block == 184_680
    tokens = 2048
    activations = (
        32 * 2 * 4096 * tokens  # checkpointed block inputs
        + block * tokens  # one block recomputed
        + (4 * 4096 + 4) * tokens  # final norm's fp32 input and rstd
        + 8 * tokens  # int64 labels
        + 2 * 2 * 2048 * 128  # RoPE cos and sin
        + 2 * lora  # autocast's bf16 copies of the fp32 LoRA weights
    )
    assert activations == 1_033_609_216
    logits = 12 * tokens * 128_256
    assert logits == 3_152_019_456

    est = estimate(batch_size=1, seq_len=2048)
    assert est.linear_weights_bytes == packed
    assert est.quant_constants_bytes == dq_constants
    assert est.other_weights_bytes == other
    assert est.lora_params == lora
    assert est.lora_weights_bytes == est.lora_grads_bytes == 4 * lora
    assert est.optimizer_state_bytes == optimizer
    assert est.paged_optimizer_state_bytes == 0
    assert est.activations_bytes == activations
    assert est.logits_bytes == logits
    assert est.dequant_workspace_bytes == 4096 * 14336 * 2
    assert est.cuda_context_bytes == 512 * 2**20
    allocated = packed + dq_constants + other + 8 * lora + optimizer + activations + logits + 4096 * 14336 * 2
    assert est.allocated_bytes == allocated
    assert est.allocator_overhead_bytes == round(0.10 * allocated)
    assert est.total_gib == pytest.approx(10.68, abs=0.01)

    assert quantized_weight_parts(LLAMA3_8B, "nf4", False) == (packed, plain_constants)
    assert quantized_weight_bytes(LLAMA3_8B, "nf4", True) == packed + dq_constants
    assert count_lora_params(LLAMA3_8B, 16, "all-linear") == lora


def test_paged_optimizers_page_only_large_tensors() -> None:
    """bitsandbytes pages states of tensors with >= 1e5 elements: for r=16 only gate/up B and down A."""
    paged32 = estimate(batch_size=1, seq_len=2048, optimizer="paged_adamw_32bit")
    large = 32 * 3 * 14336 * 16  # 229,376 elements each, three per block
    assert paged32.paged_optimizer_state_bytes == 8 * large == 176_160_768
    assert paged32.optimizer_state_bytes == 8 * (41_943_040 - large) == 159_383_552
    paged8 = estimate(batch_size=1, seq_len=2048, optimizer="paged_adamw_8bit")
    assert paged8.paged_optimizer_state_bytes == 2 * large
    assert paged8.optimizer_state_bytes == 2 * (41_943_040 - large) + 41_943_040 // 32


def test_sixteen_bit_baseline_keeps_linears_in_compute_dtype() -> None:
    est = estimate(quantization="none")
    assert est.linear_weights_bytes == 6_979_321_856 * 2
    assert est.quant_constants_bytes == est.dequant_workspace_bytes == est.quantized_params == 0
    assert est.total_gib > estimate().total_gib


# --- monotonicity ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [LLAMA3_8B, tiny("qwen2"), tiny("gpt2")], ids=["llama3-8b", "qwen2", "gpt2"])
@pytest.mark.parametrize(
    "knob, values",
    [
        ("r", [1, 4, 8, 16, 64, 256]),
        ("batch_size", [1, 2, 4, 8]),
        ("seq_len", [1, 128, 512, 2048, 8192]),
    ],
)
def test_monotone_in_size_knobs(config: object, knob: str, values: list[int]) -> None:
    for checkpointing in (True, False):
        totals = [estimate(config, **{knob: v, "gradient_checkpointing": checkpointing}).reserved_bytes for v in values]
        assert totals == sorted(totals) and len(set(totals)) == len(totals), (knob, totals)


@pytest.mark.parametrize(
    "smaller, larger",
    [
        (["q_proj"], ["q_proj", "v_proj"]),
        (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]),
        (["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"),
        (["down_proj"], ["gate_proj", "up_proj", "down_proj"]),
        (["o_proj"], ["o_proj", "down_proj"]),
    ],
)
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_a_subset_of_targets_never_costs_more(smaller: object, larger: object, dropout: float) -> None:
    for config in (LLAMA3_8B, tiny("mistral")):
        for autocast in (True, False):
            small = estimate(config, target_modules=smaller, lora_dropout=dropout, autocast=autocast)
            large = estimate(config, target_modules=larger, lora_dropout=dropout, autocast=autocast)
            assert small.reserved_bytes <= large.reserved_bytes
            assert small.activations_bytes <= large.activations_bytes


LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@settings(max_examples=150, deadline=None)
@given(
    larger=st.sets(st.sampled_from(LLAMA_MODULES), min_size=1),
    keep=st.lists(st.booleans(), min_size=7, max_size=7),
    dropout=st.sampled_from([0.0, 0.05]),
    autocast=st.booleans(),
    checkpointing=st.booleans(),
)
def test_any_subset_of_targets_never_costs_more(
    larger: set[str], keep: list[bool], dropout: float, autocast: bool, checkpointing: bool
) -> None:
    smaller = [m for m, k in zip(LLAMA_MODULES, keep) if k and m in larger] or [sorted(larger)[0]]
    common = dict(lora_dropout=dropout, autocast=autocast, gradient_checkpointing=checkpointing)
    small = estimate(target_modules=smaller, **common)
    large = estimate(target_modules=sorted(larger), **common)
    assert small.reserved_bytes <= large.reserved_bytes, (smaller, sorted(larger))


@pytest.mark.parametrize("config", [LLAMA3_8B, tiny("llama"), tiny("gpt2")], ids=["llama3-8b", "llama", "gpt2"])
@pytest.mark.parametrize("seq_len", [16, 512, 4096])
@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_switches_that_save_memory_never_cost_more(config: object, seq_len: int, compute_dtype: str) -> None:
    def total(**overrides: object) -> int:
        return estimate(config, seq_len=seq_len, compute_dtype=compute_dtype, **overrides).reserved_bytes

    assert total(gradient_checkpointing=True) <= total(gradient_checkpointing=False)
    if config is LLAMA3_8B:  # see test_double_quant_costs_more_on_tiny_layers
        assert total(double_quant=True) < total(double_quant=False)
    # <=: tiny LoRA tensors (< 4096 elements) keep fp32 states in an 8-bit optimizer too.
    assert total(optimizer="adamw_8bit") <= total(optimizer="adamw_torch")
    assert total(optimizer="paged_adamw_8bit") <= total(optimizer="paged_adamw_32bit")
    assert total(lora_dropout=0.0) <= total(lora_dropout=0.1)
    assert total(quantization="nf4") == total(quantization="fp4")


def test_double_quant_costs_more_on_tiny_layers() -> None:
    """Double quant saves 3 bytes per 64 weights but adds a 1 KiB 8-bit map, an offset and fp32
    second-level constants to every layer: it only pays off above ~22k weights per layer.
    The tiny test models (4096..12288 weights per layer) cost more with it, as bitsandbytes does
    (test_quantized_bytes_match_bitsandbytes checks both against real quant states).
    """
    tiny_plain = quantized_weight_parts(tiny("llama"), "nf4", False)[1]
    tiny_dq = quantized_weight_parts(tiny("llama"), "nf4", True)[1]
    assert tiny_dq > tiny_plain
    big_plain = quantized_weight_parts(LLAMA3_8B, "nf4", False)[1]
    big_dq = quantized_weight_parts(LLAMA3_8B, "nf4", True)[1]
    assert big_dq < big_plain / 3


def test_dict_config_gives_the_same_estimate() -> None:
    as_dict = json.loads(LLAMA3_8B.to_json_string())
    assert estimate(as_dict) == estimate(LLAMA3_8B)


# --- fits --------------------------------------------------------------------------------------


def test_fits_compares_the_estimate_with_context_and_margin() -> None:
    est = estimate(batch_size=1, seq_len=2048)
    assert est.total_with_context_gib == pytest.approx(est.total_gib + 0.5)
    assert fits(est, 80)
    assert not fits(est, est.total_with_context_gib * 1.05)
    assert fits(est, est.total_with_context_gib * 1.05, margin=0.0)
    assert not fits(est, 8)
    # Batch 16 x 4096 tokens without checkpointing: ~94 GiB of logits alone.
    big = estimate(LLAMA3_8B, batch_size=16, seq_len=4096, gradient_checkpointing=False)
    assert not fits(big, 79.1)


def test_as_dict_is_json_and_adds_mib_and_totals() -> None:
    d = estimate().as_dict()
    json.dumps(d)
    assert d["logits_mib"] == pytest.approx(d["logits_bytes"] / 2**20, abs=1e-3)
    assert d["reserved_bytes"] == d["allocated_bytes"] + d["allocator_overhead_bytes"]
    assert set(d) >= {"total_gib", "total_with_context_gib", "activations_bytes", "paged_optimizer_state_bytes"}


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            {"optimizer": "sgd"},
            r"optimizer: 'sgd' is not one of .*'adamw_torch', 'adamw_8bit', 'paged_adamw_8bit', 'paged_adamw_32bit'",
        ),
        ({"quantization": "int8"}, r"quantization: 'int8' is not one of .*'nf4', 'fp4', 'none'"),
        ({"compute_dtype": "fp16"}, r"compute_dtype: 'fp16' is not one of .*'bfloat16', 'float16', 'float32'"),
        ({"r": 0}, r"r: 0 must be a positive integer"),
        ({"batch_size": 2.5}, r"batch_size: 2.5 must be a positive integer"),
        ({"seq_len": -1}, r"seq_len: -1 must be a positive integer"),
        ({"lora_dropout": 1.5}, r"lora_dropout: 1.5 is outside \[0, 1\)"),
        ({"blocksize": 48}, r"blocksize: 48 is not a bitsandbytes blocksize; allowed: \[32, 64, 128"),
        ({"nested_blocksize": 128}, r"nested_blocksize: 128 is not supported; allowed: \[256\]"),
        ({"target_modules": ["q_proj", "c_attn"]}, r"target_modules: \['c_attn'\] match no linear layer .*'q_proj'"),
        ({"target_modules": []}, r"target_modules: an empty list targets nothing"),
        ({"quantization": "none", "upcast_non_quantized": True}, r"upcast_non_quantized: True needs a 4-bit model"),
        ({"target_modules": "q_proj"}, r"target_modules: 'q_proj' is not a list of module names; allowed: 'all-"),
    ],
)
def test_bad_inputs_name_argument_value_and_allowed_values(overrides: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        estimate(tiny("llama"), **overrides)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError, match=r"optimizer: 'sgd'.*; r: -2 must.*; seq_len: 0 must"):
        estimate(optimizer="sgd", r=-2, seq_len=0)


def test_other_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"quantization: 'none' stores no 4-bit weights; allowed here: 'nf4', 'fp4'"):
        quantized_weight_bytes(LLAMA3_8B, "none", False)
    with pytest.raises(ValueError, match=r"config: the dict has no 'model_type'"):
        model_shape({"hidden_size": 64})
    with pytest.raises(ValueError, match=r"gpu_memory_gib: 0 must be a positive number.*; margin: -0.1 must be"):
        fits(estimate(), 0, margin=-0.1)
    with pytest.raises(ValueError, match=r"no activation model for model_type 'opt'"):
        estimate({"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "vocab_size": 256, "word_embed_proj_dim": 64},
                 target_modules=["q_proj"])


# --- LoRA parameters against PEFT --------------------------------------------------------------


@pytest.mark.parametrize(
    "family, r, targets",
    [
        ("llama", 8, "all-linear"),
        ("llama", 4, ["q_proj", "v_proj"]),
        ("llama", 16, ["o_proj", "down_proj"]),
        ("qwen2", 8, "all-linear"),
        ("qwen2", 2, ["k_proj", "gate_proj"]),
        ("mistral", 8, "all-linear"),
        ("mistral", 32, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("gpt2", 8, "all-linear"),
        ("gpt2", 4, ["c_attn"]),
        ("gpt2", 4, ["c_proj"]),
        ("gpt2", 16, ["attn.c_proj", "c_fc"]),
    ],
)
def test_lora_params_match_peft(family: str, r: int, targets: object) -> None:
    from peft import LoraConfig, get_peft_model

    config = tiny(family)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=r, target_modules=targets))
    assert count_lora_params(config, r, targets) == model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(
    "family, r, targets",
    [("llama", 8, "all-linear"), ("qwen2", 4, ["k_proj", "gate_proj"]), ("gpt2", 8, "all-linear"), ("gpt2", 4, ["c_attn"])],
)
def test_dora_params_match_peft(family: str, r: int, targets: object) -> None:
    """DoRA adds one magnitude per output feature of every adapted layer (peft's lora_magnitude_vector)."""
    from peft import LoraConfig, get_peft_model

    config = tiny(family)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=r, target_modules=targets, use_dora=True))
    trainable = model.get_nb_trainable_parameters()[0]
    magnitudes = sum(p.numel() for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    assert magnitudes > 0
    assert count_lora_params(config, r, targets, use_dora=True) == trainable
    assert count_lora_params(config, r, targets, use_dora=True) - count_lora_params(config, r, targets) == magnitudes
    assert estimate(config, r=r, target_modules=targets, use_dora=True).lora_params == trainable


@pytest.mark.integration
def test_dora_on_the_builtin_tiny_model_in_nf4_matches_peft_count_and_bytes() -> None:
    """The trainable's own setup on CPU (NF4, prepare_model_for_kbit_training) with peft DoRA on bitsandbytes
    4-bit layers: the predicted trainable parameters and their bytes match the real model's."""
    import bitsandbytes as bnb
    from peft import get_peft_model
    from transformers import AutoConfig

    from trainables.params import TrialConfig
    from trainables.settings import ModelSpec, TrainSpec
    from trainables.tiny_models import materialize
    from trainables.training_setup import TrainingSetup
    from trainables.trial_memory import MemoryKnobs, estimate_for_trial

    path = materialize("builtin:tiny-llama")
    model_spec, train = ModelSpec(path="builtin:tiny-llama"), TrainSpec()
    setup = TrainingSetup.resolve(model_spec, train, "cpu")
    trial = TrialConfig.from_tune(
        {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "learning_rate": 1e-3, "lora_dropout": 0.0,
         "weight_decay": 0.0, "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "use_dora": True}, 4,
    )
    base = setup.load_model(path, model_spec)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = get_peft_model(base, setup.lora_config(trial, "llama"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = AutoConfig.from_pretrained(path)
    knobs = MemoryKnobs(r=8, target_modules="all-linear", batch_size=4, seq_len=64, use_dora=True)
    est = estimate_for_trial(config, setup, knobs)
    assert est.lora_params == sum(p.numel() for p in trainable) == model.get_nb_trainable_parameters()[0]
    assert est.lora_weights_bytes == sum(p.numel() * p.element_size() for p in trainable)
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and {p.dtype for p in magnitudes} == {torch.float32}
    without = estimate_for_trial(config, setup, MemoryKnobs(r=8, target_modules="all-linear", batch_size=4, seq_len=64))
    extra = sum(p.numel() for p in magnitudes)
    assert est.lora_params - without.lora_params == extra
    # adamw_torch on CPU: two fp32 moments per magnitude, as for the fp32 adapters.
    assert est.optimizer_state_bytes - without.optimizer_state_bytes == 8 * extra


def test_tied_lm_head_is_counted_once() -> None:
    untied, tied = model_shape(tiny("llama")), model_shape(tiny("llama", tied=True))
    assert untied.other_params - tied.other_params == 256 * 64


# --- quantized weights against bitsandbytes ----------------------------------------------------


def _quantize(config: object, tmp_path: object, double_quant: bool, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        ),
        dtype=dtype,
        device_map={"": "cpu"},
    )


def _quant_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor in the 4-bit layers' quant states (not parameters, so not in the footprint)."""
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


@pytest.mark.parametrize("family", [*TINY_FAMILIES, "llama-tied"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantized_bytes_match_bitsandbytes(
    family: str, double_quant: bool, dtype: torch.dtype, tmp_path: object
) -> None:
    """Exact, to the byte.

    get_memory_footprint() sums parameters and buffers: a 4-bit weight is a uint8 Params4bit of
    ceil(n/2) elements, so it counts the packed bytes but not the quant_state (absmax, lookup
    tables), which is an attribute, not a parameter. The footprint is therefore compared with
    packed + other weights, and the constants with the quant_state tensors summed directly.
    """
    config = tiny(family.removesuffix("-tied"), tied=family.endswith("-tied"))
    model = _quantize(config, tmp_path, double_quant, dtype)
    compute_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    est = estimate(config, compute_dtype=compute_dtype, double_quant=double_quant)
    packed, constants = quantized_weight_parts(config, "nf4", double_quant)

    assert packed + est.other_weights_bytes == model.get_memory_footprint()
    assert constants == _quant_state_bytes(model)
    assert est.linear_weights_bytes == packed and est.quant_constants_bytes == constants
    quantized = [n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
    assert len(quantized) == sum(layer.quantized for layer in model_shape(config).linears)


# --- activations against the tensors autograd saves --------------------------------------------


def _saved_bytes(model: torch.nn.Module, batch: int, seq: int, vocab: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one forward."""
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


@pytest.mark.parametrize(
    "family, dtype, adapter_dtype, targets",
    [
        ("llama", torch.float32, torch.float32, "all-linear"),
        ("llama", torch.float32, torch.float32, ["q_proj", "v_proj"]),
        ("llama", torch.bfloat16, torch.bfloat16, "all-linear"),
        ("llama", torch.bfloat16, torch.bfloat16, ["o_proj", "down_proj"]),
        ("llama", torch.bfloat16, torch.float32, "all-linear"),
        ("llama", torch.bfloat16, torch.float32, ["gate_proj"]),
        ("llama", torch.float32, torch.float32, ["up_proj", "down_proj"]),
        ("qwen2", torch.bfloat16, torch.bfloat16, "all-linear"),
        ("qwen2", torch.bfloat16, torch.float32, ["k_proj", "v_proj", "up_proj"]),
        ("mistral", torch.float32, torch.float32, ["k_proj", "up_proj"]),
        ("gpt2", torch.float32, torch.float32, "all-linear"),
        ("gpt2", torch.float32, torch.float32, ["c_attn"]),
        ("gpt2", torch.float32, torch.float32, ["mlp.c_proj"]),
    ],
)
def test_activation_formula_matches_saved_tensors(
    family: str, dtype: torch.dtype, adapter_dtype: torch.dtype, targets: object, tmp_path: object
) -> None:
    """The activation part plus the loss's fp32 log-probs equals what autograd saves, within 0.1%.

    These runs use no autocast (CPU autocast casts differently from CUDA's), so they check the
    autocast=False paths, which are the same on CPU and CUDA: fp32 throughout, a bf16 model with
    bf16 adapters (nothing is cast), and a bf16 model with PEFT's default fp32 adapters (PEFT casts
    every LoRA input to fp32). A bf16 model with bf16 adapters saves exactly what CUDA autocast
    with fp32 adapters saves, except autocast's bf16 copies of the adapter weights.
    """
    from peft import LoraConfig, get_peft_model

    config = tiny(family)
    model = _quantize(config, tmp_path, True, dtype)
    model = get_peft_model(
        model, LoraConfig(r=8, target_modules=targets), autocast_adapter_dtype=adapter_dtype == torch.float32
    )
    model.train()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {adapter_dtype}
    batch, seq = 2, 32
    measured = _saved_bytes(model, batch, seq, 256)

    names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    est = estimate(config, compute_dtype=names[dtype], lora_dtype=names[adapter_dtype], autocast=False, r=8,
                   target_modules=targets, batch_size=batch, seq_len=seq, gradient_checkpointing=False)
    log_probs = 4 * batch * seq * 256
    assert est.activations_bytes + log_probs == pytest.approx(measured, rel=1e-3)


@pytest.mark.parametrize("family, targets", [("llama", "all-linear"), ("gpt2", ["c_attn", "mlp.c_proj"])])
def test_activation_formula_with_lora_dropout(family: str, targets: object, tmp_path: object) -> None:
    """With LoRA dropout each targeted layer keeps its dropped input and the mask.

    CPU's dropout keeps the mask in the input's dtype where CUDA's native_dropout keeps a bool
    (1 byte, what the estimator counts), so the CPU figure carries (itemsize - 1) more bytes per
    mask. No mask is kept for the first block's first targeted stage, whose input needs no gradient.
    """
    from peft import LoraConfig, get_peft_model

    config = tiny(family)
    model = _quantize(config, tmp_path, False, torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, lora_dropout=0.1))
    model.train()
    batch, seq = 2, 32
    measured = _saved_bytes(model, batch, seq, 256)

    est = estimate(config, compute_dtype="float32", r=8, target_modules=targets, batch_size=batch, seq_len=seq,
                   gradient_checkpointing=False, lora_dropout=0.1)
    first_stage = tuple(f"layers.0.self_attn.{m}_proj" for m in "qkv") + ("h.0.attn.c_attn",)
    masks = sum(t.in_features for t in lora_target_layers(config, targets) if not t.name.endswith(first_stage))
    cpu_masks = (4 - 1) * masks * batch * seq
    assert est.activations_bytes + cpu_masks + 4 * batch * seq * 256 == pytest.approx(measured, rel=1e-3)


def test_lora_dtype_sets_adapter_gradient_and_torch_adamw_bytes() -> None:
    fp32, bf16 = estimate(optimizer="adamw_torch"), estimate(optimizer="adamw_torch", lora_dtype="bfloat16")
    assert fp32.lora_weights_bytes == 2 * bf16.lora_weights_bytes == 4 * 41_943_040
    assert fp32.lora_grads_bytes == 2 * bf16.lora_grads_bytes
    assert fp32.optimizer_state_bytes == 2 * bf16.optimizer_state_bytes == 8 * 41_943_040
    # bitsandbytes' 32-bit AdamW keeps fp32 moments whatever the parameters' dtype.
    paged = estimate(optimizer="paged_adamw_32bit", lora_dtype="bfloat16")
    assert paged.optimizer_state_bytes + paged.paged_optimizer_state_bytes == 8 * 41_943_040


@pytest.mark.parametrize(
    "family, targets",
    [("llama", "all-linear"), ("llama", ["o_proj", "down_proj"]), ("qwen2", ["gate_proj"]), ("gpt2", "all-linear")],
)
def test_activation_formula_for_the_sweeps_qlora_setup(family: str, targets: object, tmp_path: object) -> None:
    """trainables/qlora.py's setup: prepare_model_for_kbit_training, bf16 adapters, bf16 autocast.

    The upcast makes the residual stream and bitsandbytes' outputs fp32, so every LoRA layer keeps
    its own bf16 copy of its input and the MLP's activations are fp32. On CPU, autocast leaves the
    casting of fp32 inputs to PEFT (it checks CUDA's autocast only), which keeps the same bf16 copies.
    The lm_head (fp32 after the upcast) is cast to bf16 for its matmul and that copy is kept too.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = tiny(family)
    model = _quantize(config, tmp_path, True, torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)  # what TRL's SFTTrainer does for 4-bit models
    model.train()
    batch, seq = 2, 32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _saved_bytes(model, batch, seq, 256)

    est = estimate(config, r=8, target_modules=targets, batch_size=batch, seq_len=seq, gradient_checkpointing=False,
                   lora_dtype="bfloat16", upcast_non_quantized=True)
    assert est.other_weights_bytes == model_shape(config).other_params * 4 + model_shape(config).buffer_bytes
    assert est.activations_bytes + 4 * batch * seq * 256 == pytest.approx(measured, rel=1e-3)


def test_fused_lm_head_by_hand() -> None:
    """TRL's fused LM head for Llama-3-8B, b=2, s=2048 (4096 tokens): no (b, s, V) logits.

    One 4096 x 32768 logits tile in bf16, plus, per token, the saved hidden state and its fp32
    gradient (h * (2 + 4)) and seven fp32 statistics and an int64 target (36). After the upcast the
    hidden states are fp32 and each tile also casts 4096 hidden rows and 32768 lm_head rows to bf16.
    """
    plain = estimate(batch_size=2, seq_len=2048, fused_lm_head=True)
    assert plain.logits_bytes == 4096 * 32768 * 2 + 4096 * (4096 * (2 + 4) + 36) == 369_246_208
    upcast = estimate(batch_size=2, seq_len=2048, fused_lm_head=True, upcast_non_quantized=True)
    casts = (4096 + 32768) * 4096 * 2
    assert upcast.logits_bytes == 4096 * 32768 * 2 + casts + 4096 * (4096 * (4 + 4) + 36) == 704_790_528
    assert estimate(batch_size=2, seq_len=2048).logits_bytes == 12 * 4096 * 128_256


def test_autocast_adds_weight_copies_but_drops_input_casts() -> None:
    """Under bf16 autocast, fp32 adapters cost a bf16 copy of their weights instead of fp32 input copies."""
    common = dict(compute_dtype="bfloat16", gradient_checkpointing=False, batch_size=1, seq_len=1)
    with_autocast = estimate(tiny("llama"), autocast=True, **common)
    bf16_adapters = estimate(tiny("llama"), autocast=False, lora_dtype="bfloat16", **common)
    assert with_autocast.activations_bytes - bf16_adapters.activations_bytes == 2 * with_autocast.lora_params
