"""JSON constrained decoding: per-row grammar matchers (llguidance) and the logit mask they make.

A response format is compiled once per distinct schema text (bounded LRU) into a template matcher,
on a tokenizer thread, never the event loop or the step thread; each request gets a copy of the
template (`deep_copy` is cheap: the grammar and its lexer are shared). Only constrained rows do
any mask work: a step with none of them calls nothing here.

Off the critical path: a row's next mask depends only on the tokens it has already sampled, so
`MaskJob.start` hands the rows' matchers to llguidance's own thread pool (it releases the GIL)
before the forward pass, and `MaskJob.apply` waits for it after the logits exist and masks the
constrained rows with one vectorised masked_fill.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import llguidance
import llguidance.hf
import torch

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

__all__ = [
    "MAX_SCHEMA_BYTES",
    "GrammarCompiler",
    "GrammarError",
    "MaskJob",
    "ResponseFormat",
    "RowGrammar",
]

MAX_SCHEMA_BYTES = 64 << 10
# Distinct schemas kept compiled; a template is a few hundred KiB at most for real-world schemas.
CACHE_SIZE = 64
# Compact JSON as OpenAI writes it. With flexible whitespace a small model can emit newlines
# until max_tokens; fixed separators also let the grammar end right after the closing brace.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_OBJECT = '{"type": "object"}'

Kind = Literal["json_object", "json_schema"]


class GrammarError(ValueError):
    """The schema is invalid or uses a feature that cannot be enforced (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class ResponseFormat:
    kind: Kind
    json_schema: str = ""  # the schema's JSON text, for kind "json_schema"

    def schema_text(self) -> str:
        return ANY_OBJECT if self.kind == "json_object" else self.json_schema


class RowGrammar:
    """One request's matcher: which tokens may come next, advanced with each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> bool:
        """False if the grammar refused the token (a masked row cannot sample one): the matcher is
        then in its error state and `done`, so only this row ends, never the whole step."""
        if self.matcher.consume_token(token):
            return True
        log.error("grammar refused token %d: %s; ending the row", token, self.matcher.get_error())
        return False

    @property
    def done(self) -> bool:
        """The grammar is complete and accepts nothing more: the row finishes (reason "stop")."""
        return bool(self.matcher.is_stopped() or self.matcher.is_error())


class GrammarCompiler:
    """Thread-safe: compiles on whichever thread calls it (the worker's tokenizer threads)."""

    def __init__(self, vocab_size: int, cache_size: int = CACHE_SIZE) -> None:
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.compiled = 0  # cache misses, for tests

    def _llg_tokenizer(self, hf_tokenizer: Any) -> llguidance.LLTokenizer:
        # About a second for a 49k vocabulary: built once, on first use, from a borrowed tokenizer.
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=self.vocab_size)
            return self._tokenizer

    def compile(self, fmt: ResponseFormat, hf_tokenizer: Any) -> RowGrammar:
        """A fresh matcher for one request; raises GrammarError with a sentence."""
        text = fmt.schema_text()
        with self._lock:
            template = self._cache.get(text)
            if template is not None:
                self._cache.move_to_end(text)
                return RowGrammar(template.deep_copy())
        template = self._build(text, self._llg_tokenizer(hf_tokenizer))
        with self._lock:
            self._cache[text] = template
            self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self.compiled += 1
        return RowGrammar(template.deep_copy())

    @staticmethod
    def _build(text: str, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
        check_schema_text(text)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"response_format.json_schema is not a usable JSON Schema: {exc}") from exc
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise GrammarError(f"response_format.json_schema cannot be enforced: {'; '.join(messages)}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"response_format.json_schema cannot be enforced: {matcher.get_error()}")
        return matcher


def check_schema_text(text: str) -> None:
    """Cheap checks before the library sees the schema: size, JSON, an object (or boolean) at the top."""
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"response_format.json_schema is larger than {MAX_SCHEMA_BYTES} bytes; shorten it")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"response_format.json_schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise GrammarError("response_format.json_schema must be a JSON object (a JSON Schema)")


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [N, ceil(V/32)] (bit i of word w = token 32w+i allowed) -> bool [N, vocab]."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()


_EXECUTOR: llguidance.LLExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()
# One thread waits on llguidance's pool so the step thread can run the forward pass meanwhile.
_WAITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor(num_threads=2)
        return _EXECUTOR


class MaskJob:
    """The next-token masks of a step's constrained rows, computed while the forward pass runs."""

    def __init__(self, rows: list[int], grammars: list[RowGrammar], vocab_size: int) -> None:
        self.rows = rows  # indices into the step's sampling rows
        self.vocab_size = vocab_size
        self.bitmask = torch.full((len(rows), (vocab_size + 31) // 32), -1, dtype=torch.int32)
        pairs = [(g.matcher, i) for i, g in enumerate(grammars)]
        self._future: Future[None] = _WAITER.submit(self._fill, pairs)

    @classmethod
    def start(cls, grammars: list[RowGrammar | None], vocab_size: int) -> MaskJob | None:
        """None (and no work at all) when no row is constrained."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        return cls(rows, [g for g in grammars if g is not None], vocab_size)

    def _fill(self, pairs: list[tuple[llguidance.LLMatcher, int]]) -> None:
        b = self.bitmask
        _executor().unsafe_compute_mask_ptr(pairs, b.data_ptr(), b.shape[1] * 4, b.shape[0])

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed logits of the constrained rows to -inf, in place (logits [N, V])."""
        self._future.result()
        idx = torch.tensor(self.rows, device=logits.device)
        allowed = unpack_bitmask(self.bitmask.to(logits.device, non_blocking=True), logits.shape[1])
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
