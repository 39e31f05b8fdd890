"""One driver per experiment folder: the lock `run` and `resume` hold while they drive a sweep.

Two drivers on one experiment would both restore and save Tune's state, both run the searcher on
one Optuna study and both write the report: trials run twice, state files overwrite each other.
So `run` and `resume` take an exclusive lock on the experiment before they start anything, and hold
it until the sweep's report is written (`DriverLock`). A second driver is refused at once with an
`ExperimentInUse` error (exit 2, nothing started) that names the folder and the holder: its host,
process id, user, start time and command, read from the holder's note (LOCK_INFO_FILE).

* A local experiment folder is locked in place: LOCK_FILE inside it, with an OS file lock (flock;
  filelock's UnixFileLock), which the kernel drops when the holder exits however it ends (SIGKILL
  included), so a dead driver never leaves a stale lock. This covers drivers on one machine and,
  where the file system supports flock across hosts (NFSv4, Lustre), on several.
* An experiment on s3:// or gs:// has no file to lock: the lock is then a local file named after
  the experiment's URI under the qlora-sweep cache (QLORA_SWEEP_CACHE/locks), so it keeps out a
  second driver on the same machine only. Two head nodes must not resume one bucket experiment
  at once (docs/resume.md).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from core import storage
from core.errors import QloraSweepError
from core.redact import redact
from trainables.tiny_models import cache_root

LOCK_FILE = ".qlora-sweep-driver.lock"
LOCK_INFO_FILE = ".qlora-sweep-driver.json"


class ExperimentInUse(QloraSweepError):
    """Another driver holds the experiment's lock (exit 2: nothing was started)."""


def lock_paths(experiment_dir: str) -> tuple[Path, Path]:
    """(the lock file, the holder's note) of an experiment folder or URI."""
    if storage.is_uri(experiment_dir):
        # One key per location however it is spelled: with or without keys in it, or a trailing slash.
        base, sep, query = storage.without_credentials(experiment_dir).partition("?")
        key = hashlib.sha256((base.rstrip("/") + sep + query).encode()).hexdigest()[:24]
        folder = cache_root() / "locks"
        return folder / f"{key}.lock", folder / f"{key}.json"
    folder = Path(experiment_dir)
    return folder / LOCK_FILE, folder / LOCK_INFO_FILE


def _holder_note() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": _user(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": redact(" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))),
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def describe_holder(info_file: Path) -> str:
    """The holder's note in words ("unknown" when it cannot be read, e.g. it is being written)."""
    try:
        note = json.loads(info_file.read_text(encoding="utf-8"))
        return (
            f"pid {note['pid']} on {note['host']} (user {note['user']}, since {note['started']}): {note['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown (its note could not be read)"


class DriverLock:
    """The exclusive lock of one experiment, held by `run` or `resume` (a context manager).

    Raises:
        ExperimentInUse: On entry, if another driver holds it.
    """

    def __init__(self, experiment_dir: str) -> None:
        self.experiment_dir = experiment_dir
        self.lock_file, self.info_file = lock_paths(experiment_dir)
        self._lock: Any = None
        self._created: Path | None = None

    def __enter__(self) -> DriverLock:
        from filelock import FileLock, Timeout

        if not self.lock_file.parent.exists():
            self._created = self.lock_file.parent
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_file), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise ExperimentInUse(
                f"{redact(self.experiment_dir)} is in use by another qlora-sweep driver: "
                f"{describe_holder(self.info_file)}. One driver per experiment: wait for it to end (or stop it "
                f"with Ctrl-C), then `qlora-sweep resume {redact(self.experiment_dir)}` if it was interrupted; "
                f"to run the spec again alongside it, choose another --name"
            ) from None
        self._lock = lock
        self.info_file.write_text(json.dumps(_holder_note()), encoding="utf-8")
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.info_file.unlink(missing_ok=True)
        except OSError:
            pass
        # A sweep that stopped before writing anything (e.g. its study was refused) leaves no folder
        # holding only the lock behind. The lock file goes while still locked: unlinked after the
        # release, it could be the file a next driver had just locked, and a third would lock a new one.
        empty = False
        if self._created is not None and not storage.is_uri(self.experiment_dir):
            try:
                if [p.name for p in self._created.iterdir()] == [LOCK_FILE]:
                    self.lock_file.unlink()
                    empty = True
            except OSError:
                pass
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if empty:
            try:
                self._created.rmdir()  # type: ignore[union-attr]
            except OSError:
                pass  # a next driver already locked a new file in it
