"""Prompts -> token ids with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from services.worker.prompts import PromptError, chat_ids, check_length, text_ids, token_ids


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
