"""Alembic environment: one synchronous psycopg connection, migrations serialised across replicas."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool, text

from services.registry.db import sync_url
from services.registry.tables import Base

config = context.config
if config.config_file_name is not None:
    # Only when run as the `alembic` CLI; the registry keeps its own logging setup.
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

# Held for the migration transaction so that replicas starting together migrate one at a time.
MIGRATION_LOCK = 7_310_420_000


def _url() -> str:
    url = (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("LORAPLEX_DATABASE_URL")
    )
    if not url:
        raise SystemExit("no database: pass -x url=postgresql://... or set LORAPLEX_DATABASE_URL")
    return sync_url(url)


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _configure(connection=connection)
        with context.begin_transaction():
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
