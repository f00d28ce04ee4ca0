"""WorkerService: converts messages to engine calls and back; the engine knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import grpc
from botocore.exceptions import BotoCoreError, ClientError
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.adapter_errors import AdapterRejected, NotFound, TooLarge, UriNotAllowed
from services.common.adapter_files import digest_hex
from services.common.config import DEFAULT_MAX_PROMPT_BYTES
from services.common.grpc_errors import RpcError, status_errors
from services.worker import convert, metrics, prompts, state
from services.worker.adapters import (
    AdapterLoader,
    AdaptersBusy,
    AdapterTooLarge,
    AdapterUnreadable,
    BaseModelMismatch,
    DigestMismatch,
    Lease,
    StoreUnavailable,
)
from services.worker.async_engine import AsyncEngine, EngineFailed, EngineStopped
from services.worker.engine.adapter_slots import AdapterMismatch
from services.worker.engine.adapter_weights import AdapterFormatError
from services.worker.engine.constrained import GrammarCompiler, RowGrammar
from services.worker.engine.llm_engine import (
    AdapterSlotsFull,
    EngineRequest,
    QueueFull,
    RequestOutput,
    UnknownAdapter,
)
from services.worker.prompt_encoder import PromptEncoder

log = logging.getLogger(__name__)

# How long a shed client should wait before retrying here (gRPC's retry pushback header).
RETRY_PUSHBACK_MS = 200

ERRORS = {
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    DigestMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    BaseModelMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterFormatError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterUnreadable: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterTooLarge: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterRejected: grpc.StatusCode.FAILED_PRECONDITION,
    TooLarge: grpc.StatusCode.FAILED_PRECONDITION,
    # A reference outside the registry's store and allowed buckets: refused before any byte is read.
    UriNotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    UnknownAdapter: grpc.StatusCode.UNAVAILABLE,
    AdapterSlotsFull: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    EngineStopped: grpc.StatusCode.UNAVAILABLE,
    EngineFailed: grpc.StatusCode.INTERNAL,
    BotoCoreError: grpc.StatusCode.UNAVAILABLE,
    ClientError: grpc.StatusCode.UNAVAILABLE,
}


def _version() -> str:
    try:
        return metadata.version("loraplex")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    base_model: str
    device: str
    dtype: str
    default_max_tokens: int


# Token ids, checked on the event loop (cheap), or the tokenization to run on a tokenizer thread.
PromptJob = list[int] | Callable[[Any], list[int]]


@status_errors(ERRORS)
class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        identity: WorkerIdentity,
        engine: AsyncEngine,
        loader: AdapterLoader,
        encoder: PromptEncoder,
        *,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    ) -> None:
        self.identity = identity
        self.engine = engine
        self.loader = loader
        # Tokenizers of its own, off the event loop: the engine's belongs to the step thread.
        self.encoder = encoder
        self.max_prompt_bytes = max_prompt_bytes
        self.context_length: int = engine.context_length
        self.vocab_size: int = engine.vocab_size
        # response_format schemas, compiled on the tokenizer threads and cached by schema text.
        self.grammars = GrammarCompiler(self.vocab_size)
        self._draining = asyncio.Event()
        self._admitting = 0  # requests between arrival and engine admission (loading adapters)

    async def Generate(
        self, request: worker_pb2.WorkerServiceGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerServiceGenerateResponse]:
        arrival = time.monotonic()
        if self._draining.is_set():
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE, "this worker is draining; send the request to another"
            )
        request_id = request.request_id or uuid.uuid4().hex
        # The engine's streams and sequences are keyed by (tenant, request id), never the id alone.
        engine_id = convert.engine_request_id(request.tenant_id, request_id)
        job = self._prompt_job(request.prompt)
        sampling = convert.sampling_params(request.sampling, self.identity.default_max_tokens)
        fmt = convert.response_format(request.sampling)
        has_adapter = request.HasField("adapter")
        spec = convert.adapter_spec(request.adapter) if has_adapter else None
        # Requests still loading their adapter count too, so a burst of cold ones stays bounded.
        if self.engine.last_stats.waiting + self._admitting >= self.engine.config.max_waiting:
            await self._shed(context, "the worker's queue is full; retry shortly or on another worker")
        lease: Lease | None = None
        submitted = done = False
        self._admitting += 1
        try:
            try:
                ids = job if isinstance(job, list) else await self.encoder.run(job)
                prompts.check_length(ids, self.context_length)
                grammar: RowGrammar | None = None
                if fmt is not None:
                    # An invalid or unenforceable schema is INVALID_ARGUMENT before the request is queued.
                    grammar = await self.encoder.run(lambda tokenizer: self.grammars.compile(fmt, tokenizer))
                if spec is not None:
                    try:
                        lease = await self.loader.acquire(spec, _wait_s(context))
                    except AdaptersBusy as exc:
                        await self._shed(context, str(exc))
                admitted = time.monotonic()
                engine_request = EngineRequest(
                    engine_id,
                    ids,
                    sampling,
                    spec.digest if spec else None,
                    tenant_id=request.tenant_id,
                    grammar=grammar,
                )
                submitted = True  # from here a cancellation may land after the engine took it
                try:
                    stream = await self.engine.add_request(engine_request)
                except QueueFull as exc:
                    submitted = False
                    await self._shed(context, str(exc))
                except Exception:
                    submitted = False  # refused: the id may belong to another request in flight
                    raise
            finally:
                self._admitting -= 1
            yield worker_pb2.WorkerServiceGenerateResponse(
                started=common_pb2.GenerationStarted(
                    request_id=request_id,
                    model=self.identity.base_model,
                    adapter=convert.adapter_version(request.adapter) if has_adapter else None,
                    input_tokens=len(ids),
                )
            )
            last: RequestOutput | None = None
            reason = common_pb2.FINISH_REASON_UNSPECIFIED
            try:
                async for out in stream:
                    last = out
                    if out.new_token_ids or out.text_delta:
                        yield _delta(out)
                reason = convert.FINISH_REASONS[last.finish_reason or "aborted"] if last else reason
            except EngineFailed:
                if last is None or last.num_output_tokens == 0:
                    raise
                log.warning("request %s failed after %d tokens", request_id, last.num_output_tokens)
                reason = common_pb2.FINISH_REASON_ERROR
            done = True
            end = stream.finished_at or time.monotonic()
            _record(stream.scheduled_at, stream.first_token_at, arrival, admitted, end, last, reason)
            timings = common_pb2.Timings(
                queue_ms=_ms((stream.scheduled_at or admitted) - admitted),
                ttft_ms=_ms((stream.first_token_at or end) - arrival),
                adapter_load_ms=lease.load_ms if lease else 0.0,
                cold_start=lease.cold_start if lease else False,
                adapter_source_tier=(
                    convert.TIERS[lease.source_tier] if lease else common_pb2.ADAPTER_TIER_UNSPECIFIED
                ),
                total_ms=_ms(end - arrival),
            )
            usage = common_pb2.Usage(
                input_tokens=last.num_prompt_tokens if last else len(ids),
                cached_input_tokens=last.num_cached_tokens if last else 0,
                output_tokens=last.num_output_tokens if last else 0,
            )
            yield worker_pb2.WorkerServiceGenerateResponse(
                finished=common_pb2.GenerationFinished(
                    finish_reason=reason, usage=usage, timings=timings, worker_id=self.identity.worker_id
                )
            )
        finally:
            # Cancellation and deadlines arrive here as CancelledError: free the KV blocks now.
            if submitted and not done:
                self.engine.abort(engine_id)
                metrics.REQUESTS.labels(finish_reason="cancelled").inc()
            if lease is not None:
                self.loader.release(lease)
            metrics.observe_engine(self.engine.last_stats)

    async def PrefetchAdapter(
        self, request: worker_pb2.PrefetchAdapterRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefetchAdapterResponse:
        """Start a background load toward the tier; answer with the tier it was in before."""
        spec = convert.adapter_spec(request.adapter)
        before = self.loader.prefetch(spec, convert.prefetch_target(request.tier))
        return worker_pb2.PrefetchAdapterResponse(current_tier=convert.TIERS[before])

    async def EvictAdapter(
        self, request: worker_pb2.EvictAdapterRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EvictAdapterResponse:
        """Drop it from DEVICE and HOST (the disk copy stays) and stop keeping it warm, unless a
        request holds it or it is loading."""
        digest_hex(request.digest)
        return worker_pb2.EvictAdapterResponse(evicted=await self.loader.evict(request.digest))

    async def WatchState(
        self, request: worker_pb2.WatchStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WatchStateResponse]:
        seq = 1
        before = self._state()
        yield worker_pb2.WatchStateResponse(seq=seq, snapshot=before)
        last_sent = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._draining.wait(), state.POLL_S)
            after = self._state()
            delta = state.diff(before, after)
            now = time.monotonic()
            if delta is not None:
                seq += 1
                yield worker_pb2.WatchStateResponse(seq=seq, delta=delta)
                before, last_sent = after, now
            elif now - last_sent >= state.HEARTBEAT_S:
                seq += 1
                heartbeat = Timestamp()
                heartbeat.GetCurrentTime()
                yield worker_pb2.WatchStateResponse(seq=seq, heartbeat=heartbeat)
                last_sent = now
            if self._draining.is_set():
                return  # the last delta said accepting=false; let the drain finish

    def begin_drain(self) -> None:
        """Refuse new generations and end state streams (their last delta says accepting=false)."""
        self._draining.set()

    def _state(self) -> worker_pb2.WorkerState:
        metrics.observe_engine(self.engine.last_stats)
        metrics.observe_adapters(self.loader.resident_bytes())
        return state.snapshot(
            self.identity.worker_id,
            self.identity.base_model,
            self.loader,
            self.engine.last_stats,
            accepting=not self._draining.is_set(),
        )

    async def GetInfo(
        self, request: worker_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetInfoResponse:
        config = self.engine.config
        return worker_pb2.GetInfoResponse(
            worker_id=self.identity.worker_id,
            base_model=self.identity.base_model,
            device=self.identity.device,
            dtype=self.identity.dtype,
            context_length=self.context_length,
            max_batch_size=config.max_batch_size,
            kv_blocks_total=self.engine.last_stats.kv_blocks_total,
            kv_block_size=config.kv_block_size,
            version=_version(),
        )

    def _prompt_job(self, prompt: common_pb2.Prompt) -> PromptJob:
        """What is cheap is checked here, before any tokenizing: sizes in bytes, counts."""
        kind = prompt.WhichOneof("kind")
        if kind == "text":
            text = prompt.text
            prompts.check_text_bytes(len(text.encode("utf-8")), self.max_prompt_bytes)
            return lambda tokenizer: prompts.text_ids(tokenizer, text)
        if kind == "token_ids":
            ids = prompt.token_ids.ids
            prompts.check_length(ids, self.context_length)  # before reading every id
            return prompts.token_ids(ids, self.vocab_size)
        if kind == "chat":
            prompts.check_chat_size(len(prompt.chat.messages))
            messages = [(m.role, m.content) for m in prompt.chat.messages]
            size = sum(len(content.encode("utf-8")) for _, content in messages)
            prompts.check_text_bytes(size, self.max_prompt_bytes)
            return lambda tokenizer: prompts.chat_ids(tokenizer, messages)
        raise prompts.PromptError("the prompt is empty; send text, token ids or chat messages")

    async def _shed(self, context: grpc.aio.ServicerContext, message: str) -> None:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            message,
            trailing_metadata=(("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),),
        )


def _wait_s(context: grpc.aio.ServicerContext) -> float | None:
    """How long a request may wait for room on the device: its remaining deadline, if any (the
    loader caps it at its admit_wait_s)."""
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining - 0.05)


def _delta(out: RequestOutput) -> worker_pb2.WorkerServiceGenerateResponse:
    return worker_pb2.WorkerServiceGenerateResponse(
        delta=common_pb2.GenerationDelta(text=out.text_delta, token_ids=out.new_token_ids)
    )


def _record(
    scheduled_at: float | None,
    first_token_at: float | None,
    arrival: float,
    admitted: float,
    end: float,
    last: RequestOutput | None,
    reason: common_pb2.FinishReason.ValueType,
) -> None:
    metrics.REQUESTS.labels(finish_reason=metrics.finish_label(reason)).inc()
    if scheduled_at is not None:
        metrics.QUEUE.observe(max(scheduled_at - admitted, 0.0))
    if first_token_at is not None:
        metrics.TTFT.observe(max(first_token_at - arrival, 0.0))
        if last is not None and last.num_output_tokens > 1:
            metrics.TPOT.observe(max(end - first_token_at, 0.0) / (last.num_output_tokens - 1))


def _ms(seconds: float) -> float:
    return max(seconds, 0.0) * 1000.0
