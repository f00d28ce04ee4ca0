"""`loraplex bench worker_coldstart` runs end to end on the tiny model and splits every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.main import main as cli_main


def test_worker_coldstart_bench_splits_the_cold_start(
    tiny_llama_dir: Path, loraplex_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "worker_coldstart", "--json", "--model", tiny_llama_dir.name,
            "--model-home", str(loraplex_home), "--trials", "2", "--results-dir", str(tmp_path)]  # fmt: skip
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "worker_coldstart.json").read_text())
    assert (tmp_path / "worker_coldstart.png").stat().st_size > 0
    assert result["trials"] == 2 and len(result["samples_ms"]) == 2
    stages = result["stages_ms_p50"]
    assert set(stages) == {"process_start", "model_load", "first_state", "first_token"}
    assert all(v >= 0 for v in stages.values()) and stages["process_start"] > 0
    # The split adds up (per trial), and a cold start costs more than the warm request beside it.
    for sample in result["samples_ms"]:
        assert sum(sample.values()) > result["warm_ttft_ms_p50"] * 0.5
    assert result["total_ms_p50"] > result["warm_ttft_ms_p50"]
