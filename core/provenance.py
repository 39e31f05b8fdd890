"""Provenance: the versions, commit and hardware that produced an experiment (saved in run_plan.json)."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from core.run_plan import Provenance

# The packages whose versions decide what a trial computes and measures.
TRACKED_PACKAGES = (
    "torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets", "ray", "optuna", "pandas",
)
_REPO = Path(__file__).resolve().parent.parent


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def collect(gpu_names: list[str] | None = None) -> Provenance:
    """Provenance of this process: package versions, the project's git commit (when it runs from a
    checkout), Python, platform, host and the GPUs trials use (names, when known)."""
    commit = _git("rev-parse", "HEAD") if (_REPO / ".git").exists() else None
    dirty = None
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return Provenance(
        qlora_sweep=package_version("qlora-sweep"),
        git_commit=commit,
        git_dirty=dirty,
        python=sys.version.split()[0],
        platform=platform.platform(),
        packages={name: package_version(name) for name in TRACKED_PACKAGES},
        gpus=list(gpu_names or []),
        hostname=socket.gethostname(),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
