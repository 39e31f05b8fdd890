"""Hub ids and local paths, told apart one way for models and datasets, and what to say when the hub fails.

The rule (README, "Models and data: hub ids and local paths"): a value is a *local path* when it
exists, or starts with `/`, `./`, `../` or `~`, or ends in a data-file suffix (.jsonl, .json, .csv,
.parquet). Anything else of the form `namespace/name` is a *hub id*: letters, digits, `_`, `.`
and `-` on both sides of one slash, so `meta-llama/Llama-3.1-8B`, `Qwen/Qwen2.5-7B-Instruct` and
`openai/gsm8k` are ids. A value that is neither (`data`, `a/b/c`) is a local path that does not
exist, and is reported as a missing file.

Importing this module imports nothing outside the standard library.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Files data.path may name (trainables/data.py reads each).
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
LOCAL_PREFIXES = ("/", "./", "../", "~")
# huggingface_hub's repo id rule: one namespace, one name, each of [A-Za-z0-9_.-], no leading '-' or '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for this file system, a permission problem: not a usable local path
        return False


def looks_like_hub_id(value: str) -> bool:
    """Whether `value` has the shape of a hub id (`namespace/name`), whatever exists on disk."""
    return (
        bool(HUB_ID.match(value))
        and ".." not in value
        and Path(value).suffix.lower() not in DATA_SUFFIXES
    )


def is_local_path(value: str, base_dir: Path | str | None = None) -> bool:
    """Whether `value` names a local file or folder (existing or not) rather than a hub id.

    Args:
        value: A model or data path as the user wrote it.
        base_dir: The folder relative paths are read from (the spec file's); default: the current one.
    """
    if value in (".", "..") or value.startswith(LOCAL_PREFIXES) or os.path.isabs(value):
        return True
    if Path(value).suffix.lower() in DATA_SUFFIXES:
        return True
    if _exists(Path(base_dir or ".") / value):
        return True
    return not looks_like_hub_id(value)


def is_hub_id(value: str, base_dir: Path | str | None = None) -> bool:
    return not is_local_path(value, base_dir)


def hub_advice(kind: str) -> str:
    """What to check when a hub `kind` ("model" or "dataset") cannot be reached, from the environment.

    Names HF_HUB_OFFLINE when it is set (only the local cache is searched then) and HF_TOKEN for gated
    or private repositories.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )
    token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    parts = []
    if offline and kind == "dataset":
        datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(os.path.dirname(cache), "datasets")
        parts.append(
            f"HF_HUB_OFFLINE=1 is set, so only what the datasets library cached before ({datasets_cache}) is used: "
            "load the dataset once with network on this machine (same HF_HOME), or unset HF_HUB_OFFLINE"
        )
    elif offline:
        parts.append(
            f"HF_HUB_OFFLINE=1 is set, so only the local hub cache ({cache}) was searched: download the {kind} "
            "there first (`hf download ID`, with the same HF_HOME) or unset HF_HUB_OFFLINE"
        )
    else:
        parts.append(f"check the id and the network (the hub cache is {cache})")
    if token:
        parts.append(f"HF_TOKEN is set; if the {kind} is gated, accept its terms on huggingface.co with that account")
    else:
        parts.append(f"a gated or private {kind} needs HF_TOKEN in the environment")
    parts.append("a local folder or file is written with a leading ./ or /")
    return "; ".join(parts)
