"""The sweep spec schema: defaults, every bad-input message, and every shipped YAML."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.spec import SpecError, load_spec, parse_spec
from tests.conftest import REPO, make_spec_dict, write_spec

MINIMAL = {"name": "x", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "d.jsonl"}}


def with_(section: str, value: object) -> dict:
    spec = {**MINIMAL}
    spec[section] = value
    return spec


# (spec, regex the rendered error must contain). Each names the key path, the bad value and the fix.
BAD_SPECS = [
    pytest.param({"model": {"path": "m"}, "data": {"path": "d"}}, r"name: required key is missing", id="missing-name"),
    pytest.param(with_("name", "has space/"), r"name: got 'has space/'; use letters, digits", id="bad-name"),
    pytest.param(with_("trian", {}), r"trian: unknown key 'trian'\. did you mean 'train'\?", id="typo-section"),
    pytest.param(
        with_("model", {"path": "m", "quantization": "nf8"}),
        r"model\.quantization: got 'nf8'; allowed values: 'nf4', 'fp4' or 'none'",
        id="bad-quantization",
    ),
    pytest.param(
        with_("model", {"path": "m", "compute_dtype": "fp32"}),
        r"model\.compute_dtype: got 'fp32'; allowed values: 'auto', 'bfloat16', 'float16' or 'float32'",
        id="bad-compute-dtype",
    ),
    pytest.param(
        with_("data", {"path": "d", "format": "alpaca"}),
        r"data\.format: got 'alpaca'; allowed values: 'instruction', 'text' or 'chat'",
        id="bad-data-format",
    ),
    pytest.param(
        with_("data", {"path": "d", "eval_size": 1.5}),
        r"data\.eval_size: got 1\.5; 1\.5 is neither a fraction in \(0, 1\) nor a whole number of rows",
        id="bad-eval-size",
    ),
    pytest.param(
        with_("space", {"r": [4, -8]}), r"space\.r: got \[4, -8\]; write a positive whole number", id="negative-rank"
    ),
    pytest.param(
        with_("space", {"rank": [8]}),
        r"space\.rank: unknown key 'rank'\. Allowed keys here: batch_size, learning_rate",
        id="unknown-space-key",
    ),
    pytest.param(
        with_("space", {"learning_rate": {"logunifrom": [1e-4, 1e-3]}}),
        r"space\.learning_rate: got .*unknown distribution 'logunifrom'\. did you mean 'loguniform'\?",
        id="typo-distribution",
    ),
    pytest.param(
        with_("space", {"learning_rate": {"loguniform": [1e-3, 1e-4]}}),
        r"space\.learning_rate: .*low \(0\.001\) must be below high \(0\.0001\); write \[0\.0001, 0\.001\]",
        id="reversed-range",
    ),
    pytest.param(
        with_("space", {"learning_rate": 5.0}),
        r"space\.learning_rate: got 5\.0; 5 is outside \[1e-08, 1\); typical QLoRA learning rates",
        id="absurd-lr",
    ),
    pytest.param(
        with_("space", {"lora_dropout": [0.0, 1.5]}),
        r"space\.lora_dropout: got \[0\.0, 1\.5\]; 1\.5 is outside \[0, 1\); use a fraction",
        id="dropout-above-one",
    ),
    pytest.param(
        with_("space", {"lora_alpha": {"ratio": []}}),
        r"space\.lora_alpha: .*ratio needs positive numbers, e\.g\. \{ratio: \[1, 2\]\}",
        id="empty-alpha-ratio",
    ),
    pytest.param(
        with_("space", {"target_modules": [[], "qv"]}),
        r"space\.target_modules: got \[\[\], 'qv'\]; choice \[\] targets nothing; use a preset",
        id="empty-target-list",
    ),
    pytest.param(
        with_("space", {"lr_scheduler_type": "warm"}),
        r"space\.lr_scheduler_type: got 'warm'; allowed values: constant, linear, cosine",
        id="bad-lr-scheduler",
    ),
    pytest.param(
        with_("search", {"num_samples": 0, "sampler": "bayes"}),
        r"search\.num_samples: got 0; input should be greater than 0[\s\S]*search\.sampler: got 'bayes'; allowed values: 'tpe', 'gp', 'cmaes', 'random' or 'grid'",
        id="two-search-problems-at-once",
    ),
    pytest.param(
        with_("train", {"max_steps": 85, "eval_every": 10}),
        r"train: max_steps \(85\) is not a multiple of eval_every \(10\).*Try max_steps: 80",
        id="steps-not-multiple",
    ),
    pytest.param(
        with_("train", {"max_steps": 10, "eval_every": 20}),
        r"train: eval_every \(20\) exceeds max_steps \(10\)",
        id="eval-after-end",
    ),
    pytest.param(
        with_("train", {"optimizer": "sgd"}),
        r"train\.optimizer: got 'sgd'; allowed values: 'auto', 'adamw_torch', 'adamw_8bit'",
        id="bad-optimizer",
    ),
    pytest.param(
        with_("scheduler", {"asha": {"max_t": 20}}),
        r"scheduler\.asha\.max_t \(20\) exceeds the 8 evaluation rounds of a trial",
        id="asha-max-t-too-big",
    ),
    pytest.param(
        with_("scheduler", {"asha": {"max_tt": 4}}),
        r"scheduler\.asha\.max_tt: unknown key 'max_tt'\. did you mean 'max_t'\?",
        id="asha-typo",
    ),
    pytest.param(
        with_("scheduler", {"asha": {"reduction_factor": 1}}),
        r"scheduler\.asha\.reduction_factor: got 1; input should be greater than 1",
        id="asha-reduction-one",
    ),
    pytest.param(
        with_("resources", {"gpus_per_trial": 1.5}),
        r"resources\.gpus_per_trial: got 1\.5; 1\.5 GPUs: above 1, ask for whole GPUs",
        id="fractional-gpus-above-one",
    ),
    pytest.param(
        with_("resources", {"cpus_per_trial": 0}),
        r"resources\.cpus_per_trial: got 0; input should be greater than 0",
        id="zero-cpus",
    ),
    # Data keys (issue 12): configurations, files, split slicing, held-out sets, samples, long rows.
    pytest.param(
        with_("data", {"path": "d", "split": "train[:two]"}),
        r"data\.split: got 'train\[:two\]'; not a split: write a split name, optionally sliced, e\.g\. train, train\[:2000\]",
        id="bad-split-slice",
    ),
    pytest.param(
        with_("data", {"path": "d", "eval_split": "test[5]"}),
        r"data\.eval_split: got 'test\[5\]'; not a split",
        id="bad-eval-split",
    ),
    pytest.param(
        with_("data", {"path": "d", "eval_size": 200, "eval_split": "test"}),
        r"data: data\.eval_size carves held-out rows out of data\.path, and data\.eval_split names a held-out set of its own; "
        r"keep one",
        id="eval-size-and-eval-split",
    ),
    pytest.param(
        with_("data", {"path": "d", "eval_size": 0.2, "eval_path": "held.jsonl"}),
        r"data: data\.eval_size carves held-out rows .* data\.eval_path names a held-out set of its own",
        id="eval-size-and-eval-path",
    ),
    pytest.param(
        with_("data", {"path": "d", "max_rows": 0}),
        r"data\.max_rows: got 0; input should be greater than 0",
        id="zero-max-rows",
    ),
    pytest.param(
        with_("data", {"path": "d", "data_files": []}),
        r"data\.data_files: got \[\]; an empty list names no files",
        id="empty-data-files",
    ),
    pytest.param(
        with_("data", {"path": "d", "on_long_rows": "cut"}),
        r"data\.on_long_rows: got 'cut'; allowed values: 'error', 'skip' or 'truncate'",
        id="bad-on-long-rows",
    ),
    pytest.param(
        with_("data", {"path": "d", "config": "main"}),
        r"data\.config: unknown key 'config'\. Allowed keys here: .*data_files, eval_path, eval_size, eval_split, format, .*max_rows, .*name, on_bad_rows, on_long_rows",
        id="config-is-name",
    ),
    # Memory: admission, packing, OOM handling, multi-objective (sweeps/admission.py, docs/memory.md).
    pytest.param(
        with_("resources", {"gpu_memory_gib": 0}),
        r"resources\.gpu_memory_gib: got 0; input should be greater than 0",
        id="zero-gpu-memory",
    ),
    pytest.param(
        with_("resources", {"pack": True}),
        r"resources: resources\.pack shares GPUs between trials, but gpus_per_trial is 0; set gpus_per_trial: 1",
        id="pack-without-gpus",
    ),
    pytest.param(
        with_("resources", {"pack": True, "gpus_per_trial": 2}),
        r"resources\.pack shares GPUs between trials, but gpus_per_trial is 2; set gpus_per_trial: 1",
        id="pack-with-whole-gpus",
    ),
    pytest.param(
        with_("resources", {"memory_margin": 1.5}),
        r"resources\.memory_margin: got 1\.5; 1\.5 would double the predictions or more; write a fraction such as 0\.10",
        id="margin-not-a-fraction",
    ),
    pytest.param(
        with_("resources", {"pack_margin": 0.1}),
        r"resources\.pack_margin: unknown key 'pack_margin'\. Allowed keys here: .*memory_margin",
        id="pack-margin-is-memory-margin",
    ),
    pytest.param(
        with_("train", {"oom_retry": "twice"}),
        r"train\.oom_retry: got 'twice'; input should be a valid boolean",
        id="oom-retry-not-bool",
    ),
    pytest.param(
        with_("search", {"objectives": ["eval_loss", "peak_memroy"]}),
        r"search\.objectives: got \['eval_loss', 'peak_memroy'\]; unknown objective 'peak_memroy'\. did you mean 'peak_memory'\? "
        r"Allowed: eval_loss, perplexity, peak_memory_mib, tokens_per_s",
        id="objective-typo",
    ),
    pytest.param(
        with_("search", {"objectives": ["eval_loss"]}),
        r"search\.objectives: .*multi-objective mode needs at least two metrics; for one, set search\.metric",
        id="one-objective",
    ),
    pytest.param(
        with_("search", {"objectives": ["peak_memory", "peak_memory_mib"]}),
        r"search\.objectives: .*an objective is listed twice",
        id="objective-twice",
    ),
    pytest.param(
        with_("search", {"objectives": ["peak_memory", "tokens_per_s"]}),
        r"search: search\.objectives \['peak_memory_mib', 'tokens_per_s'\] must include search\.metric \(eval_loss\), "
        r"the metric ASHA early-stops on",
        id="objectives-without-the-asha-metric",
    ),
]


@pytest.mark.parametrize(("raw", "message"), BAD_SPECS)
def test_bad_spec_is_rejected_with_a_message_naming_key_value_and_fix(raw: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_bad_spec_table_is_big_enough() -> None:
    assert len(BAD_SPECS) >= 15


def test_all_problems_are_reported_at_once() -> None:
    raw = {
        "name": "x",
        "model": {"path": "m", "quantization": "int3"},
        "data": {"path": "d", "format": "xml"},
        "space": {"r": 0, "lora_dropout": 2.0},
        "search": {"max_concurrent": -1},
    }
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    rendered = info.value.render()
    for key in ("model.quantization", "data.format", "space.r", "space.lora_dropout", "search.max_concurrent"):
        assert key in rendered
    assert "5 problems" in rendered


def test_the_data_keys_report_every_problem_at_once() -> None:
    raw = with_(
        "data",
        {"path": "d", "split": "train[", "eval_split": "test", "eval_size": 5, "max_rows": -3, "on_long_rows": "drop",
         "data_files": 7},
    )
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    rendered = info.value.render()
    for key in ("data.split", "data.max_rows", "data.on_long_rows", "data.data_files"):
        assert key in rendered, rendered
    assert "4 problems" in rendered


def test_data_keys_round_trip_and_default() -> None:
    import yaml

    spec = parse_spec(with_("data", {"path": "openai/gsm8k", "name": "main", "data_files": "main/train-*.parquet",
                                      "split": "train[:2000]", "eval_split": "test[:200]", "max_rows": 500}))
    assert spec.data.data_files == ("main/train-*.parquet",) and spec.data.held_out and spec.data.long_rows == "error"
    assert parse_spec(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))) == spec
    plain = parse_spec(MINIMAL).data
    assert plain.eval_size is None and plain.eval_amount == 0.1 and not plain.held_out
    assert parse_spec(with_("data", {"path": "d", "on_bad_rows": "skip"})).data.long_rows == "skip"


def test_every_data_key_is_in_the_readme_table() -> None:
    from trainables.settings import DataSpec

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Sweep spec reference") : readme.index("### `space:` keys")]
    for key in DataSpec.model_fields:
        shown = f"`data.{key}`" in table or (key.endswith("_field") and "`data.*_field`" in table)
        assert shown, f"data.{key} is not in README's 'Sweep spec reference' table"


def test_defaults_fill_what_a_spec_leaves_out() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.model.quantization == "nf4" and spec.model.double_quant
    assert spec.space.target_modules.values() == ["qv", "attention", "all-linear"]
    assert spec.scheduler.asha is not None and spec.max_rounds == spec.train.rounds == 8
    assert not spec.model.trust_remote_code


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {path: m\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+, column \d+"):
        load_spec(bad)


def test_missing_spec_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"file not found: .*Pass the path to a sweep YAML"):
        load_spec(tmp_path / "nope.yaml")


def test_relative_data_path_resolves_against_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    spec = load_spec(write_spec(tmp_path / "s.yaml", {**MINIMAL, "data": {"path": "data/rows.jsonl"}}))
    assert spec.resolve_path(spec.data.path) == str(tmp_path / "data" / "rows.jsonl")


def shipped_specs() -> list[Path]:
    # rglob walks sub-folders too (torchtune's os.listdir version missed them).
    return sorted(p for p in (REPO / "sweeps").rglob("*.yaml"))


def test_there_are_shipped_specs() -> None:
    assert REPO / "sweeps" / "smoke.yaml" in shipped_specs()


def needs_a_hub(path: Path) -> bool:
    spec = load_spec(path)
    local_model = spec.model.path.startswith("builtin:") or Path(spec.resolve_path(spec.model.path)).exists()
    return not (local_model and Path(spec.resolve_path(spec.data.path)).exists())


@pytest.mark.parametrize("path", shipped_specs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_spec_passes_validate(path: Path) -> None:
    """The full `validate` (schema, model config, target modules, data rows, storage) for specs that
    run here; specs for a GPU cluster name hub models and data, so they get `validate --offline`,
    which must say what it could not check."""
    offline = needs_a_hub(path)
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "validate", *(["--offline"] if offline else []), str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "preflight ok" in result.stdout
    assert ("not checked (--offline)" in result.stdout) == offline


def test_a_hub_model_that_cannot_be_reached_is_a_clear_preflight_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "validate", "sweeps/examples/llama3-8b-24gb.yaml"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.path: cannot read the model config of 'meta-llama/Llama-3.1-8B'" in result.stderr


def test_validate_exits_2_with_every_problem_and_no_traceback(tmp_path: Path) -> None:
    spec = make_spec_dict(
        model={"path": "builtin:tiny-llama", "quantization": "nf8"},
        space={"learning_rate": {"loguniform": [1e-2, 1e-4]}},
    )
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "validate", str(write_spec(tmp_path / "bad.yaml", spec))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.quantization: got 'nf8'" in result.stderr
    assert "space.learning_rate" in result.stderr


def test_preflight_reports_missing_target_modules_and_data_together(tmp_path: Path) -> None:
    spec = make_spec_dict(space={"target_modules": [["q_proj", "query_key_value"]]}, data={"path": "missing.jsonl"})
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "validate", str(write_spec(tmp_path / "s.yaml", spec))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr
    assert "no layer named query_key_value in this llama model; its linear layers are:" in result.stderr
    assert "q_proj" in result.stderr and "file not found" in result.stderr


# --- hostile input (issue 14): alias bombs, huge files, unbounded errors, --name path tricks ------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes of nested YAML aliases that expand to width**levels values."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    lines.append(f"name: [{', '.join([f'*a{levels - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_is_built_in_a_few_lines(tmp_path: Path) -> None:
    import time

    import yaml

    text = alias_bomb()
    assert len(text) < 600
    # The control: PyYAML builds it (shared lists), and what it stands for is 9**9 values, which
    # validation and its error messages would walk and print.
    built = yaml.safe_load(text)
    assert len(built["name"]) == 9 and built["name"][0] is built["a8"]
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert "expands to more than 100,000 nodes through its aliases" in message and len(message) < 1000
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "validate", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr) < 2000, result.stderr[-2000:]
    # A spec that uses an anchor or two, as people do, still loads.
    spec = make_spec_dict()
    reused = "train: &t {max_steps: 4, eval_every: 2}\n" + yaml.safe_dump({k: v for k, v in spec.items() if k != "train"})
    (tmp_path / "anchors.yaml").write_text(reused.replace("train: &t", "train: &t", 1))
    assert load_spec(tmp_path / "anchors.yaml").train.max_steps == 4


def test_a_recursive_alias_a_huge_file_and_deep_nesting_are_spec_errors(tmp_path: Path) -> None:
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("name: &a [*a]\n")
    with pytest.raises(SpecError, match="recursive structure"):
        load_spec(recursive)
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\n" + "# padding\n" * 120_000)
    with pytest.raises(SpecError, match=r"is 1,\d{3},\d{3} bytes; a sweep spec is a few KB"):
        load_spec(huge)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(SpecError, match="nests too deeply|not valid YAML"):
        load_spec(deep)


def test_errors_stay_bounded_whatever_the_input() -> None:
    from core.errors import MAX_LISTED_PROBLEMS, MAX_PROBLEM_CHARS

    many = SpecError("spec.yaml", [f"key{i}: got {'v' * 10_000!r}" for i in range(1000)])
    text = many.render()
    assert text.count("\n  - ") == MAX_LISTED_PROBLEMS + 1 and "... and 950 more" in text
    assert len(text) < (MAX_LISTED_PROBLEMS + 2) * (MAX_PROBLEM_CHARS + 40)
    assert "(8,013 more characters)" in text  # each line says how much it cut (10,013 - 2,000)
    # A huge value in a real validation error is cut the same way.
    with pytest.raises(SpecError) as caught:
        parse_spec(make_spec_dict(model={"path": "builtin:tiny-llama", "quantization": "x" * 100_000}))
    assert len(str(caught.value)) < MAX_PROBLEM_CHARS + 200 and "model.quantization" in str(caught.value)


@pytest.mark.parametrize("name", ["../x", "", "a/b", ".hidden", "x" * 101, "/abs"])
def test_run_refuses_a_name_that_is_not_a_folder_name_before_anything_is_written(tmp_path: Path, name: str) -> None:
    from tests.cli_runs import private_ray_tmp, run_cli

    (tmp_path / "spec").mkdir()
    spec = write_spec(tmp_path / "spec" / "s.yaml", make_spec_dict())
    storage = tmp_path / "store" / "results"
    with private_ray_tmp() as ray_tmp:
        run = run_cli(["run", str(spec), "--storage", str(storage), "--name", name], ray_tmp, timeout=120)
        assert run.returncode == 2, run.output[-3000:]
        assert not run.ray_sessions  # refused before Ray starts
    assert "--name: " in run.stderr and "Traceback" not in run.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec"]  # nothing beside or inside the storage


def test_set_overrides_are_typed_by_the_schema_and_checked_with_the_rest(tmp_path: Path) -> None:
    from sweeps.spec import load_spec

    path = write_spec(tmp_path / "s.yaml", make_spec_dict())
    spec = load_spec(path, ["search.num_samples=4", "space.r=[4, 16]", "scheduler.asha=null", "train.oom_retry=true"])
    assert spec.search.num_samples == 4 and spec.train.oom_retry is True and spec.scheduler.asha is None
    assert spec.overrides == ("search.num_samples=4", "space.r=[4, 16]", "scheduler.asha=null", "train.oom_retry=true")
    with pytest.raises(SpecError) as bad_value:
        load_spec(path, ["search.num_samples=many"])
    assert "search.num_samples" in bad_value.value.render() and "many" in bad_value.value.render()
    with pytest.raises(SpecError) as unknown:
        load_spec(path, ["search.num_sample=4"])
    assert "num_sample" in unknown.value.render() and "num_samples" in unknown.value.render()  # did-you-mean


def test_malformed_set_overrides_are_all_named_at_once(tmp_path: Path) -> None:
    from tests.cli_runs import QLORA_SWEEP

    path = write_spec(tmp_path / "s.yaml", make_spec_dict())
    done = subprocess.run(
        [QLORA_SWEEP, "validate", str(path), "--set", "foo", "--set", "space.r=[4,", "--set", "model.path.x=1",
         "--set", ".a=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "4 problems" in done.stderr, done.stderr
    for named in ("'foo'", "space.r", "model.path is", "'.a=1'"):
        assert named in done.stderr, (named, done.stderr)
