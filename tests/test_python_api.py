"""The Python API (sweeps/api.py): docs/python-api.md's example runs as written, in a fresh process that
checks the process is left as it was found (environment, logging, signal handlers, Ray settings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.spec import SpecError
from tests.conftest import REPO, make_spec_dict

EXAMPLE = re.search(r"```python\n(.*?)```", (REPO / "docs" / "python-api.md").read_text(), re.DOTALL).group(1)

# Runs the example between two snapshots of the process-wide state and prints what changed.
HARNESS = '''
import json, logging, os, signal, sys

def state():
    import ray._private.ray_constants as constants
    from ray.tune.execution import class_cache
    loggers = {n: (l.level, len(l.handlers), l.propagate) for n, l in logging.Logger.manager.loggerDict.items()
               if isinstance(l, logging.Logger)}
    return {
        "environ": dict(os.environ),
        "loggers": loggers,
        "root": (logging.getLogger().level, len(logging.getLogger().handlers)),
        "signals": {int(s): repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)},
        "ray": (constants.ENABLE_RAY_CLUSTER, sorted(class_cache.ENV_VARS_TO_PROPAGATE)),
    }

env_before_import = dict(os.environ)
import sweeps.api
imported_nothing = env_before_import == dict(os.environ) and "ray" not in sys.modules and "torch" not in sys.modules
import optuna, transformers  # a notebook that already uses them: their loggers must come back as they were
optuna.logging.set_verbosity(optuna.logging.DEBUG)
logging.getLogger("bitsandbytes").setLevel(logging.DEBUG)
before = state()
exec(compile(sys.stdin.read(), "docs/python-api.md", "exec"), {})
import ray
after = state()
changed = {k: sorted(str(n) for n in {*before[k], *after[k]} if before[k].get(n) != after[k].get(n))
           if isinstance(before[k], dict) else before[k] != after[k] for k in before}
changed["loggers"] = [n for n in changed["loggers"] if n in before["loggers"]]  # new ones are as their library made them
changed["optuna_verbosity"] = optuna.logging.get_verbosity() != optuna.logging.DEBUG
print("STATE " + json.dumps({"imported_nothing": imported_nothing, "changed": changed,
                             "ray_initialized": ray.is_initialized()}))
'''


def user_env() -> dict[str, str]:
    """This environment without the variables a sweep sets itself (the test suite sets them for every
    test), so the harness sees the sweep set them, and sees whether they are taken back."""
    from sweeps.driver import LOOPBACK_ENV
    from sweeps.local_env import QUIET_ENV

    return {k: v for k, v in os.environ.items() if k not in QUIET_ENV and k != LOOPBACK_ENV}


@pytest.mark.integration
def test_the_documented_example_runs_and_leaves_the_process_as_it_found_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", HARNESS], input=EXAMPLE, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=user_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads(done.stdout.split("STATE ", 1)[1])
    assert state["imported_nothing"], "importing sweeps.api changed the environment or imported ray/torch"
    assert state["changed"] == {
        "environ": [], "loggers": [], "root": False, "signals": [], "ray": False, "optuna_verbosity": False,
    }, state
    assert state["ray_initialized"] is False
    assert "0 2 trials" in done.stdout and "best:" in done.stdout
    experiment = tmp_path / "results" / "api-example"
    plan = json.loads((experiment / "run_plan.json").read_text())
    assert plan["overrides"] == ["search.num_samples=2", "train.max_steps=20", "scheduler.asha=null"]


def test_bad_overrides_raise_a_spec_error_before_anything_starts(tmp_path: Path) -> None:
    from sweeps.api import run_sweep

    with pytest.raises(SpecError) as bad:
        run_sweep(make_spec_dict(), storage=str(tmp_path), search__num_samples="many", train__max_step=3)
    text = bad.value.render()
    assert "search.num_samples" in text and "max_step" in text
    assert not any(tmp_path.iterdir())  # nothing written
