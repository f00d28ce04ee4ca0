"""Checks on a GenerateRequest that need no registry or worker. Pure; raises InvalidRequest."""

from __future__ import annotations

import math
import uuid

from loraplex.v1 import inference_pb2

MAX_REQUEST_ID = 128
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
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


def check_request(req: inference_pb2.GenerateRequest, context_length: int) -> None:
    """Prompt present, sampling parameters in range, max_tokens within the model's context."""
    kind = req.prompt.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("prompt is required: set prompt.text, prompt.token_ids or prompt.chat")
    if kind == "text" and not req.prompt.text:
        raise InvalidRequest("prompt.text is empty")
    if kind == "token_ids" and not req.prompt.token_ids.ids:
        raise InvalidRequest("prompt.token_ids is empty")
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
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop strings must be 1..{MAX_STOP_CHARS} characters")
