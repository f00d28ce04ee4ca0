"""The grammar wrapper on SmolLM2's real tokenizer: compile errors, the mask, completion, the cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from services.worker.engine.constrained import (
    MAX_SCHEMA_BYTES,
    GrammarCompiler,
    GrammarError,
    MaskJob,
    ResponseFormat,
    RowGrammar,
    unpack_bitmask,
)

VOCAB = 49152
PERSON = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(VOCAB, cache_size=2)


def schema(text: str) -> ResponseFormat:
    return ResponseFormat("json_schema", text)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": 5}', "type must be a string"),
        ('{"type": "array", "uniqueItems": true}', "uniqueItems"),
        ('{"type": "string", "format": "weird"}', "weird"),
        ('{"$ref": "http://example.com/s.json"}', "example.com"),
        ('{"type": "string", "pattern": "(?=x)"}', "look-around"),
    ],
)
def test_invalid_or_unenforceable_schema_is_refused_with_a_sentence(
    compiler: GrammarCompiler, tokenizer: Any, text: str, words: str
) -> None:
    with pytest.raises(GrammarError, match=r"response_format\.json_schema") as info:
        compiler.compile(schema(text), tokenizer)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)  # the servicer maps ValueError to INVALID_ARGUMENT


def test_oversized_schema_is_refused_before_parsing(compiler: GrammarCompiler, tokenizer: Any) -> None:
    big = json.dumps({"type": "object", "description": "x" * MAX_SCHEMA_BYTES})
    with pytest.raises(GrammarError, match="larger than"):
        compiler.compile(schema(big), tokenizer)


def allowed_tokens(grammar: RowGrammar) -> torch.Tensor:
    logits = torch.zeros(1, VOCAB)
    job = MaskJob.start([grammar], VOCAB)
    assert job is not None
    job.apply(logits)
    return torch.isfinite(logits[0]).nonzero().flatten()


def test_mask_allows_only_tokens_the_grammar_accepts_and_completion_stops_the_row(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    grammar = compiler.compile(schema(PERSON), tokenizer)
    first = allowed_tokens(grammar)
    # Compact JSON: the object must open with '{"' (the key); a bare letter or space may not start it.
    assert all(tokenizer.decode([t]).startswith("{") for t in first.tolist())
    assert tokenizer.encode("hello")[0] not in first.tolist()
    target = '{"name": "Ann", "age": 7}'
    ids = tokenizer.encode(target)
    for t in ids:
        assert not grammar.done
        assert t in allowed_tokens(grammar).tolist()
        grammar.advance(t)
    assert grammar.done


def test_a_refused_token_ends_only_that_row(compiler: GrammarCompiler, tokenizer: Any) -> None:
    grammar = compiler.compile(schema(PERSON), tokenizer)
    assert not grammar.advance(tokenizer.encode("hello")[0])
    assert grammar.done


def test_json_object_needs_an_object(compiler: GrammarCompiler, tokenizer: Any) -> None:
    grammar = compiler.compile(ResponseFormat("json_object"), tokenizer)
    assert tokenizer.encode("[")[0] not in allowed_tokens(grammar).tolist()
    for t in tokenizer.encode('{"a": [1, true]}'):
        grammar.advance(t)
    assert grammar.done


def test_mask_touches_only_constrained_rows(compiler: GrammarCompiler, tokenizer: Any) -> None:
    assert MaskJob.start([None, None], VOCAB) is None  # free rows: no work at all
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    job = MaskJob.start([None, compiler.compile(schema(PERSON), tokenizer), None], VOCAB)
    assert job is not None
    job.apply(logits)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert 0 < int(torch.isfinite(logits[1]).sum()) < VOCAB


def test_compiled_schemas_are_cached_by_text_with_a_bound(tokenizer: Any) -> None:
    compiler = GrammarCompiler(VOCAB, cache_size=2)
    a, b, c = (json.dumps({"type": "array", "items": {"type": "integer"}, "maxItems": n}) for n in (1, 2, 3))
    first = compiler.compile(schema(a), tokenizer)
    again = compiler.compile(schema(a), tokenizer)
    assert compiler.compiled == 1 and first.matcher is not again.matcher  # one compile, own matchers
    compiler.compile(schema(b), tokenizer)
    compiler.compile(schema(c), tokenizer)  # evicts a, the least recently used
    compiler.compile(schema(a), tokenizer)
    assert compiler.compiled == 4


def test_unpack_bitmask_reads_bit_i_of_word_w_as_token_32w_plus_i() -> None:
    words = torch.zeros(1, 2, dtype=torch.int32)
    words[0, 0] = 1 << 3
    words[0, 1] = -(2**31)  # bit 31 of word 1: token 63
    allowed = unpack_bitmask(words, 40)
    assert allowed.shape == (1, 40)
    assert allowed[0].nonzero().flatten().tolist() == [3]
    assert unpack_bitmask(words, 64)[0].nonzero().flatten().tolist() == [3, 63]
