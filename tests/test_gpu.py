"""The GPU-only measurement and packing code, on a real GPU; and the GPU calibration script's dry run.

The `gpu` tests skip without CUDA (they run on the GPU machine, as part of `benchmarks/gpu_truth.py`):
what memory_kind cuda_reserved reads, that a packed trial's set_per_process_memory_fraction is
enforced, and that a real CUDA out-of-memory inside a trial ends it as status oom while the next trial
in the same process trains. The dry-run test runs everywhere (CI): `gpu_truth.py --dry-run` must run
every code path on CPU and write its JSON and markdown with the structure docs/gpu-calibration.md reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, TRIAL_CONFIG, make_spec_dict

cuda = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA (runs on the GPU machine: benchmarks/gpu_truth.py)"
)
MIB = 2**20


def gpu_truth() -> Any:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_truth as module

    return module


@pytest.fixture
def full_gpu() -> Any:
    """The test's process gets the whole GPU back afterwards, whatever cap a test set."""
    import torch

    yield "cuda:0"
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


@pytest.mark.gpu
@cuda
def test_cuda_reserved_reads_what_the_caching_allocator_held(full_gpu: str) -> None:
    import torch

    from trainables.memory_probe import PeakMemoryProbe

    probe = PeakMemoryProbe(full_gpu)
    probe.reset()
    blob = torch.empty(256 * MIB, dtype=torch.uint8, device=full_gpu)
    del blob
    reading = probe.read()
    assert reading.memory_kind == "cuda_reserved"
    assert reading.peak_memory_mib >= reading.cuda_allocated_mib >= 256
    # The peak is kept after the tensor is freed, and a reset starts again from what is held now.
    probe.reset()
    assert probe.read().cuda_allocated_mib < 256


@pytest.mark.gpu
@cuda
def test_a_packed_trials_memory_fraction_is_enforced(full_gpu: str) -> None:
    facts = gpu_truth().fraction_enforced(full_gpu, 0.25)
    assert facts["gpu_fraction_enforced"] is True and facts["gpu_fraction"] == 0.25
    assert facts["raised_oom"], "an allocation above the 0.25 cap went through: the share is not enforced"


@pytest.mark.gpu
@cuda
def test_a_real_cuda_oom_ends_the_trial_as_oom_and_the_next_trial_trains(full_gpu: str) -> None:
    import torch
    from transformers import TrainerCallback

    from sweeps.plan import trial_job
    from sweeps.spec import parse_spec
    from trainables.qlora import run_trial

    def too_big(context: Any) -> Any:
        class AllocateTooMuch(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                total = torch.cuda.get_device_properties(0).total_memory
                torch.empty(2 * total, dtype=torch.uint8, device=context.device)  # the allocator raises

        return AllocateTooMuch()

    spec = parse_spec(make_spec_dict(train={"max_steps": 4, "eval_every": 2, "checkpoint": False, "oom_retry": False},
                                     resources={"gpus_per_trial": 1, "cpus_per_trial": 1}))
    first = run_trial(dict(TRIAL_CONFIG), trial_job(spec), report=lambda m, c=None: None, callbacks=(too_big,))
    assert first["trial_status"] == "oom" and "out of memory" in first["oom_message"].lower()
    assert first["memory_kind"] == "cuda_reserved"
    second = run_trial(dict(TRIAL_CONFIG), trial_job(spec), report=lambda m, c=None: None)
    assert "trial_status" not in second and second["step"] == 4 and second["memory_kind"] == "cuda_reserved"


@pytest.mark.integration
def test_gpu_truth_dry_run_runs_every_part_on_cpu_and_writes_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_truth.py"), "--dry-run", "--out-dir", str(out),
         "--models-dir", str(tmp_path / "models")],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads((out / "gpu_truth.json").read_text())
    table = (out / "gpu_truth.md").read_text()
    assert payload["dry_run"] is True and payload["label"].startswith("DRY RUN")
    assert table.startswith("# GPU truth - DRY RUN") and "not GPU figures" in table
    assert payload["environment"]["dry_run"] is True and payload["elapsed_s"] < payload["budget_s"]
    # 1. Every grid point ran on CPU and compares the CPU prediction with the CPU tensor peak.
    points = payload["calibration"]["points"]
    assert len(points) == 4 and all(p["status"] == "ok" for p in points), points
    for p in points:
        assert p["measured"]["memory_kind"] == "host_rss" and p["measured"]["tensor_peak_kind"] == "cpu_tensor_peak"
        assert p["predicted"]["setup"]["device"] == "cpu" and p["predicted"]["allocated_mib"] > 0
        assert set(p["predicted"]["parts_mib"]) >= {"linear_weights", "activations", "logits", "optimizer_state"}
        assert {"allocated_vs_tensor_peak", "static", "optimizer", "dynamic"} <= set(p["error_pct"])
        assert p["measured"]["static_mib"] > 0 and p["measured"]["optimizer_mib"] > 0
    assert payload["calibration"]["summary"]["points_measured"] == 4
    assert "## 1. Calibration: predicted vs measured" in table and "### Predicted parts (MiB)" in table
    # 2. The GPU-only paths, each through its CPU substitute, and labelled so.
    checks = {c["check"]: c for c in payload["paths"]["checks"]}
    assert set(checks) == {"memory_kind", "packing at 0.5", "oom, then the next trial"}
    assert all(c["ok"] for c in checks.values()), checks
    assert all(c["detail"].startswith("dry run") for c in checks.values())
    assert checks["packing at 0.5"]["overlapped"] in (True, False) and len(checks["packing at 0.5"]["trials"]) == 2
    assert payload["paths"]["gpu_tests"]["ran"] is False
    # 3. Throughput: ours and the bare loop, interleaved; no MFU on CPU.
    summary = payload["throughput"]["summary"]
    assert summary["ours"]["tokens_per_s"]["n"] == summary["bare"]["tokens_per_s"]["n"] == 1
    assert summary["ratio_ours_over_bare"]["n"] == 1 and summary["ours"]["mfu"] is None
    assert "## 3. Throughput" in table and "Ratio ours / bare" in table
    # 4. Four adapters on one base against four solo steps.
    multi = payload["multi"]
    assert multi["adapters"] == 4 and set(multi["measured"]) == {"together", "solo"}
    assert all(m["seconds"] > 0 and m["tensor_peak_mib"] > 0 for m in multi["measured"].values())
    assert "## 4. 4 adapters on one base vs solo steps" in table
