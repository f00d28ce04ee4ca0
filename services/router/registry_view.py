"""The router's cached view of the registry: API keys, tenants' limits, adapters and base models.

- API keys: a confirmed key is trusted for `auth_ttl_s`, an unknown key is refused from cache for
  `negative_ttl_s`. A revocation reaches the router through the change feed (WatchAdapters) and
  drops the key at once (well under a second while the registry is reachable); `auth_ttl_s` only
  bounds how long a revocation the feed missed can go unseen. While the registry is unreachable, a
  key it confirmed within `stale_s` keeps working, so an outage of the control plane does not take
  the data plane down with it; a key the feed reported revoked is never served from that cache.
- Tenants: the name and limits come with each authentication, and limit changes through the
  change feed; the newest revision wins.
- Adapters: resolved per (tenant, reference) and kept until the registry's change feed
  (WatchAdapters, resumed from the last revision after a reconnect) reports a change to that
  adapter name, or `adapter_ttl_s` passes. While the registry is unreachable, resolved adapters keep
  being served from the cache whatever their age. Listeners (`add_listener`) see every change too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import common_pb2, registry_pb2, registry_pb2_grpc, usage_pb2, usage_pb2_grpc
from services.common.auth import hash_api_key
from services.router.limits import NO_LIMITS, TenantLimits

log = logging.getLogger(__name__)

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 5.0
MAX_ENTRIES = 100_000
# gRPC's default reconnect backoff grows to 120 s: a registry back after a 20 s outage would go
# unnoticed for as long again, while the spool fills and client-chosen ids cannot be checked.
# One connection attempt a second per router to a registry that is down costs nothing.
RECONNECT_MAX_BACKOFF_MS = 1000
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_BACKOFF_MS),
)
# The retry pushback on a refusal that lasts until the registry answers (an unchecked request
# id, a full spool): the router tries to reconnect at least this often, so a client asking again
# after it loses at most one reconnect interval to the registry's return.
UNAVAILABLE_PUSHBACK_MS = RECONNECT_MAX_BACKOFF_MS


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str
    tenant_name: str = ""
    limits: TenantLimits = NO_LIMITS


@dataclass(frozen=True)
class _TenantInfo:
    revision: int
    name: str
    limits: TenantLimits


class Unauthenticated(Exception):
    pass


class AdapterNotFound(Exception):
    pass


class AdapterNotServable(Exception):
    """The adapter exists but is not READY (validating, failed or archived)."""


class RegistryUnavailable(Exception):
    pass


class BadReference(ValueError):
    pass


K = TypeVar("K")
V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    fetched_at: float


class _Cache(Generic[K, V]):
    """A bounded map of entries with their fetch time; the oldest insert goes first when full."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._data: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._max = max_entries

    def get(self, key: K) -> _Entry[V] | None:
        return self._data.get(key)

    def put(self, key: K, value: V, now: float) -> None:
        self._data[key] = _Entry(value, now)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()


class RegistryView:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        auth_ttl_s: float = 30.0,
        negative_ttl_s: float = 2.0,
        stale_s: float = 300.0,
        adapter_ttl_s: float = 300.0,
        base_models_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = registry_pb2_grpc.AdapterRegistryServiceStub(channel)
        self._usage = usage_pb2_grpc.UsageServiceStub(channel)
        self._auth_ttl = auth_ttl_s
        self._negative_ttl = negative_ttl_s
        self._stale = stale_s
        self._adapter_ttl = adapter_ttl_s
        self._base_ttl = base_models_ttl_s
        self._clock = clock
        self._keys: _Cache[str, Principal | None] = _Cache()
        # Key ids the change feed reported revoked (refused even from the stale cache), and the
        # cache key (secret hash) of each confirmed key id, so a revocation can drop its entry.
        self._revoked: _Cache[str, None] = _Cache()
        self._hash_of: _Cache[str, str] = _Cache()
        self._tenants: dict[str, _TenantInfo] = {}
        self._key_epoch = 0  # bumped by every revocation, like _epoch for adapters
        self._adapters: _Cache[tuple[str, str], registry_pb2.Adapter] = _Cache()
        # (tenant_id, adapter name) -> cache keys resolved to a version of that name.
        self._by_name: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._base_models: _Entry[dict[str, registry_pb2.BaseModel]] | None = None
        # Bumped by every invalidation, so a lookup that raced one does not cache what it fetched.
        self._epoch = 0
        self._inflight: dict[object, asyncio.Future[object]] = {}
        self.revision = 0
        self.watch_connected = asyncio.Event()
        # Called with every adapter the change feed reports (the keep-warm scheduler listens).
        self._listeners: list[Callable[[registry_pb2.Adapter], None]] = []

    # -- API keys ----------------------------------------------------------------------------

    async def authenticate(self, secret: str) -> Principal:
        key = hash_api_key(secret)
        now = self._clock()
        entry = self._keys.get(key)
        if entry is not None:
            ttl = self._auth_ttl if entry.value is not None else self._negative_ttl
            if now - entry.fetched_at < ttl:
                return self._current(entry.value)
        epoch = self._key_epoch
        try:
            principal = await self._single_flight(("key", key), lambda: self._fetch_key(secret))
        except RegistryUnavailable:
            if entry is not None and now - entry.fetched_at < self._stale:
                # Served stale only if it was good when last seen (and not revoked since); a key
                # last seen unknown or revoked stays refused.
                return self._current(entry.value)
            raise
        # A revocation that arrived while the lookup ran is not undone by caching its answer.
        if epoch == self._key_epoch or principal is None:
            self._keys.put(key, principal, self._clock())
            if principal is not None:
                self._hash_of.put(principal.key_id, key, 0.0)
        return self._current(principal)

    def _current(self, principal: Principal | None) -> Principal:
        """The principal with its tenant's newest limits, unless the key is unknown or revoked."""
        if principal is None or self._revoked.get(principal.key_id) is not None:
            raise Unauthenticated("the API key is unknown or revoked")
        info = self._tenants.get(principal.tenant_id)
        if info is None or (info.name == principal.tenant_name and info.limits == principal.limits):
            return principal
        return Principal(principal.tenant_id, principal.key_id, info.name, info.limits)

    def revoke(self, key_id: str) -> None:
        """The change feed reported this key revoked: refuse it from now on, cached or not."""
        self._key_epoch += 1
        self._revoked.put(key_id, None, 0.0)
        hashed = self._hash_of.get(key_id)
        if hashed is not None:
            # Remembered as refused, so not even the stale-while-down path can serve it.
            self._keys.put(hashed.value, None, self._clock())
            self._hash_of.pop(key_id)

    def update_tenant(self, tenant: registry_pb2.Tenant) -> None:
        """Keeps the newest name and limits of a tenant (by change-feed revision)."""
        known = self._tenants.get(tenant.tenant_id)
        if known is not None and known.revision > tenant.revision:
            return
        lim = tenant.limits
        self._tenants[tenant.tenant_id] = _TenantInfo(
            tenant.revision,
            tenant.name,
            TenantLimits(lim.requests_per_s, lim.tokens_per_min, lim.max_concurrent, lim.monthly_tokens),
        )

    async def _fetch_key(self, secret: str) -> Principal | None:
        try:
            resp = await self._stub.AuthenticateApiKey(
                registry_pb2.AuthenticateApiKeyRequest(secret=secret),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return None
            raise _unavailable("authenticate the API key", exc) from exc
        if resp.HasField("tenant"):
            self.update_tenant(resp.tenant)
        return Principal(resp.tenant_id, resp.key_id)

    # -- request ids -------------------------------------------------------------------------

    async def request_ids_used(self, tenant_id: str, request_ids: list[str], window_s: int) -> set[str]:
        """The ids among `request_ids` the tenant has a ledger record for, finished within
        `window_s`. Never cached: the answer changes as the shipper delivers records."""
        try:
            resp = await self._usage.LookupRequests(
                usage_pb2.LookupRequestsRequest(
                    tenant_id=tenant_id, request_ids=request_ids, window_s=window_s
                ),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("check whether the request id was already used", exc) from exc
        return set(resp.found)

    # -- adapters ----------------------------------------------------------------------------

    async def resolve_adapter(self, tenant_id: str, reference: str) -> registry_pb2.Adapter:
        """The READY adapter version `reference` ("name", "name@version" or id) of this tenant."""
        cache_key = (tenant_id, reference)
        now = self._clock()
        entry = self._adapters.get(cache_key)
        if entry is not None and now - entry.fetched_at < self._adapter_ttl:
            return _servable(entry.value, reference)
        epoch = self._epoch
        try:
            adapter = await self._single_flight(
                ("adapter", cache_key), lambda: self._fetch_adapter(tenant_id, reference)
            )
        except RegistryUnavailable:
            if entry is not None:
                return _servable(entry.value, reference)
            raise
        if adapter.ref.tenant_id != tenant_id:
            # Defence in depth: the registry scopes by tenant, and this must never leak across.
            raise AdapterNotFound(f"adapter {reference!r} not found")
        if epoch == self._epoch:
            self._adapters.put(cache_key, adapter, self._clock())
            self._by_name.setdefault((tenant_id, adapter.ref.name), set()).add(cache_key)
        return _servable(adapter, reference)

    async def _fetch_adapter(self, tenant_id: str, reference: str) -> registry_pb2.Adapter:
        try:
            resp = await self._stub.GetAdapter(
                registry_pb2.GetAdapterRequest(tenant=tenant_id, adapter=reference),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise AdapterNotFound(f"adapter {reference!r} not found") from None
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # The tenant's own name with no READY version: the registry lists its versions.
                raise AdapterNotServable(exc.details() or f"adapter {reference!r} is not ready") from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise BadReference(exc.details() or f"bad adapter reference {reference!r}") from None
            raise _unavailable("resolve the adapter", exc) from exc
        return resp.adapter

    def invalidate(self, adapter: registry_pb2.Adapter) -> None:
        """Forgets every cached resolution of this adapter's name in its tenant."""
        self._epoch += 1
        for cache_key in self._by_name.pop((adapter.ref.tenant_id, adapter.ref.name), ()):
            self._adapters.pop(cache_key)
        self._adapters.pop((adapter.ref.tenant_id, adapter.ref.adapter_id))

    async def list_ready_adapters(self, tenant_id: str) -> list[registry_pb2.Adapter]:
        """The tenant's READY adapters, latest version per name (ListModels; not on the hot path)."""
        latest: dict[tuple[str, str], registry_pb2.Adapter] = {}
        token = ""
        try:
            while True:
                resp = await self._stub.ListAdapters(
                    registry_pb2.ListAdaptersRequest(
                        tenant=tenant_id,
                        status=common_pb2.ADAPTER_STATUS_READY,
                        page_size=1000,
                        page_token=token,
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                for a in resp.adapters:
                    k = (a.ref.base_model, a.ref.name)
                    if k not in latest or latest[k].ref.version < a.ref.version:
                        latest[k] = a
                token = resp.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("list adapters", exc) from exc
        return sorted(latest.values(), key=lambda a: (a.ref.base_model, a.ref.name))

    # -- usage -------------------------------------------------------------------------------

    async def month_usage(self, tenant_id: str, since: float) -> int:
        """Input + output tokens the ledger holds for this tenant with finished_at >= `since` (epoch s)."""
        start = Timestamp()
        start.FromNanoseconds(int(since * 1e9))
        try:
            resp = await self._usage.TenantTokens(
                usage_pb2.TenantTokensRequest(tenant_id=tenant_id, since=start), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("read the month-to-date usage", exc) from exc
        return resp.tokens

    # -- base models -------------------------------------------------------------------------

    async def base_models(self) -> dict[str, registry_pb2.BaseModel]:
        now = self._clock()
        cached = self._base_models
        if cached is not None and now - cached.fetched_at < self._base_ttl:
            return cached.value
        try:
            models = await self._single_flight(("base_models",), self._fetch_base_models)
        except RegistryUnavailable:
            if cached is not None:
                return cached.value
            raise
        self._base_models = _Entry(models, self._clock())
        return models

    async def _fetch_base_models(self) -> dict[str, registry_pb2.BaseModel]:
        try:
            resp = await self._stub.ListBaseModels(
                registry_pb2.ListBaseModelsRequest(), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("list base models", exc) from exc
        return {m.name: m for m in resp.base_models}

    # -- change feed -------------------------------------------------------------------------

    def apply_change(self, change: registry_pb2.WatchAdaptersResponse) -> None:
        """One change-feed event: an adapter change, an API-key revocation or a tenant's new limits."""
        if change.HasField("revoked_api_key"):
            self.revoke(change.revoked_api_key.key_id)
        elif change.HasField("tenant"):
            self.update_tenant(change.tenant)
        elif change.HasField("adapter"):
            self.invalidate(change.adapter)
            for listener in self._listeners:
                listener(change.adapter)
        self.revision = max(self.revision, change.revision)

    def add_listener(self, listener: Callable[[registry_pb2.Adapter], None]) -> None:
        """`listener` sees every adapter change, replayed from revision 0 at start; it must not block."""
        self._listeners.append(listener)

    async def watch_adapters(self, *, max_backoff_s: float = 10.0) -> None:
        """Runs until cancelled: applies every change (adapters, revocations, limits); reconnects."""
        backoff = 0.1
        while True:
            try:
                call = self._stub.WatchAdapters(
                    registry_pb2.WatchAdaptersRequest(since_revision=self.revision)
                )
                await call.wait_for_connection()
                self.watch_connected.set()
                async for change in call:
                    self.apply_change(change)
                    backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "adapter change feed lost (%s: %s); reconnecting in %.1fs from revision %d",
                    exc.code().name,
                    exc.details(),
                    backoff,
                    self.revision,
                )
            self.watch_connected.clear()
            # Changes missed while disconnected are replayed on resume; until then, cached
            # resolutions may be stale, so new lookups go to the registry when it answers.
            await asyncio.sleep(backoff)
            backoff = min(max_backoff_s, backoff * 2)

    # -- helpers -----------------------------------------------------------------------------

    async def _single_flight(self, key: object, fetch: Callable[[], Awaitable[V]]) -> V:
        """Concurrent lookups of one key share one registry call."""
        pending = self._inflight.get(key)
        if pending is not None:
            return cast(V, await asyncio.shield(pending))
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value = await fetch()
        except BaseException as exc:
            # A cancelled leader must not look like a cancelled client to the followers.
            shared = (
                RegistryUnavailable("the registry lookup was interrupted")
                if isinstance(exc, asyncio.CancelledError)
                else exc
            )
            fut.set_exception(shared)
            fut.exception()  # mark retrieved: nobody may be waiting
            raise
        else:
            fut.set_result(value)
            return value
        finally:
            del self._inflight[key]


def _servable(adapter: registry_pb2.Adapter, reference: str) -> registry_pb2.Adapter:
    if adapter.status != common_pb2.ADAPTER_STATUS_READY:
        status = common_pb2.AdapterStatus.Name(adapter.status).removeprefix("ADAPTER_STATUS_").lower()
        raise AdapterNotServable(f"adapter {reference!r} is {status}, not ready; it cannot be served")
    return adapter


def _unavailable(what: str, exc: grpc.aio.AioRpcError) -> Exception:
    if exc.code() in _UNREACHABLE:
        return RegistryUnavailable(f"the registry is unreachable; cannot {what}")
    # Anything else (a misconfigured admin token, an internal error) is also a registry problem
    # the client cannot fix; report it as unavailable and log the real cause.
    log.error("registry call to %s failed: %s %s", what, exc.code().name, exc.details())
    return RegistryUnavailable(f"the registry could not {what}")
