"""Export a trial's adapter for deployment, optionally merged into a standalone model, with a loss check.

`qlora-sweep export EXPERIMENT_DIR [--trial best|ID] [--merge] --out DIR`:

* DIR/ gets the trial's best kept checkpoint without the training state (optimizer, scheduler,
  RNG, trainer state): adapter_config.json, adapter_model.safetensors and the tokenizer files,
  the save_pretrained layout that `PeftModel.from_pretrained(base, DIR)` loads; plus README.md
  (trial, config, base model, how to load it, the losses) and export.json (the same, for tools).
* With --merge, DIR/merged/ gets a standalone model: the base loaded *unquantized* (bfloat16 or
  float16 on a GPU, float32 on CPU where 16-bit matmuls are slow and gain nothing), the adapter
  applied and folded in with `merge_and_unload()`. Merging into 4-bit weights would requantize
  them, so deployments merge into the unquantized base.

The loss check (with --merge) evaluates on the sweep's eval split, re-created with
trainables.data.prepare_data from the saved spec (same file, same data.seed), with trl's
SFTTrainer.evaluate and the sweep's settings (the models, the tokenizer and the SFTConfig's precision
all come from trainables.training_setup.TrainingSetup, as in the trainable), so every number is the
sweep's own eval_loss:

    adapter_4bit    base quantized as in the sweep (e.g. NF4) + adapter, unmerged. This is the
                    model the sweep trained and measured; it should reproduce the sweep's recorded
                    eval_loss for this checkpoint.
    adapter_16bit   unquantized base + adapter, unmerged: the reference for the merge.
    merged          DIR/merged/ reloaded from disk. Must equal adapter_16bit within the tolerance
                    (MERGE_RTOL), or the export fails: merging is exact algebra (W + s*B@A), so only
                    floating-point rounding separates the two.

adapter_16bit - adapter_4bit is the quantization gap: the adapter was trained to work with the
4-bit weights, and the unquantized base differs from them by the quantization error, so the
merged model's loss differs from what the sweep measured by about that much (either sign).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pandas as pd
import yaml

from analysis.pareto import LOSS, QUALITY, Quality, best_trial, rankable
from analysis.results import AnalysisInputError, Experiment, load_experiment
from analysis.saved_spec import trial_settings
from core import experiment_folder, storage
from core.redact import redact
from trainables.qlora import STATE_FILE
from trainables.settings import DataSpec
from trainables.training_setup import TrainingSetup, load_tokenizer
from trainables.workarounds import remove_printer_callback

# The training state Tune's checkpoints carry for resuming; a deployment needs none of it.
TRAINING_STATE_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
    STATE_FILE,
    "README.md",  # peft's generic model card (checkpoints now skip it); replaced by ours
)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Relative tolerance between the merged model's and the unmerged 16-bit model's eval loss.
MERGE_RTOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
EXPORT_INFO = "export.json"


@dataclass
class ExportOutcome:
    """What `export_trial` wrote and measured."""

    out_dir: str
    trial_id: str
    checkpoint: str
    files: list[str]
    merged_dir: str | None = None
    losses: dict[str, float] = field(default_factory=dict)
    merge_dtype: str | None = None
    tolerance: float | None = None
    check_passed: bool | None = None
    pushed_url: str | None = None  # the Hub commit, with --push-to-hub
    # eval.metrics measured again on the exported adapter, and what the sweep recorded at its checkpoint
    # (NaN where that round had no task evaluation).
    task_metrics: dict[str, float] = field(default_factory=dict)
    task_recorded: dict[str, float] = field(default_factory=dict)

    @property
    def merge_difference(self) -> float | None:
        if "merged" not in self.losses or "adapter_16bit" not in self.losses:
            return None
        return abs(self.losses["merged"] - self.losses["adapter_16bit"])


def choose_trial(exp: Experiment, trial: str) -> pd.Series:
    """The trial to export: "best" (the best by the sweep's objective in its direction, with a kept
    checkpoint) or an id.

    Raises:
        AnalysisInputError: Unknown id, or a trial without a checkpoint; the message lists the
            trial ids that can be exported.
    """
    trials = exp.trials
    quality = Quality.of(exp.saved_spec)
    exportable = trials[trials["checkpoint_path"].notna()]
    listing = ", ".join(
        f"{r['trial_id']} ({r['status']}, eval_loss {r[QUALITY]:.4f})"
        for r in exportable.sort_values(QUALITY).to_dict("records")
    ) or "none"
    if trial == "best":
        best = best_trial(rankable(exportable, quality=quality), quality) if not exportable.empty else None
        if best is None:
            best = best_trial(exportable, quality) if not exportable.empty else None
        if best is None and quality != LOSS:  # no trial measured the objective yet: by eval loss
            best = best_trial(exportable) if not exportable.empty else None
        if best is None:
            raise AnalysisInputError(
                f"--trial best: no trial of {exp.path} has a kept checkpoint yet. Trials save one at every "
                "evaluation when train.checkpoint is true (the default); wait for the first evaluation, "
                "or rerun the sweep with train.checkpoint: true"
            )
        return best
    match = trials[trials["trial_id"] == trial]
    if match.empty:
        raise AnalysisInputError(
            f"--trial {trial}: no such trial in {exp.path}. Trials with a checkpoint to export: {listing}; "
            "or pass --trial best"
        )
    row = match.iloc[0]
    if pd.isna(row["checkpoint_path"]):
        raise AnalysisInputError(
            f"--trial {trial}: this trial ({row['status']}) has no kept checkpoint "
            f"({'it never reached an evaluation' if pd.isna(row[QUALITY]) else 'checkpointing was off or its checkpoints were removed'}). "
            f"Trials with a checkpoint: {listing}"
        )
    return row


def _check_out_dir(out_dir: str) -> Path:
    if storage.is_uri(out_dir):
        raise AnalysisInputError(f"--out {out_dir}: export writes to a local folder; copy it to the bucket afterwards")
    path = Path(out_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise AnalysisInputError(f"--out {out_dir}: exists and is not a folder; choose a new folder")
    if path.is_dir() and any(path.iterdir()) and not (path / EXPORT_INFO).exists():
        raise AnalysisInputError(
            f"--out {out_dir}: folder is not empty and holds no earlier export; choose a new or empty folder "
            "(an earlier export's folder is overwritten)"
        )
    return path


def copy_adapter(checkpoint: str, out: Path) -> list[str]:
    """Copy a checkpoint's adapter and tokenizer files (not its training state) into `out`.

    Raises:
        AnalysisInputError: If the checkpoint holds no adapter.
    """
    names = storage.list_files(checkpoint)
    if "adapter_config.json" not in names or not any(w in names for w in ADAPTER_WEIGHTS):
        raise AnalysisInputError(
            f"{checkpoint} holds no PEFT adapter (adapter_config.json + adapter_model.safetensors); "
            f"found: {', '.join(names) or 'nothing'}"
        )
    if out.exists():
        shutil.rmtree(out)  # only an earlier export (checked by _check_out_dir)
    out.mkdir(parents=True)
    kept = []
    for name in names:
        if name in TRAINING_STATE_FILES or (name.startswith("rng_state") and name.endswith(".pth")):
            continue
        fs, path = storage.filesystem(storage.join(checkpoint, name))
        with fs.open_input_stream(path) as src:
            (out / name).write_bytes(src.read())
        kept.append(name)
    return kept


def export_trial(
    experiment_dir: str,
    out_dir: str,
    trial: str = "best",
    merge: bool = False,
    log: Callable[[str], None] = print,
    push_to_hub: str | None = None,
    private: bool = False,
) -> ExportOutcome:
    """Copy a trial's adapter (and with `merge`, a merged model) into `out_dir`, with a README that is
    a Hugging Face model card (analysis/model_card.py); with `push_to_hub`, upload the folder there.

    Raises:
        NotAnExperiment: If `experiment_dir` is not a qlora-sweep experiment.
        AnalysisInputError: Unknown trial, no checkpoint, an unusable --out, or a malformed repo id
            (before anything is written).
        PushError: If the push failed (the export itself is complete).
    """
    from analysis.model_card import check_repo_id, model_card, push_folder

    if push_to_hub is not None:
        check_repo_id(push_to_hub)
    exp = load_experiment(experiment_dir)
    row = choose_trial(exp, trial)
    out = _check_out_dir(out_dir)
    checkpoint = str(row["checkpoint_path"])
    quality = Quality.of(exp.saved_spec)
    objective = "" if quality == LOSS else f", best {quality.metric} {quality.fmt(row.get(quality.column))}"
    log(f"[export] trial {row['trial_id']} ({row['status']}, best eval_loss {row[QUALITY]:.4f}{objective}) from {checkpoint}")
    files = copy_adapter(checkpoint, out)
    outcome = ExportOutcome(out_dir=str(out), trial_id=str(row["trial_id"]), checkpoint=checkpoint, files=files)
    task_job = task_metrics_job(exp) if exp.saved_spec.task_metrics else None
    if task_job is not None or merge:
        check_exported(exp, row, out, outcome, log, task_job=task_job, merge=merge)
    info = export_info(exp, row, outcome)
    # No password or key of a URL (the storage's, the study's) in either file (core/redact.py).
    (out / EXPORT_INFO).write_text(redact(json.dumps(info, indent=2, default=str)) + "\n")
    card = model_card(exp, row, info, render_readme(exp, row, outcome, info))
    (out / "README.md").write_text(redact(str(card)))
    if push_to_hub is not None:
        log(f"[export] pushing {out} to the Hugging Face Hub as {push_to_hub}")
        outcome.pushed_url = push_folder(out, push_to_hub, private=private)
    return outcome


# --- task metrics of the exported adapter -----------------------------------------------------------


def recorded_results(exp: Experiment, trial_id: str, checkpoint: str) -> dict[str, Any]:
    """The result the sweep reported together with this checkpoint ({} if none is found)."""
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
    for result in experiment_folder.read_results(exp.path, trial_id):
        if result.get("checkpoint_dir_name") == name:
            return result
    return {}


def task_metrics_job(exp: Experiment) -> Any:
    """The sweep's eval job (trainables/task_metrics.py EvalJob), built before any model is loaded.

    Raises:
        AnalysisInputError: If the files eval.metrics names are no longer readable.
    """
    from trainables.task_metrics import EvalFilesError, EvalSpec, build_eval_job

    try:
        # Paths in a saved spec are absolute (sweeps/driver.py saved_spec); older ones resolve here.
        return build_eval_job(EvalSpec.model_validate(exp.spec.get("eval") or {}), (), lambda p: str(Path(p).expanduser().resolve()))
    except EvalFilesError as exc:
        raise AnalysisInputError(
            "cannot re-measure the task metrics of the export: " + "; ".join(exc.problems)
            + ". Put the files back where sweep_spec.yaml names them"
        ) from None


@dataclass
class _Reload:
    """What the checks of an export share: the sweep's settings and training setup, the device, the base,
    the exported tokenizer and the sweep's data split, each loaded once."""

    settings: Any
    setup: TrainingSetup
    device: str
    base_path: str
    tokenizer: Any
    data: Any

    @classmethod
    def of(cls, exp: Experiment, out: Path) -> _Reload:
        import torch

        from trainables.data import prepare_data
        from trainables.qlora import quiet_libraries
        from trainables.tiny_models import is_builtin, materialize

        quiet_libraries()
        settings = trial_settings(exp.spec)  # paths in a saved spec are absolute
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        base_path = materialize(settings.model.path) if is_builtin(settings.model.path) else settings.model.path
        # The preflight tokenizer decided which rows were too long, so the split uses the base's tokenizer too.
        data = prepare_data(settings.data.path, settings.data, load_tokenizer(base_path, settings.model))
        return cls(
            settings=settings,
            setup=TrainingSetup.resolve(settings.model, settings.train, device),
            device=device,
            base_path=base_path,
            tokenizer=load_tokenizer(str(out), cls.local(settings)),
            data=data,
        )

    @staticmethod
    def local(settings: Any) -> Any:
        """The model settings for the export's and the merge's own folders (no hub revision)."""
        return settings.model.model_copy(update={"revision": None})

    def free(self) -> None:
        from trainables.memory_probe import free_memory

        free_memory(self.device)


def check_exported(
    exp: Experiment,
    row: pd.Series,
    out: Path,
    outcome: ExportOutcome,
    log: Callable[[str], None],
    *,
    task_job: Any,
    merge: bool,
) -> None:
    """Re-measure the export (out/): its task metrics when `task_job` is given, and with `merge` merge it and
    check the losses. The base quantized as the sweep trained it is loaded once for both."""
    from peft import PeftModel

    reload = _Reload.of(exp, out)
    if merge:
        log(f"[export] eval split re-created: {reload.data.eval_rows} rows (data.seed {reload.settings.data.seed}); "
            f"device {reload.device}")
    losses: dict[str, float] = {}
    started = time.time()
    if task_job is not None or (merge and reload.setup.quantized):
        base = reload.setup.load_model(reload.base_path, reload.settings.model, for_training=False)
        model = PeftModel.from_pretrained(base, str(out))
        try:
            if task_job is not None:
                remeasure_task_metrics(exp, reload, model, task_job, outcome, log)
            if merge and reload.setup.quantized:
                # The model the sweep trained and measured, with the CPU eval path the sweep used.
                losses["adapter_4bit"] = reload_loss(reload, model, row)
        finally:
            del model, base
            reload.free()
    if merge:
        merge_and_check(exp, row, out, reload, losses, outcome, log, started)


def remeasure_task_metrics(
    exp: Experiment, reload: _Reload, model: Any, job: Any, outcome: ExportOutcome, log: Callable[[str], None]
) -> None:
    """Measure the sweep's eval.metrics again on the exported adapter (`model`, on the base quantized as in
    the sweep), as the trials did: the same seeded subset of the eval split, trainables.task_metrics's
    TaskEvaluator. Fills outcome.task_metrics and outcome.task_recorded."""
    from trainables.task_metrics import TaskEvaluator

    started = time.time()
    evaluator = TaskEvaluator(job, reload.tokenizer, reload.data.eval_tokens, reload.settings.data.max_seq_length)
    measured = evaluator.evaluate(model)
    recorded = recorded_results(exp, outcome.trial_id, outcome.checkpoint)
    names = [n for n in job.spec.reported_names() if n in measured and not n.startswith("task_eval")]
    outcome.task_metrics = {n: float(measured[n]) for n in names}
    outcome.task_recorded = {
        n: float(recorded[n]) if isinstance(recorded.get(n), (int, float)) else math.nan for n in names
    }
    shown = ", ".join(
        f"{n} {v:.4g} (sweep: {'not measured at that round' if math.isnan(outcome.task_recorded[n]) else f'{outcome.task_recorded[n]:.4g}'})"
        for n, v in outcome.task_metrics.items()
    )
    log(f"[export] task metrics of the exported adapter, re-measured on the sweep's {len(evaluator.examples)} seeded "
        f"eval rows: {shown} [{time.time() - started:.0f}s]")


def recorded_loss(exp: Experiment, trial_id: str, checkpoint: str) -> float | None:
    """The eval_loss the sweep reported together with this checkpoint."""
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
    for result in experiment_folder.read_results(exp.path, trial_id):
        if result.get("checkpoint_dir_name") == name and isinstance(result.get("eval_loss"), (int, float)):
            return float(result["eval_loss"])
    return None


def evaluate_loss(
    model: Any, tokenizer: Any, examples: Any, setup: TrainingSetup, data: DataSpec, batch_size: int
) -> float:
    """The sweep's eval_loss for `model` on `examples`: trl's SFTTrainer.evaluate with the trial's settings.

    Args:
        examples: The eval rows as trials saw them (trainables.data.TokenizedRows: token ids and loss
            mask), or formatted text examples, which trl tokenizes.
        setup: The training setup on this device (its precision flags are the trainable's).
        data: The spec's data section (max_seq_length).
    """
    from datasets import Dataset
    from trl import SFTTrainer

    from trainables.data import TokenizedRows

    tokens = isinstance(examples, TokenizedRows)
    evaluated = examples.to_dataset() if tokens else Dataset.from_list(examples)
    with tempfile.TemporaryDirectory(prefix="qlora-sweep-export-eval-") as scratch:
        args = setup.eval_config(data, scratch, batch_size)
        if tokens:
            args.dataset_kwargs = {"skip_prepare_dataset": True}
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=evaluated.select([0]),  # required by SFTTrainer; never trained on
            eval_dataset=evaluated,
            processing_class=tokenizer,
        )
        remove_printer_callback(trainer)
        return float(trainer.evaluate()["eval_loss"])


def reload_loss(reload: _Reload, model: Any, row: pd.Series) -> float:
    """`model`'s eval loss on the sweep's eval split, with the sweep's settings and this trial's eval batch size."""
    train = reload.settings.train
    batch_size = int(train.eval_batch_size or (row.get("batch_size") if pd.notna(row.get("batch_size")) else train.batch_size))
    return evaluate_loss(model, reload.tokenizer, reload.data.eval_tokens, reload.setup, reload.settings.data, batch_size)


def merge_and_check(
    exp: Experiment,
    row: pd.Series,
    out: Path,
    reload: _Reload,
    losses: dict[str, float],
    outcome: ExportOutcome,
    log: Callable[[str], None],
    started: float,
) -> None:
    """Merge the adapter into the unquantized base, save it to out/merged, and compare the losses.

    `losses` holds adapter_4bit already when the sweep quantized the base. Fills outcome.losses
    (adapter_4bit, adapter_16bit, merged, recorded), merged_dir, merge_dtype, tolerance and check_passed.
    """
    from peft import PeftModel

    setup, local = reload.setup, _Reload.local(reload.settings)
    base = setup.load_model(reload.base_path, reload.settings.model, for_training=False, quantize=False)
    model = PeftModel.from_pretrained(base, str(out))
    losses["adapter_16bit"] = reload_loss(reload, model, row)
    merged = model.merge_and_unload()
    merged_dir = out / "merged"
    merged.save_pretrained(str(merged_dir))
    reload.tokenizer.save_pretrained(str(merged_dir))
    del model, merged, base
    reload.free()
    reloaded = setup.load_model(str(merged_dir), local, for_training=False, quantize=False)
    losses["merged"] = reload_loss(reload, reloaded, row)
    del reloaded
    reload.free()
    recorded = recorded_loss(exp, outcome.trial_id, outcome.checkpoint)
    if recorded is not None:
        losses["recorded"] = recorded

    dtype_name = setup.compute_dtype
    tolerance = MERGE_RTOL.get(dtype_name, 1e-2)
    difference = abs(losses["merged"] - losses["adapter_16bit"])
    outcome.losses = losses
    outcome.merged_dir = str(merged_dir)
    outcome.merge_dtype = dtype_name
    outcome.tolerance = tolerance
    outcome.check_passed = difference <= tolerance * abs(losses["adapter_16bit"])
    log(
        "[export] eval loss: "
        + ", ".join(f"{k} {v:.6f}" for k, v in losses.items())
        + f"; |merged - adapter_16bit| = {difference:.2e} (tolerance {tolerance:g} relative, {dtype_name}): "
        + ("ok" if outcome.check_passed else "MISMATCH")
        + f" [{time.time() - started:.0f}s]"
    )


# --- README -------------------------------------------------------------------------------------


def export_info(exp: Experiment, row: pd.Series, outcome: ExportOutcome) -> dict[str, Any]:
    """export.json: what was exported, from where, and the measured losses."""
    config = {c: _plain(row[c]) for c in exp.config_columns if c in row and pd.notna(row[c])}
    spec = exp.spec
    return {
        "experiment": exp.path,
        "trial_id": outcome.trial_id,
        "status": str(row["status"]),
        "checkpoint": outcome.checkpoint,
        "best_eval_loss": _plain(row[QUALITY]),
        "best_step": _plain(row.get("best_step")),
        "peak_memory_mib": _plain(row.get("peak_memory_mib")),
        "memory_kind": _plain(row.get("memory_kind")),
        "config": config,
        "base_model": spec["model"]["path"],
        "quantization": spec["model"]["quantization"],
        "double_quant": spec["model"].get("double_quant"),
        "files": outcome.files,
        "merged_dir": outcome.merged_dir,
        "merge_dtype": outcome.merge_dtype,
        "losses": outcome.losses,
        # Re-measured on the exported adapter; task_metrics_recorded: the sweep's at this checkpoint (None: not measured).
        "task_metrics": outcome.task_metrics or None,
        "task_metrics_recorded": {k: _plain(v) for k, v in outcome.task_recorded.items()} or None,
        "merge_tolerance_rel": outcome.tolerance,
        "merge_check_passed": outcome.check_passed,
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _plain(value: Any) -> Any:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _eval_source(data: dict[str, Any]) -> str:
    """Where the sweep's eval rows came from, as the saved spec's data section says."""
    if data.get("eval_path") or data.get("eval_split"):
        where = f"`{data.get('eval_path') or data['path']}`"
        return where + (f" split {data['eval_split']}" if data.get("eval_split") else "")
    size = data.get("eval_size")
    return f"`{data['path']}`, eval_size {size if size is not None else 0.1}"


def render_readme(exp: Experiment, row: pd.Series, outcome: ExportOutcome, info: dict[str, Any]) -> str:
    spec = exp.spec
    base = spec["model"]["path"]
    builtin = base.startswith("builtin:")
    base_load = "materialize(" + repr(base) + ")" if builtin else repr(base)
    quant = spec["model"]["quantization"]
    lines = [
        f"# QLoRA adapter: trial {outcome.trial_id} of sweep {spec.get('name', '')}",
        "",
        f"Exported by `qlora-sweep export` from `{outcome.checkpoint}` "
        f"(the trial's kept checkpoint with the lowest eval loss).",
        "",
        "## Trial",
        "",
        f"- status: {row['status']}; best eval_loss {row[QUALITY]:.4f} at step {info['best_step']}",
        f"- peak memory: {info['peak_memory_mib']} MiB ({info['memory_kind']})",
        "- config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()),
        (
            f"- base model: `{base}`, trained on its {quant} quantization"
            + (" (double quant)" if spec["model"].get("double_quant") else "")
            if quant != "none"
            else f"- base model: `{base}` (16-bit LoRA, not quantized)"
        ),
        f"- eval data: {_eval_source(spec['data'])}, data.seed {spec['data'].get('seed', 0)}",
        "",
        "## Files",
        "",
        "- " + ", ".join(f"`{f}`" for f in outcome.files) + ": the adapter and tokenizer (`PeftModel.from_pretrained` layout);",
        "  the optimizer, scheduler, RNG and trainer state of the checkpoint were left out.",
    ]
    if outcome.merged_dir:
        lines.append(
            f"- `merged/`: a standalone model, the adapter merged into the unquantized base in {outcome.merge_dtype}"
            + (" (float32: this export ran on CPU, where 16-bit matmuls are slow and gain nothing)" if outcome.merge_dtype == "float32" else "")
            + "."
        )
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig",
    ]
    if builtin:
        lines += ["from trainables.tiny_models import materialize  # builtin models are built locally by qlora-sweep"]
    lines += [
        "",
        f"base = {base_load}",
        f"tokenizer = AutoTokenizer.from_pretrained({outcome.out_dir!r})",
    ]
    if quant != "none":
        lines += [
            "# As trained (what the sweep measured): the base quantized again, then the adapter.",
            f"bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={quant!r}, "
            f"bnb_4bit_use_double_quant={bool(spec['model'].get('double_quant'))}, bnb_4bit_compute_dtype=torch.bfloat16)",
            "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb), "
            f"{outcome.out_dir!r})",
        ]
    lines += [
        "# Unquantized base + adapter:",
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), {outcome.out_dir!r})",
    ]
    if outcome.merged_dir:
        lines += ["# The merged standalone model (no peft needed):", f"model = AutoModelForCausalLM.from_pretrained({outcome.merged_dir!r})"]
    lines += [
        "```",
        "",
        "`adapter_config.json` names the base as `base_model_name_or_path` = the local path the trial loaded; pass "
        "the base explicitly as above when loading elsewhere.",
        "",
        "## Eval loss",
        "",
    ]
    if outcome.losses:
        losses = outcome.losses
        described = {
            "recorded": "what the sweep reported with this checkpoint",
            "adapter_4bit": f"base quantized as trained ({quant}) + adapter, unmerged: the model the sweep measured",
            "adapter_16bit": f"unquantized base ({outcome.merge_dtype}) + adapter, unmerged: the merge's reference",
            "merged": "`merged/` reloaded from disk",
        }
        lines += ["| model | eval_loss | what it is |", "|---|---|---|"]
        lines += [f"| {k} | {losses[k]:.6f} | {described[k]} |" for k in ("recorded", "adapter_4bit", "adapter_16bit", "merged") if k in losses]
        lines += [
            "",
            "All on the sweep's eval split, re-created from the saved spec (same file, same data.seed), with trl's "
            "SFTTrainer.evaluate and the sweep's batch size and max length: the same definition of eval_loss as the sweep.",
            "",
            f"- merge check: |merged - adapter_16bit| = {outcome.merge_difference:.3g}, tolerance "
            f"{outcome.tolerance:g} x adapter_16bit ({outcome.tolerance * abs(losses['adapter_16bit']):.3g}) for "
            f"{outcome.merge_dtype}: **{'passed' if outcome.check_passed else 'FAILED'}**. Merging is exact algebra "
            "(W + scale x B A); only rounding separates the two.",
        ]
        if "adapter_4bit" in losses:
            gap = losses["adapter_16bit"] - losses["adapter_4bit"]
            lines.append(
                f"- quantization gap: adapter_16bit - adapter_4bit = {gap:+.6f} ({gap / losses['adapter_4bit'] * 100:+.2f}%). "
                "The adapter was trained on the 4-bit weights; the unquantized base differs from them by the quantization "
                "error, so the merged model scores about this much differently from what the sweep measured."
            )
        if "recorded" in losses and "adapter_4bit" in losses:
            lines.append(
                f"- reproduction: adapter_4bit - recorded = {losses['adapter_4bit'] - losses['recorded']:+.2e} "
                "(GPU kernels are not bit-deterministic, so expect small differences there; on CPU it is exact)."
            )
    else:
        lines += [
            f"The sweep recorded eval_loss {row[QUALITY]:.4f} for this checkpoint. Run the export with `--merge` to also "
            "build a merged model and measure the 4-bit, 16-bit and merged losses on the eval split.",
        ]
    if outcome.task_metrics:
        lines += [
            "",
            "## Task metrics of this adapter",
            "",
            "Measured again on the exported adapter (the base quantized as trained), on the sweep's seeded subset of "
            "the eval split, as every trial measured them (eval.metrics; docs/task-metrics.md):",
            "",
            "| metric | this adapter | the sweep, at this checkpoint |",
            "|---|---:|---:|",
        ]
        for name, value in outcome.task_metrics.items():
            seen = outcome.task_recorded.get(name, math.nan)
            lines.append(f"| {name} | {value:.4g} | {'not measured at that round' if math.isnan(seen) else f'{seen:.4g}'} |")
    lines += ["", "## Sweep spec (as it ran)", "", "```yaml", yaml.safe_dump(spec, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)

