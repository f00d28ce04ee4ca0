"""How long from "a request arrives for a model with zero workers" to its first token?
`python -m bench.worker_coldstart --json` (also `loraplex bench worker_coldstart`)

What an autoscaler does, per trial: a `loraplex worker serve` process is started at the moment the
request arrives (fresh process, CPU, plaintext on loopback), and a router-like client waits for it
exactly as the router's cold queue does, then sends the request (max_tokens=1). Split, from one
clock in this process:
- process_start: exec to the worker's Python having imported torch, transformers and the worker
  (a wrapper prints the moment; the worker itself starts right after);
- model_load: from there to the worker's gRPC port answering GetInfo (the engine loads the model
  before the server starts);
- first_state: from there to the first WatchState snapshot (what makes a router dispatch);
- first_token: from there to the first delta of Generate (prefill of a short prompt).
Baseline in the same run: the same request to a worker already up (warm TTFT), so the cold start
cost is total minus warm. p50 over --trials (>= 5 by default). The first start of a model on a
host (or volume) also writes its serving copy (weights cast and fused once,
services/worker/models/weights.py): on a fresh home that is trial 0, visible in total_ms_max; the
p50 is the start an autoscaler sees every later time. The registry and the router are not
in the path here: with them, registration adds one discovery round (LORAPLEX_WORKER_REFRESH_S,
<= 1 s by default) before the first state; tests/integration/test_router_activator.py shows the
router dispatching on the first snapshot.
Prints one JSON object as its last line; writes bench/results/worker_coldstart.json and .png.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from loraplex.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.config import DEFAULT_MODEL, loraplex_home
from services.common.net import free_port

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
STAGES = ("process_start", "model_load", "first_state", "first_token")
MARK = "LORAPLEX_BENCH_IMPORTED"
# Runs in the worker process: marks the end of interpreter start and imports, then serves.
WRAPPER = f"""
import sys, time
import torch, transformers  # noqa: F401
import services.worker.server  # noqa: F401
print("{MARK}", time.time(), flush=True)
from services.cli.main import main
sys.exit(main(["worker", "serve"]))
"""
TIMEOUT_S = 300.0


def _log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _request(n: int) -> worker_pb2.WorkerServiceGenerateRequest:
    return worker_pb2.WorkerServiceGenerateRequest(
        request_id=f"worker-coldstart-{os.getpid()}-{n}",
        prompt=common_pb2.Prompt(text="Wake up and say something."),
        sampling=common_pb2.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
    )


async def _until_answers(stub: worker_pb2_grpc.WorkerServiceStub, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode} before serving")
        try:
            await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=1)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.01)
    raise TimeoutError("the worker did not answer within 300 s")


async def _first_state(stub: worker_pb2_grpc.WorkerServiceStub) -> None:
    call = stub.WatchState(worker_pb2.WatchStateRequest(), timeout=30)
    try:
        msg = await call.read()
    finally:
        call.cancel()
    if msg is grpc.aio.EOF or msg.WhichOneof("update") != "snapshot":
        raise RuntimeError("WatchState did not start with a snapshot")


async def _first_token(stub: worker_pb2_grpc.WorkerServiceStub, n: int) -> None:
    async for msg in stub.Generate(_request(n), timeout=TIMEOUT_S):
        if msg.WhichOneof("event") == "delta":
            return
    raise RuntimeError("the worker finished without a token")


async def one_trial(model: str, home: Path, threads: int, n: int) -> tuple[dict[str, float], float]:
    """Cold stage times (ms) of one fresh worker, and the warm TTFT (ms) on it afterwards."""
    address = f"127.0.0.1:{free_port()}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")},
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_MODEL": model,
        "LORAPLEX_WORKER_LISTEN": address,
        "LORAPLEX_WORKER_ID": f"cold-{n}",
        "LORAPLEX_DEVICE": "cpu",
        "LORAPLEX_INSECURE_PLAINTEXT": "true",
        "PYTHONPATH": str(REPO),
        **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
    }
    with tempfile.TemporaryFile("w+") as log:
        start = time.time()  # wall clock: the worker's mark is from another process
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER], env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line.startswith(MARK):
                log.seek(0)
                raise RuntimeError(f"the worker did not start: {line!r}\n{log.read()[-2000:]}")
            imported = float(line.split()[1])
            async with grpc.aio.insecure_channel(address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                await _until_answers(stub, proc)
                answered = time.time()
                await _first_state(stub)
                state = time.time()
                await _first_token(stub, 2 * n)
                token = time.time()
                warm_start = time.perf_counter()
                await _first_token(stub, 2 * n + 1)
                warm_ms = (time.perf_counter() - warm_start) * 1000
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    stages = {
        "process_start": imported - start,
        "model_load": answered - imported,
        "first_state": state - answered,
        "first_token": token - state,
    }
    return {k: v * 1000 for k, v in stages.items()}, warm_ms


def summarize(trials: list[dict[str, float]], warm: list[float], model: str) -> dict[str, Any]:
    totals = [sum(t.values()) for t in trials]
    p50 = {s: round(statistics.median(t[s] for t in trials), 1) for s in STAGES}
    return {
        "bench": "worker_coldstart",
        "model": model,
        "trials": len(trials),
        "stages_ms_p50": p50,
        "total_ms_p50": round(statistics.median(totals), 1),
        "total_ms_max": round(max(totals), 1),
        # Baseline: the same request on a worker already up.
        "warm_ttft_ms_p50": round(statistics.median(warm), 1),
        "cold_over_warm": round(statistics.median(totals) / max(statistics.median(warm), 1e-3), 1),
        "target_total_ms_p50": 5000,
        "samples_ms": [{k: round(v, 1) for k, v in t.items()} for t in trials],
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
    left = 0.0
    for stage in STAGES:
        width = summary["stages_ms_p50"][stage]
        ax.barh([summary["model"]], [width], left=left, label=f"{stage} {width:.0f} ms")
        left += width
    ax.axvline(summary["target_total_ms_p50"], color="k", linestyle="--", label="target 5 s")
    ax.set_xlabel("ms from the request's arrival (worker started then), p50")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="only the JSON result line on stdout")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--model-home", type=Path, default=None, help="LORAPLEX_HOME holding models/<model>")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the worker (0: its default)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.trials < 1:
        raise ValueError("--trials must be at least 1")
    home = args.model_home or loraplex_home()
    if not (home / "models" / args.model / "config.json").is_file():
        raise ValueError(f"{args.model} is not in {home / 'models'}: run `loraplex models pull {args.model}`")
    trials: list[dict[str, float]] = []
    warm: list[float] = []
    for n in range(args.trials):
        stages, warm_ms = asyncio.run(one_trial(args.model, home, args.threads, n))
        _log(
            f"trial {n}: "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in stages.items())
            + f"; warm {warm_ms:.0f} ms"
        )
        trials.append(stages)
        warm.append(warm_ms)
    summary = summarize(trials, warm, args.model)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "worker_coldstart.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, args.results_dir / "worker_coldstart.png")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
