"""The CPU tensor peak: the most tensor bytes a CPU trial holds at once, against the estimator's prediction.

Unit tests check the bookkeeping on plain tensor code (seconds); the integration test trains real
tiny NF4 trials through run_trial and checks that the figure moves with r, target modules and batch
size the way the estimator says, and that the estimator's allocated bytes for the CPU setup come
within 10% of it.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import TRIAL_CONFIG, make_spec_dict
from trainables.memory_probe import (
    TENSOR_PEAK_KIND,
    TensorPeakProbe,
    running_peak,
    storage_bytes,
    trial_tensors,
)

MIB = 2**20


def test_running_peak_is_the_highest_prefix_sum_in_time_order() -> None:
    assert running_peak([]) == (0, 0)
    assert running_peak([100, 50, -100, 200, -250]) == (250, 0)
    assert running_peak([-40, 10]) == (0, -30)  # frees of older blocks never make a negative peak


def test_storage_bytes_counts_each_storage_once() -> None:
    import torch

    a = torch.zeros(1000)
    view = a[10:20]
    b = torch.zeros(10, dtype=torch.float64)
    assert storage_bytes([a, view, a, b]) == 4000 + 80
    assert storage_bytes([torch.empty(5, device="meta")]) == 0


def test_the_probe_sees_activations_and_temporaries_not_just_what_survives() -> None:
    import torch

    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters())
    held = storage_bytes(trial_tensors(model, optimizer))
    assert held == (256 * 256 + 256) * 4

    probe = TensorPeakProbe(steps=1)
    probe.start("train", model, optimizer)
    x = torch.randn(64, 256)
    model(x).pow(2).sum().backward()
    temporary = torch.empty(3 * MIB, dtype=torch.uint8)  # alive for a moment only
    del temporary
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    probe.step_done()
    probe.stop()
    reading = probe.reading()
    assert reading is not None and reading.batch_size == 64 and reading.seq_len == 256
    (window,) = reading.windows
    assert window.baseline_bytes == held and window.steps == 1 and window.events > 0
    # At its peak the window held the weights, the input, and the 3 MiB temporary at least.
    assert reading.peak_bytes >= held + 64 * 256 * 4 + 3 * MIB
    metrics = reading.as_metrics()
    assert metrics["tensor_peak_kind"] == TENSOR_PEAK_KIND and metrics["tensor_peak_phase"] == "train"
    assert metrics["tensor_peak_mib"] == metrics["tensor_peak_train_mib"] and metrics["tensor_peak_eval_mib"] is None

    # A second window opens with the optimizer states counted as held (they were made in window one).
    probe.start("eval", model, optimizer)
    with torch.no_grad():
        model(torch.randn(8, 256))
    probe.stop()
    eval_window = probe.reading().windows[1]
    assert eval_window.baseline_bytes == held * 3 + 2 * 4  # weights, AdamW's two moments, two 0-dim fp32 step counts
    assert eval_window.peak_bytes < reading.peak_bytes


def test_a_probe_that_cannot_profile_says_why_and_reads_nothing() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    model = torch.nn.Linear(4, 4)
    probe = TensorPeakProbe()
    with profile(activities=[ProfilerActivity.CPU]):
        probe.start("train", model)
    assert probe.unavailable and not probe.active and probe.reading() is None
    probe.close()


# --- real trials ----------------------------------------------------------------------------------------


def run(**overrides: Any) -> dict[str, Any]:
    from sweeps.plan import trial_job
    from sweeps.spec import parse_spec
    from trainables.qlora import run_trial

    batch = overrides.get("batch_size", 8)
    spec = parse_spec(make_spec_dict(train={"max_steps": 4, "eval_every": 4, "batch_size": batch, "checkpoint": False}))
    return run_trial({**TRIAL_CONFIG, **overrides}, trial_job(spec), report=lambda metrics, checkpoint_dir=None: None)


@pytest.mark.integration
def test_the_tensor_peak_moves_with_the_configuration_as_predicted_and_within_10_percent() -> None:
    trials = {
        "base": run(r=8, target_modules="qv", batch_size=4),
        "larger r": run(r=64, target_modules="qv", batch_size=4),
        "all-linear": run(r=8, target_modules="all-linear", batch_size=4),
        "larger batch": run(r=8, target_modules="qv", batch_size=16),
        # Packed: each of the 4 rows holds several examples, filled towards max_seq_length, with a
        # block mask between them; more real tokens per step than padded rows of the same micro-batch.
        "packed": run(r=8, target_modules="qv", batch_size=4, packing=True),
    }
    for name, last in trials.items():
        assert last["memory_kind"] == "host_rss" and last["tensor_peak_kind"] == TENSOR_PEAK_KIND, name
        assert last["tensor_peak_steps"] == 3 and last["tensor_peak_eval_mib"] is not None, name
        measured, predicted = last["tensor_peak_mib"], last["predicted_tensor_peak_mib"]
        error = (predicted - measured) / measured
        assert abs(error) <= 0.10, f"{name}: predicted {predicted} MiB vs measured {measured} MiB ({error:+.1%})"
    base = trials["base"]
    packed = trials["packed"]
    assert packed["tensor_peak_batch_size"] == 4 and packed["tensor_peak_seq_len"] > 2 * base["tensor_peak_seq_len"]
    for name in ("larger r", "all-linear", "larger batch", "packed"):
        # The estimator says more, and the measurement (deterministic: same data, same seed) agrees.
        assert trials[name]["predicted_tensor_peak_mib"] > base["predicted_tensor_peak_mib"], name
        assert trials[name]["tensor_peak_mib"] > base["tensor_peak_mib"], (name, trials[name]["tensor_peak_mib"])
    # Host RSS, the other CPU figure, is reported as before.
    assert all(last["peak_memory_mib"] > 100 for last in trials.values())
