"""Ray Tune's pickled state, digested when written and checked before `resume` unpickles it.

What `Tuner.restore` and `fit` unpickle from an experiment (Ray 2.60: ray/tune/impl/tuner_internal.py,
ray/tune/execution/tune_controller.py `resume`, ray/tune/search/search_generator.py, ray/tune/callback.py,
ray/tune/experiment/trial.py `get_pickled_error`):

* tuner.pkl, written once when the Tuner is built (`sign`, right after `build_tuner`);
* experiment_state-<session>.json (cloudpickle payloads inside the JSON), search_gen_state-<session>.json
  (a pickle), searcher-state-<session>.pkl, callback-states-<session>.pkl and each errored trial's
  trial_<id>/error.pkl, written into the driver's staging folder at every experiment checkpoint and then
  uploaded together. `SignedSearchGenerator.save_to_dir` runs inside that save, after the experiment
  state and the searcher state are written and before the upload, and writes their digests beside them
  (DIGESTS_PREFIX-<session>.json), so they travel in the same upload.

sweep_spec.yaml is digested too (`sign`, with tuner.pkl): resume runs what it names, and a spec can
name code (train.callbacks, `python:` metrics, model.trust_remote_code with a model of the writer's).

`verify` checks every such file of an experiment against the recorded digests (core/integrity.py:
HMAC-SHA256 with a key kept outside the experiment). The digest files are JSON, read with json.loads.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any

from ray.tune.search import SearchGenerator

from core import experiment_folder, integrity, storage
from core.errors import QloraSweepError

# Digest files at the experiment's root (core/experiment_folder.py): one for tuner.pkl (and files a
# --trust-experiment resume vouched for), one per Tune session for the state saved in it.
DIGESTS_FILE = experiment_folder.DIGESTS_FILE
DIGESTS_PREFIX = experiment_folder.DIGESTS_PREFIX
# Tune's files that are unpickled on restore, at the experiment's root and in trial folders.
PICKLED_ROOT = ("tuner.pkl", "experiment_state-*.json", "search_gen_state-*.json", "*.pkl")
PICKLED_IN_TRIAL = ("*.pkl",)
# Files resume acts on that are not pickles but can make it run code, written once by `run`.
SIGNED_ONCE = (experiment_folder.SPEC_FILE,)
TRUST_FLAG = "--trust-experiment"
KEPT_PER_FILE = 8


class UntrustedExperiment(QloraSweepError):
    """The experiment's pickled Tune state has no valid digest under this machine's key."""


def _is_pickled(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns) and not name.startswith((DIGESTS_PREFIX, ".", "tmp"))


def _digests_of_folder(root: str, names: list[str], key: bytes) -> dict[str, str]:
    return {name: integrity.digest(key, name, _read(os.path.join(root, name))) for name in names}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class SignedSearchGenerator(SearchGenerator):
    """Tune's SearchGenerator (what Tune wraps a Searcher in), which also digests the experiment
    state of each save (see the module docstring). Holds no key: it reads it from the key file."""

    def save_to_dir(self, dirpath: str, session_str: str) -> None:
        super().save_to_dir(dirpath, session_str)
        key = integrity.ensure_key()
        names = [n for n in os.listdir(dirpath) if _is_pickled(n, PICKLED_ROOT) and session_str in n]
        for folder in sorted(os.listdir(dirpath)):
            if folder.startswith(experiment_folder.TRIAL_PREFIX) and os.path.isdir(os.path.join(dirpath, folder)):
                names += [f"{folder}/{n}" for n in os.listdir(os.path.join(dirpath, folder)) if _is_pickled(n, PICKLED_IN_TRIAL)]
        target = os.path.join(dirpath, f"{DIGESTS_PREFIX}{session_str}.json")
        try:
            with open(target) as f:
                kept = _digest_lists(json.load(f))
        except (OSError, ValueError):
            kept = {}
        # Tune uploads the staging folder in the background, file by file, and may save again while
        # an upload runs; the last few digests of each file are kept, so a state file uploaded a
        # save behind its digest file still checks.
        for name, value in _digests_of_folder(dirpath, sorted(names), key).items():
            kept[name] = [*(d for d in kept.get(name, []) if d != value), value][-KEPT_PER_FILE:]
        tmp = f"{target}.tmp"
        with open(tmp, "w") as f:
            json.dump(kept, f, indent=1, sort_keys=True)
        os.replace(tmp, target)


def sign(experiment_dir: str) -> None:
    """Record the digests of tuner.pkl, which Tune wrote when the Tuner was built, and of SIGNED_ONCE."""
    key = integrity.ensure_key()
    names = (experiment_folder.TUNER_FILE, *SIGNED_ONCE)
    _record(experiment_dir, {n: integrity.digest(key, n, storage.read_bytes(experiment_folder.file(experiment_dir, n))) for n in names})


def _record(experiment_dir: str, digests: dict[str, str]) -> None:
    location = experiment_folder.file(experiment_dir, DIGESTS_FILE)
    recorded = _load(location) if storage.exists(location) else {}
    recorded.update({name: [value] for name, value in digests.items()})
    storage.write_text(location, json.dumps(recorded, indent=1, sort_keys=True))


def _digest_lists(value: Any) -> dict[str, list[str]]:
    """A digest file's content: file name -> its recorded digests (anything else is dropped)."""
    if not isinstance(value, dict):
        return {}
    return {k: [d for d in v if isinstance(d, str)] for k, v in value.items() if isinstance(k, str) and isinstance(v, list)}


def _load(location: str) -> dict[str, list[str]]:
    try:
        return _digest_lists(json.loads(storage.read_text(location)))
    except (ValueError, OSError):
        return {}


def checked_files(experiment_dir: str) -> list[str]:
    """Every file of the experiment that restoring it unpickles, and SIGNED_ONCE, relative to it."""
    root = storage.list_files(experiment_dir)
    names = [n for n in root if _is_pickled(n, PICKLED_ROOT) or n in SIGNED_ONCE]
    for folder in experiment_folder.trial_dirnames(experiment_dir):
        names += [f"{folder}/{n}" for n in storage.list_files(storage.join(experiment_dir, folder)) if _is_pickled(n, PICKLED_IN_TRIAL)]
    return sorted(names)


def recorded_digests(experiment_dir: str) -> dict[str, list[str]]:
    """Every digest the experiment records, by file: the tuner's, vouched-for files', each session's."""
    out: dict[str, list[str]] = {}
    files = [n for n in storage.list_files(experiment_dir) if n == DIGESTS_FILE or (n.startswith(DIGESTS_PREFIX) and n.endswith(".json"))]
    for name in files:
        for file_name, values in _load(experiment_folder.file(experiment_dir, name)).items():
            out.setdefault(file_name, []).extend(values)
    return out


def verify(experiment_dir: str) -> None:
    """Check that every file resume unpickles or acts on (`checked_files`) was written by qlora-sweep under this machine's key.

    Raises:
        UntrustedExperiment: Naming the files without a valid digest (or the missing key), and the way on.
    """
    key = integrity.read_key()
    names = checked_files(experiment_dir)
    way_on = (
        f"Resuming unpickles Tune's state and runs what {experiment_folder.SPEC_FILE} names (callbacks, python "
        f"metrics, a model's remote code), either of which can run any code, so only files whose digest matches this "
        f"machine's key ({integrity.key_path()}, or ${integrity.KEY_ENV}) is opened. If the sweep ran on another "
        f"machine, give this one its key file. If you know who wrote every file of this folder (e.g. an experiment "
        f"from before digests were recorded), resume with {TRUST_FLAG}"
    )
    if key is None:
        raise UntrustedExperiment(f"refusing to resume {experiment_dir}: this machine has no experiment key. {way_on}")
    recorded = recorded_digests(experiment_dir)
    bad = [n for n in names if not integrity.matches(key, n, storage.read_bytes(storage.join(experiment_dir, n)), recorded.get(n, []))]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UntrustedExperiment(
            f"refusing to resume {experiment_dir}: {shown} {'has' if len(bad) == 1 else 'have'} no valid digest "
            f"(changed since qlora-sweep wrote {'it' if len(bad) == 1 else 'them'}, or written by something else). {way_on}"
        )


def trust(experiment_dir: str) -> list[str]:
    """Record digests for every checked file as it is now (the user vouched for them with --trust-experiment),
    so later resumes of the experiment check against them. Returns the files vouched for."""
    key = integrity.ensure_key()
    names = checked_files(experiment_dir)
    _record(experiment_dir, {n: integrity.digest(key, n, storage.read_bytes(storage.join(experiment_dir, n))) for n in names})
    return names
