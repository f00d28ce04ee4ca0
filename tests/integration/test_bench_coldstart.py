"""`loraplex bench coldstart` runs end to end (tiny model, a couple of trials) and reports every tier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.main import main as cli_main


def test_coldstart_bench_reports_every_kind_and_tier(
    tiny_llama_dir: Path, loraplex_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "bench", "coldstart", "--json",
        "--model", tiny_llama_dir.name, "--model-home", str(loraplex_home),
        "--trials", "2", "--trials-r64", "1", "--profile-loads", "1",
        "--adapter-cache", str(tmp_path / "adapters"), "--results-dir", str(tmp_path / "results"),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert result == json.loads((tmp_path / "results" / "coldstart.json").read_text())
    assert (tmp_path / "results" / "coldstart.png").stat().st_size > 0
    kinds = {"r8_qv", "r16_all", "r64_all"}
    assert set(result["added_ttft_ms"]) == set(result["peft_load_ms"]) == kinds
    assert result["trials"] == {"r8_qv": 2, "r16_all": 2, "r64_all": 1}
    for by_tier in result["added_ttft_ms"].values():
        assert set(by_tier) == {"host", "disk", "s3"}
        for stats in by_tier.values():
            assert set(stats) == {"p50", "p99"}
    # Every request came from the tier it was meant to measure (the worker says so in its Timings).
    assert result["tier_mismatches"] == 0, result["mismatch_examples"]
    for kind in kinds:
        assert result["device_ttft_ms"][kind]["p50"] > 0
        assert result["peft_load_ms"][kind]["p50"] > 0
        assert result["worker_load_ms_p50"][kind]["s3"] > 0
        assert set(result["cold_load_stages_ms_p50"][kind]) == {"fetch", "sha256", "parse", "prepare"}
    r16 = result["added_ttft_ms"]["r16_all"]
    assert result["ram_added_ttft_p50_ms"] == r16["host"]["p50"]
    assert result["disk_added_ttft_p50_ms_r16"] == r16["disk"]["p50"]
    assert result["s3_added_ttft_p50_ms_r16"] == r16["s3"]["p50"]
    assert result["peft_load_ms_r16"] == result["peft_load_ms"]["r16_all"]["p50"]
    assert result["ram_added_ttft_worst_kind"] in kinds
    assert (
        result["adapter_bytes"]["r8_qv"]
        < result["adapter_bytes"]["r16_all"]
        < result["adapter_bytes"]["r64_all"]
    )
    assert isinstance(result["targets_met"], bool)
    assert result["targets_met"] == all(check["met"] for check in result["targets"].values())
