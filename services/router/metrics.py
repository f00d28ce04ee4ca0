"""The router's Prometheus metrics (process-wide, in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "loraplex_router_requests_total",
    "Generate requests by adapter version id ('' for the bare base model) and final status code.",
    ["adapter", "code"],
)
ROUTING = Counter(
    "loraplex_router_routing_decisions_total",
    "Routing decisions by why the first candidate was chosen.",
    ["reason"],
)
FAILOVERS = Counter(
    "loraplex_router_failovers_total",
    "Requests moved to another worker before their first token, by the worker's status code.",
    ["code"],
)
# The three per-base-model gauges an autoscaler scales a model's workers on (KEDA sums them over
# routers): requests held for want of a worker, requests past that point, and the workers serving.
INFLIGHT = Gauge(
    "loraplex_router_inflight_requests",
    "Generate requests in progress at this router, by base model (not counting pending ones).",
    ["base_model"],
)
PENDING = Gauge(
    "loraplex_router_pending_requests",
    "Generate requests held because their base model has no live worker (the cold queue).",
    ["base_model"],
)
COLD_WAIT = Histogram(
    "loraplex_router_cold_wait_seconds",
    "How long requests waited in the cold queue for their base model's first worker.",
    ["base_model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120),
)
REJECTED = Counter(
    "loraplex_router_rejected_total",
    "Requests refused before reaching a worker, by reason.",
    ["reason"],
)
TTFT = Histogram(
    "loraplex_router_ttft_seconds",
    "Time from the request's arrival at the router to its first token.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SPOOL_BYTES = Gauge("loraplex_router_spool_bytes", "Bytes of usage records waiting in the local spool.")
SPOOL_FULL = Gauge(
    "loraplex_router_spool_full", "1 while the spool is over its cap and new requests are refused."
)
SPOOL_WRITE_ERRORS = Counter(
    "loraplex_router_spool_write_errors_total", "Usage records that could not be written to the spool."
)
WORKER_USAGE_MISMATCH = Counter(
    "loraplex_router_worker_usage_mismatch_total",
    "Finished streams whose worker reported another output token count than the router forwarded"
    " (the router bills its own count).",
)
SHIPPED = Counter("loraplex_router_usage_shipped_total", "Usage records acknowledged by the registry.")
SHIP_FAILURES = Counter("loraplex_router_usage_ship_failures_total", "RecordUsage batches that failed.")
QUARANTINED = Counter(
    "loraplex_router_usage_quarantined_total", "Usage records the registry refused as invalid (kept aside)."
)
LIVE_WORKERS = Gauge(
    "loraplex_router_live_workers",
    "Workers in routing by base model: state stream synced, heard from recently, accepting, not"
    " cooling down.",
    ["base_model"],
)
STATE_RECONNECTS = Counter(
    "loraplex_router_worker_state_reconnects_total",
    "WatchState streams re-opened, by why the last one ended (broken, ended, stale, out_of_sync).",
    ["reason"],
)
KEEP_WARM_PREFETCHES = Counter(
    "loraplex_router_keep_warm_prefetches_total",
    "PrefetchAdapter calls the keep-warm scheduler made, by outcome (ok or the status code).",
    ["outcome"],
)
EVICTION_HINTS = Counter(
    "loraplex_router_eviction_hints_total",
    "EvictAdapter calls for archived adapters, by outcome (evicted, kept, or the status code).",
    ["outcome"],
)
