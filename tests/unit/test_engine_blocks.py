"""Block manager and scheduler: pure bookkeeping, no model."""

from __future__ import annotations

from pathlib import Path

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig
from services.worker.engine.prefix_keys import block_keys
from services.worker.engine.sampling import SamplingParams
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.sequence import Sequence


def _seq(rid: str, tokens: list[int], adapter: str | None = None, tenant: str = "") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), adapter, tenant)


def _compute(bm: BlockManager, seq: Sequence) -> None:
    """Pretend a step computed the whole prompt."""
    bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = len(seq)
    bm.register_full_blocks(seq)


def test_same_adapter_and_prefix_reuses_full_blocks_but_recomputes_the_last_token() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _seq("a", list(range(10)), "x")
    bm.reuse_prefix(first)
    _compute(bm, first)
    second = _seq("b", [*range(8), 99, 98], "x")
    bm.reuse_prefix(second)
    assert second.num_cached_tokens == 8
    assert second.block_table == first.block_table[:2]
    exact = _seq("c", list(range(8)), "x")  # prompt of exactly two blocks: the last block is recomputed
    bm.reuse_prefix(exact)
    assert exact.num_cached_tokens == 4
    assert bm.prefix_hits == 3


def test_same_prefix_under_another_adapter_reuses_nothing() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _seq("a", list(range(10)), "x")
    bm.reuse_prefix(first)
    _compute(bm, first)
    for adapter in ("y", None):
        other = _seq(f"o-{adapter}", list(range(10)), adapter)
        bm.reuse_prefix(other)
        assert other.num_cached_tokens == 0
    assert bm.prefix_hits == 0


def test_same_prefix_from_another_tenant_reuses_nothing_and_counts_no_cached_tokens() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    for adapter in (None, "x"):
        first = _seq(f"a-{adapter}", list(range(10)), adapter, tenant="tenant-a")
        bm.reuse_prefix(first)
        _compute(bm, first)
        bm.free_sequence(first)  # freed blocks keep their keys: still findable by tenant A
        other = _seq(f"b-{adapter}", list(range(10)), adapter, tenant="tenant-b")
        bm.reuse_prefix(other)
        assert other.num_cached_tokens == 0 and not other.block_table
        again = _seq(f"a2-{adapter}", list(range(10)), adapter, tenant="tenant-a")
        bm.reuse_prefix(again)
        assert again.num_cached_tokens == 8
        bm.free_sequence(again)
    assert bm.prefix_hits == 4


def test_block_keys_are_the_sha256_chain_of_the_sequence() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    seq = _seq("a", list(range(13)), "x", tenant="t")
    bm.reuse_prefix(seq)
    _compute(bm, seq)
    assert seq.block_keys == block_keys("t", "x", list(range(13)), 4)
    assert [bm.key_to_block[k] for k in seq.block_keys] == seq.block_table[:3]


def test_freed_blocks_return_to_the_free_list_and_keep_serving_prefix_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = _seq("a", list(range(9)))
    bm.reuse_prefix(first)
    _compute(bm, first)
    assert bm.num_free == 5
    bm.free_sequence(first)
    assert bm.num_free == 8
    again = _seq("b", list(range(9)))
    bm.reuse_prefix(again)
    assert again.num_cached_tokens == 8


def _config(max_batch_size: int, max_step_tokens: int) -> EngineConfig:
    return EngineConfig(model_dir=Path("."), max_batch_size=max_batch_size, max_step_tokens=max_step_tokens)


def test_one_adapters_burst_does_not_starve_the_others() -> None:
    bm = BlockManager(num_blocks=1000, block_size=4)
    sched = Scheduler(_config(max_batch_size=4, max_step_tokens=64), bm)
    for i in range(20):
        sched.add(_seq(f"burst-{i}", [1, 2, 3], "burst"))
    sched.add(_seq("quiet-0", [1, 2, 3], "quiet"))
    sched.add(_seq("base-0", [1, 2, 3], None))
    batch = sched.schedule()
    ids = [s.request_id for s in batch.seqs]
    assert "quiet-0" in ids and "base-0" in ids
    assert len(ids) == 4


def test_one_tenants_burst_over_many_adapters_does_not_starve_another_tenant() -> None:
    bm = BlockManager(num_blocks=1000, block_size=4)
    sched = Scheduler(_config(max_batch_size=2, max_step_tokens=64), bm)
    for i in range(100):
        sched.add(_seq(f"x-{i}", [1, 2, 3], f"adapter-{i % 10}", tenant="X"))
    sched.add(_seq("y-0", [1, 2, 3], None, tenant="Y"))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["x-0", "y-0"]
    assert sched.num_waiting == 99
    # Within tenant X the adapters still take turns as room frees up.
    admitted = []
    for _ in range(10):
        for seq in list(sched.running):
            sched.remove(seq)
        admitted += [s.adapter for s in sched.schedule().seqs]
    assert admitted[:10] == [f"adapter-{i}" for i in range(1, 10)] + ["adapter-0"]


def test_prefill_and_decode_share_the_step_token_budget() -> None:
    bm = BlockManager(num_blocks=1000, block_size=4)
    sched = Scheduler(_config(max_batch_size=8, max_step_tokens=10), bm)
    sched.add(_seq("long", list(range(25))))
    batch = sched.schedule()
    assert batch.num_tokens == [10]  # chunked prefill
    batch.seqs[0].num_computed_tokens += 10
    sched.add(_seq("short", [1, 2, 3]))
    batch = sched.schedule()
    assert batch.num_tokens == [10]  # the running chunk goes first and uses the whole budget
    batch.seqs[0].num_computed_tokens += 10
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["long", "short"]
    assert batch.num_tokens == [5, 3]


def test_running_out_of_blocks_preempts_the_newest_and_requeues_it() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(_config(max_batch_size=8, max_step_tokens=64), bm)
    old, new = _seq("old", list(range(8))), _seq("new", list(range(50, 58)))
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert bm.num_free == 0
    for s, n in zip(batch.seqs, batch.num_tokens, strict=True):
        s.num_computed_tokens += n
        s.token_ids.append(7)  # the sampled token needs a new block
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["old"]
    assert new.num_computed_tokens == 0 and not new.block_table
    assert sched.num_waiting == 1
