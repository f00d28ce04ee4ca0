"""Checks on a GenerateRequest that need no registry or worker. Pure; raises InvalidRequest.

`check_bounds` runs first, before any lookup: it bounds what the request makes the router and the
workers do (prompt bytes, chat messages, stop strings) by looking only at lengths.
`check_request` runs once the base model is known (its context length).
"""

from __future__ import annotations

import math
import uuid

from loraplex.v1 import inference_pb2

MAX_REQUEST_ID = 128
MAX_STOP_STRINGS = 8
MAX_STOP_BYTES = 256
MAX_CHAT_MESSAGES = 256
DEFAULT_MAX_PROMPT_BYTES = 1 << 20
CHAT_ROLES = frozenset({"system", "user", "assistant"})


class InvalidRequest(ValueError):
    pass


def request_id_for(given: str) -> str:
    """The client's id unchanged (it is the billing idempotency key), or a fresh UUID."""
    if not given:
        return str(uuid.uuid4())
    if len(given) > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id is at most {MAX_REQUEST_ID} characters, got {len(given)}")
    if not all(" " <= c <= "~" for c in given):
        raise InvalidRequest("request_id must be printable ASCII (0x20-0x7e)")
    return given


def utf8_len(text: str) -> int:
    """Bytes of `text` in UTF-8; no copy for ASCII (str.isascii is O(1) on CPython's compact strings)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_bounds(req: inference_pb2.GenerateRequest, max_prompt_bytes: int) -> None:
    """Sizes only, before any other work: prompt bytes, chat messages, stop strings."""
    kind = req.prompt.WhichOneof("kind")
    if kind == "text":
        text = req.prompt.text
        # A character is at least one byte: a text longer in characters is over without encoding it.
        size = len(text) if len(text) > max_prompt_bytes else utf8_len(text)
        if size > max_prompt_bytes:
            raise InvalidRequest(
                f"prompt.text is {size} bytes; this router accepts at most {max_prompt_bytes} bytes"
            )
    elif kind == "chat":
        messages = req.prompt.chat.messages
        if len(messages) > MAX_CHAT_MESSAGES:
            raise InvalidRequest(f"prompt.chat has {len(messages)} messages; at most {MAX_CHAT_MESSAGES}")
        size = 0
        for m in messages:
            size += utf8_len(m.content) + utf8_len(m.role)
            if size > max_prompt_bytes:
                raise InvalidRequest(
                    f"prompt.chat messages hold more than {max_prompt_bytes} bytes; "
                    f"this router accepts at most {max_prompt_bytes} bytes"
                )
    stop = req.sampling.stop
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if utf8_len(s) > MAX_STOP_BYTES:
            raise InvalidRequest(f"a stop string is at most {MAX_STOP_BYTES} bytes, got {utf8_len(s)}")


def check_request(req: inference_pb2.GenerateRequest, context_length: int) -> None:
    """Prompt present, sampling parameters in range, max_tokens within the model's context."""
    kind = req.prompt.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("prompt is required: set prompt.text, prompt.token_ids or prompt.chat")
    if kind == "text" and not req.prompt.text:
        raise InvalidRequest("prompt.text is empty")
    if kind == "token_ids":
        n = len(req.prompt.token_ids.ids)
        if not n:
            raise InvalidRequest("prompt.token_ids is empty")
        if context_length and n > context_length:
            raise InvalidRequest(
                f"prompt.token_ids has {n} tokens; the model's context length is {context_length}"
            )
    if kind == "chat":
        if not req.prompt.chat.messages:
            raise InvalidRequest("prompt.chat has no messages")
        for m in req.prompt.chat.messages:
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"chat role {m.role!r} is not one of system, user, assistant")
    s = req.sampling
    if context_length and s.max_tokens > context_length:
        raise InvalidRequest(f"max_tokens={s.max_tokens} exceeds the model's context length {context_length}")
    if s.HasField("temperature") and not (math.isfinite(s.temperature) and 0.0 <= s.temperature <= 2.0):
        raise InvalidRequest(f"temperature must be in [0, 2], got {s.temperature}")
    if s.HasField("top_p") and not (math.isfinite(s.top_p) and 0.0 < s.top_p <= 1.0):
        raise InvalidRequest(f"top_p must be in (0, 1], got {s.top_p}")
    if s.HasField("repetition_penalty") and not (
        math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0.0
    ):
        raise InvalidRequest(f"repetition_penalty must be > 0, got {s.repetition_penalty}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    for stop in s.stop:
        if not stop or utf8_len(stop) > MAX_STOP_BYTES:
            raise InvalidRequest(f"stop strings must be 1 to {MAX_STOP_BYTES} bytes")
