"""Which checkpoint a restored trial continues from: the latest readable one.

A trial that Tune restores (a retry after an error or a lost node, or `qlora-sweep resume`) gets
its latest checkpoint. If that one is unreadable (a node died while writing it, a truncated upload,
a disk error), training from it would fail in every retry, and the trial would be lost although an
older checkpoint of it is fine. So `train_qlora` checks the checkpoint first (`checkpoint_problem`)
and, when it is unreadable, continues from the newest older checkpoint of the trial that is readable
(`older_checkpoints`; the driver keeps at least two per trial, sweeps/driver.py), printing a note on
the console and recording it in the trial's reports (`checkpoint_fallback`).

The rounds between the two checkpoints are trained again, but not reported again
(`quiet_through_step`): Tune has seen them already and numbers rounds (training_iteration) from
the latest checkpoint, so ASHA's rungs and the stop at the last round stay where they were.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any

# Written into each checkpoint next to the Trainer's own state: what the Trainer does not keep.
STATE_FILE = "qlora_sweep_state.json"
TRAINER_STATE_FILE = "trainer_state.json"
_TUNE_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_problem(folder: str) -> str | None:
    """Why a Hugging Face Trainer checkpoint (as the trainable saves it) cannot be resumed from, or None.

    Reads every file: JSON files parse, safetensors files load tensor by tensor, torch files
    (zip archives: optimizer, scheduler, RNG state) pass their CRC check.
    """
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return f"cannot list it ({exc})"
    if TRAINER_STATE_FILE not in names:
        return f"no {TRAINER_STATE_FILE}"
    if not any(n.startswith("adapter_model.") for n in names):
        return "no adapter_model.* (the LoRA weights)"
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            elif name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif name.endswith((".pt", ".pth", ".bin")):
                if not zipfile.is_zipfile(path):
                    return f"{name} is not a torch archive"
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{name}: {bad} fails its CRC check"
        except Exception as exc:  # any reader's error means: cannot resume from this file
            return f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def checkpoint_step(folder: str) -> int | None:
    """The training step a checkpoint was saved at, from its own files (None if none can be read)."""
    for name, key in ((STATE_FILE, "step"), (TRAINER_STATE_FILE, "global_step")):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                value = json.load(f).get(key)
            if isinstance(value, int):
                return value
        except (OSError, ValueError, AttributeError):
            continue
    return None


def older_checkpoints(checkpoint: Any) -> list[Any]:
    """The trial's other kept Tune checkpoints older than `checkpoint`, newest first (same storage)."""
    import pyarrow.fs
    from ray import tune

    parent, _, name = checkpoint.path.rstrip("/").rpartition("/")
    match = _TUNE_CHECKPOINT.match(name)
    if not match:
        return []
    try:
        infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    except OSError:
        return []
    older = []
    for info in infos:
        other = _TUNE_CHECKPOINT.match(info.base_name)
        if info.type == pyarrow.fs.FileType.Directory and other and int(other.group(1)) < int(match.group(1)):
            older.append((int(other.group(1)), info.path))
    return [tune.Checkpoint(path, filesystem=checkpoint.filesystem) for _, path in sorted(older, reverse=True)]
