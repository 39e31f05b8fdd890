"""Models and data as users name them (issue 12): hub ids with dots, an offline hub cache, revision
pinning, chat templates, long conversations, GSM8K.

No test here needs a network. Models are tiny, of real architectures, with real-style tokenizers
(tests/tiny_hub.py), placed in a temporary HF_HOME hub cache under real-looking ids; with
HF_HUB_OFFLINE=1 transformers resolves them with its own loading code, on the driver and on every
trial worker (HF_HOME and HF_HUB_OFFLINE are forwarded, sweeps/driver.py FORWARDED_ENV). The
datasets library does not read a bare hub cache offline, so dataset ids are tested for how they
are classified and what is said when they cannot be loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis.results import read_trials_csv
from core.hub import is_hub_id, is_local_path
from sweeps.spec import load_spec, parse_spec, with_sections
from tests import tiny_hub
from tests.cli_runs import private_ray_tmp, processes_of, run_cli
from tests.conftest import REPO, write_spec

MODEL_ID = "Org/Model-3.1-8B"
GSM8K_SPEC = REPO / "sweeps" / "examples" / "gsm8k.yaml"


# --- hub ids and local paths ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "meta-llama/Llama-3.1-8B",
        "Qwen/Qwen2.5-7B-Instruct",
        "mistralai/Mistral-7B-v0.3",
        "microsoft/Phi-3.5-mini-instruct",
        "openai/gsm8k",
        "HuggingFaceH4/ultrachat_200k",
        "Org/chat-logs-v1.5",
        "yahma/alpaca-cleaned",
    ],
)
def test_namespace_name_with_dots_dashes_and_underscores_is_a_hub_id(tmp_path: Path, value: str) -> None:
    assert is_hub_id(value, tmp_path)
    spec = parse_spec({"name": "x", "model": {"path": value}, "data": {"path": value}}, base_dir=tmp_path)
    assert spec.resolve_path(value) == value and spec.is_hub_id(value)


@pytest.mark.parametrize(
    "value",
    ["./models/llama", "../shared/Llama-3.1-8B", "/models/Llama-3.1-8B", "~/models/llama", "data/rows.jsonl",
     "Org/rows.parquet", "rows.csv", "gpt2", "a/b/c", ".", "Org/..", "-x/y"],
)
def test_local_paths_are_told_apart_from_hub_ids(tmp_path: Path, value: str) -> None:
    assert is_local_path(value, tmp_path)
    spec = parse_spec({"name": "x", "model": {"path": "builtin:tiny-llama"}, "data": {"path": value}}, base_dir=tmp_path)
    assert not spec.is_hub_id(value)
    resolved = spec.resolve_path(value)
    assert Path(resolved).is_absolute()


def test_an_existing_folder_that_looks_like_an_id_is_local(tmp_path: Path) -> None:
    (tmp_path / "Org" / "Model-3.1-8B").mkdir(parents=True)
    spec = parse_spec({"name": "x", "model": {"path": MODEL_ID}, "data": {"path": "d.jsonl"}}, base_dir=tmp_path)
    assert not spec.is_hub_id(MODEL_ID) and spec.resolve_path(MODEL_ID) == str(tmp_path / "Org" / "Model-3.1-8B")


def test_the_shipped_llama3_example_names_hub_ids() -> None:
    spec = load_spec(REPO / "sweeps" / "examples" / "llama3-8b-24gb.yaml")
    assert spec.resolve_path(spec.model.path) == "meta-llama/Llama-3.1-8B" and spec.is_hub_id(spec.model.path)
    assert spec.resolve_path(spec.data.path) == "yahma/alpaca-cleaned"


# --- validate: what is said about hub ids ----------------------------------------------------------


def validate(spec_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "validate", *args, str(spec_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


def chat_spec(tmp_path: Path, data: dict, model: dict | None = None, **sections) -> Path:
    raw = {
        "name": "chat",
        "model": model or {"path": "builtin:tiny-llama"},
        "data": {"format": "chat", "max_seq_length": 512, "eval_size": 4, **data},
        "storage": str(tmp_path / "results"),
        **sections,
    }
    return write_spec(tmp_path / "spec.yaml", raw)


def test_validate_offline_lists_a_dataset_id_with_dots_as_a_hub_dataset_it_did_not_check(tmp_path: Path) -> None:
    result = validate(chat_spec(tmp_path, {"path": "Org/chat-logs-v1.5", "eval_path": "Org/chat-evals-v2.0", "eval_size": None}), "--offline")
    assert result.returncode == 0, result.stderr
    assert "not checked (--offline): rows of hub dataset 'Org/chat-logs-v1.5'" in result.stdout
    assert "not checked (--offline): rows of hub dataset 'Org/chat-evals-v2.0'" in result.stdout
    assert "file not found" not in result.stdout + result.stderr


def test_an_unreachable_hub_dataset_gets_the_hub_error_never_file_not_found(tmp_path: Path) -> None:
    spec = chat_spec(tmp_path, {"path": "Org/chat-logs-v1.5", "name": "default", "split": "train[:2000]"})
    result = validate(spec, HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        "data: 'Org/chat-logs-v1.5' is a hub dataset id and could not be loaded (config 'default', split 'train[:2000]')"
        in result.stderr
    )
    assert "HF_HUB_OFFLINE=1 is set" in result.stderr and "HF_TOKEN" in result.stderr
    assert "file not found" not in result.stderr


def test_an_unreachable_hub_model_says_it_is_a_hub_id_and_what_to_check(tmp_path: Path) -> None:
    spec = chat_spec(tmp_path, {"path": str(tmp_path / "d.jsonl")}, model={"path": "Org/Missing-3.1-8B", "revision": "v2"})
    tiny_hub.write_jsonl(tmp_path / "d.jsonl", tiny_hub.chat_log_rows(10))
    result = validate(spec, HF_HOME=str(tmp_path / "hf"), HF_TOKEN="")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "model.path: cannot read the model config of 'Org/Missing-3.1-8B' at revision 'v2', a hub model id" in result.stderr
    assert "HF_HUB_OFFLINE=1 is set, so only the local hub cache" in result.stderr
    assert "a gated or private model needs HF_TOKEN" in result.stderr
    assert "examples/Org" not in result.stderr and "file not found" not in result.stderr


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An HF_HOME with tiny models under real-looking ids.

    `Org/Model-3.1-8B`: refs/main points to a 2-layer snapshot that has a config but no weights
    (as if its download had stopped), and a second commit holds a complete 1-layer model: only a
    run that honours `revision` everywhere can train. `Qwen/Qwen2.5-1.5B` (the GSM8K example's
    model): a qwen2-architecture model with a ChatML tokenizer at refs/main.
    """
    home = tmp_path_factory.mktemp("hf-home")
    main, main_snapshot, _ = tiny_hub.place_model(home, MODEL_ID, style="llama3", layers=2)
    (main_snapshot / "model.safetensors").unlink()
    pinned, _, pinned_params = tiny_hub.place_model(home, MODEL_ID, style="llama3", layers=1, ref=None)
    tiny_hub.place_model(home, "Qwen/Qwen2.5-1.5B", style="chatml", architecture="qwen2", layers=2)
    return {"home": home, "main": main, "pinned": pinned, "pinned_params": pinned_params}


def chat_rows_with_a_long_one(n: int = 40) -> list:
    rows = tiny_hub.chat_log_rows(n)
    rows.insert(n // 2, tiny_hub.long_chat_row())  # row n/2 + 1
    return rows


def test_validate_refuses_one_over_long_conversation_and_names_it(tmp_path: Path, hub_cache: dict) -> None:
    data = tiny_hub.write_jsonl(tmp_path / "logs.jsonl", chat_rows_with_a_long_one())
    spec = chat_spec(tmp_path, {"path": str(data)}, model={"path": MODEL_ID, "revision": hub_cache["pinned"]})
    result = validate(spec, HF_HOME=str(hub_cache["home"]))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "logs.jsonl row 21:" in result.stderr and "exceeds data.max_seq_length (512)" in result.stderr
    assert "1 problem in the sweep spec" in result.stderr

    truncating = chat_spec(tmp_path, {"path": str(data), "on_long_rows": "truncate"}, model={"path": MODEL_ID, "revision": hub_cache["pinned"]})
    result = validate(truncating, HF_HOME=str(hub_cache["home"]))
    assert result.returncode == 0, result.stderr
    assert f"preflight ok: model {MODEL_ID} (llama), 37 train / 4 eval rows, 1 long rows will be truncated" in result.stdout


# --- end to end, from the offline hub cache ----------------------------------------------------------

QUICK = {
    "search": {"num_samples": 2, "max_concurrent": 2, "seed": 0},
    "scheduler": {"asha": None},
    "train": {"max_steps": 10, "eval_every": 5, "batch_size": 4},
    "resources": {"gpus_per_trial": 0, "cpus_per_trial": 1},
}


@pytest.mark.integration
def test_a_sweep_trains_a_hub_id_with_dots_from_the_offline_cache_at_a_pinned_revision(
    tmp_path: Path, hub_cache: dict
) -> None:
    data = tiny_hub.write_jsonl(tmp_path / "logs.jsonl", chat_rows_with_a_long_one())
    spec = chat_spec(
        tmp_path,
        {"path": str(data), "on_long_rows": "truncate"},
        model={"path": MODEL_ID, "revision": hub_cache["pinned"]},
        space={"r": [4, 8], "lora_alpha": 16, "target_modules": "all-linear", "learning_rate": 3e-3, "lora_dropout": 0.0},
        **QUICK,
    )
    with private_ray_tmp() as ray_tmp:
        run = run_cli(["run", str(spec), "--name", "hub"], ray_tmp, HF_HOME=str(hub_cache["home"]), HF_HUB_OFFLINE="1")
        assert run.returncode == 0, run.output[-4000:]
        assert processes_of(ray_tmp) == [], "Ray processes left behind"
    assert "Traceback" not in run.output
    assert "data: 37 train / 4 eval rows, 1 long rows truncated" in run.stdout
    experiment = tmp_path / "results" / "hub"
    trials = read_trials_csv(experiment / "report" / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}, trials[["status"]]

    # The pinned snapshot everywhere: the driver read its config (1 layer; main has 2), and the
    # workers loaded its weights (main has none, so an unpinned load could not have trained).
    plan = json.loads((experiment / "run_plan.json").read_text())
    assert plan["model"]["path"] == MODEL_ID and plan["model"]["resolved_path"] == MODEL_ID
    assert plan["model"]["revision"] == hub_cache["pinned"] and plan["model"]["num_layers"] == 1
    saved = yaml.safe_load((experiment / "sweep_spec.yaml").read_text())
    assert saved["model"]["path"] == MODEL_ID

    report = json.loads((experiment / "data_report.json").read_text())
    assert report["truncated_rows"] == 1 and report["truncated"][0].startswith("logs.jsonl row 21: ")
    assert report["on_long_rows"] == "truncate" and report["train_rows"] + report["eval_rows"] == 41
    summary = (experiment / "report" / "report.md").read_text()
    assert "1 rows longer than data.max_seq_length (512) were truncated" in summary
    assert "## Long rows truncated" in summary and "logs.jsonl row 21" in summary


# --- GSM8K, out of the box ------------------------------------------------------------------------------


def gsm8k_file(tmp_path: Path, *, malformed: bool) -> Path:
    """300 GSM8K-shaped rows: row 150 has a worked answer far longer than max_seq_length (384),
    and (if `malformed`) row 7 has no answer."""
    rows = tiny_hub.gsm8k_rows(300)
    rows[149]["answer"] = "Let us count one by one. " + " ".join(f"step {i}: add 1." for i in range(400)) + "\n#### 400"
    if malformed:
        rows[6] = {"question": rows[6]["question"]}
    return tiny_hub.write_jsonl(tmp_path / "gsm8k-shaped.jsonl", rows)


def gsm8k_spec(tmp_path: Path, data_file: Path, data: dict | None = None, **sections) -> Path:
    """sweeps/examples/gsm8k.yaml with data.path pointed at `data_file` (and `sections` merged in)."""
    raw = yaml.safe_load(GSM8K_SPEC.read_text())
    return write_spec(tmp_path / "gsm8k.yaml", with_sections(raw, data={"path": str(data_file), **(data or {})}, **sections))


def test_the_gsm8k_example_passes_validate_offline() -> None:
    spec = load_spec(GSM8K_SPEC)
    assert spec.is_hub_id(spec.data.path) and spec.data.name == "main" and spec.is_hub_id(spec.model.path)
    result = validate(GSM8K_SPEC, "--offline")
    assert result.returncode == 0, result.stderr
    assert "not checked (--offline): rows of hub dataset 'openai/gsm8k'" in result.stdout


def test_the_gsm8k_example_on_gsm8k_shaped_rows_names_the_bad_row(tmp_path: Path, hub_cache: dict) -> None:
    # The same spec, only data.path changed: the malformed row stops it; the long one would be cut.
    result = validate(gsm8k_spec(tmp_path, gsm8k_file(tmp_path, malformed=True)), HF_HOME=str(hub_cache["home"]))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "gsm8k-shaped.jsonl row 7: missing field 'answer' (format 'instruction' needs question, answer" in result.stderr
    assert "1 problem in the sweep spec" in result.stderr
    good = validate(gsm8k_spec(tmp_path, gsm8k_file(tmp_path, malformed=False)), HF_HOME=str(hub_cache["home"]))
    assert good.returncode == 0, good.stderr
    assert "preflight ok: model Qwen/Qwen2.5-1.5B (qwen2), 100 train / 200 eval rows, 1 long rows will be truncated" in good.stdout


@pytest.mark.integration
def test_the_gsm8k_example_trains_on_gsm8k_shaped_rows(tmp_path: Path, hub_cache: dict) -> None:
    spec = gsm8k_spec(
        tmp_path,
        gsm8k_file(tmp_path, malformed=True),
        data={"on_bad_rows": "skip", "eval_size": 20},
        space={"r": 8, "lora_alpha": 16, "target_modules": ["qv", "all-linear"], "learning_rate": 3e-3},
        storage=str(tmp_path / "results"),
        scheduler={"asha": None},
        **{k: v for k, v in QUICK.items() if k != "scheduler"},
    )
    with private_ray_tmp() as ray_tmp:
        run = run_cli(["run", str(spec), "--name", "gsm8k"], ray_tmp, HF_HOME=str(hub_cache["home"]), HF_HUB_OFFLINE="1")
        assert run.returncode == 0, run.output[-4000:]
        assert processes_of(ray_tmp) == [], "Ray processes left behind"
    assert "data: 279 train / 20 eval rows, 1 bad rows skipped, 1 long rows truncated" in run.stdout
    experiment = tmp_path / "results" / "gsm8k"
    report = json.loads((experiment / "data_report.json").read_text())
    assert report["skipped_rows"] == 1 and report["truncated_rows"] == 1
    assert report["truncated"][0].startswith("gsm8k-shaped.jsonl row 150: ")
    trials = read_trials_csv(experiment / "report" / "trials.csv")
    assert set(trials["status"]) == {"completed"} and (trials["best_eval_loss"] > 0).all()


# --- the loss mask, as the trainer's batches carry it ----------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_prompt_tokens_carry_no_loss_in_the_collated_batch(tmp_path: Path, style: str) -> None:
    """The trainer the trainable builds (same TrainingSetup, same datasets, same SFTConfig) collates
    batches whose labels are -100 on every system and user token and on the padding, and equal the
    token ids on the assistant turns (each with its end-of-turn token)."""
    from trl import SFTTrainer

    from tests.conftest import TRIAL_CONFIG
    from trainables.data import prepare_data, trained_as_prepared
    from trainables.params import TrialConfig
    from trainables.settings import DataSpec, ModelSpec, TrainSpec
    from trainables.training_setup import TrainingSetup, load_tokenizer

    folder = tmp_path / "model"
    tiny_hub.save_tiny_model(folder, tiny_hub.make_tokenizer(style))
    model_spec, train = ModelSpec(path=str(folder)), TrainSpec(max_steps=10, eval_every=5, batch_size=4)
    tokenizer = load_tokenizer(str(folder), model_spec)
    rows = tiny_hub.write_jsonl(tmp_path / "logs.jsonl", tiny_hub.chat_log_rows(24))
    data_spec = DataSpec(path=str(rows), format="chat", max_seq_length=512, eval_size=4)
    data = prepare_data(str(rows), data_spec, tokenizer).for_trials()
    setup = TrainingSetup.resolve(model_spec, train, "cpu")
    trial = TrialConfig.from_tune({**TRIAL_CONFIG, "batch_size": 4}, train.batch_size)
    train_set, eval_set = data.datasets()
    trainer = SFTTrainer(
        model=setup.load_model(str(folder), model_spec),
        args=setup.sft_config(trial, train, data_spec, str(tmp_path / "out"), 1, **trained_as_prepared(data)),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=setup.lora_config(trial, "llama"),
    )
    by_ids = {tuple(data.train_tokens.row(i)[0]): i for i in range(data.train_rows)}
    end = tiny_hub.STYLES[style]["end_of_turn"]
    seen = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(attention.sum())
            i = by_ids[tuple(ids[:n].tolist())]
            assert labels[:n].tolist() == data.train_tokens.labels(i) and (labels[n:] == -100).all()
            trained = tokenizer.decode([int(t) for t, lab in zip(ids[:n], labels[:n]) if lab != -100])
            untrained = tokenizer.decode([int(t) for t, lab in zip(ids[:n], labels[:n]) if lab == -100])
            # One end-of-turn trained per assistant turn, whose header stays in the prompt.
            header = {"chatml": "<|im_start|>assistant", "llama3": "<|start_header_id|>assistant"}[style]
            assert trained.count(end) == untrained.count(header) >= 1 and header not in trained
            for prompt_text in ("You are Acme", "can you check?", "how do I reverse", "what's 17 *", "Bonjour"):
                assert prompt_text not in trained
            seen += 1
    assert seen == data.train_rows
