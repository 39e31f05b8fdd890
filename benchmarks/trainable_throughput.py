"""Trainable throughput: our trial function against a bare peft + trl QLoRA loop on the same work.

Run from the repository root, holding the machine-wide lock so nothing else competes for the CPU:

    flock /tmp/qlora-heavy.lock .venv/bin/python benchmarks/trainable_throughput.py --repeats 5 \
        --out /tmp/trainable_throughput.json

Three variants train the same model on the same data for the same steps, batch and seed, in this
process, one CPU thread each (a trial's cpus_per_trial), interleaved A, B, C, A, B, C, ...:

* ours:         `trainables.qlora.run_trial` with a no-op report: memory probe, an evaluation every
                train.eval_every steps, an adapter + optimizer checkpoint as train.checkpoint_every says
                (--checkpoint-every; the spec's default unless given), metrics per evaluation.
* ours, no ckpt: the same with train.checkpoint false (what checkpointing costs).
* bare:         the plain QLoRA recipe (BitsAndBytesConfig NF4 + double quant,
                prepare_model_for_kbit_training, LoraConfig, SFTConfig, SFTTrainer) built from the
                same `TrainingSetup` as ours (trainables/training_setup.py), so the arguments cannot
                differ, with no evaluation, no checkpoints and no callbacks of ours.

Throughput is measured two ways, with one clock for every variant: training tokens/s, tokens over
the wall time of `Trainer.train` minus the time spent in `SFTTrainer.evaluate` (so our checkpoints,
callbacks and reports count against us, our evaluations do not: the bare loop runs none), and tokens
over the wall time of the whole call, setup included.
`--profile` runs one extra trial of each variant under cProfile and prints where the time went.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import shutil
import sys
import tempfile
import time
from typing import Any

import _common

TARGET_RATIO = 0.95  # issue 7: our tokens/s at least 95% of the bare loop's


def load_inputs(steps: int, eval_every: int, checkpoint_every: Any = None) -> tuple[Any, Any, Any, str]:
    """Specs for ours with and without checkpoints, the prepared data, and the model folder.

    `checkpoint_every` None keeps train.checkpoint_every's default."""
    from sweeps.spec import parse_spec
    from trainables.data import prepare_data
    from trainables.training_setup import load_tokenizer

    model_path = _common.warm_model_cache()
    every = {} if checkpoint_every is None else {"checkpoint_every": checkpoint_every}
    spec = parse_spec(_common.spec_dict(name="throughput", train={"max_steps": steps, "eval_every": eval_every, **every}))
    no_ckpt = parse_spec(
        _common.spec_dict(name="throughput", train={"max_steps": steps, "eval_every": eval_every, "checkpoint": False})
    )
    data = prepare_data(str(_common.SMOKE_DATA), spec.data, load_tokenizer(model_path, spec.model))
    return spec, no_ckpt, data, model_path


class TrainerClock:
    """Wall time inside `Trainer.train` and inside `SFTTrainer.evaluate`, for any trainer in this process.

    Wraps the two methods on their classes, so ours and the bare loop are timed by the same code.
    """

    def __init__(self) -> None:
        self.train_s = 0.0
        self.eval_s = 0.0

    def __enter__(self) -> TrainerClock:
        from transformers import Trainer
        from trl import SFTTrainer

        self._originals = (Trainer.train, SFTTrainer.evaluate)
        Trainer.train = self._timed(Trainer.train, "train_s")
        SFTTrainer.evaluate = self._timed(SFTTrainer.evaluate, "eval_s")
        return self

    def __exit__(self, *exc: Any) -> None:
        from transformers import Trainer
        from trl import SFTTrainer

        Trainer.train, SFTTrainer.evaluate = self._originals

    def _timed(self, method: Any, attr: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                setattr(self, attr, getattr(self, attr) + time.perf_counter() - start)

        return timed

    @property
    def training_s(self) -> float:
        return self.train_s - self.eval_s


def run_ours(
    spec: Any, data: Any, trial: dict[str, Any] | None = None, callbacks: Any = (), reports: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Our trial function; `trial` defaults to TINY_TRIAL, `reports` (if given) receives what it reported."""
    from sweeps.plan import trial_job
    from trainables.qlora import run_trial

    reports = [] if reports is None else reports
    checkpoints: list[str] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        reports.append(metrics)
        if checkpoint_dir:
            checkpoints.append(checkpoint_dir)

    start = time.perf_counter()
    with TrainerClock() as clock:
        last = run_trial(
            dict(trial or _common.TINY_TRIAL), trial_job(spec),
            report=report, data=data, callbacks=callbacks,
        )
    wall = time.perf_counter() - start
    return {
        "tokens": int(last["tokens_seen"]),
        "train_s": clock.training_s,
        "tokens_per_s": int(last["tokens_seen"]) / clock.training_s,
        "reported_tokens_per_s": float(last["tokens_per_s"]),
        "wall_s": wall,
        "wall_tokens_per_s": int(last["tokens_seen"]) / wall,
        "final_train_loss": float(last["train_loss"]),
        "eval_loss": float(last["eval_loss"]),
        "reports": len(reports),
        "checkpoints": len(checkpoints),
    }


def run_bare(
    spec: Any, model_path: str, data: Any, trial: dict[str, Any] | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """The plain QLoRA recipe (as in the QLoRA paper's example), with the trainable's own TrainingSetup.

    `trial` defaults to TINY_TRIAL; `device` "cuda" runs it on the GPU (benchmarks/gpu_truth.py).

    `spec.train.eval_every` only decides how many trailing per-step losses to average, to compare
    with the training loss our trainable reports for its last evaluation round.
    """
    import torch
    from trl import SFTTrainer

    from trainables.data import trained_as_prepared
    from trainables.params import TrialConfig
    from trainables.training_setup import TrainingSetup, load_tokenizer
    from trainables.workarounds import keep_adapters_in_compute_dtype, remove_printer_callback

    trial = TrialConfig.from_tune(trial or _common.TINY_TRIAL, spec.train.batch_size)
    eval_every = spec.train.eval_every
    start = time.perf_counter()
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))  # as run_trial does (1 in TINY_SPEC)
    setup = TrainingSetup.resolve(spec.model, spec.train, device)  # on CPU: fp32 compute, adamw_torch
    tokenizer = load_tokenizer(model_path, spec.model)
    # NF4 + double quant, prepare_model_for_kbit_training (and the CPU repack fix, a no-op without evaluation).
    model = setup.load_model(model_path, spec.model)
    output_dir = tempfile.mkdtemp(prefix="bench-bare-")
    try:
        trainer = SFTTrainer(
            model=model,
            # The tokens preflight made, as the trainable trains on them (trainables/data.py).
            args=setup.sft_config(
                trial, spec.train, spec.data, output_dir, spec.train.grad_accum, eval_strategy="no", save_strategy="no",
                **trained_as_prepared(data),
            ),
            train_dataset=data.datasets()[0],
            processing_class=tokenizer,
            peft_config=setup.lora_config(trial, model.config.model_type),
        )
        # trl casts 4-bit models' adapters to bf16; with fp32 compute the trainable keeps them fp32,
        # so the numerics are identical.
        if setup.quantized and setup.compute_dtype == "float32":
            keep_adapters_in_compute_dtype(trainer.model)
        remove_printer_callback(trainer)  # else every log line is printed
        with TrainerClock() as clock:
            trainer.train()
        wall = time.perf_counter() - start
        tokens = int(trainer.state.num_input_tokens_seen)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        train_s = clock.training_s
        return {
            "tokens": tokens,
            "train_s": train_s,
            "tokens_per_s": tokens / train_s,
            "wall_s": wall,
            "wall_tokens_per_s": tokens / wall,
            "final_train_loss": sum(losses[-eval_every:]) / len(losses[-eval_every:]),
        }
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


VARIANTS = ("ours", "bare", "ours_no_ckpt")


def run_variant(name: str, spec: Any, no_ckpt: Any, data: Any, model_path: str) -> dict[str, Any]:
    if name == "ours":
        return run_ours(spec, data)
    if name == "ours_no_ckpt":
        return run_ours(no_ckpt, data)
    return run_bare(spec, model_path, data)


def profile_variants(spec: Any, no_ckpt: Any, data: Any, model_path: str, top: int = 25) -> dict[str, str]:
    """One run of each variant under cProfile; the functions with the most cumulative time."""
    out = {}
    for name in VARIANTS:
        profiler = cProfile.Profile()
        profiler.enable()
        run_variant(name, spec, no_ckpt, data, model_path)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
        out[name] = text.getvalue()
    return out


def main() -> int:
    p = _common.parser(__doc__.split("\n\n")[0], repeats=5)
    p.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    p.add_argument("--eval-every", type=int, default=10, help="our trainable's evaluation interval (default 10)")
    p.add_argument("--checkpoint-every", default=None,
                   help="our trainable's train.checkpoint_every: rounds (1 = every evaluation) or a time such as 5m "
                        "(default: the spec's default)")
    p.add_argument("--profile", action="store_true", help="also profile one run of each variant with cProfile")
    args = p.parse_args()
    if args.checkpoint_every is not None and args.checkpoint_every.isdigit():
        args.checkpoint_every = int(args.checkpoint_every)
    if args.quick:
        args.steps, args.eval_every, args.repeats = 6, 3, 1

    spec, no_ckpt, data, model_path = load_inputs(args.steps, args.eval_every, args.checkpoint_every)
    if not args.quick:
        # Warm-up (not recorded): the first trial in a process pays lazy imports.
        warm_spec, warm_no_ckpt, _, _ = load_inputs(10, 5)
        for name in VARIANTS:
            run_variant(name, warm_spec, warm_no_ckpt, data, model_path)

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS if repeat % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            result = run_variant(name, spec, no_ckpt, data, model_path)
            runs[name].append(result)
            print(f"[repeat {repeat + 1}/{args.repeats}] {name}: {result['tokens_per_s']:.0f} tokens/s, "
                  f"wall {result['wall_s']:.2f} s", file=sys.stderr, flush=True)

    summary = summarize(runs)
    profiles = profile_variants(spec, no_ckpt, data, model_path) if args.profile else {}
    print(render(summary, args, _common.machine()))
    for name, text in profiles.items():
        print(f"\n### cProfile, {name} (cumulative, top functions)\n\n```\n{text}```")
    _common.write_json(args.out, {"steps": args.steps, "eval_every": args.eval_every, "repeats": args.repeats,
                                  "checkpoint_every": spec.train.checkpoint_every,
                                  "summary": summary, "runs": runs, "profiles": profiles})
    return 0


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    keys = ("tokens_per_s", "wall_tokens_per_s", "train_s", "wall_s", "tokens", "final_train_loss")
    summary: dict[str, Any] = {name: {k: _common.stats([r[k] for r in rs]) for k in keys} for name, rs in runs.items()}
    # Ratios per repetition (the variants of one repetition ran back to back), then their median.
    for name in ("ours", "ours_no_ckpt"):
        pairs = list(zip(runs[name], runs["bare"]))
        summary[f"{name}_over_bare"] = {
            "tokens_per_s": _common.stats([a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]),
            "wall_tokens_per_s": _common.stats([a["wall_tokens_per_s"] / b["wall_tokens_per_s"] for a, b in pairs]),
            "loss_diff": _common.stats([abs(a["final_train_loss"] - b["final_train_loss"]) for a, b in pairs]),
        }
    pairs = list(zip(runs["ours"], runs["ours_no_ckpt"]))
    evals = max(1, runs["ours"][0].get("checkpoints", runs["ours"][0]["reports"]))
    summary["checkpoint_cost"] = {
        "wall_s_per_checkpoint": _common.stats([(a["wall_s"] - b["wall_s"]) / evals for a, b in pairs]),
        "train_s_per_checkpoint": _common.stats([(a["train_s"] - b["train_s"]) / evals for a, b in pairs]),
        "checkpoints": evals,
    }
    return summary


def render(summary: dict[str, Any], args: Any, info: dict[str, Any]) -> str:
    s = _common.spread
    lines = [
        f"## Trainable throughput: {args.steps} steps, batch 8, seq <= 64, 1 thread, our evaluation every "
        f"{args.eval_every} steps, train.checkpoint_every {args.checkpoint_every or 'default'}; "
        f"median of {args.repeats} interleaved runs",
        "",
        f"Machine: {_common.describe_machine(info)}",
        "",
    ]
    rows = []
    for name in VARIANTS:
        v = summary[name]
        rows.append([name, s(v["tokens_per_s"], 0), s(v["train_s"]), s(v["wall_tokens_per_s"], 0), s(v["wall_s"]),
                     f"{v['tokens']['median']:.0f}", s(v["final_train_loss"], 4)])
    lines.append(_common.table(
        ["variant", "training tokens/s", "training s", "tokens / wall s", "wall s",
         "tokens", "last-round train loss"], rows))
    lines += ["", "Ratios to the bare loop (per repetition, then median):", ""]
    rows = []
    for name in ("ours", "ours_no_ckpt"):
        r = summary[f"{name}_over_bare"]
        rows.append([name, s(r["tokens_per_s"], 3), s(r["wall_tokens_per_s"], 3), s(r["loss_diff"], 6)])
    lines.append(_common.table(["variant", "training tokens/s ratio", "wall tokens/s ratio", "|train loss diff|"], rows))
    c = summary["checkpoint_cost"]
    ratio = summary["ours_over_bare"]["tokens_per_s"]["median"]
    lines += [
        "",
        f"Checkpoints ({c['checkpoints']} per run): {s(c['wall_s_per_checkpoint'], 3)} s of wall each, "
        f"{s(c['train_s_per_checkpoint'], 3)} s of it inside Trainer.train (outside evaluation).",
        f"Target (training tokens/s ratio >= {TARGET_RATIO}): {ratio:.3f} -> {'met' if ratio >= TARGET_RATIO else 'missed'}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
