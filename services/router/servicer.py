"""InferenceService: admit (auth, validate, resolve), route, proxy the worker's stream, bill once.

The stream proxy forwards the worker's chunks as the bytes it received: WorkerServiceGenerateResponse
and GenerateResponse have the same wire layout, so a delta is never decoded into Python objects and
re-encoded. The router reads only the oneof tag of each chunk and the token count of deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from loraplex.v1 import common_pb2, inference_pb2, registry_pb2, usage_pb2, worker_pb2
from services.common.auth import bearer_token
from services.common.grpc_errors import RpcError
from services.router import metrics, policy
from services.router.cold_queue import ColdQueue, ColdQueueFull
from services.router.inflight import InflightJournal
from services.router.limit_gate import LimitGate, OverLimit, Ticket
from services.router.metering import SpoolWriter, usage_record
from services.router.registry_view import (
    UNAVAILABLE_PUSHBACK_MS,
    AdapterNotFound,
    AdapterNotServable,
    BadReference,
    Principal,
    RegistryUnavailable,
    RegistryView,
    Unauthenticated,
)
from services.router.request_ids import RecentRequests, Seen
from services.router.spool import Spool
from services.router.stream_pump import StreamPump, merge_deltas
from services.router.validation import (
    DEFAULT_MAX_PROMPT_BYTES,
    InvalidRequest,
    check_bounds,
    check_request,
    request_id_for,
)
from services.router.worker_pool import WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAME = "loraplex.v1.InferenceService"
# Field tags (field number << 3 | wire type 2) of the event oneof, shared by both stream messages.
_STARTED, _DELTA, _FINISHED = b"\x0a", b"\x12", b"\x1a"
_FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_FR = common_pb2.FinishReason
DEFAULT_TOKEN_TIMEOUT_S = 30.0
# While the spool's disk fails, admission probes it at most this often.
SPOOL_PROBE_S = 0.5
# A held request re-routes at least this often even without a wake-up: a worker that stops
# draining or ends its cool-down becomes routable without sending a fresh snapshot.
_COLD_RECHECK_S = 0.5


class Overloaded(RpcError):
    """RESOURCE_EXHAUSTED with grpc-retry-pushback-ms: `pushback_ms`, or the router's default."""

    def __init__(self, message: str, pushback_ms: int | None = None) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.pushback_ms = pushback_ms


class Unavailable(RpcError):
    """UNAVAILABLE until something the router waits on returns (the registry, the spool's disk),
    with grpc-retry-pushback-ms: how often the router checks, so a retry lands soon after."""

    def __init__(self, message: str, pushback_ms: int = UNAVAILABLE_PUSHBACK_MS) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
        self.pushback_ms = pushback_ms


class UsageNotRecorded(RpcError):
    """The stream's usage record could not be made durable: the stream ends with this, never
    with an unbilled Finished."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"the router could not record usage for request {request_id!r}, so it ended the stream "
            "without a result; retry later with a new request_id",
        )


@dataclass(frozen=True)
class Admitted:
    request_id: str
    # Whether the client chose the request id (only those are tracked for replays).
    client_id: bool
    principal: Principal
    base_model: str
    adapter: registry_pb2.Adapter | None
    worker_request: worker_pb2.WorkerServiceGenerateRequest
    started: bytes  # the serialized GenerationStarted event
    arrived: float  # perf_counter() when the request arrived
    arrived_wall: float  # time.time() when the request arrived
    ticket: Ticket | None = None  # the tenant-limits slot, released when the stream ends


@dataclass
class _Stream:
    """What happened during one proxied stream; read once when it ends, to bill."""

    tokens_out: int = 0
    first_token_at: float = 0.0
    worker_started: bool = False
    input_tokens: int = 0  # from the worker's GenerationStarted
    finished: common_pb2.GenerationFinished | None = None
    worker_id: str = ""
    end: _FR.ValueType = _FR.FINISH_REASON_UNSPECIFIED
    billed: bool = False
    checkpointed_at: float = 0.0
    checkpoint: asyncio.Task[None] | None = None  # the latest in-flight checkpoint write


def _identity(data: bytes) -> bytes:
    return data


def _no_deadline() -> float | None:
    return None


class InferenceServicer:
    def __init__(
        self,
        registry: RegistryView,
        pool: WorkerPool,
        spool: Spool,
        writer: SpoolWriter,
        journal: InflightJournal,
        *,
        max_inflight: int,
        retry_pushback_ms: int,
        load_eps: float,
        kv_full: float = policy.DEFAULT_KV_FULL,
        policy_kind: policy.PolicyKind = policy.PolicyKind.AFFINITY,
        recent: RecentRequests | None = None,
        limit_gate: LimitGate | None = None,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
        token_timeout_s: float = DEFAULT_TOKEN_TIMEOUT_S,
        cold: ColdQueue | None = None,
    ) -> None:
        self._registry = registry
        self._pool = pool
        self._spool = spool
        self._writer = writer
        self._journal = journal
        # Client-chosen request ids in flight or finished here within the idempotency window.
        self.recent = recent if recent is not None else RecentRequests()
        self._max_inflight = max_inflight
        self._retry_pushback_ms = retry_pushback_ms
        self._eps = load_eps
        self._kv_full = kv_full
        self._policy = policy_kind
        self._turn = 0  # round_robin's rotation
        self.inflight = 0
        self._spool_was_full = False
        self._limit_gate = limit_gate
        self._max_prompt_bytes = max_prompt_bytes
        self._token_timeout_s = token_timeout_s
        self._spool_probed_at = 0.0  # monotonic time of the last probe of a failing spool
        # Requests for a base model with no live worker wait here (None: refused at once).
        self._cold = cold

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate,
                request_deserializer=inference_pb2.GenerateRequest.FromString,
                response_serializer=_identity,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels,
                request_deserializer=inference_pb2.ListModelsRequest.FromString,
                response_serializer=inference_pb2.ListModelsResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    # -- ListModels --------------------------------------------------------------------------

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        try:
            _, models, adapters = await self.visible_models(bearer_token(context.invocation_metadata()))
        except RpcError as exc:
            await context.abort(exc.code, exc.message)
        response = inference_pb2.ListModelsResponse()
        for name in sorted(models):
            m = models[name]
            info = response.models.add(
                name=m.name,
                context_length=m.context_length,
                input_price_per_mtok=m.input_price_per_mtok,
                output_price_per_mtok=m.output_price_per_mtok,
            )
            info.adapters.extend(_public(a) for a in adapters if a.ref.base_model == name)
        return response

    async def visible_models(
        self, secret: str | None
    ) -> tuple[Principal, dict[str, registry_pb2.BaseModel], list[registry_pb2.Adapter]]:
        """What the caller may call: every base model, and its tenant's READY adapters (latest
        version of each name). Raises RpcError (UNAUTHENTICATED, UNAVAILABLE)."""
        principal = await self.authenticate(secret)
        try:
            models = await self._registry.base_models()
            adapters = await self._registry.list_ready_adapters(principal.tenant_id)
        except RegistryUnavailable as exc:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        return principal, models, adapters

    # -- Generate ----------------------------------------------------------------------------

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        secret = bearer_token(context.invocation_metadata())
        try:
            # aclosing: a cancelled call closes the shared stream now, which bills and frees the slot.
            async with contextlib.aclosing(self.generate(request, secret, context.time_remaining)) as events:
                async for event in events:
                    yield event
        except RpcError as exc:
            await context.abort(exc.code, exc.message, trailing_metadata=self._trailing(exc))

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        secret: str | None,
        time_remaining: Callable[[], float | None] = _no_deadline,
    ) -> AsyncGenerator[bytes, None]:
        """One request through admission, routing, the worker's stream and billing: the path both
        doors (gRPC Generate, the OpenAI-compatible HTTP API) share.

        Yields serialized GenerateResponse events (Started, Deltas, Finished). Every failure is an
        RpcError (Overloaded carries the retry pushback), raised after whatever ran was billed.
        Closing the generator (or cancelling its consumer) cancels the worker call and bills what
        was forwarded. `time_remaining` gives the caller's deadline in seconds (None: none).
        """
        arrived = time.perf_counter()
        adapter_label = ""
        try:
            admitted = await self._admit(request, secret, arrived)
        except RpcError as exc:
            metrics.REQUESTS.labels("", exc.code.name).inc()
            raise
        if admitted.adapter is not None:
            adapter_label = admitted.adapter.ref.adapter_id
        key = (admitted.principal.tenant_id, admitted.request_id)
        self.inflight += 1
        metrics.INFLIGHT.labels(admitted.base_model).inc()
        state = _Stream()
        code = grpc.StatusCode.OK
        try:
            # aclosing: if this generator is closed at a yield, the worker call is cancelled now,
            # not whenever the inner generator is collected.
            async with contextlib.aclosing(self._proxy(admitted, state, time_remaining)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except RpcError as exc:
            code = exc.code
            await self._bill_quietly(admitted, state)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled by the client or by the deadline: the worker call is already cancelled.
            code = grpc.StatusCode.CANCELLED
            remaining = time_remaining()
            expired = remaining is not None and remaining <= 0
            state.end = _FR.FINISH_REASON_DEADLINE_EXCEEDED if expired else _FR.FINISH_REASON_CANCELLED
            await self._bill_quietly(admitted, state)
            raise
        except Exception:
            log.exception("request %s failed in the router", admitted.request_id)
            code = grpc.StatusCode.INTERNAL
            state.end = _FR.FINISH_REASON_ERROR
            await self._bill_quietly(admitted, state)
            raise RpcError(code, "internal error in the router; it logged the details") from None
        finally:
            self._release(admitted, state)
            if admitted.client_id:
                if state.billed:
                    # Something billable ran under this id (even if its record failed to write):
                    # it is never generated again within the window.
                    now = time.time()
                    self.recent.finish(key, now, now)
                else:
                    self.recent.release(key)  # nothing ran: the client may retry the same id
            self.inflight -= 1
            metrics.INFLIGHT.labels(admitted.base_model).dec()
            metrics.REQUESTS.labels(adapter_label, code.name).inc()

    async def _proxy(
        self, admitted: Admitted, state: _Stream, time_remaining: Callable[[], float | None]
    ) -> AsyncGenerator[bytes, None]:
        adapter_key = admitted.adapter.ref.digest if admitted.adapter is not None else ""
        decision = self._route(admitted.base_model, adapter_key)
        if not decision.candidates:
            decision = await self._await_worker(admitted.base_model, adapter_key, time_remaining)
        metrics.ROUTING.labels(decision.reason.value).inc()
        exhausted = 0
        last_error = ""
        scratch = worker_pb2.WorkerServiceGenerateResponse()
        finished_event = b""
        for worker_id in decision.candidates:
            handle = self._pool.get(worker_id)
            if handle is None:
                continue
            remaining = time_remaining()
            if remaining is not None and remaining <= 0:
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before a worker answered"
                )
            call = handle.generate(admitted.worker_request, timeout=remaining)
            pump: StreamPump | None = None
            token = handle.dispatched()
            # Until the worker's first message the deadline alone bounds the wait (an adapter may
            # be loading); after it, silence longer than the token timeout means a hung worker.
            silence: float | None = None
            try:
                while not finished_event:
                    async with asyncio.timeout(silence):
                        if pump is None:
                            # Until the first token, read directly: nothing stands between the worker's
                            # first delta and the client. Then read ahead, so a backlog is merged.
                            message = await call.read()
                            batch = [] if message is grpc.aio.EOF else [message]
                            if state.tokens_out:
                                pump = StreamPump(call.read, grpc.aio.EOF)
                        else:
                            batch = await pump.take()
                    if not batch:
                        break
                    silence = self._token_timeout_s
                    if not state.worker_started:
                        state.worker_started = True
                        if batch[0][:1] == _STARTED:
                            scratch.ParseFromString(batch[0])
                            state.input_tokens = scratch.started.input_tokens
                        yield admitted.started
                    # One message per read is the common case when the router keeps up: forward
                    # it as is. A backlog becomes one merged delta, one write instead of many.
                    if len(batch) == 1:
                        deltas = batch if batch[0][:1] == _DELTA else []
                    else:
                        deltas = [raw for raw in batch if raw[:1] == _DELTA]
                    if deltas:
                        if len(deltas) == 1:
                            out = deltas[0]
                            scratch.ParseFromString(out)
                            n = len(scratch.delta.token_ids)
                        else:
                            out, n = merge_deltas(deltas, scratch)
                        now = time.perf_counter()
                        if n and not state.tokens_out:
                            state.first_token_at = now
                        # A checkpoint counts only tokens already handed to the client's stream
                        # (earlier messages, not this one): a router killed between writing it and
                        # the client reading this message must not bill tokens never delivered.
                        if state.tokens_out and self._journal.due(state.checkpointed_at, now):
                            state.worker_id = handle.worker_id
                            self._checkpoint(admitted, state, now)
                        state.tokens_out += n
                        yield out
                    if batch[-1][:1] == _FINISHED:
                        finished_event = batch[-1]
                        scratch.ParseFromString(finished_event)
                        state.finished = common_pb2.GenerationFinished()
                        state.finished.CopyFrom(scratch.finished)
                        state.worker_id = state.finished.worker_id or handle.worker_id
                        if scratch.finished.usage.output_tokens != state.tokens_out:
                            # The client sees the count it is billed for: what the router forwarded.
                            scratch.finished.usage.output_tokens = state.tokens_out
                            finished_event = scratch.SerializeToString()
            except TimeoutError:
                # The worker went silent mid-stream (hung, stopped, partitioned): out of routing
                # until its state stream speaks again, and this stream does not wait for it.
                self._pool.mark_down(handle)
                metrics.FAILOVERS.labels("TOKEN_TIMEOUT").inc()
                silent = f"worker {handle.worker_id} sent nothing for {self._token_timeout_s:g}s"
                if state.tokens_out == 0:
                    last_error = silent
                    continue
                state.worker_id = handle.worker_id
                state.end = _FR.FINISH_REASON_ERROR
                raise RpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{silent} after {state.tokens_out} tokens, so the router ended the stream; the "
                    f"{state.tokens_out} tokens you received are billed; send a new request_id to "
                    "generate again",
                ) from None
            except grpc.aio.AioRpcError as exc:
                err = exc.code()
                if state.tokens_out == 0 and err in _FAILOVER_CODES:
                    metrics.FAILOVERS.labels(err.name).inc()
                    if err == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        exhausted += 1
                    else:
                        self._pool.mark_down(handle)
                    last_error = f"worker {handle.worker_id}: {exc.details()}"
                    continue
                state.worker_id = handle.worker_id
                if err == grpc.StatusCode.DEADLINE_EXCEEDED:
                    state.end = _FR.FINISH_REASON_DEADLINE_EXCEEDED
                    raise RpcError(err, "the deadline passed before the generation finished") from None
                if state.tokens_out:
                    state.end = _FR.FINISH_REASON_ERROR
                    raise RpcError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the worker failed after {state.tokens_out} tokens ({err.name}); "
                        "the partial output is billed",
                    ) from None
                # Not a capacity problem (bad prompt, internal error): the client should see it as is.
                raise RpcError(err, exc.details() or f"worker error {err.name}") from None
            finally:
                handle.finished(token)
                if pump is not None:
                    pump.close()
                if not call.done():
                    call.cancel()
            if state.finished is None:
                state.worker_id = handle.worker_id
                if state.tokens_out:
                    state.end = _FR.FINISH_REASON_ERROR
                    raise RpcError(
                        grpc.StatusCode.UNAVAILABLE, "the worker ended the stream without finishing it"
                    )
                continue
            # Durable before the client sees the end of the stream.
            await self._bill(admitted, state)
            yield finished_event
            return
        if exhausted:
            raise Overloaded(f"every worker for {admitted.base_model!r} is at capacity; retry later")
        raise RpcError(
            grpc.StatusCode.UNAVAILABLE, f"no worker could take the request ({last_error or 'none left'})"
        )

    def _route(self, base_model: str, adapter_key: str) -> policy.Decision:
        self._turn += 1
        return policy.route(
            self._policy,
            self._pool.views(),
            base_model,
            adapter_key,
            turn=self._turn,
            eps=self._eps,
            kv_full=self._kv_full,
        )

    async def _await_worker(
        self, base_model: str, adapter_key: str, time_remaining: Callable[[], float | None]
    ) -> policy.Decision:
        """No live worker serves `base_model`: hold the request in the cold queue until one comes
        up (an autoscaler is starting it), the wait cap or the caller's deadline. Returns a routing
        decision with candidates, or raises UNAVAILABLE / DEADLINE_EXCEEDED naming the model."""
        cold = self._cold
        caller_left = time_remaining()
        budget = cold.budget(caller_left) if cold is not None else 0.0
        if budget <= 0:
            if caller_left is not None and caller_left <= 0:
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the deadline passed before a worker for base model {base_model!r} was found",
                )
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"no live worker serves base model {base_model!r}")
        assert cold is not None
        try:
            waiter = cold.enter(base_model)
        except ColdQueueFull as exc:
            metrics.REJECTED.labels("cold_queue_full").inc()
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE,
                f"base model {base_model!r} has no live worker yet and {exc.waiting} requests already "
                "wait for one (LORAPLEX_ROUTER_COLD_QUEUE); retry in a few seconds",
            ) from None
        # Held, not in flight: the two gauges stay disjoint so an autoscaler can sum them.
        metrics.INFLIGHT.labels(base_model).dec()
        start = time.monotonic()
        deadline = start + budget
        try:
            while (left := deadline - time.monotonic()) > 0:
                await waiter.wait(min(left, _COLD_RECHECK_S))
                decision = self._route(base_model, adapter_key)
                if decision.candidates:
                    return decision
        finally:
            cold.leave(waiter)
            metrics.INFLIGHT.labels(base_model).inc()
            metrics.COLD_WAIT.labels(base_model).observe(time.monotonic() - start)
        waited = time.monotonic() - start
        if caller_left is not None and caller_left <= cold.max_wait_s:
            raise RpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the deadline passed after {waited:.1f}s waiting for a worker of base model "
                f"{base_model!r} to start",
            )
        raise RpcError(
            grpc.StatusCode.UNAVAILABLE,
            f"no worker for base model {base_model!r} came up within {cold.max_wait_s:g}s "
            "(LORAPLEX_ROUTER_COLD_WAIT_S); is its autoscaler or worker pool running?",
        )

    # -- admission ---------------------------------------------------------------------------

    def _trailing(self, exc: RpcError) -> tuple[tuple[str, str], ...]:
        pushback_ms = self.pushback_ms(exc)
        return () if pushback_ms is None else (("grpc-retry-pushback-ms", str(pushback_ms)),)

    def pushback_ms(self, exc: RpcError) -> int | None:
        """How long an Overloaded or Unavailable caller should wait before retrying (ms); None for
        other errors."""
        if isinstance(exc, Unavailable):
            return exc.pushback_ms
        if not isinstance(exc, Overloaded):
            return None
        return self._retry_pushback_ms if exc.pushback_ms is None else exc.pushback_ms

    def _release(self, admitted: Admitted, state: _Stream) -> None:
        """The stream ended (however): free the tenant's slot, charge the tokens it consumed."""
        if admitted.ticket is None or self._limit_gate is None:
            return
        input_tokens = state.finished.usage.input_tokens if state.finished is not None else state.input_tokens
        self._limit_gate.release(admitted.ticket, input_tokens + state.tokens_out)

    async def authenticate(self, secret: str | None) -> Principal:
        """The caller of an API key secret (None: none sent). Raises RpcError."""
        if secret is None:
            raise RpcError(
                grpc.StatusCode.UNAUTHENTICATED, "missing credentials: send 'authorization: Bearer <API key>'"
            )
        try:
            return await self._registry.authenticate(secret)
        except Unauthenticated as exc:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        except RegistryUnavailable as exc:
            raise Unavailable(str(exc)) from None

    async def _admit(
        self, request: inference_pb2.GenerateRequest, secret: str | None, arrived: float
    ) -> Admitted:
        arrived_wall = time.time()
        principal = await self.authenticate(secret)
        try:
            # Sizes first: a huge prompt is refused before any lookup, and never reaches a worker.
            check_bounds(request, self._max_prompt_bytes)
            client_id = bool(request.request_id)
            request_id = request_id_for(request.request_id)
            if request.prompt.WhichOneof("kind") is None:
                raise InvalidRequest("prompt is required: set prompt.text, prompt.token_ids or prompt.chat")
        except InvalidRequest as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if self._spool.full:
            metrics.REJECTED.labels("spool_full").inc()
            if not self._spool_was_full:
                self._spool_was_full = True
                metrics.SPOOL_FULL.set(1)
                log.error(
                    "usage spool %s holds %d bytes (cap %d): refusing new requests until the registry "
                    "takes the backlog (is RecordUsage failing?)",
                    self._spool.directory,
                    self._spool.size_bytes,
                    self._spool.max_bytes,
                )
            raise Unavailable("the router cannot record usage right now; retry later")
        if self._spool.failing and not await self._spool_writable_again():
            metrics.REJECTED.labels("spool_failing").inc()
            raise Unavailable(
                "the router cannot write usage records to its disk right now, so it takes no new "
                "requests until it can; retry later (or through another router)",
                int(SPOOL_PROBE_S * 1000),
            )
        if self._spool_was_full:
            self._spool_was_full = False
            metrics.SPOOL_FULL.set(0)
            log.warning(
                "usage spool is under its cap again (%d bytes): accepting requests", self._spool.size_bytes
            )
        try:
            adapter = None
            if request.adapter:
                adapter = await self._registry.resolve_adapter(principal.tenant_id, request.adapter)
                base_model = adapter.ref.base_model
                if request.model and request.model != base_model:
                    raise RpcError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"adapter {request.adapter!r} is for base model {base_model!r}, "
                        f"not {request.model!r}",
                    )
            elif request.model:
                base_model = request.model
            else:
                raise InvalidRequest("model is required when no adapter is given")
            models = await self._registry.base_models()
            model = models.get(base_model)
            if model is None:
                raise RpcError(grpc.StatusCode.NOT_FOUND, f"model {base_model!r} not found")
            check_request(request, model.context_length)
        except (InvalidRequest, BadReference) as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except AdapterNotFound as exc:
            raise RpcError(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        except AdapterNotServable as exc:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        except RegistryUnavailable as exc:
            raise Unavailable(str(exc)) from None
        if self.inflight >= self._max_inflight:
            metrics.REJECTED.labels("router_inflight").inc()
            raise Overloaded(f"the router has {self.inflight} requests in flight (limit); retry later")
        ticket = None
        if self._limit_gate is not None:
            try:
                ticket = await self._limit_gate.admit(principal)
            except OverLimit as exc:
                metrics.REJECTED.labels("tenant_limit").inc()
                raise Overloaded(str(exc), exc.retry_after_ms) from None
        if client_id:
            try:
                await self._claim(principal.tenant_id, request_id)
            except BaseException:
                # Refused (a used id) or the client left: the request never held its slot.
                if ticket is not None and self._limit_gate is not None:
                    self._limit_gate.release(ticket, 0)
                raise
        worker_request = worker_pb2.WorkerServiceGenerateRequest(
            request_id=request_id,
            prompt=request.prompt,
            sampling=request.sampling,
            tenant_id=principal.tenant_id,
        )
        started = inference_pb2.GenerateResponse(
            started=common_pb2.GenerationStarted(request_id=request_id, model=base_model)
        )
        if adapter is not None:
            # The registry's ref as is: digest, uri and keep_warm (the worker pins keep-warm adapters).
            worker_request.adapter.CopyFrom(adapter.ref)
            started.started.adapter.CopyFrom(_public(adapter))
        return Admitted(
            request_id,
            client_id,
            principal,
            base_model,
            adapter,
            worker_request,
            started.SerializeToString(),
            arrived,
            arrived_wall,
            ticket,
        )

    async def _spool_writable_again(self) -> bool:
        """After a failed spool write: probes the disk at most once per SPOOL_PROBE_S (off the
        event loop); True once a write succeeds again."""
        now = time.monotonic()
        if now - self._spool_probed_at < SPOOL_PROBE_S:
            return False
        self._spool_probed_at = now
        if not await asyncio.to_thread(self._spool.probe):
            return False
        log.warning("usage spool %s is writable again: accepting requests", self._spool.directory)
        return True

    async def _claim(self, tenant_id: str, request_id: str) -> None:
        """Marks a client-chosen id in flight, or refuses it: a request id this tenant already ran
        (here or on any router whose records reached the ledger) within the idempotency window, or
        one still running here, is never generated again. The caller settles the claim when the
        stream ends (Generate's finally)."""
        key = (tenant_id, request_id)
        now = time.time()
        seen = self.recent.claim(key, now)  # synchronous: a concurrent duplicate sees this claim
        if seen is None:
            try:
                used = await self._registry.request_ids_used(
                    tenant_id, [request_id], int(self.recent.window_s)
                )
            except BaseException as exc:
                self.recent.release(key)  # nothing will run under it (refused, or the client left)
                if not isinstance(exc, RegistryUnavailable):
                    raise
                metrics.REJECTED.labels("request_id_unchecked").inc()
                raise Unavailable(
                    f"the router cannot check whether request_id {request_id!r} was already used "
                    "(the registry is unreachable); retry later, or send no request_id and the "
                    "router will choose a fresh one",
                ) from None
            if request_id not in used:
                return
            self.recent.finish(key, now, now)  # remember it: the next replay needs no lookup
            seen = Seen.FINISHED
        metrics.REJECTED.labels("request_id_reused").inc()
        raise RpcError(
            grpc.StatusCode.ALREADY_EXISTS,
            f"request_id {request_id!r} was already used for a request that is {seen.value}; a "
            f"request id runs once within {self.recent.window_s / 3600:g} h: send a new request_id "
            "to generate again",
        )

    # -- billing -----------------------------------------------------------------------------

    async def _bill(self, admitted: Admitted, state: _Stream) -> None:
        """Writes the request's one usage record, if it produced anything billable.

        Output tokens are the router's own count of what it forwarded, never the number a worker
        reports. Raises UsageNotRecorded when the record could not be made durable; the stream's
        checkpoint is then brought up to date (best effort) so a restart still bills it.
        """
        if state.billed:
            return
        finished = state.finished
        if (
            finished is None
            and not state.tokens_out
            and not (state.worker_started and state.end != _FR.FINISH_REASON_UNSPECIFIED)
        ):
            return
        state.billed = True
        if finished is not None:
            usage = common_pb2.Usage(
                input_tokens=finished.usage.input_tokens,
                cached_input_tokens=finished.usage.cached_input_tokens,
                output_tokens=state.tokens_out,
            )
            if finished.usage.output_tokens != state.tokens_out:
                metrics.WORKER_USAGE_MISMATCH.inc()
                log.warning(
                    "worker %s reported %d output tokens for request %s; the router forwarded and bills %d",
                    state.worker_id,
                    finished.usage.output_tokens,
                    admitted.request_id,
                    state.tokens_out,
                )
            reason = finished.finish_reason
            cold = finished.timings.cold_start
        else:
            # Without the worker's Finished, bill the prompt size its Started reported.
            usage = common_pb2.Usage(input_tokens=state.input_tokens, output_tokens=state.tokens_out)
            reason = state.end
            cold = False
        if state.first_token_at:
            metrics.TTFT.observe(state.first_token_at - admitted.arrived)
        record = _record(admitted, state, usage, reason, cold, time.perf_counter())
        try:
            await self._writer.write(record)
        except Exception:
            log.exception("usage record for request %s was not written", admitted.request_id)
            await self._keep_checkpoint(admitted, state, record)
            raise UsageNotRecorded(admitted.request_id) from None
        # The final record is durable: the stream's checkpoint has served its purpose.
        if state.checkpoint is not None:
            await asyncio.shield(state.checkpoint)
        if state.checkpointed_at:
            await asyncio.to_thread(self._journal.discard, admitted.principal.tenant_id, admitted.request_id)

    async def _bill_quietly(self, admitted: Admitted, state: _Stream) -> None:
        """_bill on a path that already ends the stream with an error: a failed write is logged
        (by _bill) and the client sees the original error."""
        with contextlib.suppress(UsageNotRecorded):
            await self._bill(admitted, state)

    async def _keep_checkpoint(
        self, admitted: Admitted, state: _Stream, record: usage_pb2.UsageRecord
    ) -> None:
        """After a failed spool write: the final record as the stream's checkpoint, so the next
        start of this router bills it (the journal may sit on a disk that still works)."""
        if state.checkpoint is not None:
            await asyncio.shield(state.checkpoint)
        try:
            await asyncio.to_thread(self._journal.write, record)
        except OSError:
            log.exception("in-flight checkpoint for request %s was not written either", admitted.request_id)

    def _checkpoint(self, admitted: Admitted, state: _Stream, now: float) -> None:
        """Durably notes what this stream has produced so far, off the event loop, in order."""
        state.checkpointed_at = now
        usage = common_pb2.Usage(input_tokens=state.input_tokens, output_tokens=state.tokens_out)
        record = _record(admitted, state, usage, _FR.FINISH_REASON_ERROR, False, now)
        previous = state.checkpoint

        async def write() -> None:
            if previous is not None:
                await previous
            try:
                await asyncio.to_thread(self._journal.write, record)
            except OSError:
                log.exception("in-flight checkpoint for request %s was not written", admitted.request_id)

        state.checkpoint = asyncio.get_running_loop().create_task(write())


def _record(
    admitted: Admitted,
    state: _Stream,
    usage: common_pb2.Usage,
    reason: _FR.ValueType,
    cold: bool,
    now: float,
) -> usage_pb2.UsageRecord:
    arrived = admitted.arrived
    ttft_ms = (state.first_token_at - arrived) * 1000 if state.first_token_at else 0.0
    return usage_record(
        request_id=admitted.request_id,
        tenant_id=admitted.principal.tenant_id,
        api_key_id=admitted.principal.key_id,
        base_model=admitted.base_model,
        adapter=admitted.adapter.ref if admitted.adapter is not None else None,
        usage=usage,
        finish_reason=reason,
        ttft_ms=max(ttft_ms, 0.0),
        duration_ms=(now - arrived) * 1000,
        worker_id=state.worker_id,
        cold_start=cold,
        started_at_s=admitted.arrived_wall,
        finished_at_s=admitted.arrived_wall + (now - arrived),
    )


def _public(adapter: registry_pb2.Adapter) -> common_pb2.AdapterVersion:
    ref = adapter.ref
    return common_pb2.AdapterVersion(
        adapter_id=ref.adapter_id, name=ref.name, version=ref.version, digest=ref.digest
    )
