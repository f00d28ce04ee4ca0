"""The front door, as a new user meets it: `loraplex dev` in one terminal, `loraplex generate` in another.

Real processes on loopback: registry (on the session's PostgreSQL), two SmolLM2 workers
(`loraplex dev --workers 2`), the router.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from loraplex.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.cli.dev import WORKER_PORT_OFFSET
from services.common.certs import role_files
from services.common.net import free_port
from services.common.tls import Role, sync_channel

STARTUP_TIMEOUT_S = 420


@dataclass
class DevStack:
    env: dict[str, str]
    home: Path
    proc: subprocess.Popen[str]
    banner: str

    def cli(self, *args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if api_key:
            env["LORAPLEX_API_KEY"] = api_key
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )


@pytest.fixture(scope="module")
def dev_stack(
    tmp_path_factory: pytest.TempPathFactory, stack_database_url: str, smollm2_dir: Path, adapter_cache: Path
) -> Iterator[DevStack]:
    home = tmp_path_factory.mktemp("dev-home")
    # The session's trained adapters too: the README test trains the demo adapters on first run.
    with running_dev(home, stack_database_url, smollm2_dir, workers=2, adapter_cache=adapter_cache) as stack:
        yield stack


@contextmanager
def running_dev(
    home: Path, database_url: str, smollm2_dir: Path, *, workers: int, adapter_cache: Path | None = None
) -> Iterator[DevStack]:
    """`loraplex dev --workers N` on a fresh home (the session's converted model linked in, and
    its trained test adapters when `adapter_cache` is given)."""
    # Reuse the session's converted model instead of converting the GGUF again.
    (home / "models").mkdir()
    (home / "models" / smollm2_dir.name).symlink_to(smollm2_dir)
    if adapter_cache is not None:
        adapter_cache.mkdir(parents=True, exist_ok=True)
        (home / "test-adapters").symlink_to(adapter_cache)
    router_port = free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_DATABASE_URL": database_url,
        "LORAPLEX_REGISTRY": f"127.0.0.1:{free_port()}",
        "LORAPLEX_ROUTER": f"127.0.0.1:{router_port}",
        "LORAPLEX_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
    }
    env.pop("LORAPLEX_ADMIN_TOKEN", None)
    with start_dev(["--workers", str(workers)], env, home) as (proc, banner):
        yield DevStack(env, home, proc, banner)


@contextmanager
def start_dev(
    args: list[str], env: dict[str, str], home: Path
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`loraplex <args>` started and its banner read; stopped as a user would (Ctrl-C), so the
    stack's own processes (they run in sessions of their own) are drained, never orphaned."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "dev", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    banner: list[str] = []
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner.append(line)
        if line.startswith("Ctrl-C stops everything"):
            break
    text = "".join(banner)
    try:
        if "loraplex dev is up" not in text:
            logs = "".join(p.read_text()[-2000:] for p in (home / "logs").glob("*.log"))
            pytest.fail(f"loraplex dev did not come up:\n{text[-3000:]}\n{logs}")
        yield proc, text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _generate_json(dev_stack: DevStack, api_key: str, adapter: str, max_tokens: int) -> list[dict[str, Any]]:
    done = dev_stack.cli(
        "generate", "--adapter", adapter, "--max-tokens", str(max_tokens), "--json", "Hi", api_key=api_key
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_two_workers_an_adapter_stays_on_the_worker_where_it_is_warm(dev_stack: DevStack) -> None:
    api_key = (dev_stack.home / "dev-api-key").read_text().strip()
    assert dev_stack.banner.count("127.0.0.1:") >= 4  # registry, router and two workers

    finished = [_generate_json(dev_stack, api_key, "poet", 2)[-1]["finished"] for _ in range(3)]
    # The first request loads the adapter on its home worker; the router sends the next ones to
    # the worker that reports it on the device, where they start warm.
    assert len({f["worker_id"] for f in finished}) == 1, finished
    assert [f["timings"].get("cold_start", False) for f in finished[1:]] == [False, False], finished


def _env_has_admin_token(home: Path, service: str) -> bool:
    """Whether the `loraplex <service> serve` process of this stack has LORAPLEX_ADMIN_TOKEN set."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = f"LORAPLEX_HOME={home}".encode() in environ
        if ours and service.encode() in cmdline and b"serve" in cmdline:
            found.append(any(e.startswith(b"LORAPLEX_ADMIN_TOKEN=") for e in environ))
    assert found, f"no running {service} process of this stack"
    return all(found)


def test_the_stack_runs_on_mutual_tls_and_a_worker_serves_only_the_router(dev_stack: DevStack) -> None:
    certs = dev_stack.home / "certs"
    assert {f"{r.value}.crt" for r in Role} | {"ca.crt"} <= {p.name for p in certs.iterdir()}
    assert stat.S_IMODE((certs / "worker.key").stat().st_mode) == 0o600
    router = dev_stack.env["LORAPLEX_ROUTER"]
    worker = f"127.0.0.1:{int(router.rpartition(':')[2]) + WORKER_PORT_OFFSET}"
    request = worker_pb2.WorkerServiceGenerateRequest(
        request_id="straight-to-the-worker",
        prompt=common_pb2.Prompt(text="free tokens?"),
        sampling=common_pb2.SamplingParams(max_tokens=24),
    )
    # The attack of issue 9: Generate straight to a worker's port, no credentials. Now: no handshake.
    with grpc.insecure_channel(worker) as channel, pytest.raises(grpc.RpcError) as info:
        list(worker_pb2_grpc.WorkerServiceStub(channel).Generate(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The operator's certificate (what the CLI holds) is verified, but only routers may generate.
    with (
        sync_channel(worker, role_files(certs, Role.OPERATOR)) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        list(worker_pb2_grpc.WorkerServiceStub(channel).Generate(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The public endpoint serves TLS: a plaintext client does not get through.
    with grpc.insecure_channel(router) as channel, pytest.raises(grpc.RpcError) as info:
        inference_pb2_grpc.InferenceServiceStub(channel).ListModels(
            inference_pb2.ListModelsRequest(), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # Only the registry holds the admin token: the router and workers are known by their certificates.
    holders = {role: _env_has_admin_token(dev_stack.home, role) for role in ("registry", "router", "worker")}
    assert holders == {"registry": True, "router": False, "worker": False}
    # Admin commands as the banner says: the token file, and the certificates found under LORAPLEX_HOME.
    token = (dev_stack.home / "dev-admin-token").read_text().strip()
    listed = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "tenants", "list", "--json"],
        env={**dev_stack.env, "LORAPLEX_ADMIN_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "demo" in {t["name"] for t in json.loads(listed.stdout)}


def test_the_readmes_openai_client_and_the_banners_curl_work_against_dev(dev_stack: DevStack) -> None:
    """What a new user copies: the README's Python (its address aside) and the curl the banner prints."""
    http = dev_stack.env["LORAPLEX_HTTP_LISTEN"]
    assert f"https://{http}/v1" in dev_stack.banner
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## OpenAI-compatible API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0].replace("127.0.0.1:8080", http)
    done = subprocess.run(
        [sys.executable, "-c", code], env=dev_stack.env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and " in, " in done.stdout and " out]" in done.stdout, done.stdout

    lines = dev_stack.banner.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl -N"))
    curl = "\n".join(lines[start : start + 3])
    api_key = (dev_stack.home / "dev-api-key").read_text().strip()
    streamed = subprocess.run(
        ["bash", "-c", curl + " --max-time 120 -sS --fail-with-body"],
        env={**dev_stack.env, "LORAPLEX_API_KEY": api_key},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert streamed.returncode == 0, streamed.stderr + streamed.stdout
    events = [e for e in streamed.stdout.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) > 3
    assert json.loads(events[1].removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_generate_streams_tokens_from_a_demo_adapter_and_they_are_billed(dev_stack: DevStack) -> None:
    api_key = (dev_stack.home / "dev-api-key").read_text().strip()
    token = (dev_stack.home / "dev-admin-token").read_text().strip()
    # The banner says where the secrets are, never the secrets themselves; both files are 0600.
    assert f"export LORAPLEX_API_KEY=$(cat {dev_stack.home / 'dev-api-key'})" in dev_stack.banner
    assert f"export LORAPLEX_ADMIN_TOKEN=$(cat {dev_stack.home / 'dev-admin-token'})" in dev_stack.banner
    assert api_key not in dev_stack.banner and token not in dev_stack.banner
    for name in ("dev-api-key", "dev-admin-token"):
        assert (dev_stack.home / name).stat().st_mode & 0o777 == 0o600

    plain = dev_stack.cli(
        "generate", "--adapter", "support-bot", "--max-tokens", "12", "Hello, I need help", api_key=api_key
    )
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip(), "no text streamed"
    assert "12 out" in plain.stderr

    streamed = dev_stack.cli(
        "generate",
        "--adapter",
        "poet",
        "--chat",
        "--max-tokens",
        "8",
        "--json",
        "Write about the sea",
        api_key=api_key,
    )
    assert streamed.returncode == 0, streamed.stderr
    events = [json.loads(line) for line in streamed.stdout.splitlines()]
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "delta" in kinds
    assert events[0]["started"]["adapter"]["name"] == "poet"
    out_tokens = sum(len(e["delta"].get("token_ids", [])) for e in events if "delta" in e)
    assert out_tokens == int(events[-1]["finished"]["usage"]["output_tokens"]) == 8

    unknown = dev_stack.cli("generate", "--adapter", "nope", "hi", api_key=api_key)
    assert unknown.returncode != 0 and "NOT_FOUND" in unknown.stderr

    # Ctrl-C drains the stack; the router ships its spool before it exits.
    dev_stack.proc.send_signal(signal.SIGINT)
    assert dev_stack.proc.wait(timeout=90) == 0
    with psycopg.connect(dev_stack.env["LORAPLEX_DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT output_tokens FROM usage_records u JOIN tenants t ON t.id = u.tenant_id"
            " WHERE t.name = 'demo' ORDER BY finished_at"
        ).fetchall()
    billed = [r[0] for r in rows]
    # The two-worker test's three 2-token requests first, this test's 12 and 8 last; the OpenAI
    # test's requests (run in between) are billed in the middle.
    assert billed[:3] == [2, 2, 2] and billed[-2:] == [12, 8] and len(billed) >= 7, billed
