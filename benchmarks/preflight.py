"""Preflight of a large instruction file: time and peak driver memory, before and after tokenize-once.

Preflight (sweeps/driver.py) reads the model config and the tokenizer, then reads, checks and (now)
tokenizes every row; trials train on those tokens. This script generates an Alpaca-shaped
instruction file (100,000 rows by default: instruction, an input on a third of the rows, output),
and runs `preflight` on it in a fresh process per measurement, for two versions of trainables/data.py:

  before   the data module of commit BEFORE_REV (the last one before tokenize-once), loaded in
           place of trainables.data: rows checked one by one, each row's length counted with a
           separate tokenizer call, nothing kept but the text.
  after    this working tree: rows rendered and tokenized in batches of 1,000 (fast tokenizer
           batch calls with character offsets, for the loss mask), kept as flat int32 arrays.

Each measurement reports preflight's wall time and CPU time (model config + tokenizer + data, including the
lazy imports of torch and transformers' model code that reading a config triggers; the interpreter
start is excluded), the part of it spent in trainables.data.prepare_data, and the process's peak
RSS (ru_maxrss) and its growth during preflight; with the builtin model, also what a trial then
spends from the prepared data to a built SFTTrainer (before: trl tokenizes the text; after: the
tokens arrive through a pickle round trip, as through Ray's object store). Two tokenizers: the builtin tiny-llama's word-level one, and a byte-level BPE
tokenizer with a Llama-3-style chat template (tests/tiny_hub.py), closer in cost to real ones.
TOKENIZERS_PARALLELISM is left unset, as the CLI leaves it. Variants run interleaved (before,
after, before, after, ...). Target (issue 12): <= 30 s and
<= 2 GiB for 100,000 rows on 2 cores.

    python benchmarks/preflight.py [--rows 100000] [--repeats 3] [--out FILE] [--quick]
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

BEFORE_REV = "853aa1c9d5767bc74a308e9ad3387b142ee22c4f"
TOKENIZERS = ("tiny-llama", "bpe")
TARGET_S, TARGET_GIB = 30.0, 2.0

WORDS = (
    "the a model data list sort number letter word answer question write explain why how what which first "
    "second last count sum add multiply divide city river country capital year name color animal plant "
    "small large fast slow because therefore example result value table file line code function return"
).split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """An Alpaca-shaped file: instruction 6-30 words, input on a third of the rows, output 10-120 words."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            row = {"instruction": f"{words(6, 30).capitalize()}?", "output": words(10, 120) + "."}
            if i % 3 == 0:
                row["input"] = words(3, 20)
            f.write(json.dumps(row) + "\n")


def bpe_model(folder: Path) -> str:
    """A local model folder with tests/tiny_hub.py's byte-level BPE tokenizer (Llama-3 template)."""
    sys.path.insert(0, str(_common.REPO))
    from tests import tiny_hub

    if not (folder / "config.json").exists():
        tokenizer = tiny_hub.make_tokenizer("llama3", corpus=[" ".join(WORDS)] * 20)
        tiny_hub.save_tiny_model(folder, tokenizer)
    return str(folder)


# --- one measurement, in its own process ---------------------------------------------------------------


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def trial_setup(variant: str, spec: Any, checked: Any) -> dict[str, Any]:
    """What a trial spends turning the prepared data into trl's datasets, the trainer built as the
    trainable builds it. before: the text examples, which SFTTrainer tokenizes (and labels, truncates,
    filters); after: the preflight tokens, through a pickle round trip as Ray's object store does."""
    import pickle

    from trl import SFTTrainer

    from trainables.params import TrialConfig
    from trainables.training_setup import TrainingSetup, load_tokenizer

    setup = TrainingSetup.resolve(spec.model, spec.train, "cpu")
    tokenizer = load_tokenizer(checked.model_path, spec.model)
    trial = TrialConfig.from_tune(dict(_common.TINY_TRIAL), spec.train.batch_size)
    out = tempfile.mkdtemp(prefix="bench-preflight-trial-")
    model = setup.load_model(checked.model_path, spec.model)
    cpu_before, started = _cpu_s(), time.perf_counter()
    if variant == "before":
        from datasets import Dataset

        train, evaluation, extra = Dataset.from_list(checked.data.train), Dataset.from_list(checked.data.eval), {}
    else:
        from trainables.data import trained_as_prepared

        shipped = pickle.loads(pickle.dumps(checked.data.for_trials()))
        train, evaluation = shipped.datasets()
        extra = trained_as_prepared(shipped)
    trainer = SFTTrainer(
        model=model,
        args=setup.sft_config(trial, spec.train, spec.data, out, 1, **extra),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=setup.lora_config(trial, model.config.model_type),
    )
    seconds, cpu = time.perf_counter() - started, _cpu_s() - cpu_before
    return {"trainer_ready_s": seconds, "trainer_ready_cpu_s": cpu, "train_rows": len(trainer.train_dataset)}


def child(variant: str, data: str, model: str, with_trial: bool = False) -> dict[str, Any]:
    # As in a user's `qlora-sweep validate/run` driver: _common's test-suite defaults turn the Rust
    # tokenizers' thread pool off; the CLI leaves it on (trials turn it off, trainables/qlora.py).
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    if variant == "before":
        import importlib.util

        source = subprocess.run(
            ["git", "show", f"{BEFORE_REV}:trainables/data.py"], capture_output=True, text=True, check=True, cwd=_common.REPO
        ).stdout
        old = Path(tempfile.mkdtemp(prefix="bench-preflight-")) / "data_before.py"
        old.write_text(source)
        spec = importlib.util.spec_from_file_location("trainables.data", old)
        module = importlib.util.module_from_spec(spec)
        sys.modules["trainables.data"] = module
        spec.loader.exec_module(module)
        import trainables

        trainables.data = module
    import transformers  # noqa: F401 - imports are not what is measured
    import trl  # noqa: F401

    from sweeps.driver import preflight
    from sweeps.spec import parse_spec

    spec = parse_spec(
        _common.spec_dict(
            name="preflight",
            model={"path": model},
            # eval_size explicit: the old module predates its default moving to DataSpec.eval_amount.
            data={"path": data, "max_seq_length": 1024, "eval_size": 1000},
        )
    )
    import trainables.data

    timed = trainables.data.prepare_data
    data_s: list[float] = []

    def prepare_data(*a: Any, **kw: Any) -> Any:  # preflight imports it when called: the clock sees the data part
        t0 = time.perf_counter()
        try:
            return timed(*a, **kw)
        finally:
            data_s.append(time.perf_counter() - t0)

    trainables.data.prepare_data = prepare_data
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu_before = _cpu_s()
    started = time.perf_counter()
    checked = preflight(spec, check_storage=False)
    seconds = time.perf_counter() - started
    cpu = _cpu_s() - cpu_before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    data_out = checked.data
    tokens = getattr(data_out, "train_tokens", None)
    trial = trial_setup(variant, spec, checked) if with_trial else None
    return {
        "variant": variant,
        "preflight_s": seconds,
        "preflight_cpu_s": cpu,
        "data_s": sum(data_s),
        "trial": trial,
        "peak_rss_bytes": peak,
        "rss_growth_bytes": peak - rss_before,
        "train_rows": len(data_out.train),
        "eval_rows": len(data_out.eval),
        "skipped": len(data_out.skipped),
        "tokenized": tokens is not None,
        "train_tokens": tokens.tokens if tokens is not None else None,
    }


def measure(variant: str, data: Path, model: str, with_trial: bool) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--data", str(data), "--model", model, *(["--trial"] if with_trial else [])],
        capture_output=True, text=True, cwd=_common.REPO, timeout=3600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = _common.parser(__doc__, repeats=3)
    p.add_argument("--rows", type=int, default=100_000, help="rows in the generated file (default 100,000)")
    p.add_argument("--child", choices=("before", "after"), help=argparse_hidden())
    p.add_argument("--data", help=argparse_hidden())
    p.add_argument("--model", help=argparse_hidden())
    p.add_argument("--trial", action="store_true", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.model, args.trial)))
        return
    rows, repeats = (2_000, 1) if args.quick else (args.rows, args.repeats)
    work = Path(tempfile.mkdtemp(prefix="bench-preflight-"))
    data = work / "instructions.jsonl"
    generate(data, rows)
    models = {"tiny-llama": _common.warm_model_cache(), "bpe": bpe_model(work / "bpe-model")}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {"before": [], "after": []} for t in TOKENIZERS}
    for _ in range(repeats):
        for tokenizer in TOKENIZERS:
            for variant in ("before", "after"):
                # The trial side is measured with the builtin model's tokenizer only (it costs minutes before).
                result = measure(variant, data, models[tokenizer], with_trial=tokenizer == "tiny-llama")
                runs[tokenizer][variant].append(result)
                trial = result["trial"]
                print(
                    f"{tokenizer:10s} {variant:6s} {result['preflight_s']:7.2f} s (CPU {result['preflight_cpu_s']:.2f} s, "
                    f"data {result['data_s']:.2f} s)  peak RSS {result['peak_rss_bytes'] / 2**30:5.2f} GiB "
                    f"(+{result['rss_growth_bytes'] / 2**30:.2f})"
                    + (f"; trial's trainer ready in {trial['trainer_ready_s']:.2f} s" if trial else ""),
                    file=sys.stderr, flush=True,
                )
    summary: dict[str, Any] = {}
    table_rows = []
    for tokenizer in TOKENIZERS:
        for variant in ("before", "after"):
            done = runs[tokenizer][variant]
            s = {
                "preflight_s": _common.stats([r["preflight_s"] for r in done]),
                "preflight_cpu_s": _common.stats([r["preflight_cpu_s"] for r in done]),
                "data_s": _common.stats([r["data_s"] for r in done]),
                "peak_rss_gib": _common.stats([r["peak_rss_bytes"] / 2**30 for r in done]),
                "rss_growth_gib": _common.stats([r["rss_growth_bytes"] / 2**30 for r in done]),
            }
            summary[f"{tokenizer}/{variant}"] = s
            table_rows.append(
                [tokenizer, variant, _common.spread(s["preflight_s"]), _common.spread(s["preflight_cpu_s"]),
                 _common.spread(s["data_s"]), _common.spread(s["peak_rss_gib"]),
                 _common.spread(s["rss_growth_gib"]), "yes" if done[0]["tokenized"] else "no (trials tokenize)",
                 f"{done[0]['train_rows']:,} / {done[0]['eval_rows']:,}"]
            )
    print(f"## Preflight of {rows:,} instruction rows\n")
    print(_common.table(
        ["tokenizer", "data.py", "preflight s", "preflight CPU s", "of which data s", "peak RSS GiB", "RSS growth GiB",
         "tokens kept", "train / eval rows"],
        table_rows, align="llrrrrrll",
    ))
    trial_rows = []
    for variant in ("before", "after"):
        done = [r["trial"] for r in runs["tiny-llama"][variant] if r["trial"]]
        s = {"trainer_ready_s": _common.stats([t["trainer_ready_s"] for t in done]),
             "trainer_ready_cpu_s": _common.stats([t["trainer_ready_cpu_s"] for t in done])}
        summary[f"trial/{variant}"] = s
        trial_rows.append([variant, _common.spread(s["trainer_ready_s"]), _common.spread(s["trainer_ready_cpu_s"]),
                           f"{done[0]['train_rows']:,}" if done else "n/a"])
    print(f"\n## A trial's data setup ({rows:,} rows, tiny-llama): SFTTrainer built as the trainable builds it, model loaded\n")
    print(_common.table(["data.py", "trainer ready s", "CPU s", "train rows"], trial_rows, align="lrrr"))
    after = [summary[f"{t}/after"] for t in TOKENIZERS]
    met = all(s["preflight_s"]["median"] <= TARGET_S and s["peak_rss_gib"]["median"] <= TARGET_GIB for s in after)
    print(f"\nTarget (<= {TARGET_S:g} s and <= {TARGET_GIB:g} GiB for 100,000 rows on 2 cores): "
          f"{'met' if met else 'missed'} ({rows:,} rows here, {os.cpu_count()} logical CPUs)")
    _common.write_json(args.out, {"rows": rows, "repeats": repeats, "before_rev": BEFORE_REV, "runs": runs, "summary": summary})


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
