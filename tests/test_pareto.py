"""Quality-vs-memory analysis on hand-made trials tables: Pareto front, best, budgets, cheapest within 1%."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.pareto import (
    best_trial,
    best_under_budgets,
    cheapest_within,
    pareto_front,
    primary_memory_kind,
    rankable,
    tradeoff_table,
)

NAN = math.nan


def trials(rows: list[tuple]) -> pd.DataFrame:
    """(trial_id, status, peak_memory_mib, best_eval_loss[, memory_kind]) -> a trials table."""
    frame = pd.DataFrame(
        [(*r, "cuda_reserved") if len(r) == 4 else r for r in rows],
        columns=["trial_id", "status", "peak_memory_mib", "best_eval_loss", "memory_kind"],
    )
    return frame.astype({"trial_id": "string", "status": "string", "memory_kind": "string"})


def front_ids(frame: pd.DataFrame) -> list[str]:
    return sorted(frame.loc[pareto_front(frame), "trial_id"])


def test_dominated_points_leave_the_front_and_trade_offs_stay() -> None:
    frame = trials(
        [
            ("big-best", "completed", 9000, 1.0),
            ("small-worse", "completed", 4000, 1.5),
            ("dominated", "completed", 9500, 1.6),  # more memory and worse than both
            ("middle", "completed", 6000, 1.2),
        ]
    )
    assert front_ids(frame) == ["big-best", "middle", "small-worse"]


def test_equal_points_are_all_on_the_front_and_ties_on_one_axis_are_not() -> None:
    frame = trials(
        [
            ("a", "completed", 4000, 1.0),
            ("a-duplicate", "completed", 4000, 1.0),  # identical: neither dominates the other
            ("same-memory-worse", "completed", 4000, 1.1),  # equal memory, worse loss: dominated
            ("same-loss-more-memory", "completed", 5000, 1.0),  # equal loss, more memory: dominated
        ]
    )
    assert front_ids(frame) == ["a", "a-duplicate"]


def test_rows_with_missing_values_are_never_on_the_front_and_dominate_nothing() -> None:
    frame = trials(
        [
            ("no-memory", "completed", NAN, 0.1),
            ("no-loss", "completed", 100, NAN),
            ("inf-loss", "completed", 50, math.inf),
            ("real", "completed", 8000, 2.0),
        ]
    )
    assert front_ids(frame) == ["real"]


def test_single_row_and_empty_table() -> None:
    assert front_ids(trials([("only", "completed", 1, 1.0)])) == ["only"]
    assert pareto_front(trials([])).empty
    assert best_trial(trials([])) is None
    assert cheapest_within(trials([])) is None
    assert best_under_budgets(trials([]), [8])["trial_id"].isna().all()


def test_a_higher_is_better_objective_ranks_every_way_in_its_direction() -> None:
    """A task metric (exact_match, higher is better) as the quality: the front, the best trial, the
    cheapest within 1%, the budget table and the trade-offs all read it the right way up."""
    from analysis.pareto import Quality

    em = Quality("exact_match", "higher")
    frame = pd.DataFrame({
        "trial_id": ["best", "close-cheap", "far-cheapest", "dominated"],
        "peak_memory_mib": [4096.0, 2048.0, 1024.0, 4096.0],
        "best_exact_match": [0.80, 0.795, 0.50, 0.70],
        "best_eval_loss": [0.9, 0.5, 0.4, 0.3],  # the loss would rank them the other way
    })
    assert sorted(frame.loc[pareto_front(frame, em), "trial_id"]) == ["best", "close-cheap", "far-cheapest"]
    assert best_trial(frame, em)["trial_id"] == "best"
    assert best_trial(frame)["trial_id"] == "dominated"  # by eval loss, the default
    assert cheapest_within(frame, quality=em)["trial_id"] == "close-cheap"  # 0.795 is within 1% of 0.80
    assert cheapest_within(frame, tolerance=0.0, quality=em)["trial_id"] == "best"
    table = best_under_budgets(frame, [1, 2, 4], em)
    assert table["trial_id"].tolist() == ["far-cheapest", "close-cheap", "best"]
    assert table["best_exact_match"].tolist() == [0.50, 0.795, 0.80]
    lost = tradeoff_table(frame, em).set_index("trial_id")["quality_lost_pct"]
    assert lost.to_dict() == pytest.approx({"far-cheapest": 37.5, "close-cheap": 0.625, "best": 0.0})
    assert em.gain(0.8, 0.5) == pytest.approx(0.6) and Quality().gain(0.5, 1.0) == pytest.approx(0.5)
    # A baseline that got nothing right: any right answer is an unbounded relative gain, not none.
    assert em.gain(0.9, 0.0) == float("inf") and em.gain(0.0, 0.0) == 0.0
    assert em.gain_text(0.9, 0.0) == "0.9 higher (from 0)" and Quality().gain_text(0.5, 1.0) == "50.0% lower"


@pytest.mark.parametrize("seed", range(6))
def test_front_agrees_with_optunas_multi_objective_best_trials(seed: int) -> None:
    """Optuna's own Pareto front (study.best_trials of a two-objective study) on random tables with ties."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(seed)
    memory = rng.integers(1, 8, size=25).astype(float)  # few distinct values: many ties
    loss = rng.integers(1, 8, size=25).astype(float) / 4
    frame = trials([(f"t{i}", "completed", m, q) for i, (m, q) in enumerate(zip(memory, loss))])
    study = optuna.create_study(directions=["minimize", "minimize"])
    for m, q in zip(memory, loss):
        study.add_trial(optuna.trial.create_trial(values=[m, q]))
    expected = sorted(f"t{t.number}" for t in study.best_trials)
    assert front_ids(frame) == expected


def test_best_trial_breaks_ties_by_memory_then_trial_id() -> None:
    frame = trials(
        [
            ("b", "completed", 5000, 1.0),
            ("c", "completed", 4000, 1.0),
            ("a", "completed", 4000, 1.0),
            ("worse", "completed", 100, 1.5),
        ]
    )
    assert best_trial(frame)["trial_id"] == "a"


def test_only_rankable_trials_count() -> None:
    frame = trials(
        [
            ("ok", "completed", 5000, 1.0),
            ("stopped", "early_stopped", 3000, 1.2),
            ("live", "running", 2000, 1.4),
            ("crashed", "failed", 1000, 0.1),  # a failed trial's last loss is not a configuration's quality
            ("oom", "oom", 900, 0.5),
            ("nan", "diverged", 800, 0.2),
            ("rejected", "infeasible", NAN, NAN),
            ("waiting", "pending", NAN, NAN),
        ]
    )
    assert sorted(rankable(frame)["trial_id"]) == ["live", "ok", "stopped"]


def test_primary_memory_kind_prefers_vram_and_rankable_filters_by_kind() -> None:
    frame = trials(
        [
            ("gpu", "completed", 9000, 1.0, "cuda_reserved"),
            ("cpu", "completed", 600, 0.5, "host_rss"),
        ]
    )
    assert primary_memory_kind(frame) == "cuda_reserved"
    assert rankable(frame, "cuda_reserved")["trial_id"].tolist() == ["gpu"]
    assert primary_memory_kind(frame[frame["trial_id"] == "cpu"]) == "host_rss"
    assert primary_memory_kind(trials([("x", "failed", 1, 1.0)])) is None


def test_best_under_budgets_includes_the_boundary_and_reports_none_fits() -> None:
    frame = trials(
        [
            ("best-24g", "completed", 24 * 1024, 1.00),  # exactly 24 GiB: fits a 24 GiB budget
            ("best-16g", "completed", 12 * 1024, 1.10),
            ("also-16g", "completed", 15 * 1024, 1.30),
            ("huge", "completed", 70 * 1024, 0.90),
        ]
    )
    table = best_under_budgets(frame, [8, 16, 24, 80])
    assert table["budget_gib"].tolist() == [8, 16, 24, 80]
    assert table["trial_id"].tolist()[0] is pd.NA
    assert table["trial_id"].tolist()[1:] == ["best-16g", "best-24g", "huge"]
    assert table["fits"].tolist() == [0, 2, 3, 4]
    assert table.loc[2, "headroom_mib"] == 0
    assert table.loc[1, "headroom_mib"] == 4 * 1024


def test_cheapest_within_one_percent() -> None:
    frame = trials(
        [
            ("best", "completed", 20000, 1.000),
            ("close-cheap", "completed", 9000, 1.009),  # +0.9%: within 1%
            ("close-cheaper-but-tied", "completed", 9000, 1.005),  # same memory, better loss: wins the tie
            ("too-far", "completed", 1000, 1.02),  # +2%: cheaper but too far
        ]
    )
    assert cheapest_within(frame)["trial_id"] == "close-cheaper-but-tied"
    assert cheapest_within(frame, tolerance=0.03)["trial_id"] == "too-far"
    assert cheapest_within(frame, tolerance=0.0)["trial_id"] == "best"


def test_tradeoff_table_orders_the_front_by_memory_and_states_the_cost() -> None:
    frame = trials(
        [
            ("best", "completed", 10000, 1.0),
            ("half", "completed", 5000, 1.1),
            ("dominated", "completed", 12000, 1.2),
        ]
    )
    table = tradeoff_table(frame)
    assert table["trial_id"].tolist() == ["half", "best"]
    assert table["memory_saved_pct"].tolist() == pytest.approx([50.0, 0.0])
    assert table["quality_lost_pct"].tolist() == pytest.approx([10.0, 0.0])
