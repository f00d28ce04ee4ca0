"""Incremental detokenization and stop strings.

Text is released only once it is final: never half of a multi-byte character (a trailing U+FFFD
means more bytes are coming), and never a tail that might still turn into a stop string.
"""

from __future__ import annotations

from typing import Any

# Decoding a few tokens before the new ones lets the tokenizer place spaces as in the full text.
_CONTEXT_TOKENS = 6


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all final output text so far
        self.emitted = 0  # characters of self.text already returned

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text to emit now, whether a stop string was hit)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.text = self.text[:at]
                out = self.text[self.emitted :]
                self.emitted = len(self.text)
                return out, True
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out, False

    def flush(self) -> str:
        """At the end of a request: release what was held back for a stop string that never came."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
