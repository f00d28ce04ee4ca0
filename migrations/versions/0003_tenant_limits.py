"""Tenant limits and change-feed revisions for tenants and revoked API keys.

Per-tenant limits (NULL: unlimited) the routers enforce, and a revision on tenants (limits
changes) and api_keys (revocations), drawn from adapter_revision_seq, so the WatchAdapters feed
carries them in the same order as adapter changes and a router resuming from a revision misses none.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 14:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("requests_per_s", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("tokens_per_min", sa.BigInteger(), nullable=True))
    op.add_column("tenants", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("monthly_tokens", sa.BigInteger(), nullable=True))
    op.add_column(
        "tenants", sa.Column("revision", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
    )
    op.create_check_constraint(
        op.f("ck_tenants_limits_not_negative"),
        "tenants",
        "requests_per_s >= 0 AND tokens_per_min >= 0 AND max_concurrent >= 0 AND monthly_tokens >= 0",
    )
    op.create_index(op.f("ix_tenants_revision"), "tenants", ["revision"], unique=False)
    op.add_column("api_keys", sa.Column("revision", sa.BigInteger(), nullable=True))
    op.create_check_constraint(
        op.f("ck_api_keys_revision_when_revoked"), "api_keys", "revision IS NULL OR revoked_at IS NOT NULL"
    )
    op.create_index(op.f("ix_api_keys_revision"), "api_keys", ["revision"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_api_keys_revision"), table_name="api_keys")
    op.drop_constraint(op.f("ck_api_keys_revision_when_revoked"), "api_keys", type_="check")
    op.drop_column("api_keys", "revision")
    op.drop_index(op.f("ix_tenants_revision"), table_name="tenants")
    op.drop_constraint(op.f("ck_tenants_limits_not_negative"), "tenants", type_="check")
    op.drop_column("tenants", "revision")
    op.drop_column("tenants", "monthly_tokens")
    op.drop_column("tenants", "max_concurrent")
    op.drop_column("tenants", "tokens_per_min")
    op.drop_column("tenants", "requests_per_s")
