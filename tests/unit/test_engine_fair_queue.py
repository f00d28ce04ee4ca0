"""The waiting queue: round-robin across tenants, then across a tenant's adapters."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.worker.engine.fair_queue import FairQueue


@dataclass(eq=False)
class Req:
    name: str
    tenant: str
    adapter: str | None


def _queue() -> FairQueue[Req]:
    return FairQueue(lambda r: (r.tenant, r.adapter))


def _drain(q: FairQueue[Req], n: int) -> list[Req]:
    return [q.pop() for _ in range(n)]


def test_a_tenant_with_one_request_is_admitted_in_the_first_round_behind_a_burst() -> None:
    q = _queue()
    for i in range(100):
        q.push(Req(f"x{i}", "X", f"adapter-{i % 10}"))
    q.push(Req("y0", "Y", None))
    assert len(q) == 101
    first_round = _drain(q, 2)
    assert [r.tenant for r in first_round] == ["X", "Y"]


def test_within_a_tenant_adapters_rotate_and_each_adapter_is_fifo() -> None:
    q = _queue()
    for i in range(100):
        q.push(Req(f"x{i}", "X", f"adapter-{i % 10}"))
    popped = _drain(q, 100)
    assert [r.adapter for r in popped[:10]] == [f"adapter-{i}" for i in range(10)]
    assert [r.adapter for r in popped[10:20]] == [f"adapter-{i}" for i in range(10)]
    for a in range(10):
        names = [r.name for r in popped if r.adapter == f"adapter-{a}"]
        assert names == [f"x{i}" for i in range(a, 100, 10)]
    assert not q and q.peek() is None


def test_tenants_alternate_while_both_have_work() -> None:
    q = _queue()
    for i in range(6):
        q.push(Req(f"x{i}", "X", "a"))
    for i in range(3):
        q.push(Req(f"y{i}", "Y", f"b{i}"))
    order = [r.name for r in _drain(q, 9)]
    assert order == ["x0", "y0", "x1", "y1", "x2", "y2", "x3", "x4", "x5"]


def test_peek_names_what_pop_takes() -> None:
    q = _queue()
    for r in (Req("x0", "X", "a"), Req("y0", "Y", "a"), Req("x1", "X", "b")):
        q.push(r)
    while q:
        head = q.peek()
        assert q.pop() is head


def test_push_front_makes_a_request_the_next_one_admitted() -> None:
    q = _queue()
    q.push(Req("x0", "X", "a"))
    q.push(Req("y0", "Y", "b"))
    q.push(Req("y1", "Y", "c"))
    preempted = Req("y-old", "Y", "c")
    q.push_front(preempted)
    assert q.pop() is preempted
    assert [r.name for r in _drain(q, 3)] == ["x0", "y0", "y1"]


def test_remove_takes_a_request_out_wherever_it_waits() -> None:
    q = _queue()
    a, b, c = Req("a", "X", "1"), Req("b", "X", "2"), Req("c", "Y", None)
    for r in (a, b, c):
        q.push(r)
    assert q.remove(b) and not q.remove(b)
    assert q.remove(c)
    assert not q.remove(Req("z", "Z", None))
    assert len(q) == 1 and q.pop() is a
    with pytest.raises(IndexError):
        q.pop()
