"""`loraplex bench serving --quick` runs end to end on the tiny model and reports every rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.main import main as cli_main


def test_serving_bench_reports_every_rate_for_both_traces(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "bench", "serving", "--quick", "--json", "--model-dir", str(tiny_llama_dir),
        "--adapter-cache", str(tmp_path / "adapters"), "--results-dir", str(tmp_path / "results"),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert result == json.loads((tmp_path / "results" / "serving.json").read_text())
    assert (tmp_path / "results" / "serving.png").stat().st_size > 0
    # 12 templates written by PEFT: every rank with every target set.
    assert len([d for d in (tmp_path / "adapters").iterdir() if d.is_dir()]) == 12
    rates = [row["offered_rate"] for row in result["rates"]]
    assert len(rates) >= 4 and rates == sorted(rates)
    for row in result["rates"]:
        for trace in ("base", "lora"):
            stats = row[trace]
            assert stats["throughput_tok_s"] > 0
            assert 0 < stats["ttft_p50_ms"] <= stats["ttft_p99_ms"]
            assert 0 < stats["tpot_p50_ms"] <= stats["tpot_p99_ms"]
        # The baseline never loads an adapter; the adapter trace loads each distinct one it uses
        # (every rate starts cold, and the quick run's resident set holds all of them).
        assert row["base"]["adapter_loads"] == 0
        assert row["lora"]["adapter_loads"] == row["distinct_adapters"] >= 1
        assert row["throughput_ratio_vs_base"] == pytest.approx(
            row["lora"]["throughput_tok_s"] / row["base"]["throughput_tok_s"], rel=1e-3
        )
    assert result["saturation_rate"] == rates[-1]
    assert result["throughput_ratio_vs_base"] == result["rates"][-1]["throughput_ratio_vs_base"]
    assert result["target_sets"] == ["qv", "attn", "all"]
