"""Run `qlora-sweep` the way a user does, in its own process, with a private Ray temp folder.

Ray puts every session it starts (sockets, logs) under $RAY_TMPDIR/ray/session_*. A private
RAY_TMPDIR per run proves whether that run started Ray at all, keeps its logs apart from other
Ray sessions on the machine for grepping, and keeps it from joining a cluster someone else left
running. The folder lives directly under /tmp: Ray's unix socket paths must stay under 107 bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QLORA_SWEEP = str(Path(sys.executable).parent / "qlora-sweep")


@dataclass
class CliRun:
    """What one `qlora-sweep` process did."""

    returncode: int
    stdout: str
    stderr: str
    ray_tmp: Path
    wall_s: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def ray_sessions(self) -> list[Path]:
        """The Ray sessions this run started (empty: Ray never started)."""
        return sorted((self.ray_tmp / "ray").glob("session_2*"))


def processes_of(ray_tmp: Path, timeout_s: float = 30.0) -> list[str]:
    """Processes still naming this Ray temp folder after `timeout_s` (Ray left behind), as descriptions."""
    import psutil

    deadline = time.time() + timeout_s
    while True:
        alive = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if str(ray_tmp) in " ".join(proc.info["cmdline"] or []):
                    alive.append(f"{proc.info['pid']} {' '.join(proc.info['cmdline'][:2])}")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


@contextmanager
def private_ray_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qs-ray-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def cli_env(ray_tmp: Path, **extra: str | None) -> dict[str, str]:
    """This process's environment plus a private RAY_TMPDIR; an `extra` value of None removes a variable."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_cli(
    args: list[str],
    ray_tmp: Path,
    *,
    cwd: Path | None = None,
    timeout: float = 600,
    prefix: list[str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    **env: str | None,
) -> CliRun:
    """Run `qlora-sweep ARGS` to the end (optionally under a wrapper command such as unshare)."""
    started = time.time()
    done = subprocess.run(
        [*(prefix or []), QLORA_SWEEP, *args],
        cwd=cwd,
        env=cli_env(ray_tmp, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )
    return CliRun(done.returncode, done.stdout, done.stderr, ray_tmp, time.time() - started)


def read_results(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    """trial_id -> parsed result.json lines (a line cut short by a kill is skipped)."""
    out = {}
    for path in sorted(experiment.glob("trial_*/result.json")):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        out[path.parent.name.removeprefix("trial_")] = rows
    return out
