"""Imported base models of two newer families served end to end: a tiny random Qwen3 and a tiny
random Llama 3 (llama3 RoPE scaling, tied embeddings), each brought in with `loraplex models import`,
each given a PEFT adapter with `loraplex adapters register`, both served by one `loraplex dev
--model ... --model ...` and called through the router.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.common.net import free_port
from services.devtools.tiny_families import build_tiny_family
from tests.e2e.test_dev_stack import start_dev
from tests.engine_support import PeftAdapterSpec, build_peft_adapter

MODELS = {"tiny-qwen3": "qwen3", "tiny-llama3": "llama3"}  # catalog name -> tiny family


@dataclass
class Stack:
    env: dict[str, str]
    home: Path
    banner: str
    adapters: dict[str, Path]  # model name -> its PEFT adapter

    def cli(self, *args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if api_key:
            env["LORAPLEX_API_KEY"] = api_key
        else:
            env["LORAPLEX_ADMIN_TOKEN"] = (self.home / "dev-admin-token").read_text().strip()
        cmd = [sys.executable, "-m", "services.cli.main", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, stack_database_url: str, tiny_llama_dir: Path
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("families-home")
    build = tmp_path_factory.mktemp("families-src")
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
    adapters: dict[str, Path] = {}
    spec = PeftAdapterSpec("all-r8", 8, 16)
    for i, (name, family) in enumerate(MODELS.items()):
        src = build_tiny_family(family, build / name, tiny_llama_dir)
        adapters[name] = build_peft_adapter(src, build / f"{name}-adapter", spec, seed=i)
        cmd = [sys.executable, "-m", "services.cli.main", "models", "import", name, "--from", str(src)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    args = [a for name in MODELS for a in ("--model", f"{name}:1")]
    with start_dev(args, env, home) as (_, banner):
        yield Stack(env, home, banner, adapters)


def _generate(stack: Stack, api_key: str, adapter: str) -> dict[str, Any]:
    done = stack.cli(
        "generate", "--adapter", adapter, "--max-tokens", "4", "--json", "Hi there", api_key=api_key
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    return {"started": events[0]["started"], **events[-1]["finished"]}


def test_imported_qwen3_and_llama3_serve_their_adapters_through_the_router(stack: Stack) -> None:
    for name in MODELS:
        assert f"({name})" in stack.banner
    api_key = (stack.home / "dev-api-key").read_text().strip()
    workers: dict[str, str] = {}
    for name, path in stack.adapters.items():
        bot = f"{name}-bot"
        done = stack.cli(
            "adapters", "register", bot, "--tenant", "demo", "--base-model", name, "--path", str(path)
        )
        assert done.returncode == 0, done.stderr
        result = _generate(stack, api_key, bot)
        assert result["usage"]["output_tokens"] == 4, result
        workers[name] = result["worker_id"]
    # One pool per model: each adapter ran on its own base model's worker.
    assert len(set(workers.values())) == 2, workers
