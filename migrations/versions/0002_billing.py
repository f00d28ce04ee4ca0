"""Billing identity and prices: the ledger keyed by (tenant, request id), prices stored per record.

- usage_records' primary key moves from (request_id) to (tenant_id, request_id): request ids are
  chosen by clients and belong to their tenant. The export index follows: (finished_at, tenant_id,
  request_id). Existing rows are kept as they are (an id unique overall is unique per tenant).
- base_model_prices keeps each base model's price history, seeded with today's prices effective
  from the model's last update.
- usage_records gains input/output_price_per_mtok, the prices in force when the request finished.
  Existing rows are filled with their base model's current prices: the only prices known before
  the history existed.

Downgrade reverses all three, dropping the stored prices and the history; it refuses (and changes
nothing) when two tenants hold the same request id, since the old key cannot hold both rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 14:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "base_model_prices",
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("input_price_per_mtok", sa.Numeric(precision=18, scale=9), nullable=False),
        sa.Column("output_price_per_mtok", sa.Numeric(precision=18, scale=9), nullable=False),
        sa.CheckConstraint(
            "input_price_per_mtok >= 0 AND output_price_per_mtok >= 0",
            name=op.f("ck_base_model_prices_prices_not_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["base_model"], ["base_models.name"], name=op.f("fk_base_model_prices_base_model_base_models")
        ),
        sa.PrimaryKeyConstraint("base_model", "effective_from", name=op.f("pk_base_model_prices")),
    )
    op.execute(
        "INSERT INTO base_model_prices"
        " (base_model, effective_from, input_price_per_mtok, output_price_per_mtok)"
        " SELECT name, updated_at, input_price_per_mtok, output_price_per_mtok FROM base_models"
    )

    op.drop_constraint(op.f("pk_usage_records"), "usage_records", type_="primary")
    op.create_primary_key(op.f("pk_usage_records"), "usage_records", ["tenant_id", "request_id"])
    op.drop_index(op.f("ix_usage_records_finished_at_request_id"), table_name="usage_records")
    op.create_index(
        op.f("ix_usage_records_finished_at_tenant_id_request_id"),
        "usage_records",
        ["finished_at", "tenant_id", "request_id"],
        unique=False,
    )

    op.add_column("usage_records", sa.Column("input_price_per_mtok", sa.Numeric(18, 9), nullable=True))
    op.add_column("usage_records", sa.Column("output_price_per_mtok", sa.Numeric(18, 9), nullable=True))
    op.execute(
        "UPDATE usage_records u SET input_price_per_mtok = m.input_price_per_mtok,"
        " output_price_per_mtok = m.output_price_per_mtok FROM base_models m WHERE m.name = u.base_model"
    )
    op.create_check_constraint(
        op.f("ck_usage_records_prices_together"),
        "usage_records",
        "(input_price_per_mtok IS NULL) = (output_price_per_mtok IS NULL)",
    )


def downgrade() -> None:
    shared = op.get_bind().execute(
        sa.text("SELECT request_id FROM usage_records GROUP BY request_id HAVING count(*) > 1 LIMIT 5")
    )
    ids = [row[0] for row in shared]
    if ids:
        raise RuntimeError(
            f"cannot downgrade: several tenants hold the same request id ({', '.join(map(repr, ids))}), "
            "and the old ledger key (request_id alone) cannot keep both rows; export the ledger first"
        )
    op.drop_constraint(op.f("ck_usage_records_prices_together"), "usage_records", type_="check")
    op.drop_column("usage_records", "output_price_per_mtok")
    op.drop_column("usage_records", "input_price_per_mtok")
    op.drop_index(op.f("ix_usage_records_finished_at_tenant_id_request_id"), table_name="usage_records")
    op.create_index(
        op.f("ix_usage_records_finished_at_request_id"),
        "usage_records",
        ["finished_at", "request_id"],
        unique=False,
    )
    op.drop_constraint(op.f("pk_usage_records"), "usage_records", type_="primary")
    op.create_primary_key(op.f("pk_usage_records"), "usage_records", ["request_id"])
    op.drop_table("base_model_prices")
