"""The adapter-on-worker state machine: one table, illegal moves refused, every move counted."""

from __future__ import annotations

import itertools

import pytest

from services.worker.tiers import AdapterState, IllegalTransition, Lifecycle, TierBudgets, TierPolicy
from services.worker.tiers.states import IN_PROGRESS, TRANSITIONS

S = AdapterState


def test_every_state_has_a_row_and_every_load_in_progress_can_fail() -> None:
    assert set(TRANSITIONS) == set(AdapterState)
    for state in IN_PROGRESS:
        assert S.FAILED in TRANSITIONS[state]
    assert all(S.FAILED not in TRANSITIONS[s] for s in (S.ON_DISK, S.IN_HOST, S.ON_DEVICE))


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.ABSENT, S.ON_DEVICE),  # no skipping the download
        (S.DOWNLOADING, S.ON_DEVICE),
        (S.ON_DEVICE, S.LOADING_DEVICE),
        (S.ON_DEVICE, S.FAILED),  # a resident adapter does not fail; its load did
        (S.FAILED, S.ON_DEVICE),
        (S.IN_HOST, S.IN_HOST),
    ],
)
def test_illegal_transitions_are_refused_and_not_counted(src: S, dst: S) -> None:
    life = Lifecycle()
    with pytest.raises(IllegalTransition):
        life.move("d" * 64, src, dst)
    assert not life.counts


def test_legal_transitions_are_counted_per_pair() -> None:
    life = Lifecycle()
    path = [S.ABSENT, S.QUEUED, S.DOWNLOADING, S.ON_DISK, S.LOADING_DEVICE, S.ON_DEVICE, S.IN_HOST]
    for a, b in itertools.pairwise(path):
        assert life.move("d" * 64, a, b) == b
    life.move("e" * 64, S.ON_DEVICE, S.IN_HOST)
    assert life.counts[(S.ON_DEVICE, S.IN_HOST)] == 2
    assert life.as_dict()["absent->queued"] == 1 and sum(life.counts.values()) == 7


def test_the_policy_records_a_cold_load_and_its_eviction_as_transitions() -> None:
    policy = TierPolicy(TierBudgets(10, 0, 100), float("inf"), lambda: 0.0)
    for digest in ("a", "b"):
        plan = policy.access(digest, 10, device_bytes=10)
        for load in plan.loads:
            policy.on_loaded(digest, load.dst)
        policy.unpin(digest)
    assert policy.lifecycle.as_dict() == {
        "absent->queued": 2,
        "downloading->on_disk": 2,
        "loading_device->on_device": 2,
        "on_device->on_disk": 1,
        "on_disk->loading_device": 2,
        "queued->downloading": 2,
    }
