"""Configuration from `LORAPLEX_*` environment variables, validated once at start.

Each service reads one frozen dataclass; a bad value fails fast with a sentence naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.object_store import AllowedSources
    from services.common.tls import TlsFiles

PREFIX = "LORAPLEX_"
DEFAULT_MODEL = "smollm2-135m-instruct"


class ConfigError(ValueError):
    """A LORAPLEX_* variable has a value the service cannot use."""


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


def parse_bytes(name: str, raw: str) -> int:
    """'512MiB', '64m', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", raw)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"{name}={raw!r} is not a size; use bytes or a unit like 512MiB or 4GiB")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


class Env:
    """Typed reads of LORAPLEX_* variables from one mapping (os.environ by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if environ is None else environ

    def raw(self, key: str) -> str | None:
        value = self._env.get(PREFIX + key)
        return value if value not in (None, "") else None

    def exact(self, key: str) -> str | None:
        """The value as set, empty included (None: unset), for variables where empty means off."""
        return self._env.get(PREFIX + key)

    def text(self, key: str, default: str) -> str:
        return self.raw(key) or default

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{key}={raw!r} is not an integer") from None
        if value < minimum:
            raise ConfigError(f"{PREFIX}{key}={value} must be >= {minimum}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{key}={raw!r} is not a number") from None
        if value < minimum:
            raise ConfigError(f"{PREFIX}{key}={value} must be >= {minimum}")
        return value

    def size(self, key: str, default: int) -> int:
        raw = self.raw(key)
        return default if raw is None else parse_bytes(PREFIX + key, raw)

    def csv(self, key: str) -> tuple[str, ...]:
        raw = self.raw(key)
        return tuple(p.strip() for p in raw.split(",") if p.strip()) if raw else ()

    def flag(self, key: str, default: bool) -> bool:
        raw = self.raw(key)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{PREFIX}{key}={raw!r} is not a boolean; use true or false")


def loraplex_home(env: Env | None = None) -> Path:
    """Root of local state: models, embedded PostgreSQL, adapter store, caches."""
    env = env or Env()
    return Path(env.text("HOME", str(Path.home() / ".cache" / "loraplex"))).expanduser()


def _check_address(name: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{PREFIX}{name}={value!r} must be host:port, e.g. 127.0.0.1:50051")
    return value


@dataclass(frozen=True)
class RegistrySettings:
    home: Path
    listen: str
    # None: start (or reuse) an embedded PostgreSQL under home/postgres.
    database_url: str | None
    admin_token: str
    # "file:///dir" or "s3://bucket/prefix": where uploaded adapters are stored.
    adapter_store: str
    allowed_buckets: tuple[str, ...]
    allowed_file_roots: tuple[str, ...]
    max_adapter_rank: int
    max_adapter_bytes: int
    worker_ttl_s: float = 15.0
    extra: dict[str, str] = field(default_factory=dict)
    # This service's mTLS identity; None: plaintext (LORAPLEX_INSECURE_PLAINTEXT, trusted networks only).
    tls: TlsFiles | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RegistrySettings:
        env = Env(environ)
        home = loraplex_home(env)
        admin_token = env.raw("ADMIN_TOKEN")
        if admin_token is None:
            raise ConfigError(f"{PREFIX}ADMIN_TOKEN is required: admin RPCs are refused without it")
        if len(admin_token) < 16:
            raise ConfigError(f"{PREFIX}ADMIN_TOKEN must be at least 16 characters")
        from services.common.tls import Role, tls_files

        store, buckets = _adapter_store(env, home)
        return cls(
            home=home,
            listen=_check_address("REGISTRY_LISTEN", env.text("REGISTRY_LISTEN", "127.0.0.1:50051")),
            database_url=env.raw("DATABASE_URL"),
            admin_token=admin_token,
            adapter_store=store,
            allowed_buckets=buckets,
            allowed_file_roots=env.csv("ALLOWED_FILE_ROOTS"),
            max_adapter_rank=env.integer("MAX_ADAPTER_RANK", 256, minimum=1),
            max_adapter_bytes=env.size("MAX_ADAPTER_BYTES", 512 << 20),
            worker_ttl_s=env.number("WORKER_TTL_S", 15.0, minimum=1.0),
            tls=tls_files(environ, Role.REGISTRY),
        )


def _adapter_store(env: Env, home: Path) -> tuple[str, tuple[str, ...]]:
    """LORAPLEX_ADAPTER_STORE and the buckets adapters may be read from (the store's own included)."""
    store = env.text("ADAPTER_STORE", (home / "adapters").as_uri())
    if not store.startswith(("file://", "s3://")):
        raise ConfigError(f"{PREFIX}ADAPTER_STORE={store!r} must start with file:// or s3://")
    buckets = env.csv("ALLOWED_BUCKETS")
    if store.startswith("s3://"):
        store_bucket = store[5:].split("/", 1)[0]
        buckets = tuple(dict.fromkeys((*buckets, store_bucket)))
    return store, buckets


def worker_adapter_sources(env: Env, home: Path) -> AllowedSources:
    """Where a worker may fetch adapters from: the registry's store and allowed buckets and roots.

    Workers read the registry's LORAPLEX_ADAPTER_STORE, LORAPLEX_ALLOWED_BUCKETS and
    LORAPLEX_ALLOWED_FILE_ROOTS, so a reference naming anything else is refused before any byte
    is read (an adapter the registry accepted always lives in its store).
    """
    from services.common.object_store import AllowedSources, file_uri_path

    store, buckets = _adapter_store(env, home)
    roots = env.csv("ALLOWED_FILE_ROOTS")
    if store.startswith("file://"):
        roots = (str(file_uri_path(store)), *roots)
    return AllowedSources(buckets=buckets, file_roots=roots)


@dataclass(frozen=True)
class ClientSettings:
    """What the CLI needs to reach the services."""

    registry: str
    router: str
    admin_token: str | None
    api_key: str | None
    # The operator identity presented to the registry (mTLS); None: plaintext or not configured.
    tls: TlsFiles | None = None
    # Why `tls` is None when plaintext was not asked for: registry commands say it instead of failing
    # at the TLS handshake.
    tls_problem: str = ""
    # The CA the router's certificate is checked against; None: plaintext to the router.
    router_ca: Path | None = None

    def registry_tls(self) -> TlsFiles | None:
        """The operator identity, or ConfigError saying how to make one."""
        if self.tls is None and self.tls_problem:
            raise ConfigError(self.tls_problem)
        return self.tls

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        from services.common.tls import Role, client_ca, tls_files

        env = Env(environ)
        tls, problem = None, ""
        try:
            tls = tls_files(environ, Role.OPERATOR)
        except ConfigError as exc:
            problem = str(exc)
        return cls(
            registry=_check_address("REGISTRY", env.text("REGISTRY", "127.0.0.1:50051")),
            router=_check_address("ROUTER", env.text("ROUTER", "127.0.0.1:50050")),
            admin_token=env.raw("ADMIN_TOKEN"),
            api_key=env.raw("API_KEY"),
            tls=tls,
            tls_problem=problem,
            router_ca=None if env.flag("INSECURE_PLAINTEXT", False) else client_ca(environ),
        )


_WORKER_DTYPES = ("auto", "bfloat16", "float32")
# LORAPLEX_MAX_PROMPT_BYTES: prompt text over this many UTF-8 bytes is refused before tokenizing.
# One variable and one default for the router (which refuses first) and the worker (which can be
# called directly, so checks again).
DEFAULT_MAX_PROMPT_BYTES = 1 << 20


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class WorkerSettings:
    """One worker: one base model on one device, many adapters.

    Adapter tiers, each with a byte budget that is never exceeded (loads in progress count):
    LORAPLEX_DEVICE_ADAPTER_BYTES (default 512MiB) adapters in engine slots;
    LORAPLEX_HOST_ADAPTER_BYTES (default 2GiB, 0 turns the tier off) adapters kept in host memory
    already in the device layout (pinned on CUDA), so coming back is one copy;
    LORAPLEX_DISK_ADAPTER_BYTES (default 20GiB) verified files under <home>/worker-cache.
    LORAPLEX_WORKER_THREADS (default 0: every core this process may run on): the engine's torch
    threads, set once at start.
    LORAPLEX_MAX_PROMPT_BYTES (default 1MiB): prompt text (or chat contents) over this is refused
    with INVALID_ARGUMENT before it is tokenized.
    Every adapter counts with one size in every tier: the file bytes its AdapterRef names
    (`size_bytes`, or the fetched files' size when the reference has none), so the router and
    the worker agree on what fits. Sizes take units: 512MiB, 4GiB, 1048576.
    LORAPLEX_ADAPTER_IDLE_TTL_S (default 300): an adapter unused this long leaves the device
    (to host when it fits), unless keep_warm. LORAPLEX_OBJECT_STORE_TIMEOUT_S (default 20): connect
    and read timeout of each object-store call (two attempts), so a hung store fails a load.
    """

    home: Path
    listen: str
    worker_id: str
    model: str
    device: str
    dtype: str
    max_batch_size: int
    max_waiting: int
    # None: the engine sizes the KV cache from memory.
    kv_cache_blocks: int | None
    default_max_tokens: int
    max_adapter_bytes: int
    device_adapter_bytes: int = 512 << 20
    host_adapter_bytes: int = 2 << 30
    disk_adapter_bytes: int = 20 << 30
    adapter_idle_ttl_s: float = 300.0
    object_store_timeout_s: float = 20.0
    drain_grace_s: float = 30.0
    # With a registry, the worker registers itself (advertising `advertise`) and heartbeats, as the
    # worker identity of its certificate (the advertised host must be one of the certificate's SANs).
    registry: str | None = None
    advertise: str = ""
    metrics_port: int = 0  # Prometheus /metrics; 0: off
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    # torch intra-op threads for the engine; from_env resolves 0 (the default) to every core this
    # process may run on (its CPU affinity, which a container's cpuset narrows).
    worker_threads: int = 1
    # Where adapters may be fetched from; the default allows nothing (see worker_adapter_sources).
    adapter_sources: AllowedSources = field(default_factory=lambda: _no_sources())
    # This service's mTLS identity; None: plaintext (LORAPLEX_INSECURE_PLAINTEXT, trusted networks only).
    tls: TlsFiles | None = None

    @property
    def cache_dir(self) -> Path:
        """Content-addressed local copies of adapters: <cache_dir>/<digest hex>/."""
        return self.home / "worker-cache"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        env = Env(environ)
        listen = _check_address("WORKER_LISTEN", env.text("WORKER_LISTEN", "127.0.0.1:50052"))
        device = env.text("DEVICE", "auto").lower()
        if device == "auto":
            device = _default_device()
        elif not (device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device)):
            raise ConfigError(f"{PREFIX}DEVICE={device!r} must be auto, cpu, cuda or cuda:N")
        dtype = env.text("DTYPE", "auto").lower()
        if dtype not in _WORKER_DTYPES:
            raise ConfigError(f"{PREFIX}DTYPE={dtype!r} must be one of {', '.join(_WORKER_DTYPES)}")
        kv_blocks = env.integer("KV_CACHE_BLOCKS", 0, minimum=0)
        if kv_blocks == 1:
            raise ConfigError(f"{PREFIX}KV_CACHE_BLOCKS=1 is too small; use 0 (auto) or at least 2")
        import socket

        from services.common.tls import Role, tls_files

        home = loraplex_home(env)
        return cls(
            home=home,
            listen=listen,
            worker_id=env.text("WORKER_ID", f"{socket.gethostname()}-{listen.rpartition(':')[2]}"),
            model=env.text("MODEL", DEFAULT_MODEL),
            device=device,
            dtype=dtype,
            max_batch_size=env.integer("MAX_BATCH_SIZE", 32, minimum=1),
            max_waiting=env.integer("MAX_WAITING", 256, minimum=1),
            kv_cache_blocks=kv_blocks or None,
            default_max_tokens=env.integer("DEFAULT_MAX_TOKENS", 256, minimum=1),
            max_adapter_bytes=env.size("MAX_ADAPTER_BYTES", 512 << 20),
            device_adapter_bytes=_positive_size(env, "DEVICE_ADAPTER_BYTES", 512 << 20),
            host_adapter_bytes=env.size("HOST_ADAPTER_BYTES", 2 << 30),
            disk_adapter_bytes=_positive_size(env, "DISK_ADAPTER_BYTES", 20 << 30),
            adapter_idle_ttl_s=env.number("ADAPTER_IDLE_TTL_S", 300.0, minimum=1.0),
            object_store_timeout_s=env.number("OBJECT_STORE_TIMEOUT_S", 20.0, minimum=0.1),
            drain_grace_s=env.number("DRAIN_GRACE_S", 30.0, minimum=0.0),
            registry=_worker_registry(env),
            advertise=_check_address("WORKER_ADVERTISE", env.text("WORKER_ADVERTISE", listen)),
            metrics_port=env.integer("WORKER_METRICS_PORT", 0, minimum=0),
            max_prompt_bytes=_max_prompt_bytes(env),
            worker_threads=env.integer("WORKER_THREADS", 0, minimum=0) or available_cores(),
            adapter_sources=worker_adapter_sources(env, home),
            tls=tls_files(environ, Role.WORKER),
        )


def _no_sources() -> AllowedSources:
    from services.common.object_store import AllowedSources

    return AllowedSources(buckets=(), file_roots=())


def _positive_size(env: Env, key: str, default: int) -> int:
    value = env.size(key, default)
    if value <= 0:
        raise ConfigError(f"{PREFIX}{key} must be more than 0 bytes; no adapter could load")
    return value


def _max_prompt_bytes(env: Env) -> int:
    value = env.size("MAX_PROMPT_BYTES", DEFAULT_MAX_PROMPT_BYTES)
    if value <= 0:
        raise ConfigError(f"{PREFIX}MAX_PROMPT_BYTES must be more than 0 bytes; no prompt could be served")
    return value


def _worker_registry(env: Env) -> str | None:
    registry = env.raw("REGISTRY")
    return None if registry is None else _check_address("REGISTRY", registry)


def _idempotency_window(env: Env) -> int:
    window = env.integer("IDEMPOTENCY_WINDOW_S", 86_400, minimum=1)
    if window > 10 * 365 * 86_400:
        raise ConfigError(f"{PREFIX}IDEMPOTENCY_WINDOW_S={window} must be at most ten years, in seconds")
    return window


@dataclass(frozen=True)
class RouterSettings:
    """The router: public InferenceService endpoint, worker pool, usage spool and shipper."""

    home: Path
    listen: str
    # The router calls the registry (AuthenticateApiKey, WatchAdapters, RecordUsage, ...) as the router
    # identity of its certificate: it holds no admin token.
    registry: str
    # Static worker addresses (host:port); the registry's ListWorkers adds to them when discovery is on.
    workers: tuple[str, ...]
    discover_workers: bool
    spool_dir: Path
    spool_max_bytes: int
    max_inflight: int
    # A key revoked at the registry stops working here within auth_cache_ttl_s.
    auth_cache_ttl_s: float
    auth_negative_ttl_s: float
    # While the registry is unreachable, keys it confirmed within this window keep working.
    auth_stale_s: float
    adapter_cache_ttl_s: float
    route_load_eps: float
    worker_refresh_s: float
    ship_interval_s: float
    ship_batch: int
    retry_pushback_ms: int
    metrics_port: int
    # In-flight streams are checkpointed this often: the most a router crash can leave unbilled.
    checkpoint_s: float = 1.0
    # affinity (residency, queue, KV, rendezvous home) or a baseline: least_loaded, round_robin.
    policy: str = "affinity"
    # A worker whose state stream is silent this long is out of routing (workers heartbeat every 2s).
    worker_stale_s: float = 3.0
    # A worker that started a stream and then sends nothing for this long is treated as failed:
    # before the first token the request moves to another worker, after it the client gets
    # UNAVAILABLE and is billed for the tokens it received.
    token_timeout_s: float = 30.0
    # A worker with more than this fraction of its KV cache in use counts as over the load bound.
    route_kv_full: float = 0.9
    # How often keep-warm adapters are checked (and prefetched where no worker has them on device).
    keep_warm_s: float = 2.0
    # A text prompt (or the chat messages together) over this many UTF-8 bytes is refused at once.
    max_prompt_bytes: int = 1 << 20
    # This router's share of each tenant's rate and concurrency limits: 1/N with N routers.
    limit_share: float = 1.0
    # How often a tenant's month-to-date usage is re-read from the ledger (monthly quotas).
    quota_refresh_s: float = 2.0
    # A client-chosen request id runs at most once per tenant within this window (Stripe's 24 h).
    idempotency_window_s: int = 86_400
    # This service's mTLS identity toward workers and the registry; None: plaintext
    # (LORAPLEX_INSECURE_PLAINTEXT, trusted networks only).
    tls: TlsFiles | None = None
    # TLS on the public endpoint (no client certificates: tenants send API keys); None: plaintext.
    public_tls: PublicTls | None = None
    # host:port of the OpenAI-compatible HTTP API (HTTPS with public_tls); "" turns it off.
    http_listen: str = ""
    # Requests for a base model with no live worker wait for one (the router as activator): at most
    # this many per model, each at most cold_wait_s and never past its deadline. 0 turns it off.
    cold_queue: int = 256
    cold_wait_s: float = 120.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RouterSettings:
        env = Env(environ)
        from services.common.tls import Role, tls_files

        home = loraplex_home(env)
        workers = tuple(_check_address("WORKERS", w) for w in env.csv("WORKERS"))
        ship_batch = env.integer("ROUTER_SHIP_BATCH", 500, minimum=1)
        if ship_batch > 10_000:
            raise ConfigError(f"{PREFIX}ROUTER_SHIP_BATCH={ship_batch} must be <= 10000 (RecordUsage limit)")
        spool_max = env.size("ROUTER_SPOOL_MAX_BYTES", 1 << 30)
        # Small caps are for drills (bench/chaos.py fills one on purpose); below this one a
        # handful of records would already refuse traffic.
        if spool_max < 64 << 10:
            raise ConfigError(f"{PREFIX}ROUTER_SPOOL_MAX_BYTES must be at least 64KiB")
        return cls(
            home=home,
            listen=_check_address("ROUTER_LISTEN", env.text("ROUTER_LISTEN", "127.0.0.1:50050")),
            registry=_check_address("REGISTRY", env.text("REGISTRY", "127.0.0.1:50051")),
            workers=workers,
            discover_workers=env.flag("ROUTER_DISCOVER_WORKERS", True),
            spool_dir=Path(env.text("SPOOL_DIR", str(home / "router-spool"))).expanduser(),
            spool_max_bytes=spool_max,
            max_inflight=env.integer("MAX_INFLIGHT", 1024, minimum=1),
            auth_cache_ttl_s=env.number("AUTH_CACHE_TTL_S", 30.0),
            auth_negative_ttl_s=env.number("AUTH_NEGATIVE_TTL_S", 2.0),
            auth_stale_s=env.number("AUTH_STALE_S", 300.0),
            adapter_cache_ttl_s=env.number("ADAPTER_CACHE_TTL_S", 300.0),
            route_load_eps=env.number("ROUTE_LOAD_EPS", DEFAULT_ROUTE_LOAD_EPS, minimum=0.01),
            worker_refresh_s=env.number("WORKER_REFRESH_S", 1.0, minimum=0.05),
            ship_interval_s=env.number("ROUTER_SHIP_INTERVAL_S", 1.0, minimum=0.01),
            ship_batch=ship_batch,
            retry_pushback_ms=env.integer("ROUTER_RETRY_PUSHBACK_MS", 250, minimum=0),
            checkpoint_s=env.number("ROUTER_CHECKPOINT_S", 1.0, minimum=0.01),
            metrics_port=env.integer("ROUTER_METRICS_PORT", 0),
            policy=_router_policy(env),
            # Workers heartbeat every 2 s (services.worker.state.HEARTBEAT_S): any less and idle
            # workers would drop out of routing between two heartbeats.
            worker_stale_s=env.number("ROUTER_WORKER_STALE_S", 3.0, minimum=2.5),
            # Below a second, an ordinary scheduling hiccup (a long prefill batch) would cut streams.
            token_timeout_s=env.number("ROUTER_TOKEN_TIMEOUT_S", 30.0, minimum=1.0),
            route_kv_full=_fraction(env, "ROUTE_KV_FULL", 0.9),
            keep_warm_s=env.number("ROUTER_KEEP_WARM_S", 2.0, minimum=0.05),
            max_prompt_bytes=_prompt_bytes(env),
            limit_share=_fraction(env, "ROUTER_LIMIT_SHARE", 1.0),
            quota_refresh_s=env.number("ROUTER_QUOTA_REFRESH_S", 2.0, minimum=0.1),
            idempotency_window_s=_idempotency_window(env),
            tls=tls_files(environ, Role.ROUTER),
            public_tls=_public_tls(env),
            http_listen=_http_listen(env),
            cold_queue=env.integer("ROUTER_COLD_QUEUE", 256, minimum=0),
            cold_wait_s=env.number("ROUTER_COLD_WAIT_S", 120.0, minimum=0.0),
        )


DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"


def _http_listen(env: Env) -> str:
    """LORAPLEX_HTTP_LISTEN: unset is the default, set but empty turns the HTTP API off."""
    value = env.exact("HTTP_LISTEN")
    if value is None:
        return DEFAULT_HTTP_LISTEN
    value = value.strip()
    return _check_address("HTTP_LISTEN", value) if value else ""


def _prompt_bytes(env: Env) -> int:
    value = env.size("MAX_PROMPT_BYTES", 1 << 20)
    if value < 1024:
        raise ConfigError(f"{PREFIX}MAX_PROMPT_BYTES={value} is too small; use at least 1KiB")
    return value


@dataclass(frozen=True)
class PublicTls:
    """The router's public certificate and key (PEM)."""

    cert: Path
    key: Path


def _public_tls(env: Env) -> PublicTls | None:
    cert, key = env.raw("ROUTER_TLS_CERT"), env.raw("ROUTER_TLS_KEY")
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(f"set both {PREFIX}ROUTER_TLS_CERT and {PREFIX}ROUTER_TLS_KEY, or neither")
    for name, value in (("ROUTER_TLS_CERT", cert), ("ROUTER_TLS_KEY", key)):
        if not Path(value).expanduser().is_file():
            raise ConfigError(f"{PREFIX}{name}={value} is not a file")
    return PublicTls(cert=Path(cert).expanduser(), key=Path(key).expanduser())


# services.router.policy.DEFAULT_LOAD_EPS (config does not import the router; a unit test keeps them equal).
DEFAULT_ROUTE_LOAD_EPS = 1.0

# The names services.router.policy.PolicyKind accepts (a unit test keeps them in step).
ROUTER_POLICIES = ("affinity", "least_loaded", "round_robin")


def _router_policy(env: Env) -> str:
    policy = env.text("ROUTER_POLICY", "affinity").lower()
    if policy not in ROUTER_POLICIES:
        raise ConfigError(f"{PREFIX}ROUTER_POLICY={policy!r} must be one of {', '.join(ROUTER_POLICIES)}")
    return policy


def _fraction(env: Env, key: str, default: float) -> float:
    value = env.number(key, default)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{PREFIX}{key}={value} must be a fraction in (0, 1]")
    return value
