"""`qlora-sweep export`: the adapter as PeftModel.from_pretrained loads it, and the merged model, with real losses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sweeps.cli import main
from tests.conftest import RecordedSweep
from tests.test_report import cluster_trials, write_experiment

TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
                  "qlora_sweep_state.json")


def sweep_eval_split(experiment: Path):
    """The sweep's spec and eval split, re-created here the way preflight made them."""
    from sweeps.spec import parse_spec
    from trainables.data import prepare_data
    from trainables.tiny_models import materialize
    from trainables.training_setup import load_tokenizer

    spec = parse_spec(yaml.safe_load((experiment / "sweep_spec.yaml").read_text()))
    tokenizer = load_tokenizer(materialize(spec.model.path), spec.model)
    return spec, prepare_data(spec.resolve_path(spec.data.path), spec.data, tokenizer).eval


@pytest.mark.integration
def test_exported_adapter_loads_with_peft_and_reproduces_the_sweeps_eval_loss(
    recorded_sweep: RecordedSweep, tmp_path: Path, capsys
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from analysis.export import evaluate_loss
    from trainables.tiny_models import materialize
    from trainables.training_setup import TrainingSetup

    out = tmp_path / "adapter"
    assert main(["export", str(recorded_sweep.path), "--out", str(out)]) == 0
    info = json.loads((out / "export.json").read_text())
    assert f"exported trial {info['trial_id']}" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "export.json"} <= names
    assert not names & set(TRAINING_STATE), names & set(TRAINING_STATE)
    trials = load_trials(recorded_sweep.path)
    best = min(trials, key=lambda t: t["best_eval_loss"])
    assert info["trial_id"] == best["trial_id"] and info["checkpoint"] == best["checkpoint_path"]

    spec, eval_rows = sweep_eval_split(recorded_sweep.path)
    setup = TrainingSetup.resolve(spec.model, spec.train, "cpu")
    base = setup.load_model(materialize(spec.model.path), spec.model, for_training=False)  # + the CPU workaround
    model = PeftModel.from_pretrained(base, str(out))
    loss = evaluate_loss(model, AutoTokenizer.from_pretrained(str(out)), eval_rows, setup, spec.data, int(best["batch_size"]))
    # The same model, data and evaluation as the sweep: on CPU the recorded number comes back exactly.
    assert loss == pytest.approx(best["best_eval_loss"], rel=1e-5, abs=1e-7)
    readme = (out / "README.md").read_text()
    assert f"trial {best['trial_id']}" in readme and "builtin:tiny-llama" in readme
    assert "PeftModel.from_pretrained" in readme


@pytest.mark.integration
def test_merged_model_matches_the_unmerged_adapter_within_the_stated_tolerance(
    recorded_sweep: RecordedSweep, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    trials = load_trials(recorded_sweep.path)
    chosen = max(trials, key=lambda t: t["best_eval_loss"])  # any trial by id, not just the best
    out = tmp_path / "merged-export"
    assert main(["export", str(recorded_sweep.path), "--trial", chosen["trial_id"], "--merge", "--out", str(out)]) == 0
    info = json.loads((out / "export.json").read_text())
    losses = info["losses"]
    assert info["trial_id"] == chosen["trial_id"] and info["merge_dtype"] == "float32"
    assert info["merge_check_passed"] is True
    assert abs(losses["merged"] - losses["adapter_16bit"]) <= info["merge_tolerance_rel"] * losses["adapter_16bit"]
    assert info["merge_tolerance_rel"] == 1e-4
    # The 4-bit path is the model the sweep measured; the 16-bit base is a different model (the quantization gap).
    assert losses["adapter_4bit"] == pytest.approx(losses["recorded"], rel=1e-5)
    assert losses["recorded"] == pytest.approx(chosen["best_eval_loss"])
    assert losses["adapter_16bit"] != losses["adapter_4bit"]

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert getattr(merged.config, "quantization_config", None) is None
    readme = (out / "README.md").read_text()
    assert f"| merged | {losses['merged']:.6f} |" in readme and f"| adapter_4bit | {losses['adapter_4bit']:.6f} |" in readme
    assert "tolerance 0.0001 x adapter_16bit" in readme and "**passed**" in readme
    assert "quantization gap" in readme and "float32: this export ran on CPU" in readme


def load_trials(experiment: Path) -> list[dict]:
    from analysis.results import load_experiment

    return load_experiment(str(experiment)).trials.to_dict("records")


def test_unknown_trial_lists_the_trials_that_can_be_exported(tmp_path: Path, capsys) -> None:
    path = write_experiment(tmp_path, cluster_trials())
    assert main(["export", str(path), "--trial", "nosuchid", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --trial nosuchid: no such trial in ")
    assert "best (completed, eval_loss 1.1000), cheap (completed, eval_loss 1.1050)" in err
    assert "queued" not in err  # no checkpoint, not offered
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_trial_without_checkpoint_and_a_foreign_out_folder_are_refused(tmp_path: Path, capsys) -> None:
    path = write_experiment(tmp_path, cluster_trials())
    assert main(["export", str(path), "--trial", "queued", "--out", str(tmp_path / "out")]) == 2
    assert "--trial queued: this trial (pending) has no kept checkpoint (it never reached an evaluation)" in (
        capsys.readouterr().err
    )
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not an export")
    assert main(["export", str(path), "--out", str(foreign)]) == 2
    assert "folder is not empty and holds no earlier export" in capsys.readouterr().err
    assert (foreign / "holiday.jpg").read_bytes() == b"not an export"


@pytest.mark.integration
def test_the_readme_is_a_model_card_and_a_push_offline_says_the_export_is_complete(
    recorded_sweep: RecordedSweep, tmp_path: Path
) -> None:
    """The card is read back with huggingface_hub itself; the push goes as far as the network call,
    which HF_HUB_OFFLINE=1 (set for the whole suite) stops with a clear error and exit status 1."""
    import subprocess

    from huggingface_hub import ModelCard

    from tests.cli_runs import QLORA_SWEEP

    out = tmp_path / "adapter"
    done = subprocess.run(
        [QLORA_SWEEP, "export", str(recorded_sweep.path), "--out", str(out), "--push-to-hub", "my-org/tiny-qlora"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "HF_HUB_OFFLINE=1 is set, so nothing was pushed" in done.stderr and "Traceback" not in done.stderr
    assert f"The export is complete in {out}" in done.stderr and "hf upload my-org/tiny-qlora" in done.stderr
    card = ModelCard.load(out / "README.md")
    info = json.loads((out / "export.json").read_text())
    assert card.data.library_name == "peft" and {"qlora", "qlora-sweep", "nf4"} <= set(card.data.tags)
    assert card.data.base_model is None  # builtin:tiny-llama is not a hub id
    (result,) = card.data.eval_results
    assert (result.metric_name, result.metric_value) == ("eval_loss", pytest.approx(info["best_eval_loss"]))
    assert "## Chosen by qlora-sweep" in card.text and f"number 1 of" in card.text
    assert all(f"`{k}={v}`" in card.text for k, v in info["config"].items())
    assert "measured as host RAM" in card.text and "PeftModel.from_pretrained" in card.text
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "README.md", "export.json"}


def test_a_malformed_hub_repo_id_is_refused_before_anything_is_exported(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    assert main(["export", str(tmp_path), "--out", str(out), "--push-to-hub", "not a repo"]) == 2
    assert "--push-to-hub 'not a repo'" in capsys.readouterr().err and not out.exists()
