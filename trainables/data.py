"""Training data: read rows, check them, tokenize them once, exactly as training sees them.

Formats:
    instruction  rows with `instruction`, optional `input`, and `output` (Alpaca style). They become
                 prompt/completion pairs; the loss covers only the response (and the EOS after it).
    text         rows with `text`: plain language modelling on the whole row (plus EOS).
    chat         rows with `messages`: a list of {role, content} (ShareGPT's {from, value} too),
                 rendered with the model's own chat template; the loss covers only the assistant
                 turns, each with its end-of-turn tokens.

Where rows come from: a local .jsonl/.json/.csv/.parquet file (or a folder and `data.data_files`),
or a hub dataset (`data.name`, `data.data_files`, `data.split` with slicing such as `train[:2000]`).
The held-out rows are carved out of them (`data.eval_size`), or come from their own split or file
(`data.eval_split`, `data.eval_path`). `data.max_rows` keeps a seeded random sample.

With a tokenizer, every kept row is tokenized here, in batches, the way the trainer would: the
token ids and the loss mask (TokenizedRows) are what trials train on, so they never re-tokenize
(trainables/qlora.py hands them to trl's SFTTrainer with `labels`, -100 off the loss). A row longer
than `data.max_seq_length` follows `data.on_long_rows`: error, skip, or truncate (cut the response,
never the prompt; the rows cut are counted).

Every problem names the file, the row (1-based, as an editor shows it) and the field. With
`on_bad_rows: error` (the default) any malformed row stops the sweep before a trial starts; with
`skip` malformed rows are dropped and counted.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ProblemsError
from core.hub import DATA_SUFFIXES, hub_advice, is_local_path

if TYPE_CHECKING:
    import numpy as np

    from trainables.settings import DataSpec

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_ROLES = ("system", "user", "assistant")
# ShareGPT-style messages ({from, value}) and the roles they use.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MAX_LISTED = 10
# Rows tokenized per batch call: large enough for the fast tokenizer's batch path, small enough that
# one batch's Python lists (ids and character offsets) stay a few MB.
TOKENIZE_BATCH = 1000
_SLICE = re.compile(r"^(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


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
    file: str | None = None  # the file's name, when data.path is a folder of several


@dataclass
class TokenizedRows:
    """Examples as trained: every row's token ids and loss mask, in flat arrays (cheap to pickle and
    to put in Ray's object store), row i spanning offsets[i]:offsets[i + 1].

    Attributes:
        input_ids: int32 token ids of all rows, one after the other.
        loss_mask: True where the token is a training target (response / assistant tokens).
        offsets: int64, one more than there are rows.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[tuple[Any, Any]]) -> TokenizedRows:
        import numpy as np

        lengths = np.fromiter((len(ids) for ids, _ in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in rows]) if rows else np.zeros(0, np.int32)
        mask = np.concatenate([np.asarray(m, dtype=bool) for _, m in rows]) if rows else np.zeros(0, bool)
        return cls(ids, mask, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        import numpy as np

        return np.diff(self.offsets)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def row(self, i: int) -> tuple[list[int], list[bool]]:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[start:stop].tolist(), self.loss_mask[start:stop].tolist()

    def labels(self, i: int) -> list[int]:
        """Row i's labels as the trainer gets them: the token id, or -100 where there is no loss."""
        ids, mask = self.row(i)
        return [t if m else -100 for t, m in zip(ids, mask)]

    def select(self, indices: list[int]) -> TokenizedRows:
        return TokenizedRows.from_rows([self.row(i) for i in indices])

    def to_dataset(self) -> Any:
        """A datasets.Dataset with `input_ids` and `labels` (-100 off the loss), built from the arrays
        without going through Python lists. trl's SFTTrainer takes it as already tokenized."""
        import numpy as np
        import pyarrow as pa
        from datasets import Dataset
        from datasets.table import InMemoryTable

        offsets = pa.array(self.offsets.astype(np.int32 if self.tokens < 2**31 else np.int64))
        list_of = pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray
        labels = np.where(self.loss_mask, self.input_ids.astype(np.int64), -100)
        table = pa.table(
            {
                "input_ids": list_of.from_arrays(offsets, pa.array(self.input_ids)),
                "labels": list_of.from_arrays(offsets, pa.array(labels)),
            }
        )
        return Dataset(InMemoryTable(table))


@dataclass
class PreparedData:
    """Train/eval examples, their tokens (when prepared with a tokenizer), and what was dropped or cut.

    Attributes:
        train, eval: The formatted examples (text; trl's dataset shapes). Emptied by `for_trials`.
        rows_read: Rows read (or sampled, with data.max_rows) from data.path and eval_path, bad ones included.
        skipped: One line per row dropped (on_bad_rows / on_long_rows: skip, or uncuttable under truncate).
        truncated: One line per row cut to data.max_seq_length (on_long_rows: truncate).
        train_tokens, eval_tokens: What trials train and evaluate on; None without a tokenizer.
        train_rows, eval_rows: How many examples each split holds.
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    rows_read: int
    skipped: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    train_tokens: TokenizedRows | None = None
    eval_tokens: TokenizedRows | None = None
    train_rows: int = -1
    eval_rows: int = -1

    def __post_init__(self) -> None:
        if self.train_rows < 0:
            self.train_rows = len(self.train_tokens) if self.train_tokens is not None else len(self.train)
        if self.eval_rows < 0:
            self.eval_rows = len(self.eval_tokens) if self.eval_tokens is not None else len(self.eval)

    @property
    def tokenized(self) -> bool:
        return self.train_tokens is not None and self.eval_tokens is not None

    def for_trials(self) -> PreparedData:
        """What goes to the trials through the object store: the tokens, without the text they came from."""
        if not self.tokenized:
            return self
        return replace(self, train=[], eval=[])

    def datasets(self, pack_to: int | None = None) -> tuple[Any, Any]:
        """(train, eval) datasets.Dataset for trl's SFTTrainer: the tokens when there are some, else the text.

        Args:
            pack_to: With the `packing` knob, data.max_seq_length: the train rows are packed into rows
                of at most that many tokens by trl's best-fit-decreasing packer
                (`trl.data_utils.pack_dataset`, which keeps each row whole and records its length in
                `seq_lengths`). Train with `PackedCollator`. The eval rows are never packed.
        """
        if self.tokenized:
            train, evaluation = self.train_tokens.to_dataset(), self.eval_tokens.to_dataset()
        else:
            from datasets import Dataset

            if pack_to:
                raise ValueError("packing needs the rows tokenized: prepare the data with the model's tokenizer")
            return Dataset.from_list(self.train), Dataset.from_list(self.eval)
        if pack_to:
            from trl.data_utils import pack_dataset

            train = pack_dataset(train, pack_to, strategy="bfd")
        return train, evaluation

    def trainer_inputs(self, tokenizer: Any, pack_to: int | None = None) -> dict[str, Any]:
        """SFTTrainer's train_dataset, eval_dataset and data_collator (None: trl's own) for these rows,
        packed into rows of `pack_to` tokens when given (the `packing` knob)."""
        train, evaluation = self.datasets(pack_to)
        collator = PackedCollator(tokenizer.pad_token_id) if pack_to else None
        return {"train_dataset": train, "eval_dataset": evaluation, "data_collator": collator}


class PackedCollator:
    """Batches of packed rows: trl's collator with position ids that restart at each original row,
    and no attention mask, so transformers builds a block-diagonal causal mask per packed row and no
    row attends to another (masking_utils' packed-sequence detection).

    Packed rows stay rows of the batch (b x longest packed row, padded), unlike trl's padding-free
    mode, which joins the whole micro-batch into one sequence: with SDPA, that attends over (b s)^2
    positions instead of b s^2, which on a long-tailed dataset cost more than the padding saved
    (docs/benchmarks.md, section 7). Pads sit at position 0 with label -100: each is a row of its own.
    Eval batches (rows not packed) go through it too, with the same result as padded rows and a mask.
    """

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.collate = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, return_position_ids=True)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        batch.pop("attention_mask", None)
        # A row's first token has nothing before it in its own row: never a target (the token before
        # it belongs to another row), as without packing.
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def trained_as_prepared(data: PreparedData) -> dict[str, Any]:
    """SFTConfig arguments for training on `data`: tokenized rows skip trl's dataset preparation
    (it would only re-check what preflight made: tokens with labels, none longer than
    max_seq_length), which costs seconds per trial on a large dataset. Text rows get trl's."""
    return {"dataset_kwargs": {"skip_prepare_dataset": True}} if data.tokenized else {}


# --- reading ----------------------------------------------------------------------------------


def read_rows(path: str, spec: DataSpec, *, split: str | None = None, held_out: bool = False) -> tuple[list[Row], list[str]]:
    """Read every row of a local file (or folder) or a hub dataset.

    Args:
        path: The resolved path or hub id.
        spec: The data section (name, data_files, split).
        split: The split to read; default data.split. A local file is one split, "train", that may be sliced.
        held_out: Reading eval_path or eval_split (which data.name and data.data_files do not apply to
            when eval_path is another dataset).

    Returns:
        The rows that could be parsed, and a problem line for each row that could not
        (bad JSON, bad UTF-8).

    Raises:
        DataError: If the file is missing, unreadable, of an unknown kind, or holds no rows; or if a
            hub dataset cannot be loaded.
    """
    split = split or spec.split
    key = "data.eval_path" if held_out and spec.eval_path else "data.path"
    split_key = "data.eval_split" if held_out else "data.split"
    if is_local_path(path):
        local = Path(path).expanduser()
        # data.name (a hub configuration) has no meaning for a local file, which is one configuration.
        part = _local_slice(split)
        if part is None:
            raise DataError(
                split_key,
                [
                    f"{split_key}: {split!r} names a split of a hub dataset; a local file is one split, 'train', which "
                    "may be sliced (train[:2000], train[10%:50%])"
                    + ("; for held-out rows from another file use data.eval_path" if held_out else "")
                ],
            )
        if not local.exists():
            raise DataError(key, [f"file not found: {path}. Relative paths are read from the spec file's folder"])
        if local.is_dir():
            files = _folder_files(local, spec.data_files if not (held_out and spec.eval_path) else None, key)
        else:
            if spec.data_files and not held_out:
                raise DataError(key, [f"{path} is a file; data.data_files names files of a hub dataset or of a data.path folder"])
            files = [local]
        rows, problems = [], []
        for file in files:
            file_rows, file_problems = _read_local(file, key)
            if local.is_dir():
                for row in file_rows:
                    row.file = file.name
            rows += file_rows
            problems += file_problems
        rows = _apply_slice(rows, part)
    else:
        rows, problems = _read_hub(path, spec, split, key, held_out), []
    if not rows and not problems:
        which = path if is_local_path(path) else f"{path} ({split})"
        raise DataError(path, [f"{which} holds no rows; add data or point {key} at another file"])
    return rows, problems


def _folder_files(folder: Path, patterns: tuple[str, ...] | None, key: str) -> list[Path]:
    if not patterns:
        raise DataError(
            key,
            [f"{folder} is a folder; point {key} at a {'/'.join(DATA_SUFFIXES)} file, or name its files with data.data_files"],
        )
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(p for p in folder.glob(pattern) if p.is_file())
        if not matched:
            raise DataError(key, [f"data.data_files: {pattern!r} matches no file in {folder}"])
        files += [p for p in matched if p not in files]
    return files


def _read_local(local: Path, key: str) -> tuple[list[Row], list[str]]:
    suffix = local.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(key, [f"{local}: unknown file type '{suffix}'; use one of {', '.join(DATA_SUFFIXES)}"])
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    return readers[suffix](local)


def _local_slice(split: str) -> tuple[str | None, str | None] | None:
    """(start, stop) of a local file's split ("train" or "train[a:b]"), or None for another split name."""
    match = _SLICE.match(split)
    if not match or match["name"] != "train":
        return None
    return match["start"], match["stop"]


def _bound(value: str | None, n: int) -> int | None:
    if value is None:
        return None
    if value.endswith("%"):
        return round(n * int(value[:-1]) / 100)
    return int(value)


def _apply_slice(rows: list[Row], part: tuple[str | None, str | None]) -> list[Row]:
    start, stop = part
    if start is None and stop is None:
        return rows
    return rows[_bound(start, len(rows)) : _bound(stop, len(rows))]


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


def _read_hub(name: str, spec: DataSpec, split: str, key: str, held_out: bool) -> list[Row]:
    """Rows of a hub dataset: data.name and data.data_files apply to data.path's dataset (and to its
    eval_split), not to an eval_path naming another one."""
    import datasets

    own = not (held_out and spec.eval_path)
    config = spec.name if own else None
    files = list(spec.data_files) if own and spec.data_files else None
    try:
        dataset = datasets.load_dataset(name, name=config, data_files=files, split=split)
    except Exception as exc:  # offline, unknown id, gated, bad config or split: all end the same way for the user
        first = str(exc).splitlines()[0] if str(exc) else ""
        what = ", ".join(
            part for part in (f"config {config!r}" if config else "", f"split {split!r}", f"data_files {files}" if files else "") if part
        )
        raise DataError(
            key,
            [
                f"'{name}' is a hub dataset id and could not be loaded ({what}): {type(exc).__name__}: {first}. "
                f"{_capitalized(hub_advice('dataset'))}"
            ],
        )
    if own and spec.max_rows and not held_out and len(dataset) > spec.max_rows:
        dataset = dataset.select(sample_indices(len(dataset), spec.max_rows, spec.seed))
    return [Row(number, dict(item)) for number, item in enumerate(dataset, start=1)]


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """k of range(n), a seeded random sample, in their original order (data.max_rows)."""
    if k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


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
    return {"messages": [_message(m) for m in values[spec.messages_field]]}


def _message(message: dict[str, Any]) -> dict[str, str]:
    if "role" in message:
        return {"role": message["role"], "content": message["content"]}
    return {"role": SHAREGPT_ROLES[message["from"]], "content": message["value"]}


def example_text(example: dict[str, Any], tokenizer: Any = None) -> str:
    """The full text of a formatted example, as the model sees it (without the EOS the trainer adds)."""
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
    roles = []
    for i, message in enumerate(messages):
        sharegpt = isinstance(message, dict) and "role" not in message and "from" in message and "value" in message
        if not isinstance(message, dict) or not (sharegpt or ("role" in message and "content" in message)):
            return f"{where}: {name}[{i}] should be an object with 'role' and 'content' (or ShareGPT's 'from' and 'value')"
        role, content = (message["from"], message["value"]) if sharegpt else (message["role"], message["content"])
        allowed = SHAREGPT_ROLES if sharegpt else CHAT_ROLES
        if role not in allowed:
            key = "from" if sharegpt else "role"
            return f"{where}: {name}[{i}].{key} is {role!r}; allowed roles: {', '.join(allowed)}"
        if not isinstance(content, str):
            key = "value" if sharegpt else "content"
            return f"{where}: {name}[{i}].{key} should be text, got {type(content).__name__}"
        roles.append(SHAREGPT_ROLES[role] if sharegpt else role)
    if "assistant" not in roles:
        return f"{where}: {name} has no assistant message, so there is nothing to learn; add one or drop the row"
    return None


# --- tokenizing, exactly as trained -------------------------------------------------------------


@dataclass
class _Rendered:
    """One example as text, with the character spans that carry the loss."""

    text: str
    spans: list[tuple[int, int]]
    special_tokens: bool  # whether the tokenizer adds its own BOS/EOS (not for chat: the template has them)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first differing character
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def render(example: dict[str, Any], tokenizer: Any) -> _Rendered:
    """The text the model trains on and where its loss is, in characters.

    Instruction rows: prompt + completion + EOS, the loss on completion + EOS (trl's prompt/completion
    rule). Text rows: text + EOS, all of it. Chat rows: the conversation through the model's chat
    template; each assistant turn spans from where the conversation so far, rendered with the
    generation prompt, stops matching the whole, to where the conversation up to and including that
    turn does, so the turn's content and its end-of-turn tokens carry the loss and no prompt token does.

    Raises:
        ValueError: If the chat template refuses the conversation (e.g. roles that must alternate).
    """
    eos = tokenizer.eos_token or ""
    if "prompt" in example:
        completion = example["completion"] if example["completion"].endswith(eos) else example["completion"] + eos
        text = example["prompt"] + completion
        return _Rendered(text, [(len(example["prompt"]), len(text))], True)
    if "text" in example:
        text = example["text"] if example["text"].endswith(eos) else example["text"] + eos
        return _Rendered(text, [(0, len(text))], True)
    messages = example["messages"]

    def chat(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    try:
        text = chat(len(messages), False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = _common_prefix(chat(i, True), text) if i else 0
            stop = _common_prefix(chat(i + 1, False), text)
            if stop > start:
                spans.append((start, stop))
    except Exception as exc:  # jinja's TemplateError, a template's raise_exception(...)
        raise ValueError(f"the model's chat template refuses this conversation ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return _Rendered(text, spans, False)


class _Encoded:
    """One batch's token ids, and where a character of each text falls among its tokens."""

    def __init__(self, ids: list[list[int]], char_to_token: Any, token_start: Any):
        self.ids = ids
        self.char_to_token = char_to_token  # (row, char) -> token index or None
        self.token_start = token_start  # (row, token) -> its first character

    def first_token_from(self, row: int, char: int, text_length: int) -> int:
        """The token holding `char` (also when it starts before), or the next one that holds any."""
        for c in range(char, text_length):
            token = self.char_to_token(row, c)
            if token is not None:
                return token
        return len(self.ids[row])

    def first_token_after(self, row: int, char: int, text_length: int) -> int:
        """The first token that starts at or after `char` (a token holding char but starting before
        it belongs to what precedes)."""
        for c in range(char, text_length):
            token = self.char_to_token(row, c)
            if token is not None:
                return token if self.token_start(row, token) >= char else token + 1
        return len(self.ids[row])


def _encode(tokenizer: Any, texts: list[str], special: bool) -> _Encoded:
    """Token ids of `texts` in one batch call, with character positions (fast tokenizers).

    A fast tokenizer is called through its Rust backend directly, with the settings transformers'
    own call would apply (no padding, no truncation, special tokens in the text kept whole): the same
    ids, without building a BatchEncoding of Python lists per row, which costs as much as tokenizing.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        split = bool(getattr(tokenizer, "split_special_tokens", False))
        if backend.encode_special_tokens != split:
            backend.encode_special_tokens = split
        encodings = backend.encode_batch(texts, add_special_tokens=special)
        return _Encoded(
            [e.ids for e in encodings],
            lambda row, char: encodings[row].char_to_token(char),
            lambda row, token: encodings[row].token_to_chars(token)[0],
        )
    encoded = tokenizer(texts, add_special_tokens=special, return_attention_mask=False)
    return _Encoded(
        encoded["input_ids"],
        lambda row, char: encoded.char_to_token(row, char),
        lambda row, token: encoded.token_to_chars(row, token).start,
    )


def _masks(encoded: _Encoded, rendered: list[_Rendered]) -> tuple[Any, Any, Any]:
    """Flat ids, flat loss mask and row offsets of one batch. A span's tokens run from the token
    holding its first character to the last one starting before its end; a span that reaches the end
    of the text takes every token after it too (an EOS the tokenizer's post-processor appends)."""
    from itertools import chain

    import numpy as np

    ids = encoded.ids
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    bounds = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
    token_spans: list[list[tuple[int, int]]] = []
    for i, r in enumerate(rendered):
        n, size = len(ids[i]), len(r.text)
        spans = []
        for start, stop in r.spans:
            first = 0 if start == 0 else encoded.first_token_from(i, start, size)
            last = n if stop >= size else encoded.first_token_after(i, stop, size)
            if last > first:
                spans.append((first, last))
        token_spans.append(spans)
    row = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
    position = np.arange(total, dtype=np.int64) - bounds[:-1][row]
    if all(len(spans) == 1 for spans in token_spans):
        first = np.fromiter((spans[0][0] for spans in token_spans), dtype=np.int64, count=len(ids))
        last = np.fromiter((spans[0][1] for spans in token_spans), dtype=np.int64, count=len(ids))
        mask = (position >= first[row]) & (position < last[row])
    else:
        mask = np.zeros(total, dtype=bool)
        for i, spans in enumerate(token_spans):
            for first_token, last_token in spans:
                mask[bounds[i] + first_token : bounds[i] + last_token] = True
    return flat, mask, bounds


def _token_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _mask_by_prefixes(tokenizer: Any, rendered: _Rendered, ids: list[int]) -> list[bool]:
    """For tokenizers without character offsets (slow ones): tokenize the text up to each span
    boundary and take where it stops matching the whole."""
    mask = [False] * len(ids)
    for start, stop in rendered.spans:
        first = _token_prefix(tokenizer(rendered.text[:start], add_special_tokens=rendered.special_tokens)["input_ids"], ids) if start else 0
        last = len(ids) if stop == len(rendered.text) else _token_prefix(
            tokenizer(rendered.text[:stop], add_special_tokens=rendered.special_tokens)["input_ids"], ids
        )
        for k in range(first, last):
            mask[k] = True
    return mask


def tokenize_examples(examples: list[dict[str, Any]], tokenizer: Any) -> list[tuple[Any, Any] | str]:
    """Token ids and loss masks of formatted examples, as the trainer will see them, in batch calls.

    Returns:
        Per example (ids, mask) as numpy arrays, or a problem (without the row's name) when its chat
        template refuses it or leaves it nothing to learn.
    """
    import numpy as np

    out: list[tuple[Any, Any] | str] = []
    fast = bool(getattr(tokenizer, "is_fast", False))
    for begin in range(0, len(examples), TOKENIZE_BATCH):
        batch: list[_Rendered | str] = []
        for example in examples[begin : begin + TOKENIZE_BATCH]:
            try:
                batch.append(render(example, tokenizer))
            except ValueError as exc:
                batch.append(str(exc))
        encoded: dict[int, tuple[Any, Any]] = {}
        for special in (True, False):
            chosen = [i for i, r in enumerate(batch) if isinstance(r, _Rendered) and r.special_tokens == special]
            if not chosen:
                continue
            rendered = [batch[i] for i in chosen]
            if fast:
                flat, mask, bounds = _masks(_encode(tokenizer, [r.text for r in rendered], special), rendered)
                for k, i in enumerate(chosen):
                    encoded[i] = (flat[bounds[k] : bounds[k + 1]], mask[bounds[k] : bounds[k + 1]])
            else:
                ids = tokenizer([r.text for r in rendered], add_special_tokens=special)["input_ids"]
                for k, i in enumerate(chosen):
                    mask = np.asarray(_mask_by_prefixes(tokenizer, rendered[k], ids[k]), dtype=bool)
                    encoded[i] = (np.asarray(ids[k], dtype=np.int32), mask)
        for i, item in enumerate(batch):
            if isinstance(item, str):
                out.append(item)
            elif not encoded[i][1].any():
                out.append(
                    "the model's chat template leaves no assistant tokens to learn from in this conversation"
                    if not item.special_tokens
                    else "no token of the response is left to learn from"
                )
            else:
                out.append(encoded[i])
    return out


def token_count(example: dict[str, Any], tokenizer: Any) -> int:
    """Tokens of one example as trained (BOS/EOS and chat-template tokens included)."""
    result = tokenize_examples([example], tokenizer)[0]
    if isinstance(result, str):
        return len(tokenizer(render(example, tokenizer).text, add_special_tokens="messages" not in example)["input_ids"])
    return len(result[0])


def truncate(ids: Any, mask: Any, max_length: int) -> tuple[Any, Any] | None:
    """Cut a row to max_length tokens without cutting into a prompt: keep the first max_length tokens
    and drop what follows the last loss token among them (a later turn's prompt, cut off). None when
    no loss token is left (the prompt alone fills max_length)."""
    import numpy as np

    ids, mask = ids[:max_length], mask[:max_length]
    loss = np.flatnonzero(mask)
    if not len(loss):
        return None
    return ids[: loss[-1] + 1], mask[: loss[-1] + 1]


# --- the whole preparation --------------------------------------------------------------------


def eval_count(spec: DataSpec, rows: int) -> int:
    size = spec.eval_amount
    return int(size) if size >= 1 else int(rows * size)


@dataclass
class _Checked:
    """One source's rows after checking, formatting and tokenizing."""

    examples: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[tuple[Any, Any]] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)  # lines that are no row at all (bad JSON, bad UTF-8)
    bad: list[str] = field(default_factory=list)  # malformed: on_bad_rows
    long: list[str] = field(default_factory=list)  # over max_seq_length: on_long_rows
    skipped_long: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    rows_read: int = 0


def _source_name(path: str, split: str) -> str:
    if is_local_path(path):
        return Path(path).name
    return f"{path} {split}"


def _check_source(rows: list[Row], unparsed: list[str], spec: DataSpec, source: str, tokenizer: Any) -> _Checked:
    checked = _Checked(unparsed=list(unparsed), rows_read=len(rows) + len(unparsed))
    kept: list[tuple[Row, dict[str, Any]]] = []
    for row in rows:
        problem = check_row(row, spec, row.file or source)
        if problem is None:
            kept.append((row, format_example(row.values, spec)))
        else:
            checked.bad.append(problem)
    if tokenizer is None:
        checked.examples = [example for _, example in kept]
        return checked
    limit = spec.max_seq_length
    for (row, example), result in zip(kept, tokenize_examples([e for _, e in kept], tokenizer)):
        if isinstance(result, str):
            checked.bad.append(f"{row.file or source} row {row.number}: {result}; fix the row or set data.on_bad_rows: skip")
            continue
        ids, mask = result
        if len(ids) > limit:
            where = f"{row.file or source} row {row.number}"
            message = (
                f"{where}: {len(ids)} tokens exceeds data.max_seq_length ({limit}); raise max_seq_length, "
                "shorten the row, or set data.on_long_rows: skip or truncate"
            )
            if spec.long_rows == "error":
                checked.long.append(message)
                continue
            if spec.long_rows == "skip":
                checked.skipped_long.append(message)
                continue
            cut = truncate(ids, mask, limit)
            if cut is None:
                prompt = int(mask.argmax()) if mask.any() else len(ids)
                checked.bad.append(
                    f"{where}: the prompt alone is {prompt} tokens and data.max_seq_length is {limit}; truncating "
                    "cuts only the response, so nothing would be left to learn. Raise max_seq_length, shorten the "
                    "prompt, or set data.on_bad_rows: skip"
                )
                continue
            checked.truncated.append(f"{where}: {len(ids)} -> {len(cut[0])} tokens (response cut to data.max_seq_length)")
            ids, mask = cut
        checked.examples.append(example)
        checked.tokens.append((ids, mask))
    return checked


_ROW_NUMBER = re.compile(r" (?:row|line) (\d+):")


def _by_row(problems: list[str]) -> list[str]:
    """Problems in row order (stable; those naming no row first)."""
    def number(problem: str) -> int:
        match = _ROW_NUMBER.search(problem)
        return int(match.group(1)) if match else 0

    return sorted(problems, key=number)


def prepare_data(path: str, spec: DataSpec, tokenizer: Any = None) -> PreparedData:
    """Read, check, format, tokenize and split the data.

    Args:
        path: The resolved data path (spec.resolve_path(spec.data.path)); data.eval_path, if set,
            must be resolved in `spec` already (sweeps.plan.trial_job and preflight do).
        spec: The data section of the sweep spec.
        tokenizer: When given, every kept row is tokenized as trained (PreparedData.train_tokens /
            eval_tokens), and rows longer than data.max_seq_length follow data.on_long_rows.

    Raises:
        DataError: With every problem found: malformed rows under on_bad_rows "error", long rows under
            on_long_rows "error", or nothing usable left.
    """
    if spec.format == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise DataError(path, ["data.format: 'chat' needs a tokenizer with a chat template, and this model has none"])
    if spec.eval_split and not spec.eval_path and is_local_path(path):
        raise DataError(
            "data.eval_split",
            [
                f"data.eval_split ({spec.eval_split!r}) names a split of a hub dataset, and data.path is a local file; "
                "use data.eval_path for a separate eval file, or data.eval_size to carve eval rows out of data.path"
            ],
        )
    rows, unparsed = read_rows(path, spec)
    if spec.max_rows and len(rows) > spec.max_rows and is_local_path(path):
        # A seeded sample of the parsed rows, in file order (a hub dataset is sampled as it loads).
        rows = [rows[i] for i in sample_indices(len(rows), spec.max_rows, spec.seed)]
    sources = [(_source_name(path, spec.split), rows, unparsed)]
    if spec.held_out:
        eval_path = spec.eval_path or path
        eval_split = spec.eval_split or "train"
        eval_rows, eval_unparsed = read_rows(eval_path, spec, split=eval_split, held_out=True)
        sources.append((_source_name(eval_path, eval_split), eval_rows, eval_unparsed))
    parts = [_check_source(r, u, spec, source, tokenizer) for source, r, u in sources]
    # Problems in the order of the file: unparsable lines (found while reading) first, then by row.
    if spec.on_bad_rows == "error":
        errors = [p for part in parts for p in part.unparsed + _by_row(part.bad + part.long)]
    else:
        errors = [p for part in parts for p in part.long]
    if errors:
        raise DataError(path, errors)
    skipped = [p for part in parts for p in part.unparsed + _by_row(part.bad + part.skipped_long)]
    truncated = [p for part in parts for p in part.truncated]
    rows_read = sum(part.rows_read for part in parts)
    train_part = parts[0]
    source = sources[0][0]
    if spec.held_out:
        train_ids = list(range(len(train_part.examples)))
        eval_part, eval_ids = parts[1], list(range(len(parts[1].examples)))
        if not eval_ids or not train_ids:
            which = "eval" if not eval_ids else "train"
            raise DataError(path, [f"no usable {which} rows are left; check data.{'eval_path/eval_split' if which == 'eval' else 'path'}"])
    else:
        n = len(train_part.examples)
        n_eval = eval_count(spec, n)
        if n_eval < 1 or n - n_eval < 1:
            raise DataError(
                path,
                [
                    f"{source}: {n} usable rows and data.eval_size {spec.eval_amount:g} leave "
                    f"{n_eval} eval and {n - n_eval} train rows; both need at least one. "
                    "Add rows or change data.eval_size (a fraction like 0.1, or a row count like 20)"
                ],
            )
        order = list(range(n))
        random.Random(spec.seed).shuffle(order)
        eval_set = set(order[:n_eval])
        train_ids = [i for i in range(n) if i not in eval_set]
        eval_part, eval_ids = train_part, order[:n_eval]
    tokenized = tokenizer is not None
    return PreparedData(
        train=[train_part.examples[i] for i in train_ids],
        eval=[eval_part.examples[i] for i in eval_ids],
        rows_read=rows_read,
        skipped=skipped,
        truncated=truncated,
        train_tokens=TokenizedRows.from_rows([train_part.tokens[i] for i in train_ids]) if tokenized else None,
        eval_tokens=TokenizedRows.from_rows([eval_part.tokens[i] for i in eval_ids]) if tokenized else None,
    )
