"""The environment of a run on one machine with no model hub: the test suite's and the benchmarks'.

Call `use_local_env()` before anything imports ray. Ray then binds every local service to
127.0.0.1 only (without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it listens on all interfaces), sends no
usage statistics, and Hugging Face libraries never try the hub and print no progress bars.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def use_local_env() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # forced, not a default: loopback is not optional
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
