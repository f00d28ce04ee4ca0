"""WorkerService over real gRPC on loopback: the tiny Llama in-process for most cases, and one
`loraplex worker serve` subprocess on SmolLM2 streaming real text through a real PEFT adapter."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from loraplex.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.adapter_files import ADAPTER_FILES, digest_hex
from services.common.config import DEFAULT_MODEL
from services.common.health import wait_serving
from services.common.net import free_port
from services.common.object_store import open_store
from services.common.tls import Role
from services.devtools.tiny_model import TINY_LLAMA
from services.worker.adapters import Tier
from services.worker.convert import adapter_spec
from services.worker.server import RunningWorker
from tests.fixtures.tls import ServiceCerts
from tests.fixtures.worker import AdapterStore, serving, worker_home, worker_settings

Stub = worker_pb2_grpc.WorkerServiceStub
DEVICE, HOST = common_pb2.ADAPTER_TIER_DEVICE, common_pb2.ADAPTER_TIER_HOST
DISK = common_pb2.ADAPTER_TIER_DISK
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173]


@dataclass
class Streamed:
    started: common_pb2.GenerationStarted | None = None
    deltas: list[common_pb2.GenerationDelta] = field(default_factory=list)
    finished: common_pb2.GenerationFinished | None = None

    @property
    def token_ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)


def gen_request(
    prompt: list[int] | str | None = None,
    *,
    adapter: common_pb2.AdapterRef | None = None,
    max_tokens: int = 12,
    request_id: str = "",
    tenant_id: str = "",
    **sampling: object,
) -> worker_pb2.WorkerServiceGenerateRequest:
    if isinstance(prompt, str):
        p = common_pb2.Prompt(text=prompt)
    else:
        p = common_pb2.Prompt(token_ids=common_pb2.TokenIdsPrompt(ids=PROMPT if prompt is None else prompt))
    return worker_pb2.WorkerServiceGenerateRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        adapter=adapter,
        prompt=p,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling),  # type: ignore[arg-type]
    )


def chat_request(contents: list[str], max_tokens: int = 4) -> worker_pb2.WorkerServiceGenerateRequest:
    messages = [common_pb2.ChatMessage(role="user", content=c) for c in contents]
    return worker_pb2.WorkerServiceGenerateRequest(
        prompt=common_pb2.Prompt(chat=common_pb2.ChatPrompt(messages=messages)),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
    )


async def generate(stub: Stub, request: worker_pb2.WorkerServiceGenerateRequest) -> Streamed:
    out = Streamed()
    async for msg in stub.Generate(request, timeout=60):
        kind = msg.WhichOneof("event")
        if kind == "started":
            assert out.started is None and not out.deltas
            out.started = msg.started
        elif kind == "delta":
            assert out.started is not None and out.finished is None
            out.deltas.append(msg.delta)
        else:
            out.finished = msg.finished
    assert out.started is not None and out.finished is not None
    return out


async def status_of(stub: Stub, request: worker_pb2.WorkerServiceGenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stub, request)
    return info.value


async def wait_kv_used(worker: RunningWorker, expected: int, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await worker.engine.stats()
        if stats.kv_blocks_used == expected and stats.running == 0 and stats.waiting == 0:
            return
        assert time.monotonic() < deadline, f"KV blocks still held: {stats}"
        await asyncio.sleep(0.02)


@pytest.fixture
def tiny_refs(
    adapter_store: AdapterStore, worker_tiny_adapters: dict[str, Path]
) -> dict[str, common_pb2.AdapterRef]:
    return {
        kind: adapter_store.publish(path, base_model=TINY_LLAMA, name=kind)
        for kind, path in worker_tiny_adapters.items()
    }


async def test_stream_reports_started_deltas_and_finished_with_usage(
    tiny_worker_stub: Stub, tiny_refs: dict[str, common_pb2.AdapterRef]
) -> None:
    ref = tiny_refs["qv"]
    out = await generate(
        tiny_worker_stub, gen_request(adapter=ref, max_tokens=7, ignore_eos=True, request_id="r-1")
    )
    assert out.started is not None and out.finished is not None
    assert out.started.request_id == "r-1"
    assert out.started.model == TINY_LLAMA
    assert out.started.adapter.digest == ref.digest and out.started.adapter.name == "qv"
    assert len(out.token_ids) == 7
    assert out.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert out.finished.usage.input_tokens == len(PROMPT)
    assert out.finished.usage.output_tokens == 7
    assert out.finished.worker_id == f"test-worker-{TINY_LLAMA}"
    t = out.finished.timings
    assert 0 < t.ttft_ms <= t.total_ms
    assert t.queue_ms >= 0


async def test_concurrent_streams_with_different_adapters_match_lone_runs(
    tiny_worker_stub: Stub, tiny_refs: dict[str, common_pb2.AdapterRef]
) -> None:
    cases: list[common_pb2.AdapterRef | None] = [None, *tiny_refs.values()]

    def request(ref: common_pb2.AdapterRef | None) -> worker_pb2.WorkerServiceGenerateRequest:
        return gen_request(adapter=ref, max_tokens=10, ignore_eos=True)

    alone = [(await generate(tiny_worker_stub, request(ref))).token_ids for ref in cases]
    together = await asyncio.gather(*(generate(tiny_worker_stub, request(ref)) for ref in cases))
    assert [o.token_ids for o in together] == alone
    # Each adapter really changes the greedy path, so the equality compares different computations.
    assert len({tuple(ids) for ids in alone}) == len(cases), alone


async def test_first_use_is_a_cold_start_from_object_store_then_warm(
    tiny_worker: RunningWorker, tiny_worker_stub: Stub, worker_tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    ref = AdapterStore(tmp_path).publish(worker_tiny_adapters["mlp"], base_model=TINY_LLAMA, name="mlp")
    evicted = await tiny_worker_stub.EvictAdapter(worker_pb2.EvictAdapterRequest(digest=ref.digest))
    assert evicted.evicted
    cache_entry = tiny_worker.loader.cache_dir / digest_hex(ref.digest)
    shutil.rmtree(cache_entry, ignore_errors=True)
    cold = (await generate(tiny_worker_stub, gen_request(adapter=ref, max_tokens=2))).finished
    warm = (await generate(tiny_worker_stub, gen_request(adapter=ref, max_tokens=2))).finished
    assert cold is not None and warm is not None
    assert (
        cold.timings.cold_start and cold.timings.adapter_source_tier == common_pb2.ADAPTER_TIER_OBJECT_STORE
    )
    assert cold.timings.adapter_load_ms > 0
    assert not warm.timings.cold_start and warm.timings.adapter_source_tier == common_pb2.ADAPTER_TIER_DEVICE
    assert warm.timings.adapter_load_ms == 0
    assert cache_entry.is_dir()
    assert (await tiny_worker_stub.EvictAdapter(worker_pb2.EvictAdapterRequest(digest=ref.digest))).evicted
    from_disk = (await generate(tiny_worker_stub, gen_request(adapter=ref, max_tokens=2))).finished
    assert from_disk is not None and from_disk.timings.adapter_source_tier == common_pb2.ADAPTER_TIER_DISK


async def test_concurrent_requests_for_one_cold_adapter_share_one_load(
    tiny_worker: RunningWorker, tiny_worker_stub: Stub, worker_tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    ref = AdapterStore(tmp_path).publish(worker_tiny_adapters["dora"], base_model=TINY_LLAMA, name="dora")
    await tiny_worker_stub.EvictAdapter(worker_pb2.EvictAdapterRequest(digest=ref.digest))
    shutil.rmtree(tiny_worker.loader.cache_dir / digest_hex(ref.digest), ignore_errors=True)
    spec = adapter_spec(ref)
    # Straight on the loader, so all four ask before the first load can finish.
    leases = await asyncio.gather(*(tiny_worker.loader.acquire(spec) for _ in range(4)))
    try:
        assert {lease.source_tier for lease in leases} == {Tier.OBJECT_STORE}
        assert all(lease.load_ms > 0 for lease in leases)
        assert (await tiny_worker.engine.resident_adapters()).count(ref.digest) == 1
    finally:
        for lease in leases:
            tiny_worker.loader.release(lease)


async def test_cancelled_stream_frees_kv_blocks(tiny_worker: RunningWorker, tiny_worker_stub: Stub) -> None:
    baseline = (await tiny_worker.engine.stats()).kv_blocks_used
    call = tiny_worker_stub.Generate(gen_request(list(range(5, 300)), max_tokens=400, ignore_eos=True))
    async for msg in call:
        if msg.WhichOneof("event") == "delta":
            break
    assert (await tiny_worker.engine.stats()).kv_blocks_used > baseline
    call.cancel()
    await wait_kv_used(tiny_worker, baseline)


async def test_deadline_exceeded_frees_kv_blocks(tiny_worker: RunningWorker, tiny_worker_stub: Stub) -> None:
    baseline = (await tiny_worker.engine.stats()).kv_blocks_used
    request = gen_request(list(range(5, 100)), max_tokens=400, ignore_eos=True)
    # Slow every step down with a full batch so the long request cannot finish within the deadline.
    load = [
        tiny_worker_stub.Generate(gen_request(list(range(5, 100)), max_tokens=400, ignore_eos=True))
        for _ in range(6)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in tiny_worker_stub.Generate(request, timeout=0.3):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for call in load:
        call.cancel()
    await wait_kv_used(tiny_worker, baseline)


async def test_full_queue_sheds_with_resource_exhausted_and_retry_pushback(
    loraplex_home: Path, tiny_llama_dir: Path
) -> None:
    settings = worker_settings(loraplex_home, TINY_LLAMA, max_batch_size=1, max_waiting=1)
    async with serving(settings) as (worker, stub):
        running = stub.Generate(gen_request(max_tokens=400, ignore_eos=True))
        async for msg in running:
            if msg.WhichOneof("event") == "delta":
                break
        waiting = stub.Generate(gen_request(max_tokens=400, ignore_eos=True))
        first = await waiting.read()
        assert first.WhichOneof("event") == "started"
        err = await status_of(stub, gen_request(max_tokens=4))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry" in (err.details() or "")
        trailing = dict(err.trailing_metadata() or ())
        assert int(trailing["grpc-retry-pushback-ms"]) > 0
        running.cancel()
        waiting.cancel()
        await wait_kv_used(worker, 0)


async def test_digest_mismatch_is_failed_precondition_and_leaves_no_cache_entry(
    tiny_worker: RunningWorker, tiny_worker_stub: Stub, tiny_refs: dict[str, common_pb2.AdapterRef]
) -> None:
    # The uri holds the "qv" adapter's files, but the reference names other bytes.
    ref = common_pb2.AdapterRef()
    ref.CopyFrom(tiny_refs["qv"])
    ref.digest = "sha256:" + "ab" * 32
    err = await status_of(tiny_worker_stub, gen_request(adapter=ref))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "do not match its digest" in (err.details() or "")
    cache = tiny_worker.loader.cache_dir
    assert not (cache / ("ab" * 32)).exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".fetch-")]


async def test_missing_adapter_is_not_found(
    tiny_worker_stub: Stub, tiny_refs: dict[str, common_pb2.AdapterRef], tmp_path: Path
) -> None:
    ref = common_pb2.AdapterRef()
    ref.CopyFrom(tiny_refs["qv"])
    ref.digest = "sha256:" + "cd" * 32
    ref.uri = (tmp_path / "nowhere").as_uri()
    err = await status_of(tiny_worker_stub, gen_request(adapter=ref))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "does not exist" in (err.details() or "")


async def test_adapter_for_another_base_model_is_failed_precondition(
    tiny_worker_stub: Stub, tiny_refs: dict[str, common_pb2.AdapterRef]
) -> None:
    ref = common_pb2.AdapterRef()
    ref.CopyFrom(tiny_refs["qv"])
    ref.base_model = DEFAULT_MODEL
    err = await status_of(tiny_worker_stub, gen_request(adapter=ref))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert DEFAULT_MODEL in (err.details() or "") and TINY_LLAMA in (err.details() or "")


@pytest.mark.parametrize(
    ("request_", "phrase"),
    [
        (gen_request(list(range(1, 600))), "context"),
        (gen_request(temperature=3.0), "temperature"),
        (gen_request(top_p=0.0), "top_p"),
        (gen_request(""), "empty"),
        (gen_request([]), "empty"),
        (gen_request([10**9]), "vocabulary"),
        (chat_request(["hi"] * 257), "257 messages, over the limit of 256"),
        (chat_request(["x" * (600 << 10)] * 2), "over this worker's limit of 1048576 bytes"),
    ],
    ids=[
        "prompt-too-long",
        "temperature",
        "top-p",
        "empty-text",
        "empty-ids",
        "token-out-of-vocab",
        "chat-too-many-messages",
        "chat-over-the-byte-limit",
    ],
)
async def test_bad_input_is_invalid_argument(
    tiny_worker_stub: Stub, request_: worker_pb2.WorkerServiceGenerateRequest, phrase: str
) -> None:
    err = await status_of(tiny_worker_stub, request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in (err.details() or "")


async def test_chat_prompt_is_rendered_with_the_chat_template(
    tiny_worker_stub: Stub, tiny_llama_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    messages = [{"role": "user", "content": "Name a colour."}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    chat = worker_pb2.WorkerServiceGenerateRequest(
        prompt=common_pb2.Prompt(
            chat=common_pb2.ChatPrompt(
                messages=[common_pb2.ChatMessage(role="user", content="Name a colour.")]
            )
        ),
        sampling=common_pb2.SamplingParams(max_tokens=6, ignore_eos=True),
    )
    by_chat = await generate(tiny_worker_stub, chat)
    by_ids = await generate(tiny_worker_stub, gen_request(expected_ids, max_tokens=6, ignore_eos=True))
    assert by_chat.finished is not None
    assert by_chat.finished.usage.input_tokens == len(expected_ids)
    assert by_chat.token_ids == by_ids.token_ids


async def device_sizes(
    home: Path, refs: dict[str, common_pb2.AdapterRef], kinds: tuple[str, ...]
) -> dict[str, int]:
    """Each adapter's bytes in the engine's layout (what the DEVICE budget counts: slots with
    padded ranks, not file bytes), learnt by loading each once on a worker of its own."""
    async with serving(worker_settings(home, TINY_LLAMA)) as (worker, stub):
        for kind in kinds:
            await generate(stub, gen_request(adapter=refs[kind], max_tokens=1))
        known = {k: worker.loader.policy.known_size(refs[k].digest) for k in kinds}
    sizes = {k: v.device_bytes for k, v in known.items() if v is not None and v.device_bytes}
    assert sizes.keys() == set(kinds)
    return sizes


async def test_device_budget_demotes_the_least_used_adapter_to_host(
    loraplex_home: Path,
    tiny_llama_dir: Path,
    tiny_refs: dict[str, common_pb2.AdapterRef],
) -> None:
    sizes = await device_sizes(loraplex_home, tiny_refs, ("qv", "attn_rs", "mlp"))
    # Room for qv and the larger of the others, never for all three.
    budget = sizes["qv"] + max(sizes["attn_rs"], sizes["mlp"])
    assert budget < sum(sizes.values())
    settings = worker_settings(loraplex_home, TINY_LLAMA, device_adapter_bytes=budget)
    async with serving(settings) as (worker, stub):
        for kind in ["qv", "attn_rs", "qv", "mlp"]:
            await generate(stub, gen_request(adapter=tiny_refs[kind], max_tokens=1))
        resident = set(await worker.engine.resident_adapters())
        assert resident == {tiny_refs["qv"].digest, tiny_refs["mlp"].digest}
        assert worker.loader.policy.tier_of(tiny_refs["attn_rs"].digest) == Tier.HOST
        again = await generate(stub, gen_request(adapter=tiny_refs["attn_rs"], max_tokens=1))
        assert again.finished is not None
        assert again.finished.timings.adapter_source_tier == common_pb2.ADAPTER_TIER_HOST


async def test_get_info_health_and_reflection(tiny_worker: RunningWorker, certs: ServiceCerts) -> None:
    # The operator may read GetInfo; health and reflection answer any verified peer.
    async with certs.aio_channel(f"127.0.0.1:{tiny_worker.port}", Role.OPERATOR) as channel:
        info = await Stub(channel).GetInfo(worker_pb2.GetInfoRequest())
        assert info.base_model == TINY_LLAMA and info.device == "cpu" and info.dtype == "float32"
        assert info.context_length == 512 and info.kv_blocks_total == 256 and info.max_batch_size == 8
        assert info.version
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="loraplex.v1.WorkerService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name async for r in responses for s in r.list_services_response.service}
        assert "loraplex.v1.WorkerService" in names


def test_worker_serve_subprocess_streams_smollm2_text_with_an_adapter(
    loraplex_home: Path,
    smollm2_dir: Path,
    worker_smollm2_adapter: Path,
    adapter_store: AdapterStore,
    certs: ServiceCerts,
) -> None:
    ref = adapter_store.publish(worker_smollm2_adapter, base_model=DEFAULT_MODEL, name="smol")
    port = free_port()
    home = worker_home(loraplex_home, DEFAULT_MODEL)
    env = {
        **os.environ,
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_WORKER_LISTEN": f"127.0.0.1:{port}",
        "LORAPLEX_DEVICE": "cpu",
        "LORAPLEX_DTYPE": "float32",
        "LORAPLEX_KV_CACHE_BLOCKS": "64",
        "LORAPLEX_MODEL": "a-model-the-flag-overrides",
        "LORAPLEX_ALLOWED_FILE_ROOTS": str(adapter_store.root),
        **certs.env(Role.WORKER),
    }
    loraplex = Path(sys.executable).parent / "loraplex"
    proc = subprocess.Popen(
        [str(loraplex), "worker", "serve", "--model", DEFAULT_MODEL],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # slow when the CPUs are shared
        wait_serving(f"127.0.0.1:{port}", tls=certs.files(Role.ROUTER), proc=proc, timeout_s=180)
        question = common_pb2.Prompt(
            chat=common_pb2.ChatPrompt(
                messages=[common_pb2.ChatMessage(role="user", content="What is the capital of France?")]
            )
        )
        sampling = common_pb2.SamplingParams(max_tokens=12)
        with certs.channel(f"127.0.0.1:{port}", Role.ROUTER) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            base = list(
                stub.Generate(
                    worker_pb2.WorkerServiceGenerateRequest(prompt=question, sampling=sampling), timeout=120
                )
            )
            tuned = list(
                stub.Generate(
                    worker_pb2.WorkerServiceGenerateRequest(
                        request_id="smol-1", adapter=ref, prompt=question, sampling=sampling
                    ),
                    timeout=120,
                )
            )
        base_text = "".join(e.delta.text for e in base if e.WhichOneof("event") == "delta")
        tuned_text = "".join(e.delta.text for e in tuned if e.WhichOneof("event") == "delta")
        assert "Paris" in base_text, base_text
        assert tuned[0].started.request_id == "smol-1" and tuned[0].started.adapter.digest == ref.digest
        finished = tuned[-1].finished
        assert finished.usage.output_tokens > 0 and finished.timings.cold_start
        assert finished.worker_id.endswith(f"-{port}")
        # The adapter is applied (the answer changes) and the model still writes words.
        assert tuned_text != base_text
        assert sum(c.isalpha() for c in tuned_text) >= 5, tuned_text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = proc.stdout.read().decode() if proc.stdout else ""
    assert code == 0, log


async def test_idle_step_thread_sleeps_instead_of_spinning(
    tiny_worker: RunningWorker, tiny_worker_stub: Stub
) -> None:
    await generate(tiny_worker_stub, gen_request(max_tokens=2))
    await wait_kv_used(tiny_worker, (await tiny_worker.engine.stats()).kv_blocks_used)
    idle_steps = tiny_worker.engine.steps
    await asyncio.sleep(0.2)
    assert tiny_worker.engine.steps == idle_steps
    await generate(tiny_worker_stub, gen_request(max_tokens=2))
    assert tiny_worker.engine.steps > idle_steps


async def test_drain_finishes_in_flight_streams_and_refuses_new_ones(
    loraplex_home: Path, tiny_llama_dir: Path
) -> None:
    settings = worker_settings(loraplex_home, TINY_LLAMA)
    async with serving(settings) as (worker, stub):
        call = stub.Generate(gen_request(max_tokens=60, ignore_eos=True))
        assert (await call.read()).WhichOneof("event") == "started"
        drain = asyncio.create_task(worker.drain(10.0))
        events = []
        while (msg := await call.read()) != grpc.aio.EOF:
            events.append(msg)
        assert events[-1].WhichOneof("event") == "finished"
        assert events[-1].finished.usage.output_tokens == 60
        await drain
        err = await status_of(stub, gen_request(max_tokens=1))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_unreadable_adapter_is_failed_precondition(
    tiny_worker_stub: Stub, worker_tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(worker_tiny_adapters["qv"] / "adapter_config.json", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    ref = AdapterStore(tmp_path / "store").publish(broken, base_model=TINY_LLAMA, name="broken")
    err = await status_of(tiny_worker_stub, gen_request(adapter=ref))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "adapter broken@1 cannot be read" in (err.details() or "")


async def test_duplicate_request_id_is_refused_and_leaves_the_original_running(
    tiny_worker_stub: Stub,
) -> None:
    original = tiny_worker_stub.Generate(gen_request(max_tokens=40, ignore_eos=True, request_id="dup"))
    assert (await original.read()).WhichOneof("event") == "started"
    err = await status_of(tiny_worker_stub, gen_request(max_tokens=2, request_id="dup"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "already in flight" in (err.details() or "")
    last = None
    while (msg := await original.read()) != grpc.aio.EOF:
        last = msg
    assert last is not None and last.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.finished.usage.output_tokens == 40


async def test_two_tenants_may_run_the_same_request_id_at_once(tiny_worker_stub: Stub) -> None:
    """The worker's duplicate check is per tenant: B reusing A's id neither fails nor disturbs A."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    first = tiny_worker_stub.Generate(
        gen_request(max_tokens=30, ignore_eos=True, request_id="shared", tenant_id=a)
    )
    assert (await first.read()).WhichOneof("event") == "started"
    second = await generate(
        tiny_worker_stub, gen_request(max_tokens=3, ignore_eos=True, request_id="shared", tenant_id=b)
    )
    assert second.finished is not None and second.finished.usage.output_tokens == 3
    last = None
    while (msg := await first.read()) != grpc.aio.EOF:
        last = msg
    assert last is not None and last.finished.usage.output_tokens == 30
    # Within one tenant the id is still unique while in flight.
    again = tiny_worker_stub.Generate(
        gen_request(max_tokens=30, ignore_eos=True, request_id="mine", tenant_id=a)
    )
    assert (await again.read()).WhichOneof("event") == "started"
    err = await status_of(tiny_worker_stub, gen_request(max_tokens=2, request_id="mine", tenant_id=a))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "already in flight" in (err.details() or "")
    again.cancel()


async def test_watch_state_sends_a_snapshot_then_deltas_when_an_adapter_lands(
    loraplex_home: Path, tiny_llama_dir: Path, tiny_refs: dict[str, common_pb2.AdapterRef]
) -> None:
    settings = worker_settings(loraplex_home, TINY_LLAMA)
    async with serving(settings) as (worker, stub):
        watch = stub.WatchState(worker_pb2.WatchStateRequest())
        first = await watch.read()
        assert first.seq == 1 and first.WhichOneof("update") == "snapshot"
        snap = first.snapshot
        assert (snap.worker_id, snap.base_model, snap.accepting) == (
            f"test-worker-{TINY_LLAMA}",
            TINY_LLAMA,
            True,
        )
        assert snap.kv_blocks_total == 256 and not snap.adapters
        ref = tiny_refs["qv"]
        await generate(stub, gen_request(adapter=ref, max_tokens=2))
        seq, landed = 1, None
        while landed is None:
            msg = await asyncio.wait_for(watch.read(), 5)
            assert msg.seq == seq + 1
            seq = msg.seq
            if msg.WhichOneof("update") == "delta":
                landed = next(
                    (a for a in msg.delta.upserted if a.digest == ref.digest and a.tier == DEVICE), None
                )
        assert landed.tier == common_pb2.ADAPTER_TIER_DEVICE and landed.adapter_id == "id-qv"
        assert landed.size_bytes > 0
        drain = asyncio.create_task(worker.drain(5.0))
        rest = []
        while (msg := await asyncio.wait_for(watch.read(), 5)) != grpc.aio.EOF:
            rest.append(msg)
        await drain
        assert rest[-1].WhichOneof("update") == "delta" and not rest[-1].delta.accepting


async def test_adapter_is_fetched_from_s3_by_reference(
    tiny_worker: RunningWorker,
    tiny_worker_stub: Stub,
    worker_tiny_adapters: dict[str, Path],
    tiny_refs: dict[str, common_pb2.AdapterRef],
    worker_bucket: str,
) -> None:
    source = worker_tiny_adapters["attn_rs"]
    ref = common_pb2.AdapterRef()
    ref.CopyFrom(tiny_refs["attn_rs"])
    store = open_store(f"s3://{worker_bucket}/by-reference")
    for name in ADAPTER_FILES:
        store.upload(f"{digest_hex(ref.digest)}/{name}", source / name)
    ref.uri = store.uri_for(digest_hex(ref.digest))
    await tiny_worker_stub.EvictAdapter(worker_pb2.EvictAdapterRequest(digest=ref.digest))
    shutil.rmtree(tiny_worker.loader.cache_dir / digest_hex(ref.digest), ignore_errors=True)
    from_s3 = await generate(tiny_worker_stub, gen_request(adapter=ref, max_tokens=6, ignore_eos=True))
    assert from_s3.finished is not None
    assert from_s3.finished.timings.adapter_source_tier == common_pb2.ADAPTER_TIER_OBJECT_STORE
    from_file = await generate(
        tiny_worker_stub, gen_request(adapter=tiny_refs["attn_rs"], max_tokens=6, ignore_eos=True)
    )
    assert from_s3.token_ids == from_file.token_ids


async def test_cold_adapter_is_shed_while_the_device_is_full_of_adapters_in_use(
    loraplex_home: Path,
    tiny_llama_dir: Path,
    tiny_refs: dict[str, common_pb2.AdapterRef],
) -> None:
    sizes = await device_sizes(loraplex_home, tiny_refs, ("qv", "mlp"))
    budget = max(sizes.values())  # room for one of them at a time
    assert budget < sum(sizes.values())
    settings = worker_settings(loraplex_home, TINY_LLAMA, device_adapter_bytes=budget)
    async with serving(settings) as (worker, stub):
        worker.loader.admit_wait_s = 0.3  # shed quickly instead of waiting up to 10 s for room
        busy = stub.Generate(gen_request(adapter=tiny_refs["qv"], max_tokens=400, ignore_eos=True))
        async for msg in busy:
            if msg.WhichOneof("event") == "delta":
                break
        err = await status_of(stub, gen_request(adapter=tiny_refs["mlp"], max_tokens=2))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cannot be loaded now" in (err.details() or "") and "retry" in (err.details() or "")
        assert "grpc-retry-pushback-ms" in dict(err.trailing_metadata() or ())
        assert (await worker.engine.resident_adapters()) == [tiny_refs["qv"].digest]
        busy.cancel()
        await wait_kv_used(worker, 0)
        # Once the request is gone, the same adapter loads by evicting the idle one.
        assert (
            await generate(stub, gen_request(adapter=tiny_refs["mlp"], max_tokens=2))
        ).finished is not None
        assert (await worker.engine.resident_adapters()) == [tiny_refs["mlp"].digest]


async def test_a_waiting_request_gets_the_device_when_the_holder_finishes(
    loraplex_home: Path,
    tiny_llama_dir: Path,
    tiny_refs: dict[str, common_pb2.AdapterRef],
) -> None:
    sizes = await device_sizes(loraplex_home, tiny_refs, ("qv", "mlp"))
    budget = max(sizes.values())  # room for one of them at a time
    assert budget < sum(sizes.values())
    settings = worker_settings(loraplex_home, TINY_LLAMA, device_adapter_bytes=budget)
    async with serving(settings) as (_, stub):
        busy = stub.Generate(gen_request(adapter=tiny_refs["qv"], max_tokens=30, ignore_eos=True))
        async for msg in busy:
            if msg.WhichOneof("event") == "delta":
                break
        # Waits (within its deadline) for the qv request to end, instead of being shed.
        waiting = await generate(stub, gen_request(adapter=tiny_refs["mlp"], max_tokens=2))
        assert waiting.finished is not None and waiting.finished.timings.adapter_load_ms > 0
        assert [m async for m in busy][-1].finished.usage.output_tokens == 30


async def test_prefetch_loads_toward_the_requested_tier(
    loraplex_home: Path, tiny_llama_dir: Path, tiny_refs: dict[str, common_pb2.AdapterRef]
) -> None:
    async with serving(worker_settings(loraplex_home, TINY_LLAMA)) as (worker, stub):
        to_disk, to_device = tiny_refs["qv"], tiny_refs["mlp"]
        reply = await stub.PrefetchAdapter(
            worker_pb2.PrefetchAdapterRequest(adapter=to_disk, tier=common_pb2.ADAPTER_TIER_DISK)
        )
        assert reply.current_tier == common_pb2.ADAPTER_TIER_OBJECT_STORE
        reply = await stub.PrefetchAdapter(worker_pb2.PrefetchAdapterRequest(adapter=to_device))
        assert reply.current_tier == common_pb2.ADAPTER_TIER_OBJECT_STORE
        on_disk = worker.loader.cache_dir / digest_hex(to_disk.digest)
        deadline = time.monotonic() + 5
        while to_device.digest not in (await worker.engine.resident_adapters()) or not on_disk.is_dir():
            assert time.monotonic() < deadline, "a prefetch never reached its tier"
            await asyncio.sleep(0.02)
        assert to_disk.digest not in (await worker.engine.resident_adapters())
        again = await stub.PrefetchAdapter(worker_pb2.PrefetchAdapterRequest(adapter=to_device))
        assert again.current_tier == common_pb2.ADAPTER_TIER_DEVICE
        warm = await generate(stub, gen_request(adapter=to_device, max_tokens=1))
        assert warm.finished is not None and not warm.finished.timings.cold_start


async def test_generate_records_latency_adapter_load_and_kv_metrics(
    tiny_worker: RunningWorker, tiny_worker_stub: Stub, worker_tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(f"loraplex_worker_{name}", labels or {}) or 0.0

    # A copy no other test loaded (another revision string, which PEFT ignores, so a new digest):
    # truly cold on this worker.
    unique = tmp_path / "unique"
    shutil.copytree(worker_tiny_adapters["attn_rs"], unique)
    config = json.loads((unique / "adapter_config.json").read_text())
    (unique / "adapter_config.json").write_text(json.dumps({**config, "revision": "metrics"}))
    ref = AdapterStore(tmp_path / "store").publish(unique, base_model=TINY_LLAMA, name="m")
    assert tiny_worker.loader.policy.tier_of(ref.digest) == Tier.OBJECT_STORE
    names = (
        "ttft_seconds_count",
        "tpot_seconds_count",
        "queue_seconds_count",
        "adapter_loads_total",
        "adapter_load_seconds_count",
        "adapter_lookups_total",
        "requests_total",
    )
    labels: dict[str, dict[str, str]] = {
        "adapter_loads_total": {"tier": "object_store"},
        "adapter_load_seconds_count": {"tier": "object_store"},
        "adapter_lookups_total": {"result": "hit"},
        "requests_total": {"finish_reason": "length"},
    }
    before = {n: sample(n, labels.get(n)) for n in names}
    misses = sample("adapter_lookups_total", {"result": "miss"})
    by_tier = {t: sample("adapter_lookups_by_tier_total", {"tier": t}) for t in ("object_store", "device")}
    for _ in range(2):  # cold from the object store, then warm on the device
        await generate(tiny_worker_stub, gen_request(adapter=ref, max_tokens=3, ignore_eos=True))
    grew = {n: sample(n, labels.get(n)) - before[n] for n in names}
    assert grew == {
        "ttft_seconds_count": 2,
        "tpot_seconds_count": 2,
        "queue_seconds_count": 2,
        "adapter_loads_total": 1,
        "adapter_load_seconds_count": 1,
        "adapter_lookups_total": 1,
        "requests_total": 2,
    }
    assert sample("adapter_lookups_total", {"result": "miss"}) == misses + 1
    for tier in ("object_store", "device"):  # where each of the two requests found the adapter
        assert sample("adapter_lookups_by_tier_total", {"tier": tier}) == by_tier[tier] + 1
    assert sample("kv_blocks_total") == tiny_worker.engine.last_stats.kv_blocks_total > 0


async def test_another_tenants_identical_prompt_gets_no_cached_tokens(tiny_worker_stub: Stub) -> None:
    """Prefix reuse is per tenant: B cannot probe A's prompt block by block through
    cached_input_tokens, while A's own repeat still hits the cache."""
    prompt = [1, *range(3000, 3200)]  # 201 tokens: 12 full KV blocks of 16

    async def usage(tenant: str) -> common_pb2.Usage:
        request = gen_request(prompt, max_tokens=2)
        request.tenant_id = tenant
        finished = (await generate(tiny_worker_stub, request)).finished
        assert finished is not None
        return finished.usage

    assert (await usage("tenant-a")).cached_input_tokens == 0
    assert (await usage("tenant-b")).cached_input_tokens == 0
    assert (await usage("tenant-a")).cached_input_tokens == 192
    assert (await usage("tenant-b")).cached_input_tokens == 192  # B's own blocks, from its first call


def prompt_text(size: int) -> str:
    """ASCII prose of exactly `size` bytes."""
    sentence = "The quick brown fox jumps over the lazy dog near 1234 river banks. "
    return (sentence * (size // len(sentence) + 1))[:size]


async def test_a_huge_prompt_is_tokenized_off_the_event_loop_and_one_over_the_limit_is_refused_first(
    tiny_worker_stub: Stub, tiny_llama_dir: Path
) -> None:
    limit = 1 << 20
    near_limit = prompt_text(limit - 1024)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    began = time.perf_counter()
    tokenizer(near_limit)
    tokenize_s = time.perf_counter() - began  # the time one such prompt holds a core here

    # Meanwhile other streams keep generating, back to back, and we note when each token lands.
    arrivals: list[float] = []
    stop = asyncio.Event()

    async def keep_streaming() -> None:
        while not stop.is_set():
            async for msg in tiny_worker_stub.Generate(
                gen_request(max_tokens=60, ignore_eos=True), timeout=60
            ):
                if msg.WhichOneof("event") == "delta":
                    arrivals.append(time.monotonic())

    streaming = asyncio.create_task(keep_streaming())
    try:
        while len(arrivals) < 5:
            await asyncio.sleep(0.01)
        start = time.monotonic()
        err = await status_of(tiny_worker_stub, gen_request(near_limit))
        end = time.monotonic()
        # Tokenized in full (so it took the tokenizer's time), then refused on its token count.
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tokens but this model's context is 512" in (err.details() or "")

        over = time.monotonic()
        err = await status_of(tiny_worker_stub, gen_request(prompt_text(limit + 1)))
        refused_s = time.monotonic() - over
    finally:
        stop.set()
        await streaming
    marks = [start, *(t for t in arrivals if start < t < end), end]
    largest_gap = max(b - a for a, b in itertools.pairwise(marks))
    # On the event loop the other streams would wait out the whole tokenization (a gap of about
    # tokenize_s); off it they keep their usual pace. Generous slack for a busy 2-core machine.
    assert largest_gap < tokenize_s / 2, (largest_gap, tokenize_s, end - start)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{limit + 1} bytes, over this worker's limit of {limit} bytes" in (err.details() or "")
    assert refused_s < tokenize_s / 2, (refused_s, tokenize_s)
