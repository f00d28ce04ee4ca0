"""AdapterRegistryService: a thin layer from gRPC messages to queries and the adapter intake."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.v1 import registry_pb2, registry_pb2_grpc
from services.common import adapter_errors
from services.common.config import RegistrySettings
from services.common.grpc_errors import RpcError, status_errors
from services.common.object_store import ObjectStore, check_source_uri
from services.registry import convert, errors, queries
from services.registry.callers import (
    ADMIN,
    ROUTER_CALLS,
    TENANT_READS,
    WORKER_CALLS,
    Authenticator,
    Caller,
    CallerKind,
)
from services.registry.change_feed import ChangeFeed
from services.registry.intake import (
    AdapterLimits,
    StagedUpload,
    accept_staged,
    discard_stored,
    stage_from_uri,
)
from services.registry.names import check_slug
from services.registry.tables import Tenant

ERRORS = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    adapter_errors.AdapterRejected: grpc.StatusCode.INVALID_ARGUMENT,
    adapter_errors.TooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    adapter_errors.UriNotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    adapter_errors.NotFound: grpc.StatusCode.NOT_FOUND,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}

MAX_PAGE_SIZE = 1000
# How many versions a "no READY version" message lists.
MAX_LISTED_VERSIONS = 10
WATCH_BATCH = 500


@status_errors(ERRORS)
class AdapterRegistryServicer(registry_pb2_grpc.AdapterRegistryServiceServicer):
    def __init__(
        self,
        settings: RegistrySettings,
        sessions: async_sessionmaker[AsyncSession],
        store: ObjectStore,
        change_feed: ChangeFeed,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._auth = Authenticator(settings.admin_token, sessions, plaintext=settings.tls is None)
        self._store = store
        self._feed = change_feed
        self._limits = AdapterLimits(max_rank=settings.max_adapter_rank, max_bytes=settings.max_adapter_bytes)
        self._staging_root = settings.home / "staging"
        self._draining = asyncio.Event()

    def begin_drain(self) -> None:
        """Ends WatchAdapters streams (watchers reconnect elsewhere) so a drain waits only for real work."""
        self._draining.set()
        self._feed.wake_all()

    # -- auth --------------------------------------------------------------------------------

    async def _caller(self, context: grpc.aio.ServicerContext, allowed: frozenset[CallerKind]) -> Caller:
        return await self._auth.caller(context, allowed)

    async def _admin(self, context: grpc.aio.ServicerContext) -> None:
        await self._auth.require_admin(context)

    async def _tenant_id(
        self, s: AsyncSession, caller: Caller, requested: str, *, required: bool
    ) -> uuid.UUID | None:
        """The tenant a call acts on: an API key's own tenant, or the one an admin or router names."""
        if not caller.sees_all_tenants:
            return caller.tenant_id
        if not requested:
            if required:
                raise ValueError("tenant is required: pass the tenant's id or name")
            return None
        return await queries.tenant_id_of(s, requested)

    # -- tenants and keys --------------------------------------------------------------------

    async def CreateTenant(self, request: Any, context: Any) -> registry_pb2.CreateTenantResponse:
        await self._admin(context)
        check_slug("tenant name", request.name)
        async with self._sessions.begin() as s:
            tenant = await queries.create_tenant(s, request.name)
            return registry_pb2.CreateTenantResponse(tenant=convert.tenant_pb(tenant))

    async def ListTenants(self, request: Any, context: Any) -> registry_pb2.ListTenantsResponse:
        await self._admin(context)
        async with self._sessions() as s:
            rows = await queries.list_tenants(s)
            return registry_pb2.ListTenantsResponse(tenants=[convert.tenant_pb(t) for t in rows])

    async def CreateApiKey(self, request: Any, context: Any) -> registry_pb2.CreateApiKeyResponse:
        await self._admin(context)
        async with self._sessions.begin() as s:
            tenant_id = await self._tenant_id(s, ADMIN, request.tenant, required=True)
            assert tenant_id is not None
            key, secret = await queries.create_api_key(s, tenant_id, request.name or "default")
            return registry_pb2.CreateApiKeyResponse(api_key=convert.api_key_pb(key), secret=secret)

    async def RevokeApiKey(self, request: Any, context: Any) -> registry_pb2.RevokeApiKeyResponse:
        await self._admin(context)
        key_id = _parse_uuid("key_id", request.key_id)
        async with self._sessions.begin() as s:
            key = await queries.revoke_api_key(s, key_id)
            if key is None:
                raise errors.NotFound(f"API key {request.key_id} does not exist")
            response = registry_pb2.RevokeApiKeyResponse(api_key=convert.api_key_pb(key))
            revision = key.revision or 0
        # Committed: wake this replica's watchers (NOTIFY wakes the others').
        self._feed.notify_local(revision)
        return response

    async def SetTenantLimits(self, request: Any, context: Any) -> registry_pb2.SetTenantLimitsResponse:
        await self._admin(context)
        changes = {f: getattr(request, f) for f in queries.LIMIT_FIELDS if request.HasField(f)}
        if not changes:
            raise ValueError(f"set at least one limit: {', '.join(queries.LIMIT_FIELDS)} (0 clears one)")
        async with self._sessions.begin() as s:
            tenant_id = await self._tenant_id(s, ADMIN, request.tenant, required=True)
            assert tenant_id is not None
            row = await queries.set_tenant_limits(s, tenant_id, changes)
            response = registry_pb2.SetTenantLimitsResponse(tenant=convert.tenant_pb(row))
        self._feed.notify_local(response.tenant.revision)
        return response

    async def AuthenticateApiKey(self, request: Any, context: Any) -> registry_pb2.AuthenticateApiKeyResponse:
        await self._caller(context, ROUTER_CALLS)
        async with self._sessions() as s:
            key = await queries.authenticate_api_key(s, request.secret)
            if key is None:
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "the API key is unknown or revoked")
            tenant = await s.get(Tenant, key.tenant_id)
            return registry_pb2.AuthenticateApiKeyResponse(
                tenant_id=str(key.tenant_id), key_id=str(key.id), tenant=convert.tenant_pb(tenant)
            )

    # -- base models -------------------------------------------------------------------------

    async def UpsertBaseModel(self, request: Any, context: Any) -> registry_pb2.UpsertBaseModelResponse:
        await self._admin(context)
        msg = request.base_model
        check_slug("base model name", msg.name)
        if not msg.target_modules or msg.num_layers == 0:
            raise ValueError("a base model needs num_layers and at least one target module")
        if msg.input_price_per_mtok < 0 or msg.output_price_per_mtok < 0:
            raise ValueError("prices must be >= 0 (USD per million tokens)")
        spec = convert.spec_from_pb(msg)
        async with self._sessions.begin() as s:
            row = await queries.upsert_base_model(
                s, spec, msg.input_price_per_mtok, msg.output_price_per_mtok
            )
            return registry_pb2.UpsertBaseModelResponse(base_model=_base_model_pb(row))

    async def ListBaseModels(self, request: Any, context: Any) -> registry_pb2.ListBaseModelsResponse:
        await self._caller(context, TENANT_READS)
        async with self._sessions() as s:
            rows = await queries.list_base_models(s)
            return registry_pb2.ListBaseModelsResponse(base_models=[_base_model_pb(r) for r in rows])

    # -- adapters ----------------------------------------------------------------------------

    async def RegisterAdapter(self, request: Any, context: Any) -> registry_pb2.RegisterAdapterResponse:
        await self._admin(context)
        check_slug("adapter name", request.name)
        check_source_uri(
            request.uri,
            allowed_buckets=self._settings.allowed_buckets,
            allowed_file_roots=self._settings.allowed_file_roots,
        )
        async with self._sessions() as s:
            tenant_id, spec = await self._tenant_and_base(s, request.tenant, request.base_model)
        with self._staging_dir() as staging:
            await asyncio.to_thread(stage_from_uri, request.uri, staging, max_bytes=self._limits.max_bytes)
            row = await self._accept(
                staging, tenant_id, request.name, spec, request.keep_warm, request.description
            )
        return registry_pb2.RegisterAdapterResponse(adapter=convert.adapter_pb(row))

    async def UploadAdapter(self, request_iterator: Any, context: Any) -> registry_pb2.UploadAdapterResponse:
        await self._admin(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise ValueError("an upload must start with a metadata message (tenant, name, base_model)")
        meta = first.metadata
        check_slug("adapter name", meta.name)
        async with self._sessions() as s:
            tenant_id, spec = await self._tenant_and_base(s, meta.tenant, meta.base_model)
        with self._staging_dir() as staging:
            with StagedUpload(staging, max_bytes=self._limits.max_bytes) as upload:
                async for part in request_iterator:
                    if part.WhichOneof("part") != "chunk":
                        raise ValueError("only the first message of an upload may carry metadata")
                    upload.add_chunk(part.chunk.file_name, part.chunk.data)
                upload.finish()
            row = await self._accept(staging, tenant_id, meta.name, spec, meta.keep_warm, meta.description)
        return registry_pb2.UploadAdapterResponse(adapter=convert.adapter_pb(row))

    async def GetAdapter(self, request: Any, context: Any) -> registry_pb2.GetAdapterResponse:
        caller = await self._caller(context, TENANT_READS)
        async with self._sessions() as s:
            row = await self._find_adapter(s, caller, request.tenant, request.adapter)
            return registry_pb2.GetAdapterResponse(adapter=convert.adapter_pb(row))

    async def ListAdapters(self, request: Any, context: Any) -> registry_pb2.ListAdaptersResponse:
        caller = await self._caller(context, TENANT_READS)
        page_size = request.page_size or 100
        if page_size > MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be at most {MAX_PAGE_SIZE}")
        status = convert.STATUS_FROM_PB.get(request.status) if request.status else None
        async with self._sessions() as s:
            tenant_id = await self._tenant_id(s, caller, request.tenant, required=False)
            rows, next_token = await queries.list_adapters(
                s,
                tenant_id=tenant_id,
                base_model=request.base_model or None,
                status=status,
                page_size=page_size,
                page_token=request.page_token or None,
            )
            return registry_pb2.ListAdaptersResponse(
                adapters=[convert.adapter_pb(r) for r in rows], next_page_token=next_token or ""
            )

    async def ArchiveAdapter(self, request: Any, context: Any) -> registry_pb2.ArchiveAdapterResponse:
        await self._admin(context)
        async with self._sessions.begin() as s:
            row = await self._find_adapter(s, ADMIN, request.tenant, request.adapter)
            row = await queries.archive_adapter(s, row.id)
            response = registry_pb2.ArchiveAdapterResponse(adapter=convert.adapter_pb(row))
        return response

    async def WatchAdapters(
        self, request: Any, context: Any
    ) -> AsyncIterator[registry_pb2.WatchAdaptersResponse]:
        await self._caller(context, ROUTER_CALLS)
        # Headers now, not with the first change: a watcher knows it is connected even when
        # nothing has changed yet (a router waits for this before it trusts the feed).
        await context.send_initial_metadata(())
        revision = request.since_revision
        while not self._draining.is_set():
            async with self._sessions() as s:
                batch = await _changes_since(s, revision)
            for change in batch:
                revision = change.revision
                yield change
            if len(batch) < WATCH_BATCH:
                await self._feed.wait_for_change(after=revision, timeout_s=5.0)

    # -- workers -----------------------------------------------------------------------------

    async def RegisterWorker(self, request: Any, context: Any) -> registry_pb2.RegisterWorkerResponse:
        caller = await self._caller(context, WORKER_CALLS)
        w = request.worker
        if not w.worker_id or not w.address or not w.base_model:
            raise ValueError("a worker needs worker_id, address and base_model")
        caller.check_worker_address(w.address)
        async with self._sessions.begin() as s:
            if await queries.get_base_model(s, w.base_model) is None:
                raise errors.NotFound(f"base model {w.base_model!r} is not in the catalog")
            await queries.register_worker(s, w.worker_id, w.address, w.base_model)
        interval_ms = int(self._settings.worker_ttl_s * 1000 / 3)
        return registry_pb2.RegisterWorkerResponse(heartbeat_interval_ms=interval_ms)

    async def HeartbeatWorker(self, request: Any, context: Any) -> registry_pb2.HeartbeatWorkerResponse:
        caller = await self._caller(context, WORKER_CALLS)
        async with self._sessions.begin() as s:
            address = await queries.worker_address(s, request.worker_id)
            if address is not None:
                # Keeping another host's registration alive would keep routing to it after it died.
                caller.check_worker_address(address)
            known = await queries.heartbeat_worker(s, request.worker_id)
        return registry_pb2.HeartbeatWorkerResponse(known=known)

    async def ListWorkers(self, request: Any, context: Any) -> registry_pb2.ListWorkersResponse:
        await self._caller(context, ROUTER_CALLS)
        async with self._sessions() as s:
            rows = await queries.list_live_workers(s, request.base_model or None, self._settings.worker_ttl_s)
            return registry_pb2.ListWorkersResponse(
                workers=[
                    registry_pb2.Worker(
                        worker_id=w.worker_id,
                        address=w.address,
                        base_model=w.base_model,
                        last_heartbeat_at=convert.timestamp(w.last_heartbeat_at),
                    )
                    for w in rows
                ]
            )

    # -- helpers -----------------------------------------------------------------------------

    async def _tenant_and_base(self, s: AsyncSession, tenant: str, base_model: str) -> tuple[uuid.UUID, Any]:
        tenant_id = await self._tenant_id(s, ADMIN, tenant, required=True)
        assert tenant_id is not None
        if not base_model:
            raise ValueError("base_model is required: name the base model the adapter was trained on")
        row = await queries.get_base_model(s, base_model)
        if row is None:
            known = ", ".join(m.name for m in await queries.list_base_models(s)) or "none yet"
            raise errors.NotFound(f"base model {base_model!r} is not in the catalog (known: {known})")
        return tenant_id, queries.base_model_spec(row)

    async def _accept(
        self,
        staging: Path,
        tenant_id: uuid.UUID,
        name: str,
        spec: Any,
        keep_warm: bool,
        description: str,
    ) -> Any:
        """Validate and store the staged files, then insert the version row; undo the store on failure."""
        accepted = await asyncio.to_thread(accept_staged, staging, spec, self._limits, self._store)
        try:
            async with self._sessions.begin() as s:
                row = await queries.create_adapter_version(
                    s,
                    tenant_id=tenant_id,
                    name=name,
                    base_model=spec.name,
                    digest=accepted.digest,
                    uri=accepted.uri,
                    rank=accepted.validated.rank,
                    variant=accepted.validated.variant,
                    lora_alpha=accepted.validated.lora_alpha,
                    target_modules=list(accepted.validated.target_modules),
                    size_bytes=accepted.size_bytes,
                    keep_warm=keep_warm,
                    description=description,
                )
        except BaseException:
            await asyncio.to_thread(discard_stored, self._store, accepted)
            raise
        self._feed.notify_local(row.revision)
        return row

    async def _find_adapter(self, s: AsyncSession, caller: Caller, tenant: str, reference: str) -> Any:
        """Resolve "name", "name@version" or an adapter id within the caller's tenant.

        Another tenant's adapter is reported exactly like a missing one: existence is not revealed.
        """
        tenant_id = await self._tenant_id(s, caller, tenant, required=not caller.sees_all_tenants)
        if not reference:
            raise ValueError("adapter is required: pass 'name', 'name@version' or an adapter id")
        adapter_id = _maybe_uuid(reference)
        if adapter_id is not None:
            row = await queries.get_adapter_by_id(s, adapter_id, tenant_id)
        else:
            if tenant_id is None:
                raise ValueError("tenant is required to look an adapter up by name")
            name, _, version_text = reference.partition("@")
            version = _parse_version(version_text) if version_text else None
            row = await queries.get_adapter(s, tenant_id, name, version)
            if row is None and version is None:
                versions = await queries.adapter_versions(s, tenant_id, name)
                if versions:
                    # It exists (in the caller's own tenant) but nothing is servable: say so.
                    raise errors.Conflict(not_servable_message(name, versions))
        if row is None:
            raise errors.NotFound(f"adapter {reference!r} not found")
        return row

    def _staging_dir(self) -> Any:
        self._staging_root.mkdir(parents=True, exist_ok=True)
        return _TempDir(self._staging_root)


def not_servable_message(name: str, versions: list[Any]) -> str:
    """FAILED_PRECONDITION text for a name with versions but none READY."""
    listed = ", ".join(f"@{v.version} {v.status}" for v in versions[-MAX_LISTED_VERSIONS:])
    more = (
        f" (latest {MAX_LISTED_VERSIONS} of {len(versions)})" if len(versions) > MAX_LISTED_VERSIONS else ""
    )
    return (
        f"adapter {name!r} has no READY version to serve; its versions: {listed}{more}. "
        f"Register a new version, or name one with {name}@VERSION"
    )


class _TempDir:
    """A private staging directory removed on exit, whatever happened."""

    def __init__(self, root: Path) -> None:
        self._path = Path(tempfile.mkdtemp(prefix="stage-", dir=root))

    def __enter__(self) -> Path:
        return self._path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self._path, ignore_errors=True)


async def _changes_since(s: AsyncSession, revision: int) -> list[registry_pb2.WatchAdaptersResponse]:
    """The next WATCH_BATCH changes of all three kinds after `revision`, in revision order.

    Each query returns its own first WATCH_BATCH, so the merged first WATCH_BATCH are exact.
    """
    changes = [
        registry_pb2.WatchAdaptersResponse(revision=r.revision, adapter=convert.adapter_pb(r))
        for r in await queries.adapter_changes_since(s, revision, WATCH_BATCH)
    ]
    changes += [
        registry_pb2.WatchAdaptersResponse(revision=k.revision or 0, revoked_api_key=convert.api_key_pb(k))
        for k in await queries.revocations_since(s, revision, WATCH_BATCH)
    ]
    changes += [
        registry_pb2.WatchAdaptersResponse(revision=t.revision, tenant=convert.tenant_pb(t))
        for t in await queries.tenant_changes_since(s, revision, WATCH_BATCH)
    ]
    changes.sort(key=lambda c: c.revision)
    return changes[:WATCH_BATCH]


def _base_model_pb(row: Any) -> registry_pb2.BaseModel:
    return convert.base_model_pb(
        queries.base_model_spec(row), float(row.input_price_per_mtok), float(row.output_price_per_mtok)
    )


def _parse_uuid(field: str, value: str) -> uuid.UUID:
    parsed = _maybe_uuid(value)
    if parsed is None:
        raise ValueError(f"{field} must be a UUID, got {value!r}")
    return parsed


def _maybe_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _parse_version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"version must be a positive integer, got {text!r} (use name@3)")
    return int(text)
