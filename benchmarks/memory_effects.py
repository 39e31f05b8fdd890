"""Memory effects a QLoRA sweep should reproduce: rank, double quantization, target modules.

Run from the repository root, holding the machine-wide lock (a few minutes on 2 cores):

    flock /tmp/qlora-heavy.lock .venv/bin/python benchmarks/memory_effects.py --repeats 3 \
        --out /tmp/memory_effects.json

No GPU here, so every VRAM figure is a PREDICTION of trainables/memory_estimator.py (set up as the
trainable trains, trainables/trial_memory.py; docs/memory.md), never a measurement. What is measured
is labelled as such: host RSS of a real tiny-model trial on CPU (one fresh process per measurement,
the trial's own `peak_memory_mib` with memory_kind host_rss), byte counts of the quantization state
bitsandbytes really built, PEFT's trainable-parameter counts, and eval losses of real trials.

1. Rank: predicted peak VRAM of Llama-3-8B (a config-only LlamaConfig, nothing downloaded) at
   batch 1, seq 512 for r = 4..64, and the tiny model's measured host RSS at r = 8 and 16.
2. Double quantization: the 8B's quantization-constant bytes with and without it, and the same
   bytes measured on the tiny model's real 4-bit layers (where it costs more, see docs/memory.md).
3. Target modules: all-linear against q,v: memory (8B predicted, tiny measured) and eval loss at
   equal steps on the smoke task over learning rates x seeds (paired, median of the differences).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import _common

SCRIPT = Path(__file__).resolve()
MIB = 2**20
GIB = 2**30
RANKS = (4, 8, 16, 32, 64)

# RSS measurements: (label, r, target_modules, double_quant).
RSS_CASES = (
    ("r=8, qv, DQ", 8, "qv", True),
    ("r=16, qv, DQ", 16, "qv", True),
    ("r=8, all-linear, DQ", 8, "all-linear", True),
    ("r=16, all-linear, DQ", 16, "all-linear", True),
    ("r=8, qv, no DQ", 8, "qv", False),
)


def llama3_8b() -> Any:
    """Llama-3-8B's shapes as a config only (no weights, no download)."""
    from transformers import LlamaConfig

    from trainables.memory_estimator import LLAMA3_8B_CONFIG

    return LlamaConfig(**{k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "model_type"})


def sweep_spec(double_quant: bool = True, seq_len: int = 512, batch_size: int = 1, steps: int = 20,
               eval_size: float = 40, seed: int = 0) -> Any:
    """The sweep settings the predictions and the tiny trials use (NF4, compute auto, ckpt, optimizer auto)."""
    from sweeps.spec import parse_spec

    return parse_spec(
        _common.spec_dict(
            name="memory-effects",
            model={"double_quant": double_quant},
            data={"max_seq_length": seq_len, "eval_size": eval_size},
            train={"max_steps": steps, "eval_every": min(10, steps), "batch_size": batch_size, "seed": seed},
        )
    )


# --- predictions (no GPU: the estimator, set up as the trainable trains) -------------------------


def predict_8b() -> dict[str, Any]:
    from trainables.memory_estimator import quantized_weight_parts
    from trainables.training_setup import TrainingSetup
    from trainables.trial_memory import MemoryKnobs, estimate_for_trial

    config = llama3_8b()
    out: dict[str, Any] = {"by_rank": [], "double_quant": {}}
    for targets in ("qv", "all-linear"):
        for r in RANKS:
            for dq in (True, False):
                spec = sweep_spec(double_quant=dq)
                setup = TrainingSetup.resolve(spec.model, spec.train, "cuda", bf16_supported=True)
                est = estimate_for_trial(config, setup, MemoryKnobs(r=r, target_modules=targets, batch_size=1, seq_len=512))
                out["by_rank"].append({
                    "r": r, "target_modules": targets, "double_quant": dq,
                    "reserved_gib": est.total_gib, "with_context_gib": est.total_with_context_gib,
                    "lora_params": est.lora_params,
                    "lora_state_mib": (est.lora_weights_bytes + est.lora_grads_bytes + est.optimizer_state_bytes
                                       + est.paged_optimizer_state_bytes) / MIB,
                    "activations_mib": est.activations_bytes / MIB,
                    "quant_constants_mib": est.quant_constants_bytes / MIB,
                })
    for dq in (True, False):
        packed, constants = quantized_weight_parts(config, "nf4", dq)
        out["double_quant"][str(dq)] = {"packed_bytes": packed, "constants_bytes": constants,
                                        "quantized_params": 2 * packed, "bits_per_param": 8 * constants / (2 * packed)}
    return out


# --- measurements on the tiny model (CPU) ------------------------------------------------------


def tiny_quant_state() -> dict[str, Any]:
    """Bytes of the quantization state bitsandbytes built for the tiny model's 4-bit layers."""
    import torch
    from transformers import AutoConfig

    from trainables.memory_estimator import quantized_weight_parts
    from trainables.training_setup import TrainingSetup

    path = _common.warm_model_cache()
    out = {}
    for dq in (True, False):
        spec = sweep_spec(double_quant=dq)
        model = TrainingSetup.resolve(spec.model, spec.train, "cpu").load_model(path, spec.model, for_training=False)
        layers, constants, weights = 0, 0, 0
        for param in model.parameters():
            state = getattr(param, "quant_state", None)
            if state is None:
                continue
            layers += 1
            weights += int(torch.Size(state.shape).numel())
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
            constants += sum(t.numel() * t.element_size() for t in tensors)
        _, predicted = quantized_weight_parts(AutoConfig.from_pretrained(path), "nf4", dq)
        out[str(dq)] = {"layers": layers, "quantized_params": weights, "constants_bytes": constants,
                        "predicted_constants_bytes": predicted, "bits_per_param": 8 * constants / weights}
        del model
    return out


def rss_child(r: int, targets: str, double_quant: bool) -> dict[str, Any]:
    """One real 20-step tiny trial in this (fresh) process; its peak RSS as the trial reports it."""
    from sweeps.plan import trial_job
    from trainables.qlora import run_trial

    spec = sweep_spec(double_quant=double_quant, seq_len=64, batch_size=8)
    trial = {**_common.TINY_TRIAL, "r": r, "lora_alpha": 2.0 * r, "target_modules": targets}
    last = run_trial(trial, trial_job(spec), report=lambda metrics, checkpoint_dir=None: None)
    return {"peak_memory_mib": last["peak_memory_mib"], "memory_kind": last["memory_kind"],
            "trainable_params": last["trainable_params"], "predicted_vram_mib": last["predicted_memory_mib"]}


def measure_rss(repeats: int, cases: tuple[tuple[str, int, str, bool], ...]) -> dict[str, Any]:
    """Each case in a fresh process, `repeats` times, interleaved."""
    raw: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in cases}
    for repeat in range(repeats):
        for label, r, targets, dq in cases if repeat % 2 == 0 else tuple(reversed(cases)):
            cmd = [sys.executable, str(SCRIPT), "--rss-child", json.dumps([r, targets, dq])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"RSS measurement {label} failed:\n{proc.stderr[-3000:]}")
            raw[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[repeat {repeat + 1}/{repeats}] {label}: {raw[label][-1]['peak_memory_mib']} MiB RSS",
                  file=sys.stderr, flush=True)
    return {
        label: {
            "peak_rss_mib": _common.stats([x["peak_memory_mib"] for x in xs]),
            "memory_kind": xs[0]["memory_kind"],
            "trainable_params": xs[0]["trainable_params"],
            "predicted_vram_mib": xs[0]["predicted_vram_mib"],
        }
        for label, xs in raw.items()
    }


def target_quality(lrs: list[float], seeds: list[int], steps: int) -> dict[str, Any]:
    """Eval loss after `steps` steps, q,v vs all-linear, for every (learning rate, seed): real trials."""
    from sweeps.plan import trial_job
    from trainables.data import prepare_data
    from trainables.qlora import run_trial
    from trainables.settings import ModelSpec
    from trainables.training_setup import load_tokenizer

    path = _common.warm_model_cache()
    tokenizer = load_tokenizer(path, ModelSpec(path=path))
    rows = []
    for lr in lrs:
        for seed in seeds:
            spec = sweep_spec(seq_len=64, batch_size=8, steps=steps, eval_size=0.1, seed=seed)
            data = prepare_data(str(_common.SMOKE_DATA), spec.data, tokenizer)
            losses = {}
            for targets in ("qv", "all-linear"):
                trial = {**_common.TINY_TRIAL, "r": 8, "lora_alpha": 16.0, "target_modules": targets, "learning_rate": lr}
                last = run_trial(trial, trial_job(spec), report=lambda metrics, checkpoint_dir=None: None, data=data)
                losses[targets] = float(last["eval_loss"])
            rows.append({"learning_rate": lr, "seed": seed, **losses})
            print(f"lr={lr:g} seed={seed}: qv {losses['qv']:.4f}, all-linear {losses['all-linear']:.4f}",
                  file=sys.stderr, flush=True)
    diffs = [row["all-linear"] - row["qv"] for row in rows]
    return {
        "steps": steps,
        "rows": rows,
        "diff_all_linear_minus_qv": _common.stats(diffs),
        "all_linear_better": sum(d < 0 for d in diffs),
        "pairs": len(diffs),
        "by_lr": {
            str(lr): {
                "qv": statistics.median(r["qv"] for r in rows if r["learning_rate"] == lr),
                "all-linear": statistics.median(r["all-linear"] for r in rows if r["learning_rate"] == lr),
            }
            for lr in lrs
        },
    }


# --- report ----------------------------------------------------------------------------------


def main() -> int:
    p = _common.parser(__doc__.split("\n\n")[0], repeats=3)
    p.add_argument("--steps", type=int, default=80, help="training steps for the target-module comparison (default 80)")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        r, targets, dq = json.loads(args.rss_child)
        print(json.dumps(rss_child(int(r), str(targets), bool(dq))))
        return 0
    lrs, seeds, cases = [1e-3, 3e-3, 1e-2], [0, 1, 2], RSS_CASES
    if args.quick:
        args.repeats, args.steps, lrs, seeds, cases = 1, 10, [1e-2], [0], RSS_CASES[:1]

    _common.warm_model_cache()
    result = {
        "predicted_8b": predict_8b(),
        "tiny_quant_state": tiny_quant_state(),
        "tiny_rss": measure_rss(args.repeats, cases),
        "target_quality": target_quality(lrs, seeds, args.steps),
    }
    print(render(result, args, _common.machine()))
    _common.write_json(args.out, {"repeats": args.repeats, **result})
    return 0


def render(result: dict[str, Any], args: Any, info: dict[str, Any]) -> str:
    s = _common.spread
    p8 = result["predicted_8b"]
    lines = [
        "## Memory effects",
        "",
        f"Machine: {_common.describe_machine(info)}",
        "",
        "### 1. Rank: Llama-3-8B, NF4 + DQ, bf16, paged AdamW 32-bit, gradient checkpointing, batch 1, seq 512 "
        "(PREDICTED VRAM, trainables/memory_estimator.py; no GPU here)",
        "",
    ]
    rows = []
    for targets in ("qv", "all-linear"):
        rs = [x for x in p8["by_rank"] if x["target_modules"] == targets and x["double_quant"]]
        for x in rs:
            rows.append([targets, x["r"], f"{x['lora_params']:,}", f"{x['lora_state_mib']:.1f}", f"{x['activations_mib']:.1f}",
                         f"{x['reserved_gib']:.3f}", f"{x['with_context_gib']:.3f}"])
    lines.append(_common.table(
        ["targets", "r", "LoRA params", "LoRA weights + grads + optimizer (MiB)", "activations (MiB)",
         "predicted reserved (GiB)", "+ context + paged states (GiB)"], rows))
    for targets in ("qv", "all-linear"):
        by_r = {x["r"]: x for x in p8["by_rank"] if x["target_modules"] == targets and x["double_quant"]}
        a, b = by_r[8], by_r[16]
        lines.append(f"\n{targets}: r=8 -> r=16 changes predicted reserved VRAM by "
                     f"{(b['reserved_gib'] - a['reserved_gib']) * 1024:+.1f} MiB "
                     f"({100 * (b['reserved_gib'] / a['reserved_gib'] - 1):+.2f}%), with context and paged states "
                     f"{100 * (b['with_context_gib'] / a['with_context_gib'] - 1):+.2f}%.")
    tiny = result["tiny_rss"]
    lines += ["", "Tiny model (builtin:tiny-llama, 20 steps, batch 8, seq <= 64, CPU): MEASURED host RSS peak of the trial "
              f"process (memory_kind host_rss, not VRAM), median (min–max) of {args.repeats} fresh processes:", ""]
    rows = [[label, f"{v['trainable_params']:,}", s(v["peak_rss_mib"], 1), f"{v['predicted_vram_mib']:.1f}"] for label, v in tiny.items()]
    lines.append(_common.table(["trial", "trainable params (PEFT)", "peak host RSS (MiB, measured)",
                                "predicted VRAM on a GPU (MiB)"], rows))

    dq8, qt = p8["double_quant"], result["tiny_quant_state"]
    on, off = dq8["True"], dq8["False"]
    lines += [
        "",
        "### 2. Double quantization (quantization constants of the 4-bit layers)",
        "",
        _common.table(
            ["model", "source", "constants, no DQ (bytes)", "constants, DQ (bytes)", "DQ saves (bytes)",
             "bits/param no DQ", "bits/param DQ"],
            [
                ["Llama-3-8B", "estimator (exact bitsandbytes arithmetic)", f"{off['constants_bytes']:,}",
                 f"{on['constants_bytes']:,}", f"{off['constants_bytes'] - on['constants_bytes']:,}",
                 f"{off['bits_per_param']:.3f}", f"{on['bits_per_param']:.3f}"],
                ["tiny-llama", "measured: quant_state tensors bitsandbytes built", f"{qt['False']['constants_bytes']:,}",
                 f"{qt['True']['constants_bytes']:,}", f"{qt['False']['constants_bytes'] - qt['True']['constants_bytes']:,}",
                 f"{qt['False']['bits_per_param']:.3f}", f"{qt['True']['bits_per_param']:.3f}"],
            ],
        ),
        "",
        f"tiny-llama: {qt['True']['layers']} quantized layers, {qt['True']['quantized_params']:,} quantized weights; "
        f"the estimator predicts {qt['False']['predicted_constants_bytes']:,} / {qt['True']['predicted_constants_bytes']:,} bytes.",
    ]
    dq_rows = [x for x in p8["by_rank"] if x["r"] == 16 and x["target_modules"] == "all-linear"]
    by_dq = {x["double_quant"]: x for x in dq_rows}
    lines.append(f"Llama-3-8B r=16 all-linear predicted reserved: {by_dq[False]['reserved_gib']:.3f} GiB without DQ, "
                 f"{by_dq[True]['reserved_gib']:.3f} GiB with DQ.")

    tq = result["target_quality"]
    lines += [
        "",
        f"### 3. all-linear vs q,v: eval loss after {tq['steps']} steps on the smoke task (r=8, alpha 16; MEASURED, real trials)",
        "",
    ]
    rows = [[f"{row['learning_rate']:g}", row["seed"], f"{row['qv']:.4f}", f"{row['all-linear']:.4f}",
             f"{row['all-linear'] - row['qv']:+.4f}"] for row in tq["rows"]]
    lines.append(_common.table(["learning rate", "train.seed", "qv", "all-linear", "all-linear − qv"], rows))
    d = tq["diff_all_linear_minus_qv"]
    lines.append(f"\nall-linear lower in {tq['all_linear_better']}/{tq['pairs']} pairs; median difference {d['median']:+.4f} "
                 f"(min {d['min']:+.4f}, max {d['max']:+.4f}).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
