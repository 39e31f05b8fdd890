"""Task metrics (spec `eval:`, trainables/task_metrics.py): the schema and its errors, when they are
measured, and every metric type on a real tiny NF4 model really trained by the real trainable."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from sweeps.plan import trial_job
from sweeps.spec import SpecError, parse_spec
from tests.conftest import REPO, TRIAL_CONFIG, make_spec_dict
from trainables.task_metrics import MetricSpec, answers_match, asha_rounds, extract, normalize

ANSWERS = REPO / "sweeps" / "data" / "smoke_answers.jsonl"
GENERAL = REPO / "sweeps" / "data" / "smoke_general.txt"
EXTRACT = "### (.+)"


# --- schema and pure logic ---------------------------------------------------------------------------


def spec(**sections: Any):
    return parse_spec(make_spec_dict(**sections))


def test_a_task_metric_gives_search_asha_and_optuna_its_direction() -> None:
    s = spec(eval={"metrics": ["exact_match", {"python": "m.py:f", "name": "mine", "direction": "lower"}]},
             search={"metric": "exact_match", "objectives": ["exact_match", "peak_memory", "mine"]})
    assert s.tune_mode("exact_match") == "max" and s.tune_mode("mine") == "min" and s.tune_mode("eval_loss") == "min"
    assert s.search.objective_metrics == ["exact_match", "peak_memory_mib", "mine"]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"search": {"metric": "exact_match"}}, r"search.metric: got .exact_match.. Allowed: eval_loss, perplexity \(or add a task metric"),
        ({"eval": {"metrics": [{"type": "exact_match", "extract": "(("}]}}, r"eval.metrics\[0\].extract: got '\(\('; not a regular expression"),
        ({"eval": {"metrics": [{"python": "m.py:f", "name": "m"}]}}, "needs `direction: higher` or `direction: lower`"),
        ({"eval": {"metrics": [{"type": "exact_match", "direction": "lower"}]}}, "exact_match is higher-is-better; remove `direction: lower`"),
        ({"eval": {"metrics": ["exact_match", "exact_match"]}}, "metric name 'exact_match' is used twice"),
        ({"eval": {"metrics": [{"type": "exact_match", "name": "eval_loss"}]}}, "'eval_loss' is a name the trial already reports"),
        ({"eval": {"metrics": [{"type": "forgetting"}]}}, "forgetting needs `path:`"),
        ({"eval": {"metrics": [{"type": "forgetting", "path": "g.txt"}, {"type": "rouge_l", "name": "overlap"}]},
          "data": {"format": "text"}},
         "eval.metrics: 'overlap' answers the eval rows' prompts, and data.format text has none.*only forgetting and lm_eval"),
        ({"eval": {"metrics": [{"type": "rouge_l", "mode": "teacher_forced"}]}}, "`mode` is for exact_match only"),
        ({"eval": {"metrics": [{"type": "exact_match", "bogus": 1}]}}, r"eval.metrics\[0\].bogus: unknown key 'bogus'"),
        ({"eval": {"metrics": ["exact_match"], "when": "sometimes"}}, "eval.when: got 'sometimes'; allowed values"),
        ({"eval": {"metrics": ["exact_match"], "when": "final"}, "search": {"metric": "exact_match"},
          "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}}},
         "eval.when: final measures 'exact_match' after the last round only.*use eval.when: rungs.*asha.metric: eval_loss"),
        ({"eval": {"metrics": ["exact_match"]}, "scheduler": {"asha": {"metric": "exact_matsh"}}},
         "scheduler.asha.metric: got 'exact_matsh'. did you mean 'exact_match'"),
        ({"eval": {"metrics": ["exact_match"]}, "search": {"objectives": ["eval_loss", "exact_matsh"]}},
         "search.objectives: got .*unknown objective 'exact_matsh'. did you mean 'exact_match'"),
    ],
)
def test_bad_eval_sections_name_the_key_the_value_and_the_fix(sections: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec(**sections)


def test_a_missing_forgetting_file_or_python_function_is_a_spec_error_before_training(tmp_path: Path) -> None:
    from sweeps.plan import eval_job

    (tmp_path / "m.py").write_text("def other(**kw):\n    return 1.0\n")
    raw = make_spec_dict(eval={"metrics": [
        {"type": "forgetting", "path": "nowhere.txt"},
        {"python": "m.py:score", "name": "mine", "direction": "higher"},
    ]})
    s = parse_spec(raw, base_dir=tmp_path)
    with pytest.raises(SpecError) as caught:
        eval_job(s)
    text = str(caught.value)
    assert "eval.metrics[0] (forgetting).path: cannot read" in text and "nowhere.txt" in text
    assert "eval.metrics[1] (mine).python: eval metric mine: " in text and "has no function 'score'" in text


def test_asha_can_stop_on_eval_loss_while_optuna_optimizes_the_task_metric() -> None:
    """scheduler.asha.metric: ASHA compares trials on eval loss (minimized), the searcher maximizes
    exact match; with ASHA on the loss, eval.when: final is allowed (one task evaluation per trial)."""
    from sweeps.driver import make_scheduler
    from sweeps.searcher import make_searcher, search_space

    s = spec(eval={"metrics": ["exact_match"], "when": "final"}, search={"metric": "exact_match"},
             scheduler={"asha": {"grace_period": 1, "reduction_factor": 2, "metric": "eval_loss"}})
    scheduler = make_scheduler(s)
    assert (scheduler._metric, scheduler._mode) == ("eval_loss", "min")
    searcher = make_searcher(s, search_space(s), None, s.tune_mode(s.search.metric))
    assert (searcher._metric, searcher._mode) == ("exact_match", "max")
    assert s.task_eval_rounds == (s.max_rounds,)
    # Without asha.metric ASHA takes search.metric, in its direction.
    both = make_scheduler(spec(eval={"metrics": ["exact_match"]}, search={"metric": "exact_match"},
                               scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}}))
    assert (both._metric, both._mode) == ("exact_match", "max")


def test_the_saved_spec_names_task_metric_files_by_absolute_path(tmp_path: Path) -> None:
    """Resume and export read eval.metrics files from sweep_spec.yaml, run from any folder: the paths,
    written relative to the spec file, are saved resolved."""
    from sweeps.driver import Preflight, saved_spec

    (tmp_path / "general.txt").write_text("a plain sentence.\n")
    (tmp_path / "m.py").write_text("def f(**kw):\n    return 1.0\n")
    s = parse_spec(make_spec_dict(eval={"metrics": [{"type": "forgetting", "path": "general.txt"},
                                                    {"python": "m.py:f", "name": "mine", "direction": "higher"}]}),
                   base_dir=tmp_path)
    saved = saved_spec(Preflight(s, "builtin:tiny-llama", "llama", None), str(tmp_path / "results"))
    assert saved["eval"]["metrics"][0]["path"] == str(tmp_path / "general.txt")
    assert saved["eval"]["metrics"][1]["python"] == f"{tmp_path / 'm.py'}:f"
    assert parse_spec(saved).eval.metrics[1].python == saved["eval"]["metrics"][1]["python"]  # and it parses back


def test_the_task_rounds_are_the_rounds_where_ray_asha_records_a_trial_plus_the_last() -> None:
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, rf, max_t in [(1, 2, 8), (2, 2, 8), (1, 3, 9), (2, 1.5, 7), (3, 2, 3)]:
        bracket = _Bracket(grace, max_t, rf, 0)
        milestones = sorted({math.ceil(m - 1e-9) for m, _ in bracket._rungs})
        assert asha_rounds(grace, rf, max_t) == milestones, (grace, rf, max_t)
    s = spec(scheduler={"asha": {"grace_period": 1, "reduction_factor": 2, "max_t": 6}},
             train={"max_steps": 60, "eval_every": 10}, eval={"metrics": ["exact_match"]})
    assert s.task_eval_rounds == (1, 2, 4, 6)
    assert spec(eval={"metrics": ["exact_match"], "when": "final"}).task_eval_rounds == (2,)
    assert spec(eval={"metrics": ["exact_match"], "when": "every_round"}).task_eval_rounds == (1, 2)


def test_extraction_and_normalization() -> None:
    metric = MetricSpec(type="exact_match", extract="#### (-?[0-9.,]+)", normalize=("strip", "remove_commas"))
    assert extract("so 3 + 4 = 7\n#### 1,234", metric.extract) == "1,234"
    assert extract("no answer", metric.extract) is None
    assert normalize(" A,B ", ("strip", "lower", "remove_commas")) == "ab"
    assert answers_match("work... #### 1,234", "#### 1234", metric)
    assert not answers_match("work without an answer", "#### 1234", metric)
    assert not answers_match("#### 1233", "#### 1234", metric)
    assert MetricSpec(type="exact_match").teacher_forced and not metric.teacher_forced


def test_spearman_and_what_the_report_says_about_it() -> None:
    import pandas as pd

    from analysis.task_report import Correlation, spearman

    loss = pd.Series([0.3, 0.5, 0.9, 2.0])
    assert spearman(loss, pd.Series([0.9, 0.7, 0.4, 0.0])) == pytest.approx(-1.0)
    assert spearman(loss, pd.Series([0.1, 0.2, 0.3, 0.4])) == pytest.approx(1.0)
    assert spearman(loss, pd.Series([0.5, 0.5, 0.5, 0.5])) != spearman(loss, loss)  # NaN: constant
    assert spearman(loss[:2], loss[:2]) != spearman(loss[:2], loss[:2])  # NaN: too few trials
    said = Correlation("exact_match", -0.9, 4).describe("higher")
    assert "rho -0.90" in said and "strongly tracks" in said and "lower loss went with better exact_match" in said
    assert "lower loss went with worse" in Correlation("exact_match", 0.5, 4).describe("higher")


# --- every metric type, really trained ----------------------------------------------------------------

PY_METRIC = '''
def same_text(prompts, generations, references):
    assert len(prompts) == len(generations) == len(references)
    hits = [g == r for g, r in zip(generations, references)]
    return {"same": sum(hits) / len(hits), "rows": len(hits)}
'''


def run_with_metrics(
    tmp_path: Path, data: Path, metrics: list, *, steps: int, lr: float, data_format: str = "instruction"
) -> list[dict[str, Any]]:
    """One real trial (tiny NF4 Llama, LoRA on all linear layers) measuring `metrics` after every round."""
    from trainables.qlora import run_trial

    raw = make_spec_dict(
        data={"path": str(data), "format": data_format, "eval_size": 40, "max_seq_length": 64},
        train={"max_steps": steps, "eval_every": 10, "checkpoint": False},
        eval={"metrics": metrics, "max_examples": 24, "when": "every_round"},
    )
    job = trial_job(parse_spec(raw, base_dir=tmp_path))
    reports: list[dict[str, Any]] = []
    run_trial({**TRIAL_CONFIG, "target_modules": "all-linear", "learning_rate": lr}, job, report=lambda m, c=None: reports.append(m))
    assert [r["step"] for r in reports] == list(range(10, steps + 1, 10))
    for r in reports:
        assert r["task_eval_s"] > 0 and r["task_eval_peak_mib"] > 0
    return reports


@pytest.mark.integration
def test_teacher_forced_exact_match_agrees_with_generated_and_every_metric_type_is_measured(tmp_path: Path) -> None:
    """The smoke task: teacher-forced and generated exact match, a python metric (from a file that
    travels in the job), rouge_l, math_verify and forgetting, after every round of a real trial."""
    (tmp_path / "metric.py").write_text(PY_METRIC)
    metrics = [
        {"type": "exact_match", "name": "em_tf"},
        {"type": "exact_match", "name": "em_gen", "mode": "generate"},
        {"python": "metric.py:same_text", "name": "same", "key": "same", "direction": "higher"},
        {"type": "rouge_l"},
        {"type": "math_verify"},
        {"type": "forgetting", "path": str(GENERAL)},
    ]
    job = trial_job(parse_spec(make_spec_dict(eval={"metrics": metrics}), base_dir=tmp_path))
    assert job.eval is not None and "def same_text" in job.eval.python_sources["same"][1]
    reports = run_with_metrics(tmp_path, REPO / "sweeps" / "data" / "smoke_instructions.jsonl", metrics, steps=30, lr=1e-2)
    for r in reports:
        # Teacher-forced: right exactly when greedy decoding would produce the reference and stop.
        assert r["em_tf"] == r["em_gen"] == r["same"], r
        assert r["em_gen"] - 1e-9 <= r["rouge_l"] <= 1 and 0 <= r["math_verify"] <= 1
        assert r["forgetting"] == pytest.approx(r["forgetting_loss"] - r["forgetting_base_loss"])
    # Not two constant answers agreeing: the model learned, and some rows are right, some wrong.
    assert any(0 < r["em_tf"] < 1 for r in reports), [r["em_tf"] for r in reports]
    assert reports[-1]["em_tf"] > 0.5
    assert reports[-1]["math_verify"] > 0  # the "number after" rows verify
    # The base model's loss on the general set is measured once per attempt (adapter disabled).
    assert len({r["forgetting_base_loss"] for r in reports}) == 1
    assert reports[-1]["forgetting_loss"] != reports[-1]["forgetting_base_loss"]


@pytest.mark.integration
def test_continued_pretraining_on_text_data_measures_forgetting(tmp_path: Path) -> None:
    """data.format text has no prompts to answer, but forgetting reads its own general set: a real
    trial on plain sentences reports it every round (the spec once refused every task metric here)."""
    rows = [json.loads(line) for line in (REPO / "sweeps" / "data" / "smoke_instructions.jsonl").read_text().splitlines()[:300]]
    text = tmp_path / "sentences.jsonl"
    text.write_text("".join(json.dumps({"text": f"{r['instruction']} {r['input']} : {r['output']} ."}) + "\n" for r in rows))
    metrics = [{"type": "forgetting", "path": str(GENERAL), "name": "drift"}]
    reports = run_with_metrics(tmp_path, text, metrics, steps=20, lr=1e-2, data_format="text")
    for r in reports:
        assert math.isfinite(r["drift"]) and r["drift"] == pytest.approx(r["drift_loss"] - r["drift_base_loss"])
    assert len({r["drift_base_loss"] for r in reports}) == 1
    assert reports[-1]["drift_loss"] != reports[-1]["drift_base_loss"]  # the adapter moved the general-set loss


@pytest.mark.integration
def test_extraction_scores_the_answer_after_the_marker_on_the_gsm8k_shaped_smoke_task(tmp_path: Path) -> None:
    metrics = [
        {"type": "exact_match", "name": "whole"},
        {"type": "exact_match", "name": "answer_em", "extract": EXTRACT, "normalize": ["strip"]},
        {"type": "math_verify", "extract": EXTRACT},
    ]
    reports = run_with_metrics(tmp_path, ANSWERS, metrics, steps=40, lr=1e-2)
    for r in reports:
        assert r["answer_em"] >= r["whole"] and r["math_verify"] <= r["answer_em"] + 1e-9
    # The answer after "###" is learned before the whole worked sentence is: extraction matters.
    assert reports[-1]["answer_em"] > max(reports[0]["answer_em"], reports[-1]["whole"])
    assert reports[-1]["math_verify"] > 0


# --- the shipped example, end to end --------------------------------------------------------------------


@pytest.mark.integration
def test_the_exact_match_example_sweeps_on_exact_match_and_the_report_ranks_by_it(tmp_path: Path) -> None:
    import optuna

    from analysis.results import read_trials_csv
    from tests.cli_runs import private_ray_tmp, processes_of, read_results, run_cli

    with private_ray_tmp() as ray_tmp:  # its own Ray, whatever else runs on the machine
        result = run_cli(
            ["run", "sweeps/examples/smoke-exact-match.yaml", "--storage", str(tmp_path), "--name", "em",
             "--set", "search.num_samples=4"],
            ray_tmp, cwd=REPO, timeout=900,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert processes_of(ray_tmp) == [], "Ray processes left behind"
    experiment = tmp_path / "em"
    trials = read_trials_csv(experiment / "report" / "trials.csv")
    assert len(trials) == 4 and trials["best_exact_match"].notna().all()
    assert trials["best_exact_match"].nunique() > 1, trials["best_exact_match"]
    # Ranked by the objective in its direction: highest exact match first.
    for _, group in trials.groupby("status", sort=False):
        assert list(group["best_exact_match"]) == sorted(group["best_exact_match"], reverse=True)
    ranked = trials.sort_values("best_exact_match", ascending=False)
    report = (experiment / "report" / "report.md").read_text()
    assert "Objective: exact_match (higher is better)" in report and "## Task metrics" in report
    assert f"ranked by exact_match (higher is better): best trial {ranked.iloc[0]['trial_id']}" in report
    assert "Spearman rho" in report and "task evaluation cost:" in report
    assert (trials["task_eval_total_s"] > 0).all() and (trials["task_eval_peak_mib"] > 0).all()
    # Measured at ASHA's rungs (rounds 2 and 4) only; NaN in rounds 1 and 3, which ASHA never reads.
    for rows in read_results(experiment).values():
        for row in rows:
            measured = not math.isnan(row["exact_match"])
            assert measured == (row["training_iteration"] in (2, 4)), row
    # The best by exact match is what export takes; it measures exact match again on the exported adapter,
    # and with --merge checks the merge too, on the same loaded 4-bit model and eval split.
    with private_ray_tmp() as ray_tmp:
        exported = run_cli(["export", str(experiment), "--trial", "best", "--merge", "--out", str(tmp_path / "adapter")],
                           ray_tmp, cwd=REPO)
    assert exported.returncode == 0, exported.output[-3000:]
    info = json.loads((tmp_path / "adapter" / "export.json").read_text())
    assert info["trial_id"] == ranked.iloc[0]["trial_id"]
    assert info["merge_check_passed"] is True and {"adapter_4bit", "adapter_16bit", "merged"} <= set(info["losses"]), info
    assert 0 <= info["task_metrics"]["exact_match"] <= 1
    recorded = info["task_metrics_recorded"]["exact_match"]
    if recorded is not None:  # the kept checkpoint's round had a task evaluation: the same model, the same rows
        assert abs(info["task_metrics"]["exact_match"] - recorded) <= 1 / 40 + 1e-9, info
    assert "## Task metrics of this adapter" in (tmp_path / "adapter" / "README.md").read_text()
    print(f"\n[export] re-measured exact_match {info['task_metrics']['exact_match']} (sweep: {recorded})")
    # Optuna maximized it.
    study = optuna.load_study(study_name="em", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    finals = {round(float(v), 6) for v in trials["final_exact_match"]}
    assert done and {round(t.value, 6) for t in done} <= finals


def test_rouge_l_scores_a_reference_without_the_pattern_whole() -> None:
    """A reference the extraction regex does not match is compared whole (it used to crash rouge-score)."""
    from trainables.task_metrics import Generated, TaskEvaluator

    evaluator = TaskEvaluator.__new__(TaskEvaluator)  # _score needs no model, tokenizer or data
    metric = MetricSpec(type="rouge_l", extract="### (.*)")
    scores = evaluator._score(metric, Generated(prompts=["p", "p"], generations=["### the cat sat", "### a dog"],
                                                 references=["the cat sat", "### a dog"]))
    assert scores == {metric.metric_name: 1.0}


# An answer sympy would compute for ever (9^9^9^9): one generation like it used to hold the trial.
NEVER_ENDING = "$9^{9^{9^{9}}}$"


def test_a_math_answer_sympy_never_finishes_counts_as_not_verified_within_math_verifys_timeouts() -> None:
    import subprocess
    import sys
    import time

    from trainables.math_answers import MathVerifier

    verifier = MathVerifier()
    try:
        started = time.monotonic()
        assert verifier.hits([("1", NEVER_ENDING), ("$1/2$", "0.5"), ("3", "4")]) == [False, True, False]
        took = time.monotonic() - started
        assert took < verifier.deadline_s(3), took
        assert verifier.hits([("2", "2")]) == [True]  # the same child goes on scoring
    finally:
        verifier.close()
    # Control: what a trial thread can call (math-verify's signal timeouts off) is still at it 3x later.
    in_a_thread = (
        "import threading\nfrom math_verify import parse, verify\n"
        f"t = threading.Thread(target=lambda: verify(parse('1', parsing_timeout=None), parse({NEVER_ENDING!r}, "
        "parsing_timeout=None), timeout_seconds=None))\nt.start(); t.join()\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", in_a_thread], timeout=max(15.0, 3 * took), capture_output=True)


def test_a_math_verify_process_that_dies_is_an_error_naming_the_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainables import math_answers

    monkeypatch.setattr(math_answers, "_CHILD", "import sys; sys.exit(3)")
    with pytest.raises(math_answers.MathVerifyError, match="eval.metrics math_verify: the math-verify process exited with status 3 while starting"):
        math_answers.MathVerifier().hits([("1", "1")])
