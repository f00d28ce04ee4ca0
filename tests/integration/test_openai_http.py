"""The OpenAI-compatible HTTP API, called as users call it: the official `openai` client (sync and
async, streamed and not) and `curl -N`, over HTTPS checked against the stack's CA.

A real registry process, the real tiny-Llama worker, and the router (both doors) in this test's
event loop, with mutual TLS between the services. Billing is checked in the registry's ledger.
The sync client blocks, so it runs in a thread: the router shares this event loop.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx2
import jsonschema
import openai
import psycopg
import pytest

from bench.synthetic_worker import RunningSyntheticWorker, start_synthetic_worker
from services.common.config import RouterSettings
from services.common.tls import Role
from services.devtools.tiny_model import TINY_LLAMA
from services.router.http_door import BODY_OVERHEAD_BYTES, BODY_PER_PROMPT_BYTE
from services.router.server import Router, start_router
from services.worker.server import RunningWorker
from tests.fixtures.registry import RegistryProcess

# In the catalog too; served here by a synthetic worker that can be told to fail.
OTHER_MODEL = "smollm2-135m-instruct"
T = TypeVar("T")


@dataclass
class Tenant:
    tenant_id: str
    name: str
    secret: str


@dataclass
class Door:
    registry: RegistryProcess
    router: Router
    base_url: str
    ca: Path
    a: Tenant
    b: Tenant
    synthetic: RunningSyntheticWorker

    def reset_synthetic(self) -> None:
        self.synthetic.worker.reset()
        for handle in self.router.pool.handles():
            handle.down_until = 0.0

    def client(self, secret: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url,
            api_key=secret,
            http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(self.ca))),
            max_retries=0,
        )

    def async_client(self, secret: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=secret,
            http_client=openai.DefaultAsyncHttpxClient(
                verify=ssl.create_default_context(cafile=str(self.ca))
            ),
            max_retries=0,
        )


def _tenant(registry: RegistryProcess, **limits: int) -> Tenant:
    name = f"oa-{uuid.uuid4().hex[:10]}"
    with registry.admin() as c:
        t = c.create_tenant(name)
        if limits:
            c.set_tenant_limits(name, **limits)
        key = c.create_api_key(name)
    return Tenant(t.tenant_id, name, key.secret)


@pytest.fixture(scope="module")
async def door(
    registry: RegistryProcess,
    tiny_worker: RunningWorker,
    worker_tiny_adapters: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Door]:
    a, b = _tenant(registry), _tenant(registry)
    with registry.admin() as c:
        c.upload_adapter(worker_tiny_adapters["qv"], tenant=a.name, name="bot", base_model=TINY_LLAMA)
        c.upload_adapter(
            worker_tiny_adapters["mlp"], tenant=b.name, name="secret-sauce", base_model=TINY_LLAMA
        )
    synthetic = await start_synthetic_worker("syn-openai", OTHER_MODEL, tls=registry.certs.files(Role.WORKER))
    settings = RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path_factory.mktemp("openai-router")),
            **registry.certs.env(Role.ROUTER),
            **registry.certs.router_public_env(),
            "LORAPLEX_REGISTRY": registry.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_HTTP_LISTEN": "127.0.0.1:0",
            "LORAPLEX_WORKERS": f"127.0.0.1:{tiny_worker.port},{synthetic.address}",
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
            "LORAPLEX_ROUTER_SHIP_INTERVAL_S": "0.1",
        }
    )
    router = await start_router(settings)
    assert router.http is not None and router.http.scheme == "https"
    base_url = f"https://127.0.0.1:{router.http.port}/v1"
    try:
        yield Door(registry, router, base_url, registry.certs.files(Role.ROUTER).ca, a, b, synthetic)
    finally:
        await router.running.drain(1.0)
        await synthetic.server.stop(0)


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def _ledger(door: Door, request_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(door.registry.database_url) as conn:
        cur = conn.execute(
            "SELECT tenant_id::text, input_tokens, cached_input_tokens, output_tokens, finish_reason"
            " FROM usage_records WHERE request_id = %s",
            (request_id,),
        )
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


async def _billed(door: Door, request_id: str, timeout_s: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = _ledger(door, request_id)
        if rows:
            assert len(rows) == 1, rows
            return rows[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"request {request_id} never reached the usage ledger")


# -- answers -----------------------------------------------------------------------------------------


async def test_sync_chat_completion_through_an_adapter_is_openai_shaped_and_billed(door: Door) -> None:
    client = door.client(door.a.secret)
    done = await _in_thread(
        lambda: client.chat.completions.create(
            model="bot",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
            max_tokens=6,
            extra_body={"ignore_eos": True},
        )
    )
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.model == "bot@1"
    assert abs(done.created - time.time()) < 60
    choice = done.choices[0]
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "length")
    assert isinstance(choice.message.content, str) and choice.message.content
    usage = done.usage
    assert usage is not None and usage.completion_tokens == 6
    assert usage.total_tokens == usage.prompt_tokens + 6 and usage.prompt_tokens > 0
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens is not None
    row = await _billed(door, done.id.removeprefix("chatcmpl-"))
    assert (row["tenant_id"], row["input_tokens"], row["output_tokens"]) == (
        door.a.tenant_id,
        usage.prompt_tokens,
        6,
    )


async def test_the_adapter_changes_the_answer_of_the_base_model(door: Door) -> None:
    client = door.async_client(door.a.secret)
    answers = {}
    for model in ("bot", TINY_LLAMA):
        done = await client.completions.create(model=model, prompt="The capital of France is", max_tokens=8)
        assert done.object == "text_completion" and done.id.startswith("cmpl-")
        answers[model] = done.choices[0].text
    assert answers["bot"] != answers[TINY_LLAMA]


async def test_async_streamed_chat_is_role_then_content_then_finish_then_done(door: Door) -> None:
    client = door.async_client(door.a.secret)
    stream = await client.chat.completions.create(
        model="bot",
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_completion_tokens=8,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == "bot@1" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage anywhere
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = await client.chat.completions.create(
        model="bot", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=8
    )
    assert text == whole.choices[0].message.content  # greedy: the same text streamed or not


async def test_streamed_completion_with_usage_reports_cached_tokens_on_a_repeated_prompt(door: Door) -> None:
    client = door.client(door.a.secret)
    prompt = "Once upon a time in a land far away there lived a " * 6

    def run() -> list[Any]:
        stream = client.completions.create(
            model="bot", prompt=prompt, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        return list(stream)

    first = await _in_thread(run)
    second = await _in_thread(run)
    for chunks in (first, second):
        assert all(c.object == "text_completion" for c in chunks)
        *text_chunks, last = chunks
        assert last.choices == [] and last.usage is not None
        assert all(c.usage is None for c in text_chunks)
        assert text_chunks[-1].choices[0].finish_reason in ("length", "stop")
    u1, u2 = first[-1].usage, second[-1].usage
    assert u1.prompt_tokens == u2.prompt_tokens > 32
    assert u2.prompt_tokens_details.cached_tokens > 0
    assert u2.prompt_tokens_details.cached_tokens > u1.prompt_tokens_details.cached_tokens
    row = await _billed(door, second[0].id.removeprefix("cmpl-"))
    assert row["cached_input_tokens"] == u2.prompt_tokens_details.cached_tokens


async def test_json_schema_answers_validate_and_an_unenforceable_schema_is_a_400(door: Door) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    client = door.async_client(door.a.secret)
    for model in ("bot", TINY_LLAMA):  # an adapter row and a base row, random weights: only the grammar
        done = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Is the sky blue?"}],
            max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), schema)
    anything = await client.chat.completions.create(
        model="bot",
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)
    bad: dict[str, Any] = {
        "type": "object",
        "properties": {"x": {"type": "string", "format": "no-such-format"}},
    }
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model="bot",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}},
        )
    assert refused.value.status_code == 400 and "schema" in str(refused.value).lower()


async def test_token_id_prompt(door: Door) -> None:
    client = door.async_client(door.a.secret)
    done = await client.completions.create(model=TINY_LLAMA, prompt=[1, 20, 30, 40], max_tokens=3)
    assert done.usage is not None and done.usage.prompt_tokens == 4


async def test_models_lists_base_models_and_only_the_callers_adapters(door: Door) -> None:
    client = door.client(door.a.secret)
    models = await _in_thread(lambda: list(client.models.list()))
    by_id = {m.id: m for m in models}
    assert TINY_LLAMA in by_id and OTHER_MODEL in by_id
    bot = by_id["bot"]
    assert (bot.owned_by, bot.model_extra and bot.model_extra["parent"]) == (door.a.name, TINY_LLAMA)
    assert "secret-sauce" not in by_id
    one = await _in_thread(lambda: client.models.retrieve("bot@1"))
    assert (one.id, one.owned_by) == ("bot@1", door.a.name)
    with pytest.raises(openai.NotFoundError):
        await _in_thread(lambda: client.models.retrieve("secret-sauce"))


# -- cancellation ------------------------------------------------------------------------------------


async def test_client_leaving_mid_stream_cancels_the_generation_and_bills_what_was_streamed(
    door: Door,
) -> None:
    rid = f"leave-{uuid.uuid4().hex}"
    client = door.client(door.a.secret)

    def read_three() -> int:
        stream = client.completions.create(
            model="bot",
            prompt="Count with me:",
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
            extra_headers={"Idempotency-Key": rid},
        )
        seen = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                seen += 1
            if seen == 3:
                break
        stream.close()  # hangs up mid-stream
        return seen

    assert await _in_thread(read_three) == 3
    row = await _billed(door, rid)
    assert row["finish_reason"] == "cancelled"
    # What was forwarded before the hang-up, not the 400 tokens asked for.
    assert 3 <= row["output_tokens"] < 400
    # The worker stopped: nothing of this request is left running on it.
    await _until(lambda: door.router.servicer.inflight == 0, 5.0)


async def test_client_leaving_before_a_whole_answer_cancels_it_too(door: Door) -> None:
    rid = f"leave-whole-{uuid.uuid4().hex}"
    client = door.async_client(door.a.secret)
    call = asyncio.ensure_future(
        client.completions.create(
            model="bot",
            prompt="Count with me:",
            max_tokens=500,
            extra_body={"ignore_eos": True},
            extra_headers={"Idempotency-Key": rid},
        )
    )
    await _until(lambda: door.router.servicer.inflight == 1, 5.0)
    await asyncio.sleep(0.2)
    call.cancel()  # the client hangs up while the router is still collecting the answer
    with pytest.raises(asyncio.CancelledError):
        await call
    row = await _billed(door, rid)
    assert row["finish_reason"] == "cancelled" and row["output_tokens"] < 500
    await _until(lambda: door.router.servicer.inflight == 0, 5.0)


async def _until(cond: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- errors ------------------------------------------------------------------------------------------


async def test_errors_are_openai_json_with_the_status_the_client_maps(door: Door) -> None:
    client = door.async_client(door.a.secret)
    chat: dict[str, Any] = {"model": "bot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    with pytest.raises(openai.BadRequestError) as wrong_type:
        await client.chat.completions.create(**{**chat, "temperature": "hot"})
    assert wrong_type.value.status_code == 400
    assert wrong_type.value.body == {
        "message": "temperature must be a number",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": None,
    }
    with pytest.raises(openai.BadRequestError) as n2:
        await client.chat.completions.create(**{**chat, "n": 2})
    assert "n must be 1" in n2.value.message and n2.value.param == "n"
    with pytest.raises(openai.BadRequestError) as out_of_range:
        await client.chat.completions.create(**{**chat, "temperature": 3.5})
    assert out_of_range.value.param == "temperature"  # the router's own bound, through the shared path
    with pytest.raises(openai.BadRequestError) as logprobs:
        await client.chat.completions.create(**{**chat, "logprobs": True})
    assert "logprobs" in logprobs.value.message

    with pytest.raises(openai.AuthenticationError) as bad_key:
        await door.async_client("lpx_not-a-key").chat.completions.create(**chat)
    assert bad_key.value.status_code == 401 and bad_key.value.code == "invalid_api_key"

    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(**{**chat, "model": "no-such-adapter"})
    assert unknown.value.body == {
        "message": "adapter 'no-such-adapter' not found",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }
    # Another tenant's adapter is as unknown as one that does not exist.
    with pytest.raises(openai.NotFoundError) as other:
        await client.chat.completions.create(**{**chat, "model": "secret-sauce"})
    assert other.value.body == {**unknown.value.body, "message": "adapter 'secret-sauce' not found"}

    # Every worker for the model refuses before its first token: failover runs out, and the
    # client gets a real 503 (the status line waits for the first token), for streams too.
    door.synthetic.worker.refuse = grpc.StatusCode.UNAVAILABLE
    try:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as no_worker:
                await client.chat.completions.create(**{**chat, "model": OTHER_MODEL, "stream": stream})
            assert no_worker.value.status_code == 503
            assert no_worker.value.code == "service_unavailable"
    finally:
        door.reset_synthetic()


async def test_a_worker_failing_mid_stream_ends_the_stream_with_an_error_event_and_bills_it(
    door: Door,
) -> None:
    rid = f"midfail-{uuid.uuid4().hex}"
    door.synthetic.worker.fail_after = 3
    client = door.async_client(door.a.secret)
    got: list[str] = []
    try:
        stream = await client.completions.create(
            model=OTHER_MODEL,
            prompt="a b c",
            max_tokens=10,
            stream=True,
            extra_headers={"Idempotency-Key": rid},
        )
        with pytest.raises(openai.APIError) as failed:
            async for chunk in stream:
                got.append(chunk.choices[0].text)
    finally:
        door.reset_synthetic()
    assert "after 3 tokens" in failed.value.message and "billed" in failed.value.message
    assert len([t for t in got if t]) == 3  # the three tokens, then the error instead of [DONE]
    row = await _billed(door, rid)
    assert (row["output_tokens"], row["finish_reason"]) == (3, "error")


async def test_a_replayed_idempotency_key_is_409_and_does_not_run_again(door: Door) -> None:
    client = door.async_client(door.a.secret)
    rid = f"idem-{uuid.uuid4().hex}"
    first = await client.completions.create(
        model="bot", prompt="hello", max_tokens=2, extra_headers={"Idempotency-Key": rid}
    )
    assert first.id == f"cmpl-{rid}"
    with pytest.raises(openai.ConflictError) as replay:
        await client.completions.create(
            model="bot", prompt="hello", max_tokens=2, extra_headers={"X-Request-Id": rid}
        )
    assert "already used" in replay.value.message
    assert replay.value.response.headers["x-should-retry"] == "false"
    await asyncio.sleep(0.3)
    assert len(_ledger(door, rid)) == 1


async def test_over_a_tenant_limit_is_429_with_retry_after(door: Door) -> None:
    t = _tenant(door.registry, requests_per_s=1)
    client = door.async_client(t.secret)
    results = await asyncio.gather(
        *(client.completions.create(model=TINY_LLAMA, prompt="hi", max_tokens=1) for _ in range(3)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert refused and len(refused) < 3, results
    headers = refused[0].response.headers
    assert int(headers["retry-after"]) >= 1 and 0 < int(headers["retry-after-ms"]) <= 1000
    assert "over its limit of 1 requests/s" in refused[0].message


async def test_oversized_and_malformed_bodies_are_refused_before_any_work(door: Door) -> None:
    headers = {"authorization": f"Bearer {door.a.secret}", "content-type": "application/json"}
    verify = ssl.create_default_context(cafile=str(door.ca))
    async with httpx2.AsyncClient(base_url=door.base_url, verify=verify, headers=headers) as http:
        big = await http.post("/completions", content=b'{"prompt": "' + b"a" * door_body_limit(door) + b'"}')
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        broken = await http.post("/completions", content=b'{"model": ')
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
        deep = await http.post("/completions", content=b"[" * 100_000)
        assert deep.status_code == 400
        nobody = await http.post("/completions", content=b"{}", headers={"authorization": ""})
        assert nobody.status_code == 401
        route = await http.get("/nope")
        assert route.status_code == 404 and route.json()["error"]["type"] == "invalid_request_error"


def door_body_limit(door: Door) -> int:
    # LORAPLEX_MAX_PROMPT_BYTES is left at its default (1 MiB) here.
    return BODY_PER_PROMPT_BYTE * (1 << 20) + BODY_OVERHEAD_BYTES


# -- curl ----------------------------------------------------------------------------------------


async def test_curl_streams_server_sent_events(door: Door) -> None:
    body = {
        "model": "bot",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--fail-with-body", "--cacert", str(door.ca),
        f"{door.base_url}/chat/completions",
        "-H", f"Authorization: Bearer {door.a.secret}",
        "-H", "Content-Type: application/json",
        "-d", json.dumps(body),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    events = [line for line in out.decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5
    assert all(c["usage"] is None for c in chunks[:-1])
