"""`loraplex worker serve`: base model, engine thread, adapter loader and the gRPC server, wired once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from loraplex.v1 import registry_pb2, worker_pb2, worker_pb2_grpc
from services.common.base_models import is_complete, models_dir, pull_model
from services.common.config import WorkerSettings
from services.common.grpc_server import RunningServer, run_until_signalled, start_metrics
from services.common.identity import WORKER_ALLOW, start_internal_server
from services.worker import metrics, tokenizer
from services.worker.adapters import AdapterLoader
from services.worker.async_engine import AsyncEngine
from services.worker.engine.config import EngineConfig, preferred_dtype
from services.worker.engine.llm_engine import LLMEngine
from services.worker.prompt_encoder import TOKENIZER_THREADS, PromptEncoder
from services.worker.registration import Registration
from services.worker.servicer import WorkerIdentity, WorkerServicer
from services.worker.tiers import TierBudgets

log = logging.getLogger(__name__)

SERVICE_NAMES = (worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class RunningWorker:
    server: RunningServer
    engine: AsyncEngine
    loader: AdapterLoader
    servicer: WorkerServicer

    @property
    def port(self) -> int:
        return self.server.port

    async def drain(self, grace_s: float) -> None:
        """Health NOT_SERVING, end state streams, let in-flight generations finish, stop the engine."""
        await self.server.drain(grace_s)


def model_path(settings: WorkerSettings) -> Path:
    """`$LORAPLEX_HOME/models/<name>`; a directory already there is used as is, else it is pulled."""
    path = models_dir(settings.home) / settings.model
    if is_complete(path):
        return path
    log.info("model %s is not in %s; pulling it", settings.model, models_dir(settings.home))
    return pull_model(settings.model, settings.home)


def engine_config(settings: WorkerSettings, model_dir: Path) -> EngineConfig:
    return EngineConfig(
        model_dir=model_dir,
        dtype=preferred_dtype(settings.device) if settings.dtype == "auto" else DTYPES[settings.dtype],
        device=settings.device,
        max_batch_size=settings.max_batch_size,
        max_step_tokens=max(2048, settings.max_batch_size),
        kv_cache_blocks=settings.kv_cache_blocks,
        max_waiting=settings.max_waiting,
        pack_in_background=True,  # the first tokens do not wait for it (see the cold start bench)
    )


async def start_worker(settings: WorkerSettings) -> RunningWorker:
    """Loads the model, starts the step thread and the server; returns once it serves."""
    model_dir = await asyncio.to_thread(model_path, settings)
    # Process-wide: the step thread's ops use this pool (tokenizer threads are separate).
    torch.set_num_threads(settings.worker_threads)
    config = engine_config(settings, model_dir)
    llm = await asyncio.to_thread(LLMEngine, config)
    tokenizers = await asyncio.to_thread(tokenizer.copies, llm.tokenizer, TOKENIZER_THREADS)
    engine = AsyncEngine(llm)
    engine.start()
    budgets = TierBudgets(
        device_bytes=settings.device_adapter_bytes,
        host_bytes=settings.host_adapter_bytes,
        disk_bytes=settings.disk_adapter_bytes,
    )
    loader = AdapterLoader(
        engine,
        settings.cache_dir,
        base_model=settings.model,
        dtype=config.dtype,
        budgets=budgets,
        idle_ttl_s=settings.adapter_idle_ttl_s,
        max_adapter_bytes=settings.max_adapter_bytes,
        object_store_timeout_s=settings.object_store_timeout_s,
        sources=settings.adapter_sources,
    )
    try:
        await loader.start()
    except BaseException:
        await engine.shutdown()
        raise
    for tier in ("device", "host", "disk"):
        metrics.ADAPTER_BUDGET_BYTES.labels(tier=tier).set(getattr(budgets, f"{tier}_bytes"))
    identity = WorkerIdentity(
        worker_id=settings.worker_id,
        base_model=settings.model,
        device=settings.device,
        dtype=str(config.dtype).removeprefix("torch."),
        default_max_tokens=settings.default_max_tokens,
    )
    encoder = PromptEncoder(tokenizers)
    servicer = WorkerServicer(identity, engine, loader, encoder, max_prompt_bytes=settings.max_prompt_bytes)

    def register(server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)

    try:
        running = await start_internal_server(
            settings.listen, register, SERVICE_NAMES, tls=settings.tls, allow=WORKER_ALLOW, what="the worker"
        )
    except BaseException:
        await loader.close()
        await engine.shutdown()
        await encoder.close()
        raise
    running.before_drain.append(servicer.begin_drain)
    if settings.registry:
        member = registry_pb2.Worker(
            worker_id=settings.worker_id, address=settings.advertise, base_model=settings.model
        )
        registration = Registration(settings.registry, settings.tls, member)
        registration.start()
        # Leave the membership first on drain, so routers stop picking this worker.
        running.before_drain.insert(0, registration.leave)
        running.on_stop.append(registration.stop)
    # Runs after the server stopped taking calls and in-flight streams finished (or the grace ran out).
    running.on_stop.append(loader.close)
    running.on_stop.append(engine.shutdown)
    running.on_stop.append(encoder.close)
    return RunningWorker(running, engine, loader, servicer)


async def serve(settings: WorkerSettings, on_ready: Callable[[RunningWorker], None] | None = None) -> None:
    worker = await start_worker(settings)
    start_metrics(settings.metrics_port)
    if on_ready:
        on_ready(worker)
    await run_until_signalled(worker.server, settings.drain_grace_s)
