"""Data loading and checking: every bad-data case names the file, the row and the field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trainables import smoke_task
from trainables.data import DataError, format_example, prepare_data
from trainables.settings import DataSpec, ModelSpec
from tests.conftest import REPO


def spec(**kw) -> DataSpec:
    return DataSpec(path="x", **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"instruction": "Say hi", "output": "hi"}


def test_shipped_smoke_data_is_exactly_what_the_generator_makes() -> None:
    shipped = (REPO / "sweeps" / "data" / "smoke_instructions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in shipped] == smoke_task.instruction_rows()


def test_instruction_rows_become_prompt_completion_pairs() -> None:
    example = format_example({"instruction": "Sort these letters.", "input": "b a", "output": "a b"}, spec())
    assert example == {
        "prompt": "### Instruction:\nSort these letters.\n\n### Input:\nb a\n\n### Response:\n",
        "completion": "a b",
    }
    assert "### Input" not in format_example(GOOD, spec())["prompt"]


def test_split_is_deterministic_and_sized(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)])
    a = prepare_data(str(path), spec(eval_size=0.2))
    b = prepare_data(str(path), spec(eval_size=0.2))
    assert len(a.eval) == 10 and len(a.train) == 40 and a.eval == b.eval
    assert len(prepare_data(str(path), spec(eval_size=7)).eval) == 7


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, r"file not found: .*missing\.jsonl", id="missing-file"),
        pytest.param(b"", r"holds no rows; add data", id="empty-file"),
        pytest.param(b'{"instruction": "a"}\n', r"row 1: missing field 'output' \(format 'instruction' needs instruction, output", id="missing-field"),
        pytest.param(b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "\xff\xfe"}\n', r"row 2: bytes 32-33 are not UTF-8; re-save the file as UTF-8", id="non-utf8"),
        pytest.param(b'{"instruction": "a", "output": "b"}\n{"instruction": \n', r"row 2: not valid JSON", id="bad-json"),
        pytest.param(b'{"instruction": "a", "output": 3}\n', r"row 1: field 'output' should be text, got int", id="non-text-field"),
        pytest.param(b'{"instruction": "a", "output": "  "}\n', r"row 1: field 'output' is empty", id="empty-field"),
        pytest.param(b'["a", "b"]\n', r"row 1: expected a JSON object, got list", id="not-an-object"),
    ],
)
def test_bad_data_names_file_row_and_field(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "missing.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare_data(str(path), spec())


def test_every_bad_row_is_reported_at_once(tmp_path: Path) -> None:
    rows = [GOOD, {"instruction": "x"}, GOOD, {"output": "y"}, GOOD]
    with pytest.raises(DataError) as info:
        prepare_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), spec())
    assert info.value.total == 2
    assert "d.jsonl row 2" in info.value.render() and "d.jsonl row 4" in info.value.render()


def test_skip_mode_drops_and_counts_bad_rows(tmp_path: Path) -> None:
    rows = [GOOD] * 8 + [{"instruction": "x"}, {"prompt": "wrong schema"}]
    data = prepare_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), spec(on_bad_rows="skip", eval_size=2))
    assert len(data.train) + len(data.eval) == 8
    assert len(data.skipped) == 2 and data.rows_read == 10


def test_an_empty_eval_split_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 5)
    with pytest.raises(DataError, match=r"5 usable rows and data\.eval_size 0\.1 leave 0 eval and 5 train rows"):
        prepare_data(str(path), spec(eval_size=0.1))


def test_rows_longer_than_max_seq_length_are_caught_with_the_tokenizer(tmp_path: Path) -> None:
    from trainables.tiny_models import materialize
    from trainables.training_setup import load_tokenizer

    tokenizer = load_tokenizer(materialize("builtin:tiny-llama"), ModelSpec(path="builtin:tiny-llama"))
    long = {"instruction": "Sort these letters. " * 30, "output": "a b c"}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 10 + [long])
    with pytest.raises(DataError, match=r"d\.jsonl row 11: \d+ tokens exceeds data\.max_seq_length \(64\)"):
        prepare_data(str(path), spec(max_seq_length=64, eval_size=2), tokenizer)
    skipped = prepare_data(str(path), spec(max_seq_length=64, eval_size=2, on_bad_rows="skip"), tokenizer)
    assert len(skipped.skipped) == 1


def test_csv_rows_are_numbered_like_the_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\nq1,a1\nq2,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv row 3: field 'output' is empty"):
        prepare_data(str(path), spec())


def test_text_and_chat_formats(tmp_path: Path) -> None:
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(10)])
    assert prepare_data(str(text), spec(format="text", eval_size=2)).train[0].keys() == {"text"}
    chat_rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 9
    chat_rows.append({"messages": [{"role": "robot", "content": "beep"}]})
    chat = write_jsonl(tmp_path / "c.jsonl", chat_rows)
    with pytest.raises(DataError, match=r"c\.jsonl row 10: messages\[0\]\.role is 'robot'; allowed roles: system, user, assistant"):
        prepare_data(str(chat), spec(format="chat", eval_size=2))


def test_parquet_is_read(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD] * 10), path)
    assert len(prepare_data(str(path), spec(eval_size=2)).train) == 8


# --- tokenized once, exactly as trained (issue 12) ----------------------------------------------------

from tests import tiny_hub  # noqa: E402
from trainables.data import TokenizedRows, render, token_count, tokenize_examples  # noqa: E402


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    """Byte-level BPE tokenizers with the common chat-template styles, built here (tests/tiny_hub.py)."""
    return {style: tiny_hub.make_tokenizer(style) for style in tiny_hub.STYLES}


def loss_text(tokenizer, ids, mask) -> list[str]:
    """The decoded runs of tokens that carry the loss."""
    runs, current = [], []
    for token, on in zip(list(ids), list(mask)):
        if on:
            current.append(int(token))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


CONVERSATION = [
    {"role": "system", "content": "You are Acme's support assistant."},
    {"role": "user", "content": "my order #12 hasn't arrived"},
    {"role": "assistant", "content": "It ships Monday."},
    {"role": "user", "content": "thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


@pytest.mark.parametrize("style", list(tiny_hub.STYLES))
def test_chat_rows_carry_loss_on_the_assistant_turns_only(tokenizers: dict, style: str) -> None:
    tokenizer = tokenizers[style]
    messages = CONVERSATION if style != "mistral" else CONVERSATION[1:]  # Mistral's template has no system role
    ((ids, mask),) = tokenize_examples([{"messages": messages}], tokenizer)
    end = tiny_hub.STYLES[style]["end_of_turn"]
    runs = [run.strip() for run in loss_text(tokenizer, ids, mask)]
    # Each assistant turn with its end-of-turn token (so the model learns to stop), and nothing else.
    assert runs == [f"It ships Monday.{end}", f"You're welcome.{end}"], runs
    prompt = tokenizer.decode([int(t) for t, on in zip(ids, mask) if not on])
    assert "my order #12" in prompt and "thanks!" in prompt and "It ships" not in prompt
    # The ids are the model's own template, tokenized: what apply_chat_template gives, token for token.
    assert ids.tolist() == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("style", list(tiny_hub.STYLES))
def test_instruction_rows_are_tokenized_as_trls_prompt_completion(tokenizers: dict, style: str) -> None:
    tokenizer = tokenizers[style]
    example = format_example({"instruction": "Add 2 and 3.", "output": "5"}, spec())
    ((ids, mask),) = tokenize_examples([example], tokenizer)
    # trl 1.16: prompt + completion + EOS, tokenized with special tokens; loss from where the prompt's own
    # tokens stop matching.
    full = tokenizer(example["prompt"] + example["completion"] + tokenizer.eos_token)["input_ids"]
    prompt = tokenizer(example["prompt"])["input_ids"]
    assert ids.tolist() == full
    first = next(i for i, (a, b) in enumerate(zip(prompt + [None], full)) if a != b)
    assert mask.tolist() == [False] * first + [True] * (len(full) - first)
    assert loss_text(tokenizer, ids, mask) == ["5" + tokenizer.eos_token]


def test_token_count_counts_every_chat_token_not_two(tokenizers: dict) -> None:
    # transformers 5's apply_chat_template(tokenize=True) returns a dict; its len() was 2 for every row.
    tokenizer = tokenizers["chatml"]
    example = {"messages": CONVERSATION}
    assert token_count(example, tokenizer) == len(tokenizer(render(example, tokenizer).text, add_special_tokens=False)["input_ids"]) > 40


def chat_spec(**kw) -> DataSpec:
    return DataSpec(path="x", format="chat", **kw)


def test_chat_logs_with_long_and_malformed_rows_report_every_problem_at_once(tmp_path: Path, tokenizers: dict) -> None:
    rows = tiny_hub.chat_log_rows(40) + [tiny_hub.long_chat_row()] + tiny_hub.MALFORMED_CHAT_LINES
    path = tiny_hub.write_jsonl(tmp_path / "logs.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare_data(str(path), chat_spec(max_seq_length=512, eval_size=4), tokenizers["chatml"])
    rendered = info.value.render()
    assert info.value.total == 5, rendered
    assert re.search(r"logs\.jsonl row 41: \d{4} tokens exceeds data\.max_seq_length \(512\).*on_long_rows: skip or truncate", rendered)
    assert "logs.jsonl row 42: messages has no assistant message" in rendered
    assert "logs.jsonl row 43: messages[0].role is 'tool'" in rendered
    assert "logs.jsonl row 44: messages[0].content should be text, got NoneType" in rendered
    assert "logs.jsonl row 45: not valid JSON" in rendered


def test_every_kept_chat_row_is_counted_exactly_as_trained(tmp_path: Path, tokenizers: dict) -> None:
    tokenizer = tokenizers["llama3"]
    path = tiny_hub.write_jsonl(tmp_path / "logs.jsonl", tiny_hub.chat_log_rows(30))
    data = prepare_data(str(path), chat_spec(max_seq_length=512, eval_size=5), tokenizer)
    assert data.train_rows == 25 and data.eval_rows == 5
    for examples, tokens in ((data.train, data.train_tokens), (data.eval, data.eval_tokens)):
        for i, example in enumerate(examples):
            expected = tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True)["input_ids"]
            assert tokens.row(i)[0] == expected


def test_long_rows_error_skip_or_truncate(tmp_path: Path, tokenizers: dict) -> None:
    tokenizer = tokenizers["chatml"]
    path = tiny_hub.write_jsonl(tmp_path / "logs.jsonl", tiny_hub.chat_log_rows(20) + [tiny_hub.long_chat_row()])
    with pytest.raises(DataError, match=r"logs\.jsonl row 21: \d+ tokens exceeds data\.max_seq_length \(512\)"):
        prepare_data(str(path), chat_spec(max_seq_length=512, eval_size=2), tokenizer)
    skipped = prepare_data(str(path), chat_spec(max_seq_length=512, eval_size=2, on_long_rows="skip"), tokenizer)
    assert len(skipped.skipped) == 1 and skipped.train_rows + skipped.eval_rows == 20 and not skipped.truncated
    cut = prepare_data(str(path), chat_spec(max_seq_length=512, eval_size=2, on_long_rows="truncate"), tokenizer)
    assert cut.train_rows + cut.eval_rows == 21 and not cut.skipped
    assert len(cut.truncated) == 1 and re.match(r"logs\.jsonl row 21: \d+ -> 512 tokens", cut.truncated[0])
    everything = TokenizedRows.from_rows([cut.train_tokens.row(i) for i in range(cut.train_rows)] + [cut.eval_tokens.row(i) for i in range(cut.eval_rows)])
    assert everything.lengths.max() == 512
    # The cut row keeps its whole prompt and the start of the reply; only the reply's end is gone.
    long_ids = next(ids for ids, mask in map(everything.row, range(len(everything))) if len(ids) == 512)
    text = tokenizer.decode(long_ids)
    assert "Can you paste the whole deployment log?" in text and "Here is the full log" in text and "line599" not in text


def test_truncate_never_cuts_a_prompt(tokenizers: dict) -> None:
    from trainables.data import truncate

    tokenizer = tokenizers["llama3"]
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "short answer"},
        {"role": "user", "content": "a second, much longer question " * 20},
        {"role": "assistant", "content": "second answer"},
    ]
    ((ids, mask),) = tokenize_examples([{"messages": messages}], tokenizer)
    first_end = int(mask.nonzero()[0][mask.nonzero()[0] < len(ids) // 2].max()) + 1
    # A cut inside the second user turn drops that turn: the kept rows end with the first answer.
    kept_ids, kept_mask = truncate(ids, mask, first_end + 10)
    assert len(kept_ids) == first_end and kept_mask[-1]
    assert tokenizer.decode(kept_ids.tolist()).endswith("short answer<|eot_id|>")
    # A cut inside the first prompt leaves nothing to learn: the row cannot be truncated.
    assert truncate(ids, mask, 5) is None


def test_a_prompt_longer_than_max_seq_length_is_a_bad_row_even_with_truncate(tmp_path: Path) -> None:
    tokenizer = tiny_hub.make_tokenizer("chatml")
    rows = [GOOD] * 10 + [{"instruction": "Summarize: " + "words and more words " * 100, "output": "ok"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl row 11: the prompt alone is \d+ tokens and data\.max_seq_length is 64"):
        prepare_data(str(path), spec(max_seq_length=64, eval_size=2, on_long_rows="truncate"), tokenizer)
    data = prepare_data(str(path), spec(max_seq_length=64, eval_size=2, on_long_rows="truncate", on_bad_rows="skip"), tokenizer)
    assert len(data.skipped) == 1 and data.train_rows + data.eval_rows == 10


def test_a_template_that_refuses_a_conversation_names_the_row(tmp_path: Path, tokenizers: dict) -> None:
    rows = [{"messages": CONVERSATION[1:3]}] * 5 + [{"messages": [CONVERSATION[1], CONVERSATION[1], CONVERSATION[2]]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=r"c\.jsonl row 6: the model's chat template refuses this conversation \(Conversation roles must alternate"):
        prepare_data(str(path), chat_spec(eval_size=1), tokenizers["mistral"])


def test_sharegpt_messages_are_read_as_chat(tmp_path: Path, tokenizers: dict) -> None:
    rows = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": "hello"}]} for i in range(6)]
    data = prepare_data(str(write_jsonl(tmp_path / "s.jsonl", rows)), chat_spec(messages_field="conversations", eval_size=1), tokenizers["chatml"])
    assert data.train[0]["messages"][1] == {"role": "assistant", "content": "hello"}
    assert loss_text(tokenizers["chatml"], *data.train_tokens.row(0)) == ["hello<|im_end|>\n"]


def test_split_slicing_max_rows_and_a_held_out_file(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(100)]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    assert prepare_data(path, spec(split="train[:20]", eval_size=5)).train_rows == 15
    assert {e["completion"] for e in prepare_data(path, spec(split="train[-10:]", eval_size=2)).train} <= {f"a{i}" for i in range(90, 100)}
    assert prepare_data(path, spec(split="train[10%:30%]", eval_size=4)).train_rows == 16
    sample = prepare_data(path, spec(max_rows=30, eval_size=6, seed=3))
    again = prepare_data(path, spec(max_rows=30, eval_size=6, seed=3))
    assert sample.train_rows == 24 and sample.rows_read == 30 and sample.train == again.train
    assert sample.train != prepare_data(path, spec(max_rows=30, eval_size=6, seed=4)).train
    held = write_jsonl(tmp_path / "held.jsonl", [{"instruction": f"h{i}", "output": "x"} for i in range(7)])
    data = prepare_data(path, spec(eval_path=str(held)))
    assert data.train_rows == 100 and data.eval_rows == 7 and data.eval[0]["prompt"].count("h0") == 1
    assert prepare_data(path, spec(eval_path=str(held), eval_split="train[:3]")).eval_rows == 3


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        pytest.param({"split": "test"}, r"data\.split: 'test' names a split of a hub dataset; a local file is one split, 'train'", id="local-split"),
        pytest.param({"eval_split": "test"}, r"data\.eval_split \('test'\) names a split of a hub dataset, and data\.path is a local file; use data\.eval_path", id="local-eval-split"),
        pytest.param({"data_files": "a.jsonl"}, r"d\.jsonl is a file; data\.data_files names files of a hub dataset or of a data\.path folder", id="files-of-a-file"),
        pytest.param({"eval_path": "/nowhere/held.jsonl"}, r"file not found: /nowhere/held\.jsonl", id="missing-eval-file"),
    ],
)
def test_data_keys_that_do_not_fit_a_local_file_say_what_to_use(tmp_path: Path, kw: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 10)
    with pytest.raises(DataError, match=message):
        prepare_data(str(path), spec(**kw))


def test_a_folder_is_read_through_data_files(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", [GOOD] * 6)
    write_jsonl(folder / "part-1.jsonl", [{"instruction": "x"}] + [GOOD] * 3)
    (folder / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match=r"is a folder; point data\.path at a .* file, or name its files with data\.data_files"):
        prepare_data(str(folder), spec())
    with pytest.raises(DataError, match=r"part-1\.jsonl row 1: missing field 'output'"):
        prepare_data(str(folder), spec(data_files=("part-*.jsonl",), eval_size=2))
    with pytest.raises(DataError, match=r"data\.data_files: 'nope-\*\.jsonl' matches no file"):
        prepare_data(str(folder), spec(data_files=("nope-*.jsonl",)))


def test_trials_get_the_tokens_without_the_text(tmp_path: Path, tokenizers: dict) -> None:
    import pickle

    rows = [{"instruction": f"Question {i}: add {i} and {i}.", "output": str(2 * i)} for i in range(200)]
    data = prepare_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), spec(eval_size=20), tokenizers["llama3"])
    shipped = data.for_trials()
    assert shipped.tokenized and shipped.train == [] and shipped.train_rows == 180 and shipped.eval_rows == 20
    assert b"Question 17" in pickle.dumps(data) and b"Question 17" not in pickle.dumps(shipped)
    train, evaluation = shipped.datasets()
    assert len(train) == 180 and len(evaluation) == 20 and set(train.column_names) == {"input_ids", "labels"}
    assert train[0]["labels"] == data.train_tokens.labels(0)
    assert train[0]["labels"][0] == -100 and train[0]["labels"][-1] == tokenizers["llama3"].eos_token_id


class SlowTokenizer:
    """A tokenizer without character offsets (a 'slow' one), wrapping a fast one."""

    is_fast = False

    def __init__(self, fast) -> None:
        self.fast = fast
        self.eos_token = fast.eos_token
        self.chat_template = fast.chat_template

    def __call__(self, text, add_special_tokens: bool = True, **_):
        return self.fast(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, *args, **kwargs):
        return self.fast.apply_chat_template(*args, **kwargs)


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_tokenizers_without_offsets_get_the_same_tokens_and_masks(tokenizers: dict, style: str) -> None:
    examples = [{"messages": m["messages"]} for m in tiny_hub.chat_log_rows(12)]
    examples += [format_example({"instruction": f"Add {i} and 3.", "output": str(i + 3)}, spec()) for i in range(5)]
    examples += [{"text": "Plain text, trained on all of it."}]
    fast = tokenize_examples(examples, tokenizers[style])
    slow = tokenize_examples(examples, SlowTokenizer(tokenizers[style]))
    for (ids, mask), (slow_ids, slow_mask) in zip(fast, slow):
        assert ids.tolist() == slow_ids.tolist() and mask.tolist() == slow_mask.tolist()
