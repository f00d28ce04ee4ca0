"""The router's cached view of the registry: API keys, adapters and base models.

- API keys: a confirmed key is trusted for `auth_ttl_s` (so a revoked key stops working here
  within that time), an unknown key is refused from cache for `negative_ttl_s`. While the registry
  is unreachable, a key it confirmed within `stale_s` keeps working, so an outage of the control
  plane does not take the data plane down with it.
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

from loraplex.v1 import common_pb2, registry_pb2, registry_pb2_grpc, usage_pb2, usage_pb2_grpc
from services.common.auth import hash_api_key

log = logging.getLogger(__name__)

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 5.0
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str


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
                return _principal_or_raise(entry.value)
        try:
            principal = await self._single_flight(("key", key), lambda: self._fetch_key(secret))
        except RegistryUnavailable:
            if entry is not None and entry.value is not None and now - entry.fetched_at < self._stale:
                return entry.value
            raise
        self._keys.put(key, principal, self._clock())
        return _principal_or_raise(principal)

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

    def add_listener(self, listener: Callable[[registry_pb2.Adapter], None]) -> None:
        """`listener` sees every adapter change, replayed from revision 0 at start; it must not block."""
        self._listeners.append(listener)

    async def watch_adapters(self, *, max_backoff_s: float = 10.0) -> None:
        """Runs until cancelled: applies adapter changes, reconnecting with backoff."""
        backoff = 0.1
        while True:
            try:
                call = self._stub.WatchAdapters(
                    registry_pb2.WatchAdaptersRequest(since_revision=self.revision)
                )
                await call.wait_for_connection()
                self.watch_connected.set()
                async for change in call:
                    self.invalidate(change.adapter)
                    for listener in self._listeners:
                        listener(change.adapter)
                    self.revision = max(self.revision, change.revision)
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


def _principal_or_raise(value: Principal | None) -> Principal:
    if value is None:
        raise Unauthenticated("the API key is unknown or revoked")
    return value


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
