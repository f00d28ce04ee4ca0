"""`loraplex bench engine` on the tiny model: the roofline's terms are reported and add up."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from bench.engine import ModelShapes
from bench.step_profile import ENTRY_POINTS
from services.cli.main import main as cli_main


def test_engine_bench_reports_the_roofline_terms(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "bench", "engine", "--json", "--model-dir", str(tiny_llama_dir), "--dtype", "float32",
        "--batch", "4", "--new-tokens", "8", "--peft-new-tokens", "3", "--prefill-tokens", "16",
        "--prefill-requests", "4", "--scale-pool", "12", "--scale-new-tokens", "3",
        "--bandwidth-mib", "64", "--plot", str(tmp_path / "engine.png"), "--profile",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "engine.json").read_text())
    assert (tmp_path / "engine.png").stat().st_size > 0

    # The ceiling that could not fail is gone; the roofline's terms are all there and add up.
    assert "ratio_vs_ceiling" not in result
    shapes = ModelShapes.of(tiny_llama_dir)
    # Four adapters, ranks 8/16/32/64, every linear layer: 2 * r * (in + out) per module per layer.
    per_rank = sum(i + o for i, o in shapes.modules.values()) * shapes.num_layers
    assert result["roofline_lora_flops"] == 2 * (8 + 16 + 32 + 64) * per_rank
    assert result["roofline_adapter_bytes"] == (8 + 16 + 32 + 64) * per_rank * 4  # fp32, each read once
    assert result["roofline_bandwidth_bytes_s"] > 1e8
    assert result["roofline_achieved_flop_s"] > 0
    bare, compute, memory = (result[f"roofline_{k}_ms"] for k in ("bare_step", "compute", "memory"))
    # The JSON line rounds floats to 4 decimals: small terms need an absolute tolerance too.
    assert compute == pytest.approx(
        1000 * result["roofline_lora_flops"] / result["roofline_achieved_flop_s"], rel=1e-3, abs=1e-4
    )
    assert memory == pytest.approx(
        1000 * result["roofline_adapter_bytes"] / result["roofline_bandwidth_bytes_s"], rel=1e-3, abs=1e-4
    )
    assert result["roofline_step_ms"] == pytest.approx(bare + max(compute, memory), rel=1e-3, abs=1e-4)
    assert result["ratio_vs_roofline"] == pytest.approx(
        result["roofline_step_ms"] / result["multilora_step_ms"], rel=1e-3, abs=1e-4
    )
    assert result["multilora_step_ms"] > 0
    # The other workloads stay, the pool scaling among them.
    assert result["scale_pool"] == 12
    for key in ("ratio_vs_peft", "prefill_ratio_vs_base", "scaling_ratio", "multilora_vs_base"):
        assert result[key] > 0

    # The step profile: no kind of work is counted twice (what is left of the step, norms, rotary
    # and Python among it, stays positive), LoRA costs nothing without adapters,
    # the gather is part of attention, and the engine's functions are unwrapped afterwards.
    for label in ("base", "multilora"):
        ms = {
            k: result[f"profile_{label}_{k}_ms"]
            for k in ("step", "gemm", "lora", "attention", "kv_gather", "sampler", "other")
        }
        assert result[f"profile_{label}_steps"] == 7  # 8 new tokens, the first from the prefill
        assert ms["gemm"] > 0 and ms["attention"] > 0 and ms["sampler"] > 0
        assert 0 < ms["kv_gather"] < ms["attention"]
        assert 0 < ms["other"] < ms["step"]
    assert result["profile_base_lora_ms"] == 0
    assert result["profile_multilora_lora_ms"] > 0
    for names in ENTRY_POINTS.values():
        for module_name, attr in names:
            assert getattr(importlib.import_module(module_name), attr).__name__ == attr
