"""What does an adapter that is not on the device add to TTFT?  `python -m bench.coldstart --json`

A real `loraplex worker serve` process (CPU, dtype auto, one torch thread, generous tier budgets) reads
adapters from S3 (moto's server on loopback). The client talks to its WorkerService directly and
times each Generate (short prompt, max_tokens=1) from send to the first delta. For each adapter
kind (q/v rank 8, all-linear rank 16, all-linear rank 64; PEFT-written, random weights) and trial,
in a shuffled order per trial so drift hits every tier alike:
- device: the kind's adapter already on the device, one untimed request first (the baseline);
- host:   EvictAdapter, PrefetchAdapter(tier=HOST), WatchState shows HOST, then the request;
- disk:   EvictAdapter (the disk copy stays), WatchState shows DISK, then the request;
- s3:     an adapter this worker has never seen (a fresh seed per trial), then the request.
Added TTFT p50/p99 = that percentile of the tier's TTFT minus the same percentile on device. Each
request's reported source tier (Timings.adapter_source_tier) is checked against the intended one.
Baseline: PEFT's `PeftModel.load_adapter(path, adapter_name=<fresh>)` on the same base model and
files from local disk, timed per call (`delete_adapter` between), one per trial in the same
shuffled order (in this process, while the worker idles).
Beside it: `worker_load_ms_p50` and `worker_ttft_ms_p50` are the worker's own Timings
(adapter_load_ms; ttft_ms from arrival, no network); `cold_load_stages_ms_p50` profiles the load
path in this process on the same files (fetch from S3, sha256, parse, prepare). The worker, the
stage profile and PEFT all run with --worker-threads torch threads.
Targets: host <= 10 ms p50 (all-linear r16), S3 <= 150 ms p50 (all-linear r16), every tier's
added p50 below PEFT's load p50 for the same adapter.

Measured (2-core shared CPU, bf16 auto, 1 thread, load average ~0.5, 52 s; added TTFT p50, ms,
with the worker's own adapter_load_ms in brackets): r8_qv host 2.6 [0.8], disk 6 [6], S3 19 [18],
PEFT 69; r16_all host 1.9 [1.3], disk 26 [25], S3 76 [71], PEFT 225; r64_all host 2.8 [1.8],
disk 46 [48], S3 250 [232], PEFT 327. Every target met (an earlier run of the same code: S3 r16
62, r64 209). What got it there (an earlier run had S3
r16 140 and r64 494, slower than PEFT): a cold fetch is hashed on its own thread as it arrives,
parsed as tensor views of the downloaded buffer, and its disk copy is written behind it (after a
few hundred MB of writes this VM's disk throttles writers to ~400 MB/s, which had put ~200 ms on
every r64 load); a disk copy this process verified is not hashed again; an adapter alone in its
rank bucket is used as a view, not restacked, so the first step after a host load costs nothing.
Adapters are generated once into .cache/bench-coldstart/ (keyed by model, kind and seed).
Prints one JSON object as its last line; writes bench/results/coldstart.json and coldstart.png.

    python -m bench.coldstart --json [--trials 15] [--trials-r64 8] [--tiers host,disk,s3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import boto3
import grpc
from boto3.s3.transfer import TransferConfig

from loraplex.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.adapter_files import ADAPTER_FILES, adapter_digest
from services.common.base_models import build_atomically, pull_model
from services.common.config import DEFAULT_MODEL, loraplex_home
from services.common.health import wait_serving
from services.common.net import free_port
from services.devtools.adapters import ATTENTION, MLP, AdapterSpec, is_adapter_dir, random_adapter

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ADAPTER_CACHE = REPO / ".cache" / "bench-coldstart"
RECIPE = 1  # bump when the adapter recipe below changes, so cached adapters are rebuilt
BUCKET = "bench-coldstart"
PROMPT = "Name one colour."
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench-coldstart",
    "AWS_SECRET_ACCESS_KEY": "bench-coldstart-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
KINDS: dict[str, tuple[tuple[str, ...], int]] = {
    "r8_qv": (("q_proj", "v_proj"), 8),
    "r16_all": (ATTENTION + MLP, 16),
    "r64_all": (ATTENTION + MLP, 64),
}
TIERS = ("host", "disk", "s3")
Tier: TypeAlias = common_pb2.AdapterTier.ValueType
WANTED: dict[str, Tier] = {
    "device": common_pb2.ADAPTER_TIER_DEVICE,
    "host": common_pb2.ADAPTER_TIER_HOST,
    "disk": common_pb2.ADAPTER_TIER_DISK,
    "s3": common_pb2.ADAPTER_TIER_OBJECT_STORE,
}
COLORS = {"host": "C0", "disk": "C1", "s3": "C2", "peft": "C7"}
HOST_TARGET_MS = 10.0
S3_TARGET_MS = 150.0
# Generous budgets: nothing in this benchmark should be demoted or expire behind its back.
WORKER_BUDGETS = {
    "LORAPLEX_DEVICE_ADAPTER_BYTES": str(4 << 30),
    "LORAPLEX_HOST_ADAPTER_BYTES": str(8 << 30),
    "LORAPLEX_DISK_ADAPTER_BYTES": str(16 << 30),
    "LORAPLEX_ADAPTER_IDLE_TTL_S": "86400",
    "LORAPLEX_KV_CACHE_BLOCKS": "256",
}


def _log(*parts: object) -> None:
    print("[coldstart]", *parts, file=sys.stderr, flush=True)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _tier_name(tier: Tier) -> str:
    return str(common_pb2.AdapterTier.Name(tier)).removeprefix("ADAPTER_TIER_")


# ---------------------------------------------------------------------------------------------
# Adapters


@dataclass(frozen=True)
class BenchAdapter:
    kind: str
    seed: int
    path: Path
    digest: str
    size_bytes: int
    rank: int

    @property
    def prefix(self) -> str:
        return f"{self.kind}-s{self.seed}"


def adapter_spec(kind: str, seed: int) -> AdapterSpec:
    targets, rank = KINDS[kind]
    return AdapterSpec(f"bench-{kind}", targets, r=rank, lora_alpha=2 * rank, seed=seed)


def build_adapters(model_dir: Path, kind: str, seeds: Sequence[int], cache: Path) -> list[BenchAdapter]:
    """PEFT-written adapters with seeded random weights, built once per (model, kind, seed)."""
    out = []
    for seed in seeds:
        spec = adapter_spec(kind, seed)
        dest = cache / model_dir.resolve().name / f"v{RECIPE}-{kind}-s{seed}"
        build_atomically(dest, functools.partial(_random_into, model_dir, spec), done=is_adapter_dir)
        size = sum((dest / name).stat().st_size for name in ADAPTER_FILES)
        out.append(BenchAdapter(kind, seed, dest, adapter_digest(dest), size, spec.r))
    return out


def _random_into(model_dir: Path, spec: AdapterSpec, tmp: Path) -> None:
    random_adapter(model_dir, spec, tmp)


# ---------------------------------------------------------------------------------------------
# Processes: moto's S3 server and the worker


@dataclass
class Processes:
    tmp: Path
    cwd: Path = REPO  # the checkout the worker runs from
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.tmp / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, only: subprocess.Popen[bytes] | None = None) -> None:
        for proc in reversed(self.procs):
            if only is not None and proc is not only:
                continue
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def start_s3(procs: Processes, env: dict[str, str]) -> Any:
    """moto's S3 server in its own process (so its request handling does not share our GIL)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = procs.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env)
    client = s3_client(endpoint)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return endpoint, client
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not start:\n{procs.log_tail('moto')}") from None
            time.sleep(0.2)


def upload(client: Any, adapters: Sequence[BenchAdapter]) -> None:
    single_put = TransferConfig(multipart_threshold=1 << 30)
    for adapter in adapters:
        for name in ADAPTER_FILES:
            client.upload_file(
                str(adapter.path / name), BUCKET, f"{adapter.prefix}/{name}", Config=single_put
            )


def start_worker(
    procs: Processes, model_dir: Path, model: str, env: dict[str, str], threads: int
) -> tuple[str, subprocess.Popen[bytes]]:
    home = procs.tmp / "home"
    (home / "models").mkdir(parents=True)
    # The worker finds models under $LORAPLEX_HOME/models; link the pulled one rather than copy it.
    (home / "models" / model).symlink_to(model_dir.resolve(), target_is_directory=True)
    address = f"127.0.0.1:{free_port()}"
    worker_env = {
        **{k: v for k, v in env.items() if not k.startswith("LORAPLEX_")},
        **WORKER_BUDGETS,
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_WORKER_LISTEN": address,
        "LORAPLEX_MODEL": model,
        "LORAPLEX_DEVICE": "cpu",
        "LORAPLEX_DTYPE": "auto",
        # The bench calls the worker directly on loopback: no router identity to present.
        "LORAPLEX_INSECURE_PLAINTEXT": "true",
        "LORAPLEX_ALLOWED_BUCKETS": BUCKET,
        # Two torch threads on a busy 2-core machine stall at every barrier when another process
        # holds a core (TTFT outliers of 0.5-1.5 s); one thread keeps the tails about the tiers.
        **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
    }
    proc = procs.start("worker", [sys.executable, "-m", "services.cli.main", "worker", "serve"], worker_env)
    try:
        wait_serving(address, tls=None, proc=proc, timeout_s=300)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; worker log:\n{procs.log_tail('worker')}") from None
    return address, proc


# ---------------------------------------------------------------------------------------------
# Client


@dataclass(frozen=True)
class Sample:
    ttft_ms: float
    load_ms: float  # the worker's Timings.adapter_load_ms
    worker_ttft_ms: float  # the worker's Timings.ttft_ms: arrival to first token, no network
    source_tier: Tier


class WorkerClient:
    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self._n = 0

    async def generate(self, ref: common_pb2.AdapterRef | None) -> Sample:
        self._n += 1
        request = worker_pb2.WorkerServiceGenerateRequest(
            request_id=f"coldstart-{os.getpid()}-{self._n}",
            adapter=ref,
            prompt=common_pb2.Prompt(text=PROMPT),
            sampling=common_pb2.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        )
        start = time.perf_counter()
        first = 0.0
        timings = common_pb2.Timings()
        async for msg in self.stub.Generate(request, timeout=300):
            event = msg.WhichOneof("event")
            if event == "delta" and not first:
                first = time.perf_counter()
            elif event == "finished":
                timings = msg.finished.timings
        if not first:
            raise RuntimeError("the worker finished the request without a token")
        return Sample(
            (first - start) * 1000, timings.adapter_load_ms, timings.ttft_ms, timings.adapter_source_tier
        )

    async def held(self) -> tuple[dict[str, Tier], set[str]]:
        """digest -> tier, and the digests loading now, from the first (snapshot) message of WatchState."""
        call = self.stub.WatchState(worker_pb2.WatchStateRequest(), timeout=30)
        try:
            msg = await call.read()
        finally:
            call.cancel()
        if msg is grpc.aio.EOF or msg.WhichOneof("update") != "snapshot":
            raise RuntimeError("WatchState did not start with a snapshot")
        snapshot = msg.snapshot
        return {a.digest: a.tier for a in snapshot.adapters}, set(snapshot.loading)

    async def wait_tier(self, digest: str, tier: Tier, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            held, loading = await self.held()
            if held.get(digest) == tier and digest not in loading:
                return
            if time.monotonic() > deadline:
                now = _tier_name(held[digest]) if digest in held else "not held"
                raise RuntimeError(
                    f"adapter {digest[:19]} did not reach tier {_tier_name(tier)} within {timeout_s:.0f}s "
                    f"(it is {now}{', loading' if digest in loading else ''}); does this worker have "
                    f"that tier?"
                )
            await asyncio.sleep(0.005)

    async def evict(self, digest: str) -> None:
        # A request's hold on the adapter ends just after its stream does; retry briefly.
        for _ in range(500):
            if (await self.stub.EvictAdapter(worker_pb2.EvictAdapterRequest(digest=digest))).evicted:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError(f"the worker kept adapter {digest[:19]} pinned for 5 s after its request ended")

    async def prefetch(self, ref: common_pb2.AdapterRef, tier: Tier) -> None:
        await self.stub.PrefetchAdapter(worker_pb2.PrefetchAdapterRequest(adapter=ref, tier=tier))

    async def close(self) -> None:
        await self.channel.close()


def adapter_ref(adapter: BenchAdapter, base_model: str) -> common_pb2.AdapterRef:
    return common_pb2.AdapterRef(
        name=f"bench-{adapter.prefix.replace('_', '-')}",
        version=1,
        digest=adapter.digest,
        uri=f"s3://{BUCKET}/{adapter.prefix}",
        rank=adapter.rank,
        variant=common_pb2.ADAPTER_VARIANT_LORA,
        base_model=base_model,
        size_bytes=adapter.size_bytes,
    )


@dataclass
class KindRun:
    ttft: dict[str, list[float]] = field(default_factory=dict)  # tier -> ms, "device" included
    load: dict[str, list[float]] = field(default_factory=dict)
    worker_ttft: dict[str, list[float]] = field(default_factory=dict)
    peft: list[float] = field(default_factory=list)  # PeftModel.load_adapter ms
    mismatches: list[str] = field(default_factory=list)


async def measure_kind(
    client: WorkerClient,
    base_model: str,
    resident: BenchAdapter,
    cold: Sequence[BenchAdapter],
    tiers: Sequence[str],
    rng: random.Random,
    peft: PeftBaseline,
) -> KindRun:
    run = KindRun()
    ref = adapter_ref(resident, base_model)
    for _ in range(3):  # the first loads it (from S3); the others warm the device path
        await client.generate(ref)

    async def one(tier: str, trial: int) -> Sample:
        if tier == "device":
            # Untimed first: an eviction in the previous step drops the engine's cached weight
            # stacks, and re-stacking belongs to the cold tiers' cost, not to the warm baseline.
            await client.generate(ref)
            return await client.generate(ref)
        if tier == "host":
            await client.evict(resident.digest)
            await client.prefetch(ref, WANTED["host"])
            await client.wait_tier(resident.digest, WANTED["host"])
            return await client.generate(ref)
        if tier == "disk":
            await client.evict(resident.digest)
            await client.wait_tier(resident.digest, WANTED["disk"])
            return await client.generate(ref)
        cold_ref = adapter_ref(cold[trial], base_model)
        sample = await client.generate(cold_ref)
        await client.evict(cold_ref.digest)  # keep device and host memory flat across trials
        return sample

    peft.load_ms(resident.path)  # untimed: PEFT's first load of a kind adds its layers' dicts
    for trial in range(len(cold)):
        order = ["device", "peft", *tiers]
        rng.shuffle(order)
        for tier in order:
            if tier == "peft":
                # Blocks the event loop for one load; nothing else is in flight meanwhile.
                run.peft.append(peft.load_ms(resident.path))
                continue
            sample = await one(tier, trial)
            run.ttft.setdefault(tier, []).append(sample.ttft_ms)
            run.load.setdefault(tier, []).append(sample.load_ms)
            run.worker_ttft.setdefault(tier, []).append(sample.worker_ttft_ms)
            if sample.source_tier != WANTED[tier]:
                run.mismatches.append(f"{tier} trial {trial}: worker says {_tier_name(sample.source_tier)}")
    return run


async def measure_worker(
    address: str,
    adapters: dict[str, tuple[BenchAdapter, list[BenchAdapter]]],
    tiers: Sequence[str],
    seed: int,
    peft: PeftBaseline,
) -> tuple[dict[str, Any], dict[str, KindRun]]:
    client = WorkerClient(address)
    try:
        info = await client.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=30)
        for _ in range(3):  # warm the channel and the engine's prefill path
            await client.generate(None)
        rng = random.Random(seed)
        runs = {}
        for kind, (resident, cold) in adapters.items():
            started = time.monotonic()
            runs[kind] = await measure_kind(client, info.base_model, resident, cold, tiers, rng, peft)
            _log(f"{kind}: {len(cold)} trials in {time.monotonic() - started:.1f}s")
        return {"base_model": info.base_model, "device": info.device, "dtype": info.dtype}, runs
    finally:
        await client.close()


# ---------------------------------------------------------------------------------------------
# Where a cold load's time goes


def profile_stages(
    model_dir: Path,
    adapters: dict[str, tuple[BenchAdapter, list[BenchAdapter]]],
    endpoint: str,
    dtype_name: str,
    loads: int,
) -> dict[str, dict[str, float]]:
    """Median ms per stage of the worker's load path, run in this process on the same files.

    fetch: both files from S3 (one reused client); sha256: the content digest; parse: safetensors
    to per-module tensors in the serving dtype; prepare: the engine's step layout (padded to the
    rank bucket, A^T and scaled B^T). Installing a prepared adapter is a dict insert on CPU.
    """
    import torch

    from services.common.object_store import S3Store
    from services.worker.engine.adapter_slots import to_device
    from services.worker.engine.adapter_weights import load_adapter_weights
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.llm_engine import LLMEngine

    dtype = getattr(torch, dtype_name)
    engine = LLMEngine(EngineConfig(model_dir=model_dir, dtype=dtype, kv_cache_blocks=16))
    client = s3_client(endpoint)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-profile-") as tmp:
        for kind, (resident, _) in adapters.items():
            store = S3Store(BUCKET, resident.prefix, client)
            times: dict[str, list[float]] = {"fetch": [], "sha256": [], "parse": [], "prepare": []}
            for i in range(loads):
                directory = Path(tmp) / f"{kind}-{i}"
                directory.mkdir()
                t0 = time.perf_counter()
                for name in ADAPTER_FILES:
                    store.download(name, directory / name, max_bytes=1 << 30)
                t1 = time.perf_counter()
                digest = adapter_digest(directory)
                t2 = time.perf_counter()
                weights = load_adapter_weights(directory, digest, dtype)
                t3 = time.perf_counter()
                to_device(weights, engine.model, engine.config.max_lora_rank, "cpu")
                t4 = time.perf_counter()
                for stage, a, b in (
                    ("fetch", t0, t1),
                    ("sha256", t1, t2),
                    ("parse", t2, t3),
                    ("prepare", t3, t4),
                ):
                    times[stage].append((b - a) * 1000)
                shutil.rmtree(directory)
            out[kind] = {stage: _r(statistics.median(v)) for stage, v in times.items()}
    return out


# ---------------------------------------------------------------------------------------------
# PEFT baseline


class PeftBaseline:
    """A PeftModel on the same base model (fp32, as PEFT users load it); times load_adapter."""

    def __init__(self, model_dir: Path, first: Path) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, str(first), adapter_name="warm")
        self.model.eval()
        self._n = 0

    def load_ms(self, path: Path) -> float:
        """One load_adapter under a fresh name, from local disk; deleted again after."""
        self._n += 1
        name = f"a{self._n}"
        start = time.perf_counter()
        self.model.load_adapter(str(path), adapter_name=name)
        elapsed = (time.perf_counter() - start) * 1000
        self.model.delete_adapter(name)
        return elapsed


# ---------------------------------------------------------------------------------------------
# Summary, plot, main


def _r(x: float) -> float:
    return round(x, 2)


def summarize(
    runs: dict[str, KindRun],
    sizes: dict[str, int],
    tiers: Sequence[str],
) -> dict[str, Any]:
    added: dict[str, dict[str, dict[str, float]]] = {}
    device: dict[str, dict[str, float]] = {}
    load: dict[str, dict[str, float]] = {}
    worker_ttft: dict[str, dict[str, float]] = {}
    for kind, run in runs.items():
        dev = run.ttft["device"]
        device[kind] = {"p50": _r(_pct(dev, 0.5)), "p99": _r(_pct(dev, 0.99))}
        added[kind] = {
            tier: {
                "p50": _r(_pct(run.ttft[tier], 0.5) - _pct(dev, 0.5)),
                "p99": _r(_pct(run.ttft[tier], 0.99) - _pct(dev, 0.99)),
            }
            for tier in tiers
        }
        load[kind] = {tier: _r(statistics.median(run.load[tier])) for tier in tiers}
        worker_ttft[kind] = {tier: _r(statistics.median(v)) for tier, v in run.worker_ttft.items()}
    peft_ms = {k: {"p50": _r(_pct(r.peft, 0.5)), "p99": _r(_pct(r.peft, 0.99))} for k, r in runs.items()}

    def p50(kind: str, tier: str) -> float | None:
        return added.get(kind, {}).get(tier, {}).get("p50")

    host = {k: v["host"]["p50"] for k, v in added.items() if "host" in v}
    worst = max(host, key=lambda k: host[k]) if host else None
    checks: dict[str, dict[str, Any]] = {
        "host_r16_p50_ms": {"value": p50("r16_all", "host"), "limit": HOST_TARGET_MS},
        "s3_r16_p50_ms": {"value": p50("r16_all", "s3"), "limit": S3_TARGET_MS},
    }
    for kind in runs:
        for tier in tiers:
            if kind in peft_ms:
                checks[f"{tier}_{kind}_below_peft_load"] = {
                    "value": p50(kind, tier),
                    "limit": peft_ms[kind]["p50"],
                }
    for check in checks.values():
        check["met"] = check["value"] is not None and check["value"] <= check["limit"]
    missing = [t for t in TIERS if t not in tiers]
    return {
        "ram_added_ttft_p50_ms": p50("r16_all", "host"),
        "disk_added_ttft_p50_ms_r16": p50("r16_all", "disk"),
        "s3_added_ttft_p50_ms_r16": p50("r16_all", "s3"),
        "peft_load_ms_r16": peft_ms.get("r16_all", {}).get("p50"),
        "ram_added_ttft_p50_ms_worst": host[worst] if worst else None,
        "ram_added_ttft_worst_kind": worst,
        "added_ttft_ms": added,
        "device_ttft_ms": device,
        "peft_load_ms": peft_ms,
        "worker_load_ms_p50": load,
        "worker_ttft_ms_p50": worker_ttft,
        "adapter_bytes": sizes,
        "trials": {kind: len(run.ttft["device"]) for kind, run in runs.items()},
        "tier_mismatches": sum(len(run.mismatches) for run in runs.values()),
        "targets": checks,
        # A tier left out cannot meet its target.
        "targets_met": not missing and bool(runs) and all(c["met"] for c in checks.values()),
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(summary["added_ttft_ms"])
    series = [*next(iter(summary["added_ttft_ms"].values())), "peft"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        p50s, p99s = [], []
        for kind in kinds:
            values = summary["peft_load_ms"][kind] if name == "peft" else summary["added_ttft_ms"][kind][name]
            p50s.append(max(values["p50"], 0.1))
            p99s.append(max(values["p99"], values["p50"], 0.1))
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(kinds))]
        label = "PEFT load_adapter" if name == "peft" else f"from {name} (added TTFT)"
        ax.bar(xs, p50s, width, label=label, color=COLORS[name])
        ax.errorbar(
            xs,
            p50s,
            yerr=[[0] * len(xs), [b - a for a, b in zip(p50s, p99s, strict=True)]],
            fmt="none",
            ecolor="black",
            capsize=3,
            lw=1,
        )
    ax.axhline(HOST_TARGET_MS, color="C0", ls=":", lw=1, label=f"host target {HOST_TARGET_MS:g} ms")
    ax.axhline(S3_TARGET_MS, color="C2", ls=":", lw=1, label=f"S3 target {S3_TARGET_MS:g} ms (r16)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels([f"{k}\n{summary['adapter_bytes'][k] / 1e6:.1f} MB" for k in kinds])
    ax.set_ylabel("ms (bar p50, whisker p99)")
    ax.set_title(
        f"Cold-start TTFT added over a device-resident adapter ({summary['model']}, {summary['dtype']})"
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="only the JSON result line on stdout")
    parser.add_argument("--trials", type=int, default=15, help="trials per tier for r8_qv and r16_all")
    parser.add_argument("--trials-r64", type=int, default=8, help="trials per tier for r64_all")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"adapter kinds ({', '.join(KINDS)})")
    parser.add_argument("--tiers", default=",".join(TIERS), help="tiers to measure besides device")
    parser.add_argument(
        "--profile-loads", type=int, default=5, help="in-process stage profile loads per kind (0: skip)"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--model-home", type=Path, default=None, help="where the model is pulled (LORAPLEX_HOME)"
    )
    parser.add_argument("--adapter-cache", type=Path, default=ADAPTER_CACHE)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--worker-threads", type=int, default=1, help="torch threads of the worker (0: its default)"
    )
    parser.add_argument("--worker-src", type=Path, default=REPO, help="checkout the worker runs from")
    parser.add_argument("--seed", type=int, default=7, help="shuffles the tier order of each trial")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    tiers = [t for t in args.tiers.split(",") if t]
    if unknown := [k for k in kinds if k not in KINDS] + [t for t in tiers if t not in TIERS]:
        raise ValueError(
            f"unknown kinds or tiers {unknown}; kinds: {', '.join(KINDS)}; tiers: {', '.join(TIERS)}"
        )
    if min(args.trials, args.trials_r64) < 1:
        raise ValueError("--trials and --trials-r64 must be at least 1")
    started = time.monotonic()
    load_before = os.getloadavg()[0]

    model_dir = pull_model(args.model, args.model_home or loraplex_home())
    adapters: dict[str, tuple[BenchAdapter, list[BenchAdapter]]] = {}
    for kind in kinds:
        trials = args.trials_r64 if kind == "r64_all" else args.trials
        built = build_adapters(model_dir, kind, range(trials + 1), args.adapter_cache)
        adapters[kind] = (built[0], built[1:])  # seed 0 stays resident; each trial's S3 adapter is new
    _log(
        f"{sum(len(c) + 1 for _, c in adapters.values())} adapters ready ({time.monotonic() - started:.0f}s)"
    )

    if args.worker_threads:
        import torch

        torch.set_num_threads(args.worker_threads)  # PEFT and the profile get the worker's CPU
    peft = PeftBaseline(model_dir, next(iter(adapters.values()))[0].path)
    env = {**os.environ, **AWS_ENV}
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp:
        procs = Processes(Path(tmp), args.worker_src)
        try:
            endpoint, s3 = start_s3(procs, env)
            upload(s3, [a for resident, cold in adapters.values() for a in (resident, *cold)])
            _log(f"uploaded to S3 ({time.monotonic() - started:.0f}s)")
            address, worker = start_worker(
                procs, model_dir, args.model, {**env, "AWS_ENDPOINT_URL": endpoint}, args.worker_threads
            )
            _log(f"worker serving ({time.monotonic() - started:.0f}s)")
            try:
                info, runs = asyncio.run(measure_worker(address, adapters, tiers, args.seed, peft))
            except Exception as exc:
                raise RuntimeError(f"{exc}\nworker log:\n{procs.log_tail('worker')}") from exc
            procs.stop(worker)  # frees its CPU for the in-process stage profile
            del peft
            stages = (
                profile_stages(model_dir, adapters, endpoint, info["dtype"], args.profile_loads)
                if args.profile_loads
                else {}
            )
        finally:
            procs.stop()
            shutil.rmtree(Path(tmp) / "home", ignore_errors=True)
    _log(f"stage profile done ({time.monotonic() - started:.0f}s)")

    summary = {
        "model": args.model,
        **{k: v for k, v in info.items() if k != "base_model"},
        "tiers": tiers,
        **summarize(runs, {k: r.size_bytes for k, (r, _) in adapters.items()}, tiers),
        "cold_load_stages_ms_p50": stages,
        "mismatch_examples": [m for run in runs.values() for m in run.mismatches][:5],
        "cpus": len(os.sched_getaffinity(0)),
        "worker_threads": args.worker_threads,
        # Other work on the machine inflates every tier alike (trials interleave), but noisily.
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "coldstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.results_dir / "coldstart.png")
    if not args.json:
        for kind, by_tier in summary["added_ttft_ms"].items():
            parts = [f"{tier} {v['p50']:.1f}/{v['p99']:.1f}" for tier, v in by_tier.items()]
            peft_ms = summary["peft_load_ms"][kind]["p50"]
            print(f"{kind}: added TTFT p50/p99 ms: {', '.join(parts)}; PEFT load {peft_ms:.1f} ms")
        print(f"targets met: {summary['targets_met']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
