"""Digests that say "qlora-sweep wrote this": HMAC-SHA256 under a key kept outside every experiment.

`resume` hands Ray Tune files that it unpickles (tuner.pkl, its experiment state, the searcher state);
unpickling runs whatever code the file names. Anyone who can write the experiment's folder or bucket
could therefore run code on the machine that resumes. So each such file is digested when written,
with a secret key that lives on the user's machine (never in the experiment), and checked before
`resume` lets Tune open it. A writer of the bucket alone cannot forge a digest without the key.

The key is 32 random bytes in a file only its owner can read: `$QLORA_SWEEP_KEY_FILE`, else
`$XDG_CONFIG_HOME/qlora-sweep/experiment.key` (`~/.config/...`). It is created on first use by `run`.
To resume on another machine (a new head node), give that machine the same key file (docs/resume.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "QLORA_SWEEP_KEY_FILE"
KEY_BYTES = 32


def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "qlora-sweep" / "experiment.key"


def read_key() -> bytes | None:
    """The key, or None when this machine has none (or it is unreadable or too short)."""
    try:
        key = key_path().read_bytes()
    except OSError:
        return None
    return key if len(key) >= KEY_BYTES else None


def ensure_key() -> bytes:
    """The key, created (owner-only, 0600) if this machine has none yet.

    Raises:
        OSError: If the key file cannot be created.
    """
    key = read_key()
    if key is not None:
        return key
    path = key_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created the key meanwhile: theirs wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    winner = read_key()
    if winner is None:
        raise OSError(f"could not create the experiment key {path}")
    return winner


def digest(key: bytes, name: str, data: bytes) -> str:
    """HMAC-SHA256 of a file's name (relative to the experiment) and content, hex."""
    mac = hmac.new(key, name.encode("utf-8") + b"\0", hashlib.sha256)
    mac.update(data)
    return mac.hexdigest()


def matches(key: bytes, name: str, data: bytes, recorded: list[str]) -> bool:
    """Whether one of the `recorded` digests is that of `name` with `data` under `key`."""
    actual = digest(key, name, data)
    return any(hmac.compare_digest(actual, r) for r in recorded if isinstance(r, str))
