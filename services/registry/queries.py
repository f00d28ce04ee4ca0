"""The queries the registry needs, as small async functions over an AsyncSession.

Callers own the transaction (`async with sessions.begin() as s: ...`): functions flush, never
commit, so several calls can share one transaction.

Adapter writes (new versions, status changes), API-key revocations and tenant-limit changes (the
change feed's three kinds of event) are serialised by a transaction-scoped advisory
lock taken before the revision is drawn from its sequence. Revisions therefore commit in
increasing order, and a watcher reading `revision > X` can never later see a lower revision
appear. The same lock makes version numbering race-free. Registration is rare, so one lock for
all adapter writes costs nothing that matters.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import uuid
from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal
from enum import Enum
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.auth import API_KEY_PREFIX, api_key_display_prefix, hash_api_key, new_api_key
from services.common.model_spec import BaseModelSpec, TargetModule
from services.registry.db import ADAPTER_CHANGES_CHANNEL
from services.registry.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from services.registry.tables import (
    Adapter,
    AdapterStatus,
    AdapterVariant,
    ApiKey,
    BaseModel,
    BaseModelPrice,
    Tenant,
    Worker,
    adapter_revision_seq,
)

# pg_advisory_xact_lock key for all adapter writes ("lpx" + 1).
ADAPTER_WRITE_LOCK = 7_310_420_001

# Allowed status changes; anything else is a Conflict. ARCHIVED -> ARCHIVED is a no-op.
TRANSITIONS: dict[AdapterStatus, frozenset[AdapterStatus]] = {
    AdapterStatus.VALIDATING: frozenset({AdapterStatus.READY, AdapterStatus.FAILED}),
    AdapterStatus.READY: frozenset({AdapterStatus.ARCHIVED}),
    AdapterStatus.FAILED: frozenset({AdapterStatus.ARCHIVED}),
    AdapterStatus.ARCHIVED: frozenset(),
}


# -- tenants -----------------------------------------------------------------------------------


async def create_tenant(s: AsyncSession, name: str) -> Tenant:
    stmt = (
        insert(Tenant)
        .values(id=uuid.uuid4(), name=name)
        .on_conflict_do_nothing(index_elements=[Tenant.name])
        .returning(Tenant)
    )
    tenant = (await s.scalars(stmt)).one_or_none()
    if tenant is None:
        raise AlreadyExists(f"tenant {name!r} already exists; choose another name")
    return tenant


async def list_tenants(s: AsyncSession) -> list[Tenant]:
    return list(await s.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.name)))


async def find_tenant(s: AsyncSession, id_or_name: str) -> Tenant | None:
    """By UUID, then by name (a slug may itself look like a UUID)."""
    try:
        tenant = await s.get(Tenant, uuid.UUID(id_or_name))
    except ValueError:
        tenant = None
    if tenant is None:
        tenant = await s.scalar(select(Tenant).where(Tenant.name == id_or_name))
    return tenant


async def tenant_id_of(s: AsyncSession, id_or_name: str) -> uuid.UUID:
    """The id of the tenant named by id or name; NotFound with a sentence otherwise."""
    tenant = await find_tenant(s, id_or_name)
    if tenant is None:
        raise NotFound(f"tenant {id_or_name!r} does not exist")
    return tenant.id


# The limit columns of a tenant; NULL is unlimited.
LIMIT_FIELDS = ("requests_per_s", "tokens_per_min", "max_concurrent", "monthly_tokens")


async def set_tenant_limits(s: AsyncSession, tenant_id: uuid.UUID, changes: dict[str, int]) -> Tenant:
    """Sets the named limits (0 clears one: unlimited) with a new change-feed revision."""
    unknown = set(changes) - set(LIMIT_FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown tenant limits: {', '.join(sorted(unknown))}")
    for field, value in changes.items():
        if value < 0:
            raise InvalidArgument(f"{field} must be >= 0 (0 means unlimited), got {value}")
    revision = await _lock_adapter_writes(s)
    await _require_tenant(s, tenant_id)
    values: dict[str, Any] = {field: value or None for field, value in changes.items()}
    stmt = update(Tenant).where(Tenant.id == tenant_id).values(revision=revision, **values).returning(Tenant)
    return (await s.scalars(stmt, execution_options={"populate_existing": True})).one()


async def tenant_changes_since(s: AsyncSession, revision: int, limit: int = 500) -> list[Tenant]:
    """Tenants whose limits changed at a revision > `revision`, oldest change first."""
    stmt = select(Tenant).where(Tenant.revision > revision).order_by(Tenant.revision).limit(limit)
    return list(await s.scalars(stmt))


async def _require_tenant(s: AsyncSession, tenant_id: uuid.UUID) -> Tenant:
    tenant = await s.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} does not exist; create it first or check the id")
    return tenant


# -- API keys ----------------------------------------------------------------------------------


async def create_api_key(s: AsyncSession, tenant_id: uuid.UUID, name: str) -> tuple[ApiKey, str]:
    """A new key and its secret; the secret is not stored and cannot be shown again."""
    await _require_tenant(s, tenant_id)
    secret, prefix = new_api_key()
    key = ApiKey(
        id=uuid.uuid4(), tenant_id=tenant_id, name=name, prefix=prefix, key_hash=hash_api_key(secret)
    )
    s.add(key)
    await s.flush()
    return key, secret


async def revoke_api_key(s: AsyncSession, key_id: uuid.UUID) -> ApiKey | None:
    """Revoke a key (idempotent: a second revoke keeps the first time and revision). None if no such key.

    The revocation takes a change-feed revision, so routers watching the feed drop the key at once.
    """
    revision = await _lock_adapter_writes(s)
    stmt = (
        update(ApiKey)
        .where(ApiKey.id == key_id)
        .values(
            revoked_at=func.coalesce(ApiKey.revoked_at, func.now()),
            revision=func.coalesce(ApiKey.revision, revision),
        )
        .returning(ApiKey)
    )
    result = await s.scalars(stmt, execution_options={"populate_existing": True})
    return result.one_or_none()


async def revocations_since(s: AsyncSession, revision: int, limit: int = 500) -> list[ApiKey]:
    """Keys revoked at a revision > `revision`, oldest revocation first."""
    stmt = select(ApiKey).where(ApiKey.revision > revision).order_by(ApiKey.revision).limit(limit)
    return list(await s.scalars(stmt))


async def list_api_keys(s: AsyncSession, tenant_id: uuid.UUID) -> list[ApiKey]:
    stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)
    return list(await s.scalars(stmt))


async def authenticate_api_key(s: AsyncSession, secret: str) -> ApiKey | None:
    """The active key whose secret this is, or None.

    Looked up by the non-secret display prefix, then the hashes are compared in constant time,
    so neither the index nor the comparison leaks how close a guess was.
    """
    if not secret.startswith(API_KEY_PREFIX):
        return None
    wanted = hash_api_key(secret)
    candidates = await s.scalars(
        select(ApiKey).where(ApiKey.prefix == api_key_display_prefix(secret), ApiKey.revoked_at.is_(None))
    )
    match = None
    for key in candidates:
        if hmac.compare_digest(key.key_hash, wanted):
            match = key
    return match


# -- base models -------------------------------------------------------------------------------


def _price(value: Decimal | float | int) -> Decimal:
    price = value if isinstance(value, Decimal) else Decimal(str(value))
    if price < 0 or not price.is_finite():
        raise InvalidArgument(f"price {value} must be a finite number >= 0 (USD per million tokens)")
    return price


async def upsert_base_model(
    s: AsyncSession,
    spec: BaseModelSpec,
    input_price_per_mtok: Decimal | float,
    output_price_per_mtok: Decimal | float,
) -> BaseModel:
    values: dict[str, Any] = {
        "architecture": spec.architecture,
        "num_layers": spec.num_layers,
        "context_length": spec.context_length,
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "target_modules": [
            {"name": m.name, "path": m.path, "in_features": m.in_features, "out_features": m.out_features}
            for m in spec.target_modules
        ],
        "layers_prefix": spec.layers_prefix,
        "input_price_per_mtok": _price(input_price_per_mtok),
        "output_price_per_mtok": _price(output_price_per_mtok),
    }
    stmt = (
        insert(BaseModel)
        .values(name=spec.name, **values)
        .on_conflict_do_update(index_elements=[BaseModel.name], set_={**values, "updated_at": func.now()})
        .returning(BaseModel)
    )
    model = (await s.scalars(stmt, execution_options={"populate_existing": True})).one()
    await _record_price(s, spec.name, values["input_price_per_mtok"], values["output_price_per_mtok"])
    return model


async def _record_price(
    s: AsyncSession, base_model: str, input_price: Decimal, output_price: Decimal
) -> None:
    """Appends to the price history when the prices changed (the ledger prices records from it)."""
    latest = (
        await s.execute(
            select(BaseModelPrice.input_price_per_mtok, BaseModelPrice.output_price_per_mtok)
            .where(BaseModelPrice.base_model == base_model)
            .order_by(BaseModelPrice.effective_from.desc())
            .limit(1)
        )
    ).one_or_none()
    if latest is not None and tuple(latest) == (input_price, output_price):
        return
    # Two changes in one transaction share now(): the later one wins.
    prices = {"input_price_per_mtok": input_price, "output_price_per_mtok": output_price}
    await s.execute(
        insert(BaseModelPrice)
        .values(base_model=base_model, effective_from=func.now(), **prices)
        .on_conflict_do_update(
            index_elements=[BaseModelPrice.base_model, BaseModelPrice.effective_from], set_=prices
        )
    )


async def get_base_model(s: AsyncSession, name: str) -> BaseModel | None:
    return await s.get(BaseModel, name)


async def list_base_models(s: AsyncSession) -> list[BaseModel]:
    return list(await s.scalars(select(BaseModel).order_by(BaseModel.name)))


def base_model_spec(row: BaseModel) -> BaseModelSpec:
    return BaseModelSpec(
        name=row.name,
        architecture=row.architecture,
        num_layers=row.num_layers,
        context_length=row.context_length,
        hidden_size=row.hidden_size,
        vocab_size=row.vocab_size,
        target_modules=tuple(
            TargetModule(
                name=m["name"],
                path=m["path"],
                in_features=int(m["in_features"]),
                out_features=int(m["out_features"]),
            )
            for m in row.target_modules
        ),
        layers_prefix=row.layers_prefix,
    )


# -- adapters ----------------------------------------------------------------------------------


def _enum_value(value: object) -> str:
    if isinstance(value, Enum):
        return str(value.value) if isinstance(value.value, str) else value.name
    return str(value)


def _status(value: object) -> AdapterStatus:
    try:
        return AdapterStatus(_enum_value(value).upper())
    except ValueError:
        raise InvalidArgument(f"adapter status {value!r} is not one of {', '.join(AdapterStatus)}") from None


def _variant(value: object) -> AdapterVariant:
    try:
        return AdapterVariant(_enum_value(value).upper())
    except ValueError:
        raise InvalidArgument(
            f"adapter variant {value!r} is not supported; use one of {', '.join(AdapterVariant)}"
        ) from None


async def _lock_adapter_writes(s: AsyncSession) -> int:
    """Serialise change-feed writes (adapters, revocations, limits) until commit; draw the next revision."""
    await s.execute(select(func.pg_advisory_xact_lock(ADAPTER_WRITE_LOCK)))
    revision: int = (await s.execute(select(adapter_revision_seq.next_value()))).scalar_one()
    # Delivered by PostgreSQL only if and when this transaction commits.
    await s.execute(select(func.pg_notify(ADAPTER_CHANGES_CHANNEL, str(revision))))
    return revision


async def create_adapter_version(
    s: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    name: str,
    base_model: str,
    digest: str,
    uri: str,
    rank: int,
    variant: object,
    lora_alpha: float,
    target_modules: Sequence[str],
    size_bytes: int,
    keep_warm: bool = False,
    description: str = "",
    status: object = AdapterStatus.READY,
    failure_reason: str | None = None,
) -> Adapter:
    """Insert the next version of (tenant, name): 1 for a new name, else the highest + 1.

    Concurrent registrations of one name get distinct versions (the write lock orders them).
    """
    status_value, variant_value = _status(status), _variant(variant)
    if status_value is AdapterStatus.ARCHIVED:
        raise InvalidArgument("a new adapter version cannot start ARCHIVED")
    revision = await _lock_adapter_writes(s)
    await _require_tenant(s, tenant_id)
    if await s.get(BaseModel, base_model) is None:
        raise NotFound(f"base model {base_model!r} is not in the catalog; add it with UpsertBaseModel first")
    # Read after taking the lock: each statement sees everything committed before it (READ COMMITTED).
    latest = await s.scalar(
        select(func.max(Adapter.version)).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    )
    adapter = Adapter(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        name=name,
        version=(latest or 0) + 1,
        base_model=base_model,
        status=status_value.value,
        failure_reason=failure_reason,
        digest=digest,
        uri=uri,
        rank=rank,
        variant=variant_value.value,
        lora_alpha=float(lora_alpha),
        target_modules=list(target_modules),
        size_bytes=size_bytes,
        keep_warm=keep_warm,
        description=description,
        revision=revision,
    )
    s.add(adapter)
    await s.flush()
    return adapter


async def get_adapter(
    s: AsyncSession, tenant_id: uuid.UUID, name: str, version: int | None = None
) -> Adapter | None:
    """One version of the tenant's adapter; version None means the latest READY version."""
    stmt = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    if version is None:
        stmt = (
            stmt.where(Adapter.status == AdapterStatus.READY.value).order_by(Adapter.version.desc()).limit(1)
        )
    else:
        stmt = stmt.where(Adapter.version == version)
    return await s.scalar(stmt)


async def adapter_versions(s: AsyncSession, tenant_id: uuid.UUID, name: str) -> list[Adapter]:
    """Every version of the tenant's adapter `name`, oldest first (any status)."""
    stmt = (
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name).order_by(Adapter.version)
    )
    return list(await s.scalars(stmt))


async def get_adapter_by_id(
    s: AsyncSession, adapter_id: uuid.UUID, tenant_id: uuid.UUID | None = None
) -> Adapter | None:
    """None also when the adapter belongs to another tenant than `tenant_id` (existence is not revealed)."""
    adapter = await s.get(Adapter, adapter_id)
    if adapter is None or (tenant_id is not None and adapter.tenant_id != tenant_id):
        return None
    return adapter


async def digest_in_use(s: AsyncSession, digest: str) -> bool:
    """Whether any adapter version (any status) points at content with this digest."""
    return bool(await s.scalar(select(select(Adapter.id).where(Adapter.digest == digest).exists())))


def _encode_page_token(row: Adapter) -> str:
    raw = json.dumps([str(row.tenant_id), row.name, row.version], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str) -> tuple[uuid.UUID, str, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        tenant, name, version = json.loads(raw)
        if not isinstance(name, str) or not isinstance(version, int):
            raise ValueError(token)
        return uuid.UUID(tenant), name, version
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgument(
            "page_token is not one this registry issued; repeat the request without it"
        ) from None


async def list_adapters(
    s: AsyncSession,
    *,
    tenant_id: uuid.UUID | None = None,
    base_model: str | None = None,
    status: object | None = None,
    page_size: int = 100,
    page_token: str | None = None,
) -> tuple[list[Adapter], str | None]:
    """A page of versions ordered by (tenant, name, version) and the token of the next page (None at the end).

    Keyset pagination: a page starts strictly after the last row of the previous one, so rows
    inserted meanwhile never shift pages, and no row is returned twice.
    """
    if not 1 <= page_size <= 1000:
        raise InvalidArgument(f"page_size must be between 1 and 1000, got {page_size}")
    order = (Adapter.tenant_id, Adapter.name, Adapter.version)
    stmt = select(Adapter).order_by(*order).limit(page_size + 1)
    if tenant_id is not None:
        stmt = stmt.where(Adapter.tenant_id == tenant_id)
    if base_model is not None:
        stmt = stmt.where(Adapter.base_model == base_model)
    if status is not None:
        stmt = stmt.where(Adapter.status == _status(status).value)
    if page_token:
        stmt = stmt.where(tuple_(*order) > tuple_(*_decode_page_token(page_token)))
    rows = list(await s.scalars(stmt))
    if len(rows) <= page_size:
        return rows, None
    return rows[:page_size], _encode_page_token(rows[page_size - 1])


async def set_adapter_status(
    s: AsyncSession, adapter_id: uuid.UUID, status: object, failure_reason: str | None = None
) -> Adapter:
    """Move a version along its lifecycle (TRANSITIONS), with a new revision. NotFound / Conflict."""
    target = _status(status)
    if target is AdapterStatus.FAILED and not failure_reason:
        raise InvalidArgument("a FAILED adapter needs a failure_reason that says what to fix")
    revision = await _lock_adapter_writes(s)
    current = await s.get(Adapter, adapter_id, with_for_update=True, populate_existing=True)
    if current is None:
        raise NotFound(f"adapter {adapter_id} does not exist")
    source = AdapterStatus(current.status)
    if source is target is AdapterStatus.ARCHIVED:
        return current
    if target not in TRANSITIONS[source]:
        raise Conflict(
            f"adapter {current.name}@{current.version} is {source.value} and cannot become {target.value}"
        )
    values: dict[str, Any] = {"status": target.value, "updated_at": func.now(), "revision": revision}
    if failure_reason is not None:
        values["failure_reason"] = failure_reason
    stmt = update(Adapter).where(Adapter.id == adapter_id).values(**values).returning(Adapter)
    return (await s.scalars(stmt, execution_options={"populate_existing": True})).one()


async def archive_adapter(s: AsyncSession, adapter_id: uuid.UUID) -> Adapter:
    """Retire a READY or FAILED version (idempotent once ARCHIVED); it stays for billing history."""
    return await set_adapter_status(s, adapter_id, AdapterStatus.ARCHIVED)


async def adapter_changes_since(s: AsyncSession, revision: int, limit: int = 500) -> list[Adapter]:
    """Versions whose last change has revision > `revision`, oldest change first."""
    stmt = select(Adapter).where(Adapter.revision > revision).order_by(Adapter.revision).limit(limit)
    return list(await s.scalars(stmt))


async def latest_adapter_revision(s: AsyncSession) -> int:
    return int(await s.scalar(select(func.coalesce(func.max(Adapter.revision), 0))) or 0)


# -- workers -----------------------------------------------------------------------------------


async def register_worker(s: AsyncSession, worker_id: str, address: str, base_model: str) -> Worker:
    """Insert or replace a worker's registration; it counts as a heartbeat."""
    values = {"address": address, "base_model": base_model}
    stmt = (
        insert(Worker)
        .values(worker_id=worker_id, **values)
        .on_conflict_do_update(
            index_elements=[Worker.worker_id],
            set_={**values, "registered_at": func.now(), "last_heartbeat_at": func.now()},
        )
        .returning(Worker)
    )
    return (await s.scalars(stmt, execution_options={"populate_existing": True})).one()


async def worker_address(s: AsyncSession, worker_id: str) -> str | None:
    """The address a worker registered, or None when it is unknown."""
    result: str | None = await s.scalar(select(Worker.address).where(Worker.worker_id == worker_id))
    return result


async def heartbeat_worker(s: AsyncSession, worker_id: str) -> bool:
    """False when the worker is unknown: it must register again."""
    stmt = (
        update(Worker)
        .where(Worker.worker_id == worker_id)
        .values(last_heartbeat_at=func.now())
        .returning(Worker.worker_id)
    )
    return (await s.execute(stmt)).first() is not None


async def list_live_workers(
    s: AsyncSession, base_model: str | None = None, ttl_s: float = 15.0
) -> list[Worker]:
    """Workers whose last heartbeat is within `ttl_s` seconds (by the database clock)."""
    stmt = (
        select(Worker)
        .where(Worker.last_heartbeat_at >= func.now() - timedelta(seconds=ttl_s))
        .order_by(Worker.worker_id)
    )
    if base_model is not None:
        stmt = stmt.where(Worker.base_model == base_model)
    return list(await s.scalars(stmt, execution_options={"populate_existing": True}))
