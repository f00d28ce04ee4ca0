"""`loraplex bench chaos --duration 30`: the short soak, every fault kind once, and the zero targets.

Real processes throughout (registry on an embedded PostgreSQL the benchmark stops and starts,
moto S3, two tiny-Llama workers, router). Asserts the issue's targets: nothing billed twice,
nothing billed beyond what a client received, nothing unbilled beyond the checkpoint bound,
an empty spool, and no request that failed before its first token after the client's retries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.chaos import KINDS
from services.devtools.tiny_model import TINY_LLAMA

REPO = Path(__file__).resolve().parents[2]


def test_short_chaos_soak_meets_the_billing_targets(tmp_path: Path, tiny_llama_dir: Path) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / TINY_LLAMA).symlink_to(tiny_llama_dir)  # no GGUF conversion here
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    args = ["--duration", "30", "--clients", "8", "--home", str(home), "--results", str(results)]
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "bench", "chaos", "--json", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    assert summary["faults"] == {kind: 1 for kind in KINDS}
    assert summary["completed"] > 0 and summary["requests"] >= summary["completed"]
    for key in (
        "double_billed",
        "unbilled_tokens_beyond_bound",
        "overbilled_tokens",
        "billed_without_tokens",
        "spooled_left",
        "failed_before_first_token_after_retries",
        "statuses_without_a_sentence",
    ):
        assert summary[key] == 0, (key, summary)
    assert set(summary["recovery_s"]) == set(KINDS)
    assert json.loads((results / "chaos.json").read_text()) == summary
    assert (results / "chaos.png").stat().st_size > 0
