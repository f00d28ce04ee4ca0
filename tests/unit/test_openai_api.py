"""OpenAI request bodies to GenerateRequests, events to OpenAI's shapes, gRPC codes to HTTP errors."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from loraplex.v1 import common_pb2
from services.router import openai_api as oa

CHAT: dict[str, Any] = {"model": "bot", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_body_becomes_a_chat_prompt_with_sampling() -> None:
    p = oa.parse_chat(
        {
            **CHAT,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_tokens": 9,
            "max_completion_tokens": 7,
            "temperature": 1,
            "top_p": 0.5,
            "seed": -1,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",
            "some_future_field": {"ignored": True},
        }
    )
    assert (p.kind, p.model, p.stream, p.include_usage, p.response_format) == (
        "chat",
        "bot",
        True,
        True,
        None,
    )
    msgs = p.request.prompt.chat.messages
    assert [(m.role, m.content) for m in msgs] == [("system", "be brief"), ("user", "a\nb")]
    s = p.request.sampling
    # max_completion_tokens wins over the deprecated max_tokens; a negative seed keeps its 64 bits.
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, list(s.stop)) == (7, 1.0, 0.5, 2**64 - 1, ["END"])
    assert not p.request.request_id and not p.request.model and not p.request.adapter


@pytest.mark.parametrize(
    ("prompt", "kind"),
    [("text", "text"), (["text"], "text"), ([1, 2, 3], "token_ids"), ([[1, 2]], "token_ids")],
)
def test_completion_prompt_is_a_string_or_token_ids(prompt: object, kind: str) -> None:
    p = oa.parse_completion({"model": "m", "prompt": prompt, "max_tokens": 3})
    assert p.request.prompt.WhichOneof("kind") == kind and p.request.sampling.max_tokens == 3


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({**CHAT, "temperature": "hot"}, "temperature", "must be a number"),
        ({**CHAT, "max_tokens": True}, "max_tokens", "must be an integer"),
        ({**CHAT, "max_tokens": 2.5}, "max_tokens", "must be an integer"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", "at least 1"),
        ({**CHAT, "n": 2}, "n", "n must be 1"),
        ({**CHAT, "stream": "yes"}, "stream", "must be a boolean"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({**CHAT, "stop": ["a", 1]}, "stop", "string or an array of strings"),
        ({**CHAT, "logprobs": True}, "logprobs", "not available"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools", "not supported"),
        ({**CHAT, "presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({**CHAT, "user": 5}, "user", "must be a string"),
        ({**CHAT, "model": None}, "model", "model is required"),
        ({**CHAT, "messages": []}, "messages", "non-empty array"),
        ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "does not run tools"),
        ({**CHAT, "messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string or an array"),
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "only text parts",
        ),
        ({**CHAT, "response_format": {"type": "xml"}}, "response_format", "must be text, json_object"),
    ],
)
def test_wrong_chat_fields_are_400_naming_the_param(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(oa.BadRequest, match=words) as exc:
        oa.parse_chat(body)
    assert exc.value.param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [1, -1]}, "prompt"),
        ({"model": "m", "prompt": [True]}, "prompt"),
        ({"model": "m", "prompt": None}, "prompt"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
    ],
)
def test_wrong_completion_fields_are_400_naming_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(oa.BadRequest) as exc:
        oa.parse_completion(body)
    assert exc.value.param == param


def test_a_body_that_is_not_an_object_is_400() -> None:
    with pytest.raises(oa.BadRequest, match="must be a JSON object"):
        oa.parse_chat([CHAT])


def test_response_formats_map_onto_the_samplers_field() -> None:
    assert oa.parse_chat({**CHAT, "response_format": {"type": "text"}}).response_format is None
    obj = oa.parse_chat({**CHAT, "response_format": {"type": "json_object"}}).request.sampling
    assert obj.response_format.kind == common_pb2.RESPONSE_FORMAT_KIND_JSON_OBJECT
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    sampling = oa.parse_chat({**CHAT, "response_format": fmt}).request.sampling
    assert sampling.response_format.kind == common_pb2.RESPONSE_FORMAT_KIND_JSON_SCHEMA
    assert json.loads(sampling.response_format.json_schema) == schema
    with pytest.raises(oa.BadRequest, match="schema is required"):
        oa.parse_chat({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})


def test_model_is_a_base_model_first_else_an_adapter_reference() -> None:
    p = oa.parse_chat(CHAT)
    oa.set_target(p.request, "base", {"base"})
    assert (p.request.model, p.request.adapter) == ("base", "")
    q = oa.parse_chat(CHAT)
    oa.set_target(q.request, "bot@2", {"base"})
    assert (q.request.model, q.request.adapter) == ("", "bot@2")


def _finished(reason: int, inp: int = 5, cached: int = 2, out: int = 3) -> common_pb2.GenerationFinished:
    return common_pb2.GenerationFinished(
        finish_reason=reason,  # type: ignore[arg-type]
        usage=common_pb2.Usage(input_tokens=inp, cached_input_tokens=cached, output_tokens=out),
    )


def test_bodies_and_chunks_have_openais_shape() -> None:
    chat = oa.Answer("chat", "r1", 1700000000, "bot@1")
    body = chat.body("hello", _finished(common_pb2.FINISH_REASON_EOS))
    assert body == {
        "id": "chatcmpl-r1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bot@1",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }
    first = chat.chunk("", first=True, include_usage=True)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chat.chunk(None, finish="length", include_usage=False)
    assert last["choices"][0]["delta"] == {} and "usage" not in last
    usage = chat.usage_chunk(_finished(common_pb2.FINISH_REASON_LENGTH).usage)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 8

    text = oa.Answer("completion", "r2", 1, "m")
    body = text.body("x", _finished(common_pb2.FINISH_REASON_LENGTH))
    assert (body["id"], body["object"], body["choices"][0]["text"]) == ("cmpl-r2", "text_completion", "x")
    assert body["choices"][0]["finish_reason"] == "length"
    assert text.chunk("y", include_usage=False)["choices"][0] == {
        "index": 0,
        "text": "y",
        "logprobs": None,
        "finish_reason": None,
    }


def test_every_grpc_code_maps_to_a_status_the_openai_client_knows() -> None:
    statuses = {code.name: oa.error_kind(code.name).status for code in grpc.StatusCode if code.name != "OK"}
    assert statuses["INVALID_ARGUMENT"] == 400 and statuses["FAILED_PRECONDITION"] == 400
    assert statuses["UNAUTHENTICATED"] == 401 and statuses["PERMISSION_DENIED"] == 403
    assert statuses["NOT_FOUND"] == 404 and statuses["ALREADY_EXISTS"] == 409
    assert statuses["RESOURCE_EXHAUSTED"] == 429 and statuses["UNAVAILABLE"] == 503
    assert statuses["INTERNAL"] == 500 and statuses["UNKNOWN"] == 500
    assert oa.error_json("m", oa.error_kind("NOT_FOUND"), "model") == {
        "error": {"message": "m", "type": "not_found_error", "param": "model", "code": "model_not_found"}
    }


@pytest.mark.parametrize(
    ("message", "kind", "param"),
    [
        ("temperature must be in [0, 2], got 3.0", "chat", "temperature"),
        ("prompt.text is 5000000 bytes; this router accepts at most 1048576 bytes", "completion", "prompt"),
        ("prompt.chat has 300 messages; at most 256", "chat", "messages"),
        ("max_tokens=9999 exceeds the model's context length 512", "chat", "max_tokens"),
        ("at most 8 stop strings, got 9", "chat", "stop"),
        ("request_id is at most 128 characters, got 200", "chat", "Idempotency-Key"),
        ("something else entirely", "chat", None),
    ],
)
def test_router_messages_name_the_body_param(message: str, kind: oa.Kind, param: str | None) -> None:
    assert oa.param_of("INVALID_ARGUMENT", message, kind) == param
