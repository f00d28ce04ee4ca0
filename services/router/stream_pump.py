"""Reads a stream ahead of its consumer, so a consumer slowed by writes takes messages in batches.

The router forwards worker deltas to clients; when writing to the client is the slower side,
messages pile up here and the router merges them into one delta per write instead of paying a write
per token. Reading never runs more than `high_water` messages ahead, so a slow client still slows
the worker down (back-pressure), and an error is raised only after the messages before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

from loraplex.v1 import inference_pb2, worker_pb2

DEFAULT_HIGH_WATER = 256


class StreamPump:
    def __init__(
        self,
        read: Callable[[], Awaitable[object]],
        eof: object,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
    ) -> None:
        # read/eof rather than an async iterator: grpc.aio lets a call be read with read() or by
        # iteration, never both, and the router reads the first messages itself.
        self._read = read
        self._eof = eof
        self._buf: list[bytes] = []
        self._done = False
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._high = high_water
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        ready, space, read, eof = self._ready, self._space, self._read, self._eof
        try:
            while (message := await read()) is not eof:
                self._buf.append(cast(bytes, message))
                ready.set()
                if len(self._buf) >= self._high:
                    space.clear()
                    await space.wait()
        except Exception as exc:
            self._error = exc
        finally:
            self._done = True
            ready.set()

    async def take(self) -> list[bytes]:
        """Every message read so far (at least one); [] at the end; raises the stream's error."""
        while not self._buf:
            if self._done:
                if self._error is not None:
                    raise self._error
                return []
            self._ready.clear()
            await self._ready.wait()
        batch, self._buf = self._buf, []
        self._space.set()
        return batch

    def close(self) -> None:
        self._task.cancel()


def merge_deltas(deltas: list[bytes], scratch: worker_pb2.WorkerServiceGenerateResponse) -> tuple[bytes, int]:
    """One serialized delta event carrying the text and token ids of several, in order; and its
    token count. `scratch` is a reusable parse buffer."""
    merged = inference_pb2.GenerateResponse()
    texts = []
    for raw in deltas:
        scratch.ParseFromString(raw)
        texts.append(scratch.delta.text)
        merged.delta.token_ids.extend(scratch.delta.token_ids)
    merged.delta.text = "".join(texts)
    return merged.SerializeToString(), len(merged.delta.token_ids)
