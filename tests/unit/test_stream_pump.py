"""The read-ahead pump between a worker stream and the client: batches, order, errors, back-pressure."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.v1 import common_pb2, inference_pb2, worker_pb2
from services.router.stream_pump import StreamPump, merge_deltas

EOF = object()


class Boom(Exception):
    pass


def pump_over(
    n: int, *, fail: bool = False, produced: list[int] | None = None, high_water: int = 256
) -> StreamPump:
    """A pump over a stream of n messages, read like a grpc.aio call: read() until EOF."""
    sent = 0

    async def read() -> object:
        nonlocal sent
        await asyncio.sleep(0)
        if sent == n:
            if fail:
                raise Boom("worker died")
            return EOF
        if produced is not None:
            produced.append(sent)
        sent += 1
        return str(sent - 1).encode()

    return StreamPump(read, EOF, high_water=high_water)


async def test_a_slow_consumer_takes_the_backlog_as_one_batch_in_order() -> None:
    pump = pump_over(50)
    first = await pump.take()
    await asyncio.sleep(0.01)  # the consumer is busy writing; the pump keeps reading
    rest = await pump.take()
    assert len(rest) > 1
    got = first + rest
    while batch := await pump.take():
        got += batch
    assert got == [str(i).encode() for i in range(50)]


async def test_the_error_comes_after_every_message_read_before_it() -> None:
    pump = pump_over(5, fail=True)
    got: list[bytes] = []
    with pytest.raises(Boom):
        while batch := await pump.take():
            got += batch
            await asyncio.sleep(0.01)
    assert got == [str(i).encode() for i in range(5)]


async def test_reading_stops_at_the_high_water_mark_until_the_consumer_takes() -> None:
    produced: list[int] = []
    pump = pump_over(100, produced=produced, high_water=10)
    await asyncio.sleep(0.05)
    assert len(produced) == 10
    assert len(await pump.take()) == 10
    await asyncio.sleep(0.05)
    assert len(produced) == 20
    pump.close()


async def test_close_stops_reading() -> None:
    produced: list[int] = []
    pump = pump_over(1000, produced=produced, high_water=5)
    await asyncio.sleep(0)
    pump.close()
    await asyncio.sleep(0.01)
    assert len(produced) <= 5


def test_merged_deltas_keep_every_token_and_the_text_in_order() -> None:
    raws = [
        worker_pb2.WorkerServiceGenerateResponse(
            delta=common_pb2.GenerationDelta(text=text, token_ids=ids)
        ).SerializeToString()
        for text, ids in (("Hel", [1]), ("lo, ", [2, 3]), ("wörld", [4]))
    ]
    merged, n = merge_deltas(raws, worker_pb2.WorkerServiceGenerateResponse())
    event = inference_pb2.GenerateResponse.FromString(merged)
    assert (event.delta.text, list(event.delta.token_ids), n) == ("Hello, wörld", [1, 2, 3, 4], 4)
