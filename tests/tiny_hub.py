"""Real-style tokenizers, models in an offline hub cache, and data shaped like what users train on.

* `make_tokenizer(style)`: a small byte-level BPE tokenizer (the kind Llama 3 and Qwen ship) trained
  here in milliseconds, carrying a chat template of one of the common styles: ChatML
  (`<|im_start|>role ... <|im_end|>`, Qwen's, with its default system prompt), Llama-3 headers
  (`<|start_header_id|>role<|end_header_id|>`, BOS from the template), or Mistral's `[INST]`, which
  refuses conversations whose roles do not alternate.
* `place_model(hf_home, repo_id, ...)`: a tiny model of a real architecture with that tokenizer, put in
  a Hugging Face hub cache the way `hf download` leaves it (`hub/models--Org--Name/refs/main`,
  `snapshots/<commit>/`), so that with HF_HOME pointing there and HF_HUB_OFFLINE=1 transformers
  resolves `Org/Name` (and `revision: <commit>`) with its real loading code, no network.
* `chat_log_rows`, `gsm8k_rows`: data shaped like real chat logs and like GSM8K, with the long and
  malformed rows real data has.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

# --- chat templates, written after the real ones (simplified, same token layout) ------------------

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)

STYLES: dict[str, dict[str, Any]] = {
    "chatml": {
        "template": CHATML_TEMPLATE,
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "end_of_turn": "<|im_end|>",
    },
    "llama3": {
        "template": LLAMA3_TEMPLATE,
        "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": None,  # like Llama 3: no pad token; the trainable pads with EOS
        "end_of_turn": "<|eot_id|>",
    },
    "mistral": {
        "template": MISTRAL_TEMPLATE,
        "special": ["<unk>", "<s>", "</s>"],
        "bos": "<s>",
        "eos": "</s>",
        "pad": None,
        "end_of_turn": "</s>",
    },
}

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "You are a helpful assistant. Answer briefly and cite the order number.",
    "def add(a, b):\n    return a + b\n",
    "Hi, my order #1234 hasn't arrived yet. Can you check? Thanks!",
    "Sure! I checked order #1234: it shipped on Monday and arrives Thursday.",
    "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes. How much did she earn?",
    "<<12/60=0.2>> 0.2*50 = <<0.2*50=10>>10\n#### 10",
    "Résumé, naïve café: unicode text, emoji 🙂 and Chinese 你好 appear in real logs.",
]


def make_tokenizer(style: str, corpus: list[str] | None = None) -> Any:
    """A byte-level BPE tokenizer of ~500 tokens with the chat template and special tokens of `style`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    info = STYLES[style]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=info["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator((corpus or []) + CORPUS * 4, trainer)
    if info["bos"]:
        # Llama and Mistral tokenizers add BOS when asked for special tokens (instruction and text rows).
        bos_id = core.token_to_id(info["bos"])
        core.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{info['bos']} $A", special_tokens=[(info["bos"], bos_id)]),
            ]
        )
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=info["bos"],
        eos_token=info["eos"],
        pad_token=info["pad"],
        additional_special_tokens=[t for t in info["special"] if t not in (info["bos"], info["eos"], info["pad"])],
    )
    tokenizer.chat_template = info["template"]
    return tokenizer


# --- a model in an offline hub cache ---------------------------------------------------------------


def commit_hash(label: str) -> str:
    """A 40-hex commit id, as the hub names snapshots."""
    return hashlib.sha1(label.encode()).hexdigest()


def save_tiny_model(folder: Path, tokenizer: Any, *, architecture: str = "llama", layers: int = 2, seed: int = 0) -> int:
    """A randomly initialised 2-layer model of `architecture` (hidden size 64) with `tokenizer`, saved
    with save_pretrained. Returns its parameter count."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[architecture]
    eos = tokenizer.eos_token_id
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def place_model(
    hf_home: Path,
    repo_id: str,
    *,
    style: str = "llama3",
    architecture: str = "llama",
    layers: int = 2,
    commit: str | None = None,
    ref: str | None = "main",
) -> tuple[str, Path, int]:
    """Put a tiny model into HF_HOME's hub cache as `repo_id` at `commit`, with `ref` pointing to it.

    Returns:
        (commit, snapshot folder, parameter count).
    """
    namespace, name = repo_id.split("/")
    repo = hf_home / "hub" / f"models--{namespace}--{name}"
    commit = commit or commit_hash(f"{repo_id}@{layers}")
    snapshot = repo / "snapshots" / commit
    params = save_tiny_model(snapshot, make_tokenizer(style), architecture=architecture, layers=layers)
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit, snapshot, params


# --- data shaped like real data ----------------------------------------------------------------------

SYSTEM_PROMPTS = [
    "You are Acme's support assistant. Be brief and polite.",
    "You are a coding assistant. Answer with code when you can.",
]
TOPICS = [
    ("my order #{n} hasn't arrived yet 😕 can you check?", "I checked order #{n}: it shipped Monday and arrives Thursday."),
    ("how do I reverse a list in python?", "Use slicing: `items[::-1]`, or `items.reverse()` to do it in place."),
    ("what's 17 * {n}?", "17 * {n} = {m}."),
    ("Bonjour ! Pouvez-vous m'aider avec ma facture nº{n} ?", "Bien sûr : la facture nº{n} a été payée le 3 mai."),
]


def chat_log_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversations the way chat logs are exported: ids and metadata next to `messages`, an optional
    system prompt, one to three user/assistant exchanges, unicode, code, and extra per-message keys."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.6:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for turn in range(rng.randint(1, 3)):
            question, answer = rng.choice(TOPICS)
            k = rng.randint(2, 999)
            messages.append({"role": "user", "content": question.format(n=k, m=17 * k), "ts": f"2024-05-0{turn + 1}T10:00:00Z"})
            messages.append({"role": "assistant", "content": answer.format(n=k, m=17 * k), "model": "gpt-x"})
        rows.append({"id": f"conv-{i:05d}", "source": "support-export", "messages": messages, "rating": rng.choice([None, 1, 5])})
    return rows


def long_chat_row(words: int = 600) -> dict[str, Any]:
    """A conversation whose assistant reply is far longer than a small max_seq_length (a pasted log)."""
    reply = "Here is the full log you asked for:\n" + " ".join(f"line{i} ok" for i in range(words))
    return {
        "id": "conv-long",
        "messages": [
            {"role": "user", "content": "Can you paste the whole deployment log?"},
            {"role": "assistant", "content": reply},
        ],
    }


MALFORMED_CHAT_LINES = [
    json.dumps({"id": "no-assistant", "messages": [{"role": "user", "content": "hello?"}]}),
    json.dumps({"id": "bad-role", "messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}]}),
    json.dumps({"id": "null-content", "messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "hi"}]}),
    '{"id": "cut-off", "messages": [{"role": "user", "content": "this line was trunc',
]


def gsm8k_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows shaped like openai/gsm8k (config main): a word problem and a worked answer ending in '#### N'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, price = rng.randint(2, 60), rng.randint(2, 9), rng.randint(2, 20)
        total = a * b * price
        rows.append(
            {
                "question": f"A shop sells {a} boxes with {b} pens each. Each pen costs ${price}. "
                "How much do all the pens cost?",
                "answer": f"There are {a} * {b} = <<{a}*{b}={a * b}>>{a * b} pens.\n"
                f"They cost {a * b} * {price} = <<{a * b}*{price}={total}>>{total} dollars.\n#### {total}",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows as JSON lines; a str row is written as is (a malformed line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8")
    return path
