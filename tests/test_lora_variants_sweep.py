"""use_rslora and use_dora, the two knobs added through the registry alone, are searched by a real
sweep of the builtin tiny model: Optuna proposes both values, peft builds what was proposed, and
the trials table, the run plan and importance see them."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.results import read_trials_csv
from sweeps.driver import run_sweep
from sweeps.spec import parse_spec
from tests.conftest import make_spec_dict, wait_for_no_ray_processes

pytestmark = pytest.mark.integration


def test_a_sweep_searches_rslora_and_dora(tmp_path: Path) -> None:
    spec = parse_spec(
        make_spec_dict(
            space={
                "r": 8,
                "lora_alpha": 16,
                "target_modules": "all-linear",
                "learning_rate": 3e-3,
                "use_rslora": [False, True],
                "use_dora": [False, True],
            },
            # A grid-like budget: 4 random proposals over 2 x 2 values; skip_repeats answers repeats.
            search={"num_samples": 4, "max_concurrent": 2, "sampler": "random", "seed": 3, "skip_repeats": False},
            train={"max_steps": 4, "eval_every": 2, "batch_size": 4},
        )
    )
    lines: list[str] = []
    outcome = run_sweep(spec, storage_override=str(tmp_path), name="variants", log=lines.append)
    assert outcome.num_errors == 0, "\n".join(lines)
    assert not wait_for_no_ray_processes(), "Ray processes left behind"

    trials = read_trials_csv(Path(outcome.report_dir) / "trials.csv")
    assert len(trials) == 4 and set(trials["status"]) == {"completed"}, trials[["status", "error"]]
    assert trials["use_dora"].nunique() == 2 and trials["use_rslora"].nunique() == 2, trials[["use_rslora", "use_dora"]]
    # DoRA trains a magnitude vector per adapted layer on top of LoRA's A and B, so it has more
    # trainable parameters; rsLoRA changes only the scale, not the parameters.
    params = trials.groupby("use_dora")["trainable_params"].agg(["min", "max"])
    assert params.loc[True, "min"] > params.loc[False, "max"]
    assert trials.groupby("use_rslora")["trainable_params"].nunique().max() <= 2
    # The predictions count DoRA's magnitude vectors too, and what is not modelled is said.
    # (In MiB to 0.1, as predicted_memory_mib is, the tiny model's magnitude vectors vanish beside
    # trl's 15 MiB LM-head tile; the CPU prediction is kept to 0.0001 MiB.)
    predicted = trials.groupby("use_dora")["predicted_memory_mib"].min()
    assert predicted[True] >= predicted[False]
    fine = trials.groupby("use_dora")["predicted_tensor_peak_mib"].min()
    assert fine[True] > fine[False]
    assert any("DoRA" in line and "not modelled" in line for line in lines), lines
    assert "DoRA" in (Path(outcome.report_dir) / "report.md").read_text()
