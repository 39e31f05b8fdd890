"""Training data: read rows, check them, and format them the way trl's SFTTrainer expects.

Formats:
    instruction  rows with `instruction`, optional `input`, and `output` (Alpaca style). They become
                 prompt/completion pairs, so the loss covers only the response.
    text         rows with `text`: plain language modelling on the whole row.
    chat         rows with `messages`: a list of {role, content}, rendered with the tokenizer's chat template.

Every problem names the file, the row (1-based, as an editor shows it) and the field. With
`on_bad_rows: error` (the default) any bad row stops the sweep before a trial starts; with
`skip` bad rows are dropped and counted.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ProblemsError

if TYPE_CHECKING:
    from trainables.settings import DataSpec

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_LISTED = 10


class DataError(ProblemsError):
    """The data cannot be used. Holds every problem found (the first MAX_LISTED), one line each."""

    noun = "the data"

    def __init__(self, source: str, problems: list[str], total: int | None = None):
        super().__init__(source, problems[:MAX_LISTED], total if total is not None else len(problems))


@dataclass
class Row:
    """One raw row and where it came from, for error messages."""

    number: int
    values: dict[str, Any]


@dataclass
class PreparedData:
    """Formatted train/eval examples plus what was dropped."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    rows_read: int
    skipped: list[str] = field(default_factory=list)


# --- reading ----------------------------------------------------------------------------------


def is_local_data(path: str) -> bool:
    """A local file path (existing or not) rather than a hub dataset id."""
    return Path(path).suffix.lower() in LOCAL_SUFFIXES or Path(path).exists() or path.startswith(("/", ".", "~"))


def read_rows(path: str, spec: DataSpec) -> tuple[list[Row], list[str]]:
    """Read every row of a local file or a hub dataset.

    Returns:
        The rows that could be parsed, and a problem line for each row that could not
        (bad JSON, bad UTF-8).

    Raises:
        DataError: If the file is missing, unreadable, of an unknown kind, or holds no rows.
    """
    local = Path(path)
    if is_local_data(path):
        if not local.exists():
            raise DataError(
                "data.path", [f"file not found: {path}. Relative paths are read from the spec file's folder"]
            )
        if local.is_dir():
            raise DataError("data.path", [f"{path} is a folder; point data.path at a {'/'.join(LOCAL_SUFFIXES)} file"])
        suffix = local.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise DataError(
                "data.path", [f"{path}: unknown file type '{suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}"]
            )
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        rows, problems = readers[suffix](local)
    else:
        rows, problems = _read_hub(path, spec), []
    if not rows and not problems:
        raise DataError(path, [f"{path} holds no rows; add data or point data.path at another file"])
    return rows, problems


def _read_jsonl(path: Path) -> tuple[list[Row], list[str]]:
    rows, problems = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{path.name} row {number}: bytes {exc.start}-{exc.end} are not UTF-8; re-save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"{path.name} row {number}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(value, dict):
                problems.append(f"{path.name} row {number}: expected a JSON object, got {type(value).__name__}")
                continue
            rows.append(Row(number, value))
    return rows, problems


def _read_json(path: Path) -> tuple[list[Row], list[str]]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(str(path), [f"{path.name}: bytes {exc.start}-{exc.end} are not UTF-8; re-save the file as UTF-8"])
    except json.JSONDecodeError as exc:
        raise DataError(str(path), [f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"])
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} style
    if not isinstance(value, list):
        raise DataError(str(path), [f"{path.name}: expected a JSON list of objects, got {type(value).__name__}"])
    rows, problems = [], []
    for number, item in enumerate(value, start=1):
        if isinstance(item, dict):
            rows.append(Row(number, item))
        else:
            problems.append(f"{path.name} row {number}: expected a JSON object, got {type(item).__name__}")
    return rows, problems


def _read_csv(path: Path) -> tuple[list[Row], list[str]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(str(path), [f"{path.name} line {line}: bytes are not UTF-8; re-save the file as UTF-8"])
    reader = csv.DictReader(io.StringIO(text))
    # Row numbers follow the file's lines: the header is line 1.
    return [Row(number, dict(item)) for number, item in enumerate(reader, start=2)], []


def _read_parquet(path: Path) -> tuple[list[Row], list[str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(str(path), [f"{path.name}: not a readable parquet file ({exc})"])
    return [Row(number, item) for number, item in enumerate(table.to_pylist(), start=1)], []


def _read_hub(name: str, spec: DataSpec) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=spec.split)
    except Exception as exc:  # offline, unknown id, gated, bad split: all end the same way for the user
        raise DataError(
            "data.path",
            [
                f"'{name}' is not a local file and could not be loaded from the Hugging Face hub "
                f"(split '{spec.split}'): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                "Use a local .jsonl/.json/.csv/.parquet path, or check the dataset id, split and network"
            ],
        )
    return [Row(number, dict(item)) for number, item in enumerate(dataset, start=1)]


# --- checking and formatting ------------------------------------------------------------------


def required_fields(spec: DataSpec) -> tuple[str, ...]:
    return {
        "instruction": (spec.instruction_field, spec.output_field),
        "text": (spec.text_field,),
        "chat": (spec.messages_field,),
    }[spec.format]


def format_example(values: dict[str, Any], spec: DataSpec) -> dict[str, Any]:
    """Turn one checked row into the dataset shape trl's SFTTrainer recognizes."""
    if spec.format == "instruction":
        extra = values.get(spec.input_field)
        template = PROMPT_TEMPLATE_WITH_INPUT if isinstance(extra, str) and extra.strip() else PROMPT_TEMPLATE
        prompt = template.format(instruction=values[spec.instruction_field].strip(), input=(extra or "").strip())
        return {"prompt": prompt, "completion": values[spec.output_field].strip()}
    if spec.format == "text":
        return {"text": values[spec.text_field]}
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in values[spec.messages_field]]}


def example_text(example: dict[str, Any], tokenizer: Any = None) -> str:
    """The full text of a formatted example, as the model sees it (without special tokens)."""
    if "prompt" in example:
        return example["prompt"] + example["completion"]
    if "text" in example:
        return example["text"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(example["messages"], tokenize=False)
    return "\n".join(m["content"] for m in example["messages"])


def check_row(row: Row, spec: DataSpec, source: str) -> str | None:
    """Return a problem line for a row that cannot become a training example, else None."""
    where = f"{source} row {row.number}"
    missing = [name for name in required_fields(spec) if name not in row.values or row.values[name] is None]
    if missing:
        have = ", ".join(sorted(map(str, row.values))) or "no fields"
        return (
            f"{where}: missing field {', '.join(repr(m) for m in missing)} (format '{spec.format}' needs "
            f"{', '.join(required_fields(spec))}; the row has {have}). Fix the row, map the field with "
            f"data.{_field_key(spec, missing[0])}, or set data.on_bad_rows: skip"
        )
    if spec.format == "chat":
        return _check_messages(row.values[spec.messages_field], where, spec.messages_field)
    for name in required_fields(spec):
        value = row.values[name]
        if not isinstance(value, str):
            return f"{where}: field '{name}' should be text, got {type(value).__name__} {value!r:.40}"
        if not value.strip():
            return f"{where}: field '{name}' is empty; fill it or set data.on_bad_rows: skip"
    extra = row.values.get(spec.input_field)
    if spec.format == "instruction" and extra is not None and not isinstance(extra, str):
        return f"{where}: field '{spec.input_field}' should be text, got {type(extra).__name__}"
    return None


def _field_key(spec: DataSpec, name: str) -> str:
    for key in ("instruction_field", "input_field", "output_field", "text_field", "messages_field"):
        if getattr(spec, key) == name:
            return key
    return "path"


def _check_messages(messages: Any, where: str, name: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{where}: field '{name}' should be a non-empty list of {{role, content}} messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"{where}: {name}[{i}] should be an object with 'role' and 'content'"
        if message["role"] not in CHAT_ROLES:
            return f"{where}: {name}[{i}].role is {message['role']!r}; allowed roles: {', '.join(CHAT_ROLES)}"
        if not isinstance(message["content"], str):
            return f"{where}: {name}[{i}].content should be text, got {type(message['content']).__name__}"
    if not any(m["role"] == "assistant" for m in messages):
        return f"{where}: {name} has no assistant message, so there is nothing to learn; add one or drop the row"
    return None


def token_count(example: dict[str, Any], tokenizer: Any) -> int:
    """Tokens of one example as trained, including BOS/EOS the tokenizer adds."""
    if "messages" in example and getattr(tokenizer, "chat_template", None):
        return len(tokenizer.apply_chat_template(example["messages"], tokenize=True))
    ids = tokenizer(example_text(example, tokenizer))["input_ids"]
    return len(ids) + (1 if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id) else 0)


def eval_count(spec: DataSpec, rows: int) -> int:
    return int(spec.eval_size) if spec.eval_size >= 1 else int(rows * spec.eval_size)


def prepare_data(path: str, spec: DataSpec, tokenizer: Any = None) -> PreparedData:
    """Read, check, format and split the data.

    Args:
        path: The resolved data path (spec.resolve_path(spec.data.path)).
        spec: The data section of the sweep spec.
        tokenizer: When given, rows longer than data.max_seq_length are problems too.

    Raises:
        DataError: With every problem found, when on_bad_rows is "error" or nothing usable is left.
    """
    import random

    rows, problems = read_rows(path, spec)
    unparsed = len(problems)
    source = Path(path).name if Path(path).exists() else path
    examples: list[dict[str, Any]] = []
    for row in rows:
        problem = check_row(row, spec, source)
        if problem is None:
            example = format_example(row.values, spec)
            if tokenizer is not None:
                length = token_count(example, tokenizer)
                if length > spec.max_seq_length:
                    problem = (
                        f"{source} row {row.number}: {length} tokens exceeds data.max_seq_length "
                        f"({spec.max_seq_length}); raise max_seq_length, shorten the row, or set data.on_bad_rows: skip"
                    )
        if problem is None:
            examples.append(example)
        else:
            problems.append(problem)
    if problems and spec.on_bad_rows == "error":
        raise DataError(path, problems)
    n_eval = eval_count(spec, len(examples))
    if n_eval < 1 or len(examples) - n_eval < 1:
        raise DataError(
            path,
            [
                f"{source}: {len(examples)} usable rows and data.eval_size {spec.eval_size} leave "
                f"{n_eval} eval and {len(examples) - n_eval} train rows; both need at least one. "
                "Add rows or change data.eval_size (a fraction like 0.1, or a row count like 20)"
            ],
        )
    order = list(range(len(examples)))
    random.Random(spec.seed).shuffle(order)
    eval_ids = set(order[:n_eval])
    return PreparedData(
        train=[e for i, e in enumerate(examples) if i not in eval_ids],
        eval=[examples[i] for i in order[:n_eval]],
        rows_read=len(rows) + unparsed,
        skipped=problems,
    )
