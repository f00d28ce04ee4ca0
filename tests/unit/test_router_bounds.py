"""services.router.validation: the size bounds checked before any work, and max_tokens/context."""

from __future__ import annotations

import time
from typing import Any

import pytest

from loraplex.v1 import common_pb2, inference_pb2
from services.router.validation import (
    MAX_CHAT_MESSAGES,
    MAX_STOP_BYTES,
    MAX_STOP_STRINGS,
    InvalidRequest,
    check_bounds,
    check_request,
    utf8_len,
)

MIB = 1 << 20


def _req(prompt: common_pb2.Prompt, **sampling: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))


def _chat(*contents: str) -> common_pb2.Prompt:
    return common_pb2.Prompt(
        chat=common_pb2.ChatPrompt(
            messages=[common_pb2.ChatMessage(role="user", content=c) for c in contents]
        )
    )


def test_a_text_prompt_over_the_byte_limit_is_refused_quickly() -> None:
    req = _req(common_pb2.Prompt(text="x" * (6 * MIB)))
    started = time.perf_counter()
    with pytest.raises(InvalidRequest, match=f"at most {MIB} bytes"):
        check_bounds(req, MIB)
    assert time.perf_counter() - started < 0.05
    check_bounds(_req(common_pb2.Prompt(text="x" * MIB)), MIB)


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    text = "é" * (MIB // 2 + 1)  # fewer characters than the limit, more bytes
    assert utf8_len(text) == MIB + 2
    with pytest.raises(InvalidRequest, match=f"{MIB + 2} bytes"):
        check_bounds(_req(common_pb2.Prompt(text=text)), MIB)


def test_chat_messages_are_bounded_in_count_and_in_bytes_together() -> None:
    with pytest.raises(
        InvalidRequest, match=f"{MAX_CHAT_MESSAGES + 1} messages; at most {MAX_CHAT_MESSAGES}"
    ):
        check_bounds(_req(_chat(*["hi"] * (MAX_CHAT_MESSAGES + 1))), MIB)
    check_bounds(_req(_chat(*["hi"] * MAX_CHAT_MESSAGES)), MIB)
    # Each message is under the limit; together they are over it.
    with pytest.raises(InvalidRequest, match=f"more than {MIB} bytes"):
        check_bounds(_req(_chat("a" * (MIB // 2), "b" * (MIB // 2))), MIB)


def test_stop_strings_are_bounded_in_count_and_bytes() -> None:
    text = common_pb2.Prompt(text="hello")
    with pytest.raises(InvalidRequest, match=f"at most {MAX_STOP_STRINGS} stop strings, got 9"):
        check_bounds(_req(text, stop=["s"] * 9), MIB)
    check_bounds(_req(text, stop=["s"] * MAX_STOP_STRINGS), MIB)
    with pytest.raises(InvalidRequest, match=f"at most {MAX_STOP_BYTES} bytes, got 257"):
        check_bounds(_req(text, stop=["s" * (MAX_STOP_BYTES + 1)]), MIB)
    with pytest.raises(InvalidRequest, match=f"at most {MAX_STOP_BYTES} bytes"):
        check_bounds(_req(text, stop=["é" * 129]), MIB)  # 129 characters, 258 bytes
    check_bounds(_req(text, stop=["s" * MAX_STOP_BYTES]), MIB)


def test_token_ids_longer_than_the_context_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="2049 tokens; the model's context length is 2048"):
        check_request(_req(common_pb2.Prompt(token_ids=common_pb2.TokenIdsPrompt(ids=[1] * 2049))), 2048)
    check_request(_req(common_pb2.Prompt(token_ids=common_pb2.TokenIdsPrompt(ids=[1] * 2048))), 2048)


def test_max_tokens_over_the_context_is_refused_with_the_limit() -> None:
    with pytest.raises(InvalidRequest, match="max_tokens=4097 exceeds the model's context length 4096"):
        check_request(_req(common_pb2.Prompt(text="hi"), max_tokens=4097), 4096)
    check_request(_req(common_pb2.Prompt(text="hi"), max_tokens=4096), 4096)
