"""The worker's Prometheus metrics (process-wide, in the default registry).

Gauges are refreshed from stats the worker already has (the engine's last step stats and the
loader's held adapters) when a request ends and when WatchState polls, never from the step loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from loraplex.v1 import common_pb2

if TYPE_CHECKING:  # the loader records loads here, so importing it at runtime would be circular
    from services.worker.adapter_loader import HeldAdapter
    from services.worker.engine.llm_engine import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

TTFT = Histogram(
    "loraplex_worker_ttft_seconds",
    "Time from a Generate call's arrival at the worker to its first token (adapter load included).",
    buckets=_LATENCY_BUCKETS,
)
TPOT = Histogram(
    "loraplex_worker_tpot_seconds",
    "Mean time per output token after the first, one sample per request with two or more tokens.",
    buckets=_TPOT_BUCKETS,
)
QUEUE = Histogram(
    "loraplex_worker_queue_seconds",
    "Time a request waited in the engine's queue between admission and its first schedule.",
    buckets=_LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "loraplex_worker_requests_total",
    "Generate streams that reached the engine, by finish reason ('cancelled' when the client left).",
    ["finish_reason"],
)
ADAPTER_LOOKUPS = Counter(
    "loraplex_worker_adapter_lookups_total",
    "Requests for an adapter: 'hit' when it was already on the device, else 'miss'.",
    ["result"],
)
ADAPTER_LOADS = Counter(
    "loraplex_worker_adapter_loads_total",
    "Adapters loaded onto the device, by the tier they came from (disk cache or object store).",
    ["tier"],
)
ADAPTER_LOAD_SECONDS = Histogram(
    "loraplex_worker_adapter_load_seconds",
    "Time to bring an adapter onto the device (fetch, verify, parse, copy), by source tier.",
    ["tier"],
    buckets=_LATENCY_BUCKETS,
)
RESIDENT_ADAPTER_BYTES = Gauge(
    "loraplex_worker_resident_adapter_bytes",
    "Bytes of adapters held at each tier (device: parsed weights; disk: cached files not on device).",
    ["tier"],
)
KV_BLOCKS_USED = Gauge("loraplex_worker_kv_blocks_used", "KV cache blocks in use.")
KV_BLOCKS_TOTAL = Gauge("loraplex_worker_kv_blocks_total", "KV cache blocks the engine holds.")
QUEUE_DEPTH = Gauge("loraplex_worker_queue_depth", "Requests waiting in the engine's queue.")
RUNNING = Gauge("loraplex_worker_running", "Requests the engine is running.")


def finish_label(reason: common_pb2.FinishReason.ValueType) -> str:
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def observe_engine(stats: EngineStats) -> None:
    KV_BLOCKS_USED.set(stats.kv_blocks_used)
    KV_BLOCKS_TOTAL.set(stats.kv_blocks_total)
    QUEUE_DEPTH.set(stats.waiting)
    RUNNING.set(stats.running)


def observe_adapters(held: Iterable[HeldAdapter]) -> None:
    totals = {"device": 0, "disk": 0}
    for adapter in held:
        if adapter.tier.value in totals:
            totals[adapter.tier.value] += adapter.size_bytes
    for tier, size in totals.items():
        RESIDENT_ADAPTER_BYTES.labels(tier=tier).set(size)
