"""The worker's Prometheus metrics (process-wide, in the default registry).

Gauges are refreshed from stats the worker already has (the engine's last step stats and the
tier policy's byte counts) when a request ends and when WatchState polls, never from the step loop.
Tier labels are device, host, disk and object_store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from loraplex.v1 import common_pb2

if TYPE_CHECKING:
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
ADAPTER_LOOKUPS_BY_TIER = Counter(
    "loraplex_worker_adapter_lookups_by_tier_total",
    "Requests for an adapter by the fastest tier it was found in; the hit ratio of a tier is its "
    "count over the sum.",
    ["tier"],
)
ADAPTER_LOADS = Counter(
    "loraplex_worker_adapter_loads_total",
    "Adapters loaded onto the device, by the tier they came from (host, disk or object_store).",
    ["tier"],
)
ADAPTER_LOAD_SECONDS = Histogram(
    "loraplex_worker_adapter_load_seconds",
    "Time to bring an adapter onto the device (fetch, verify, parse, copy), by source tier.",
    ["tier"],
    buckets=_LATENCY_BUCKETS,
)
ADAPTER_EVICTIONS = Counter(
    "loraplex_worker_adapter_evictions_total",
    "Adapter copies freed, by tier and where they went ('host' for a demotion, else 'none').",
    ["tier", "to"],
)
RESIDENT_ADAPTER_BYTES = Gauge(
    "loraplex_worker_resident_adapter_bytes",
    "Bytes of adapters held or being loaded in each tier's budget (file bytes; disk includes "
    "adapters also in host or device).",
    ["tier"],
)
ADAPTER_BUDGET_BYTES = Gauge(
    "loraplex_worker_adapter_budget_bytes", "Each adapter tier's byte budget.", ["tier"]
)
KV_BLOCKS_USED = Gauge("loraplex_worker_kv_blocks_used", "KV cache blocks in use.")
KV_BLOCKS_TOTAL = Gauge("loraplex_worker_kv_blocks_total", "KV cache blocks the engine holds.")
QUEUE_DEPTH = Gauge("loraplex_worker_queue_depth", "Requests waiting in the engine's queue.")
RUNNING = Gauge("loraplex_worker_running", "Requests the engine is running.")
ADAPTER_SLOT_SLACK_BYTES = Gauge(
    "loraplex_worker_adapter_slot_slack_bytes", "Preallocated device adapter slot bytes not in use."
)
ADAPTER_SLOT_BYTES_COPIED = Gauge(
    "loraplex_worker_adapter_slot_bytes_copied",
    "Adapter bytes moved between device slots since start (batch membership changes, removals).",
)


def finish_label(reason: common_pb2.FinishReason.ValueType) -> str:
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def observe_engine(stats: EngineStats) -> None:
    KV_BLOCKS_USED.set(stats.kv_blocks_used)
    KV_BLOCKS_TOTAL.set(stats.kv_blocks_total)
    QUEUE_DEPTH.set(stats.waiting)
    RUNNING.set(stats.running)
    ADAPTER_SLOT_SLACK_BYTES.set(stats.slot_capacity_slack_bytes)
    ADAPTER_SLOT_BYTES_COPIED.set(stats.slot_bytes_copied_total)


def observe_adapters(resident_bytes: Mapping[str, int]) -> None:
    """Bytes per tier label, e.g. {"device": 1024, "host": 0, "disk": 4096}."""
    for tier, size in resident_bytes.items():
        RESIDENT_ADAPTER_BYTES.labels(tier=tier).set(size)
