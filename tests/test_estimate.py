"""`qlora-sweep estimate`: the corners of a space, predicted from the model config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from sweeps.cli import main
from sweeps.estimate import corner_configurations
from sweeps.spec import parse_spec
from tests.conftest import make_spec_dict, write_spec
from trainables.memory_estimator import GIB, LLAMA3_8B_CONFIG

LLAMA3_8B = {k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "model_type"}
PARTS = (
    "linear_weights_bytes", "quant_constants_bytes", "other_weights_bytes", "lora_weights_bytes", "lora_grads_bytes",
    "optimizer_state_bytes", "activations_bytes", "logits_bytes", "dequant_workspace_bytes", "allocator_overhead_bytes",
)


def llama3_spec(tmp_path: Path, **overrides: object) -> Path:
    model = tmp_path / "llama3-8b-config-only"
    LlamaConfig(**LLAMA3_8B).save_pretrained(model)
    assert not list(model.glob("*.safetensors"))
    raw = make_spec_dict(
        model={"path": str(model)},
        data={"max_seq_length": 2048},
        space={"r": [8, 16, 64], "target_modules": ["qv", "attention", "all-linear"], "batch_size": [1, 2, 4], "lora_dropout": [0.0, 0.05]},
        resources={"gpus_per_trial": 1},
        **overrides,
    )
    return write_spec(tmp_path / "llama3.yaml", raw)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_corners_are_min_max_rank_by_each_target_by_min_max_micro_batch() -> None:
    spec = parse_spec(make_spec_dict(space={"r": [16, 4, 8], "target_modules": ["qv", "all-linear"], "batch_size": [2, 8, 4]}))
    corners = [(k.r, k.target_modules, k.batch_size) for k in corner_configurations(spec)]
    assert corners == [(4, "qv", 2), (4, "qv", 8), (4, "all-linear", 2), (4, "all-linear", 8),
                       (16, "qv", 2), (16, "qv", 8), (16, "all-linear", 2), (16, "all-linear", 8)]
    fixed = parse_spec(make_spec_dict(space={"r": 8, "target_modules": "qv"}, train={"batch_size": 4, "max_steps": 20, "eval_every": 10}))
    assert [(k.r, k.batch_size, k.seq_len) for k in corner_configurations(fixed)] == [(8, 4, 64)]


def test_estimate_llama3_8b_from_a_config_only_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = llama3_spec(tmp_path)
    code, out, err = run_cli(["estimate", str(spec_file), "--json"], capsys)
    assert code == 0, err
    entries = json.loads(out)
    assert len(entries) == 2 * 3 * 2  # min/max rank x 3 target choices x min/max micro-batch
    for entry in entries:
        assert entry["seq_len"] == 2048 and entry["lora_dropout"] == 0.05  # dropout on: the upper case
        assert entry["reserved_bytes"] == sum(entry[p] for p in PARTS)
        assert entry["total_gib"] == pytest.approx(entry["reserved_bytes"] / GIB, abs=1e-4)
        assert entry["needed_gib"] == pytest.approx(entry["total_with_context_gib"] * 1.10, abs=1e-3)
        assert entry["fits"] == {g: entry["needed_gib"] <= float(g) for g in ("8", "16", "24", "40", "48", "80")}
        # NF4 + double quant of Llama-3-8B's 6.98e9 linear weights: 3.25 GiB packed (docs/memory.md).
        assert entry["linear_weights_bytes"] == 3_489_660_928 and entry["quantized_params"] == 6_979_321_856
    by_key = {(e["r"], e["target_modules"], e["batch_size"]): e for e in entries}
    small, large = by_key[(8, "qv", 1)], by_key[(64, "all-linear", 4)]
    assert small["lora_params"] < large["lora_params"] and small["total_gib"] < large["total_gib"]
    assert not small["fits"]["8"] and small["fits"]["16"]  # 8B in 4-bit with fp32 upcasts: more than 8 GiB
    assert all(e["fits"]["80"] for e in entries)

    code, table, _ = run_cli(["estimate", str(spec_file), "--gpu-gib", "12", "24"], capsys)
    assert code == 0
    assert "compute bfloat16 on CUDA, optimizer paged_adamw_32bit" in table
    for key, entry in ((("8", "qv", "1"), small), (("64", "all-linear", "4"), large)):
        row = next(line.split() for line in table.splitlines() if tuple(line.split()[:3]) == key)
        # r, targets, batch, 7 parts, reserved, +ctx, GiB, then the GPU sizes it fits
        assert row[12] == f"{entry['total_with_context_gib']:.2f}"
        assert row[13:] == ([g for g in ("12", "24") if entry["needed_gib"] <= float(g)] or ["none"])
    fits_12 = sum(e["needed_gib"] <= 12 for e in entries)
    assert f"12 GiB {fits_12}/12, 24 GiB {sum(e['needed_gib'] <= 24 for e in entries)}/12" in table


def test_estimate_builtin_models_and_the_spec_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("tiny-llama", "tiny-gpt2"):
        spec_file = write_spec(
            tmp_path / f"{name}.yaml",
            make_spec_dict(model={"path": f"builtin:{name}"}, resources={"gpus_per_trial": 0, "gpu_memory_gib": 8}),
        )
        code, out, err = run_cli(["estimate", str(spec_file), "--json"], capsys)
        assert code == 0, err
        entries = json.loads(out)
        assert {(e["r"], e["target_modules"]) for e in entries} == {(4, "qv"), (4, "all-linear"), (8, "qv"), (8, "all-linear")}
        # A tiny model's prediction is a few MiB plus the 512 MiB CUDA context.
        assert all(0 < e["total_gib"] < 0.05 and e["fits"]["8"] for e in entries)
        code, table, _ = run_cli(["estimate", str(spec_file)], capsys)
        assert code == 0 and "resources.gpu_memory_gib = 8: 4/4 corners would be admitted" in table


def test_an_unreadable_model_config_exits_2_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "no-config"
    empty.mkdir()
    spec_file = write_spec(tmp_path / "bad.yaml", make_spec_dict(model={"path": str(empty)}))
    code, out, err = run_cli(["estimate", str(spec_file)], capsys)
    assert code == 2 and not out
    assert "model.path: cannot read the model config of" in err and "Use a local folder with config.json" in err
    assert "Traceback" not in err
