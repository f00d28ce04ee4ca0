"""Bridge between the synchronous engine and asyncio: one step thread, per-request streams.

The engine is not thread-safe, so only the step thread touches it. Everything else (new requests,
aborts, adapter loads, stats) goes through an inbox the step thread drains between steps; the
thread sleeps on a condition when it has neither commands nor unfinished requests. Outputs go back
to the event loop with one `call_soon_threadsafe` per step. Torch releases the GIL inside kernels,
so the event loop keeps serving while a step runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from services.worker.engine.adapter_slots import DeviceAdapter
from services.worker.engine.adapter_weights import AdapterWeights
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import EngineRequest, EngineStats, LLMEngine, RequestOutput

log = logging.getLogger(__name__)

T = TypeVar("T")
# Pending outputs per request before new ones are merged into the last: a slow reader costs a
# bounded number of queue entries and never stalls the step thread or drops tokens.
STREAM_CAPACITY = 32


class EngineStopped(RuntimeError):
    """The worker is shutting down and takes no more engine work."""


class EngineFailed(RuntimeError):
    """An engine step raised; the request cannot continue."""


def merge_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    return replace(
        then,
        new_token_ids=first.new_token_ids + then.new_token_ids,
        text_delta=first.text_delta + then.text_delta,
    )


class RequestStream:
    """Outputs of one request, in order, for one reader on the event loop."""

    def __init__(self, request_id: str, capacity: int = STREAM_CAPACITY) -> None:
        self.request_id = request_id
        self.capacity = capacity
        self.scheduled_at: float | None = None  # monotonic time of the first step that ran it
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._items: collections.deque[RequestOutput | BaseException] = collections.deque()
        self._ready = asyncio.Event()
        self._done = False

    def push(self, item: RequestOutput | BaseException, at: float) -> None:
        """Called on the event loop thread only."""
        if isinstance(item, RequestOutput):
            if item.new_token_ids and self.first_token_at is None:
                self.first_token_at = at
            if item.finish_reason is not None:
                self.finished_at = at
            last = self._items[-1] if self._items else None
            if len(self._items) >= self.capacity and isinstance(last, RequestOutput):
                self._items[-1] = merge_outputs(last, item)
                return
        self._items.append(item)
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item


class AsyncEngine:
    """Owns an LLMEngine and the one thread that runs it: the worker's only way to the engine
    (requests, adapters, what it is configured with); nothing outside reaches the LLMEngine."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}  # step thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.last_stats: EngineStats = engine.stats()  # refreshed after every step and command
        self.steps = 0  # engine steps run; stays put while idle (the thread sleeps, never spins)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # Commands from the event loop ------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStopped("the worker is shutting down; retry on another worker")
            self._inbox.append(command)
            self._cond.notify()

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the step thread between two steps and return its result."""
        loop = self._running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def command() -> None:
            try:
                result = fn(self._engine)
            except BaseException as exc:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._submit(command)
        return await future

    async def add_request(self, request: EngineRequest) -> RequestStream:
        """Admit a request (engine errors such as QueueFull raise here) and return its stream."""
        stream = RequestStream(request.request_id)

        def admit(engine: LLMEngine) -> None:
            engine.add_request(request)
            self._streams[request.request_id] = stream

        await self._call(admit)
        return stream

    def abort(self, request_id: str) -> None:
        """Free the request's sequence and KV blocks before the next step; does not wait."""

        def command() -> None:
            self._streams.pop(request_id, None)
            self._engine.abort_request(request_id)

        with contextlib.suppress(EngineStopped):
            self._submit(command)

    async def stats(self) -> EngineStats:
        """Fresh counters, read between two steps (last_stats may be one command old)."""
        return await self._call(lambda engine: engine.stats())

    # What the engine is ------------------------------------------------------------------------
    @property
    def config(self) -> EngineConfig:
        return self._engine.config

    @property
    def context_length(self) -> int:
        return self._engine.context_length

    @property
    def vocab_size(self) -> int:
        return int(self._engine.model.config.vocab_size)

    # Adapters ----------------------------------------------------------------------------------
    # prepare/to_engine_device/to_host only read the model's weights and build new tensors, so
    # they run on the caller's (loader) threads, off the step thread; install and remove change
    # what a step sees, so they run between two steps.
    def prepare_adapter(self, weights: AdapterWeights) -> DeviceAdapter:
        return self._engine.prepare_adapter(weights)

    def to_engine_device(self, adapter: DeviceAdapter) -> DeviceAdapter:
        return self._engine.to_engine_device(adapter)

    def to_host(self, adapter: DeviceAdapter) -> DeviceAdapter:
        return self._engine.to_host(adapter)

    def linear_shape(self, key: tuple[int, str]) -> tuple[int, int] | None:
        return self._engine.linear_shape(key)

    async def install_adapter(self, adapter: DeviceAdapter) -> None:
        await self._call(lambda engine: engine.install_adapter(adapter))

    async def remove_adapter(self, digest: str) -> DeviceAdapter:
        """Take the adapter out of the engine (UnknownAdapter, AdapterInUse when it cannot)."""
        return await self._call(lambda engine: engine.remove_adapter(digest))

    async def resident_adapters(self) -> list[str]:
        return await self._call(lambda engine: engine.resident_adapters())

    # The step thread --------------------------------------------------------------------------
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("AsyncEngine.start() was not called")
        return self._loop

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._stopping and not self._engine.has_unfinished():
                    self._cond.wait()
                commands, self._inbox = self._inbox, []
                stopping = self._stopping
            for command in commands:
                command()
            if stopping:
                self._fail_all(EngineStopped("the worker shut down before the request finished"))
                return
            if self._engine.has_unfinished():
                self._step()
            self.last_stats = self._engine.stats()

    def _step(self) -> None:
        started = time.monotonic()
        self.steps += 1
        try:
            outputs = self._engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(EngineFailed(f"the engine failed while generating: {exc}"))
            return
        now = time.monotonic()
        for request_id, stream in self._streams.items():
            if stream.scheduled_at is None:
                seq = self._engine.seqs.get(request_id)
                if seq is None or seq.num_computed_tokens > 0:
                    stream.scheduled_at = started
        deliveries: list[tuple[RequestStream, RequestOutput]] = []
        for out in outputs:
            reader = self._streams.get(out.request_id)
            if reader is None:
                continue  # aborted: nobody is reading any more
            deliveries.append((reader, out))
            if out.finish_reason is not None:
                del self._streams[out.request_id]
        if deliveries:
            self._running_loop().call_soon_threadsafe(_deliver, deliveries, now)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for request_id in streams:
            try:
                self._engine.abort_request(request_id)
            except Exception:
                log.exception("could not abort %s", request_id)
        if streams and self._loop is not None:
            failed = [(s, exc) for s in streams.values()]
            self._loop.call_soon_threadsafe(_deliver, failed, time.monotonic())


def _deliver(
    items: list[tuple[RequestStream, RequestOutput]] | list[tuple[RequestStream, BaseException]], at: float
) -> None:
    for stream, item in items:
        stream.push(item, at)


def _set_result(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
