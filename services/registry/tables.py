"""The registry's schema: typed SQLAlchemy models. Alembic (migrations/) owns how it gets to the database.

Rules that protect data live in the database as constraints, so no code path can skip them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    MetaData,
    Numeric,
    Sequence,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so migrations can name what they drop and `alembic check` compares names.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _slug_check(column: str) -> str:
    """The slug rule of services.registry.names.check_slug, enforced again by the database."""
    return f"{column} ~ '^[a-z0-9][a-z0-9_.-]{{0,62}}$' AND position('..' in {column}) = 0"


class AdapterStatus(StrEnum):
    VALIDATING = "VALIDATING"
    READY = "READY"
    FAILED = "FAILED"
    ARCHIVED = "ARCHIVED"


class AdapterVariant(StrEnum):
    LORA = "LORA"
    RSLORA = "RSLORA"
    DORA = "DORA"


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        uuid.UUID: UUID(as_uuid=True),
        datetime: DateTime(timezone=True),
        str: Text(),
    }


# Every adapter insert or status change takes the next value: the WatchAdapters change feed.
adapter_revision_seq = Sequence("adapter_revision_seq", metadata=Base.metadata)


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint(_slug_check("name"), name="name_slug"),
        CheckConstraint(
            "requests_per_s >= 0 AND tokens_per_min >= 0 AND max_concurrent >= 0 AND monthly_tokens >= 0",
            name="limits_not_negative",
        ),
        Index(None, "revision"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # Limits the routers enforce; NULL is unlimited (services.router.limits).
    requests_per_s: Mapped[int | None]
    tokens_per_min: Mapped[int | None] = mapped_column(BigInteger)
    max_concurrent: Mapped[int | None]
    monthly_tokens: Mapped[int | None] = mapped_column(BigInteger)
    # Change-feed revision of the last limits change (0: never changed), from adapter_revision_seq.
    revision: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("key_hash ~ '^[0-9a-f]{64}$'", name="key_hash_sha256_hex"),
        CheckConstraint("revoked_at IS NULL OR revoked_at >= created_at", name="revoked_after_created"),
        CheckConstraint("revision IS NULL OR revoked_at IS NOT NULL", name="revision_when_revoked"),
        Index(None, "revision"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str]
    # Shown to users to tell keys apart, and used to find a key before comparing hashes.
    prefix: Mapped[str] = mapped_column(index=True)
    key_hash: Mapped[str] = mapped_column(unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    revoked_at: Mapped[datetime | None]
    # Change-feed revision of the revocation (routers drop the key when the feed reports it).
    revision: Mapped[int | None] = mapped_column(BigInteger)


class BaseModel(Base):
    __tablename__ = "base_models"
    __table_args__ = (
        CheckConstraint(
            "num_layers > 0 AND context_length > 0 AND hidden_size > 0 AND vocab_size > 0",
            name="sizes_positive",
        ),
        CheckConstraint(
            "input_price_per_mtok >= 0 AND output_price_per_mtok >= 0", name="prices_not_negative"
        ),
        CheckConstraint("jsonb_typeof(target_modules) = 'array'", name="target_modules_array"),
    )

    name: Mapped[str] = mapped_column(primary_key=True)
    architecture: Mapped[str]
    num_layers: Mapped[int]
    context_length: Mapped[int]
    hidden_size: Mapped[int]
    vocab_size: Mapped[int]
    # [{"name", "path", "in_features", "out_features"}, ...]: see services.common.model_spec.
    target_modules: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    layers_prefix: Mapped[str]
    # USD per million tokens; Numeric so billing sums are exact.
    input_price_per_mtok: Mapped[Decimal] = mapped_column(Numeric(18, 9))
    output_price_per_mtok: Mapped[Decimal] = mapped_column(Numeric(18, 9))
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class BaseModelPrice(Base):
    """A base model's prices from `effective_from` on: the history the ledger prices records from.

    Written by upsert_base_model whenever the prices change, so a usage record shipped late (a
    router's backlog) is still priced as of when it finished, not as of when it arrived.
    """

    __tablename__ = "base_model_prices"
    __table_args__ = (
        CheckConstraint(
            "input_price_per_mtok >= 0 AND output_price_per_mtok >= 0", name="prices_not_negative"
        ),
    )

    base_model: Mapped[str] = mapped_column(ForeignKey("base_models.name"), primary_key=True)
    effective_from: Mapped[datetime] = mapped_column(primary_key=True)
    input_price_per_mtok: Mapped[Decimal] = mapped_column(Numeric(18, 9))
    output_price_per_mtok: Mapped[Decimal] = mapped_column(Numeric(18, 9))


class Adapter(Base):
    """One immutable adapter version: (tenant, name, version) and its content digest never change."""

    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version"),
        CheckConstraint(_slug_check("name"), name="name_slug"),
        CheckConstraint("version >= 1", name="version_positive"),
        CheckConstraint(_in("status", AdapterStatus), name="status_known"),
        CheckConstraint("status <> 'FAILED' OR failure_reason IS NOT NULL", name="failed_has_reason"),
        CheckConstraint(_in("variant", AdapterVariant), name="variant_known"),
        CheckConstraint("digest ~ '^sha256:[0-9a-f]{64}$'", name="digest_sha256"),
        CheckConstraint("rank >= 1", name="rank_positive"),
        CheckConstraint("size_bytes >= 0", name="size_not_negative"),
        Index(None, "base_model"),
        Index(None, "digest"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str]
    version: Mapped[int]
    base_model: Mapped[str] = mapped_column(ForeignKey("base_models.name"))
    status: Mapped[str]
    failure_reason: Mapped[str | None]
    digest: Mapped[str]
    uri: Mapped[str]
    rank: Mapped[int]
    variant: Mapped[str]
    lora_alpha: Mapped[float] = mapped_column(Double)
    target_modules: Mapped[list[str]] = mapped_column(ARRAY(Text))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    keep_warm: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    description: Mapped[str] = mapped_column(server_default="")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    revision: Mapped[int] = mapped_column(BigInteger, unique=True)


class Worker(Base):
    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(primary_key=True)
    address: Mapped[str]
    base_model: Mapped[str] = mapped_column(ForeignKey("base_models.name"), index=True)
    registered_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_heartbeat_at: Mapped[datetime] = mapped_column(server_default=func.now())


class UsageRecord(Base):
    """The billing ledger: one row per (tenant, request id), ever: the idempotency key.

    Request ids are chosen by clients, so they are unique only within a tenant: tenant B may use
    an id tenant A used, and neither sees the other's row.
    """

    __tablename__ = "usage_records"
    __table_args__ = (
        CheckConstraint(
            "input_tokens >= 0 AND output_tokens >= 0 AND cached_input_tokens >= 0"
            " AND cached_input_tokens <= input_tokens",
            name="token_counts",
        ),
        CheckConstraint("(adapter_id IS NULL) = (adapter_version IS NULL)", name="adapter_id_with_version"),
        CheckConstraint("finished_at >= started_at", name="finished_after_started"),
        CheckConstraint(
            "(input_price_per_mtok IS NULL) = (output_price_per_mtok IS NULL)", name="prices_together"
        ),
        # Export pages walk (finished_at, tenant_id, request_id): these serve them without a sort.
        Index(None, "finished_at", "tenant_id", "request_id"),
        Index(None, "tenant_id", "finished_at", "request_id"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    request_id: Mapped[str] = mapped_column(primary_key=True)
    api_key_id: Mapped[uuid.UUID | None]
    base_model: Mapped[str]
    # Not foreign keys: the ledger must accept every record the router spooled, and adapter rows
    # are never deleted anyway (archived versions stay for billing history).
    adapter_id: Mapped[uuid.UUID | None]
    adapter_version: Mapped[int | None]
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    finish_reason: Mapped[str]
    ttft_ms: Mapped[float] = mapped_column(Double)
    duration_ms: Mapped[float] = mapped_column(Double)
    worker_id: Mapped[str | None]
    cold_start: Mapped[bool]
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # USD per million tokens in force when the request finished (base_model_prices at finished_at),
    # stored at ingest so a later price change never reprices history. NULL: no price was known.
    input_price_per_mtok: Mapped[Decimal | None] = mapped_column(Numeric(18, 9))
    output_price_per_mtok: Mapped[Decimal | None] = mapped_column(Numeric(18, 9))
