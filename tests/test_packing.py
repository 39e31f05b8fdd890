"""Sequence packing (the `packing` knob): trl's best-fit-decreasing packing, padding-free.

What a packed trial trains on is checked on the trainer the trainable builds (same TrainingSetup,
same datasets, same SFTConfig): every row arrives once, whole, with its own loss mask, no batch is
longer than micro-batch x max_seq_length, and the rows of one packed sequence do not see each
other: a packed batch's loss is the token-weighted mean of the rows' losses computed one by one.
The control runs the same packed tokens with position ids that do not restart per row (what a
packer without row boundaries gives) and gets another loss.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TRIAL_CONFIG
from trainables.memory_estimator import estimate_peak_memory
from trainables.settings import DataSpec, ModelSpec, TrainSpec

SMOKE = Path(__file__).resolve().parent.parent / "sweeps" / "data" / "smoke_instructions.jsonl"


def packed_trainer(tmp_path: Path, *, packing: bool, batch_size: int = 4, max_seq_length: int = 64) -> tuple[Any, Any, Any]:
    """(trainer, prepared data, tokenizer) built the way trainables/qlora.py `_build_trainer` builds them."""
    from trl import SFTTrainer

    from trainables.data import prepare_data, trained_as_prepared
    from trainables.params import TrialConfig
    from trainables.tiny_models import materialize
    from trainables.training_setup import TrainingSetup, load_tokenizer

    model_spec, train = ModelSpec(path="builtin:tiny-llama"), TrainSpec(max_steps=10, eval_every=5, batch_size=batch_size)
    folder = materialize(model_spec.path)
    tokenizer = load_tokenizer(folder, model_spec)
    data_spec = DataSpec(path=str(SMOKE), max_seq_length=max_seq_length, eval_size=20)
    data = prepare_data(str(SMOKE), data_spec, tokenizer).for_trials()
    setup = TrainingSetup.resolve(model_spec, train, "cpu")
    trial = TrialConfig.from_tune({**TRIAL_CONFIG, "batch_size": batch_size, "packing": packing}, train.batch_size)
    trainer = SFTTrainer(
        model=setup.load_model(folder, model_spec),
        args=setup.sft_config(trial, train, data_spec, str(tmp_path / "out"), 1, **trained_as_prepared(data)),
        **data.trainer_inputs(tokenizer, pack_to=max_seq_length if packing else None),
        processing_class=tokenizer,
        peft_config=setup.lora_config(trial, "llama"),
    )
    return trainer, data, tokenizer


def tokenizer_pad(trainer: Any) -> int:
    return trainer.processing_class.pad_token_id


def segments(position_ids: Any) -> list[tuple[int, int]]:
    """(start, stop) of each row in a padding-free batch: position ids restart at 0 per row."""
    starts = [i for i, p in enumerate(position_ids.tolist()) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:]))


@pytest.mark.integration
def test_a_packed_trainer_sees_every_row_once_whole_with_its_loss_mask(tmp_path: Path) -> None:
    from trainables.data import PackedCollator

    trainer, data, tokenizer = packed_trainer(tmp_path, packing=True)
    assert isinstance(trainer.data_collator, PackedCollator) and not trainer.args.padding_free
    rows = [tuple(data.train_tokens.row(i)[0]) for i in range(data.train_rows)]
    by_ids = {ids: i for i, ids in enumerate(rows)}  # rows with the same tokens have the same labels
    seen: list[tuple[int, ...]] = []
    batches = 0
    for batch in trainer.get_train_dataloader():
        # No attention mask: transformers masks by the position ids, one block per example.
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] <= 4
        assert batch["input_ids"].shape[1] <= 64  # each packed row within max_seq_length
        for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            for start, stop in segments(positions):
                if (ids[start:stop] == tokenizer.pad_token_id).all():
                    assert (labels[start:stop] == -100).all()  # padding after the last example
                    continue
                i = by_ids[tuple(ids[start:stop].tolist())]
                expected = data.train_tokens.labels(i)
                expected[0] = -100  # a row's first token is never a target (nothing of its own precedes it)
                assert labels[start:stop].tolist() == expected
                seen.append(rows[i])
        batches += 1
    assert Counter(seen) == Counter(rows)  # every row once, none cut
    # Packing is worth it here: fewer, fuller batches than one per 4 rows.
    assert batches < data.train_rows / 4
    # The eval rows are not packed: eval_loss means the same with and without packing.
    assert len(trainer.eval_dataset) == data.eval_rows


@pytest.mark.integration
def test_rows_packed_together_do_not_attend_to_each_other(tmp_path: Path) -> None:
    import torch

    trainer, _, _ = packed_trainer(tmp_path, packing=True)
    model = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    # The first packed row of the micro-batch, as a batch of one.
    ids, labels, positions = batch["input_ids"][:1], batch["labels"][:1], batch["position_ids"][:1]
    keep = int((ids[0] != tokenizer_pad(trainer)).sum())
    ids, labels, positions = ids[:, :keep], labels[:, :keep], positions[:, :keep]
    parts = segments(positions[0])
    assert len(parts) >= 2
    with torch.no_grad():
        packed = float(model(input_ids=ids, labels=labels, position_ids=positions).loss)
        total, count = 0.0, 0
        for start, stop in parts:
            row_labels = labels[:, start:stop]
            n = int((row_labels[:, 1:] != -100).sum())  # targets after the causal shift
            total += float(model(input_ids=ids[:, start:stop], labels=row_labels).loss) * n
            count += n
        # The control: the same tokens as one sequence with no row boundaries.
        leaky = float(model(input_ids=ids, labels=labels, position_ids=torch.arange(ids.shape[1])[None]).loss)
    one_by_one = total / count
    assert abs(packed - one_by_one) < 1e-4 * one_by_one, (packed, one_by_one)
    assert abs(leaky - one_by_one) > 1e-3 * one_by_one, (leaky, one_by_one)


def test_the_estimator_counts_a_packed_rows_mask_and_its_own_rope_tables() -> None:
    import json

    from trainables.tiny_models import materialize

    cfg = json.loads((Path(materialize("builtin:tiny-llama")) / "config.json").read_text())
    common = dict(quantization="nf4", double_quant=True, compute_dtype="float32", r=8, target_modules=["q_proj", "v_proj"],
                  gradient_checkpointing=True, optimizer="adamw_torch", device="cpu", batch_size=4, seq_len=64)
    packed = estimate_peak_memory(cfg, packing=True, **common)
    unpacked = estimate_peak_memory(cfg, **common)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = 2 * 4 * 64 * head_dim  # fp32 cos and sin, one table per sequence
    # Per packed row: SDPA's boolean block mask (s x s) and, with position ids per row, a rope table.
    assert packed.activations_bytes - unpacked.activations_bytes == 4 * 64 * 64 + 3 * rope
    assert packed.logits_bytes == unpacked.logits_bytes and packed.lora_params == unpacked.lora_params
    with pytest.raises(ValueError, match="packing: 'yes' must be True or False"):
        estimate_peak_memory(cfg, **{**common, "packing": "yes"})
