"""Spec fuzzing: random mutations of valid specs give a SpecError or a valid spec, never a traceback.

Mutations start from every spec the project ships plus the tests' tiny spec: keys dropped, values
replaced by random scalars, lists, mappings, None, huge or negative numbers, NaN/inf and unicode,
unknown keys added, sections wrapped or replaced. In-process through sweeps.spec.parse_spec and
load_spec (many examples), and through `python -m sweeps.cli validate` (a handful: each is a process).
Derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import storage
from sweeps.driver import make_sampler, make_scheduler
from sweeps.spec import _SECTION_MODELS, SpecError, SweepSpec, load_spec, parse_spec
from tests.conftest import REPO, SMOKE_DATA, make_spec_dict

BASES = [make_spec_dict()] + [
    yaml.safe_load(p.read_text()) for p in sorted((REPO / "sweeps").rglob("*.yaml"))
]

# Every key the schema knows, as (section path, key): the "set" mutation reaches keys the bases leave out.
KNOWN_KEYS = [
    (section, key) for section, model in _SECTION_MODELS.items() for key in model.model_fields if key != "base_dir"
]
EDGE_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**32, 2**63, 10**400, 0.5, -0.0, 1e-320, 1e308, math.inf, -math.inf, math.nan, True]
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    EDGE_NUMBERS,
    EDGE_NUMBERS,
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.sampled_from(["", " ", "nf4", "auto", "qv", "builtin:tiny-llama", "s3://", "../../x", "1e-4", "🦙", "\x00", "é" * 200]),
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=8,
)


def key_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    paths = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        paths.append((*prefix, key))
        paths += key_paths(child, (*prefix, key))
    return paths


def containers(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths of every dict (where an unknown key can be added), the root included."""
    found = [prefix] if isinstance(value, dict) else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        found += containers(child, (*prefix, key))
    return found


def at(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    spec = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "replace", "replace", "set", "set", "unknown key", "wrap", "root"]))
        paths = key_paths(spec)
        if op == "root":
            return draw(VALUES)
        if op == "set" and isinstance(spec, dict):
            section, key = draw(st.sampled_from(KNOWN_KEYS))
            node = spec
            for part in section:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[key] = draw(VALUES)
            continue
        if op == "unknown key":
            where = draw(st.sampled_from(containers(spec) or [()]))
            if isinstance(at(spec, where), dict):
                at(spec, where)[draw(st.text(min_size=1, max_size=12))] = draw(VALUES)
            continue
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        parent = at(spec, path[:-1])
        if op == "drop":
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        elif op == "wrap":
            parent[path[-1]] = [parent[path[-1]]] if draw(st.booleans()) else {"value": parent[path[-1]]}
        else:
            parent[path[-1]] = draw(VALUES)
    return spec


def check_outcome(raw: Any) -> str:
    """parse_spec(raw) must return a spec or raise a SpecError that names its problems."""
    try:
        spec = parse_spec(raw, source="fuzz.yaml")
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
        assert exc.render().startswith("fuzz.yaml: ")
        return "error"
    assert isinstance(spec, SweepSpec)
    # A spec that passed is self-consistent: dumping and parsing it again gives the same spec.
    again = parse_spec(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"))))
    assert again == spec
    # And what the driver computes from it before launch accepts it (paths, seeds, ASHA's rungs).
    for path in (spec.model.path, spec.data.path):
        spec.resolve_path(path)
    storage.absolute(spec.storage)
    make_sampler(spec)
    make_scheduler(spec)
    numpy.random.RandomState(spec.train.seed)
    return "valid"


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated_specs())
def test_mutated_specs_give_a_spec_error_never_a_traceback(raw: Any) -> None:
    check_outcome(raw)


EDGE_VALUES = [
    0, -1, 1, 2**32, 2**63, 10**400, 0.5, -0.0, 1e-320, 1e308, math.inf, -math.inf, math.nan, True, False, None,
    "", " ", "🦙", "\x00", "é" * 300, "a/" * 2100, "1e-4", [], [[]], [None], {}, {"x": 1}, {"loguniform": [math.inf, 1]},
]


def test_every_key_set_to_every_edge_value_gives_a_spec_error_or_a_valid_spec() -> None:
    """Exhaustive where random search is thin: each schema key, alone, set to each edge value."""
    outcomes = {"valid": 0, "error": 0}
    for section, key, asha in [(s, k, a) for s, k in KNOWN_KEYS for a in (None, {})]:
        for value in EDGE_VALUES:
            raw = make_spec_dict(scheduler={"asha": asha})  # with and without ASHA's arithmetic
            node = raw
            for part in section:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[key] = copy.deepcopy(value)
            try:
                outcomes[check_outcome(raw)] += 1
            except AssertionError:
                raise
            except Exception as exc:
                raise AssertionError(f"{'.'.join((*section, key))} = {value!r:.60}: {type(exc).__name__}: {exc}") from exc
    assert outcomes["valid"] and outcomes["error"], outcomes


def test_the_fuzzer_reaches_both_outcomes() -> None:
    """Control: the mutations produce valid specs as well as invalid ones, so the property is not vacuous.

    Searched with `find` (up to 2,000 draws each, no shrinking) rather than counted in a fixed number of
    draws: Hypothesis explores differently from one process to the next (what ran before in the suite),
    and valid mutations are a minority, so a fixed 150 draws found none in one full-suite order."""
    from hypothesis import Phase, find

    search = settings(max_examples=2000, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
    for outcome in ("valid", "error"):
        assert find(mutated_specs(), lambda raw, want=outcome: check_outcome(raw) == want, settings=search) is not None


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_file_content_gives_a_spec_error_never_a_traceback(tmp_path_factory: Any, content: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    path.write_bytes(content)
    try:
        load_spec(path)
    except SpecError as exc:
        assert exc.problems and exc.render().startswith(str(path))


# --- through the CLI ----------------------------------------------------------------------------


def _pinned(raw: Any, tmp: Path) -> Any:
    """Keep a fuzzed spec's storage inside the test folder: validate writes a probe file there."""
    if isinstance(raw, dict):
        raw = {**raw, "storage": str(tmp / "results")}
    return raw


@settings(max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated_specs())
def test_validate_exits_0_or_2_never_with_a_traceback(tmp_path_factory: Any, raw: Any) -> None:
    tmp = tmp_path_factory.mktemp("cli-fuzz")
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(_pinned(raw, tmp), allow_unicode=True))
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "validate", str(path)],
        cwd=tmp, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode in (0, 2), done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    if done.returncode == 2:
        assert done.stderr.startswith("error: ")


def test_validate_handles_files_that_are_not_specs(tmp_path: Path) -> None:
    """A few files the generator above rarely writes: not UTF-8, not YAML, not a mapping, empty."""
    cases = {
        "latin1.yaml": "name: caf\xe9\n".encode("latin-1"),
        "tabs.yaml": b"name: x\n\tmodel: y\n",
        "list.yaml": b"- name: x\n",
        "empty.yaml": b"",
        "nul.yaml": b"name: x\x00\n",
        "huge.yaml": f"name: x\nmodel: {{path: builtin:tiny-llama}}\ndata: {{path: {SMOKE_DATA}}}\ntrain: {{max_steps: {10**400}}}\n".encode(),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        done = subprocess.run(
            [sys.executable, "-m", "sweeps.cli", "validate", str(tmp_path / name)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 2, (name, done.stdout, done.stderr)
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, (name, done.stderr)
