"""The per-trial QLoRA function on a real tiny model, really quantized by bitsandbytes (CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from sweeps.plan import trial_job
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

    from trainables.tiny_models import materialize
    from trainables.training_setup import TrainingSetup

    spec = spec_for()
    setup = TrainingSetup.resolve(spec.model, spec.train, "cpu")
    assert setup.compute_dtype == "float32" and setup.optimizer == "adamw_torch" and not setup.autocast
    model = setup.load_model(materialize("builtin:tiny-llama"), spec.model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.state2 is not None  # double quantization of the absmax constants
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays in compute dtype

    unquantized = spec.model.model_copy(update={"quantization": "none"})
    baseline = TrainingSetup.resolve(unquantized, spec.train, "cpu").load_model(materialize("builtin:tiny-llama"), unquantized)
    assert type(baseline.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_qv_adapters_keep_learning_after_the_first_evaluation(tmp_path: Path) -> None:
    """Regression: bitsandbytes' CPU eval-mode repacking zeroed gradients through 4-bit layers,
    which froze q/v adapters after the first evaluation (eval loss then stayed constant)."""
    from trainables.qlora import run_trial

    record = Recorder()
    last = run_trial(TRIAL, trial_job(spec_for(checkpoint=False)), report=record)
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
    run_trial(TRIAL, trial_job(spec_for(max_steps=20)), report=first)
    assert [m["step"] for m in first.metrics] == [10, 20]
    checkpoint = first.checkpoints[-1]
    # The Hugging Face Trainer layout: loadable by PeftModel.from_pretrained, resumable by Trainer.
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (checkpoint / name).exists(), name
    assert PeftConfig.from_pretrained(str(checkpoint)).r == 8

    resumed = Recorder()
    run_trial(TRIAL, trial_job(spec_for(max_steps=40)), report=resumed, resume_from=str(checkpoint))
    assert [m["step"] for m in resumed.metrics] == [30, 40]  # not 10: it did not restart at step 0
    assert resumed.metrics[0]["eval_loss"] < first.metrics[0]["eval_loss"]
    assert resumed.metrics[-1]["tokens_seen"] > first.metrics[-1]["tokens_seen"]


def inspector(seen: dict[str, Any]):
    """A callback factory (the train.callbacks seam) that records the PEFT model as training starts and ends."""
    from transformers import TrainerCallback

    def factory(context: Any) -> Any:
        seen["context"] = context

        class Inspect(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                seen["peft_config"] = model.peft_config["default"]
                seen["trainable"] = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
                seen["magnitude_before"] = {
                    n: p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n
                }

            def on_train_end(self, args, state, control, model=None, **kwargs):
                seen["magnitude_after"] = {
                    n: p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n
                }

        return Inspect()

    return factory


def test_adapters_stay_in_the_compute_dtype_and_checkpoints_skip_the_model_card(tmp_path: Path, capsys) -> None:
    """Guards three workarounds (trainables/workarounds.py): trl's bf16 cast undone under fp32 compute,
    peft's model card left out of checkpoints, the Trainer's PrinterCallback removed."""
    import torch

    from trainables.qlora import run_trial

    seen: dict[str, Any] = {}
    record = Recorder(keep_dir=tmp_path)
    run_trial(TRIAL, trial_job(spec_for(max_steps=10, eval_every=10)), report=record, callbacks=(inspector(seen),))
    assert seen["trainable"] and set(seen["trainable"].values()) == {torch.float32}, seen["trainable"]
    assert seen["context"].attempt == 1 and seen["context"].predicted_memory_mib > 0
    assert record.checkpoints and not (record.checkpoints[-1] / "README.md").exists()
    assert "'loss':" not in capsys.readouterr().out  # no per-step log lines printed


def test_use_rslora_and_use_dora_reach_peft_and_a_dora_model_trains_on_nf4(tmp_path: Path) -> None:
    """DoRA on bitsandbytes NF4 layers on CPU: magnitude vectors exist, are trainable, and change."""
    import torch
    from transformers import AutoConfig

    from trainables.memory_estimator import count_lora_params
    from trainables.qlora import run_trial
    from trainables.tiny_models import materialize

    seen: dict[str, Any] = {}
    trial = {**TRIAL, "use_rslora": True, "use_dora": True}
    last = run_trial(
        trial, trial_job(spec_for(max_steps=10, eval_every=10, checkpoint=False)), report=Recorder(),
        callbacks=(inspector(seen),),
    )
    assert seen["peft_config"].use_rslora and seen["peft_config"].use_dora
    magnitudes = [n for n in seen["trainable"] if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 2 * 2  # q_proj and v_proj in each of the 2 layers
    assert all(seen["trainable"][n] == torch.float32 for n in magnitudes)
    changed = [n for n in magnitudes if not torch.equal(seen["magnitude_before"][n], seen["magnitude_after"][n])]
    assert changed == magnitudes, "DoRA's magnitude vectors did not train"
    config = AutoConfig.from_pretrained(materialize("builtin:tiny-llama"))
    assert last["trainable_params"] == count_lora_params(config, 8, ["q_proj", "v_proj"], use_dora=True)
    assert last["trainable_params"] == 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8)) + 2 * (64 + 32)
    assert last["step"] == 10 and last["eval_loss"] == last["eval_loss"]  # finite, not NaN


# Allocation failures as they surface from CUDA libraries, not as torch.OutOfMemoryError (issue 14).
OOM_FORMS = [
    "CUDA out of memory. Tried to allocate 2.00 GiB",  # accelerate's " out of memory." (as a plain RuntimeError)
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
]


@pytest.mark.parametrize("message", OOM_FORMS, ids=["cuda-oom", "cudnn", "cpu-allocator", "cuda-runtime", "cublas"])
def test_an_allocation_failure_raised_inside_a_training_step_ends_the_trial_as_oom(
    monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    from tests.fault_plugins import OOM_IN_FORWARD, OOM_MESSAGE_ENV
    from trainables.qlora import run_trial

    monkeypatch.setenv(OOM_MESSAGE_ENV, message)
    spec = spec_for(max_steps=4, eval_every=2, oom_retry=False, checkpoint=False, callbacks=[OOM_IN_FORWARD])
    recorder = Recorder()
    last = run_trial(dict(TRIAL), trial_job(spec), report=recorder)
    assert last["trial_status"] == "oom" and last["oom_message"] == message.splitlines()[0][:300]
    assert recorder.metrics[-1]["trial_status"] == "oom"


def test_an_allocation_failure_by_message_gets_the_oom_retry_and_the_next_attempt_trains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.fault_plugins import OOM_IN_FORWARD, OOM_MESSAGE_ENV
    from trainables.qlora import run_trial

    monkeypatch.setenv(OOM_MESSAGE_ENV, OOM_FORMS[-1])
    spec = spec_for(max_steps=4, eval_every=2, oom_retry=True, checkpoint=False, callbacks=[OOM_IN_FORWARD])
    last = run_trial(dict(TRIAL), trial_job(spec), report=Recorder())
    assert "trial_status" not in last and last["step"] == 4 and last["micro_batch_size"] == 4  # trained to the end
    assert "CUBLAS_STATUS_ALLOC_FAILED" in last["oom_retry"]


def test_any_other_error_inside_a_training_step_is_not_taken_for_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same seam with an unrelated message raises, as a failed trial does."""
    from tests.fault_plugins import OOM_IN_FORWARD, OOM_MESSAGE_ENV
    from trainables.qlora import run_trial

    monkeypatch.setenv(OOM_MESSAGE_ENV, "CUDA error: an illegal memory access was encountered")
    spec = spec_for(max_steps=4, eval_every=2, oom_retry=True, checkpoint=False, callbacks=[OOM_IN_FORWARD])
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_trial(dict(TRIAL), trial_job(spec), report=Recorder())
