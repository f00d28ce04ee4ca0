"""The cold queue alone: bounds per base model, the wait budget, wake-ups by model, the pending count."""

from __future__ import annotations

import asyncio

import pytest

from services.router.cold_queue import ColdQueue, ColdQueueFull


def test_budget_is_the_wait_cap_cut_to_the_callers_deadline() -> None:
    q = ColdQueue(capacity=4, max_wait_s=120.0)
    assert q.budget(None) == 120.0
    assert q.budget(3.0) == 3.0
    assert q.budget(500.0) == 120.0
    assert q.budget(-1.0) <= 0


@pytest.mark.parametrize(("capacity", "wait_s"), [(0, 120.0), (4, 0.0)])
def test_zero_capacity_or_wait_turns_the_queue_off(capacity: int, wait_s: float) -> None:
    q = ColdQueue(capacity=capacity, max_wait_s=wait_s)
    assert not q.enabled
    assert q.budget(None) == 0.0


def test_capacity_is_per_base_model_and_pending_is_reported() -> None:
    seen: list[tuple[str, int]] = []
    q = ColdQueue(capacity=2, max_wait_s=10.0, on_pending=lambda m, n: seen.append((m, n)))
    a1, a2 = q.enter("a"), q.enter("a")
    with pytest.raises(ColdQueueFull) as full:
        q.enter("a")
    assert full.value.waiting == 2 and "'a'" in str(full.value)
    b = q.enter("b")  # another model's queue is not full
    assert (q.pending("a"), q.pending("b")) == (2, 1)
    q.leave(a1)
    q.leave(a1)  # idempotent: a request leaves once
    assert q.pending("a") == 1
    q.enter("a")  # room again
    q.leave(a2)
    q.leave(b)
    assert q.pending("b") == 0 and q.models() == ["a"]
    assert seen == [("a", 1), ("a", 2), ("b", 1), ("a", 1), ("a", 2), ("a", 1), ("b", 0)]


async def test_wake_releases_only_that_models_waiters() -> None:
    q = ColdQueue(capacity=8, max_wait_s=10.0)
    a = [q.enter("a") for _ in range(3)]
    b = q.enter("b")
    waits = [asyncio.create_task(w.wait(5.0)) for w in a]
    other = asyncio.create_task(b.wait(0.2))
    await asyncio.sleep(0)
    assert q.wake("a") == 3
    assert await asyncio.gather(*waits) == [True, True, True]
    assert await other is False  # timed out: nothing came up for b


async def test_a_wake_before_the_wait_is_not_lost_and_is_consumed_once() -> None:
    q = ColdQueue(capacity=1, max_wait_s=10.0)
    w = q.enter("a")
    q.wake("a")  # the worker came up between routing and waiting
    assert await w.wait(1.0) is True
    assert await w.wait(0.05) is False
