"""The registry's queries against a real PostgreSQL database (see tests/fixtures/postgres.py)."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.model_spec import BaseModelSpec, TargetModule
from services.registry import db, queries
from services.registry.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from services.registry.tables import Adapter, BaseModelPrice, Tenant
from tests.fixtures.postgres import outside_pytest_tmp

Sessions = async_sessionmaker[AsyncSession]


def _suffix() -> str:
    return uuid.uuid4().hex[:10]


def _digest(seed: str = "") -> str:
    return "sha256:" + hashlib.sha256((seed or _suffix()).encode()).hexdigest()


def _spec(name: str) -> BaseModelSpec:
    return BaseModelSpec(
        name=name,
        architecture="LlamaForCausalLM",
        num_layers=2,
        context_length=512,
        hidden_size=64,
        vocab_size=1000,
        target_modules=(
            TargetModule("q_proj", "self_attn.q_proj", 64, 64),
            TargetModule("down_proj", "mlp.down_proj", 128, 64),
        ),
    )


async def _tenant_and_model(sessions: Sessions) -> tuple[Tenant, str]:
    async with sessions.begin() as s:
        tenant = await queries.create_tenant(s, f"t-{_suffix()}")
        model = f"tiny-{_suffix()}"
        await queries.upsert_base_model(s, _spec(model), 0.1, 0.2)
    return tenant, model


async def _register(
    s: AsyncSession, tenant_id: uuid.UUID, name: str, base_model: str, **overrides: Any
) -> Adapter:
    fields: dict[str, Any] = {
        "tenant_id": tenant_id,
        "name": name,
        "base_model": base_model,
        "digest": _digest(),
        "uri": f"file:///adapters/{_suffix()}",
        "rank": 8,
        "variant": "LORA",
        "lora_alpha": 16.0,
        "target_modules": ["q_proj"],
        "size_bytes": 1234,
        "keep_warm": False,
        "description": "test adapter",
    }
    fields.update(overrides)
    return await queries.create_adapter_version(s, **fields)


# -- tenants and API keys ----------------------------------------------------------------------


async def test_tenant_names_are_unique_and_findable_by_id_or_name(session_factory: Sessions) -> None:
    name = f"acme-{_suffix()}"
    async with session_factory.begin() as s:
        tenant = await queries.create_tenant(s, name)
    async with session_factory.begin() as s:
        with pytest.raises(AlreadyExists, match=name):
            await queries.create_tenant(s, name)
    async with session_factory() as s:
        assert (await queries.find_tenant(s, name)).id == tenant.id  # type: ignore[union-attr]
        assert (await queries.find_tenant(s, str(tenant.id))).name == name  # type: ignore[union-attr]
        assert await queries.find_tenant(s, "no-such-tenant") is None
        assert tenant.id in {t.id for t in await queries.list_tenants(s)}


async def test_database_refuses_tenant_names_that_are_not_slugs(session_factory: Sessions) -> None:
    with pytest.raises(IntegrityError, match="ck_tenants_name_slug"):
        async with session_factory.begin() as s:
            await queries.create_tenant(s, "Not/A/Slug")


async def test_api_key_authenticates_until_revoked(session_factory: Sessions) -> None:
    tenant, _ = await _tenant_and_model(session_factory)
    async with session_factory.begin() as s:
        key, secret = await queries.create_api_key(s, tenant.id, "ci")
    assert secret.startswith("lpx_") and secret.startswith(key.prefix) and secret != key.prefix
    assert key.key_hash != secret and secret not in key.key_hash

    async with session_factory() as s:
        found = await queries.authenticate_api_key(s, secret)
        assert found is not None and found.id == key.id and found.tenant_id == tenant.id
        assert await queries.authenticate_api_key(s, secret + "x") is None
        assert await queries.authenticate_api_key(s, secret[:-1]) is None
        assert await queries.authenticate_api_key(s, "not-a-key") is None

    async with session_factory.begin() as s:
        revoked = await queries.revoke_api_key(s, key.id)
        assert revoked is not None and revoked.revoked_at is not None
    async with session_factory.begin() as s:
        again = await queries.revoke_api_key(s, key.id)
        assert again is not None and again.revoked_at == revoked.revoked_at
        assert await queries.revoke_api_key(s, uuid.uuid4()) is None
    async with session_factory() as s:
        assert await queries.authenticate_api_key(s, secret) is None


async def test_api_key_for_unknown_tenant_is_not_found(session_factory: Sessions) -> None:
    async with session_factory.begin() as s:
        with pytest.raises(NotFound):
            await queries.create_api_key(s, uuid.uuid4(), "orphan")


# -- base models -------------------------------------------------------------------------------


async def test_base_model_upsert_round_trips_spec_and_replaces_prices(session_factory: Sessions) -> None:
    name = f"tiny-{_suffix()}"
    async with session_factory.begin() as s:
        first = await queries.upsert_base_model(s, _spec(name), 0.1, Decimal("0.25"))
    assert first.input_price_per_mtok == Decimal("0.1")
    async with session_factory.begin() as s:
        second = await queries.upsert_base_model(s, _spec(name), 1.5, 3)
    assert (second.input_price_per_mtok, second.output_price_per_mtok) == (Decimal("1.5"), Decimal(3))
    assert second.updated_at >= first.updated_at
    async with session_factory() as s:
        row = await queries.get_base_model(s, name)
        assert row is not None and queries.base_model_spec(row) == _spec(name)
        assert name in [m.name for m in await queries.list_base_models(s)]
        with pytest.raises(InvalidArgument):
            await queries.upsert_base_model(s, _spec(name), -1, 0)


async def test_each_price_change_is_kept_in_the_history_and_a_re_upsert_adds_nothing(
    session_factory: Sessions,
) -> None:
    name = f"priced-{_suffix()}"
    for prices in ((0.1, 0.2), (0.1, 0.2), (0.3, 0.2)):
        async with session_factory.begin() as s:
            await queries.upsert_base_model(s, _spec(name), *prices)
    async with session_factory() as s:
        rows = (
            await s.execute(
                select(BaseModelPrice.input_price_per_mtok, BaseModelPrice.output_price_per_mtok)
                .where(BaseModelPrice.base_model == name)
                .order_by(BaseModelPrice.effective_from)
            )
        ).all()
    assert [tuple(r) for r in rows] == [(Decimal("0.1"), Decimal("0.2")), (Decimal("0.3"), Decimal("0.2"))]


# -- adapters ----------------------------------------------------------------------------------


async def test_versions_increase_and_earlier_versions_stay_unchanged(session_factory: Sessions) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    async with session_factory.begin() as s:
        v1 = await _register(s, tenant.id, "support-bot", model, digest=_digest("one"))
    async with session_factory.begin() as s:
        v2 = await _register(s, tenant.id, "support-bot", model, digest=_digest("two"))
        other = await _register(s, tenant.id, "other-bot", model)
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.revision < v2.revision < other.revision
    async with session_factory() as s:
        again = await queries.get_adapter(s, tenant.id, "support-bot", 1)
        assert again is not None and again.id == v1.id and again.digest == _digest("one")
        assert again.created_at is not None and again.status == "READY"


async def test_concurrent_registrations_of_one_name_get_distinct_versions(session_factory: Sessions) -> None:
    tenant, model = await _tenant_and_model(session_factory)

    async def register() -> int:
        async with session_factory.begin() as s:
            return (await _register(s, tenant.id, "racy", model)).version

    versions = await asyncio.gather(*(register() for _ in range(6)))
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]


async def test_second_writer_waits_for_first_to_commit(session_factory: Sessions) -> None:
    """Two open transactions: the second registration blocks on the first, then takes the next version."""
    tenant, model = await _tenant_and_model(session_factory)
    async with session_factory() as first:
        async with first.begin():
            v1 = await _register(first, tenant.id, "locked", model)

            async def second() -> Adapter:
                async with session_factory.begin() as s:
                    return await _register(s, tenant.id, "locked", model)

            waiting = asyncio.create_task(second())
            await asyncio.sleep(0.3)
            assert not waiting.done(), "the second writer did not wait for the first transaction"
        v2 = await asyncio.wait_for(waiting, 10)
    assert (v1.version, v2.version) == (1, 2)
    assert v2.revision > v1.revision


async def test_latest_resolves_to_highest_ready_version(session_factory: Sessions) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    async with session_factory.begin() as s:
        v1 = await _register(s, tenant.id, "bot", model)
        v2 = await _register(s, tenant.id, "bot", model)
        await _register(s, tenant.id, "bot", model, status="VALIDATING")
    async with session_factory() as s:
        latest = await queries.get_adapter(s, tenant.id, "bot", None)
        assert latest is not None and latest.id == v2.id
    async with session_factory.begin() as s:
        await queries.archive_adapter(s, v2.id)
    async with session_factory() as s:
        latest = await queries.get_adapter(s, tenant.id, "bot", None)
        assert latest is not None and latest.id == v1.id
        assert await queries.get_adapter(s, tenant.id, "bot", 9) is None
        assert await queries.get_adapter(s, tenant.id, "nobody", None) is None


async def test_another_tenants_adapter_is_invisible(session_factory: Sessions) -> None:
    owner, model = await _tenant_and_model(session_factory)
    stranger, _ = await _tenant_and_model(session_factory)
    async with session_factory.begin() as s:
        adapter = await _register(s, owner.id, "private", model)
    async with session_factory() as s:
        assert await queries.get_adapter(s, stranger.id, "private", None) is None
        assert await queries.get_adapter(s, stranger.id, "private", 1) is None
        assert await queries.get_adapter_by_id(s, adapter.id, stranger.id) is None
        assert (await queries.get_adapter_by_id(s, adapter.id, owner.id)) is not None
        assert (await queries.get_adapter_by_id(s, adapter.id, None)) is not None
        rows, _ = await queries.list_adapters(s, tenant_id=stranger.id)
        assert rows == []


async def test_pagination_returns_every_row_exactly_once_in_order(session_factory: Sessions) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    async with session_factory.begin() as s:
        for name in ("b-bot", "a-bot", "c-bot"):
            for _ in range(3):
                await _register(s, tenant.id, name, model)
        await _register(s, tenant.id, "failed-bot", model, status="FAILED", failure_reason="bad shapes")

    seen: list[tuple[str, int]] = []
    token: str | None = None
    pages = 0
    async with session_factory() as s:
        while True:
            rows, token = await queries.list_adapters(
                s, tenant_id=tenant.id, status="READY", page_size=4, page_token=token
            )
            seen += [(r.name, r.version) for r in rows]
            pages += 1
            if token is None:
                break
            # A row inserted behind the cursor must not shift later pages.
            if pages == 1:
                async with session_factory.begin() as w:
                    await _register(w, tenant.id, "a-bot", model)
    expected = [(n, v) for n in ("a-bot", "b-bot", "c-bot") for v in (1, 2, 3)]
    assert seen == expected
    assert pages == 3

    async with session_factory() as s:
        rows, token = await queries.list_adapters(s, tenant_id=tenant.id, base_model=model, page_size=1000)
        assert token is None and len(rows) == 11
        with pytest.raises(InvalidArgument, match="page_token"):
            await queries.list_adapters(s, tenant_id=tenant.id, page_token="garbage")
        with pytest.raises(InvalidArgument):
            await queries.list_adapters(s, page_size=0)


async def test_archive_bumps_revision_and_is_idempotent(session_factory: Sessions) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    async with session_factory.begin() as s:
        adapter = await _register(s, tenant.id, "retiring", model)
        validating = await _register(s, tenant.id, "pending", model, status="VALIDATING")
    async with session_factory.begin() as s:
        archived = await queries.archive_adapter(s, adapter.id)
    assert archived.status == "ARCHIVED"
    assert archived.revision > adapter.revision
    assert archived.updated_at >= adapter.updated_at
    async with session_factory.begin() as s:
        again = await queries.archive_adapter(s, adapter.id)
        assert again.revision == archived.revision
        with pytest.raises(Conflict, match="VALIDATING"):
            await queries.archive_adapter(s, validating.id)
    async with session_factory.begin() as s:
        with pytest.raises(NotFound):
            await queries.archive_adapter(s, uuid.uuid4())


async def test_validation_lifecycle_moves_through_named_transitions(session_factory: Sessions) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    async with session_factory.begin() as s:
        a = await _register(s, tenant.id, "life", model, status="VALIDATING")
        b = await _register(s, tenant.id, "life", model, status="VALIDATING")
    async with session_factory.begin() as s:
        ready = await queries.set_adapter_status(s, a.id, "READY")
        failed = await queries.set_adapter_status(s, b.id, "FAILED", "lora_B.weight has the wrong shape")
        with pytest.raises(InvalidArgument, match="failure_reason"):
            await queries.set_adapter_status(s, b.id, "FAILED")
    assert (ready.status, failed.status, failed.failure_reason) == (
        "READY",
        "FAILED",
        "lora_B.weight has the wrong shape",
    )
    async with session_factory.begin() as s:
        with pytest.raises(Conflict, match="READY and cannot become VALIDATING"):
            await queries.set_adapter_status(s, a.id, "VALIDATING")


async def test_changes_since_are_ordered_by_revision_with_latest_state(session_factory: Sessions) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    async with session_factory() as s:
        start = await queries.latest_adapter_revision(s)
    async with session_factory.begin() as s:
        first = await _register(s, tenant.id, "feed-a", model)
    async with session_factory.begin() as s:
        second = await _register(s, tenant.id, "feed-b", model)
    async with session_factory.begin() as s:
        await queries.archive_adapter(s, first.id)
    async with session_factory() as s:
        changes = await queries.adapter_changes_since(s, start, 100)
        mine = [c for c in changes if c.tenant_id == tenant.id]
        assert [(c.id, c.status) for c in mine] == [(second.id, "READY"), (first.id, "ARCHIVED")]
        revisions = [c.revision for c in changes]
        assert revisions == sorted(revisions) and all(r > start for r in revisions)
        assert len(await queries.adapter_changes_since(s, start, 1)) == 1


async def test_committed_adapter_change_wakes_a_listener(
    session_factory: Sessions, database_url: str
) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    payloads: list[str] = []
    async with db.listen_adapter_changes(database_url, payloads.append) as changes:
        assert changes.listening
        assert await changes.wait(0.05) is False
        async with session_factory() as s, s.begin():
            adapter = await _register(s, tenant.id, "notified", model)
            await s.flush()
            assert await changes.wait(0.2) is False, "notified before commit"
        assert await changes.wait(5) is True
        assert str(adapter.revision) in payloads
        assert changes.latest_revision >= adapter.revision


async def test_a_lost_listen_connection_is_reopened_and_wakes_watchers_to_catch_up(
    session_factory: Sessions, database_url: str, postgres_admin_url: str
) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    payloads: list[str] = []
    async with db.listen_adapter_changes(database_url, payloads.append) as changes:
        assert changes.listening and changes.backend_pid is not None
        # The server drops the connection (what a PostgreSQL restart or failover does to it).
        with psycopg.connect(db.libpq_url(postgres_admin_url), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (changes.backend_pid,))
        deadline = time.monotonic() + 10
        while changes.reopened == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert changes.reopened == 1 and changes.listening
        # Reopening woke watchers with an empty payload: re-read from your last revision.
        assert "" in payloads
        await changes.wait(0)
        async with session_factory() as s, s.begin():
            adapter = await _register(s, tenant.id, "after-reopen", model)
        # Woken by NOTIFY on the new connection, well before the polling timeout would.
        assert await changes.wait(5) is True
        assert str(adapter.revision) in payloads


async def test_a_pending_change_is_taken_by_a_zero_timeout_wait() -> None:
    # CI once saw `wait(0)` leave the reopening's wake-up pending, so the next wait returned
    # before the NOTIFY it was meant to see had arrived.
    changes = db.AdapterChanges(None)
    changes._wake("")
    assert await changes.wait(0) is True
    assert await changes.wait(0) is False
    assert await changes.wait(0.01) is False


async def test_listener_falls_back_to_polling_when_it_cannot_connect() -> None:
    async with db.listen_adapter_changes("postgresql://nobody@127.0.0.1:1/none") as changes:
        assert not changes.listening
        assert await changes.wait(0.05) is False


async def test_digest_in_use_sees_every_version(session_factory: Sessions) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    digest = _digest()
    async with session_factory.begin() as s:
        assert not await queries.digest_in_use(s, digest)
        await _register(s, tenant.id, "shared", model, digest=digest)
    async with session_factory() as s:
        assert await queries.digest_in_use(s, digest)


async def test_adapter_for_unknown_base_model_or_bad_variant_is_refused(session_factory: Sessions) -> None:
    tenant, model = await _tenant_and_model(session_factory)
    async with session_factory.begin() as s:
        with pytest.raises(NotFound, match="UpsertBaseModel"):
            await _register(s, tenant.id, "x", "no-such-model")
    async with session_factory.begin() as s:
        with pytest.raises(InvalidArgument, match="variant"):
            await _register(s, tenant.id, "x", model, variant="QLORA")
    with pytest.raises(IntegrityError, match="ck_adapters_digest_sha256"):
        async with session_factory.begin() as s:
            await _register(s, tenant.id, "x", model, digest="md5:abc")


# -- workers -----------------------------------------------------------------------------------


async def test_worker_is_live_only_within_ttl_of_its_heartbeat(session_factory: Sessions) -> None:
    _, model = await _tenant_and_model(session_factory)
    worker_id = f"w-{_suffix()}"
    async with session_factory.begin() as s:
        await queries.register_worker(s, worker_id, "127.0.0.1:6000", model)
    async with session_factory() as s:
        live = await queries.list_live_workers(s, model, 30)
        assert [w.worker_id for w in live] == [worker_id]
        assert await queries.list_live_workers(s, f"{model}-other", 30) == []
    async with session_factory.begin() as s:
        await s.execute(
            text("UPDATE workers SET last_heartbeat_at = now() - interval '20 seconds' WHERE worker_id = :w"),
            {"w": worker_id},
        )
    async with session_factory() as s:
        assert worker_id not in [w.worker_id for w in await queries.list_live_workers(s, model, 15)]
        assert worker_id in [w.worker_id for w in await queries.list_live_workers(s, model, 30)]
    async with session_factory.begin() as s:
        assert await queries.heartbeat_worker(s, worker_id) is True
        assert await queries.heartbeat_worker(s, "never-registered") is False
    async with session_factory() as s:
        assert worker_id in [w.worker_id for w in await queries.list_live_workers(s, None, 15)]
    async with session_factory.begin() as s:
        moved = await queries.register_worker(s, worker_id, "127.0.0.1:7000", model)
        assert moved.address == "127.0.0.1:7000"


# -- embedded PostgreSQL -----------------------------------------------------------------------


async def test_embedded_postgres_starts_once_persists_and_stops() -> None:
    with outside_pytest_tmp("loraplex-embedded-") as home:
        await _embedded_round_trip(home)


async def _embedded_round_trip(tmp_path: Path) -> None:
    url = db.start_embedded_postgres(tmp_path)
    pid = db.embedded_postgres_pid(tmp_path)
    try:
        assert pid is not None and (tmp_path / "postgres" / "PG_VERSION").exists()
        # The registry's own path: asyncpg over the server's Unix socket, as the URL names it.
        engine = db.create_engine(url)
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_database()")) == "loraplex"
        await engine.dispose()
        with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("loraplex",)
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")

        # Another process joining the same data directory reuses the running server.
        script = (
            "import sys; from pathlib import Path; from services.registry import db; "
            "home = Path(sys.argv[1]); db.start_embedded_postgres(home); "
            "print(db.embedded_postgres_pid(home))"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert int(out.stdout.strip().splitlines()[-1]) == pid
        assert db.embedded_postgres_pid(tmp_path) == pid, "the other process's exit stopped our server"
    finally:
        db.stop_embedded_postgres(tmp_path)
    assert db.embedded_postgres_pid(tmp_path) is None

    url = db.start_embedded_postgres(tmp_path)
    try:
        with psycopg.connect(db.libpq_url(url)) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
    finally:
        db.stop_embedded_postgres(tmp_path)
