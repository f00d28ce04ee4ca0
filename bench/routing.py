"""Does adapter-affinity routing save cold loads? `loraplex bench routing --json`

The real stack as processes, as `loraplex dev` starts it: a registry (embedded PostgreSQL unless
LORAPLEX_DATABASE_URL), 3 workers serving the tiny random Llama, and a router. 200 real PEFT
adapters for that model (seeded random LoRA weights, written by PEFT; built once under
.cache/bench-routing/) are uploaded under the demo tenant. Each worker's device holds only
--device-adapters of them (LORAPLEX_DEVICE_ADAPTER_BYTES), with no host tier, so where a request
lands decides whether it loads.

For each policy (LORAPLEX_ROUTER_POLICY = affinity, least_loaded, round_robin) a fresh router and
fresh workers (empty homes: no adapter on any device or disk) replay the same seeded Zipf(alpha)
sequence over the adapters: --warmup requests, then --requests measured ones, from --concurrency
clients, --max-tokens each. A cold load is a request whose Finished event says `cold_start` (its
adapter was not on the serving worker's device). TTFT is measured by the client (call to first
token). Reported per policy: cold loads per 1,000 requests, TTFT p50/p99, requests served away
from the adapter's rendezvous home, errors; plus `modelled_cold_loads_*`, a replay of the same
sequence through each worker's real TierPolicy with every request placed as the policy would with
no load bound (bench/routing_traffic.py; `lru_modelled_*` with plain LRU beside it): the best each
policy could do with these budgets.
Targets: cold_load_ratio (least_loaded / affinity) >= 3 and affinity's TTFT p99 <= least-loaded's.
The headline run gives each worker room for --device-adapters (60: 30% of the adapters per worker,
90% across the three); --sweep repeats affinity and least_loaded at smaller devices, because the
ratio is set mostly by how much of the adapter set the workers' devices hold together: affinity's
point is that three workers cache three different thirds, least-loaded makes each cache the same
hot set.

Measured (2-core CPU, 1,000 warmup + 1,000 requests per run, 6 clients, 208 s in all):
- 60/worker: cold loads per 1,000 affinity 63, least-loaded 242, round-robin 262 -> ratio 3.84;
  TTFT p99 74 / 93 / 77 ms (targets met; no errors);
- 50/worker: 99 vs 260 (2.63), p99 69 vs 79 ms; 30/worker: 187 vs 348 (1.86), p99 77 vs 84 ms.
The model (each worker's own TierPolicy, every request at its home, no spill) bounds affinity at
32 / 71 / 164 per 1,000 for 60 / 50 / 30; the rest is spill: 6-9% of affinity's requests run away
from home when the home carries twice the average load (LORAPLEX_ROUTE_LOAD_EPS=1), costing
12-25 cold loads per 1,000. With the Mirrokni-style eps=0.25 an earlier run spilled 36% of
requests at 30/worker (249 cold loads, ratio 1.40): at 2 requests per worker on average the
bound is 3 in flight, which the Zipf head's home nearly always has.
A cold load here moves a 16 KB adapter, so it adds only ~5-15 ms at p50; TTFT differences between
policies are mostly CPU contention among 3 workers, router, registry and client on 2 cores.
Prints one JSON object last; writes bench/results/routing.json and routing.png.

    python -m bench.routing --json [--requests 1000] [--warmup 1000] [--device-adapters 60] [--sweep 30,50]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.routing_traffic import (
    POLICIES,
    LruCache,
    TierPolicyCache,
    modelled_cold_loads,
    per_thousand,
    percentile,
    zipf_sequence,
)
from services.cli.dev import DEMO_TENANT, Stack, dev_admin_token, dev_env, start_router, start_workers
from services.common.health import wait_serving
from services.common.net import free_port
from services.common.tls import Role, TlsFiles

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DEFAULT_HOME = REPO / ".cache" / "bench-routing"
ADAPTER_PREFIX = "bench-routing"
PROMPT = "Route me to a warm adapter."


@dataclass(frozen=True)
class BenchAdapter:
    name: str
    digest: str


@dataclass
class PolicyRun:
    policy: str
    ttft_ms: list[float] = dataclasses.field(default_factory=list)
    cold: int = 0
    off_home: int = 0
    cold_off_home: int = 0
    ttft_cold_ms: list[float] = dataclasses.field(default_factory=list)  # the cold requests' TTFTs
    # Router counters over the measured requests: routing reasons, failovers.
    router: dict[str, float] = dataclasses.field(default_factory=dict)
    errors: int = 0
    served_by: dict[str, int] = dataclasses.field(default_factory=dict)
    first_error: str = ""
    seconds: float = 0.0


# -- adapters and registry ------------------------------------------------------------------------


def tiny_model_dir(home: Path) -> Path:
    from services.common.base_models import is_complete, models_dir, pull_model
    from services.common.config import DEFAULT_MODEL
    from services.devtools.tiny_model import TINY_LLAMA, build_tiny_llama

    path = models_dir(home) / TINY_LLAMA
    if is_complete(path):
        return path
    # The tiny model borrows SmolLM2's tokenizer; pulling it converts the GGUF once.
    return build_tiny_llama(path, pull_model(DEFAULT_MODEL, home))


def build_adapters(model_dir: Path, count: int, cache: Path) -> list[Path]:
    """`count` distinct PEFT adapters (same shape, seeds 1000+i), each built once into `cache`."""
    from services.common.base_models import build_atomically
    from services.devtools.adapters import AdapterSpec, cache_key, is_adapter_dir

    out = []
    for i in range(count):
        spec = AdapterSpec(
            f"{ADAPTER_PREFIX}-{i:03d}", ("q_proj", "v_proj"), r=8, lora_alpha=16, seed=1000 + i
        )
        dest = cache / f"{spec.name}--{cache_key(model_dir, spec)[:16]}"
        out.append(build_atomically(dest, _builder(model_dir, spec), done=is_adapter_dir))
    return out


def _builder(model_dir: Path, spec: Any) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        from services.devtools.adapters import random_adapter

        random_adapter(model_dir, spec, tmp)

    return build


def adapter_bytes(adapter_dir: Path) -> int:
    """What one adapter counts against a worker's byte budgets: its files' size (as its AdapterRef says)."""
    from services.common.adapter_files import ADAPTER_FILES

    return sum((adapter_dir / name).stat().st_size for name in ADAPTER_FILES)


def register(
    registry: str, token: str, tls: TlsFiles | None, model_dir: Path, dirs: list[Path]
) -> tuple[str, list[BenchAdapter]]:
    """Catalog entry for the tiny model, the demo tenant, an API key, and every adapter uploaded once."""
    from services.client.registry import RegistryClient
    from services.common.adapter_files import adapter_digest
    from services.common.base_models import describe_model
    from services.devtools.tiny_model import TINY_LLAMA
    from services.registry.convert import base_model_pb

    with RegistryClient(registry, token, tls=tls) as c:
        c.upsert_base_model(base_model_pb(describe_model(TINY_LLAMA, model_dir), 0.05, 0.20))
        if DEMO_TENANT not in {t.name for t in c.list_tenants()}:
            c.create_tenant(DEMO_TENANT)
        api_key = c.create_api_key(DEMO_TENANT, "bench-routing").secret
        registered = {a.ref.name: a.ref.digest for a in c.list_adapters(tenant=DEMO_TENANT)}
        adapters = []
        for path in dirs:
            name = path.name.split("--", 1)[0]
            digest = adapter_digest(path)
            if registered.get(name) != digest:
                c.upload_adapter(path, tenant=DEMO_TENANT, name=name, base_model=TINY_LLAMA)
            adapters.append(BenchAdapter(name, digest))
    return api_key, adapters


# -- one policy -----------------------------------------------------------------------------------


def device_budget(slots: int, size: int) -> int:
    # Half an adapter of slack, so rounding never costs a slot.
    return slots * size + size // 2


def worker_env(home: Path, model_dir: Path, slots: int, size: int) -> dict[str, str]:
    """A fresh worker home (the model linked in, nothing cached) and a device budget of `slots` adapters."""
    (home / "models").mkdir(parents=True)
    (home / "models" / model_dir.name).symlink_to(model_dir.resolve())
    return {
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_DTYPE": "float32",
        "LORAPLEX_DEVICE_ADAPTER_BYTES": str(device_budget(slots, size)),
        "LORAPLEX_HOST_ADAPTER_BYTES": "0",
        "LORAPLEX_KV_CACHE_BLOCKS": "256",  # plenty for short requests; no 512 MiB per worker
        # Three workers share a few cores: one thread each keeps them from thrashing.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def homes_of(adapters: list[BenchAdapter], worker_ids: list[str]) -> list[int]:
    """Each adapter's rendezvous home among `worker_ids`, as the router's policy computes it."""
    from services.router.policy import WorkerView, rendezvous_order

    views = [WorkerView(worker_id=w, base_model="") for w in worker_ids]
    return [worker_ids.index(rendezvous_order(a.digest, views)[0].worker_id) for a in adapters]


async def replay(
    router: str,
    api_key: str,
    adapters: list[BenchAdapter],
    sequence: list[int],
    *,
    concurrency: int,
    max_tokens: int,
    run: PolicyRun | None,
    homes: dict[str, str],
    ca: Path | None = None,
) -> None:
    """Sends `sequence` in order from `concurrency` clients; records into `run` (None: warmup)."""
    import grpc

    from services.client.inference import AsyncInferenceClient, GenerateOptions, Sampling
    from services.client.retry import NO_RETRY

    sampling = Sampling(max_tokens=max_tokens, ignore_eos=True)
    next_index = 0

    async def client(conn: AsyncInferenceClient) -> None:
        nonlocal next_index
        while next_index < len(sequence):
            adapter = adapters[sequence[next_index]]
            next_index += 1
            started = time.perf_counter()
            first: float | None = None
            finished: Any = None
            error = ""
            try:
                options = GenerateOptions(adapter=adapter.name, sampling=sampling)
                async for event in conn.generate(PROMPT, options):
                    kind = event.WhichOneof("event")
                    if kind == "delta" and first is None:
                        first = time.perf_counter()
                    elif kind == "finished":
                        finished = event.finished
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            if run is None:
                continue
            if error or finished is None or first is None:
                run.errors += 1
                run.first_error = run.first_error or error or "stream ended without a token or Finished"
                continue
            run.ttft_ms.append((first - started) * 1000)
            if finished.timings.cold_start:
                run.ttft_cold_ms.append(run.ttft_ms[-1])
            worker = finished.worker_id
            off_home = worker != homes[adapter.digest]
            run.cold += finished.timings.cold_start
            run.cold_off_home += finished.timings.cold_start and off_home
            run.served_by[worker] = run.served_by.get(worker, 0) + 1
            run.off_home += off_home

    # One channel per client: a shared HTTP/2 connection would serialise the streams' first bytes.
    # No client retries: the benchmark counts what the router did to each first attempt.
    conns = [
        AsyncInferenceClient(router, api_key, ca=ca, timeout_s=120, retry=NO_RETRY)
        for _ in range(concurrency)
    ]
    try:
        await asyncio.gather(*(client(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))


ROUTER_COUNTERS = ("loraplex_router_routing_decisions_total", "loraplex_router_failovers_total")


def router_counters(metrics_port: int) -> dict[str, float]:
    """The router's routing-decision and failover counters, by label ("reason=home": 412.0)."""
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in ROUTER_COUNTERS and "} " in rest:
            labels, _, value = rest.rpartition("} ")
            key = ("failover " if "failover" in name else "") + labels.replace('"', "")
            out[key] = float(value)
    return out


def run_policy(
    policy: str,
    base: Stack,
    scratch: Path,
    model_dir: Path,
    api_key: str,
    adapters: list[BenchAdapter],
    sequence: list[int],
    args: argparse.Namespace,
    size: int,
) -> PolicyRun:
    run = PolicyRun(policy)
    worker_ids = [f"{policy}-{i}" for i in range(args.workers)]
    homes = homes_of(adapters, worker_ids)
    home_of = {a.digest: worker_ids[h] for a, h in zip(adapters, homes, strict=True)}
    logs = base.logs / policy
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack(
        home=base.home,
        env=base.env,
        registry=base.registry,
        router=f"127.0.0.1:{free_port()}",
        workers=[f"127.0.0.1:{free_port()}" for _ in worker_ids],
        logs=logs,
        procs=[],
        tls=base.tls,
    )
    metrics_port = free_port()
    router_env = dict(kv.split("=", 1) for kv in args.router_env)
    envs = []
    for worker_id in worker_ids:
        env = worker_env(
            scratch / f"{policy}-{args.device_adapters}" / worker_id, model_dir, args.device_adapters, size
        )
        envs.append({**env, "LORAPLEX_WORKER_ID": worker_id})
    try:
        workers = start_workers(stack, model_dir.name, envs)
        router = start_router(
            stack,
            {
                "LORAPLEX_HOME": str(scratch / f"{policy}-{args.device_adapters}" / "router"),
                "LORAPLEX_ROUTER_POLICY": policy,
                # Exactly this run's workers: none left over from another policy's run.
                "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
                "LORAPLEX_ROUTER_METRICS_PORT": str(metrics_port),
                **router_env,
            },
        )
        for proc, addr in zip(workers, stack.workers, strict=True):
            wait_serving(addr, tls=stack.tls, proc=proc, timeout_s=300)
        wait_serving(stack.router, tls=stack.tls, proc=router, timeout_s=120)
        replay_args: dict[str, Any] = dict(
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            homes=home_of,
            ca=stack.tls.ca if stack.tls else None,
        )
        # The warmup runs to completion first: identical for every policy, and not measured.
        warm, measured = sequence[: args.warmup], sequence[args.warmup :]
        asyncio.run(replay(stack.router, api_key, adapters, warm, run=None, **replay_args))
        before = router_counters(metrics_port)
        started = time.monotonic()
        asyncio.run(replay(stack.router, api_key, adapters, measured, run=run, **replay_args))
        run.seconds = time.monotonic() - started
        after = router_counters(metrics_port)
        run.router = {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v > before.get(k, 0.0)}
    finally:
        stack.stop()
    return run


# -- results --------------------------------------------------------------------------------------


def summarize(
    runs: dict[str, PolicyRun], modelled: dict[str, dict[str, int]], args: argparse.Namespace
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, run in runs.items():
        served = len(run.ttft_ms)
        out[f"cold_loads_{name}"] = round(per_thousand(run.cold, served), 1)
        out[f"ttft_p50_ms_{name}"] = round(percentile(run.ttft_ms, 0.50), 2)
        out[f"ttft_p99_ms_{name}"] = round(percentile(run.ttft_ms, 0.99), 2)
        # What a cold load costs here: the cold requests' median TTFT beside everyone's.
        out[f"ttft_p50_ms_cold_{name}"] = round(percentile(run.ttft_cold_ms, 0.50), 2)
        out[f"off_home_per_1000_{name}"] = round(per_thousand(run.off_home, served), 1)
        out[f"cold_loads_off_home_{name}"] = round(per_thousand(run.cold_off_home, served), 1)
        out[f"router_counters_{name}"] = run.router
        out[f"served_{name}"] = served
        out[f"errors_{name}"] = run.errors
        out[f"served_by_{name}"] = dict(sorted(run.served_by.items()))
        out[f"seconds_{name}"] = round(run.seconds, 1)
        if run.first_error:
            out[f"first_error_{name}"] = run.first_error
    for name, count in modelled["tier_policy"].items():
        out[f"modelled_cold_loads_{name}"] = round(per_thousand(count, args.requests), 1)
    for name, count in modelled["lru"].items():
        out[f"lru_modelled_cold_loads_{name}"] = round(per_thousand(count, args.requests), 1)
    aff, ll = out.get("cold_loads_affinity"), out.get("cold_loads_least_loaded")
    if aff is not None and ll is not None:
        out["cold_load_ratio"] = round(ll / aff, 2) if aff else None
        model = modelled["tier_policy"]
        out["modelled_cold_load_ratio"] = round(model["least_loaded"] / max(1, model["affinity"]), 2)
        out["targets_met"] = bool(
            (aff == 0 or ll / aff >= 3.0)
            and out["ttft_p99_ms_affinity"] <= out["ttft_p99_ms_least_loaded"]
            and all(r.errors == 0 for r in runs.values())
        )
    out.update(
        workers=args.workers,
        adapters=args.adapters,
        device_adapters_per_worker=args.device_adapters,
        requests=args.requests,
        warmup=args.warmup,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        zipf_alpha=args.alpha,
        seed=args.seed,
        router_policy_setting=_router_reads_policy(),
        router_env=dict(kv.split("=", 1) for kv in args.router_env),
    )
    return out


def _commit() -> str:
    """The checkout's commit (with "+dirty" when tracked files differ), so a result names its code."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return f"{head}+dirty" if head and git("status", "--porcelain", "--untracked-files=no") else head


def _router_reads_policy() -> bool:
    """Whether this checkout's router honours LORAPLEX_ROUTER_POLICY (else every run is its default)."""
    from services.common.config import RouterSettings

    return any("policy" in f.name for f in dataclasses.fields(RouterSettings))


def plot(runs: dict[str, PolicyRun], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    xs = range(len(names))
    ax1.bar([x - 0.2 for x in xs], [summary[f"cold_loads_{n}"] for n in names], width=0.4, label="measured")
    ax1.bar(
        [x + 0.2 for x in xs],
        [summary.get(f"modelled_cold_loads_{n}", 0) for n in names],
        width=0.4,
        label="model: same tier policy, no spill",
        color="lightgray",
    )
    ax1.set_xticks(list(xs), names)
    ax1.set_ylabel("cold loads per 1,000 requests")
    ax1.set_title(
        f"{summary['adapters']} adapters, Zipf {summary['zipf_alpha']}, "
        f"{summary['device_adapters_per_worker']}/worker on device"
    )
    ax1.legend()
    for name in names:
        ordered = sorted(runs[name].ttft_ms)
        if ordered:
            ax2.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax2.set_xscale("log")
    ax2.set_xlabel("client TTFT (ms)")
    ax2.set_ylabel("fraction of requests")
    ax2.set_title(f"{summary['workers']} workers, {summary['concurrency']} concurrent clients")
    ax2.legend()
    sizes = {int(n): r for n, r in summary["sweep"].items()}
    sizes[summary["device_adapters_per_worker"]] = summary
    for name in ("affinity", "least_loaded"):
        points = sorted((n, r[f"cold_loads_{name}"]) for n, r in sizes.items() if f"cold_loads_{name}" in r)
        ax3.plot([n for n, _ in points], [c for _, c in points], marker="o", label=name)
    ax3.set_xlabel("adapters on each worker's device")
    ax3.set_ylabel("cold loads per 1,000 requests")
    ax3.set_title("device budget sweep")
    ax3.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="only the JSON result line on stdout")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument(
        "--device-adapters", type=int, default=60, help="adapters on each worker's device (headline run)"
    )
    parser.add_argument(
        "--sweep",
        default="30,50",
        help="more per-worker device sizes, each run with affinity and least_loaded only ('' for none)",
    )
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per policy")
    parser.add_argument("--warmup", type=int, default=1000, help="unmeasured requests before them")
    parser.add_argument(
        "--router-env",
        action="append",
        default=[],
        metavar="LORAPLEX_X=V",
        help="extra router setting for every policy, for diagnosis (e.g. LORAPLEX_ROUTE_LOAD_EPS=4)",
    )
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--home", type=Path, default=DEFAULT_HOME, help="registry home, model and adapter cache (kept)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where routing.json/.png go")
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES)
    try:
        sweep = [int(n) for n in args.sweep.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--sweep {args.sweep!r}: use comma-separated adapter counts, e.g. 30,50")
    if unknown or args.workers < 1 or min([args.device_adapters, *sweep]) < 1 or args.requests < 1:
        parser.error(f"bad arguments (unknown policies: {sorted(unknown)})")
    for kv in args.router_env:
        if not kv.startswith("LORAPLEX_") or "=" not in kv:
            parser.error(f"--router-env {kv!r}: use LORAPLEX_NAME=value")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    began = time.monotonic()

    home: Path = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    model_dir = tiny_model_dir(home)
    dirs = build_adapters(model_dir, args.adapters, home / "adapter-sources")
    say(f"{len(dirs)} adapters ready in {home / 'adapter-sources'} ({time.monotonic() - began:.0f} s)")

    # The bench's own settings only: a LORAPLEX_* left in the shell must not change the runs.
    keep = ("LORAPLEX_DATABASE_URL", "LORAPLEX_ADMIN_TOKEN")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_") or k in keep}
    env["LORAPLEX_HOME"] = str(home)
    token = dev_admin_token(home)
    # mTLS between the services as in `loraplex dev` (certificates made once under the bench home).
    env, tls = dev_env(home, token)
    env["PYTHONPATH"] = str(REPO)
    logs = home / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True)
    base = Stack(home, env, f"127.0.0.1:{free_port()}", "", [], logs, [], tls)
    scratch = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    sequence = zipf_sequence(args.adapters, args.alpha, args.warmup + args.requests, args.seed)
    runs: dict[str, PolicyRun] = {}
    swept: dict[int, dict[str, PolicyRun]] = {}
    try:
        registry = base.start(
            "registry", ["registry", "serve"], {"LORAPLEX_REGISTRY_LISTEN": base.registry}, Role.REGISTRY
        )
        wait_serving(base.registry, tls=tls, proc=registry, timeout_s=120)
        api_key, adapters = register(base.registry, token, tls, model_dir, dirs)
        size = adapter_bytes(dirs[0])
        say(f"registry up, adapters registered ({time.monotonic() - began:.0f} s); logs in {logs}")
        plans = [(args.device_adapters, policies)]
        plans += [(n, [p for p in policies if p in ("affinity", "least_loaded")]) for n in sweep]
        for device_adapters, names in plans:
            sized = argparse.Namespace(**{**vars(args), "device_adapters": device_adapters})
            done = runs if device_adapters == args.device_adapters and names is policies else {}
            for policy in names:
                done[policy] = r = run_policy(
                    policy, base, scratch, model_dir, api_key, adapters, sequence, sized, size
                )
                say(
                    f"{policy}, {device_adapters}/worker: {per_thousand(r.cold, len(r.ttft_ms)):.0f} cold "
                    f"loads / 1000, TTFT p50 {percentile(r.ttft_ms, 0.5):.1f} ms, p99 "
                    f"{percentile(r.ttft_ms, 0.99):.1f} ms, {r.errors} errors ({r.seconds:.0f} s)"
                )
            if done is not runs:
                swept[device_adapters] = done
    finally:
        base.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    homes = homes_of(adapters, [f"affinity-{i}" for i in range(args.workers)])

    def model(device_adapters: int) -> dict[str, dict[str, int]]:
        budget = device_budget(device_adapters, size)
        return {
            kind: modelled_cold_loads(
                sequence, homes, new_cache, workers=args.workers, skip=args.warmup, seed=args.seed
            )
            for kind, new_cache in (
                ("tier_policy", lambda: TierPolicyCache(budget, size)),
                ("lru", lambda: LruCache(device_adapters)),
            )
        }

    summary = summarize(runs, model(args.device_adapters), args)
    summary["sweep"] = {
        str(n): {
            k: v
            for k, v in summarize(
                done, model(n), argparse.Namespace(**{**vars(args), "device_adapters": n})
            ).items()
            if k.startswith(("cold_load", "ttft_p99", "modelled_cold_load_ratio", "errors"))
        }
        for n, done in sorted(swept.items())
    }
    summary["adapter_bytes"] = size
    summary["commit"] = _commit()
    summary["elapsed_s"] = round(time.monotonic() - began, 1)
    args.results.mkdir(parents=True, exist_ok=True)
    plot(runs, summary, args.results / "routing.png")
    (args.results / "routing.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
