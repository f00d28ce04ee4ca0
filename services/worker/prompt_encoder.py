"""Prompts become token ids on a few threads of their own, never on the event loop.

Tokenizing a 1 MiB prompt takes about a second; on the event loop that second would stall every
other stream of the worker (their tokens are delivered by the loop). Hugging Face fast tokenizers
release the GIL while they encode, so on a worker thread the loop keeps delivering tokens.
A fast tokenizer must not be used by two threads at once, so each thread borrows one of its own
copies: the pool has exactly as many threads as copies, so a borrow never waits.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

R = TypeVar("R")
# Enough that one huge prompt does not hold up the next request's tokenization; few, because
# every thread holds a tokenizer copy and the worker's cores belong to the engine.
TOKENIZER_THREADS = 2


class PromptEncoder:
    def __init__(self, tokenizers: Sequence[Any]) -> None:
        if not tokenizers:
            raise ValueError("PromptEncoder needs at least one tokenizer")
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for tokenizer in tokenizers:
            self._free.put(tokenizer)
        self._pool = ThreadPoolExecutor(max_workers=len(tokenizers), thread_name_prefix="tokenize")

    async def run(self, encode: Callable[[Any], R]) -> R:
        """`encode(tokenizer)` on a tokenizer thread; the caller's loop keeps running meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._borrow, encode)

    def _borrow(self, encode: Callable[[Any], R]) -> R:
        tokenizer = self._free.get()
        try:
            return encode(tokenizer)
        finally:
            self._free.put(tokenizer)

    async def close(self) -> None:
        """Drop queued work; a tokenization already running finishes on its own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
