"""eval.metrics type lm_eval (trainables/lm_eval_metric.py): EleutherAI's lm-evaluation-harness tasks,
defined by local YAML files over local data, scored on the live adapter model of a real trial.

The shipped tasks (tests/data/lm_eval/tasks, data in tests/data/lm_eval/data) ask the smoke task's
questions in the training prompt format as multiple choice: the number after N among four consecutive
numbers, a fruit's color among four colors. The builtin base model is at chance on them; a few dozen
LoRA steps on the smoke instructions teach it the answers, so accuracy moves with training.

Nothing of lm-eval, transformers or peft is mocked: the validation tests load the tasks with lm-eval,
the trial test trains and evaluates for real.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sweeps.plan import eval_job, trial_job
from sweeps.spec import SpecError, parse_spec
from tests.conftest import REPO, SMOKE_DATA, TRIAL_CONFIG, make_spec_dict
from trainables.lm_eval_metric import load_tasks, write_files

pytest.importorskip("lm_eval", reason="lm_eval metrics need the lmeval extra: pip install 'qlora-sweep[lmeval]'")

LM_EVAL_DATA = REPO / "tests" / "data" / "lm_eval"
TASKS = ["smoke_next_number", "smoke_fruit_color"]


def lm_eval_metric(**overrides: Any) -> dict[str, Any]:
    return {"type": "lm_eval", "tasks": TASKS, "include_path": "lm_eval/tasks", "limit": 40, "name": "mc", **overrides}


def copy_tasks(tmp_path: Path) -> Path:
    """The shipped tasks and data, copied beside a spec in tmp_path (include_path: lm_eval/tasks)."""
    shutil.copytree(LM_EVAL_DATA, tmp_path / "lm_eval")
    return tmp_path / "lm_eval"


def job_problems(tmp_path: Path, metric: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        eval_job(parse_spec(make_spec_dict(eval={"metrics": [metric]}), base_dir=tmp_path))
    return str(caught.value)


# --- the schema: no files needed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "change", "message"),
    [
        ("limit", {}, r"eval.metrics\[0\]: .*lm_eval needs `limit:` how many examples of each task"),
        ("tasks", {}, r"lm_eval needs `tasks:` the lm-eval task names to run"),
        ("include_path", {}, r"lm_eval needs `include_path:` a folder of lm-eval task YAML files, relative to the spec file"),
        (None, {"tasks": []}, r"lm_eval needs `tasks:`"),
        (None, {"limit": 0}, r"eval.metrics\[0\].limit: got 0; give a positive whole number of examples per task"),
        (None, {"tasks": ["a-b", "a_b"]}, r"would both be reported as mc_a_b; run them as two lm_eval metrics"),
        (None, {"tasks": ["x", "x"]}, r"lm_eval task 'x' is listed twice"),
        (None, {"metric": "acc norm"}, r"`metric: acc norm` is not an lm-eval metric key"),
        (None, {"extract": "(.*)"}, r"lm_eval tasks extract and normalize as their YAML says"),
    ],
)
def test_bad_lm_eval_entries_name_the_key_the_value_and_the_fix(drop: str | None, change: dict, message: str) -> None:
    metric = {k: v for k, v in lm_eval_metric(**change).items() if k != drop}
    with pytest.raises(SpecError, match=message):
        parse_spec(make_spec_dict(eval={"metrics": [metric]}))


def test_lm_eval_keys_belong_to_lm_eval_and_its_direction_is_higher_unless_set() -> None:
    with pytest.raises(SpecError, match="`tasks`, `include_path`, `limit` and `metric` are for lm_eval only"):
        parse_spec(make_spec_dict(eval={"metrics": [{"type": "exact_match", "limit": 5}]}))
    s = parse_spec(make_spec_dict(eval={"metrics": [lm_eval_metric()]}, search={"metric": "mc"}))
    assert s.tune_mode("mc") == "max"
    assert s.eval.reported_names() == ("mc", "mc_smoke_next_number", "mc_smoke_fruit_color", "task_eval_s", "task_eval_peak_mib")
    lower = parse_spec(make_spec_dict(eval={"metrics": [lm_eval_metric(direction="lower")]}, search={"metric": "mc"}))
    assert lower.tune_mode("mc") == "min"


# --- the files: checked by the driver, before Ray -------------------------------------------------------


def test_the_job_carries_the_task_files_and_their_data_with_paths_rewritten(tmp_path: Path) -> None:
    copy_tasks(tmp_path)
    job = eval_job(parse_spec(make_spec_dict(eval={"metrics": [lm_eval_metric()]}), base_dir=tmp_path))
    assert job is not None
    files = job.lm_eval_files["mc"]
    assert sorted(files) == ["data/0-fruit_color.jsonl", "data/1-next_number.jsonl", "tasks/_smoke_template.yaml",
                             "tasks/fruit_color.yaml", "tasks/next_number.yaml"]
    assert "../data/" not in files["tasks/next_number.yaml"] and str(tmp_path) not in files["tasks/next_number.yaml"]
    assert files["data/1-next_number.jsonl"] == (LM_EVAL_DATA / "data" / "next_number.jsonl").read_text()


def test_function_tags_and_python_helpers_travel_and_resolve_next_to_the_yaml(tmp_path: Path) -> None:
    """`!function utils.f` (lm-eval resolves it beside the YAML file) survives the rewrite, and the
    helper file travels: the driver loads the task from the temporary copy, where utils.py must be."""
    folder = copy_tasks(tmp_path)
    (folder / "tasks" / "utils.py").write_text("def first_ten(dataset):\n    return dataset.select(range(10))\n")
    (folder / "tasks" / "short.yaml").write_text(
        "include: next_number.yaml\ntask: smoke_next_number_short\nprocess_docs: !function utils.first_ten\n"
    )
    job = eval_job(parse_spec(make_spec_dict(eval={"metrics": [lm_eval_metric(tasks=["smoke_next_number_short"])]}),
                              base_dir=tmp_path))
    assert job is not None
    files = job.lm_eval_files["mc"]
    assert "process_docs: !function 'utils.first_ten'" in files["tasks/short.yaml"]
    assert "def first_ten" in files["tasks/utils.py"]
    # Written elsewhere (as a worker does, the originals gone), the function resolves beside the YAML file.
    shutil.rmtree(folder)
    tasks = load_tasks(job.spec.metrics[0], write_files(files, tmp_path / "worker"), seed=0)
    assert len(tasks["smoke_next_number_short"].eval_docs) == 10


def test_bad_lm_eval_files_and_tasks_are_spec_errors_before_training(tmp_path: Path) -> None:
    folder = copy_tasks(tmp_path)
    assert "(mc).tasks: 'smoke_nope' is not a task the YAML files of include_path define; they define: " \
           "smoke_fruit_color, smoke_next_number" in job_problems(tmp_path, lm_eval_metric(tasks=["smoke_nope"]))
    assert "(mc).include_path: " in (text := job_problems(tmp_path, lm_eval_metric(include_path="lm_eval/data")))
    assert "holds no *.yaml file; put lm-eval task files there" in text
    assert "is not a folder; point include_path at a folder" in job_problems(tmp_path, lm_eval_metric(include_path="nowhere"))
    assert "(mc).metric: task 'smoke_next_number' computes acc, acc_norm, not 'f1'; set `metric:` to one of them" in \
        job_problems(tmp_path, lm_eval_metric(metric="f1"))
    assert "(mc).direction: task 'smoke_next_number' says acc is higher-is-better; set `direction: higher`" in \
        job_problems(tmp_path, lm_eval_metric(direction="lower"))
    # A hub dataset is refused: trials do not download.
    (folder / "tasks" / "hub.yaml").write_text("task: hub_task\ndataset_path: gsm8k\noutput_type: generate_until\n"
                                               "doc_to_text: '{{question}}'\ndoc_to_target: answer\ntest_split: test\n")
    assert "task 'hub_task': dataset_path 'gsm8k' is neither a local folder nor one of json, csv, text; trials do not " \
           "download" in job_problems(tmp_path, lm_eval_metric(tasks=["hub_task"]))
    (folder / "tasks" / "hub.yaml").unlink()
    # A data file that is not there, named relative to the YAML file.
    (folder / "data" / "fruit_color.jsonl").unlink()
    text = job_problems(tmp_path, lm_eval_metric())
    assert "fruit_color.yaml: dataset_kwargs.data_files.train names '../data/fruit_color.jsonl'" in text
    assert "is not a file; paths are relative to the YAML file" in text


def test_the_carried_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainables import lm_eval_metric as module

    copy_tasks(tmp_path)
    monkeypatch.setattr(module, "MAX_CARRY_BYTES", 2000)  # the shipped files are ~5.6 kB
    assert "every trial's job carries them, so keep them under 0.00191 MiB" in job_problems(tmp_path, lm_eval_metric())


def test_without_lm_eval_installed_the_driver_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_tasks(tmp_path)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError, as when it is absent
    assert "(mc): lm-eval is not installed, and this metric runs its tasks; pip install 'qlora-sweep[lmeval]'" in \
        job_problems(tmp_path, lm_eval_metric())


# --- a real trial ---------------------------------------------------------------------------------------


def base_model_check(seen: dict[str, Any], job: Any):
    """A callback factory (run_trial's seam): at the end of training, the same lm_eval metric measured
    with the adapter disabled, and what one measurement leaves behind (parameters, mode, RNG, beats)."""
    from transformers import TrainerCallback

    from trainables.lm_eval_metric import LmEvalRunner

    def factory(context: Any) -> Any:
        class Check(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
                import numpy as np
                import torch

                metric = job.eval.spec.metrics[0]
                runner = LmEvalRunner(job.eval.lm_eval_files, [metric], processing_class, job.eval.spec.batch_size, 0)
                params = {n: p.detach().clone() for n, p in model.named_parameters()}
                states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
                beats: list[int] = []
                model.eval()
                with torch.no_grad():
                    began = time.time()
                    seen["adapter"] = runner.measure(model, metric, on_batch=lambda: beats.append(1))
                    seen["seconds"] = time.time() - began
                    with model.disable_adapter():
                        seen["base"] = runner.measure(model, metric)
                model.train()
                seen["beats"] = len(beats)
                seen["params_kept"] = all(torch.equal(p, params[n]) for n, p in model.named_parameters())
                seen["rng_kept"] = (
                    random.getstate() == states[0]
                    and np.array_equal(np.random.get_state()[1], states[1])
                    and torch.equal(torch.get_rng_state(), states[2])
                )

        return Check()

    return factory


@pytest.mark.integration
def test_lm_eval_measures_the_adapter_every_round_of_a_real_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainables.qlora import run_trial

    # No hub: lm-eval, datasets and transformers run on the carried files and the in-memory model.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    copy_tasks(tmp_path)
    raw = make_spec_dict(
        data={"path": str(SMOKE_DATA), "eval_size": 40, "max_seq_length": 64},
        train={"max_steps": 30, "eval_every": 10, "checkpoint": False},
        eval={"metrics": [lm_eval_metric()], "max_examples": 24, "when": "every_round", "batch_size": 16},
    )
    job = trial_job(parse_spec(raw, base_dir=tmp_path))
    shutil.rmtree(tmp_path / "lm_eval")  # the worker has only what the job carries
    reports: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}
    run_trial({**TRIAL_CONFIG, "target_modules": "all-linear", "learning_rate": 1e-2}, job,
              report=lambda m, c=None: reports.append(m), callbacks=(base_model_check(seen, job),))

    assert [r["step"] for r in reports] == [10, 20, 30]
    for r in reports:  # every round: the mean over the tasks, each task's value, the cost
        per_task = [r["mc_smoke_next_number"], r["mc_smoke_fruit_color"]]
        assert all(0 <= v <= 1 for v in [r["mc"], *per_task]), r
        assert r["mc"] == pytest.approx(sum(per_task) / 2)
        assert r["task_eval_s"] > 0 and not math.isnan(r["task_eval_peak_mib"])
    values = [r["mc"] for r in reports]
    # It measures the adapter: the trained adapter beats the base model with it disabled, which is at
    # chance on four choices, and training moved the value between rounds.
    assert seen["adapter"]["mc"] == pytest.approx(reports[-1]["mc"])  # deterministic: the same as the last report
    assert seen["adapter"]["mc"] > seen["base"]["mc"] + 0.2, (seen, values)
    assert seen["base"]["mc"] < 0.5
    assert values[-1] > values[0] or values[-1] >= 0.9, values
    # One measurement leaves the model, its mode and the training's random numbers as they were, and beats.
    assert seen["params_kept"] and seen["rng_kept"], seen
    assert seen["beats"] >= len(TASKS), seen
    print(f"lm_eval evaluation: {seen['seconds']:.3f}s (2 tasks, {40 + 12} docs, 4 choices each); task_eval_s per round "
          f"{[r['task_eval_s'] for r in reports]}, peak MiB {[r['task_eval_peak_mib'] for r in reports]}; mc per round "
          f"{values}; base {seen['base']['mc']:.3f}")
