"""Turn a prompt (text, token ids or chat messages) into the base model's token ids.

Plain Python over a Hugging Face tokenizer; the servicer picks the form from the proto's oneof.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CHAT_ROLES = ("system", "user", "assistant")
# The router refuses longer chats before routing; the worker checks again because it can be
# called directly, and counting messages is O(1) where summing their bytes is not.
MAX_CHAT_MESSAGES = 256


class PromptError(ValueError):
    """The prompt cannot be turned into tokens for this model; the message says how to fix it."""


def check_text_bytes(size: int, limit: int) -> None:
    """Prompt text (or the chat messages' contents) over the byte limit is refused before any
    tokenizing: a tokenizer's time grows with the text, and the worker's cores are shared."""
    if size > limit:
        raise PromptError(
            f"the prompt text is {size} bytes, over this worker's limit of {limit} bytes "
            f"(LORAPLEX_MAX_PROMPT_BYTES); send a shorter prompt"
        )


def check_chat_size(num_messages: int) -> None:
    if num_messages > MAX_CHAT_MESSAGES:
        raise PromptError(
            f"the chat prompt has {num_messages} messages, over the limit of {MAX_CHAT_MESSAGES}; "
            f"send at most {MAX_CHAT_MESSAGES}"
        )


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Raw text, tokenized as the model's tokenizer does by default (no chat template)."""
    if not text:
        raise PromptError("the prompt is empty; send text, token ids or chat messages")
    ids: list[int] = tokenizer(text).input_ids
    return ids


def chat_ids(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> list[int]:
    """Chat turns rendered with the model's chat template, ending with the assistant prompt."""
    if not messages:
        raise PromptError("the chat prompt has no messages; send at least one user message")
    for i, (role, _) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise PromptError(f"chat message {i} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this base model has no chat template; send the prompt as text or token ids")
    rendered = tokenizer.apply_chat_template(
        [{"role": role, "content": content} for role, content in messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    # The template already spells out the special tokens, so the tokenizer must not add a BOS.
    ids: list[int] = tokenizer(rendered, add_special_tokens=False).input_ids
    return ids


def token_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    if not ids:
        raise PromptError("the prompt is empty; send text, token ids or chat messages")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise PromptError(f"token id {bad} is outside this model's vocabulary [0, {vocab_size})")
    return list(ids)


def check_length(ids: Sequence[int], context_length: int) -> None:
    """The prompt must leave room for at least one generated token."""
    if len(ids) >= context_length:
        raise PromptError(
            f"the prompt has {len(ids)} tokens but this model's context is {context_length}; "
            f"shorten it to at most {context_length - 1} tokens"
        )
