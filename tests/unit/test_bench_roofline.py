"""The roofline's arithmetic in bench/engine.py, on numbers worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.engine import ModelShapes, RunTimes, lora_flops_per_token, main, random_weights, roofline


def _model(tmp_path: Path) -> Path:
    config = {
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": 3,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _times(step_s: float, steps: int = 10) -> RunTimes:
    return RunTimes(
        tok_s=0.0, prefill_tok_s=0.0, ttft=[], tpot=[], decode_s=step_s * steps, decode_steps=steps
    )


def test_model_shapes_follow_grouped_query_attention(tmp_path: Path) -> None:
    shapes = ModelShapes.of(_model(tmp_path))
    # head_dim 4, one KV head: k/v project 8 -> 4.
    assert shapes.modules["q_proj"] == (8, 8)
    assert shapes.modules["k_proj"] == shapes.modules["v_proj"] == (8, 4)
    assert shapes.modules["down_proj"] == (16, 8)
    per_layer = 64 + 32 + 32 + 64 + 128 + 128 + 128
    assert shapes.linear_params() == 3 * per_layer + 8 * 100
    # 2 FLOPs per weight per token, plus 4 * layers * context * q_dim for attention.
    assert shapes.step_flops(tokens=2, context=5) == 2 * (2 * shapes.linear_params() + 4 * 3 * 5 * 8)


def test_lora_flops_count_every_targeted_module(tmp_path: Path) -> None:
    shapes = ModelShapes.of(_model(tmp_path))
    qv = random_weights(shapes, "qv", rank=4, seed=0, dtype=torch.float32, targets=("q_proj", "v_proj"))
    # 2 * r * (in + out) per module per layer.
    assert lora_flops_per_token(qv) == 3 * 2 * 4 * ((8 + 8) + (8 + 4))
    assert qv.size_bytes == 3 * 4 * ((8 + 8) + (8 + 4)) * 4


@pytest.mark.parametrize(("bandwidth", "bound"), [(1e12, "compute"), (1e3, "memory")])
def test_roofline_adds_the_larger_of_compute_and_memory_time(
    tmp_path: Path, bandwidth: float, bound: str
) -> None:
    shapes = ModelShapes.of(_model(tmp_path))
    weights = [random_weights(shapes, f"a{r}", rank=r, seed=r, dtype=torch.bfloat16) for r in (8, 16)]
    base, multi = _times(0.010), _times(0.020)
    terms = roofline(shapes, base, multi, batch=2, context=5, weights=weights, bandwidth=bandwidth)

    achieved = shapes.step_flops(2, 5) / 0.010
    flops = sum(lora_flops_per_token(w) for w in weights)
    nbytes = sum(w.size_bytes for w in weights)
    assert terms["roofline_bare_step_ms"] == pytest.approx(10.0)
    assert terms["roofline_achieved_flop_s"] == pytest.approx(achieved)
    assert terms["roofline_lora_flops"] == flops
    assert terms["roofline_adapter_bytes"] == nbytes
    compute_ms, memory_ms = 1000 * flops / achieved, 1000 * nbytes / bandwidth
    assert terms["roofline_compute_ms"] == pytest.approx(compute_ms)
    assert terms["roofline_memory_ms"] == pytest.approx(memory_ms)
    assert (compute_ms > memory_ms) == (bound == "compute")
    assert terms["roofline_step_ms"] == pytest.approx(10.0 + max(compute_ms, memory_ms))
    assert terms["multilora_step_ms"] == pytest.approx(20.0)
    # Slower than the roofline: the ratio is below 1 by exactly the measured step's excess.
    assert terms["ratio_vs_roofline"] == pytest.approx((10.0 + max(compute_ms, memory_ms)) / 20.0)


@pytest.mark.parametrize("flag", ["--new-tokens", "--peft-new-tokens", "--scale-new-tokens"])
def test_a_run_without_decode_steps_is_refused_before_anything_loads(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # One new token is the prefill's: no decode step to time, and the roofline would divide by 0.
    with pytest.raises(SystemExit) as exit_info:
        main([flag, "1", "--model-dir", "/nonexistent"])
    assert exit_info.value.code == 2
    assert f"{flag} must be at least 2" in capsys.readouterr().err
