"""The exported adapter's README.md as a Hugging Face model card, and `export --push-to-hub`.

The card is huggingface_hub's `ModelCard` with `ModelCardData` metadata (base model, datasets, library,
tags, the eval result) above the export's own README text, plus a section on the sweep that chose the
trial: how many trials it ran, how it ranked them, this trial's place, its hyperparameters and its
peak memory with how that was measured. A hub id in `model.path` or `data.path` goes into the metadata;
a local path or a builtin model does not (the Hub would link nowhere).

Nothing is pushed unless asked: `push_folder` creates the repo (if needed) and uploads the export
folder with huggingface_hub's HfApi, using the token from the environment (HF_TOKEN) or the Hub's own
login, which is never written anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from analysis.results import AnalysisInputError, Experiment
from core.hub import is_hub_id
from trainables.metrics import MEMORY_KINDS

TAGS = ("peft", "lora", "qlora", "qlora-sweep")


class PushError(AnalysisInputError):
    """The push to the Hub failed after the export was written (exit status 1)."""

    exit_code = 1


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed `--push-to-hub` repo id before anything is exported.

    Raises:
        AnalysisInputError: Naming the id and the form it should take.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise AnalysisInputError(f"--push-to-hub {repo_id!r}: {exc}. Write it as USER_OR_ORG/NAME") from None
    if "/" not in repo_id:
        raise AnalysisInputError(f"--push-to-hub {repo_id!r}: write it as USER_OR_ORG/NAME, e.g. my-org/llama-qlora")


def model_card(exp: Experiment, row: pd.Series, info: dict[str, Any], body: str) -> Any:
    """The README.md of an export: metadata from the experiment, `body` (the export's README text)
    and the sweep that chose the trial."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    spec = exp.spec
    base = str(spec["model"]["path"])
    data_path = str(spec["data"]["path"])
    hub_base = not base.startswith("builtin:") and is_hub_id(base)
    hub_data = is_hub_id(data_path)
    quality = info.get("best_eval_loss")

    def result(metric_type: str, name: str, value: Any) -> Any:
        return EvalResult(
            task_type="text-generation",
            dataset_type=data_path if hub_data else "local",
            dataset_name=data_path if hub_data else Path(data_path).name,
            dataset_split="eval",
            metric_type=metric_type,
            metric_name=name,
            metric_value=float(value),
        )

    # Task metrics re-measured on the exported adapter, then the sweep's eval loss.
    results = [result(name, name, value) for name, value in (info.get("task_metrics") or {}).items() if value is not None]
    if quality is not None:
        results.append(result("loss", "eval_loss", quality))
    data = ModelCardData(
        base_model=base if hub_base else None,
        datasets=[data_path] if hub_data else None,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=[*TAGS, str(spec["model"].get("quantization", ""))],
        model_name=f"{spec.get('name', 'sweep')}-trial-{info['trial_id']}",
        eval_results=results or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n\n{sweep_section(exp, row, info)}")


def sweep_section(exp: Experiment, row: pd.Series, info: dict[str, Any]) -> str:
    """"## Chosen by qlora-sweep": the sweep, the ranking, this trial's place and memory."""
    from analysis.summary import analyze

    analysis = analyze(exp, importance=False)
    q = analysis.quality
    ranked = analysis.ranked.sort_values(q.column, ascending=q.lower_is_better, kind="stable")
    place = list(ranked["trial_id"]).index(row["trial_id"]) + 1 if row["trial_id"] in set(ranked["trial_id"]) else None
    kind = info.get("memory_kind")
    counts = ", ".join(f"{n} {status}" for status, n in analysis.counts.items())
    lines = [
        "## Chosen by qlora-sweep",
        "",
        f"- sweep `{analysis.name}`: {len(exp.trials)} trials ({counts}), ranked by best {q.describe()}"
        + (f"; this trial is number {place} of {len(ranked)} ranked" if place else ""),
        "- hyperparameters: " + ", ".join(f"`{k}={v}`" for k, v in info["config"].items()),
        f"- peak memory: {info.get('peak_memory_mib')} MiB, measured as {MEMORY_KINDS.get(kind, kind or 'not recorded')}",
    ]
    lines += [f"- {line}" for line in analysis.provenance]
    return "\n".join(lines) + "\n"


def push_folder(out: Path, repo_id: str, private: bool = False) -> str:
    """Create the Hub repo if needed and upload the export folder; the URL of the commit.

    Raises:
        PushError: If the Hub cannot be reached (HF_HUB_OFFLINE, no network, no token, no access),
            saying that the export itself is complete and how to push it later.
    """
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    later = f"The export is complete in {out}; push it later with `hf upload {repo_id} {out}`."
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message="Upload QLoRA adapter chosen by qlora-sweep")
    except OfflineModeIsEnabled:
        raise PushError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE=1 is set, so nothing was pushed. {later}") from None
    except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PushError(
            f"--push-to-hub {repo_id}: the Hub refused or could not be reached ({reason}). Check HF_TOKEN (a token "
            f"with write access) and the network. {later}"
        ) from None
    return str(getattr(commit, "commit_url", commit))
