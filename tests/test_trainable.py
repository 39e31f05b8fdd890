"""The per-trial QLoRA function on a real tiny model, really quantized by bitsandbytes (CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from sweeps.spec import parse_spec
from tests.conftest import TRIAL_CONFIG, make_spec_dict

pytestmark = pytest.mark.integration

TRIAL = TRIAL_CONFIG


def spec_for(**train: Any):
    return parse_spec(make_spec_dict(train={"max_steps": 40, "eval_every": 10, "batch_size": 8, **train}))


class Recorder:
    """Collects what the trainable reports; copies checkpoints before the trainer rotates them away."""

    def __init__(self, keep_dir: Path | None = None):
        self.metrics: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []
        self.keep_dir = keep_dir

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.metrics.append(metrics)
        if checkpoint_dir and self.keep_dir is not None:
            kept = self.keep_dir / f"step-{metrics['step']}"
            shutil.copytree(checkpoint_dir, kept)
            self.checkpoints.append(kept)


def test_base_model_is_loaded_as_real_nf4_linear4bit_layers() -> None:
    import bitsandbytes as bnb
    import torch

    from trainables.qlora import load_quantized_model
    from trainables.tiny_models import materialize

    spec = spec_for()
    model = load_quantized_model(spec, materialize("builtin:tiny-llama"), "cpu", torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.state2 is not None  # double quantization of the absmax constants
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays in compute dtype

    baseline = load_quantized_model(
        spec.model_copy(update={"model": spec.model.model_copy(update={"quantization": "none"})}),
        materialize("builtin:tiny-llama"),
        "cpu",
        torch.float32,
    )
    assert type(baseline.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_qv_adapters_keep_learning_after_the_first_evaluation(tmp_path: Path) -> None:
    """Regression: bitsandbytes' CPU eval-mode repacking zeroed gradients through 4-bit layers,
    which froze q/v adapters after the first evaluation (eval loss then stayed constant)."""
    from trainables.qlora import run_trial

    record = Recorder()
    last = run_trial(TRIAL, spec_for(checkpoint=False), report=record)
    losses = [m["eval_loss"] for m in record.metrics]
    assert [m["step"] for m in record.metrics] == [10, 20, 30, 40]
    assert losses[-1] < losses[0] * 0.6, losses
    assert losses[3] < losses[1] < losses[0], f"eval loss stopped falling after the first evaluation: {losses}"
    assert last["memory_kind"] == "host_rss" and last["peak_memory_mib"] > 100
    # Per layer, r=8: q_proj 64->64 gives A 8x64 + B 64x8; v_proj 64->32 (2 kv heads x 16) gives A 8x64 + B 32x8.
    assert last["trainable_params"] == 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))
    assert last["tokens_seen"] > 0 and last["tokens_per_s"] > 0
    assert last["total_params"] > last["trainable_params"]


def test_a_resumed_trial_continues_from_its_last_checkpoint(tmp_path: Path) -> None:
    from peft import PeftConfig

    from trainables.qlora import run_trial

    first = Recorder(keep_dir=tmp_path)
    run_trial(TRIAL, spec_for(max_steps=20), report=first)
    assert [m["step"] for m in first.metrics] == [10, 20]
    checkpoint = first.checkpoints[-1]
    # The Hugging Face Trainer layout: loadable by PeftModel.from_pretrained, resumable by Trainer.
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (checkpoint / name).exists(), name
    assert PeftConfig.from_pretrained(str(checkpoint)).r == 8

    resumed = Recorder()
    run_trial(TRIAL, spec_for(max_steps=40), report=resumed, resume_from=str(checkpoint))
    assert [m["step"] for m in resumed.metrics] == [30, 40]  # not 10: it did not restart at step 0
    assert resumed.metrics[0]["eval_loss"] < first.metrics[0]["eval_loss"]
    assert resumed.metrics[-1]["tokens_seen"] > first.metrics[-1]["tokens_seen"]
