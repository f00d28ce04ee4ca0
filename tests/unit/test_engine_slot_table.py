"""The slot table: occupied slots dense, the step's adapters at the front, swaps only for changes."""

from __future__ import annotations

import random

import pytest

from services.worker.engine.slot_table import SlotTable


def filled(n: int, chunk: int = 4) -> SlotTable:
    table = SlotTable(chunk=chunk)
    for i in range(n):
        assert table.add(f"a{i}") == i
    return table


def check_dense(table: SlotTable) -> None:
    assert sorted(table.slot(d) for d in table.digests) == list(range(len(table)))
    assert all(table.slot(d) == i for i, d in enumerate(table.digests))
    assert 0 <= table.members <= len(table) <= table.capacity


def apply(layout: list[str | None], swaps: list[tuple[int, int]]) -> None:
    for i, j in swaps:
        layout[i], layout[j] = layout[j], layout[i]


def test_new_adapters_take_the_first_free_slot_and_capacity_grows_by_chunks() -> None:
    table = filled(4, chunk=4)
    assert table.capacity == 4 and table.slack == 0
    table.add("a4")
    assert (table.capacity, table.slack, table.slot("a4")) == (8, 3, 4)
    with pytest.raises(ValueError, match="already has slot"):
        table.add("a4")


def test_growth_is_a_fraction_of_capacity_beyond_the_chunk_so_big_pools_regrow_rarely() -> None:
    table = SlotTable(chunk=8)
    capacities = set()
    for i in range(2000):
        table.add(f"a{i}")
        capacities.add(table.capacity)
    assert len(capacities) < 40  # not 2000 / 8 = 250 regrows
    assert table.slack <= table.growth()


def test_removal_moves_the_last_slot_into_the_hole() -> None:
    table = filled(5)
    assert table.remove("a1") == [(4, 1)]
    assert table.digests == ["a0", "a4", "a2", "a3"]
    assert table.remove("a3") == []  # the last slot: nothing moves
    check_dense(table)


def test_removing_a_step_member_keeps_members_and_slots_dense() -> None:
    table = filled(6)
    table.arrange({"a0", "a1", "a2"})
    assert table.members == 3
    moves = table.remove("a0")
    assert moves == [(2, 0), (5, 2)]  # the last member fills the hole, the last slot fills its place
    assert table.members == 2 and set(table.digests[:2]) == {"a1", "a2"}
    check_dense(table)


def test_capacity_is_trimmed_when_slack_exceeds_a_growth_step() -> None:
    table = filled(12, chunk=4)
    assert table.capacity == 12
    for i in range(11, 6, -1):
        table.remove(f"a{i}")
        assert table.slack <= table.growth()
    assert len(table) == 7 and table.capacity == 8


def test_steady_steps_swap_nothing_and_a_change_swaps_only_the_changed_adapters() -> None:
    table = filled(40)
    step = {f"a{i}" for i in range(5, 37)}  # 32 running adapters, not at the front yet
    table.arrange(step)
    assert set(table.digests[:32]) == step
    assert table.arrange(step) == []  # steady decoding
    # One finishes, another joins: one swap, the joiner takes the leaver's slot.
    leaver, joiner = "a10", "a38"
    where = table.slot(leaver)
    swaps = table.arrange((step - {leaver}) | {joiner})
    assert swaps == [(where, table.slot(leaver))] and table.slot(joiner) == where
    # Only leaving: the leaver trades places with the last member.
    swaps = table.arrange((step - {leaver, "a20"}) | {joiner})
    assert len(swaps) <= 1 and table.members == 31
    check_dense(table)


def test_random_membership_and_removals_keep_the_invariants() -> None:
    rng = random.Random(7)
    table = SlotTable(chunk=4)
    layout: list[str | None] = []  # what a buffer would hold, slot by slot
    names = [f"a{i}" for i in range(60)]
    for _ in range(400):
        op = rng.random()
        resident = list(table.digests)
        if op < 0.3 or not resident:
            free = [n for n in names if n not in table]
            if free:
                d = rng.choice(free)
                slot = table.add(d)
                layout[len(layout) :] = [None] * (table.capacity - len(layout))
                layout[slot] = d
        elif op < 0.45:
            d = rng.choice(resident)
            for src, dst in table.remove(d):
                layout[dst] = layout[src]
            layout[len(table) :] = [None] * (len(layout) - len(table))
        else:
            step = set(rng.sample(resident, rng.randint(0, len(resident))))
            before = set(table.digests[: table.members])
            swaps = table.arrange(step)
            apply(layout, swaps)
            assert set(table.digests[: table.members]) == step
            assert len(swaps) <= len(step ^ before)  # only changed adapters move
        check_dense(table)
        assert layout[: len(table)] == table.digests
        assert table.slack <= table.growth()
