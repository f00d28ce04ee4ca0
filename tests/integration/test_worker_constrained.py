"""response_format through a real in-process SmolLM2 worker: every constrained answer parses and
validates with jsonschema, in one batch with free rows and adapter rows, and the free rows'
greedy output is the same as when they run alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest

from loraplex.v1 import common_pb2, worker_pb2
from services.common.config import DEFAULT_MODEL
from services.worker.server import RunningWorker
from tests.fixtures.worker import AdapterStore, serving, worker_settings
from tests.integration.test_worker_service import Streamed, Stub, generate, status_of

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
COLOR = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}
PRIMES = {
    "type": "object",
    "properties": {"primes": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5}},
    "required": ["primes"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 16}, "vip": {"type": "boolean"}},
            "required": ["name", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 2,
        },
    },
    "required": ["customer", "items"],
    "additionalProperties": False,
}
MAX_TOKENS = 80


def ask(
    question: str,
    fmt: common_pb2.ResponseFormat | None = None,
    *,
    adapter: common_pb2.AdapterRef | None = None,
    max_tokens: int = MAX_TOKENS,
) -> worker_pb2.WorkerServiceGenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens)
    if fmt is not None:
        sampling.response_format.CopyFrom(fmt)
    return worker_pb2.WorkerServiceGenerateRequest(
        adapter=adapter,
        prompt=common_pb2.Prompt(
            chat=common_pb2.ChatPrompt(messages=[common_pb2.ChatMessage(role="user", content=question)])
        ),
        sampling=sampling,
    )


def json_schema(schema: dict[str, Any]) -> common_pb2.ResponseFormat:
    return common_pb2.ResponseFormat(
        kind=common_pb2.RESPONSE_FORMAT_KIND_JSON_SCHEMA, json_schema=json.dumps(schema)
    )


JSON_OBJECT = common_pb2.ResponseFormat(kind=common_pb2.RESPONSE_FORMAT_KIND_JSON_OBJECT)


@pytest.fixture(scope="module")
async def smol(loraplex_home: Path, smollm2_dir: Path) -> AsyncIterator[tuple[RunningWorker, Stub]]:
    async with serving(worker_settings(loraplex_home, DEFAULT_MODEL, default_max_tokens=MAX_TOKENS)) as pair:
        yield pair


@pytest.fixture(scope="module")
def smol_ref(adapter_store: AdapterStore, worker_smollm2_adapter: Path) -> common_pb2.AdapterRef:
    return adapter_store.publish(worker_smollm2_adapter, base_model=DEFAULT_MODEL, name="smol")


def assert_valid(out: Streamed, schema: dict[str, Any]) -> Any:
    assert out.finished is not None
    assert out.finished.finish_reason == common_pb2.FINISH_REASON_STOP, out.text
    value = json.loads(out.text)
    jsonschema.validate(value, schema)
    return value


async def test_constrained_rows_validate_in_a_batch_with_free_and_adapter_rows(
    smol: tuple[RunningWorker, Stub], smol_ref: common_pb2.AdapterRef
) -> None:
    worker, stub = smol
    free = [
        ask("What is the capital of France?"),
        ask("Write one sentence about the sea."),
        ask("Name a fruit.", adapter=smol_ref),
    ]
    constrained: list[tuple[worker_pb2.WorkerServiceGenerateRequest, dict[str, Any]]] = [
        (
            ask('Answer in JSON like {"capital": "..."}: the capital of Italy?', JSON_OBJECT),
            {"type": "object"},
        ),
        (ask("Give a person with a name and an age.", json_schema(PERSON)), PERSON),
        (ask("What color is the sky?", json_schema(COLOR)), COLOR),
        (ask("List some prime numbers.", json_schema(PRIMES)), PRIMES),
        (ask("Make an order for Ann.", json_schema(ORDER), adapter=smol_ref), ORDER),
    ]
    steps_before = worker.engine.steps
    batch = await asyncio.gather(*(generate(stub, r) for r in [*free, *(r for r, _ in constrained)]))
    values = [assert_valid(out, schema) for out, (_, schema) in zip(batch[3:], constrained, strict=True)]
    assert values[2]["color"] in {"red", "green", "blue"}
    assert all(isinstance(p, int) for p in values[3]["primes"])
    # They shared steps: eight streams of up to 80 tokens in far fewer than 8 x 80 steps.
    assert worker.engine.steps - steps_before < 2 * MAX_TOKENS
    # Free rows (base and adapter) are untouched by their constrained neighbours: greedy, the same
    # tokens as alone. So is a constrained row: its mask is its own.
    for request, together in zip([*free, constrained[1][0]], [*batch[:3], batch[4]], strict=True):
        alone = await generate(stub, request)
        assert alone.token_ids == together.token_ids
    assert batch[0].finished is not None and batch[0].finished.finish_reason != common_pb2.FINISH_REASON_STOP
    assert "Paris" in batch[0].text


async def test_max_tokens_cuts_constrained_json_with_length(smol: tuple[RunningWorker, Stub]) -> None:
    _, stub = smol
    out = await generate(stub, ask("Give a person.", json_schema(PERSON), max_tokens=3))
    assert out.finished is not None and out.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert out.text.startswith("{") and len(out.token_ids) == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


@pytest.mark.parametrize(
    ("fmt", "phrase"),
    [
        (json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "uniqueItems"),
        (json_schema({"type": "string", "pattern": "(?<=a)b"}), "look-around"),
        (
            common_pb2.ResponseFormat(kind=common_pb2.RESPONSE_FORMAT_KIND_JSON_SCHEMA, json_schema="{"),
            "JSON",
        ),
        (common_pb2.ResponseFormat(kind=common_pb2.RESPONSE_FORMAT_KIND_JSON_SCHEMA), "empty"),
        (
            common_pb2.ResponseFormat(kind=common_pb2.RESPONSE_FORMAT_KIND_JSON_OBJECT, json_schema="{}"),
            "empty",
        ),
    ],
)
async def test_unsupported_or_invalid_schema_is_invalid_argument(
    smol: tuple[RunningWorker, Stub], fmt: common_pb2.ResponseFormat, phrase: str
) -> None:
    worker, stub = smol
    err = await status_of(stub, ask("Anything.", fmt))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in (err.details() or "")
    stats = await worker.engine.stats()
    assert stats.running == 0 and stats.waiting == 0  # refused before it joined the batch
