from __future__ import annotations

from prometheus_client import REGISTRY

from loraplex.v1 import common_pb2
from services.worker import metrics
from services.worker.engine.llm_engine import EngineStats


def test_finish_reason_labels_are_short_lowercase_names() -> None:
    assert metrics.finish_label(common_pb2.FINISH_REASON_LENGTH) == "length"
    assert metrics.finish_label(common_pb2.FINISH_REASON_CANCELLED) == "cancelled"


def test_resident_bytes_are_set_per_tier_and_an_emptied_tier_reads_zero() -> None:
    metrics.observe_adapters({"device": 150, "host": 40, "disk": 7})
    sample = REGISTRY.get_sample_value
    assert sample("loraplex_worker_resident_adapter_bytes", {"tier": "device"}) == 150
    assert sample("loraplex_worker_resident_adapter_bytes", {"tier": "host"}) == 40
    assert sample("loraplex_worker_resident_adapter_bytes", {"tier": "disk"}) == 7
    metrics.observe_adapters({"device": 0, "host": 40, "disk": 7})
    assert sample("loraplex_worker_resident_adapter_bytes", {"tier": "device"}) == 0


def test_engine_stats_set_the_kv_and_queue_gauges() -> None:
    metrics.observe_engine(
        EngineStats(
            waiting=3,
            running=2,
            kv_blocks_used=40,
            kv_blocks_total=256,
            prefix_cache_hits=0,
            prefix_cache_queries=0,
            resident_adapters=1,
            preemptions=0,
        )
    )
    sample = REGISTRY.get_sample_value
    assert sample("loraplex_worker_kv_blocks_used") == 40
    assert sample("loraplex_worker_kv_blocks_total") == 256
    assert sample("loraplex_worker_queue_depth") == 3
    assert sample("loraplex_worker_running") == 2
