"""`loraplex bench routing` end to end at toy size: real registry, workers and router processes.

Structure and sanity only (the numbers at full size are the benchmark's job): the command prints
one JSON object last, writes routing.json and routing.png, serves every measured request without
errors, and counts at least one cold load per distinct adapter (the workers start empty).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.routing_traffic import zipf_sequence
from services.devtools.tiny_model import TINY_LLAMA

REPO = Path(__file__).resolve().parents[2]


def test_bench_routing_smoke(tmp_path: Path, database_url: str, tiny_llama_dir: Path) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / TINY_LLAMA).symlink_to(tiny_llama_dir)  # no GGUF conversion here
    results = tmp_path / "results"
    # Device slots >= concurrent requests: a worker whose every slot serves a running request
    # refuses the next adapter, which is the worker's business, not this smoke test's.
    adapters, requests, seed = 8, 24, 3
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["LORAPLEX_DATABASE_URL"] = database_url
    args = [
        *("--adapters", str(adapters), "--device-adapters", "3", "--workers", "2"),
        *("--requests", str(requests), "--warmup", "0", "--concurrency", "3", "--seed", str(seed)),
        *("--policies", "affinity", "--sweep", "4", "--home", str(home), "--results", str(results)),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "bench", "routing", "--json", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    assert summary["served_affinity"] == requests and summary["errors_affinity"] == 0, summary
    assert set(summary["served_by_affinity"]) <= {"affinity-0", "affinity-1"}
    distinct = len(set(zipf_sequence(adapters, 1.0, requests, seed)))
    cold = summary["cold_loads_affinity"] * requests / 1000
    assert distinct <= round(cold) <= requests
    assert 0 < summary["ttft_p50_ms_affinity"] <= summary["ttft_p99_ms_affinity"]
    assert "modelled_cold_loads_least_loaded" in summary and summary["workers"] == 2
    assert set(summary["sweep"]) == {"4"} and summary["sweep"]["4"]["errors_affinity"] == 0
    assert json.loads((results / "routing.json").read_text()) == summary
    assert (results / "routing.png").stat().st_size > 0
