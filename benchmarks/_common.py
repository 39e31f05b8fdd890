"""What every benchmark script shares: the environment, the tiny spec, statistics, tables, JSON.

Import this before ray: it sets the variables that keep a local Ray on 127.0.0.1 and quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sweeps.local_env import use_local_env

use_local_env()  # before anything imports ray: every local Ray service binds to 127.0.0.1 only

REPO = Path(__file__).resolve().parent.parent
SMOKE_DATA = REPO / "sweeps" / "data" / "smoke_instructions.jsonl"

# The tiny sweep the benchmarks start from (the test suite's TINY_SPEC, with fixed configs):
# the builtin 2-layer Llama, NF4 + double quant, the shipped smoke task, 20 steps, 1 CPU per trial.
TINY_SPEC: dict[str, Any] = {
    "name": "bench",
    "model": {"path": "builtin:tiny-llama"},
    "data": {"path": str(SMOKE_DATA), "max_seq_length": 64, "eval_size": 40},
    "space": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": "qv",
        "learning_rate": 3.0e-3,
        "lora_dropout": 0.0,
    },
    "search": {"num_samples": 2, "max_concurrent": 1, "seed": 0, "sampler": "random"},
    "scheduler": {"asha": None},
    "train": {"max_steps": 20, "eval_every": 10, "batch_size": 8},
    "resources": {"gpus_per_trial": 0, "cpus_per_trial": 1},
}

# A trial config as Tune passes it to the trainable, matching TINY_SPEC's fixed space.
TINY_TRIAL: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16.0,
    "target_modules": "qv",
    "learning_rate": 3.0e-3,
    "lora_dropout": 0.0,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "lr_scheduler_type": "cosine",
    "batch_size": 8,
}


def spec_dict(**overrides: Any) -> dict[str, Any]:
    """TINY_SPEC with sections overridden (a section's keys are merged, not replaced)."""
    from sweeps.spec import with_sections

    return with_sections(TINY_SPEC, **overrides)


def parser(description: str, *, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: --repeats, --out, --quick."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=repeats, help=f"measured repetitions (default {repeats})")
    p.add_argument("--out", type=Path, default=None, help="write the raw numbers as JSON here")
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the script works (numbers meaningless)")
    return p


def machine() -> dict[str, Any]:
    """The machine and library versions a figure was measured with."""
    import psutil
    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    versions = {}
    for name in ("torch", "ray", "transformers", "peft", "bitsandbytes", "trl", "optuna", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # a missing library is reported, not fatal
            versions[name] = None
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def describe_machine(info: dict[str, Any]) -> str:
    v = info["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "ray", "transformers", "peft", "bitsandbytes", "trl", "optuna"))
    gpu = "CUDA" if info["cuda"] else "no GPU"
    return f"{info['cpu_model']}, {info['logical_cpus']} logical CPUs, {info['ram_gib']} GiB RAM, {gpu}; {libs}"


def stats(values: list[float]) -> dict[str, Any]:
    """Median, min, max and every value (a figure is the median of `n` runs)."""
    clean = [float(v) for v in values if v is not None]
    if not clean:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": statistics.median(clean),
        "min": min(clean),
        "max": max(clean),
        "n": len(clean),
        "values": [round(v, 6) for v in clean],
    }


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def spread(s: dict[str, Any], digits: int = 2) -> str:
    """'median (min–max)' of a stats() dict."""
    if not s["n"]:
        return "n/a"
    if s["n"] == 1:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A markdown table; `align` is one character per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO))
    except ValueError:
        shown = str(script)
    return " ".join(["python", shown, *map(shlex.quote, sys.argv[1:])])


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"command": command_line(), "machine": machine(), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(full, indent=2, default=str) + "\n")
    print(f"\nraw numbers: {path}")


def warm_model_cache() -> str:
    """Build (once, cached) the builtin tiny model, so no measurement includes the build."""
    from trainables.tiny_models import materialize

    return materialize("builtin:tiny-llama")


def ray_processes() -> list[int]:
    """PIDs of Ray's own processes on this machine (GCS, raylets, workers, dashboard)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            name = proc.info["name"] or ""
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "gcs_server" in name or "raylet" in name or name.startswith("ray::") or "default_worker.py" in cmdline:
            found.append(proc.pid)
    return found


def wait_for_ray_to_exit(before: set[int], timeout_s: float = 30.0) -> list[int]:
    """Wait until the Ray processes this script started are gone; return any that are not."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        left = [pid for pid in ray_processes() if pid not in before]
        if not left:
            return []
        time.sleep(0.5)
    return [pid for pid in ray_processes() if pid not in before]
