"""Prompts -> token ids with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from services.worker.prompt_encoder import PromptEncoder
from services.worker.prompts import (
    MAX_CHAT_MESSAGES,
    PromptError,
    chat_ids,
    check_chat_size,
    check_length,
    check_text_bytes,
    text_ids,
    token_ids,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_text_is_tokenized_without_a_chat_template(tokenizer: Any) -> None:
    ids = text_ids(tokenizer, "The capital of France")
    assert tokenizer.decode(ids) == "The capital of France"


def test_chat_uses_the_template_and_ends_with_the_assistant_turn(tokenizer: Any) -> None:
    ids = chat_ids(tokenizer, [("system", "Be brief."), ("user", "Hi")])
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # Special tokens are single ids, not spelled out character by character.
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


@pytest.mark.parametrize(
    ("messages", "phrase"),
    [([], "no messages"), ([("robot", "hi")], "role 'robot'")],
)
def test_bad_chat_is_refused(tokenizer: Any, messages: list[tuple[str, str]], phrase: str) -> None:
    with pytest.raises(PromptError, match=phrase):
        chat_ids(tokenizer, messages)


def test_empty_prompts_are_refused(tokenizer: Any) -> None:
    with pytest.raises(PromptError, match="empty"):
        text_ids(tokenizer, "")
    with pytest.raises(PromptError, match="empty"):
        token_ids([], 100)


def test_token_ids_must_be_in_the_vocabulary() -> None:
    assert token_ids([0, 5, 99], 100) == [0, 5, 99]
    with pytest.raises(PromptError, match=r"token id 100 is outside this model's vocabulary \[0, 100\)"):
        token_ids([1, 100], 100)


def test_prompt_must_leave_room_for_one_token() -> None:
    check_length([1] * 511, 512)
    with pytest.raises(PromptError, match="at most 511 tokens"):
        check_length([1] * 512, 512)


def test_text_over_the_byte_limit_is_refused_with_the_limit_in_the_sentence() -> None:
    check_text_bytes(1 << 20, 1 << 20)
    with pytest.raises(PromptError, match="1048577 bytes, over this worker's limit of 1048576 bytes"):
        check_text_bytes((1 << 20) + 1, 1 << 20)


def test_chat_with_too_many_messages_is_refused() -> None:
    check_chat_size(MAX_CHAT_MESSAGES)
    with pytest.raises(PromptError, match=f"over the limit of {MAX_CHAT_MESSAGES}"):
        check_chat_size(MAX_CHAT_MESSAGES + 1)


async def test_encoder_runs_on_its_own_threads_and_never_shares_a_tokenizer(smollm2_dir: Path) -> None:
    copies = [AutoTokenizer.from_pretrained(str(smollm2_dir)) for _ in range(2)]
    encoder = PromptEncoder(copies)
    in_use: set[int] = set()
    lock = threading.Lock()
    loop_thread = threading.get_ident()
    threads: set[int] = set()

    def encode(tokenizer: Any) -> list[int]:
        with lock:
            assert id(tokenizer) not in in_use, "two threads borrowed one tokenizer"
            in_use.add(id(tokenizer))
            threads.add(threading.get_ident())
        try:
            return text_ids(tokenizer, "The capital of France " * 2000)
        finally:
            with lock:
                in_use.discard(id(tokenizer))

    try:
        results = await asyncio.gather(*(encoder.run(encode) for _ in range(8)))
    finally:
        await encoder.close()
    assert all(r == results[0] for r in results) and len(results[0]) > 2000
    assert loop_thread not in threads and 1 <= len(threads) <= 2
