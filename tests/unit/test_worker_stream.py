"""RequestStream: the per-request hand-off from the step thread stays bounded without losing tokens."""

from __future__ import annotations

import asyncio

import pytest

from services.worker.async_engine import EngineFailed, RequestStream
from services.worker.engine.llm_engine import RequestOutput


def output(token: int, text: str, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", [token], text, finish, 3, 0, token)


async def drain(stream: RequestStream) -> list[RequestOutput]:
    return [o async for o in stream]


async def test_outputs_arrive_in_order_and_the_stream_ends_after_the_finish() -> None:
    stream = RequestStream("r")
    for i, text in enumerate(["a", "b"], start=1):
        stream.push(output(i, text), at=float(i))
    stream.push(output(3, "c", "length"), at=3.0)
    got = await drain(stream)
    assert [o.text_delta for o in got] == ["a", "b", "c"]
    assert stream.first_token_at == 1.0 and stream.finished_at == 3.0


async def test_a_slow_reader_gets_merged_outputs_not_an_unbounded_queue() -> None:
    stream = RequestStream("r", capacity=2)
    for i in range(1, 10):
        stream.push(output(i, str(i)), at=float(i))
    stream.push(output(10, "!", "eos"), at=10.0)
    assert len(stream._items) == 2
    got = await drain(stream)
    assert [t for o in got for t in o.new_token_ids] == list(range(1, 11))
    assert "".join(o.text_delta for o in got) == "123456789!"
    assert got[-1].finish_reason == "eos" and got[-1].num_output_tokens == 10


async def test_reader_waits_for_outputs_pushed_later() -> None:
    stream = RequestStream("r")
    reader = asyncio.create_task(drain(stream))
    await asyncio.sleep(0.01)
    assert not reader.done()
    stream.push(output(1, "x", "stop"), at=1.0)
    assert [o.text_delta for o in await asyncio.wait_for(reader, 1)] == ["x"]


async def test_an_engine_failure_ends_the_stream_with_that_error() -> None:
    stream = RequestStream("r")
    stream.push(output(1, "x"), at=1.0)
    stream.push(EngineFailed("boom"), at=2.0)
    got: list[RequestOutput] = []
    with pytest.raises(EngineFailed, match="boom"):
        async for o in stream:
            got.append(o)
    assert [o.text_delta for o in got] == ["x"]
