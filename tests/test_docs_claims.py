"""What docs/dashboards.md says about the Optuna study is what the code and optuna-dashboard do.

The real OptunaStudySearch (Ray's OptunaSearch over a real in-memory Optuna study) is driven the way
Tune drives it; the importance evaluator is read from the installed optuna-dashboard's own source.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import optuna

from sweeps.driver import make_sampler
from sweeps.searcher import make_searcher, search_space
from sweeps.spec import parse_spec
from tests.conftest import REPO, make_spec_dict

DASHBOARDS = (REPO / "docs" / "dashboards.md").read_text()
EVALUATORS = ("FanovaImportanceEvaluator", "MeanDecreaseImpurityImportanceEvaluator", "PedAnovaImportanceEvaluator")


def evaluators_in(source: str) -> set[str]:
    return {name for name in EVALUATORS if f"{name}(" in source}


def test_the_docs_name_the_importance_evaluator_that_the_dashboard_and_the_report_use() -> None:
    import optuna_dashboard._importance as dashboard_importance

    import analysis.importance

    used = evaluators_in(inspect.getsource(dashboard_importance)) | evaluators_in(inspect.getsource(analysis.importance))
    assert used == {"PedAnovaImportanceEvaluator"}, used  # if this changes, so must the docs
    assert "PedAnovaImportanceEvaluator" in DASHBOARDS and "PED-ANOVA" in DASHBOARDS
    assert not re.search(r"fanova|mean decrease", DASHBOARDS, re.IGNORECASE)


def state_in_dashboard(state: optuna.trial.TrialState) -> str:
    return state.name.capitalize()  # optuna-dashboard shows COMPLETE as "Complete", PRUNED as "Pruned"


def test_the_docs_give_the_dashboard_state_of_a_diverged_and_a_failed_trial() -> None:
    spec = parse_spec(make_spec_dict(search={"num_samples": 3, "optuna_storage": "memory", "sampler": "random"}))
    search = make_searcher(spec, search_space(spec), make_sampler(spec), "min")
    for trial_id in ("diverged", "failed", "fine"):
        search.suggest(trial_id)
    search.on_trial_result("diverged", {"eval_loss": float("nan"), "training_iteration": 1})
    search.on_trial_complete("diverged", {"eval_loss": float("nan"), "training_iteration": 1, "trial_status": "diverged"})
    search.on_trial_complete("failed", None, error=True)
    search.on_trial_complete("fine", {"eval_loss": 1.0, "training_iteration": 1})
    states = [state_in_dashboard(t.state) for t in search._ot_study.trials]
    assert states == ["Pruned", "Fail", "Complete"], states
    sentence = re.search(r"A trial\s+that diverged \(NaN loss\) is `(\w+)`", DASHBOARDS)
    assert sentence and sentence.group(1) == states[0], "docs/dashboards.md on diverged trials"
    raised = re.search(r"A trial that raised \(after `train.max_failures` retries\) is `(\w+)`", DASHBOARDS)
    assert raised and raised.group(1) == states[1], "docs/dashboards.md on failed trials"
    assert f"({', '.join(['Running', 'Complete', 'Pruned', 'Fail'])})" in DASHBOARDS
