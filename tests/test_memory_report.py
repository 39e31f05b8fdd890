"""The report's memory sections (analysis/memory_report.py) on hand-made trials tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.formatting import markdown_table
from analysis.memory_report import (
    NOT_COMPARABLE,
    memory_html,
    memory_markdown,
    memory_summary_lines,
    objective_columns,
    objectives_front,
    packing_lines,
    packing_summary,
    prediction_rows,
    predictions,
)

NAN = math.nan


def test_the_error_is_shown_only_next_to_vram() -> None:
    trials = pd.DataFrame(
        {
            "trial_id": ["gpu", "cpu", "pending", "rejected"],
            "status": ["completed", "completed", "running", "infeasible"],
            "predicted_memory_mib": [9000.0, 3.5, 2.0, 20000.0],
            "peak_memory_mib": [10000.0, 612.0, NAN, NAN],
            "memory_kind": ["cuda_reserved", "host_rss", None, None],
            "memory_error_pct": [-10.0, NAN, NAN, NAN],
        }
    )
    rows = prediction_rows(trials).set_index("trial_id")
    assert rows.loc["gpu", "error"] == "-10.0%"
    assert rows.loc["cpu", "error"] == NOT_COMPARABLE == "n/a (measured host RSS, not comparable)"
    assert rows.loc["pending", "error"] == ""
    assert "rejected" not in rows.index  # a rejected configuration has a prediction but was never measured


def test_packing_counts_trials_per_gpu_and_gpu_hours_from_start_and_end_times() -> None:
    # GPU 0 of node a: three trials, two overlapping for 50 s; GPU 1: one trial. Times in seconds.
    trials = pd.DataFrame(
        {
            "trial_id": ["t1", "t2", "t3", "t4", "unpacked"],
            "node_id": ["a", "a", "a", "a", "a"],
            "gpu_ids": ["0", "0", "0", "1", None],
            "gpu_fraction": [0.3, 0.3, 0.5, 0.3, NAN],
            "started_at": [0.0, 50.0, 200.0, 0.0, 0.0],
            "ended_at": [100.0, 150.0, 300.0, 100.0, 50.0],
            "device": ["cuda:0", "cuda:0", "cuda:0", "cuda:0", "cuda:0"],
        }
    )
    summary = packing_summary(trials)
    assert summary is not None and summary.gpus == 2 and summary.trials == 4 and summary.max_per_gpu == 2
    # GPU 0 busy 0-150 and 200-300 (250 s), GPU 1 100 s; one trial per GPU would take 100+100+100+100 s.
    assert summary.busy_gpu_hours == pytest.approx(350 / 3600)
    assert summary.unpacked_gpu_hours == pytest.approx(400 / 3600)
    assert summary.reserved_gpu_hours == pytest.approx((0.3 * 100 * 3 + 0.5 * 100) / 3600)
    assert summary.saved_pct == pytest.approx(12.5) and not summary.logical
    assert "up to 2 ran on one GPU at once" in packing_lines(summary)[0]
    on_cpu = packing_summary(trials.assign(device="cpu"))
    assert on_cpu.logical and "this was a CPU run: the GPU was logical" in packing_lines(on_cpu)[-1]
    assert packing_summary(trials.drop(columns=["gpu_fraction"])) is None
    assert packing_summary(trials.assign(gpu_fraction=NAN)) is None


def test_the_searched_objectives_front_uses_each_objectives_direction() -> None:
    spec = {"search": {"metric": "eval_loss", "objectives": ["eval_loss", "tokens_per_s"]}}
    assert objective_columns(spec) == ["best_eval_loss", "tokens_per_s"]
    assert objective_columns({"search": {"metric": "eval_loss"}}) == []
    ranked = pd.DataFrame(
        {
            "trial_id": ["good-slow", "bad-fast", "dominated", "best"],
            "best_eval_loss": [1.0, 2.0, 2.5, 0.9],
            "tokens_per_s": [100.0, 900.0, 800.0, 150.0],
        }
    )
    front = objectives_front(ranked, objective_columns(spec))
    assert list(front["trial_id"]) == ["best", "bad-fast"]  # good-slow loses to best on both; higher tokens/s is better
    # A task metric objective (multi-objective [exact_match, peak_memory]) is in the front, higher is better.
    task_spec = {"search": {"metric": "exact_match", "objectives": ["exact_match", "peak_memory_mib"]},
                 "eval": {"metrics": ["exact_match"]}}
    assert objective_columns(task_spec) == ["best_exact_match", "peak_memory_mib"]
    ranked = pd.DataFrame({"trial_id": ["right-big", "wrong-small", "dominated"], "best_exact_match": [0.9, 0.2, 0.5],
                           "peak_memory_mib": [900.0, 100.0, 950.0]})
    front = objectives_front(ranked, objective_columns(task_spec), task_spec)
    assert list(front["trial_id"]) == ["right-big", "wrong-small"]  # best first on exact_match


def test_summary_counts_rejections_by_reason() -> None:
    trials = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "status": ["infeasible", "infeasible", "oom", "completed"],
            "infeasible_reason": ["predicted not to fit: ...", "dominated by OOM config c (...)", None, None],
        }
    )
    assert memory_summary_lines(trials, {}) == [
        "memory: 2 configurations rejected before launch (1 predicted not to fit, 1 dominated by an OOM config); "
        "1 trial ran out of memory"
    ]
    assert memory_summary_lines(trials[trials["status"] == "completed"], {}) == []


def _predicted(kinds: list[str], errors: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": [f"t{i}" for i in range(len(kinds))],
            "status": ["completed"] * len(kinds),
            "predicted_memory_mib": [100.0] * len(kinds),
            "peak_memory_mib": [110.0] * len(kinds),
            "memory_kind": kinds,
            "memory_error_pct": errors,
        }
    )


def test_markdown_and_html_say_the_same_about_predictions() -> None:
    vram = _predicted(["cuda_reserved", "cuda_reserved"], [-10.0, 20.0])
    summary = predictions(vram, ["DoRA's magnitude vectors and extra activations"])
    assert summary is not None and summary.text.startswith("Mean absolute error 15.0% over 2 trials")
    assert summary.text.endswith("Not modelled by the estimator: DoRA's magnitude vectors and extra activations.")
    md = "\n".join(memory_markdown(vram, {}, vram.iloc[0:0], markdown_table, ["DoRA's magnitude vectors and extra activations"]))
    html = memory_html(vram, {}, vram.iloc[0:0], lambda frame, columns, **_: "<table></table>",
                       ["DoRA's magnitude vectors and extra activations"])
    assert summary.text in md and summary.text.replace("'", "&#x27;") in html

    cpu = _predicted(["host_rss"], [NAN])
    text = predictions(cpu).text
    assert "This run measured host RSS, so the error is n/a" in text and "Mean absolute error" not in text
    # Only VRAM errors count, even if a table carried an error next to host RSS.
    mixed = _predicted(["cuda_reserved", "host_rss"], [-10.0, 50.0])
    assert predictions(mixed).text.startswith("Mean absolute error 10.0% over 1 trials")
    assert predictions(_predicted([], [])) is None


# --- the CPU tensor peak ------------------------------------------------------------------------------


def _cpu_trials() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": ["small", "large", "old"],
            "status": ["completed", "early_stopped", "completed"],
            "r": [4, 32, 8],
            "target_modules": ["qv", "all-linear", "qv"],
            "micro_batch_size": [8, 8, 8],
            "best_eval_loss": [0.5, 0.4, 0.6],
            "peak_memory_mib": [630.0, 640.0, 635.0],
            "memory_kind": ["host_rss", "host_rss", "host_rss"],
            "predicted_memory_mib": [30.0, 32.0, 31.0],
            "memory_error_pct": [NAN, NAN, NAN],
            "tensor_peak_mib": [15.7, 16.4, NAN],  # "old": an experiment from before the tensor peak existed
            "tensor_peak_kind": ["cpu_tensor_peak", "cpu_tensor_peak", None],
            "predicted_tensor_peak_mib": [15.8, 17.2, NAN],
            "tensor_peak_seq_len": [16, 16, None],
            "tensor_peak_error_pct": [(15.8 - 15.7) / 15.7 * 100, (17.2 - 16.4) / 16.4 * 100, NAN],
        }
    )


def test_the_cpu_tensor_peak_is_compared_with_its_prediction_and_with_host_rss() -> None:
    from analysis.memory_report import tensor_peaks

    peaks = tensor_peaks(_cpu_trials())
    assert peaks is not None and list(peaks.rows["trial_id"]) == ["small", "large"]
    assert "15.700-16.400 MiB over 2 trials" in peaks.text and "mean absolute 2.8%, largest 4.9%" in peaks.text
    assert "Host RSS of the same trials spans 630-640 MiB" in peaks.text
    assert peaks.line.startswith("CPU tensor peak (cpu_tensor_peak, not VRAM)")
    assert peaks.line in memory_summary_lines(_cpu_trials(), {})
    md = "\n".join(memory_markdown(_cpu_trials(), {}, _cpu_trials().iloc[0:0], markdown_table))
    assert "## CPU tensor peak: predicted vs measured" in md and "| small | completed | 4 | qv | 8 | 16 | 15.800 | 15.700 | +0.6% |" in md
    assert "compared with the estimator's CPU prediction below" in md
    from analysis.html import data_table

    html = memory_html(_cpu_trials(), {}, _cpu_trials().iloc[0:0], data_table)
    assert "<h2>CPU tensor peak: predicted vs measured</h2>" in html and "measured (MiB, cpu_tensor_peak)" in html
    # A GPU run (no tensor peak) has no such section.
    gpu = _cpu_trials().assign(tensor_peak_mib=NAN)
    assert tensor_peaks(gpu) is None and "CPU tensor peak" not in "\n".join(memory_markdown(gpu, {}, gpu.iloc[0:0], markdown_table))


def test_the_quality_vs_memory_chart_plots_the_tensor_peak_on_a_cpu_run() -> None:
    from analysis import plots
    from analysis.memory_report import chart_memory

    ranked = _cpu_trials().iloc[:2]
    frame, kind = chart_memory(ranked, "host_rss")
    assert kind == "cpu_tensor_peak" and list(frame["peak_memory_mib"]) == [15.7, 16.4]
    assert chart_memory(ranked, "cuda_reserved") == (ranked, "cuda_reserved")  # VRAM is charted as measured
    assert chart_memory(_cpu_trials(), "host_rss")[1] == "host_rss"  # not every trial has one: RSS, as before
    png = plots.quality_vs_memory(ranked, "host_rss")
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.predicted_vs_measured(_cpu_trials())[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.predicted_vs_measured(_cpu_trials().assign(tensor_peak_mib=NAN)) is None
