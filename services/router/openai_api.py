"""OpenAI's API dialect, translated: request bodies to a GenerateRequest, generation events to
response bodies and stream chunks, the router's gRPC status codes to OpenAI's error JSON.

Pure: no sockets, no registry; the HTTP door (services.router.http_door) carries the results out.
Request bodies are checked the way OpenAI checks them: unknown fields are ignored, a known field
with the wrong type is a 400 naming the field (`param`), and a feature loraplex does not have
(n > 1, logprobs, tools, ...) is refused with a sentence rather than silently ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from loraplex.v1 import common_pb2, inference_pb2

Kind = Literal["chat", "completion"]
_FR = common_pb2.FinishReason
# OpenAI's "developer" role is the newer name of "system".
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UINT32 = 1 << 32
_UINT64 = 1 << 64


class BadRequest(ValueError):
    """A 400: `message` says what to change, `param` names the field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ResponseFormat:
    """`response_format` of a request that asks for JSON (type json_object or json_schema)."""

    kind: Literal["json_object", "json_schema"]
    # The JSON schema (json_schema only).
    schema: dict[str, Any] | None = None
    name: str = ""
    strict: bool = False


@dataclass(frozen=True)
class Parsed:
    """A request body, checked: the GenerateRequest to run (without model or adapter: see
    `set_target`) and how to answer it."""

    kind: Kind
    model: str
    request: inference_pb2.GenerateRequest
    stream: bool
    include_usage: bool
    response_format: ResponseFormat | None


# -- requests ---------------------------------------------------------------------------------


def parse_chat(body: object) -> Parsed:
    """A POST /v1/chat/completions body."""
    b = _object(body)
    prompt = common_pb2.Prompt(chat=common_pb2.ChatPrompt(messages=_messages(b.get("messages"))))
    max_tokens = _int(b, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = _int(b, "max_tokens", minimum=1)
    if _flag(b, "logprobs") or b.get("top_logprobs") is not None:
        raise BadRequest("logprobs are not available on loraplex; remove logprobs/top_logprobs", "logprobs")
    for name in ("tools", "functions"):
        if b.get(name):
            raise BadRequest(f"{name} are not supported: loraplex generates text only", name)
    return _parsed("chat", b, prompt, max_tokens)


def parse_completion(body: object) -> Parsed:
    """A POST /v1/completions body."""
    b = _object(body)
    prompt = _prompt(b.get("prompt"))
    max_tokens = _int(b, "max_tokens", minimum=1)
    if b.get("logprobs") is not None:
        raise BadRequest("logprobs are not available on loraplex; remove logprobs", "logprobs")
    if _flag(b, "echo"):
        raise BadRequest("echo is not supported; the response holds the completion only", "echo")
    best_of = _int(b, "best_of", minimum=1)
    if best_of is not None and best_of != 1:
        raise BadRequest("best_of must be 1: loraplex returns one completion per request", "best_of")
    if _text(b, "suffix"):
        raise BadRequest("suffix (insertion) is not supported", "suffix")
    return _parsed("completion", b, prompt, max_tokens)


def set_target(request: inference_pb2.GenerateRequest, model: str, base_models: Collection[str]) -> None:
    """`model` names a base model, or else an adapter of the caller ("name", "name@version" or
    its id). A base model's name wins over an adapter with the same name; `name@version` always
    names the adapter."""
    if model in base_models:
        request.model = model
    else:
        request.adapter = model


def _parsed(kind: Kind, b: Mapping[str, Any], prompt: common_pb2.Prompt, max_tokens: int | None) -> Parsed:
    model = _text(b, "model")
    if not model:
        raise BadRequest("model is required: an adapter name, adapter@version or a base model", "model")
    n = _int(b, "n", minimum=1)
    if n is not None and n != 1:
        raise BadRequest(f"n must be 1: loraplex returns one choice per request (got n={n})", "n")
    stream = _flag(b, "stream")
    include_usage = False
    options = b.get("stream_options")
    if options is not None:
        if not stream:
            raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
        include_usage = _flag(_object(options, "stream_options"), "include_usage", "stream_options")
    _text(b, "user")  # accepted (and type-checked) for compatibility; loraplex bills by API key
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(b, name)
        if value:
            raise BadRequest(f"{name} is not supported; leave it out or 0", name)
    if b.get("logit_bias"):
        raise BadRequest("logit_bias is not supported", "logit_bias")
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens or 0, stop=_stop(b.get("stop")))
    if max_tokens is not None and max_tokens >= _UINT32:
        raise BadRequest(f"max_tokens must be below {_UINT32}", "max_tokens")
    temperature = _number(b, "temperature")
    if temperature is not None:
        sampling.temperature = temperature
    top_p = _number(b, "top_p")
    if top_p is not None:
        sampling.top_p = top_p
    seed = _int(b, "seed")
    if seed is not None:
        if not -(1 << 63) <= seed < _UINT64:
            raise BadRequest("seed must fit in 64 bits", "seed")
        sampling.seed = seed % _UINT64  # a negative (int64) seed maps onto the same 64 bits
    # vLLM's extensions to the OpenAI body, which the sampler has.
    top_k = _int(b, "top_k", minimum=0)
    if top_k is not None:
        if top_k >= _UINT32:
            raise BadRequest(f"top_k must be below {_UINT32}", "top_k")
        sampling.top_k = top_k
    repetition_penalty = _number(b, "repetition_penalty")
    if repetition_penalty is not None:
        sampling.repetition_penalty = repetition_penalty
    sampling.ignore_eos = _flag(b, "ignore_eos")
    response_format = _response_format(b.get("response_format"))
    if response_format is not None:
        _response_format_pb(response_format, sampling)
    request = inference_pb2.GenerateRequest(prompt=prompt, sampling=sampling)
    return Parsed(kind, model, request, stream, include_usage, response_format)


def _response_format(value: object) -> ResponseFormat | None:
    if value is None:
        return None
    fmt = _object(value, "response_format")
    kind = _text(fmt, "type", "response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = _object(fmt.get("json_schema"), "response_format.json_schema")
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be an object", "response_format")
        return ResponseFormat(
            "json_schema",
            schema if schema is not None else {},
            _text(spec, "name", "response_format.json_schema.name") or "",
            _flag(spec, "strict", "response_format.json_schema.strict"),
        )
    raise BadRequest(
        f"response_format.type must be text, json_object or json_schema, got {kind!r}", "response_format"
    )


def _response_format_pb(fmt: ResponseFormat, sampling: common_pb2.SamplingParams) -> None:
    """Puts `fmt` on the sampling parameters; the worker's sampler enforces it per row (and refuses,
    as INVALID_ARGUMENT, a schema it cannot enforce). The schema is always enforced strictly."""
    if fmt.kind == "json_object":
        kind = common_pb2.RESPONSE_FORMAT_KIND_JSON_OBJECT
        sampling.response_format.CopyFrom(common_pb2.ResponseFormat(kind=kind))
        return
    if not fmt.schema:
        raise BadRequest(
            "response_format.json_schema.schema is required for type json_schema "
            "(use type json_object for any JSON object)",
            "response_format",
        )
    sampling.response_format.CopyFrom(
        common_pb2.ResponseFormat(
            kind=common_pb2.RESPONSE_FORMAT_KIND_JSON_SCHEMA, json_schema=json.dumps(fmt.schema)
        )
    )


def _messages(value: object) -> list[common_pb2.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, item in enumerate(value):
        param = f"messages[{i}]"
        m = _object(item, param)
        role = _text(m, "role", f"{param}.role")
        if role not in _CHAT_ROLES:
            raise BadRequest(
                f"{param}.role {role!r} is not supported: use system, developer, user or assistant "
                "(loraplex does not run tools)",
                f"{param}.role",
            )
        out.append(common_pb2.ChatMessage(role=_CHAT_ROLES[role], content=_content(m.get("content"), param)))
    return out


def _content(value: object, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            p = _object(part, f"{param}.content[{j}]")
            if p.get("type") != "text":
                raise BadRequest(
                    f"{param}.content[{j}] has type {p.get('type')!r}; only text parts are supported",
                    f"{param}.content",
                )
            parts.append(_text(p, "text", f"{param}.content[{j}].text") or "")
        return "\n".join(parts)
    raise BadRequest(f"{param}.content must be a string or an array of text parts", f"{param}.content")


def _prompt(value: object) -> common_pb2.Prompt:
    """A completion's prompt: a string or token ids, one prompt per request."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # ["text"] or [[ids]]: one prompt in a batch of one
    if isinstance(value, str):
        return common_pb2.Prompt(text=value)
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        if not all(0 <= t < _UINT32 for t in value):
            raise BadRequest("prompt token ids must be non-negative integers below 2^32", "prompt")
        return common_pb2.Prompt(token_ids=common_pb2.TokenIdsPrompt(ids=value))
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str | list) for p in value):
        raise BadRequest("send one prompt per request (a batch of prompts is not supported)", "prompt")
    raise BadRequest("prompt must be a string or an array of token ids", "prompt")


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise BadRequest("stop must be a string or an array of strings", "stop")


def _object(value: object, param: str | None = None) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{param or 'the request body'} must be a JSON object", param)
    return value


def _text(b: Mapping[str, Any], key: str, param: str | None = None) -> str | None:
    value = b.get(key)
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"{param or key} must be a string", param or key)


def _flag(b: Mapping[str, Any], key: str, param: str | None = None) -> bool:
    value = b.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise BadRequest(f"{param or key} must be a boolean", param or key)


def _int(b: Mapping[str, Any], key: str, *, minimum: int | None = None) -> int | None:
    value = b.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer", key)
    if minimum is not None and value < minimum:
        raise BadRequest(f"{key} must be at least {minimum}, got {value}", key)
    return value


def _number(b: Mapping[str, Any], key: str) -> float | None:
    value = b.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number", key)
    number = float(value)
    if not math.isfinite(number):
        raise BadRequest(f"{key} must be a finite number", key)
    return number


# -- responses --------------------------------------------------------------------------------


def finish_reason(reason: common_pb2.FinishReason.ValueType) -> str:
    """OpenAI's finish_reason: an end-of-sequence token or a stop string is "stop"."""
    return "length" if reason == _FR.FINISH_REASON_LENGTH else "stop"


def usage_json(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


@dataclass(frozen=True)
class Answer:
    """Who answers: the fields every body and chunk of one response repeats."""

    kind: Kind
    request_id: str
    created: int
    model: str

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{self.request_id}"

    def body(self, text: str, finished: common_pb2.GenerationFinished) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            obj = "chat.completion"
        else:
            choice["text"] = text
            obj = "text_completion"
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason(finished.finish_reason)
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": usage_json(finished.usage),
        }

    def chunk(
        self, text: str | None, *, first: bool = False, finish: str | None = None, include_usage: bool
    ) -> dict[str, Any]:
        """One stream chunk with one choice; `include_usage` adds `"usage": null` as OpenAI does."""
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        out = self._chunk_head([choice])
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: common_pb2.Usage) -> dict[str, Any]:
        """The last chunk with stream_options.include_usage: no choices, the request's usage."""
        out = self._chunk_head([])
        out["usage"] = usage_json(usage)
        return out

    def _chunk_head(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }


def model_json(model_id: str, owned_by: str, created: int, parent: str | None) -> dict[str, Any]:
    """One entry of GET /v1/models: a base model (parent None) or an adapter on `parent`."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "parent": parent}


# -- errors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None


# The one table from the gRPC status codes of the shared path (by name) to what the official
# openai client maps onto its exception classes (BadRequestError, AuthenticationError, ...).
ERRORS: dict[str, ErrorKind] = {
    "INVALID_ARGUMENT": ErrorKind(400, "invalid_request_error", None),
    # An adapter that is archived or failed, or for another base model: the request must change.
    "FAILED_PRECONDITION": ErrorKind(400, "invalid_request_error", None),
    "OUT_OF_RANGE": ErrorKind(400, "invalid_request_error", None),
    "UNAUTHENTICATED": ErrorKind(401, "authentication_error", "invalid_api_key"),
    "PERMISSION_DENIED": ErrorKind(403, "permission_error", "permission_denied"),
    # Unknown model, and another tenant's adapter (which is indistinguishable from unknown).
    "NOT_FOUND": ErrorKind(404, "not_found_error", "model_not_found"),
    # A replayed request id (Idempotency-Key): it ran once and never runs again.
    "ALREADY_EXISTS": ErrorKind(409, "conflict_error", "request_id_reused"),
    "RESOURCE_EXHAUSTED": ErrorKind(429, "rate_limit_error", "rate_limit_exceeded"),
    "UNIMPLEMENTED": ErrorKind(501, "server_error", "not_implemented"),
    "UNAVAILABLE": ErrorKind(503, "server_error", "service_unavailable"),
    "DEADLINE_EXCEEDED": ErrorKind(504, "server_error", "timeout"),
}
INTERNAL = ErrorKind(500, "server_error", None)

# Router messages name the GenerateRequest field they are about; OpenAI's `param` names the body's.
_PARAM_OF_MESSAGE = (
    ("prompt.chat", "messages"),
    ("chat role", "messages"),
    ("prompt", "prompt"),
    ("max_tokens", "max_tokens"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("repetition_penalty", "repetition_penalty"),
    ("a stop string", "stop"),
    ("at most", "stop"),
    ("stop", "stop"),
    ("request_id", "Idempotency-Key"),
    ("model", "model"),
    ("adapter", "model"),
)


def error_kind(code_name: str) -> ErrorKind:
    return ERRORS.get(code_name, INTERNAL)


def param_of(code_name: str, message: str, kind: Kind) -> str | None:
    """OpenAI's `param` for an error of the shared path: the body field its message is about."""
    if code_name == "NOT_FOUND":
        return "model"
    if code_name not in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
        return None
    for prefix, param in _PARAM_OF_MESSAGE:
        if message.startswith(prefix):
            return "messages" if param == "prompt" and kind == "chat" else param
    return None


def error_json(message: str, kind: ErrorKind, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}
