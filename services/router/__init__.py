"""The router: the public InferenceService (DESIGN §1, §5, §6).

Request path: API key -> tenant (registry_view, cached) -> adapter version (registry_view, cached,
invalidated by the registry's change feed) -> candidates (policy, pure) -> worker stream proxied
as raw bytes (servicer) -> one usage record, fsynced into the local spool before the client sees
the end of the stream (metering, spool) -> shipped to UsageService.RecordUsage (shipper).

Operational guarantees:
- A revoked API key stops working within LORAPLEX_AUTH_CACHE_TTL_S (default 30 s); an unknown key
  is refused from cache for LORAPLEX_AUTH_NEGATIVE_TTL_S (2 s), so a newly created key works
  within that time. While the registry is unreachable, keys it confirmed within
  LORAPLEX_AUTH_STALE_S (300 s; 0 turns this off) keep working, and so do adapters resolved
  before the outage; nothing new can be resolved until it is back.
- Usage: one record per request whose worker started (completed, cancelled, or failed after
  tokens), keyed by the request id the client sent (unchanged) or a fresh UUID. The registry
  ignores duplicates, so replays after a crash never double-bill. When the spool exceeds
  LORAPLEX_ROUTER_SPOOL_MAX_BYTES (1 GiB), new requests get UNAVAILABLE rather than go unbilled
  (log line + loraplex_router_spool_full gauge).
"""
