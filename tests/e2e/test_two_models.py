"""Two base models in one `loraplex dev`: one worker pool each, routed by the request's base model,
billed under each model's own price.

Real processes on loopback, as a user runs them: `loraplex models import tiny-llama --from DIR` (the
tiny random Llama the tests build), then `loraplex dev --model smollm2-135m-instruct --model
tiny-llama:1`, `loraplex models register` for the tiny model's price, adapters on each model, and
interleaved requests for both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from services.common.config import DEFAULT_MODEL
from services.common.net import free_port
from services.devtools.tiny_model import TINY_LLAMA
from tests.e2e.test_dev_stack import start_dev

TINY_PRICES = ("2", "8")  # USD per million input / output tokens; the demo prices are 0.05 / 0.20


@dataclass
class TwoModelStack:
    env: dict[str, str]
    home: Path
    proc: subprocess.Popen[str]
    banner: str

    def cli(self, *args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if api_key:
            env["LORAPLEX_API_KEY"] = api_key
        else:
            env["LORAPLEX_ADMIN_TOKEN"] = (self.home / "dev-admin-token").read_text().strip()
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )


@pytest.fixture(scope="module")
def two_models(
    tmp_path_factory: pytest.TempPathFactory,
    stack_database_url: str,
    smollm2_dir: Path,
    tiny_llama_dir: Path,
    smollm2_adapters: dict[str, Path],
    adapter_cache: Path,
) -> Iterator[TwoModelStack]:
    home = tmp_path_factory.mktemp("two-models-home")
    (home / "models").mkdir()
    (home / "models" / smollm2_dir.name).symlink_to(smollm2_dir)
    # The demo adapters are the session's test adapters: trained once, not again for this stack.
    (home / "test-adapters").symlink_to(adapter_cache)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_DATABASE_URL": stack_database_url,
        "LORAPLEX_REGISTRY": f"127.0.0.1:{free_port()}",
        "LORAPLEX_ROUTER": f"127.0.0.1:{free_port()}",
        "LORAPLEX_HTTP_LISTEN": "",
    }
    env.pop("LORAPLEX_ADMIN_TOKEN", None)
    imported = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "models",
            "import",
            TINY_LLAMA,
            "--from",
            str(tiny_llama_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr
    with start_dev(["--model", DEFAULT_MODEL, "--model", f"{TINY_LLAMA}:1"], env, home) as (proc, banner):
        yield TwoModelStack(env, home, proc, banner)


def _generate(stack: TwoModelStack, api_key: str, adapter: str) -> dict[str, Any]:
    done = stack.cli(
        "generate", "--adapter", adapter, "--max-tokens", "4", "--json", "Hi there", api_key=api_key
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    return {"request_id": events[0]["started"]["request_id"], **events[-1]["finished"]}


def test_each_model_is_served_by_its_own_pool_and_billed_at_its_own_price(
    two_models: TwoModelStack, worker_tiny_adapters: dict[str, Path]
) -> None:
    s = two_models
    # One banner line per pool.
    assert f"({DEFAULT_MODEL})" in s.banner and f"({TINY_LLAMA})" in s.banner
    done = s.cli(
        "models", "register", TINY_LLAMA, "--input-price", TINY_PRICES[0], "--output-price", TINY_PRICES[1]
    )
    assert done.returncode == 0, done.stderr
    path = str(worker_tiny_adapters["qv"])
    done = s.cli(
        "adapters", "register", "tiny-bot", "--tenant", "demo", "--base-model", TINY_LLAMA, "--path", path
    )
    assert done.returncode == 0, done.stderr
    api_key = (s.home / "dev-api-key").read_text().strip()
    since = datetime.now(UTC) - timedelta(minutes=1)
    adapters = ["support-bot", "tiny-bot"] * 3
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: _generate(s, api_key, a), adapters))
    workers = {
        a: {r["worker_id"] for r, a2 in zip(results, adapters, strict=True) if a2 == a} for a in set(adapters)
    }
    # Workers are numbered across pools: SmolLM2's first (worker-0), then the tiny model's (worker-1).
    assert workers == {"support-bot": {"worker-0"}, "tiny-bot": {"worker-1"}}, workers
    by_id = {r["request_id"]: r for r in results}
    # The ledger, as an operator exports it: each row under its own base model and price.
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        until = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
        done = s.cli("usage", "export", "--from", since.isoformat(), "--to", until, "--format", "jsonl")
        assert done.returncode == 0, done.stderr
        rows = [r for r in map(json.loads, done.stdout.splitlines()) if r["request_id"] in by_id]
        if len(rows) == len(results):
            break
        time.sleep(0.5)
    assert len(rows) == len(results), rows
    prices = {DEFAULT_MODEL: (Decimal("0.05"), Decimal("0.20")), TINY_LLAMA: tuple(map(Decimal, TINY_PRICES))}
    for row in rows:
        model = DEFAULT_MODEL if by_id[row["request_id"]]["worker_id"] == "worker-0" else TINY_LLAMA
        assert row["base_model"] == model
        inp, out = prices[model]
        expected = (inp * row["input_tokens"] + out * row["output_tokens"]) / Decimal(1_000_000)
        assert Decimal(row["amount_usd"]) == expected, row
