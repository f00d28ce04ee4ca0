"""What does the router add? `python -m bench.router --json`

A synthetic worker emits tokens as fast as it can (one token per delta); the same client calls it
directly and through a real `loraplex router serve` process (auth and adapter resolution cached, a
usage record spooled per request). Reported:
- added TTFT: p50 / p99 of (first token through the router) minus the same percentile direct,
  one request at a time, direct and routed requests interleaved;
- streaming throughput: tokens/s of concurrent long streams, direct versus routed, rounds
  interleaved, the median round of each.
Targets: added TTFT p50 <= 2 ms; routed throughput >= 0.9x direct.
Prints one JSON object as its last line and draws bench/results/router.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.synthetic_backends import ADAPTER, API_KEY
from loraplex.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.health import wait_serving
from services.common.net import free_port

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = common_pb2.Prompt(text="benchmark the router")
MD = (("authorization", f"Bearer {API_KEY}"),)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Clients:
    def __init__(self, worker: str, router: str) -> None:
        self.worker_channel = grpc.aio.insecure_channel(worker)
        self.router_channel = grpc.aio.insecure_channel(router)
        self.worker = worker_pb2_grpc.WorkerServiceStub(self.worker_channel)
        self.router = inference_pb2_grpc.InferenceServiceStub(self.router_channel)
        self._n = 0

    def direct(self, max_tokens: int) -> AsyncIterator[Any]:
        self._n += 1
        req = worker_pb2.WorkerServiceGenerateRequest(
            request_id=f"direct-{self._n}",
            adapter=ADAPTER.ref,
            prompt=PROMPT,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
        stream: AsyncIterator[Any] = self.worker.Generate(req)
        return stream

    def routed(self, max_tokens: int) -> AsyncIterator[Any]:
        self._n += 1
        req = inference_pb2.GenerateRequest(
            request_id=f"routed-{os.getpid()}-{self._n}",
            adapter=ADAPTER.ref.name,
            prompt=PROMPT,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
        stream: AsyncIterator[Any] = self.router.Generate(req, metadata=MD)
        return stream

    async def close(self) -> None:
        await self.worker_channel.close()
        await self.router_channel.close()


async def _ttft(open_stream: Callable[[int], AsyncIterator[Any]], max_tokens: int) -> float:
    start = time.perf_counter()
    first = 0.0
    async for msg in open_stream(max_tokens):
        if not first and msg.WhichOneof("event") == "delta":
            first = time.perf_counter()
    return (first - start) * 1000


async def _throughput(open_stream: Callable[[int], AsyncIterator[Any]], streams: int, tokens: int) -> float:
    async def one() -> int:
        n = 0
        async for msg in open_stream(tokens):
            n += len(msg.delta.token_ids)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - start
    assert sum(counts) == streams * tokens, counts
    return sum(counts) / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(worker: str, router: str, args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    clients = Clients(worker, router)
    try:
        for _ in range(30):  # warm channels, the router's caches and its worker probe
            await _ttft(clients.direct, 4)
            await _ttft(clients.routed, 4)
        direct_ttft: list[float] = []
        routed_ttft: list[float] = []
        for _ in range(args.ttft_requests):
            direct_ttft.append(await _ttft(clients.direct, args.ttft_tokens))
            routed_ttft.append(await _ttft(clients.routed, args.ttft_tokens))
        direct_tps: list[float] = []
        routed_tps: list[float] = []
        # CPU per streamed token, per process: unlike tokens/s, this does not depend on what else
        # the machine is running.
        cpu = {
            name: 0.0
            for name in ("client_direct", "client_routed", "router", "worker_direct", "worker_routed")
        }
        for _ in range(args.rounds):
            for path in ("direct", "routed"):
                before = {n: cpu_seconds(p) for n, p in pids.items()}
                client_before = time.process_time()
                opener = clients.direct if path == "direct" else clients.routed
                (direct_tps if path == "direct" else routed_tps).append(
                    await _throughput(opener, args.streams, args.stream_tokens)
                )
                cpu[f"client_{path}"] += time.process_time() - client_before
                cpu[f"worker_{path}"] += cpu_seconds(pids["backends"]) - before["backends"]
                if path == "routed":
                    cpu["router"] += cpu_seconds(pids["router"]) - before["router"]
    finally:
        await clients.close()
    tokens = args.rounds * args.streams * args.stream_tokens
    per_token_us = {f"{k}_cpu_us_per_token": round(v / tokens * 1e6, 2) for k, v in cpu.items()}
    direct_tok_s = statistics.median(direct_tps)
    routed_tok_s = statistics.median(routed_tps)
    return {
        "added_ttft_p50_ms": round(_percentile(routed_ttft, 0.5) - _percentile(direct_ttft, 0.5), 3),
        "added_ttft_p99_ms": round(_percentile(routed_ttft, 0.99) - _percentile(direct_ttft, 0.99), 3),
        "direct_ttft_p50_ms": round(_percentile(direct_ttft, 0.5), 3),
        "routed_ttft_p50_ms": round(_percentile(routed_ttft, 0.5), 3),
        "direct_tok_s": round(direct_tok_s, 1),
        "routed_tok_s": round(routed_tok_s, 1),
        "ratio": round(routed_tok_s / direct_tok_s, 3),
        "streams": args.streams,
        "stream_tokens": args.stream_tokens,
        "ttft_requests": args.ttft_requests,
        "cpus": os.cpu_count(),
        **per_token_us,
        "_ttft": {"direct": direct_ttft, "routed": routed_ttft},
        "_tps": {"direct": direct_tps, "routed": routed_tps},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in result["_ttft"].items():
        ordered = sorted(values)
        ax1.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax1.set_xlabel("time to first token (ms)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title(f"TTFT: router adds {result['added_ttft_p50_ms']:.2f} ms at p50")
    ax1.legend()
    ax2.bar(["direct", "routed"], [result["direct_tok_s"], result["routed_tok_s"]], color=["C0", "C1"])
    ax2.set_ylabel("tokens / s")
    ax2.set_title(f"{result['streams']} concurrent streams: routed/direct = {result['ratio']:.2f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="only the JSON result line on stdout")
    parser.add_argument("--ttft-requests", type=int, default=300)
    parser.add_argument("--ttft-tokens", type=int, default=2)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--stream-tokens", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let processes float over all CPUs (default: the router gets its own CPU, as it would "
        "in its own pod, and the client and worker share the others)",
    )
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    router_cpus = {cpus[-1]} if pin else set(cpus)
    other_cpus = set(cpus[:-1]) if pin else set(cpus)
    os.sched_setaffinity(0, other_cpus)  # children inherit this; the router is moved below

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    backends = subprocess.Popen(
        [sys.executable, "-m", "bench.synthetic_backends"], stdout=subprocess.PIPE, text=True, env=env
    )
    router: subprocess.Popen[bytes] | None = None
    try:
        assert backends.stdout is not None
        ports = json.loads(backends.stdout.readline())
        router_port = free_port()
        with tempfile.TemporaryDirectory(prefix="bench-router-") as home:
            router_env = {
                **env,
                "LORAPLEX_HOME": home,
                # The synthetic backends serve plaintext; the bench measures the router's proxy path.
                "LORAPLEX_INSECURE_PLAINTEXT": "true",
                "LORAPLEX_REGISTRY": f"127.0.0.1:{ports['registry']}",
                "LORAPLEX_WORKERS": f"127.0.0.1:{ports['worker']}",
                "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
                "LORAPLEX_ROUTER_LISTEN": f"127.0.0.1:{router_port}",
                "LORAPLEX_HTTP_LISTEN": "",  # measured: the gRPC proxy path only
            }
            router = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "router", "serve"],
                preexec_fn=lambda: os.sched_setaffinity(0, router_cpus),
                env=router_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_serving(f"127.0.0.1:{router_port}", tls=None, proc=router)
            pids = {"router": router.pid, "backends": backends.pid}
            result = asyncio.run(
                measure(f"127.0.0.1:{ports['worker']}", f"127.0.0.1:{router_port}", args, pids)
            )
    finally:
        for proc in (router, backends):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    plot(result, RESULTS / "router.png")
    summary = {k: v for k, v in result.items() if not k.startswith("_")}
    summary["router_cpus"] = len(router_cpus)
    summary["client_and_worker_cpus"] = len(other_cpus)
    if not args.json:
        print(
            f"added TTFT p50 {summary['added_ttft_p50_ms']:.3f} ms, "
            f"p99 {summary['added_ttft_p99_ms']:.3f} ms; throughput direct "
            f"{summary['direct_tok_s']:.0f} tok/s, routed {summary['routed_tok_s']:.0f} tok/s "
            f"(ratio {summary['ratio']:.2f})"
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
