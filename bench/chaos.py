"""Does billing stay exact while processes die? `loraplex bench chaos --json [--duration 180]`

The real stack as processes: a registry on an embedded PostgreSQL that this benchmark owns (so it
can stop and start the database itself), a moto S3 server on loopback as the adapter store, two
workers serving the tiny random Llama and a router, all on mutual TLS as `loraplex dev` runs
them. --clients concurrent clients stream through several adapters for --duration seconds, each
behaving like services.client (retry UNAVAILABLE / RESOURCE_EXHAUSTED before the first token with
the same request id, jittered backoff, pushback honoured) and logging every token it received per
request id. Meanwhile a seeded schedule lands each fault kind --faults-per-kind times, one at a
time:

  worker_kill       SIGKILL a worker, restart it after 3 s
  worker_stop       SIGSTOP a worker past the router's stale limit (and token timeout), SIGCONT
  router_kill       SIGKILL the router, restart it (same spool directory)
  registry_kill     SIGKILL the registry, restart it after 2 s
  postgres_restart  stop the embedded PostgreSQL for 3 s, start it again
  s3_outage         stop the S3 server (20 s, or duration/4 if shorter) while clients ask for
                    adapters no worker has loaded yet
  spool_fill        SIGKILL the registry and send requests without a request id (the router
                    needs no ledger lookup for those) until the router's small spool
                    (LORAPLEX_ROUTER_SPOOL_MAX_BYTES=64KiB) is full and refuses; restart it

Afterwards every process is up, the router is stopped cleanly (its spool ships) and the client
log is reconciled with the ledger (UsageService.ExportUsage, JSONL):
- finished requests: billed once, for exactly the tokens received;
- cut mid-stream: billed once, for at most what was received and at least that minus the
  checkpoint bound (the tokens the client received in the last LORAPLEX_ROUTER_CHECKPOINT_S
  + 0.5 s before the cut);
- no row for a request that never produced a token; nothing left in the spool.
`recovery_s` per kind: from the fault to the first request started after it that completed.
Prints one JSON object last; writes bench/results/chaos.json and chaos.png (a timeline).

    python -m bench.chaos --json [--duration 180] [--clients 24] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.pg_keeper import PgKeeper
from bench.routing import REPO, build_adapters, tiny_model_dir
from services.cli.dev import Stack, dev_admin_token, dev_env
from services.common.health import wait_serving
from services.common.net import free_port
from services.common.tls import Role

RESULTS = REPO / "bench" / "results"
DEFAULT_HOME = REPO / ".cache" / "bench-chaos"
KINDS = (
    "worker_kill",
    "worker_stop",
    "router_kill",
    "registry_kill",
    "postgres_restart",
    "s3_outage",
    "spool_fill",
)
CHECKPOINT_S = 1.0
SPOOL_CAP = 64 << 10
TOKEN_TIMEOUT_S = 3.0
STALE_S = 3.0
HOT_ADAPTERS = 4
PROMPT = "Keep streaming while the stack burns."
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "loraplex-chaos",
    "AWS_SECRET_ACCESS_KEY": "loraplex-chaos-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Request:
    request_id: str
    started: float  # seconds since the run began
    ended: float = 0.0
    tokens: int = 0
    finished_tokens: int | None = None  # Finished.usage.output_tokens, if the stream finished
    token_times: list[tuple[float, int]] = field(default_factory=list)
    code: str = "OK"
    details: str = ""
    with_id: bool = True


@dataclass
class Fault:
    kind: str
    at: float
    until: float = 0.0
    note: str = ""


class ChaosStack:
    """The processes, each restartable by name with the arguments it was first started with."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.stack = stack
        self.token = token
        self.specs: dict[str, tuple[list[str], dict[str, str], Role]] = {}
        self.procs: dict[str, Any] = {}

    def start(self, name: str, args: list[str], env: dict[str, str], role: Role) -> None:
        self.specs[name] = (args, env, role)
        self.procs[name] = self.stack.start(name, args, env, role)

    def restart(self, name: str) -> None:
        args, env, role = self.specs[name]
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self.procs[name] = self.stack.start(name, args, env, role)

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def wait(self, name: str, target: str, timeout_s: float = 120) -> None:
        wait_serving(target, tls=self.stack.tls, proc=self.procs[name], timeout_s=timeout_s)


def _spool_bytes(spool_dir: Path) -> int:
    if not spool_dir.exists():
        return 0
    total = sum(p.stat().st_size for p in spool_dir.glob("seg-*.log"))
    inflight = spool_dir / "inflight"
    if inflight.exists():
        total += sum(p.stat().st_size for p in inflight.iterdir() if p.is_file())
    return total


async def _client_loop(
    n: int,
    target: str,
    api_key: str,
    ca: Path | None,
    state: dict[str, Any],
    log: list[Request],
    began: float,
    rng: random.Random,
    max_tokens: int,
) -> None:
    from services.client.inference import AsyncInferenceClient, GenerateOptions, Sampling
    from services.client.retry import RetryPolicy

    # Exactly the library's defaults (not LORAPLEX_CLIENT_* from this shell): the soak judges what
    # a client that configured nothing gets.
    policy = RetryPolicy()
    seq = 0
    async with AsyncInferenceClient(target, api_key, ca=ca, timeout_s=90, retry=policy) as client:
        while not state["stop"]:
            seq += 1
            cold: list[str] = state["cold_now"]
            adapter = cold.pop() if cold else rng.choice(state["hot"])
            rid = f"chaos-{state['run']}-{n}-{seq}"
            req = Request(rid, time.monotonic() - began)
            log.append(req)
            options = GenerateOptions(
                adapter=adapter, request_id=rid, sampling=Sampling(max_tokens=max_tokens, ignore_eos=True)
            )
            try:
                async for event in client.generate(PROMPT, options):
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        k = len(event.delta.token_ids)
                        req.tokens += k
                        req.token_times.append((time.monotonic() - began, k))
                    elif kind == "finished":
                        req.finished_tokens = event.finished.usage.output_tokens
            except Exception as exc:  # grpc errors carry a code; anything else is a bench bug
                code = getattr(exc, "code", None)
                req.code = code().name if callable(code) else type(exc).__name__
                details = getattr(exc, "details", None)
                req.details = (details() if callable(details) else str(exc)) or ""
            req.ended = time.monotonic() - began


async def _filler(
    target: str, api_key: str, ca: Path | None, adapter: str, log: list[Request], began: float, until: float
) -> bool:
    """Requests without an id (no ledger lookup) until the router refuses for a full spool."""
    from services.client.inference import AsyncInferenceClient, GenerateOptions
    from services.client.retry import NO_RETRY

    full = False
    async with AsyncInferenceClient(target, api_key, ca=ca, timeout_s=30, retry=NO_RETRY) as client:
        while time.monotonic() - began < until and not full:
            req = Request("", time.monotonic() - began, with_id=False)
            log.append(req)
            try:
                async for event in client.generate(
                    PROMPT, GenerateOptions(adapter=adapter, sampling=_sampling(2))
                ):
                    if event.HasField("started"):
                        req.request_id = event.started.request_id
                    elif event.HasField("delta"):
                        req.tokens += len(event.delta.token_ids)
                        req.token_times.append((time.monotonic() - began, len(event.delta.token_ids)))
                    elif event.HasField("finished"):
                        req.finished_tokens = event.finished.usage.output_tokens
            except Exception as exc:
                req.code = exc.code().name  # type: ignore[attr-defined]
                req.details = exc.details() or ""  # type: ignore[attr-defined]
                full = "cannot record usage right now" in req.details
                if not full:
                    await asyncio.sleep(0.05)
            req.ended = time.monotonic() - began
    return full


def _sampling(n: int) -> Any:
    from services.client.inference import Sampling

    return Sampling(max_tokens=n, ignore_eos=True)


def reconcile(log: list[Request], ledger: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The issue's counters from the client log and the ledger rows by request id."""
    out: dict[str, Any] = {
        "requests": 0,
        "completed": 0,
        "cut_mid_stream": 0,
        "failed_before_first_token_after_retries": 0,
        "double_billed": 0,
        "unbilled_tokens_beyond_bound": 0,
        "overbilled_tokens": 0,
        "billed_without_tokens": 0,
        "statuses": {},
        "statuses_without_a_sentence": 0,
    }
    statuses: dict[str, int] = {}
    for r in log:
        if not r.request_id and not r.tokens:
            # A filler request refused before it started: no id, nothing to bill.
            statuses[r.code] = statuses.get(r.code, 0) + 1
            continue
        out["requests"] += 1
        statuses[r.code] = statuses.get(r.code, 0) + 1
        if r.code != "OK" and len(r.details.split()) < 4:
            out["statuses_without_a_sentence"] += 1
        rows = ledger.get(r.request_id, [])
        if len(rows) > 1:
            out["double_billed"] += 1
        billed = sum(int(row["output_tokens"]) for row in rows[:1])
        if r.finished_tokens is not None:
            out["completed"] += 1
            if billed < r.tokens:
                out["unbilled_tokens_beyond_bound"] += r.tokens - billed
            out["overbilled_tokens"] += max(0, billed - r.tokens)
        elif r.tokens:
            out["cut_mid_stream"] += 1
            cut = r.token_times[-1][0]
            bound = sum(k for t, k in r.token_times if t >= cut - CHECKPOINT_S - 0.5)
            out["unbilled_tokens_beyond_bound"] += max(0, r.tokens - bound - billed)
            out["overbilled_tokens"] += max(0, billed - r.tokens)
        else:
            if r.with_id:
                out["failed_before_first_token_after_retries"] += 1
            if rows:
                out["billed_without_tokens"] += 1
                out["overbilled_tokens"] += billed
    out["statuses"] = dict(sorted(statuses.items()))
    # What the clients were told when they gave up before the first token (a few, for diagnosis).
    out["failure_samples"] = sorted(
        {f"{r.code}: {r.details}"[:200] for r in log if r.with_id and not r.tokens and r.code != "OK"}
    )[:8]
    return out


def recovery(faults: list[Fault], log: list[Request]) -> dict[str, dict[str, float]]:
    """Per kind: seconds from each fault to the end of the first request started after it that
    completed; p50 and max over the kind's faults."""
    ok = sorted((r.started, r.ended) for r in log if r.finished_tokens is not None and r.with_id)
    per: dict[str, list[float]] = {}
    for f in faults:
        after = [end for start, end in ok if start >= f.at]
        # A fault the run never recovered from counts as 60 s past the run's last success.
        last = max((end for _, end in ok), default=f.at)
        per.setdefault(f.kind, []).append(round((min(after) if after else last + 60) - f.at, 2))
    out = {}
    for kind, v in per.items():
        v = sorted(v)
        mid = len(v) // 2
        p50 = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
        out[kind] = {"p50": round(p50, 2), "max": round(v[-1], 2)}
    return out


def plot(log: list[Request], faults: list[Fault], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([r.ended for r in log] + [f.until for f in faults] + [1.0])
    bins = int(end) + 1
    done = [0] * bins
    failed = [0] * bins
    for r in log:
        if r.finished_tokens is not None:
            done[min(int(r.ended), bins - 1)] += 1
        elif r.code != "OK":
            failed[min(int(r.ended), bins - 1)] += 1
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.plot(range(bins), done, label="completed / s", color="tab:green")
    ax.plot(range(bins), failed, label="ended with an error / s", color="tab:red")
    cmap = plt.get_cmap("tab10")
    colours = {k: cmap(i) for i, k in enumerate(KINDS)}
    seen: set[str] = set()
    for f in faults:
        ax.axvspan(
            f.at,
            max(f.until, f.at + 0.5),
            alpha=0.25,
            color=colours[f.kind],
            label=None if f.kind in seen else f.kind,
        )
        seen.add(f.kind)
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _schedule(kinds: Sequence[str], per_kind: int, seed: int) -> list[str]:
    plan = [k for k in kinds for _ in range(per_kind)]
    random.Random(seed).shuffle(plan)
    return plan


async def run_chaos(args: argparse.Namespace, say: Callable[..., None]) -> dict[str, Any]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from services.client.registry import RegistryClient
    from services.client.usage import UsageClient
    from services.common.base_models import describe_model
    from services.devtools.tiny_model import TINY_LLAMA
    from services.registry.convert import base_model_pb

    home: Path = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    model_dir = tiny_model_dir(home)
    hot_n = HOT_ADAPTERS
    cold_n = args.faults_per_kind * 2
    dirs = build_adapters(model_dir, hot_n + cold_n, home / "adapter-sources")
    scratch = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    os.chmod(scratch, 0o755)  # embedded PostgreSQL runs as another user when we are root
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{s3_port}"
    os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": endpoint})
    bucket = "chaos-adapters"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    pg = PgKeeper(scratch / "pg", log=scratch / "pg-keeper.log")
    url = await asyncio.to_thread(pg.open)
    token = dev_admin_token(home)
    env, tls = dev_env(home, token)
    env = {
        k: v
        for k, v in env.items()
        if not k.startswith("LORAPLEX_") or k in ("LORAPLEX_HOME", "LORAPLEX_ADMIN_TOKEN") or "TLS" in k
    }
    env.update(
        {
            **AWS_ENV,
            "AWS_ENDPOINT_URL": endpoint,
            "PYTHONPATH": str(REPO),
            "LORAPLEX_DATABASE_URL": url,
            "LORAPLEX_ADAPTER_STORE": f"s3://{bucket}/adapters",
            "LORAPLEX_ALLOWED_BUCKETS": bucket,
        }
    )
    logs = home / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True)
    registry_addr, router_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    stack = Stack(home, env, registry_addr, router_addr, workers, logs, [], tls)
    cs = ChaosStack(stack, token)
    spool_dir = scratch / "router-spool"
    ca = tls.ca if tls is not None else None
    run_id = uuid.uuid4().hex[:8]
    log: list[Request] = []
    faults: list[Fault] = []
    try:
        cs.start(
            "registry", ["registry", "serve"], {"LORAPLEX_REGISTRY_LISTEN": registry_addr}, Role.REGISTRY
        )
        await asyncio.to_thread(cs.wait, "registry", registry_addr)
        tenant = f"chaos-{run_id}"
        with RegistryClient(registry_addr, token, tls=tls) as c:
            c.upsert_base_model(base_model_pb(describe_model(TINY_LLAMA, model_dir), 0.05, 0.20))
            c.create_tenant(tenant)
            api_key = c.create_api_key(tenant, "chaos").secret
            names = []
            for i, path in enumerate(dirs):
                name = f"a{i}"
                c.upload_adapter(path, tenant=tenant, name=name, base_model=TINY_LLAMA)
                names.append(name)
        for i, addr in enumerate(workers):
            wh = scratch / f"worker-{i}"
            (wh / "models").mkdir(parents=True)
            (wh / "models" / model_dir.name).symlink_to(model_dir.resolve())
            cs.start(
                f"worker-{i}",
                ["worker", "serve", "--model", TINY_LLAMA],
                {
                    "LORAPLEX_HOME": str(wh),
                    "LORAPLEX_WORKER_LISTEN": addr,
                    "LORAPLEX_WORKER_ID": f"chaos-worker-{i}",
                    "LORAPLEX_REGISTRY": registry_addr,
                    "LORAPLEX_DTYPE": "float32",
                    "LORAPLEX_KV_CACHE_BLOCKS": "512",
                    "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1",
                },
                Role.WORKER,
            )
        cs.start(
            "router",
            ["router", "serve"],
            {
                "LORAPLEX_ROUTER_LISTEN": router_addr,
                "LORAPLEX_REGISTRY": registry_addr,
                "LORAPLEX_WORKERS": ",".join(workers),
                "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
                "LORAPLEX_SPOOL_DIR": str(spool_dir),
                "LORAPLEX_ROUTER_SPOOL_MAX_BYTES": str(SPOOL_CAP),
                "LORAPLEX_ROUTER_CHECKPOINT_S": str(CHECKPOINT_S),
                "LORAPLEX_ROUTER_TOKEN_TIMEOUT_S": str(TOKEN_TIMEOUT_S),
                "LORAPLEX_ROUTER_WORKER_STALE_S": str(STALE_S),
                "LORAPLEX_WORKER_REFRESH_S": "0.5",
            },
            Role.ROUTER,
        )
        for i, addr in enumerate(workers):
            await asyncio.to_thread(cs.wait, f"worker-{i}", addr, 300)
        await asyncio.to_thread(cs.wait, "router", router_addr)
        say(f"stack up; logs in {logs}")

        rng = random.Random(args.seed)
        state: dict[str, Any] = {
            "stop": False,
            "hot": names[:hot_n],
            "cold_now": [],
            "run": run_id,
        }
        cold = list(reversed(names[hot_n:]))
        began = time.monotonic()
        clients = [
            asyncio.create_task(
                _client_loop(
                    n,
                    router_addr,
                    api_key,
                    ca,
                    state,
                    log,
                    began,
                    random.Random(rng.random()),
                    args.max_tokens,
                )
            )
            for n in range(args.clients)
        ]
        plan = _schedule(KINDS, args.faults_per_kind, args.seed)
        gap = max(1.0, (args.duration - 5) / len(plan))
        s3_hold = min(20.0, max(5.0, args.duration / 4))
        spool_full_reached = 0

        def now() -> float:
            return time.monotonic() - began

        for i, kind in enumerate(plan):
            due = 5 + i * gap
            if now() < due:
                await asyncio.sleep(due - now())
            fault = Fault(kind, now())
            faults.append(fault)
            say(f"{fault.at:6.1f}s  {kind}")
            if kind == "worker_kill":
                w = f"worker-{rng.randrange(2)}"
                cs.signal(w, signal.SIGKILL)
                await asyncio.sleep(3)
                cs.restart(w)
                fault.note = w
            elif kind == "worker_stop":
                w = f"worker-{rng.randrange(2)}"
                cs.signal(w, signal.SIGSTOP)
                await asyncio.sleep(max(STALE_S, TOKEN_TIMEOUT_S) + 2)
                cs.signal(w, signal.SIGCONT)
                fault.note = w
            elif kind == "router_kill":
                cs.signal("router", signal.SIGKILL)
                cs.procs["router"].wait()
                cs.restart("router")
            elif kind == "registry_kill":
                cs.signal("registry", signal.SIGKILL)
                cs.procs["registry"].wait()
                await asyncio.sleep(2)
                cs.restart("registry")
            elif kind == "postgres_restart":
                await asyncio.to_thread(pg.command, "stop")
                await asyncio.sleep(3)
                await asyncio.to_thread(pg.command, "start")
            elif kind == "s3_outage":
                s3.stop()
                # Cold adapters now: no worker has them, so serving them needs the store.
                for _ in range(2):
                    if cold:
                        state["cold_now"].append(cold.pop())
                await asyncio.sleep(s3_hold)
                s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
                s3.start()
            elif kind == "spool_fill":
                cs.signal("registry", signal.SIGKILL)
                cs.procs["registry"].wait()
                full = await _filler(router_addr, api_key, ca, names[0], log, began, now() + 8)
                spool_full_reached += full
                fault.note = "spool reached its cap" if full else "spool not full in 8 s"
                cs.restart("registry")
            fault.until = now()
            # The next fault lands on a stack that has recovered from this one (or after 30 s):
            # recovery_s then measures one fault, not a pile-up.
            settle = time.monotonic() + 30
            while time.monotonic() < settle and not any(
                r.finished_tokens is not None and r.with_id and r.started >= fault.until for r in log
            ):
                await asyncio.sleep(0.2)
        # Traffic continues a little past the last fault, so its recovery is measured too.
        while now() < max(args.duration, faults[-1].until + 5 if faults else 0):
            await asyncio.sleep(0.5)
        state["stop"] = True
        await asyncio.gather(*clients)
        say(f"traffic done at {now():.0f} s: {len(log)} requests; draining")
        # Everything up again, then a clean stop of the router ships what is left in its spool.
        await asyncio.to_thread(cs.wait, "registry", registry_addr)
        deadline = time.monotonic() + 60
        while _spool_bytes(spool_dir) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        router = cs.procs["router"]
        router.send_signal(signal.SIGTERM)
        await asyncio.to_thread(router.wait, 60)
        spooled_left = _spool_bytes(spool_dir)
        with UsageClient(registry_addr, token, tls=tls) as u:
            rows = [
                json.loads(line) for chunk in u.export("jsonl", tenant=tenant) for line in chunk.splitlines()
            ]
        ledger: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            ledger.setdefault(row["request_id"], []).append(row)
        counts = reconcile(log, ledger)
        result: dict[str, Any] = {
            **counts,
            "spooled_left": spooled_left,
            "faults": {k: sum(f.kind == k for f in faults) for k in KINDS},
            "recovery_s": recovery(faults, log),
            "spool_full_reached": spool_full_reached,
            "ledger_rows": len(rows),
            "seconds": round(now(), 1),
            "clients": args.clients,
            "duration_s": args.duration,
            "seed": args.seed,
            "fault_log": [
                {"kind": f.kind, "at": round(f.at, 1), "until": round(f.until, 1), "note": f.note}
                for f in faults
            ],
        }
        title = (
            f"chaos: {counts['requests']} requests, {counts['completed']} completed, "
            f"{counts['cut_mid_stream']} cut; double-billed {counts['double_billed']}, "
            f"unbilled beyond bound {counts['unbilled_tokens_beyond_bound']}"
        )
        plot(log, faults, args.results / "chaos.png", title)
        return result
    finally:
        stack.stop()
        s3.stop()
        await asyncio.to_thread(pg.close)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="only the JSON result line on stdout")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of traffic (faults included)")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--faults-per-kind", type=int, default=0, help="0: 2, or 1 when --duration < 90")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="model, adapters, certs (kept)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where chaos.json/.png go")
    args = parser.parse_args(argv)
    if args.faults_per_kind <= 0:
        args.faults_per_kind = 2 if args.duration >= 90 else 1
    if args.clients < 1 or args.duration < 10:
        parser.error("need --clients >= 1 and --duration >= 10")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    result = asyncio.run(run_chaos(args, say))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
