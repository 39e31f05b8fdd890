"""Sequence packing: useful tokens/s with `packing: true` against without, on two length distributions.

Run from the repository root, holding the machine-wide lock so nothing else competes for the CPU:

    flock /tmp/qlora-heavy.lock .venv/bin/python benchmarks/packing.py --repeats 3 --out /tmp/packing.json

Two datasets, each trained with the `packing` knob off and on, and with the packed rows joined into
one sequence per micro-batch by trl's padding-free collator (what `SFTConfig(packing=True)` does;
for comparison), interleaved (off, on, padding-free, off, ...),
through the Tune-free trial function `trainables.qlora.run_trial`, one CPU thread (a trial's
cpus_per_trial), the builtin tiny Llama in NF4, the same steps, micro-batch, seed and learning rate:

* smoke: the shipped smoke task (sweeps/data/smoke_instructions.jsonl) at max_seq_length 64, as the
  embedded default trains it: short rows of similar length.
* long-tailed: generated instruction rows whose response length is log-normal (median about 25
  words, a few hundred words in the tail), at max_seq_length 512 with on_long_rows: truncate: most
  rows are short and a few are long, as in chat and instruction data.

Useful tokens/s is the trial's own `tokens_per_s`: tokens of the rows trained on (pads excluded,
Trainer's num_input_tokens_seen) over training time (evaluations excluded). Without packing a batch
is padded to its longest row; with packing, trl packs rows best-fit-decreasing into
max_seq_length and the batch is padding-free (one flat sequence, position ids restarting per row).
The eval rows are never packed, so eval_loss (one evaluation at the end, on the same held-out rows)
compares the two on the same footing; with packing each step sees more rows, so it is also shown per
training token. Target (issue 12): at least 1.5x useful tokens/s on the long-tailed set.
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

TARGET_GAIN = 1.5
DATASETS = ("smoke", "long-tailed")
# off: no packing; on: the `packing` knob as trials train (PackedCollator); padding-free: trl's mode.
VARIANTS = ("off", "on", "padding-free")
WORDS = (
    "the a model data list sort number letter word answer question write explain why how what which first "
    "second last count sum add multiply divide city river country capital year name color animal plant "
    "small large fast slow because therefore example result value table file line code function return"
).split()


def long_tailed(path: Path, rows: int, seed: int = 0) -> dict[str, float]:
    """Instruction rows with log-normal response lengths (words); returns the length quantiles."""
    rng = random.Random(seed)
    lengths = []
    with open(path, "w") as f:
        for _ in range(rows):
            n = max(3, min(600, int(rng.lognormvariate(math.log(25), 1.0))))
            lengths.append(n)
            instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
            output = " ".join(rng.choice(WORDS) for _ in range(n))
            f.write(json.dumps({"instruction": instruction.capitalize() + "?", "output": output + "."}) + "\n")
    lengths.sort()
    return {q: lengths[int(q * (len(lengths) - 1))] for q in (0.5, 0.9, 0.99)}


def specs(work: Path, steps: int, batch: int) -> dict[str, Any]:
    from sweeps.spec import parse_spec

    quantiles = long_tailed(work / "long_tailed.jsonl", 2000)
    out = {
        "smoke": parse_spec(_common.spec_dict(
            name="packing", train={"max_steps": steps, "eval_every": steps, "batch_size": batch, "checkpoint": False},
        )),
        "long-tailed": parse_spec(_common.spec_dict(
            name="packing",
            data={"path": str(work / "long_tailed.jsonl"), "max_seq_length": 512, "eval_size": 40, "on_long_rows": "truncate"},
            train={"max_steps": steps, "eval_every": steps, "batch_size": batch, "checkpoint": False},
        )),
    }
    return {"specs": out, "long_tailed_words": quantiles}


class PaddingFree:
    """The "padding-free" variant: the packed rows of a micro-batch joined into one sequence by trl's
    own padding-free collator (what SFTConfig(packing=True, packing_strategy="bfd") does), instead of
    PackedCollator's rows. For comparison only; the trainable does not train this way."""

    def __enter__(self) -> PaddingFree:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        from trainables.data import PreparedData

        self.original = PreparedData.trainer_inputs

        def trainer_inputs(data: Any, tokenizer: Any, pack_to: int | None = None) -> dict[str, Any]:
            inputs = self.original(data, tokenizer, pack_to)
            inputs["data_collator"] = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
            return inputs

        PreparedData.trainer_inputs = trainer_inputs
        return self

    def __exit__(self, *exc: Any) -> None:
        from trainables.data import PreparedData

        PreparedData.trainer_inputs = self.original


def run(spec: Any, data: Any, variant: str, batch: int) -> dict[str, Any]:
    import contextlib

    from sweeps.plan import trial_job
    from trainables.qlora import run_trial

    start = time.perf_counter()
    with PaddingFree() if variant == "padding-free" else contextlib.nullcontext():
        last = run_trial(
            {**_common.TINY_TRIAL, "batch_size": batch, "packing": variant != "off"}, trial_job(spec),
            report=lambda metrics, checkpoint_dir=None: None, data=data,
        )
    return {
        "tokens_per_s": float(last["tokens_per_s"]),
        "tokens": int(last["tokens_seen"]),
        "eval_loss": float(last["eval_loss"]),
        "train_loss": float(last["train_loss"]),
        "wall_s": time.perf_counter() - start,
        "tensor_peak_mib": last.get("tensor_peak_mib"),
        "predicted_tensor_peak_mib": last.get("predicted_tensor_peak_mib"),
    }


def main() -> None:
    p = _common.parser(__doc__, repeats=3)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per trial (default 30)")
    p.add_argument("--batch", type=int, default=8, help="micro-batch in rows (default 8)")
    args = p.parse_args()
    steps, repeats = (4, 1) if args.quick else (args.steps, args.repeats)
    from trainables.data import prepare_data
    from trainables.training_setup import load_tokenizer

    model_path = _common.warm_model_cache()
    work = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    made = specs(work, steps, args.batch)
    tokenizer = load_tokenizer(model_path, made["specs"]["smoke"].model)
    prepared = {}
    for name, spec in made["specs"].items():
        data = prepare_data(spec.resolve_path(spec.data.path), spec.data, tokenizer)
        lengths = data.train_tokens.lengths
        prepared[name] = data
        print(f"{name}: {len(lengths)} train rows, tokens median {int(sorted(lengths)[len(lengths) // 2])}, "
              f"max {int(lengths.max())}, max_seq_length {spec.data.max_seq_length}", file=sys.stderr)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {d: {v: [] for v in VARIANTS} for d in DATASETS}
    for _ in range(repeats):
        for name in DATASETS:
            for variant in VARIANTS:
                result = run(made["specs"][name], prepared[name], variant, args.batch)
                runs[name][variant].append(result)
                print(f"{name:12s} packing {variant:12s} {result['tokens_per_s']:8.0f} useful tokens/s, "
                      f"{result['tokens']} tokens, eval_loss {result['eval_loss']:.3f}", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    rows = []
    for name in DATASETS:
        off = runs[name]["off"]
        s: dict[str, Any] = {}
        for variant in VARIANTS:
            done = runs[name][variant]
            s[variant] = {k: _common.stats([r[k] for r in done]) for k in ("tokens_per_s", "tokens", "eval_loss")}
            # Per interleaved repetition, against packing off.
            s[variant]["gain"] = _common.stats([b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(off, done)])
            stat = s[variant]
            rows.append([
                name, variant, _common.spread(stat["tokens_per_s"], 0), f"{stat['tokens']['median']:,.0f}",
                _common.fmt(stat["eval_loss"]["median"], 3), _common.spread(stat["gain"]) if variant != "off" else "",
            ])
        summary[name] = s
    print(f"## Sequence packing: useful tokens/s ({steps} steps, micro-batch {args.batch}, 1 CPU thread)\n")
    print(_common.table(
        ["data", "packing", "useful tokens/s", "tokens trained", "eval_loss", "tokens/s vs off"], rows, align="llrrrr",
    ))
    gain = summary["long-tailed"]["on"]["gain"]["median"]
    print(f"\nLong-tailed response lengths (words): median {made['long_tailed_words'][0.5]}, p90 "
          f"{made['long_tailed_words'][0.9]}, p99 {made['long_tailed_words'][0.99]}.")
    print(f"Target (>= {TARGET_GAIN}x useful tokens/s on the long-tailed set): {'met' if gain >= TARGET_GAIN else 'missed'} "
          f"({gain:.2f}x). {_common.describe_machine(_common.machine())}")
    _common.write_json(args.out, {"steps": steps, "batch": args.batch, "repeats": repeats, "runs": runs, "summary": summary,
                                  "long_tailed_words": made["long_tailed_words"]})


if __name__ == "__main__":
    main()
