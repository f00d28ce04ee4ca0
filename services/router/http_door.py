"""The OpenAI-compatible HTTP API: a second door onto the router's one request path.

Starlette on uvicorn, on the router's event loop. Each generation goes through
`InferenceServicer.generate` — the same authentication, limits, bounds, adapter resolution,
routing, failover, cancellation and billing as gRPC Generate — and this module only translates
(services.router.openai_api) and carries bytes:

- A streamed response sends its HTTP status once the first token (or the end) is there: until
  then the router may still fail over to another worker, and any error is a real status code.
  An error after that ends the stream with an OpenAI error event and no `[DONE]`.
- The client leaving (http.disconnect) cancels the generation at once, streamed or not: the
  worker call stops and what was forwarded is billed, as a cancelled gRPC call is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from loraplex.v1 import common_pb2, inference_pb2
from services.common.auth import bearer_token
from services.common.config import PublicTls
from services.common.grpc_errors import RpcError
from services.router import openai_api as oa
from services.router.registry_view import (
    AdapterNotFound,
    AdapterNotServable,
    BadReference,
    RegistryUnavailable,
    RegistryView,
)
from services.router.servicer import InferenceServicer

log = logging.getLogger(__name__)

# In-flight HTTP requests get this long to finish when the router drains (as gRPC's grace).
DRAIN_GRACE_S = 30.0
# JSON escapes make a body longer than the prompt it carries ("\n" is two bytes, "\u0001" six).
BODY_PER_PROMPT_BYTE = 6
BODY_OVERHEAD_BYTES = 64 << 10
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_DONE = b"data: [DONE]\n\n"


def _error(
    status_kind: oa.ErrorKind, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(oa.error_json(message, status_kind, param), status_kind.status, headers=headers)


def _bad_request(exc: oa.BadRequest) -> JSONResponse:
    return _error(oa.ERRORS["INVALID_ARGUMENT"], exc.message, exc.param)


class OpenAIDoor:
    def __init__(self, servicer: InferenceServicer, registry: RegistryView, *, max_prompt_bytes: int) -> None:
        self._servicer = servicer
        self._registry = registry
        self.max_body_bytes = BODY_PER_PROMPT_BYTE * max_prompt_bytes + BODY_OVERHEAD_BYTES

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model_id}", self.get_model, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception, Exception: self._internal},
        )

    # -- errors ----------------------------------------------------------------------------------

    def _rpc_error(self, exc: RpcError, kind: oa.Kind | None = None) -> JSONResponse:
        status_kind = oa.error_kind(exc.code.name)
        headers = self._retry_headers(exc)
        if exc.code.name == "ALREADY_EXISTS":
            # The openai client retries a 409 by default; a replayed id never runs again.
            headers["x-should-retry"] = "false"
        param = oa.param_of(exc.code.name, exc.message, kind or "completion")
        return _error(status_kind, exc.message, param, headers)

    def _retry_headers(self, exc: RpcError) -> dict[str, str]:
        pushback_ms = self._servicer.pushback_ms(exc)
        if pushback_ms is None:
            return {}
        # Retry-After is whole seconds (RFC 9110); the openai client also reads retry-after-ms.
        return {"retry-after": str(max(1, math.ceil(pushback_ms / 1000))), "retry-after-ms": str(pushback_ms)}

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = oa.ErrorKind(exc.status_code, "invalid_request_error", None)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return _error(kind, message, headers=dict(exc.headers or {}))

    async def _internal(self, request: Request, exc: Exception) -> Response:
        log.exception("HTTP %s %s failed in the router", request.method, request.url.path, exc_info=exc)
        return _error(oa.INTERNAL, "internal error in the router; it logged the details")

    # -- models ----------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        try:
            principal, models, adapters = await self._servicer.visible_models(_secret(request))
        except RpcError as exc:
            return self._rpc_error(exc)
        data = [oa.model_json(name, "loraplex", 0, None) for name in sorted(models)]
        data += [
            oa.model_json(a.ref.name, principal.tenant_name, a.created_at.seconds, a.ref.base_model)
            for a in adapters
        ]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        try:
            principal = await self._servicer.authenticate(_secret(request))
            models = await self._registry.base_models()
            if model_id in models:
                return JSONResponse(oa.model_json(model_id, "loraplex", 0, None))
            adapter = await self._registry.resolve_adapter(principal.tenant_id, model_id)
        except RpcError as exc:
            return self._rpc_error(exc)
        except (AdapterNotFound, AdapterNotServable, BadReference):
            return _error(oa.ERRORS["NOT_FOUND"], f"model {model_id!r} not found", "model")
        except RegistryUnavailable as exc:
            return _error(oa.ERRORS["UNAVAILABLE"], str(exc))
        ref = adapter.ref
        return JSONResponse(
            oa.model_json(model_id, principal.tenant_name, adapter.created_at.seconds, ref.base_model)
        )

    # -- generations -----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generation(request, oa.parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._generation(request, oa.parse_completion)

    async def _generation(self, request: Request, parse: Callable[[object], oa.Parsed]) -> Response:
        created = int(time.time())
        secret = _secret(request)
        # Who is calling first: an unauthenticated caller learns nothing about the body's checks.
        try:
            await self._servicer.authenticate(secret)
        except RpcError as exc:
            return self._rpc_error(exc)
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        try:
            parsed = parse(body)
            base_models = await self._registry.base_models()
        except oa.BadRequest as exc:
            return _bad_request(exc)
        except RegistryUnavailable as exc:
            return _error(oa.ERRORS["UNAVAILABLE"], str(exc))
        oa.set_target(parsed.request, parsed.model, base_models)
        request_id = request.headers.get("idempotency-key") or request.headers.get("x-request-id")
        if request_id:
            parsed.request.request_id = request_id
        return _Generation(self, parsed, secret, created)

    async def _read_body(self, request: Request) -> object:
        """The JSON body, read no further than max_body_bytes; or the error response."""
        limit = self.max_body_bytes
        too_large = _error(
            oa.ErrorKind(413, "invalid_request_error", "request_too_large"),
            f"the request body is over {limit} bytes; send a shorter prompt",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return too_large
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            return _bad_request(oa.BadRequest("the request body is not valid JSON"))


def _secret(request: Request) -> str | None:
    return bearer_token([("authorization", v) for v in request.headers.getlist("authorization")])


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class _Generation(Response):
    """Runs one generation while watching for the client to leave, and answers it."""

    def __init__(self, door: OpenAIDoor, parsed: oa.Parsed, secret: str | None, created: int) -> None:
        self._door = door
        self._parsed = parsed
        self._secret = secret
        self._created = created
        self._answer: oa.Answer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._respond(scope, receive, send))
        left = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((producer, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not producer.done():
                # The client left (or the server is shutting down): cancelling the producer
                # cancels the worker call; the shared path bills what was forwarded.
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await producer
            left.cancel()
        if not producer.cancelled():
            producer.result()

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = self._door._servicer.generate(self._parsed.request, self._secret)
        try:
            async with contextlib.aclosing(events):
                if self._parsed.stream:
                    await self._stream(events, send)
                else:
                    await self._whole(events, send)
        except RpcError as exc:
            # Before the status line: the error is the response.
            await self._door._rpc_error(exc, self._parsed.kind)(scope, receive, send)

    def _answer_for(self, started: common_pb2.GenerationStarted) -> oa.Answer:
        model = started.model
        if started.HasField("adapter"):
            model = f"{started.adapter.name}@{started.adapter.version}"
        return oa.Answer(self._parsed.kind, started.request_id, self._created, model)

    async def _whole(self, events: AsyncGenerator[bytes, None], send: Send) -> None:
        texts: list[str] = []
        answer: oa.Answer | None = None
        finished: common_pb2.GenerationFinished | None = None
        async for raw in events:
            event = inference_pb2.GenerateResponse.FromString(raw)
            which = event.WhichOneof("event")
            if which == "started":
                answer = self._answer_for(event.started)
            elif which == "delta":
                texts.append(event.delta.text)
            elif which == "finished":
                finished = event.finished
        assert answer is not None and finished is not None, "a finished stream has Started and Finished"
        body = answer.body("".join(texts), finished)
        response = JSONResponse(body, headers={"x-request-id": answer.request_id})
        await send({"type": "http.response.start", "status": 200, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _stream(self, events: AsyncGenerator[bytes, None], send: Send) -> None:
        parsed = self._parsed
        usage = parsed.include_usage
        pending: list[inference_pb2.GenerateResponse] = []
        # Until the first token the router may still fail over: hold the status line till then
        # (an RpcError here is answered by _respond with its status).
        async for raw in events:
            event = inference_pb2.GenerateResponse.FromString(raw)
            pending.append(event)
            if event.WhichOneof("event") in ("delta", "finished"):
                break
        answer = self._answer_for(pending[0].started)
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"x-request-id", answer.request_id.encode()),
            *((k.encode(), v.encode()) for k, v in _SSE_HEADERS.items()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await emit(
            _sse(answer.chunk(None if parsed.kind == "completion" else "", first=True, include_usage=usage))
        )
        finished: common_pb2.GenerationFinished | None = None

        async def forward(event: inference_pb2.GenerateResponse) -> None:
            nonlocal finished
            which = event.WhichOneof("event")
            if which == "delta" and event.delta.text:
                await emit(_sse(answer.chunk(event.delta.text, include_usage=usage)))
            elif which == "finished":
                finished = event.finished

        for event in pending[1:]:
            await forward(event)
        try:
            async for raw in events:
                await forward(inference_pb2.GenerateResponse.FromString(raw))
        except RpcError as exc:
            # Headers are gone: OpenAI's way to fail a stream is an error event (the client raises it).
            kind = oa.error_kind(exc.code.name)
            await emit(_sse(oa.error_json(exc.message, kind)))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        assert finished is not None
        reason = oa.finish_reason(finished.finish_reason)
        await emit(_sse(answer.chunk(None, finish=reason, include_usage=usage)))
        if usage:
            await emit(_sse(answer.usage_chunk(finished.usage)))
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body was already read)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


# -- the server ----------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    # The router's process owns SIGTERM/SIGINT (run_until_signalled drains both doors).
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@dataclass
class RunningHttp:
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int
    scheme: str

    drain_started: float | None = None

    def begin_drain(self) -> None:
        """Stops taking connections; requests in flight get DRAIN_GRACE_S from now to finish."""
        if self.drain_started is None:
            self.drain_started = time.monotonic()
        self.server.should_exit = True

    async def stop(self, grace_s: float = DRAIN_GRACE_S) -> None:
        """Waits (at most grace_s) for the requests in flight, then closes every connection.

        Idle keep-alive connections are not waited for: over TLS, closing one waits for the peer's
        close_notify, which an idle client never sends.
        """
        self.begin_drain()
        state = self.server.server_state
        assert self.drain_started is not None
        deadline = self.drain_started + grace_s  # the gRPC door drained in parallel since then
        while state.tasks and time.monotonic() < deadline and not self.task.done():
            await asyncio.sleep(0.05)
        self.server.force_exit = True
        # A request still running after the grace sees its client gone: cancelled and billed.
        for connection in list(state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        await self.task


async def start_http(listen: str, door: OpenAIDoor, tls: PublicTls | None) -> RunningHttp:
    """Binds `listen` (port 0 picks one) and serves the door on this event loop; returns once it serves.

    With `tls` (the router's public certificate) it serves HTTPS, else plaintext HTTP.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {listen}: {exc.strerror}") from None
    sock.set_inheritable(True)
    config = uvicorn.Config(
        door.app(),
        http="h11",
        ws="none",
        lifespan="off",
        interface="asgi3",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(DRAIN_GRACE_S),
        ssl_certfile=str(tls.cert) if tls is not None else None,
        ssl_keyfile=str(tls.key) if tls is not None else None,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http-door")
    while not server.started:
        if task.done():
            sock.close()
            task.result()
            raise OSError(f"the HTTP server on {listen} stopped while starting")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    scheme = "https" if tls is not None else "http"
    if tls is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "the HTTP API on %s is plaintext: API keys cross the network in the clear; set "
            "LORAPLEX_ROUTER_TLS_CERT and LORAPLEX_ROUTER_TLS_KEY, or put it behind a TLS proxy",
            listen,
        )
    log.info("serving the OpenAI-compatible API on %s://%s:%d/v1", scheme, host, bound)
    return RunningHttp(server, task, bound, scheme)
