"""The training setup resolved once: what the trainer, the estimator and export all build from."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import pytest

from trainables.params import KNOBS, MEMORY_KNOBS, TrialConfig, space_from_raw
from trainables.settings import DataSpec, ModelSpec, TrainSpec
from trainables.training_setup import TrainingSetup
from trainables.trial_memory import MemoryKnobs, not_modelled

MODEL = ModelSpec(path="builtin:tiny-llama")
TRAIN = TrainSpec(max_steps=20, eval_every=10, batch_size=8)
DATA = DataSpec(path="/tmp/data.jsonl", max_seq_length=64)
CONFIG: dict[str, Any] = {
    "r": 8, "lora_alpha": 16, "target_modules": "qv", "learning_rate": 3e-3, "lora_dropout": 0.05,
    "weight_decay": 0.01, "warmup_ratio": 0.1, "lr_scheduler_type": "cosine", "batch_size": 4,
    "use_rslora": True, "use_dora": True,
}


def trial(**overrides: Any) -> Any:
    return TrialConfig.from_tune({**CONFIG, **overrides}, TRAIN.batch_size)


def test_resolve_per_device() -> None:
    cuda = TrainingSetup.resolve(MODEL, TRAIN, "cuda", bf16_supported=True)
    assert (cuda.compute_dtype, cuda.optimizer, cuda.autocast, cuda.lora_dtype) == (
        "bfloat16", "paged_adamw_32bit", True, "bfloat16")
    assert cuda.upcast_non_quantized and cuda.fused_lm_head and cuda.on_cuda and cuda.quantized
    old = TrainingSetup.resolve(MODEL, TRAIN, "cuda:1", bf16_supported=False)
    assert old.compute_dtype == "float16" and old.lora_dtype == "bfloat16"  # trl's cast of QLoRA adapters
    cpu = TrainingSetup.resolve(MODEL, TRAIN, "cpu")
    assert (cpu.compute_dtype, cpu.optimizer, cpu.autocast, cpu.lora_dtype) == ("float32", "adamw_torch", False, "float32")
    plain = TrainingSetup.resolve(MODEL.model_copy(update={"quantization": "none"}), TRAIN, "cuda", bf16_supported=True)
    assert plain.lora_dtype == "float32" and not plain.upcast_non_quantized and plain.bnb_config() is None
    explicit = TrainingSetup.resolve(MODEL.model_copy(update={"compute_dtype": "float16"}),
                                     TRAIN.model_copy(update={"optimizer": "adamw_8bit"}), "cuda")
    assert explicit.compute_dtype == "float16" and explicit.optimizer == "adamw_8bit"
    # A driver without a GPU predicting for CUDA workers assumes bf16 support.
    assert TrainingSetup.resolve(MODEL, TRAIN, "cuda").compute_dtype in ("bfloat16", "float16")
    assert cpu.describe() == {f.name: getattr(cpu, f.name) for f in fields(cpu)}


def test_every_peft_knob_reaches_the_lora_config() -> None:
    from peft import LoraConfig

    setup = TrainingSetup.resolve(MODEL, TRAIN, "cpu")
    args = setup.lora_arguments(trial(), "llama")
    assert {k.peft_arg for k in KNOBS if k.peft_arg} <= set(args)
    assert args["target_modules"] == ["q_proj", "v_proj"] and args["use_rslora"] and args["use_dora"]
    lora = setup.lora_config(trial(), "llama")
    assert isinstance(lora, LoraConfig) and lora.use_rslora and lora.use_dora and lora.r == 8
    assert lora.lora_alpha == 16 and lora.lora_dropout == 0.05 and set(lora.target_modules) == {"q_proj", "v_proj"}
    off = setup.lora_config(trial(use_rslora=False, use_dora=False), "llama")
    assert not off.use_rslora and not off.use_dora


def test_every_trl_knob_and_the_precision_reach_the_sft_config(tmp_path) -> None:
    cpu = TrainingSetup.resolve(MODEL, TRAIN, "cpu")
    args = cpu.sft_arguments(trial(), TRAIN, DATA, str(tmp_path), grad_accum=2)
    assert {k.trl_arg for k in KNOBS if k.trl_arg} <= set(args)
    assert args["warmup_steps"] == 0.1  # warmup_ratio, as a fraction of max_steps
    assert args["per_device_train_batch_size"] == 4 and args["per_device_eval_batch_size"] == 4
    assert args["gradient_accumulation_steps"] == 2 and args["max_length"] == 64 and args["optim"] == "adamw_torch"
    assert args["use_cpu"] and not args["bf16"] and not args["fp16"]
    config = cpu.sft_config(trial(), TRAIN, DATA, str(tmp_path), grad_accum=2, eval_steps=5)
    assert config.eval_steps == 5 and config.learning_rate == 3e-3 and not config.bf16
    cuda = TrainingSetup.resolve(MODEL, TRAIN, "cuda", bf16_supported=True)
    gpu = cuda.sft_arguments(trial(), TRAIN, DATA, str(tmp_path), grad_accum=1)
    assert gpu["bf16"] and not gpu["fp16"] and not gpu["use_cpu"] and gpu["optim"] == "paged_adamw_32bit"
    old = TrainingSetup.resolve(MODEL, TRAIN, "cuda", bf16_supported=False)
    assert old.sft_arguments(trial(), TRAIN, DATA, str(tmp_path), grad_accum=1)["fp16"]


def test_estimator_arguments_are_the_estimators_parameters() -> None:
    from trainables.memory_estimator import estimate_peak_memory

    setup = TrainingSetup.resolve(MODEL, TRAIN, "cuda", bf16_supported=True)
    knobs = MemoryKnobs(r=8, target_modules="qv", batch_size=4, seq_len=64, use_dora=True)
    args = setup.estimator_arguments(knobs, "llama")
    assert set(args) <= set(inspect.signature(estimate_peak_memory).parameters)
    assert args["use_dora"] and args["target_modules"] == ["q_proj", "v_proj"] and args["lora_dropout"] == 0.0
    assert (args["compute_dtype"], args["optimizer"], args["lora_dtype"]) == ("bfloat16", "paged_adamw_32bit", "bfloat16")


def test_memory_knobs_come_from_the_registry() -> None:
    assert [f.name for f in fields(MemoryKnobs)] == [k.name for k in MEMORY_KNOBS] + ["seq_len"]
    with pytest.raises(TypeError):
        MemoryKnobs(8, "qv", 4, 64)  # keywords only
    knobs = MemoryKnobs.from_config({"r": 8.0, "target_modules": "qv", "lora_dropout": None}, 4, 64)
    assert knobs == MemoryKnobs(r=8, target_modules="qv", batch_size=4, seq_len=64)
    assert knobs.describe() == "r=8, target_modules=qv, batch_size=4, seq_len=64"
    dora = MemoryKnobs.from_config({**CONFIG, "batch_size": 2}, 4, 64)
    assert dora.use_dora and dora.batch_size == 2 and dora.lora_dropout == 0.05
    assert dora.describe() == "r=8, target_modules=qv, lora_dropout=0.05, batch_size=2, use_dora=True, seq_len=64"
    assert len({knobs, MemoryKnobs(r=8, target_modules="qv", batch_size=4, seq_len=64)}) == 1  # hashable


def test_not_modelled_names_what_dora_leaves_out() -> None:
    assert not_modelled(MemoryKnobs(r=8, target_modules="qv", batch_size=4, seq_len=64)) == []
    lines = not_modelled(MemoryKnobs(r=8, target_modules="qv", batch_size=4, seq_len=64, use_dora=True))
    assert len(lines) == 1 and lines[0].startswith("use_dora:") and "not modelled" in lines[0]
    assert not_modelled(space_from_raw({"use_dora": [False, True]})) == lines
    assert not_modelled(space_from_raw({"use_dora": False})) == []
    assert not_modelled(space_from_raw({})) == []
    assert not_modelled({"use_dora": True}) == lines


def test_train_callbacks_are_import_paths() -> None:
    from trainables.qlora import load_callback_factories

    assert TrainSpec(callbacks=["tests.fault_plugins:oom_above"]).callbacks == ("tests.fault_plugins:oom_above",)
    for bad in ("tests.fault_plugins", "tests/fault_plugins.py:oom_above", "a b:c", ":x"):
        with pytest.raises(ValueError, match="package.module:factory"):
            TrainSpec(callbacks=[bad])
    from tests import fault_plugins

    assert load_callback_factories(["tests.fault_plugins:oom_above"]) == [fault_plugins.oom_above]
    with pytest.raises(ValueError, match="cannot import 'tests.fault_plugins:nothing_here'"):
        load_callback_factories(["tests.fault_plugins:nothing_here"])
    with pytest.raises(ValueError, match="cannot import 'no_such_package.plugins:x'"):
        load_callback_factories(["no_such_package.plugins:x"])


@pytest.mark.integration
def test_the_one_pad_token_fallback(tmp_path) -> None:
    from transformers import AutoTokenizer

    from trainables.tiny_models import materialize
    from trainables.training_setup import load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(materialize("builtin:tiny-llama"))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    loaded = load_tokenizer(str(tmp_path), MODEL)
    assert loaded.pad_token == loaded.eos_token == "</s>"
