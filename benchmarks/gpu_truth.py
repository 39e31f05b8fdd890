"""GPU truth: measured VRAM against the estimator, trial throughput against a bare loop, the GPU-only paths.

One command, one GPU, under 8 minutes (docs/gpu-calibration.md says how to read what it writes):

    python benchmarks/gpu_truth.py --out-dir $OUT/gpu-truth            # on the GPU machine
    python benchmarks/gpu_truth.py --dry-run --out-dir /tmp/gpu-truth  # anywhere: every code path on CPU

It drives the Tune-free trial function (`trainables.qlora.run_trial`, a plain report callback): no
Ray, no Optuna, no hub. The models are built from configs with random weights (memory and speed do
not depend on the values), saved once under --models-dir and loaded in NF4 + double quant like any
trial's base model. Parts, in the order they run (each point checks the time left, and a point that
does not fit is recorded as skipped, never guessed):

1. calibrate   the estimator on a grid of the Llama-3.2-1B shape (r 8/64; q,v / all-linear; batch
               1/4; seq 512/2048; paged_adamw_32bit; plus adamw_torch and gradient checkpointing off
               at one point each) and three Llama-3-8B points (r 16 all-linear, seq 2048: batch 1 and 4
               with paged_adamw_32bit, batch 4 with adamw_torch). Per point: max_memory_reserved and
               max_memory_allocated as the trial reports them, the estimator's prediction part by part,
               and three measured parts (weights + adapters after loading, optimizer states after the
               first step, the rest of the peak).
2. paths       the GPU-only code: memory_kind cuda_reserved in the report; two trials packed at a 0.5
               share in two processes at once, each with set_per_process_memory_fraction enforced; a
               real out-of-memory (a batch too large under a capped fraction) ending as status oom, and
               the next trial in the same process running to the end.
3. throughput  tokens/s of run_trial against a bare peft + trl loop (benchmarks/trainable_throughput.py,
               same TrainingSetup), interleaved, on the 8B shape, with the model FLOPs utilization.
4. multi       only if at least 2 minutes remain: one step of 4 LoRA adapters trained together on one
               shared 4-bit 8B base (one batch of 4 sub-batches routed to their adapters through peft's
               mixed-adapter forward, a separate optimizer each) against 4 solo steps: time and peak memory.
               Evidence for a later design decision, not a product feature.

It writes gpu_truth.json (every raw figure) and gpu_truth.md (the tables) to --out-dir.

`--dry-run` runs every code path on CPU in well under a minute, on tiny llama shapes (hidden 64) and
the builtin tiny tokenizer, with two steps per trial. The CUDA-only measurements are replaced by their
CPU counterparts and every figure says so: memory is host RSS and the CPU tensor peak
(memory_kind cpu_tensor_peak), compared with the estimator's allocated bytes for the CPU setup; the GPU
share is logical; the out-of-memory is injected. Nothing a dry run writes is a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common

MIB = 2**20
DEFAULT_BUDGET_S = 480  # the "under 8 minutes on one GPU"
MULTI_MIN_LEFT_S = 120  # part 4 runs only with this much left
DRY_RUN_LABEL = "DRY RUN on CPU (tiny shapes, CPU measurements substituted): code paths only, not GPU figures"

# Llama-3.2-1B's config.json shape values (memory and speed depend on shapes only).
LLAMA32_1B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}

# Dry-run stand-ins: llama shapes small enough for a CPU, one tied and one untied like the real pair.
TINY_1B: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True,
}
TINY_8B: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
}

# What the script imports on the GPU machine (docs/gpu-calibration.md lists the wheels to carry).
REQUIRED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "pyarrow", "pandas",
            "pydantic", "yaml")

# Dense bf16 peak of the GPUs this may run on (tensor cores, no sparsity), for the MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


@dataclass(frozen=True)
class Point:
    """One calibration point: a shape and the settings that move memory."""

    shape: str  # "1b" or "8b"
    r: int
    targets: str  # "qv" or "all-linear"
    batch: int
    seq: int
    checkpointing: bool = True
    optimizer: str = "paged_adamw_32bit"

    @property
    def name(self) -> str:
        ckpt = "" if self.checkpointing else ", no ckpt"
        return f"{self.shape} r{self.r} {self.targets} b{self.batch} s{self.seq} {self.optimizer}{ckpt}"


def calibration_grid() -> list[Point]:
    """The 1B grid (16 points + adamw_torch + checkpointing off) and the three 8B points."""
    points = [
        Point("1b", r, targets, batch, seq)
        for seq in (512, 2048)
        for batch in (1, 4)
        for targets in ("qv", "all-linear")
        for r in (8, 64)
    ]
    points += [
        Point("1b", 8, "all-linear", 4, 2048, optimizer="adamw_torch"),
        Point("1b", 8, "all-linear", 1, 2048, checkpointing=False),
    ]
    points += [
        Point("8b", 16, "all-linear", 1, 2048),
        Point("8b", 16, "all-linear", 4, 2048),
        Point("8b", 16, "all-linear", 4, 2048, optimizer="adamw_torch"),
    ]
    return points


def dry_run_grid() -> list[Point]:
    """Every kind of point once, at CPU sizes: both targets and ranks, both batches, the two variants, an 8B stand-in."""
    return [
        Point("1b", 8, "qv", 1, 32, optimizer="adamw_torch"),
        Point("1b", 64, "all-linear", 4, 32, optimizer="adamw_torch"),
        Point("1b", 8, "all-linear", 4, 32, optimizer="adamw_torch", checkpointing=False),
        Point("8b", 16, "all-linear", 2, 32, optimizer="adamw_torch"),
    ]


# --- the run's clock and its settings ---------------------------------------------------------------


@dataclass
class Run:
    """What every part needs: where things go, whether this is a dry run, and the deadline."""

    out_dir: Path
    models_dir: Path
    dry_run: bool
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    device: str = "cpu"
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpu-truth-")))

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def left_s(self) -> float:
        return self.budget_s - self.elapsed_s

    @property
    def steps(self) -> int:
        return 2 if self.dry_run else 3  # the optimizer states exist from step 1; the peak repeats from step 2

    def shape_config(self, shape: str) -> dict[str, Any]:
        if self.dry_run:
            return dict(TINY_1B if shape == "1b" else TINY_8B)
        return dict(LLAMA32_1B if shape == "1b" else _llama3_8b())

    def label(self, shape: str) -> str:
        real = {"1b": "Llama-3.2-1B shape", "8b": "Llama-3-8B shape"}[shape]
        return f"{real} (dry run: tiny stand-in, hidden {self.shape_config(shape)['hidden_size']})" if self.dry_run else real


def _llama3_8b() -> dict[str, Any]:
    from trainables.memory_estimator import LLAMA3_8B_CONFIG

    return dict(LLAMA3_8B_CONFIG)


# --- models, tokenizer and data -----------------------------------------------------------------------


def tokenizer_folder(run: Run) -> str:
    """The builtin models' word-level tokenizer (trained locally in a second, no hub), saved once: every model uses it."""
    folder = run.models_dir / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        from trainables.tiny_models import builtin_tokenizer

        builtin_tokenizer().save_pretrained(folder)
    return str(folder)


def random_model(run: Run, shape: str) -> Path:
    """Build a model of `shape` with random weights, save it once (bf16 safetensors) and return its folder.

    Weights are normal(0, 0.02) and norms 1, so losses stay finite; memory and speed do not depend on
    the values. Built on the GPU when there is one (seconds for 8B), saved with the tokenizer beside it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_dict = run.shape_config(shape)
    folder = run.models_dir / f"{'dry-' if run.dry_run else ''}{shape}-random"
    marker = folder / "BUILT_BY_GPU_TRUTH.json"
    if marker.exists() and json.loads(marker.read_text()).get("config") == config_dict:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(run))
    config = AutoConfig.for_model(
        **config_dict,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=run.device)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights
            else:
                param.normal_(0.0, 0.02)
    model.tie_weights()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps({"config": config_dict, "built_s": round(run.elapsed_s, 1)}))
    del model
    if run.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


def data_file(run: Run, seq: int, rows: int) -> Path:
    """A text-format data file whose rows are longer than `seq` tokens (one known word = one token).

    With data.on_long_rows: truncate every row is cut to exactly `seq` tokens, so every batch is
    `seq` long, the length the estimator is given (what admission predicts with: the cap).
    """
    path = run.work / f"data-s{seq}-n{rows}.jsonl"
    if path.exists():
        return path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(run))
    special = set(tokenizer.all_special_tokens)
    words = sorted(w for w in tokenizer.get_vocab() if w not in special and w.isalpha())
    length = seq + 8
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(length))}) + "\n")
    return path


def prepared_data(spec: Any, folder: Path) -> Any:
    """The spec's data read, checked and tokenized once, as the driver prepares it for every trial."""
    from trainables.data import prepare_data
    from trainables.training_setup import load_tokenizer

    return prepare_data(spec.data.path, spec.data, load_tokenizer(str(folder), spec.model))


def spec_for(run: Run, folder: Path, point: Point, *, steps: int, eval_rows: int = 2, **train: Any) -> Any:
    """A one-trial spec for `point` on the model in `folder` (sweeps.spec: the same validation as any sweep)."""
    from sweeps.spec import parse_spec

    rows = steps * point.batch + eval_rows + 2
    return parse_spec(
        {
            "name": "gpu-truth",
            "model": {"path": str(folder), "quantization": "nf4", "double_quant": True, "compute_dtype": "auto"},
            "data": {
                "path": str(data_file(run, point.seq, rows)),
                "format": "text",
                "max_seq_length": point.seq,
                "eval_size": eval_rows,
                "on_long_rows": "truncate",
            },
            "space": {"r": point.r, "lora_alpha": 2 * point.r, "target_modules": point.targets, "learning_rate": 1e-4,
                      "lora_dropout": 0.0},
            "search": {"num_samples": 1, "max_concurrent": 1, "seed": 0, "sampler": "random"},
            "scheduler": {"asha": None},
            "train": {
                "max_steps": steps,
                "eval_every": steps,
                "batch_size": point.batch,
                "eval_batch_size": 1,
                "gradient_checkpointing": point.checkpointing,
                "optimizer": point.optimizer,
                "checkpoint": False,
                **train,
            },
            "resources": {"gpus_per_trial": 0 if run.dry_run else 1, "cpus_per_trial": 1 if run.dry_run else 8},
        }
    )


def trial_config(point: Point) -> dict[str, Any]:
    """The trial's hyperparameters as Tune would pass them."""
    return {
        "r": point.r,
        "lora_alpha": float(2 * point.r),
        "target_modules": point.targets,
        "learning_rate": 1e-4,
        "lora_dropout": 0.0,
        "weight_decay": 0.0,
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "batch_size": point.batch,
    }


# --- measured parts ------------------------------------------------------------------------------------


def parts_probe(device: str, seen: dict[str, Any]) -> Any:
    """A train.callbacks factory that reads the trial's memory where the parts can be told apart.

    At the start of training: the weights, quantization states and adapters. After the first optimizer
    step (its gradients freed): that plus the optimizer states. On CUDA these are
    torch.cuda.memory_allocated (paged optimizer states live in unified memory, outside it); on CPU the
    bytes of the model's and optimizer's tensors (trainables/memory_probe.py).
    """

    def allocated(model: Any, optimizer: Any) -> int:
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.memory_allocated(device))
        from trainables.memory_probe import storage_bytes, trial_tensors

        return storage_bytes(trial_tensors(model, optimizer))

    def factory(context: Any) -> Any:
        from transformers import TrainerCallback

        class PartsProbe(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
                seen["static_bytes"] = allocated(model, optimizer)

            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                if "after_step_bytes" not in seen:
                    seen["after_step_bytes"] = allocated(model, optimizer)

        return PartsProbe()

    return factory


# --- part 1: calibration --------------------------------------------------------------------------------


def predicted_parts(model_folder: Path, spec: Any, point: Point, device: str) -> dict[str, Any]:
    """The estimator's prediction for the point, part by part, with the trial's own TrainingSetup."""
    from trainables.training_setup import TrainingSetup
    from trainables.trial_memory import MemoryKnobs, estimate_for_trial

    config = json.loads((model_folder / "config.json").read_text())
    setup = TrainingSetup.resolve(spec.model, spec.train, device, bf16_supported=True if device == "cuda" else None)
    knobs = MemoryKnobs(r=point.r, target_modules=point.targets, batch_size=point.batch, seq_len=point.seq)
    estimate = estimate_for_trial(config, setup, knobs)
    parts = {k.removesuffix("_bytes"): round(v / MIB, 2) for k, v in estimate.as_dict().items()
             if k.endswith("_bytes") and k not in ("allocated_bytes", "reserved_bytes")}
    static = (estimate.linear_weights_bytes + estimate.quant_constants_bytes + estimate.other_weights_bytes
              + estimate.lora_weights_bytes)
    return {
        "setup": setup.describe(),
        "parts_mib": parts,
        "allocated_mib": round(estimate.allocated_bytes / MIB, 2),
        "reserved_mib": round(estimate.reserved_bytes / MIB, 2),
        "static_mib": round(static / MIB, 2),
        "optimizer_mib": round(estimate.optimizer_state_bytes / MIB, 2),
        "dynamic_mib": round((estimate.allocated_bytes - static - estimate.optimizer_state_bytes) / MIB, 2),
    }


def run_point(run: Run, point: Point, *, folder: Path | None = None) -> dict[str, Any]:
    """Train one calibration point through run_trial; measured figures next to the prediction."""
    from sweeps.plan import trial_job
    from trainables.qlora import run_trial

    folder = folder or random_model(run, point.shape)
    spec = spec_for(run, folder, point, steps=run.steps)
    seen: dict[str, Any] = {}
    began = time.monotonic()
    reports: list[dict[str, Any]] = []
    try:
        last = run_trial(trial_config(point), trial_job(spec), report=lambda m, c=None: reports.append(m),
                         callbacks=(parts_probe(run.device, seen),))
    except Exception as exc:  # a point that fails is a finding, not the end of the run
        return {"point": point.name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:400],
                "seconds": round(time.monotonic() - began, 1)}
    predicted = predicted_parts(folder, spec, point, "cpu" if run.dry_run else "cuda")
    return {
        "point": point.name,
        **{k: getattr(point, k) for k in ("shape", "r", "targets", "batch", "seq", "checkpointing", "optimizer")},
        "status": last.get("trial_status") or "ok",
        "seconds": round(time.monotonic() - began, 1),
        "measured": measured_figures(last, seen),
        "predicted": predicted,
        "error_pct": point_errors(last, seen, predicted, run.dry_run),
    }


def measured_figures(last: dict[str, Any], seen: dict[str, Any]) -> dict[str, Any]:
    """What the trial reported about memory, plus the parts the probe read."""
    out = {k: last.get(k) for k in ("memory_kind", "peak_memory_mib", "cuda_allocated_mib", "nvml_used_mib",
                                    "tensor_peak_mib", "tensor_peak_kind", "predicted_tensor_peak_mib",
                                    "tensor_peak_seq_len", "predicted_memory_mib", "tokens_per_s") if last.get(k) is not None}
    if "static_bytes" in seen:
        out["static_mib"] = round(seen["static_bytes"] / MIB, 2)
    if "after_step_bytes" in seen and "static_bytes" in seen:
        out["optimizer_mib"] = round((seen["after_step_bytes"] - seen["static_bytes"]) / MIB, 2)
    peak = last.get("cuda_allocated_mib", last.get("tensor_peak_mib"))
    if peak is not None and "after_step_bytes" in seen:
        out["dynamic_mib"] = round(float(peak) - seen["after_step_bytes"] / MIB, 2)
    return out


def _pct(predicted: Any, measured: Any) -> float | None:
    if predicted is None or measured is None or not float(measured):
        return None
    return round((float(predicted) - float(measured)) / float(measured) * 100, 2)


def point_errors(last: dict[str, Any], seen: dict[str, Any], predicted: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """(predicted - measured) / measured, in %, for the totals and the three measured parts.

    On CUDA the totals are reserved vs max_memory_reserved and allocated vs max_memory_allocated. In a
    dry run there is no VRAM: allocated (CPU setup) vs the CPU tensor peak, the same quantity on CPU.
    """
    measured = measured_figures(last, seen)
    if dry_run:
        totals = {"allocated_vs_tensor_peak": _pct(predicted["allocated_mib"], measured.get("tensor_peak_mib"))}
    else:
        totals = {
            "reserved": _pct(predicted["reserved_mib"], measured.get("peak_memory_mib")),
            "allocated": _pct(predicted["allocated_mib"], measured.get("cuda_allocated_mib")),
        }
    return {
        **totals,
        "static": _pct(predicted["static_mib"], measured.get("static_mib")),
        "optimizer": _pct(predicted["optimizer_mib"], measured.get("optimizer_mib")) if predicted["optimizer_mib"] else None,
        "dynamic": _pct(predicted["dynamic_mib"], measured.get("dynamic_mib")),
    }


# Seconds a part is expected to take on the H200 (load from the page cache, quantize, train, evaluate),
# from the sizes involved; measured figures replace these guesses in gpu_truth.json (part_seconds).
SECONDS_PER_POINT = {"1b": 10.0, "8b": 40.0}
SECONDS_8B_BUILD = 45.0  # random 8B weights on the GPU, saved once (16 GB of bf16 safetensors)
SECONDS_PATHS = 100.0  # two packed trials, the OOM pair, and the gpu pytest tests
SECONDS_THROUGHPUT_RUN = 50.0  # one 8B trial of ours or of the bare loop


def calibrate(
    run: Run, points: list[Point], results: dict[str, Any], throughput_point: Point | None = None, reserve_s: float = 0.0
) -> None:
    """Part 1: every point that fits in the time left, keeping `reserve_s` for the parts after it.

    In order: the 1B grid, then the 8B points. A point that does not fit is recorded as skipped.
    """
    out: list[dict[str, Any]] = []
    results["calibration"] = {"points": out}
    per_point = dict(SECONDS_PER_POINT) if not run.dry_run else {"1b": 3.0, "8b": 3.0}
    for point in points:
        if point == throughput_point:
            continue  # measured by the throughput part's first run of ours (same trial, same report)
        build = SECONDS_8B_BUILD if point.shape == "8b" and not run.dry_run and not _built(run, "8b") else 0.0
        if run.left_s < per_point[point.shape] + build + reserve_s:
            out.append({"point": point.name, "status": "skipped", "reason": f"{run.left_s:.0f} s left of the budget"})
            continue
        print(f"[{run.elapsed_s:5.0f} s] calibrate {point.name}", file=sys.stderr, flush=True)
        out.append(run_point(run, point))
    summarize_calibration(results["calibration"], run.dry_run)


def _built(run: Run, shape: str) -> bool:
    return (run.models_dir / f"{'dry-' if run.dry_run else ''}{shape}-random" / "BUILT_BY_GPU_TRUTH.json").exists()


def summarize_calibration(calibration: dict[str, Any], dry_run: bool) -> None:
    measured = [p for p in calibration["points"] if p.get("status") == "ok"]
    keys = ("allocated_vs_tensor_peak",) if dry_run else ("reserved", "allocated")
    summary: dict[str, Any] = {"points_measured": len(measured), "points_total": len(calibration["points"])}
    for key in (*keys, "static", "optimizer", "dynamic"):
        errors = [abs(p["error_pct"][key]) for p in measured if p["error_pct"].get(key) is not None]
        summary[f"median_abs_error_pct_{key}"] = round(statistics.median(errors), 2) if errors else None
        summary[f"max_abs_error_pct_{key}"] = round(max(errors), 2) if errors else None
    calibration["summary"] = summary


# --- part 2: the GPU-only paths --------------------------------------------------------------------------


def check_cuda_reserved(results: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """The report of a calibration trial carries memory_kind cuda_reserved (host_rss + cpu_tensor_peak on CPU)."""
    trials = [p for p in results.get("calibration", {}).get("points", []) if p.get("status") == "ok"]
    if not trials:
        return {"check": "memory_kind", "ok": False, "detail": "no calibration trial ran"}
    measured = trials[0]["measured"]
    if dry_run:
        ok = measured.get("memory_kind") == "host_rss" and measured.get("tensor_peak_kind") == "cpu_tensor_peak"
        detail = (f"dry run: memory_kind {measured.get('memory_kind')} with tensor_peak_kind "
                  f"{measured.get('tensor_peak_kind')} (the CPU substitutes for cuda_reserved)")
    else:
        ok = (measured.get("memory_kind") == "cuda_reserved"
              and float(measured.get("peak_memory_mib") or 0) >= float(measured.get("cuda_allocated_mib") or 0) > 0)
        detail = (f"memory_kind {measured.get('memory_kind')}, peak (reserved) {measured.get('peak_memory_mib')} MiB >= "
                  f"allocated {measured.get('cuda_allocated_mib')} MiB; NVML used {measured.get('nvml_used_mib')} MiB")
    return {"check": "memory_kind", "ok": bool(ok), "detail": detail}


def fraction_enforced(device: str, fraction: float) -> dict[str, Any]:
    """Cap this process at `fraction` the way a packed trial is capped, and show that the cap holds.

    Allocating more than the cap must raise torch.OutOfMemoryError even though the GPU has room.
    The cap is left at `fraction` (the caller restores it). Used by part 2 and tests/test_gpu.py.
    """
    import torch

    from trainables.qlora import _gpu_share

    facts = _gpu_share(device, fraction)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    over = int(total * min(1.0, fraction + 0.1))
    try:
        blob = torch.empty(over, dtype=torch.uint8, device=device)
        del blob
        raised = False
    except torch.OutOfMemoryError:
        raised = True
    torch.cuda.empty_cache()
    return {**facts, "allocation_above_cap_mib": round(over / MIB), "raised_oom": raised}


def packed_trial(run: Run, fraction: float) -> dict[str, Any]:
    """One packed trial at a `fraction` share, then (on CUDA) proof that the share's cap holds in this process."""
    from sweeps.plan import trial_job
    from trainables.qlora import run_trial

    point = Point("1b", 8, "qv", 1, 32 if run.dry_run else 512, optimizer="adamw_torch" if run.dry_run else "paged_adamw_32bit")
    spec = spec_for(run, random_model(run, "1b"), point, steps=run.steps)
    began = time.time()
    last = run_trial(trial_config(point), trial_job(spec), report=lambda m, c=None: None, gpu_fraction=fraction)
    out = {k: last.get(k) for k in ("trial_status", "memory_kind", "peak_memory_mib", "gpu_fraction",
                                    "gpu_fraction_enforced", "gpu_fraction_note", "tensor_peak_mib")}
    out.update(started_at=began, ended_at=time.time(), pid=os.getpid(), step=last.get("step"))
    if not run.dry_run:
        out["cap"] = fraction_enforced("cuda:0", fraction)
    return out


def packed_child(args: argparse.Namespace) -> int:
    """The second packed trial, in its own process (as Ray runs packed trials in separate workers)."""
    run = Run(out_dir=Path(args.out_dir), models_dir=Path(args.models_dir), dry_run=args.dry_run, budget_s=args.budget_s)
    run.device = "cpu" if args.dry_run else "cuda"
    import bitsandbytes  # noqa: F401 - the slow imports happen before the barrier, not inside the trial
    import peft  # noqa: F401
    import trl  # noqa: F401

    from trainables.qlora import quiet_libraries

    quiet_libraries()
    # A barrier: this process says it is ready, then both trials start when the parent says go.
    Path(args.child_out + ".ready").write_text("ready")
    go, deadline = Path(args.child_out + ".go"), time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    Path(args.child_out).write_text(json.dumps(packed_trial(run, args.fraction), default=str))
    return 0


def check_packing(run: Run) -> dict[str, Any]:
    """Two trials at a 0.5 share at the same time, in two processes (this one and a child); each enforces its cap on CUDA."""
    random_model(run, "1b")  # built here, before the child needs it
    child_out = run.work / "packed-child.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--packed-child", "--fraction", "0.5",
               "--child-out", str(child_out), "--out-dir", str(run.out_dir), "--models-dir", str(run.models_dir),
               "--budget-s", str(run.budget_s)] + (["--dry-run"] if run.dry_run else [])
    proc = subprocess.Popen(command, cwd=_common.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ready = Path(str(child_out) + ".ready")
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the child loads its libraries first; then both trials start together
    Path(str(child_out) + ".go").write_text("go")
    try:
        outcomes = [packed_trial(run, 0.5)]
    finally:
        if not run.dry_run:
            import torch

            torch.cuda.set_per_process_memory_fraction(1.0, 0)  # this process gets the whole GPU back
    _, stderr = proc.communicate(timeout=300)
    if proc.returncode != 0 or not child_out.exists():
        outcomes.append({"failed": True, "returncode": proc.returncode, "stderr": stderr[-1500:]})
    else:
        outcomes.append(json.loads(child_out.read_text()))
    finished = [o for o in outcomes if not o.get("failed") and not o.get("trial_status") and o.get("step")]
    overlap = len(finished) == 2 and max(o["started_at"] for o in finished) < min(o["ended_at"] for o in finished)
    if run.dry_run:
        ok = len(finished) == 2 and all(o.get("gpu_fraction_enforced") is False for o in finished)
        detail = "dry run: both trials finished; the share is logical on CPU (gpu_fraction_enforced false, as reported)"
    else:
        ok = len(finished) == 2 and all(o.get("gpu_fraction_enforced") and o["cap"]["raised_oom"] for o in finished)
        detail = "both trials finished under a 0.5 cap, and in each process an allocation above the cap raised OOM"
    return {"check": "packing at 0.5", "ok": bool(ok), "overlapped": overlap,
            "detail": detail + f"; the two trials {'overlapped' if overlap else 'did not overlap'} in time",
            "trials": outcomes}


def injected_oom(context: Any) -> Any:
    """Dry run: raise torch.OutOfMemoryError at the first step (CPU has no allocator cap to hit)."""
    import torch
    from transformers import TrainerCallback

    class InjectedOutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise torch.OutOfMemoryError("dry run: injected out of memory (no CUDA cap on CPU)")

    return InjectedOutOfMemory()


def check_oom_then_next(run: Run) -> dict[str, Any]:
    """A batch too large under a capped fraction ends as oom; the next trial in this process then runs."""
    from sweeps.plan import trial_job
    from trainables.qlora import run_trial

    folder = random_model(run, "1b")
    small = Point("1b", 8, "qv", 1, 512 if not run.dry_run else 32, optimizer="adamw_torch" if run.dry_run else "paged_adamw_32bit")
    big = Point("1b", 8, "all-linear", 16 if not run.dry_run else 4, 2048 if not run.dry_run else 32,
                optimizer=small.optimizer, checkpointing=False)
    fraction, callbacks = 1.0, ()
    if run.dry_run:
        callbacks = (injected_oom,)
    else:
        import torch

        # A cap 1.5x what the small trial is predicted to hold: the big one cannot fit under it.
        need = predicted_parts(folder, spec_for(run, folder, small, steps=run.steps), small, "cuda")["reserved_mib"] * MIB
        fraction = min(0.9, 1.5 * need / torch.cuda.get_device_properties(0).total_memory)
    spec = spec_for(run, folder, big, steps=run.steps, oom_retry=False)
    first = run_trial(trial_config(big), trial_job(spec), report=lambda m, c=None: None, gpu_fraction=fraction,
                      callbacks=callbacks)
    spec = spec_for(run, folder, small, steps=run.steps)
    second = run_trial(trial_config(small), trial_job(spec), report=lambda m, c=None: None, gpu_fraction=1.0)
    ok = first.get("trial_status") == "oom" and not second.get("trial_status") and second.get("step") == run.steps
    return {
        "check": "oom, then the next trial",
        "ok": bool(ok),
        "detail": ("dry run: OOM injected by a callback (no allocator cap on CPU); " if run.dry_run else
                   f"cap {fraction:.4f} of the GPU; ") + f"first: status {first.get('trial_status')} "
                  f"({(first.get('oom_message') or '')[:120]}); next: {second.get('step')} steps, "
                  f"status {second.get('trial_status') or 'finished'}",
        "fraction": fraction,
    }


def check_paths(run: Run, results: dict[str, Any]) -> None:
    """Part 2, and the GPU pytest tests (tests/test_gpu.py) when pytest is importable and a GPU is there."""
    checks = [check_cuda_reserved(results, run.dry_run)]
    for check in (check_packing, check_oom_then_next):
        try:
            checks.append(check(run))
        except Exception as exc:
            checks.append({"check": check.__name__, "ok": False, "detail": f"{type(exc).__name__}: {exc}"[:400]})
    results["paths"] = {"checks": checks, "gpu_tests": gpu_tests(run)}


def gpu_tests(run: Run) -> dict[str, Any]:
    """`pytest -m gpu tests/test_gpu.py`: on the GPU machine part of this run; skipped in a dry run."""
    if run.dry_run:
        return {"ran": False, "reason": "dry run: the gpu tests skip without CUDA (tests/test_gpu.py)"}
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"ran": False, "reason": "pytest is not installed here; carry its wheel to run tests/test_gpu.py"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
                          cwd=_common.REPO, capture_output=True, text=True, timeout=180)
    return {"ran": True, "returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-1500:]}


# --- part 3: throughput ----------------------------------------------------------------------------------


def model_flops_per_token(config: dict[str, Any], seq: int) -> float:
    """6N + 12 L h s (PaLM's model FLOPs per token; N = every matmul weight, the LM head included)."""
    from trainables.memory_estimator import model_shape

    shape = model_shape(config)
    n = sum(layer.numel for layer in shape.linears)
    return 6.0 * n + 12.0 * shape.layers * shape.heads * shape.head_dim * seq


def peak_flops(device_name: str) -> tuple[float | None, str]:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value, f"{key} dense bf16 {value / 1e12:.0f} TFLOP/s"
    return None, f"unknown peak for {device_name!r}"


def throughput(run: Run, point: Point, results: dict[str, Any], repeats: int) -> None:
    """Part 3: ours and the bare loop, interleaved; the first run of ours also calibrates its point."""
    import trainable_throughput as tt

    folder = random_model(run, point.shape)
    spec = spec_for(run, folder, point, steps=run.steps + (2 if run.dry_run else 5))
    config = json.loads((folder / "config.json").read_text())
    data = prepared_data(spec, folder)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "bare": []}
    order = [name for i in range(repeats) for name in (("ours", "bare") if i % 2 == 0 else ("bare", "ours"))]
    per_run = 3.0 if run.dry_run else SECONDS_THROUGHPUT_RUN
    for name in order:
        if run.left_s < per_run:
            break
        print(f"[{run.elapsed_s:5.0f} s] throughput {name}", file=sys.stderr, flush=True)
        if name == "ours":
            seen: dict[str, Any] = {}
            reports: list[dict[str, Any]] = []
            result = tt.run_ours(spec, data, trial=trial_config(point), callbacks=(parts_probe(run.device, seen),),
                                 reports=reports)
            if not runs["ours"] and reports:
                last = reports[-1]
                predicted = predicted_parts(folder, spec, point, "cpu" if run.dry_run else "cuda")
                results.setdefault("calibration", {"points": []})["points"].append({
                    "point": point.name, **{k: getattr(point, k) for k in ("shape", "r", "targets", "batch", "seq",
                                                                          "checkpointing", "optimizer")},
                    "status": last.get("trial_status") or "ok", "seconds": round(result["wall_s"], 1),
                    "measured": measured_figures(last, seen), "predicted": predicted,
                    "error_pct": point_errors(last, seen, predicted, run.dry_run), "from": "throughput run of ours",
                })
                summarize_calibration(results["calibration"], run.dry_run)
        else:
            result = tt.run_bare(spec, str(folder), data, trial=trial_config(point), device=run.device)
        runs[name].append(result)
    flops = model_flops_per_token(config, point.seq)
    peak, peak_note = (None, "CPU: no MFU") if run.dry_run else peak_flops(_device_name())
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        rates = [r["tokens_per_s"] for r in rs]
        median = statistics.median(rates) if rates else None
        summary[name] = {"tokens_per_s": _common.stats(rates),
                         "mfu": round(median * flops / peak, 4) if median and peak else None}
    pairs = list(zip(runs["ours"], runs["bare"]))
    summary["ratio_ours_over_bare"] = _common.stats([a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs])
    results["throughput"] = {
        "point": point.name, "shape": run.label(point.shape), "steps": spec.train.max_steps, "repeats": repeats,
        "flops_per_token": flops, "peak_flops_note": peak_note, "summary": summary, "runs": runs,
        "note": "dry run: CPU tokens/s of tiny shapes, meaningless as GPU throughput" if run.dry_run else
                "training tokens/s: tokens over Trainer.train minus evaluation (benchmarks/trainable_throughput.py)",
    }


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# --- part 4: four adapters on one base ----------------------------------------------------------------------


def multi_adapter(run: Run, results: dict[str, Any], shape: str, batch_per_adapter: int, seq: int, adapters: int = 4) -> None:
    """One step of `adapters` LoRA adapters trained together on one 4-bit base, against one solo step each.

    Together: one batch of `adapters` sub-batches, each routed to its adapter by peft's mixed-adapter
    forward (adapter_names, injected into every LoRA layer's forward as peft does for inference, since
    peft refuses the argument in training mode), one backward, a separate AdamW per adapter. Solo: the
    same adapters one at a time on their own sub-batch. Bare torch loop (no trl): the comparison is
    about the shared base, not the trainer. Time per round and peak memory, after one warm-up round.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from trainables.memory_probe import TensorPeakProbe
    from trainables.settings import ModelSpec, TrainSpec
    from trainables.training_setup import TrainingSetup

    folder = random_model(run, shape)
    model_spec = ModelSpec(path=str(folder))
    setup = TrainingSetup.resolve(model_spec, TrainSpec(gradient_checkpointing=True), run.device)
    base = setup.load_model(str(folder), model_spec)
    names = [f"adapter{i}" for i in range(adapters)]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora)
    params = {name: [p for n, p in model.named_parameters() if f".{name}." in n] for name in names}
    for group in params.values():
        for p in group:
            p.requires_grad_(True)
    optimizers = {name: torch.optim.AdamW(group, lr=1e-4) for name, group in params.items()}
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 100), (adapters * batch_per_adapter, seq), generator=generator).to(run.device)
    routed = [name for name in names for _ in range(batch_per_adapter)]
    model.train()

    def sync() -> None:
        if run.device.startswith("cuda"):
            torch.cuda.synchronize()

    def together() -> None:
        handles = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "adapter_names": routed}), with_kwargs=True)
                   for m in model.modules() if isinstance(m, LoraLayer)]
        try:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def solo() -> None:
        for i, name in enumerate(names):
            model.base_model.set_adapter(name)
            for p in params[name]:
                p.requires_grad_(True)
            sub = ids[i * batch_per_adapter:(i + 1) * batch_per_adapter]
            model(input_ids=sub, labels=sub).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        model.base_model.set_adapter(names)  # every adapter active (and trainable) again
        for group in params.values():
            for p in group:
                p.requires_grad_(True)

    measured: dict[str, Any] = {}
    for label, step in (("together", together), ("solo", solo)):
        step()  # warm-up: the optimizer states exist from here
        sync()
        probe = TensorPeakProbe() if not run.device.startswith("cuda") else None
        if probe is None:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            probe.start("train", model, _CombinedOptimizer(optimizers))
        began = time.perf_counter()
        step()
        sync()
        seconds = time.perf_counter() - began
        if probe is None:
            peak = {"max_memory_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1),
                    "max_memory_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB, 1)}
        else:
            probe.stop()
            peak = {"tensor_peak_mib": round(probe.reading().peak_bytes / MIB, 4)}
        measured[label] = {"seconds": round(seconds, 4), **peak}
    results["multi"] = {
        "shape": run.label(shape), "adapters": adapters, "batch_per_adapter": batch_per_adapter, "seq": seq,
        "measured": measured,
        "speedup_together_over_solo": round(measured["solo"]["seconds"] / measured["together"]["seconds"], 3),
        "note": "dry run: CPU timings of a tiny shape; the memory is the CPU tensor peak" if run.dry_run else
                "one round = 4 sub-batches; peak over the measured round (after a warm-up round)",
    }
    del model, base, optimizers
    _free(run.device)


class _CombinedOptimizer:
    """The states of several optimizers, as one `optimizer.state` (what the tensor probe counts)."""

    def __init__(self, optimizers: dict[str, Any]) -> None:
        self.state = {k: v for o in optimizers.values() for k, v in o.state.items()}


def _free(device: str) -> None:
    from trainables.memory_probe import free_memory

    free_memory(device)


# --- output ---------------------------------------------------------------------------------------------------


def environment(run: Run) -> dict[str, Any]:
    """Versions, the GPU, and what is missing (the wheels to carry, docs/gpu-calibration.md)."""
    import importlib

    info: dict[str, Any] = {"python": sys.version.split()[0], "dry_run": run.dry_run}
    try:
        from packaging.tags import sys_tags

        info["wheel_tag"] = str(next(iter(sys_tags())))  # which binary wheels (pyarrow, pydantic_core) fit here
    except Exception:
        info["wheel_tag"] = "unknown"
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "pyarrow", "pandas",
                 "pydantic", "yaml", "huggingface_hub", "pytest", "pynvml"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as exc:  # missing or broken: reported, the parts that need it fail with the reason
            info[name] = f"missing ({type(exc).__name__})"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_total_mib"] = round(props.total_memory / MIB)
    return info


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    dry = results["dry_run"]
    env = results["environment"]
    lines = [f"# GPU truth{' - ' + DRY_RUN_LABEL if dry else ''}", ""]
    if dry:
        lines += [f"**{DRY_RUN_LABEL}.** Memory is host RSS and the CPU tensor peak (cpu_tensor_peak), predicted with "
                  "the CPU setup (fp32); the GPU share is logical and the out-of-memory injected.", ""]
    lines += [
        f"Command: `{results['command']}`  ",
        f"Device: {env.get('gpu', 'CPU')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), transformers "
        f"{env.get('transformers')}, peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}, trl {env.get('trl')}; "
        f"Python {env.get('python')}  ",
        f"Finished in {results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in results.get("part_seconds", {}).items()) + ").",
        "",
    ]
    calibration = results.get("calibration")
    if calibration:
        measured_col = "tensor peak (MiB)" if dry else "max reserved (MiB)"
        lines += ["## 1. Calibration: predicted vs measured", ""]
        if dry:
            lines += [f"Dry run: `1b` and `8b` name tiny stand-ins ({results['shapes']['1b']}; {results['shapes']['8b']}); "
                      "measured is the CPU tensor peak, predicted the estimator's allocated bytes for the CPU setup.", ""]
        else:
            lines += [f"Shapes: {results['shapes']['1b']}; {results['shapes']['8b']}. Error = (predicted - measured) / "
                      "measured; reserved is compared with torch.cuda.max_memory_reserved, allocated with "
                      "max_memory_allocated.", ""]
        header = ["point", "status", measured_col, "predicted", "error"]
        header += ([] if dry else ["max allocated (MiB)", "predicted", "error"])
        header += ["static err", "optimizer err", "dynamic err", "s"]
        rows = []
        for p in calibration["points"]:
            if p.get("status") != "ok":
                rows.append([p["point"], p.get("status"), p.get("reason") or p.get("error", "")] + [""] * (len(header) - 3))
                continue
            m, pr, e = p["measured"], p["predicted"], p["error_pct"]
            if dry:
                row = [p["point"], "ok", fmt(m.get("tensor_peak_mib"), 3), fmt(pr["allocated_mib"], 3),
                       _signed(e.get("allocated_vs_tensor_peak"))]
            else:
                row = [p["point"], "ok", fmt(m.get("peak_memory_mib")), fmt(pr["reserved_mib"]), _signed(e.get("reserved")),
                       fmt(m.get("cuda_allocated_mib")), fmt(pr["allocated_mib"]), _signed(e.get("allocated"))]
            row += [_signed(e.get("static")), _signed(e.get("optimizer")), _signed(e.get("dynamic")), fmt(p.get("seconds"))]
            rows.append(row)
        lines.append(_common.table(header, rows, align="l" + "l" + "r" * (len(header) - 2)))
        s = calibration.get("summary", {})
        keys = ("allocated_vs_tensor_peak",) if dry else ("reserved", "allocated")
        lines += ["", f"Measured {s.get('points_measured')} of {s.get('points_total')} points. Median absolute error: "
                  + ", ".join(f"{k} {fmt(s.get(f'median_abs_error_pct_{k}'), 2)}%" for k in (*keys, "static", "optimizer",
                                                                                             "dynamic"))
                  + ". Static: weights, quantization states and adapters after loading; optimizer: states after step 1 "
                    "(paged states live outside the allocator); dynamic: the rest of the peak (activations, logits, "
                    "gradients, workspace).", ""]
        lines += ["### Predicted parts (MiB)", ""]
        part_names = ["linear_weights", "quant_constants", "other_weights", "lora_weights", "lora_grads", "optimizer_state",
                      "paged_optimizer_state", "activations", "logits", "dequant_workspace", "allocator_overhead"]
        rows = [[p["point"], *[fmt(p["predicted"]["parts_mib"].get(n), 2) for n in part_names]]
                for p in calibration["points"] if p.get("status") == "ok"]
        lines += [_common.table(["point", *part_names], rows), ""]
    paths = results.get("paths")
    if paths:
        lines += ["## 2. GPU-only paths", ""]
        lines.append(_common.table(["check", "ok", "detail"], [[c["check"], "yes" if c["ok"] else "NO", c["detail"]]
                                                                for c in paths["checks"]], align="lll"))
        tests = paths["gpu_tests"]
        lines += ["", f"GPU pytest tests: {'returncode ' + str(tests['returncode']) if tests.get('ran') else tests['reason']}", ""]
    tp = results.get("throughput")
    if tp:
        s = tp["summary"]
        lines += [f"## 3. Throughput: {tp['point']} ({tp['shape']}), {tp['steps']} steps", "", tp["note"], ""]
        lines.append(_common.table(["variant", "training tokens/s", "MFU (6N + attention)"],
                                   [[n, _common.spread(s[n]["tokens_per_s"], 0), fmt(s[n]["mfu"], 3)] for n in ("ours", "bare")]))
        lines += ["", f"Ratio ours / bare: {_common.spread(s['ratio_ours_over_bare'], 3)} (target >= 0.95). "
                  f"Peak: {tp['peak_flops_note']}.", ""]
    multi = results.get("multi")
    if multi:
        lines += [f"## 4. {multi.get('adapters', 4)} adapters on one base vs solo steps", ""]
        if "skipped" in multi:
            lines += [f"Skipped: {multi['skipped']}", ""]
        else:
            m = multi["measured"]
            memory = "tensor_peak_mib" if dry else "max_memory_allocated_mib"
            lines.append(_common.table(["mode", "seconds per round", f"peak ({memory})"],
                                       [[k, fmt(v["seconds"], 4), fmt(v.get(memory), 3)] for k, v in m.items()]))
            lines += ["", f"{multi['note']}; together is {multi['speedup_together_over_solo']}x the speed of solo.", ""]
    return "\n".join(lines)


def _signed(value: Any) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


# --- main ------------------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every code path on CPU on tiny shapes (not GPU figures)")
    p.add_argument("--out-dir", type=Path, default=Path("gpu-truth"), help="where gpu_truth.json and gpu_truth.md go")
    p.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-truth-models",
                   help="where the random-weight models are saved once (not under --out-dir: 8B is 16 GB)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help=f"time budget (default {DEFAULT_BUDGET_S} s)")
    p.add_argument("--parts", default="calibrate,paths,throughput,multi", help="comma-separated parts to run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each throughput variant (default 2)")
    p.add_argument("--check-env", action="store_true",
                   help="print the versions, the GPU and the missing packages as JSON, and exit (a cheap first call)")
    p.add_argument("--packed-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.packed_child:
        return packed_child(args)

    if not args.check_env:
        from trainables.qlora import quiet_libraries

        quiet_libraries()
    run = Run(out_dir=args.out_dir, models_dir=args.models_dir, dry_run=args.dry_run, budget_s=args.budget_s)
    env = environment(run)
    if args.check_env:
        print(json.dumps(env, indent=2))
        return 0 if not any(str(v).startswith("missing") for k, v in env.items() if k in REQUIRED) else 3
    if not args.dry_run and not env["cuda_available"]:
        print("no CUDA device: run with --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    run.device = "cpu" if args.dry_run else "cuda"
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {"dry_run": args.dry_run, "label": DRY_RUN_LABEL if args.dry_run else "GPU measurements",
                               "environment": env, "budget_s": args.budget_s, "command": _common.command_line()}
    results["shapes"] = {shape: run.label(shape) for shape in ("1b", "8b")}
    grid = dry_run_grid() if args.dry_run else calibration_grid()
    throughput_point = grid[-1] if args.dry_run else Point("8b", 16, "all-linear", 4, 2048)
    timings: dict[str, float] = {}
    results["part_seconds"] = timings

    def timed(name: str, fn: Any, *fn_args: Any) -> None:
        began = run.elapsed_s
        try:
            fn(*fn_args)
        finally:
            timings[name] = round(run.elapsed_s - began, 1)

    try:
        # Calibration takes what the later parts leave: the paths, and one run of each throughput variant.
        reserve = 0.0 if args.dry_run else (
            SECONDS_PATHS * ("paths" in parts) + 2 * SECONDS_THROUGHPUT_RUN * ("throughput" in parts)
        )
        if "calibrate" in parts:
            timed("calibrate", calibrate, run, grid, results, throughput_point if "throughput" in parts else None, reserve)
        if "paths" in parts:
            timed("paths", check_paths, run, results)
        if "throughput" in parts:
            timed("throughput", throughput, run, throughput_point, results, 1 if args.dry_run else args.repeats)
        if "multi" in parts:
            if run.left_s >= (0 if args.dry_run else MULTI_MIN_LEFT_S):
                timed("multi", multi_adapter, run, results, "8b", 1 if args.dry_run else 2, 32 if args.dry_run else 2048)
            else:
                results["multi"] = {"skipped": f"{run.left_s:.0f} s left, under the {MULTI_MIN_LEFT_S} s it needs"}
    finally:
        results["elapsed_s"] = round(run.elapsed_s, 1)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"machine": _common.machine(), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **results}
        (run.out_dir / "gpu_truth.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (run.out_dir / "gpu_truth.md").write_text(markdown(results) + "\n")
        shutil.rmtree(run.work, ignore_errors=True)
    print(markdown(results))
    print(f"\nraw figures: {run.out_dir / 'gpu_truth.json'}\ntables: {run.out_dir / 'gpu_truth.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
