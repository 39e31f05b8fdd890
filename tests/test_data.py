"""Data loading and checking: every bad-data case names the file, the row and the field."""

from __future__ import annotations

import json
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
