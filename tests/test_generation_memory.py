"""The task evaluation's memory: KV cache, last-position logits and no-grad forwards (trainables/memory_estimator.py).

The arithmetic is checked by hand on a Llama-3.1-8B-shaped config (meta device, no weights); admission
and `estimate` with a spec's eval section without Ray; and the phases against the tensors torch.profiler
sees allocated on CPU, on small random models built in the test and (integration) on the builtin tiny
model loaded as a trial loads it.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from sweeps.estimate import estimate_corners, render_table
from sweeps.memory_plan import GpuSize, MemoryPlan, memory_plan
from sweeps.spec import SpecError, parse_spec
from tests.conftest import TRIAL_CONFIG, make_spec_dict
from tests.test_memory_estimator import BASE as ESTIMATOR_BASE
from trainables.memory_estimator import (
    LLAMA3_8B_CONFIG,
    MIB,
    TaskEvalWorkload,
    estimate_peak_memory,
    kv_cache_bytes,
    lora_target_layers,
    model_shape,
    task_eval_phases,
)
from trainables.memory_probe import TensorPeakProbe
from trainables.task_metrics import EvalSpec
from trainables.training_setup import TrainingSetup
from trainables.trial_memory import MemoryKnobs, estimate_for_trial, task_eval_workload

# Llama-3.1-8B's shape: 32 layers, 8 key/value heads of 128, vocabulary 128,256.
LLAMA_8B = LlamaConfig(**{k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "model_type"})
GENERATE = {"type": "exact_match", "name": "generated", "mode": "generate"}

# The estimator tests' recipe, at micro-batch 1 with the paged optimizer.
BASE = {**ESTIMATOR_BASE, "batch_size": 1, "optimizer": "paged_adamw_32bit"}


def phase(estimate, name: str):
    return next(p for p in estimate.task_eval.phases if p.name == name)


# --- the arithmetic ------------------------------------------------------------------------------


def test_kv_cache_is_two_x_layers_x_kv_heads_x_head_dim_x_bytes_per_token() -> None:
    shape = model_shape(LLAMA_8B)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.vocab) == (32, 8, 128, 128256)
    # eval.batch_size 16, a 512-token prompt and 256 new tokens: 768 positions per row.
    by_hand = 2 * 32 * 8 * 128 * 2 * 16 * (512 + 256)
    assert by_hand == 1_610_612_736  # 1,536 MiB in bf16
    assert kv_cache_bytes(shape, rows=16, positions=768, kv_bytes=2) == by_hand

    workload = TaskEvalWorkload(generate_rows=16, prompt_len=512, new_tokens=256)
    # 16-bit LoRA without peft's upcast: keys and values in the compute dtype.
    plain = estimate_peak_memory(LLAMA_8B, **{**BASE, "quantization": "none"}, task_eval=workload)
    decode = phase(plain, "generation decode, output head")
    assert dict(decode.parts) == {"kv_cache": by_hand, "logits": 16 * 128256 * (2 + 8)}
    assert dict(phase(plain, "generation prefill, decoder blocks").parts)["kv_cache"] == by_hand * 512 // 768

    # The sweep's 4-bit setup: prepare_model_for_kbit_training makes the stream fp32 and generation runs
    # outside autocast, so the cache and the head's logits are fp32.
    sweep = estimate_peak_memory(
        LLAMA_8B, **BASE, lora_dtype="bfloat16", upcast_non_quantized=True, fused_lm_head=True, task_eval=workload
    )
    assert dict(phase(sweep, "generation decode, output head").parts) == {
        "kv_cache": 2 * by_hand,  # 3,072 MiB
        "logits": 16 * 128256 * (4 + 4 + 4),  # this step's logits and fp32 copy, the last step's scores
    }
    attention = dict(phase(sweep, "generation decode, attention").parts)
    # One layer's keys twice while torch.cat grows the cache, and the bool mask.
    assert attention["attention"] == 16 * 768 * 8 * 128 * 4 + 16 * 768
    assert "KV cache 3,072.0 MiB" in phase(sweep, "generation decode, attention").describe()


def test_the_workload_takes_its_bounds_from_the_eval_section_and_max_seq_length() -> None:
    assert task_eval_workload(EvalSpec(), 512) is None  # no metrics, no task evaluation
    both = task_eval_workload(EvalSpec(metrics=[GENERATE, "exact_match"], batch_size=16, max_new_tokens=256), 512)
    assert both == TaskEvalWorkload(
        generate_rows=16, prompt_len=512, new_tokens=256, forward_rows=16, forward_len=512,
        forward_keeps_previous=True,  # 64 examples, 4 batches
    )
    # No max_new_tokens: the trial generates the longest reference, which is under max_seq_length.
    unset = task_eval_workload(EvalSpec(metrics=["rouge_l"], batch_size=32, max_examples=8), 300)
    assert (unset.generate_rows, unset.prompt_len, unset.new_tokens, unset.forward_rows) == (8, 300, 300, 0)
    assert not task_eval_workload(EvalSpec(metrics=["exact_match"], batch_size=64), 512).forward_keeps_previous


def test_without_task_metrics_the_training_estimate_is_unchanged() -> None:
    alone = estimate_peak_memory(LLAMA_8B, **BASE)
    assert alone == estimate_peak_memory(LLAMA_8B, **BASE, task_eval=None) and alone.task_eval is None
    assert alone.reserved_bytes == alone.training_reserved_bytes and alone.peak_phase == "training"
    assert alone.total_with_context_gib == alone.training_with_context_gib
    with_eval = estimate_peak_memory(
        LLAMA_8B, **BASE, task_eval=TaskEvalWorkload(generate_rows=64, prompt_len=512, new_tokens=512)
    )
    # The training parts do not move; the peak becomes the larger phase.
    assert with_eval.training_reserved_bytes == alone.training_reserved_bytes
    assert with_eval.activations_bytes == alone.activations_bytes and with_eval.logits_bytes == alone.logits_bytes
    evaluation = with_eval.task_eval
    assert with_eval.reserved_bytes == max(alone.reserved_bytes, evaluation.reserved_bytes) == evaluation.reserved_bytes
    assert with_eval.peak_phase == "task eval"
    # Paused training holds weights, adapters and optimizer states; gradients are set to None.
    assert evaluation.held_bytes == (
        alone.linear_weights_bytes + alone.quant_constants_bytes + alone.other_weights_bytes
        + alone.lora_weights_bytes + alone.optimizer_state_bytes
    )
    assert evaluation.allocated_bytes == evaluation.held_bytes + alone.dequant_workspace_bytes + evaluation.peak.bytes
    d = json.loads(json.dumps(with_eval.as_dict()))
    assert d["peak_phase"] == "task eval" and d["training_reserved_bytes"] == alone.reserved_bytes
    assert {p["name"] for p in d["task_eval"]["phases"]} >= {"generation prefill, decoder blocks", "generation decode, attention"}


def test_a_bad_workload_names_the_field_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"task_eval.new_tokens: must be positive when generate_rows is 4"):
        estimate_peak_memory(LLAMA_8B, **BASE, task_eval=TaskEvalWorkload(generate_rows=4, prompt_len=8))
    with pytest.raises(ValueError, match=r"task_eval.forward_rows: -1 must be a whole number >= 0"):
        estimate_peak_memory(LLAMA_8B, **BASE, task_eval=TaskEvalWorkload(forward_rows=-1))


# --- admission and `estimate` ----------------------------------------------------------------------


def eval_spec(batch_size: int | None, max_new_tokens: int = 256, **eval_section: object):
    sections = {} if batch_size is None else {
        "eval": {"metrics": [GENERATE], "batch_size": batch_size, "max_new_tokens": max_new_tokens, **eval_section}
    }
    return parse_spec(
        make_spec_dict(
            data={"max_seq_length": 512},
            space={"r": [8], "target_modules": ["qv"]},
            train={"batch_size": 1, "max_steps": 20, "eval_every": 10},
            resources={"gpus_per_trial": 1},
            **sections,
        )
    )


KNOBS = MemoryKnobs(r=8, target_modules="qv", batch_size=1, seq_len=512)


def test_a_task_evaluation_that_would_not_fit_is_refused_and_a_smaller_eval_batch_is_admitted() -> None:
    # 64 rows generating 1,024 tokens after prompts of up to 512: the last decode step's cache is the peak.
    without, large, small = eval_spec(None), eval_spec(64, 1024, max_examples=64), eval_spec(4, 1024)
    training = MemoryPlan(without, LLAMA_8B, None).estimate(KNOBS)
    assert training.task_eval is None
    big = MemoryPlan(large, LLAMA_8B, None).estimate(KNOBS)
    assert big.task_eval.peak.name == "generation decode, attention" and big.peak_phase == "task eval"
    assert big.training_reserved_bytes == training.reserved_bytes < big.reserved_bytes
    # A GPU between the training peak and the evaluation's peak.
    gpu = GpuSize((training.total_with_context_gib * 1.1 + big.total_with_context_gib * 1.1) / 2, "test")

    reason, _ = MemoryPlan(without, LLAMA_8B, gpu).admit(KNOBS)
    assert reason is None  # the control: training alone fits
    reason, _ = MemoryPlan(large, LLAMA_8B, gpu).admit(KNOBS)
    assert reason is not None and "predicted not to fit in its task evaluation (eval.metrics)" in reason
    assert "lower eval.batch_size or eval.max_new_tokens" in reason and "KV cache" in reason
    assert "training alone needs" in reason and "and fits" in reason
    reason, estimate = MemoryPlan(small, LLAMA_8B, gpu).admit(KNOBS)
    assert reason is None and estimate.task_eval is not None

    # Before launch: a space whose every configuration's evaluation is too large stops the sweep.
    with pytest.raises(SpecError, match=r"Lower eval.batch_size, eval.max_new_tokens or data.max_seq_length \(the task"):
        memory_plan(large, LLAMA_8B, gpu)
    assert memory_plan(small, LLAMA_8B, gpu).admit(KNOBS)[0] is None
    # Packing asks for the share the evaluation needs.
    assert MemoryPlan(large, LLAMA_8B, gpu).gpu_fraction(KNOBS) == 1.0
    assert MemoryPlan(without, LLAMA_8B, gpu).gpu_fraction(KNOBS) < 1.0


@pytest.mark.parametrize(
    "section, peak, advice",
    [
        ({"metrics": ["exact_match"], "max_examples": 128}, "teacher-forced forward, output head",
         "lower eval.batch_size or data.max_seq_length (eval.max_new_tokens does not shorten a teacher-forced forward)"),
        ({"max_new_tokens": 16}, "generation prefill, decoder blocks",
         "lower eval.batch_size, or data.max_seq_length, which bounds the prompts"),
    ],
)
def test_the_advice_names_what_shrinks_the_peak_phase(section: dict, peak: str, advice: str) -> None:
    spec = eval_spec(64, **section)
    big = MemoryPlan(spec, LLAMA_8B, None).estimate(KNOBS)
    assert big.task_eval.peak.name == peak
    gpu = GpuSize(big.training_with_context_gib * 1.2, "test")
    reason, _ = MemoryPlan(spec, LLAMA_8B, gpu).admit(KNOBS)
    assert f"it peaks at {peak}" in reason and advice in reason


def test_estimate_shows_the_task_evaluation_terms_by_name() -> None:
    spec = eval_spec(16)
    corners = estimate_corners(spec, LLAMA_8B)
    table = render_table(spec, corners, "llama")
    header = next(line for line in table.splitlines() if line.lstrip().startswith("r "))
    assert "task_eval" in header.split()
    assert "prompts <= 512 tokens (data.max_seq_length) + 256 new tokens (eval.max_new_tokens)" in table
    assert "task eval: generation decode, attention (16 rows x 768 positions): KV cache 3,072.0 MiB" in table
    assert "task eval: generation decode, output head (16 rows x 768 positions): KV cache 3,072.0 MiB, logits 23.5 MiB" in table
    entry = corners[0].as_dict()
    assert entry["task_eval"]["reserved_bytes"] == corners[0].estimate.task_eval.reserved_bytes
    assert entry["reserved_bytes"] == max(entry["training_reserved_bytes"], entry["task_eval"]["reserved_bytes"])


# --- against the allocator, on CPU -----------------------------------------------------------------


def _tensor_peak(model: object, fn) -> int:
    """Bytes of tensor storage `fn` allocates beyond what the model holds, at its highest (torch.profiler)."""
    probe = TensorPeakProbe()
    probe.start("eval", model)
    with torch.no_grad():
        fn()
    probe.stop()
    window = probe.windows[0]
    return window.peak_bytes - window.baseline_bytes


@pytest.mark.parametrize(
    "family, vocab, prompt, new",
    [
        ("llama", 1000, 48, 24),  # prefill's no-grad activations are the peak
        ("llama", 1000, 16, 160),  # the decode step's cache is
        ("llama", 32000, 8, 48),  # the decode step's logits are
        ("gpt2", 1000, 16, 160),
    ],
)
def test_the_phases_match_the_allocator_on_cpu(family: str, vocab: int, prompt: int, new: int) -> None:
    """Random fp32 models with LoRA on every linear layer, generation, teacher-forced forward and loss as
    trainables/task_metrics.py runs them: within 3% of the bytes torch.profiler sees allocated."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=256, n_inner=1024, n_layer=2, n_head=4, pad_token_id=0,
                            bos_token_id=1, eos_token_id=1)
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config, dtype=torch.float32),
        LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.config.use_cache = False  # as the Trainer leaves it; generate turns the cache on itself
    model.eval()
    rows, length = 8, 64
    lengths = [prompt - k * prompt // (2 * rows) for k in range(rows)]
    ids = torch.zeros((rows, prompt), dtype=torch.long)
    mask = torch.zeros((rows, prompt), dtype=torch.long)
    for k, n in enumerate(lengths):  # left padding, as TaskEvaluator.generate pads
        ids[k, prompt - n:] = torch.randint(2, vocab, (n,))
        mask[k, prompt - n:] = 1
    batch = torch.randint(2, vocab, (rows, length))
    right = torch.ones((rows, length), dtype=torch.long)
    right[1:, length - 10:] = 0  # right padding, as the teacher-forced forward pads

    def generate() -> None:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, num_beams=1,
                       pad_token_id=0, eos_token_id=None, use_cache=True)

    def forward() -> None:
        model(input_ids=batch, attention_mask=right)

    def loss() -> None:
        logits = model(input_ids=batch, attention_mask=right).logits.float()
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    _tensor_peak(model, generate)  # the first call sets up what later ones reuse
    measured = {"generation": _tensor_peak(model, generate), "teacher-forced": _tensor_peak(model, forward),
                "forgetting": _tensor_peak(model, loss)}
    workload = TaskEvalWorkload(generate_rows=rows, prompt_len=prompt, new_tokens=new, forward_rows=rows,
                                forward_len=length, loss_rows=rows, loss_len=length)
    phases = task_eval_phases(model_shape(config), lora_target_layers(config, "all-linear"), workload,
                              compute_bytes=4, autocast=False, lora_bytes=4, device="cpu")
    for name, got in measured.items():
        predicted = max(p.bytes for p in phases if p.name.startswith(name))
        error = (predicted - got) / got
        assert abs(error) <= 0.03, f"{name}: predicted {predicted / MIB:.3f} MiB, measured {got / MIB:.3f} MiB ({error:+.1%})"


@pytest.mark.integration
def test_the_builtin_tiny_model_evaluates_within_the_prediction() -> None:
    """The trial's own path: the builtin tiny Llama loaded as a CPU trial loads it (NF4, peft's fp32 upcast),
    LoRA on every linear layer, TaskEvaluator's generation and teacher-forced forward on the smoke task.
    The prediction at the lengths the batches really had is above the measurement by at most 12%: the
    dequantization workspace is counted on top of the LoRA branch's moment, where it is already freed."""
    from peft import get_peft_model

    from sweeps.plan import resolved_data
    from trainables.data import prepare_data
    from trainables.params import TrialConfig
    from trainables.task_metrics import EvalJob, TaskEvaluator
    from trainables.tiny_models import materialize
    from trainables.training_setup import load_tokenizer

    metrics = ["exact_match", GENERATE]
    spec = parse_spec(make_spec_dict(eval={"metrics": metrics, "batch_size": 8, "max_examples": 16}))
    path = materialize("builtin:tiny-llama")
    tokenizer = load_tokenizer(path, spec.model)
    data = prepare_data(spec.resolve_path(spec.data.path), resolved_data(spec), tokenizer)
    setup = TrainingSetup.resolve(spec.model, spec.train, "cpu")
    model = setup.load_model(path, spec.model)
    config = model.config
    trial = TrialConfig.from_tune({**TRIAL_CONFIG, "target_modules": "all-linear"}, 8)
    model = get_peft_model(model, setup.lora_config(trial, config.model_type))
    model.config.use_cache = False  # as the Trainer sets it
    model.eval()
    evaluator = TaskEvaluator(EvalJob(spec=spec.eval, rounds=(1,)), tokenizer, data.eval_tokens, spec.data.max_seq_length)
    shapes: list[tuple[int, int, int]] = []
    generate = model.generate

    def recording(**kwargs):
        out = generate(**kwargs)
        shapes.append((*kwargs["input_ids"].shape, out.shape[1]))
        return out

    model.generate = recording
    _tensor_peak(model, lambda: evaluator.generate(model))
    shapes.clear()
    measured_generation = _tensor_peak(model, lambda: evaluator.generate(model))
    measured_forward = _tensor_peak(model, lambda: evaluator._teacher_forced_exact_match(model))
    knobs = MemoryKnobs(r=8, target_modules="all-linear", batch_size=8, seq_len=spec.data.max_seq_length)

    def predicted(workload: TaskEvalWorkload) -> int:
        evaluation = estimate_for_trial(config, setup, knobs, workload).task_eval
        return evaluation.peak.bytes + evaluation.dequant_workspace_bytes

    generation = max(predicted(TaskEvalWorkload(generate_rows=b, prompt_len=p, new_tokens=t - p)) for b, p, t in shapes)
    lengths = [len(e.prompt) + len(e.reference) for e in evaluator.examples]
    forward = max(
        predicted(TaskEvalWorkload(forward_rows=len(lengths[i:i + 8]), forward_len=max(lengths[i:i + 8]),
                                   forward_keeps_previous=i > 0))
        for i in range(0, len(lengths), 8)
    )
    for name, got, want in (("generation", measured_generation, generation), ("teacher-forced", measured_forward, forward)):
        assert got <= want <= 1.12 * got, f"{name}: predicted {want} bytes, measured {got}"
    # The spec's bounds (prompt and row up to data.max_seq_length) are above what the batches had.
    bound = estimate_for_trial(config, setup, knobs, task_eval_workload(spec.eval, spec.data.max_seq_length)).task_eval
    assert bound.peak.bytes + bound.dequant_workspace_bytes >= max(generation, forward)
