"""The environment variables qlora-sweep sets, in one place (importing this module imports nothing else).

* `QUIET_ENV`: what every sweep sets in the driver (`sweeps.driver.quiet_driver`) and forwards to
  every trial worker: trials run side by side, and per-step and per-file progress bars from each
  would drown the live view.
* `use_local_env()`: a run on one machine with no model hub, the test suite's and the benchmarks'.
  Call it before anything imports ray. Ray then binds every local service to 127.0.0.1 only
  (without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it listens on all interfaces), sends no usage
  statistics, and Hugging Face libraries never try the hub; QUIET_ENV applies as well.
"""

from __future__ import annotations

import os

# RAY_AIR_NEW_OUTPUT=0 selects Tune's legacy console output, which (unlike the new one) is silent
# at verbose=0, leaving the console to SweepProgress.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Every trial checkpoint forces an experiment-state snapshot (CheckpointConfig(num_to_keep=1)).
    # That is what resume needs (trial statuses never lag the checkpoints), so Tune's warning that
    # snapshots are frequent is noise here.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}

# On one machine without a hub, on top of QUIET_ENV.
DEFAULTS = {
    **QUIET_ENV,
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def use_local_env() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # forced, not a default: loopback is not optional
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
