"""The report: loading experiments into the trials table, the analysis, and the files it writes.

Unit tests build experiment folders in the layout Tune and the trainable write (params.json,
result.json lines, error.txt, checkpoint folders, experiment_state JSON) to cover every status;
integration tests use a real tiny sweep recorded once per session (conftest.recorded_sweep).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from analysis.report import analyze, write_report
from analysis.results import load_experiment, read_trials_csv
from sweeps.cli import main
from sweeps.spec import parse_spec
from tests.conftest import RecordedSweep, make_spec_dict
from trainables.metrics import COLUMNS

CONFIG = {
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "lr_scheduler_type": "cosine",
    "batch_size": 8,
}


def trial(
    trial_id: str,
    *,
    r: int = 8,
    targets: str = "qv",
    lr: float = 3e-3,
    evals: list[tuple[float, bool]] = (),
    memory: float = 9000.0,
    kind: str = "cuda_reserved",
    tune_status: str = "TERMINATED",
    last: dict[str, Any] | None = None,
    error: str | None = None,
    truncated: bool = False,
    deleted_checkpoints: tuple[int, ...] = (),
    predicted: float | None = None,
    exact_match: tuple[float, ...] = (),
) -> dict[str, Any]:
    """A trial as written to disk: evals are (eval_loss, keeps a checkpoint) per round of 10 steps;
    exact_match, when given, one value per round (a task metric of eval.metrics)."""
    return {k: v for k, v in locals().items()}


def write_experiment(root: Path, trials: list[dict[str, Any]], name: str = "exp", **sections: Any) -> Path:
    """An experiment folder in the layout Tune + qlora-sweep write (no Ray needed to read it back)."""
    spec = parse_spec(
        make_spec_dict(
            space={"r": [8, 16], "target_modules": ["qv", "all-linear"], "learning_rate": {"loguniform": [1e-4, 1e-2]}},
            **sections,
        )
    ).model_dump(mode="json")
    path = root / name
    path.mkdir(parents=True)
    (path / "sweep_spec.yaml").write_text(yaml.safe_dump({**spec, "name": name, "storage": str(root)}))
    state = []
    for t in trials:
        config = {"r": t["r"], "target_modules": t["targets"], "learning_rate": t["lr"], **CONFIG}
        state.append(
            [
                json.dumps({"trial_id": t["trial_id"], "status": t["tune_status"], "config": config}),
                json.dumps({"error_filename": "error.txt" if t["error"] else None, "num_failures": 0}),
            ]
        )
        if t["tune_status"] == "PENDING":
            continue  # never started: no folder
        folder = path / f"trial_{t['trial_id']}"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps(config))
        lines = []
        for i, (loss, keeps) in enumerate(t["evals"]):
            result = {
                "eval_loss": loss,
                "step": 10 * (i + 1),
                "peak_memory_mib": t["memory"],
                "memory_kind": t["kind"],
                "trainable_params": 1000 * t["r"],
                "tokens_per_s": 500.0,
                "training_iteration": i + 1,
                "time_total_s": 2.0 * (i + 1),
                "node_ip": "10.0.0.7",
                "trial_id": t["trial_id"],
                "done": False,
            }
            if t["predicted"] is not None:
                result["predicted_memory_mib"] = t["predicted"]
            if t["exact_match"]:
                result["exact_match"] = t["exact_match"][i]
            if keeps:
                result["checkpoint_dir_name"] = f"checkpoint_{i:06d}"
                if i not in t["deleted_checkpoints"]:
                    (folder / result["checkpoint_dir_name"]).mkdir()
                    (folder / result["checkpoint_dir_name"] / "adapter_config.json").write_text("{}")
            lines.append(json.dumps(result))
        if t["last"] is not None:
            lines.append(json.dumps({"memory_kind": t["kind"], "trial_id": t["trial_id"], **t["last"]}))
        text = "\n".join(lines) + "\n"
        if t["truncated"]:
            text += '{"eval_loss": 0.9, "step": 2'  # killed while writing
        (folder / "result.json").write_text(text)
        if t["error"]:
            (folder / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{t['error']}\n")
    (path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": state}))
    return path


def cluster_trials() -> list[dict[str, Any]]:
    """A GPU sweep with one trial in every status."""
    return [
        # Best loss at round 1, whose checkpoint Tune already deleted: the kept round-2 one is used.
        trial("best", r=16, targets="all-linear", evals=[(1.10, True), (1.20, True)], memory=9000,
              deleted_checkpoints=(0,), predicted=10000.0),
        trial("cheap", r=8, targets="qv", lr=2e-3, evals=[(1.30, True), (1.105, True)], memory=5000, predicted=4500.0),
        trial("pricey", r=16, targets="all-linear", lr=5e-3, evals=[(1.25, True), (1.15, True)], memory=12000),
        trial("crashed", evals=[(1.6, True)], tune_status="ERROR", error="RuntimeError: CUDA error: device-side assert"),
        trial("nomem", evals=[], last={"trial_status": "oom", "step": 3, "peak_memory_mib": 23000.0},
              error="torch.OutOfMemoryError: CUDA out of memory"),
        trial("blewup", r=16, lr=9e-3, evals=[(2.0, True)],
              last={"eval_loss": math.nan, "trial_status": "diverged", "step": 12}),
        trial("live", r=8, targets="all-linear", lr=1e-3, evals=[(1.4, True)], memory=7000, tune_status="RUNNING",
              truncated=True),
        trial("queued", tune_status="PENDING"),
    ]


def test_every_trial_is_loaded_with_its_status_and_the_declared_dtypes(tmp_path: Path) -> None:
    exp = load_experiment(str(write_experiment(tmp_path, cluster_trials())))
    table = exp.trials.set_index("trial_id")
    assert table["status"].to_dict() == {
        "best": "completed",
        "cheap": "completed",
        "pricey": "completed",
        "live": "running",
        "queued": "pending",
        "crashed": "failed",
        "nomem": "oom",
        "blewup": "diverged",
    }
    for name, dtype in exp.trials.dtypes.items():
        if name in COLUMNS:
            assert str(dtype) == COLUMNS[name].dtype, name
    assert table.at["best", "best_eval_loss"] == pytest.approx(1.10)
    assert table.at["best", "final_eval_loss"] == pytest.approx(1.20)
    assert table.at["best", "best_step"] == 10
    assert table.at["best", "checkpoint_path"].endswith("trial_best/checkpoint_000001")  # the best one is gone
    assert table.at["cheap", "checkpoint_path"].endswith("trial_cheap/checkpoint_000001")
    assert table.at["pricey", "checkpoint_path"].endswith("trial_pricey/checkpoint_000001")
    assert table.at["crashed", "error"] == "RuntimeError: CUDA error: device-side assert"
    assert table.at["best", "memory_error_pct"] == pytest.approx((10000 - 9000) / 9000 * 100)
    assert table.at["cheap", "memory_error_pct"] == pytest.approx(-10.0)
    assert pd.isna(table.at["pricey", "predicted_memory_mib"]) and pd.isna(table.at["pricey", "memory_error_pct"])
    assert any("truncated" in note and "trial_live" in note for note in exp.notes)
    assert len(exp.curves[exp.curves["trial_id"] == "best"]) == 2


def test_a_trial_folder_the_saved_tune_state_never_named_and_without_results_is_not_counted(tmp_path: Path) -> None:
    """A driver killed just after Tune made a trial's folder, before its state upload named it: resume
    does not continue that trial (the search proposes afresh), so it is no pending trial of the sweep.
    A folder Tune's state does not name but that has results is still counted."""
    path = write_experiment(tmp_path, [trial("done", evals=[(1.2, True), (1.1, True)]), trial("unsaved", evals=[(1.4, True)])])
    state_file = next(path.glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    state["trial_data"] = [t for t in state["trial_data"] if json.loads(t[0])["trial_id"] == "done"]
    state_file.write_text(json.dumps(state))
    (path / "trial_orphan").mkdir()
    (path / "trial_orphan" / "params.json").write_text(json.dumps({"r": 8, "target_modules": "qv", **CONFIG}))
    exp = load_experiment(str(path))
    assert exp.trials.set_index("trial_id")["status"].to_dict() == {"done": "completed", "unsaved": "running"}
    assert any("trial_orphan has no results and Tune's saved state does not name it" in note for note in exp.notes)


def test_analysis_picks_best_cheapest_and_best_per_budget_and_lists_the_rest(tmp_path: Path) -> None:
    analysis = analyze(load_experiment(str(write_experiment(tmp_path, cluster_trials()))), [4, 8, 10, 16])
    assert analysis.memory_kind == "cuda_reserved" and analysis.budgets_apply
    assert analysis.best["trial_id"] == "best"
    assert analysis.cheapest["trial_id"] == "cheap"  # 1.105 is within 1% of 1.10, at 5000 MiB instead of 9000
    assert analysis.budgets["trial_id"].fillna("-").tolist() == ["-", "cheap", "best", "best"]
    assert set(analysis.ranked["trial_id"]) == {"best", "cheap", "pricey", "live"}
    assert set(analysis.ranked.loc[analysis.ranked["on_front"], "trial_id"]) == {"best", "cheap"}
    reasons = analysis.not_ranked.set_index("trial_id")["reason"].to_dict()
    assert set(reasons) == {"crashed", "nomem", "blewup", "queued"}
    assert reasons["crashed"] == "failed: RuntimeError: CUDA error: device-side assert"
    assert reasons["nomem"].startswith("ran out of memory")
    assert reasons["blewup"] == "loss became NaN/inf by step 12"
    assert "no evaluation yet" in reasons["queued"]
    assert analysis.in_progress


def test_report_files_say_partial_list_every_left_out_trial_and_label_vram(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, cluster_trials())
    outcome = write_report(str(path), budgets_gib=[8, 16])
    report = Path(outcome.report_dir)
    assert report == path / "report"
    assert {"report.html", "report.md", "trials.csv", "trials.parquet"} <= set(outcome.files)
    html = (report / "report.html").read_text()
    md = (report / "report.md").read_text()
    assert "Partial report: the sweep is still running" in html
    assert "partial: the sweep is still running" in md
    for trial_id in ("crashed", "nomem", "blewup", "queued"):
        assert f"`{trial_id}`" in md.split("## Trials left out of the ranking")[1]
    assert "9,000 MiB VRAM (8.79 GiB)" in md and "not meaningful" not in md
    assert "best under each VRAM budget: 8 GiB: cheap (1.1050), 16 GiB: best (1.1000)" in md
    assert "Predicted vs measured memory" in html
    assert len(read_trials_csv(report / "trials.csv")) == 8
    assert 'src="http' not in html and "<link" not in html  # self-contained


def test_cpu_runs_label_memory_as_host_rss_and_call_budgets_not_meaningful(tmp_path: Path) -> None:
    trials = [
        trial("a", evals=[(1.2, True), (1.0, True)], memory=640, kind="host_rss", predicted=300.0),
        trial("b", r=16, evals=[(1.5, True), (1.3, True)], memory=600, kind="host_rss"),
    ]
    outcome = write_report(str(write_experiment(tmp_path, trials)))
    md = (Path(outcome.report_dir) / "report.md").read_text()
    html = (Path(outcome.report_dir) / "report.html").read_text()
    assert "host RSS, not VRAM: budgets are not meaningful for a CPU run" in md
    assert "Budgets are not meaningful for this run" in html
    assert "640 MiB host RSS (CPU, not VRAM)" in md
    assert "MiB VRAM" not in md and "MiB VRAM" not in html  # no CPU figure presented as VRAM
    assert any("not meaningful" in line for line in outcome.summary_lines)
    exp = load_experiment(str(tmp_path / "exp"))
    assert exp.trials["memory_error_pct"].isna().all()  # a VRAM prediction is not compared with RSS


def test_mixed_memory_kinds_rank_only_vram_and_say_why_the_rest_is_left_out(tmp_path: Path) -> None:
    trials = [
        trial("gpu", evals=[(1.2, True), (1.1, True)], memory=9000),
        trial("cpu", evals=[(1.0, True), (0.9, True)], memory=500, kind="host_rss"),
    ]
    analysis = analyze(load_experiment(str(write_experiment(tmp_path, trials))), importance=False)
    assert analysis.best["trial_id"] == "gpu"
    assert analysis.not_ranked.set_index("trial_id").at["cpu", "reason"] == (
        "memory measured as host_rss, not comparable with cuda_reserved"
    )


def test_importance_is_rebuilt_from_the_table_when_no_study_is_stored(tmp_path: Path) -> None:
    analysis = analyze(load_experiment(str(write_experiment(tmp_path, cluster_trials()))))
    importance = analysis.importance
    assert "rebuilt from the trials table" in importance.source
    assert importance.trials == 4  # the rankable trials with a result
    assert set(importance.values) == {"r", "target_modules", "learning_rate"}  # the searched parameters
    assert sum(importance.values.values()) == pytest.approx(1.0)


def test_a_folder_that_is_not_an_experiment_exits_2_without_traceback(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a qlora-sweep experiment folder (no sweep_spec.yaml)" in err and "Traceback" not in err


def test_bad_budget_values_exit_2_naming_the_value(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path), "--budget-gib", "8", "-3"])
    assert exit_info.value.code == 2
    assert "'-3' is not a positive number of GiB" in capsys.readouterr().err


# --- a real sweep -------------------------------------------------------------------------------


@pytest.mark.integration
def test_report_of_a_real_sweep(recorded_sweep: RecordedSweep, tmp_path: Path, capsys) -> None:
    assert main(["report", str(recorded_sweep.path), "--budget-gib", "1", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {tmp_path}/report.html" in printed
    trials = pd.read_parquet(tmp_path / "trials.parquet")
    assert len(trials) == 4
    for name, dtype in trials.dtypes.items():
        if name in COLUMNS:
            assert str(dtype) == COLUMNS[name].dtype, name
    assert set(trials["status"]) <= {"completed", "early_stopped"}, trials["status"].tolist()
    assert (trials.loc[trials["status"] == "completed", "steps"] == 20).all()
    assert (trials.loc[trials["status"] == "early_stopped", "steps"] < 20).all()
    assert (trials["memory_kind"] == "host_rss").all() and (trials["peak_memory_mib"] > 100).all()
    assert trials["trainable_params"].gt(0).all() and trials["node_id"].notna().all()

    for row in trials.to_dict("records"):
        # The checkpoint column names the kept checkpoint with the lowest eval loss, read here independently.
        results = [json.loads(line) for line in (Path(row["trial_dir"]) / "result.json").read_text().splitlines()]
        kept = [r for r in results if (Path(row["trial_dir"]) / r["checkpoint_dir_name"]).is_dir()]
        expected = min(kept, key=lambda r: r["eval_loss"])
        assert row["checkpoint_path"] == str(Path(row["trial_dir"]) / expected["checkpoint_dir_name"])
        assert row["best_eval_loss"] == pytest.approx(min(r["eval_loss"] for r in results))
        assert (Path(row["checkpoint_path"]) / "adapter_model.safetensors").is_file()

    analysis = analyze(load_experiment(str(recorded_sweep.path)), [1, 2])
    assert analysis.best["trial_id"] == trials.sort_values("best_eval_loss").iloc[0]["trial_id"]
    if (recorded_sweep.path / "optuna.db").exists():
        assert "the sweep's Optuna study" in analysis.importance.source
    assert analysis.importance.values and set(analysis.importance.values) <= {"r", "target_modules", "learning_rate"}
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # quality-memory, curves, heatmap, lr (+ importance)
    assert "Budgets are not meaningful for this run" in html


@pytest.mark.integration
def test_reports_written_while_the_sweep_ran_were_complete_and_marked_partial(recorded_sweep: RecordedSweep) -> None:
    attempts = recorded_sweep.partial_reports
    assert attempts, "the sweep ended before a single partial report was attempted"
    assert [error for _, _, error in attempts if error] == []
    seen_partial = False
    for out, statuses, _ in attempts:
        html = (out / "report.html").read_text()
        assert html.rstrip().endswith("</html>")
        partial = any(s in ("running", "pending", "paused") for s in statuses)
        seen_partial |= partial
        assert ("Partial report: the sweep is still running" in html) == partial, (out, statuses)
    assert seen_partial, [statuses for _, statuses, _ in attempts]  # a report saw trials pending or running


@pytest.mark.integration
def test_compare_two_sweeps_side_by_side(recorded_sweep: RecordedSweep, tmp_path: Path, capsys) -> None:
    # The same sweep "on another base model": a copy whose spec names another model.
    other = tmp_path / "recorded-qwen"
    shutil.copytree(recorded_sweep.path, other, ignore=shutil.ignore_patterns("checkpoint_*", "report"))
    spec = yaml.safe_load((other / "sweep_spec.yaml").read_text())
    spec["model"]["path"] = "builtin:tiny-qwen2"
    (other / "sweep_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    out = tmp_path / "cmp"
    assert main(["compare", str(recorded_sweep.path), str(other), "--out", str(out)]) == 0
    assert f"comparison: {out}/compare.html" in capsys.readouterr().out
    html = (out / "compare.html").read_text()
    md = (out / "compare.md").read_text()
    assert "model.path" in md and "builtin:tiny-qwen2" in md
    assert html.count("data:image/png;base64,") == 1  # one chart, both fronts overlaid (same memory kind)
    both = pd.read_csv(out / "compare.csv")
    assert sorted(both["sweep"].unique()) == ["recorded", "recorded-qwen"]
    assert len(both) == 8


# --- provenance (run_plan.json) and older experiments -----------------------------------------------


def write_run_plan(path: Path, **provenance: Any) -> None:
    """A run_plan.json as preflight writes it (core/run_plan.py), by hand."""
    plan = {
        "format_version": 1,
        "experiment_name": path.name,
        "model": {"path": "builtin:tiny-llama", "model_type": "llama"},
        "memory": {"gpu_gib": None, "predictable": True, "not_modelled": []},
        "provenance": {
            "qlora_sweep": "0.9.1",
            "git_commit": "0123456789abcdef0123456789abcdef01234567",
            "git_dirty": True,
            "python": "3.11.7",
            "platform": "Linux-6.8.0-x86_64-with-glibc2.36",
            "packages": {
                "torch": "2.6.0", "transformers": "4.51.3", "peft": "0.15.2", "bitsandbytes": None, "trl": "0.17.0",
                "accelerate": "1.6.0", "ray": "2.60.0", "optuna": "5.0.0",
            },
            "gpus": [],
            "hostname": "worker-7",
            "created_at": "2026-01-01T12:00:00+0000",
            **provenance,
        },
        "a_key_from_a_newer_version": {"ignored": True},
    }
    (path / "run_plan.json").write_text(json.dumps(plan))


def test_the_report_shows_the_provenance_of_the_run_plan(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, cluster_trials())
    write_run_plan(path, gpus=["NVIDIA H200", "NVIDIA H200", "NVIDIA L4"])
    exp = load_experiment(str(path))
    assert exp.plan.provenance.qlora_sweep == "0.9.1" and exp.plan.model.model_type == "llama"
    outcome = write_report(str(path))
    md = (Path(outcome.report_dir) / "report.md").read_text()
    html = (Path(outcome.report_dir) / "report.html").read_text()
    section = md.split("## Provenance")[1].split("\n## ")[0]
    assert "qlora-sweep: 0.9.1, git commit 0123456789ab (with uncommitted changes)" in section
    assert "Python: 3.11.7 on Linux-6.8.0-x86_64-with-glibc2.36" in section
    assert (
        "packages: torch 2.6.0, transformers 4.51.3, peft 0.15.2, bitsandbytes not installed, trl 0.17.0, "
        "ray 2.60.0, optuna 5.0.0" in section
    )
    assert "GPUs: 2 x NVIDIA H200, NVIDIA L4" in section
    assert "<h2>Provenance</h2>" in html and "git commit 0123456789ab" in html and "2 x NVIDIA H200" in html
    assert not any("run_plan" in note for note in exp.notes)


def test_cpu_trials_say_no_gpus_in_the_provenance(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, [trial("a", evals=[(1.2, True)], memory=640, kind="host_rss")])
    write_run_plan(path, gpus=[], git_commit=None, git_dirty=None)
    md = (Path(write_report(str(path)).report_dir) / "report.md").read_text()
    section = md.split("## Provenance")[1].split("\n## ")[0]
    assert "- qlora-sweep: 0.9.1\n" in section and "git commit" not in section
    assert "GPUs: none (CPU trials)" in section


def test_an_experiment_without_a_run_plan_reports_without_provenance(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, cluster_trials())
    assert not (path / "run_plan.json").exists()
    exp = load_experiment(str(path))
    assert exp.plan.format_version == 0 and exp.plan.provenance.packages == {}
    outcome = write_report(str(path))
    md = (Path(outcome.report_dir) / "report.md").read_text()
    html = (Path(outcome.report_dir) / "report.html").read_text()
    assert "## Provenance" not in md and "<h2>Provenance</h2>" not in html
    assert "best: trial best" in md  # the rest of the report is all there


def test_an_unreadable_run_plan_is_a_note_not_a_failure(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, cluster_trials())
    (path / "run_plan.json").write_text('{"format_version": 1, "provenance": ')  # cut short
    outcome = write_report(str(path))
    md = (Path(outcome.report_dir) / "report.md").read_text()
    assert "## Provenance" not in md
    assert "run_plan.json is unreadable" in md.split("## Notes from loading")[1]


def _edit_saved_space(path: Path, edit: Any) -> None:
    spec = yaml.safe_load((path / "sweep_spec.yaml").read_text())
    edit(spec["space"])
    (path / "sweep_spec.yaml").write_text(yaml.safe_dump(spec))


def test_a_space_saved_before_the_newer_knobs_loads_with_the_registry_defaults(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, cluster_trials())
    _edit_saved_space(path, lambda space: [space.pop(k) for k in ("use_rslora", "use_dora")])
    exp = load_experiment(str(path))
    assert exp.config_columns[:3] == ["r", "lora_alpha", "target_modules"]
    assert {"use_rslora", "use_dora"} <= set(exp.config_columns)
    assert not any("space" in note for note in exp.notes)
    analysis = analyze(exp)
    assert set(analysis.importance.values) == {"r", "target_modules", "learning_rate"}


def test_a_space_this_version_cannot_parse_falls_back_to_every_known_column(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, cluster_trials())
    _edit_saved_space(path, lambda space: space.update(lora_bias=["none", "all"]))  # a knob from another version
    exp = load_experiment(str(path))
    assert any("does not parse with this version" in n and "every known config column" in n for n in exp.notes)
    assert exp.config_columns[:3] == ["r", "lora_alpha", "target_modules"] and "use_dora" in exp.config_columns
    analysis = analyze(exp)
    assert analysis.importance.values == {}
    assert any("no importances" in n for n in analysis.importance.notes)
    md = (Path(write_report(str(path)).report_dir) / "report.md").read_text()
    assert "best: trial best" in md and "## Notes from loading" in md


def test_read_trials_csv_keeps_tune_trial_ids_as_strings(tmp_path: Path) -> None:
    """Tune's trial ids are 8 hex digits; "1e999999" and "12345678" are numbers to a plain read_csv."""
    path = tmp_path / "trials.csv"
    # Ids that all look like numbers (a one-trial sweep has one id): pandas then parses the column.
    path.write_text("trial_id,status,steps,best_eval_loss\n1e999999,completed,10,2.5\n12345678,failed,,\n")
    control = pd.read_csv(path)
    assert control["trial_id"].tolist() == [float("inf"), 12345678.0]  # the control: what CI tripped on (trial_inf)
    trials = read_trials_csv(path)
    assert trials["trial_id"].tolist() == ["1e999999", "12345678"]
    assert str(trials["steps"].dtype) == "Int64" and trials["steps"].isna().tolist() == [False, True]
    assert trials["best_eval_loss"].tolist()[0] == 2.5


def test_report_compare_and_validate_speak_json(recorded_sweep: RecordedSweep, tmp_path: Path) -> None:
    """--json: stdout is exactly one JSON object a script can parse; the human lines go to stderr."""
    import subprocess

    from tests.cli_runs import QLORA_SWEEP

    def cli(*args: str) -> Any:
        done = subprocess.run([QLORA_SWEEP, *args, "--json"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout), done.stderr

    report, human = cli("report", str(recorded_sweep.path), "--out", str(tmp_path / "report"))
    trials = read_trials_csv(tmp_path / "report" / "trials.csv")
    assert report["trials"] == len(trials) and sum(report["statuses"].values()) == len(trials)
    best = trials.loc[trials["best_eval_loss"].idxmin()]
    assert report["best"]["trial_id"] == best["trial_id"]
    assert report["best"]["best_eval_loss"] == pytest.approx(best["best_eval_loss"])
    assert {row["trial_id"] for row in report["pareto_front"]} >= {best["trial_id"]}
    assert report["memory_kind"] in {"host_rss", "cpu_tensor_peak"} and "report.html" in report["files"]
    assert "report:" in human  # the human line, on stderr
    compared, _ = cli("compare", str(recorded_sweep.path), str(recorded_sweep.path), "--out", str(tmp_path / "cmp"))
    assert compared["out_dir"] == str(tmp_path / "cmp") and "compare.html" in compared["files"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(make_spec_dict()))
    validated, _ = cli("validate", str(spec), "--set", "search.num_samples=3")
    assert validated["valid"] is True and validated["overrides"] == ["search.num_samples=3"]
    assert validated["train_rows"] > 0


def test_what_the_process_prints_after_the_json_object_stays_off_stdout(recorded_sweep: RecordedSweep, tmp_path: Path) -> None:
    """Ray's threads and exit handlers can print after the command is done (a joined cluster's
    error lines did, in the node-loss test): with --json those lines must not follow the object."""
    import subprocess
    import sys

    late = "import atexit, os, sys; atexit.register(os.write, 1, b'printed at exit\\n'); "
    code = late + "from sweeps.cli import main; sys.argv = ['qlora-sweep', *sys.argv[1:]]; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, "report", str(recorded_sweep.path), "--out", str(tmp_path / "r"), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["trials"] > 0  # one object and nothing after it
    assert "printed at exit" in done.stderr


def test_a_task_objective_ranks_the_best_trial_budgets_front_recommendation_and_export(tmp_path: Path) -> None:
    """search.metric exact_match (higher is better): the trial with the lowest eval loss is not the
    one that gets most answers right, and everything the report ranks follows exact match."""
    from analysis.export import choose_trial
    from analysis.results import load_experiment
    from analysis.summary import analyze

    path = write_experiment(tmp_path, [
        trial("lowloss", evals=[(0.5, True), (0.3, True)], exact_match=(0.2, 0.4), memory=6000.0),
        trial("rightbig", r=16, evals=[(0.9, True), (0.8, True)], exact_match=(0.5, 0.9), memory=9000.0),
        trial("closecheap", targets="all-linear", evals=[(0.9, True), (0.85, True)], exact_match=(0.6, 0.895),
              memory=7000.0),
    ], eval={"metrics": ["exact_match"]}, search={"metric": "exact_match"})
    exp = load_experiment(str(path))
    a = analyze(exp, budgets_gib=(6, 8, 16), importance=False)
    assert a.quality.column == "best_exact_match" and a.quality.better == "higher"
    assert a.best["trial_id"] == "rightbig"  # lowloss has the lowest loss
    assert a.cheapest["trial_id"] == "closecheap"  # 0.895 is within 1% of 0.9, with less memory
    assert a.budgets["trial_id"].tolist() == ["lowloss", "closecheap", "rightbig"]
    assert set(a.ranked.loc[a.ranked["on_front"], "trial_id"]) == {"lowloss", "closecheap", "rightbig"}
    assert a.recommended["trial_id"] == "rightbig"
    assert any(line.startswith("best: trial rightbig exact_match 0.9 (higher is better)") for line in a.summary), a.summary
    assert a.json_summary()["quality"] == "best_exact_match"
    assert choose_trial(exp, "best")["trial_id"] == "rightbig"
    # Control: the same trials ranked by eval loss pick the other trial.
    by_loss = write_experiment(tmp_path, [
        trial("lowloss", evals=[(0.5, True), (0.3, True)], exact_match=(0.2, 0.4), memory=6000.0),
        trial("rightbig", r=16, evals=[(0.9, True), (0.8, True)], exact_match=(0.5, 0.9), memory=9000.0),
    ], name="by-loss", eval={"metrics": ["exact_match"]})
    assert analyze(load_experiment(str(by_loss)), importance=False).best["trial_id"] == "lowloss"
