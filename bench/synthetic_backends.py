"""Backends for `bench.router`: a synthetic worker plus a stand-in registry, in one process.

The stand-in answers only what the router asks (API key, adapter, base models, an idle change feed,
RecordUsage) with fixed answers, so the benchmark measures the router's stream proxy, not
PostgreSQL. Run: `python -m bench.synthetic_backends` prints {"worker": port, "registry": port}.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench.synthetic_worker import SyntheticWorker
from loraplex.v1 import common_pb2, registry_pb2, usage_pb2, worker_pb2_grpc

BASE_MODEL = "bench-model"
API_KEY = "lpx_bench-key"
TENANT_ID = "00000000-0000-4000-8000-000000000001"
KEY_ID = "00000000-0000-4000-8000-000000000002"
ADAPTER = registry_pb2.Adapter(
    ref=common_pb2.AdapterRef(
        adapter_id="00000000-0000-4000-8000-000000000003",
        tenant_id=TENANT_ID,
        name="bench-adapter",
        version=1,
        digest="sha256:" + "ab" * 32,
        uri="file:///nonexistent",
        rank=8,
        base_model=BASE_MODEL,
    ),
    status=common_pb2.ADAPTER_STATUS_READY,
    revision=1,
)


class StandInRegistry:
    async def AuthenticateApiKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.secret != API_KEY:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown key")
        return registry_pb2.AuthenticateApiKeyResponse(tenant_id=TENANT_ID, key_id=KEY_ID)

    async def GetAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.tenant != TENANT_ID or request.adapter not in ("bench-adapter", "bench-adapter@1"):
            await context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        return registry_pb2.GetAdapterResponse(adapter=ADAPTER)

    async def ListBaseModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return registry_pb2.ListBaseModelsResponse(
            base_models=[registry_pb2.BaseModel(name=BASE_MODEL, context_length=1 << 20)]
        )

    async def WatchAdapters(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await asyncio.Event().wait()  # no changes during a benchmark
        yield registry_pb2.WatchAdaptersResponse()

    async def ListWorkers(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return registry_pb2.ListWorkersResponse()


class CountingLedger:
    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()  # (tenant_id, request_id), the ledger's key

    async def RecordUsage(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        new = {(r.tenant_id, r.request_id) for r in request.records} - self.seen
        self.seen |= new
        return usage_pb2.RecordUsageResponse(inserted=len(new), duplicates=len(request.records) - len(new))

    async def LookupRequests(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        found = [rid for rid in request.request_ids if (request.tenant_id, rid) in self.seen]
        return usage_pb2.LookupRequestsResponse(found=found)


def _handlers(registry: StandInRegistry, ledger: CountingLedger) -> tuple[grpc.GenericRpcHandler, ...]:
    def unary(fn: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request.FromString, response_serializer=response.SerializeToString
        )

    r = registry_pb2
    return (
        grpc.method_handlers_generic_handler(
            "loraplex.v1.AdapterRegistryService",
            {
                "AuthenticateApiKey": unary(
                    registry.AuthenticateApiKey, r.AuthenticateApiKeyRequest, r.AuthenticateApiKeyResponse
                ),
                "GetAdapter": unary(registry.GetAdapter, r.GetAdapterRequest, r.GetAdapterResponse),
                "ListBaseModels": unary(
                    registry.ListBaseModels, r.ListBaseModelsRequest, r.ListBaseModelsResponse
                ),
                "ListWorkers": unary(registry.ListWorkers, r.ListWorkersRequest, r.ListWorkersResponse),
                "WatchAdapters": grpc.unary_stream_rpc_method_handler(
                    registry.WatchAdapters,
                    request_deserializer=r.WatchAdaptersRequest.FromString,
                    response_serializer=r.WatchAdaptersResponse.SerializeToString,
                ),
            },
        ),
        grpc.method_handlers_generic_handler(
            "loraplex.v1.UsageService",
            {
                "RecordUsage": unary(
                    ledger.RecordUsage, usage_pb2.RecordUsageRequest, usage_pb2.RecordUsageResponse
                ),
                "LookupRequests": unary(
                    ledger.LookupRequests, usage_pb2.LookupRequestsRequest, usage_pb2.LookupRequestsResponse
                ),
            },
        ),
    )


async def main() -> None:
    worker = SyntheticWorker("bench-worker", BASE_MODEL, record=False)
    worker_server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(worker, worker_server)
    worker_port = worker_server.add_insecure_port("127.0.0.1:0")
    registry_server = grpc.aio.server()
    registry_server.add_generic_rpc_handlers(_handlers(StandInRegistry(), CountingLedger()))
    registry_port = registry_server.add_insecure_port("127.0.0.1:0")
    await worker_server.start()
    await registry_server.start()
    print(json.dumps({"worker": worker_port, "registry": registry_port}), flush=True)
    await worker_server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
