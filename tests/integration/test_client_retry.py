"""The Python client against a real gRPC server on loopback that fails on cue: it retries transient
failures before the first token with the same request id, honours pushback, and never retries once
a token arrived.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from loraplex.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.client.inference import AsyncInferenceClient, GenerateOptions, InferenceClient
from services.client.retry import RetryPolicy

# One step per attempt: (status to end with, pushback ms or None, tokens to send first).
Step = tuple[grpc.StatusCode | None, int | None, int]


@dataclass
class ScriptedRouter(inference_pb2_grpc.InferenceServiceServicer):
    script: list[Step] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateResponse]:
        self.request_ids.append(request.request_id)
        code, pushback, tokens = self.script.pop(0) if self.script else (None, None, 2)
        if tokens:
            yield inference_pb2.GenerateResponse(
                started=common_pb2.GenerationStarted(request_id=request.request_id)
            )
        for i in range(tokens):
            yield inference_pb2.GenerateResponse(
                delta=common_pb2.GenerationDelta(text=f"t{i}", token_ids=[i])
            )
        if code is not None:
            if pushback is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(pushback)),))
            context.abort(code, f"scripted {code.name}")
        yield inference_pb2.GenerateResponse(
            finished=common_pb2.GenerationFinished(usage=common_pb2.Usage(output_tokens=tokens))
        )

    def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse()


@pytest.fixture
def router() -> Iterator[tuple[ScriptedRouter, str]]:
    servicer = ScriptedRouter()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def _client(target: str, policy: RetryPolicy, waits: list[float]) -> InferenceClient:
    return InferenceClient(target, "lpx_test", retry=policy, sleep=waits.append)


def test_transient_failures_are_retried_with_the_same_id_and_the_servers_pushback(
    router: tuple[ScriptedRouter, str],
) -> None:
    servicer, target = router
    servicer.script = [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 700, 0),
        (grpc.StatusCode.UNAVAILABLE, None, 0),
        (None, None, 3),
    ]
    waits: list[float] = []
    with _client(target, RetryPolicy(retries=5, initial_backoff_s=0.01, max_backoff_s=0.02), waits) as c:
        events = list(c.generate("hi", GenerateOptions(request_id="mine-1")))
    assert servicer.request_ids == ["mine-1"] * 3
    assert waits[0] == 0.7  # the pushback, not the (much shorter) backoff
    assert 0 <= waits[1] <= 0.02
    assert [e.WhichOneof("event") for e in events] == ["started", "delta", "delta", "delta", "finished"]


def test_a_call_without_an_id_gets_one_client_side_so_a_retry_cannot_run_twice(
    router: tuple[ScriptedRouter, str],
) -> None:
    servicer, target = router
    servicer.script = [(grpc.StatusCode.UNAVAILABLE, None, 0), (None, None, 1)]
    with _client(target, RetryPolicy(retries=2, initial_backoff_s=0.01), []) as c:
        list(c.generate("hi"))
    first, second = servicer.request_ids
    assert first == second and str(uuid.UUID(first)) == first


def test_a_failure_after_a_token_is_not_retried(router: tuple[ScriptedRouter, str]) -> None:
    servicer, target = router
    servicer.script = [(grpc.StatusCode.UNAVAILABLE, 10, 2)]
    tokens = 0
    policy = RetryPolicy(retries=5, initial_backoff_s=0.01)
    with _client(target, policy, []) as c, pytest.raises(grpc.RpcError) as err:
        for e in c.generate("hi"):
            tokens += len(e.delta.token_ids)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert tokens == 2 and len(servicer.request_ids) == 1


def test_permanent_errors_and_a_spent_budget_end_the_call(router: tuple[ScriptedRouter, str]) -> None:
    servicer, target = router
    servicer.script = [(grpc.StatusCode.INVALID_ARGUMENT, None, 0)]
    policy = RetryPolicy(retries=5, initial_backoff_s=0.01)
    with _client(target, policy, []) as c, pytest.raises(grpc.RpcError) as err:
        list(c.generate("hi"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert len(servicer.request_ids) == 1

    servicer.request_ids.clear()
    servicer.script = [(grpc.StatusCode.UNAVAILABLE, None, 0)] * 4
    waits: list[float] = []
    with (
        _client(target, RetryPolicy(retries=2, initial_backoff_s=0.01), waits) as c,
        pytest.raises(grpc.RpcError) as err,
    ):
        list(c.generate("hi"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert len(servicer.request_ids) == 3 and len(waits) == 2


async def test_the_async_client_retries_the_same_way(router: tuple[ScriptedRouter, str]) -> None:
    servicer, target = router
    servicer.script = [(grpc.StatusCode.RESOURCE_EXHAUSTED, 20, 0), (None, None, 2)]
    async with AsyncInferenceClient(target, "lpx_test", retry=RetryPolicy(retries=1)) as c:
        events = [e async for e in c.generate("hi")]
    assert len(servicer.request_ids) == 2 and len(set(servicer.request_ids)) == 1
    assert sum(len(e.delta.token_ids) for e in events) == 2
