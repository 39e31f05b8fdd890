"""Builtin tiny base models, built locally so that sweeps and tests need no model hub.

`model.path: builtin:tiny-llama` (or tiny-qwen2, tiny-mistral, tiny-gpt2) names a 2-layer model
of that architecture, built from a transformers config, with a word-level tokenizer trained by
`tokenizers` on the smoke task's text. It is then pretrained for a few seconds on plain
sentences about the smoke task's facts (trainables/smoke_task.py), so that it is a *base model*
in the usual sense: fine-tuning teaches it the instruction format, not the facts.

Builds are deterministic (fixed seeds) and cached under $QLORA_SWEEP_CACHE (default
~/.cache/qlora-sweep), guarded by a file lock so concurrent trials build once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

BUILTIN_PREFIX = "builtin:"
BUILD_VERSION = 1
PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
# Plain template for the chat format; tiny models have no chat template of their own.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _llama_like(config_cls: str, **extra: Any) -> Callable[[dict[str, int]], Any]:
    def make(ids: dict[str, int]) -> Any:
        import transformers

        return getattr(transformers, config_cls)(
            vocab_size=ids["vocab"],
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
            tie_word_embeddings=False,
            **extra,
        )

    return make


def _gpt2(ids: dict[str, int]) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=ids["vocab"],
        n_embd=64,
        n_inner=128,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )


# builtin name -> config factory. Each is tiny: ~10^5 parameters, 2 layers, hidden size 64.
BUILTIN_MODELS: dict[str, Callable[[dict[str, int]], Any]] = {
    "tiny-llama": _llama_like("LlamaConfig"),
    "tiny-qwen2": _llama_like("Qwen2Config"),
    "tiny-mistral": _llama_like("MistralConfig", sliding_window=None),
    "tiny-gpt2": _gpt2,
}


def is_builtin(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX)


def builtin_name(path: str) -> str:
    """Validate and return the name after `builtin:`.

    Raises:
        ValueError: Listing the valid names, if the name is unknown.
    """
    name = path[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        valid = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise ValueError(f"unknown builtin model '{path}'; valid builtin models: {valid}")
    return name


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_SWEEP_CACHE", Path.home() / ".cache" / "qlora-sweep"))


def materialize(path: str) -> str:
    """Return a local directory holding the model for `path`, building a builtin model if needed.

    Non-builtin paths (hub ids, local folders) are returned unchanged.
    """
    if not is_builtin(path):
        return path
    from filelock import FileLock

    name = builtin_name(path)
    target = cache_root() / "builtin" / f"{name}-v{BUILD_VERSION}"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            staging = target.with_name(target.name + f".tmp{os.getpid()}")
            _build(name, staging)
            staging.rename(target)  # atomic: readers never see a half-written model
    return str(target)


def _train_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _tokenizer_texts() -> tuple[list[str], list[str]]:
    """(pretraining sentences, prompts): the texts the builtin tokenizer is trained on."""
    from trainables import smoke_task
    from trainables.data import PROMPT_TEMPLATE, PROMPT_TEMPLATE_WITH_INPUT

    sentences = smoke_task.pretraining_sentences(4000, seed=1)
    prompts = [
        PROMPT_TEMPLATE_WITH_INPUT.format(**row) + row["output"] for row in smoke_task.instruction_rows(300, seed=7)
    ]
    return sentences, prompts + [PROMPT_TEMPLATE.format(instruction="")]


def builtin_tokenizer() -> Any:
    """The builtin models' word-level tokenizer alone (no model, no pretraining): for models built
    elsewhere from a config with random weights (benchmarks/gpu_truth.py)."""
    sentences, prompts = _tokenizer_texts()
    return _train_tokenizer(sentences + prompts)


def _build(name: str, out: Path) -> None:
    import random

    import torch
    from transformers import AutoModelForCausalLM

    started = time.time()
    sentences, prompts = _tokenizer_texts()
    tokenizer = _train_tokenizer(sentences + prompts)
    ids = {
        "vocab": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    config = BUILTIN_MODELS[name](ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    rng = random.Random(0)
    for _ in range(PRETRAIN_STEPS):
        batch = tokenizer([f"<s> {s} </s>" for s in rng.sample(sentences, PRETRAIN_BATCH)], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "BUILT_BY_QLORA_SWEEP.md").write_text(
        f"builtin:{name} v{BUILD_VERSION}: {sum(p.numel() for p in model.parameters())} parameters, "
        f"pretrained {PRETRAIN_STEPS} steps on the smoke task's facts (final loss {loss.item():.3f}) "
        f"in {time.time() - started:.1f}s by trainables/tiny_models.py.\n"
    )
