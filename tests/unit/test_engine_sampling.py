"""Sampling parameters, the sampler and incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine.detokenizer import Detokenizer
from services.worker.engine.sampling import SamplingParams
from services.worker.engine.sequence import Sequence
from services.worker.layers.sampler import sample


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(stop=("",)), "stop"),
        (SamplingParams(seed=-1), "seed"),
    ],
)
def test_out_of_range_sampling_values_are_rejected_with_the_field_named(
    params: SamplingParams, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        params.validate()


def _seq(params: SamplingParams, tokens: tuple[int, ...] = (0,)) -> Sequence:
    return Sequence("r", list(tokens), params, None)


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert sample(logits, [_seq(SamplingParams()), _seq(SamplingParams())]) == [1, 0]


def test_a_seeded_request_draws_the_same_tokens_regardless_of_its_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(logits[:1].clone(), [_seq(params)])[0] for _ in range(1)]
    batched = sample(
        logits.clone(), [_seq(params), _seq(SamplingParams(temperature=1.0)), _seq(SamplingParams())]
    )
    assert batched[0] == alone[0]
    first = _seq(params)
    second = _seq(params)
    draws_a = [sample(logits[:1].clone(), [first])[0] for _ in range(20)]
    draws_b = [sample(logits[:1].clone(), [second])[0] for _ in range(20)]
    assert draws_a == draws_b
    assert len(set(draws_a)) > 1  # it really samples


def test_top_k_one_and_tiny_top_p_reduce_to_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 100)
    seqs = [_seq(SamplingParams(temperature=2.0, top_k=1)), _seq(SamplingParams(temperature=2.0, top_p=1e-6))]
    assert sample(logits.clone(), seqs) == logits.argmax(dim=-1).tolist()


def test_top_k_never_draws_outside_the_k_best() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 100)
    best = set(logits[0].topk(5).indices.tolist())
    seq = _seq(SamplingParams(temperature=5.0, top_k=5, seed=3))
    assert {sample(logits.clone(), [seq])[0] for _ in range(50)} <= best


def test_repetition_penalty_pushes_seen_tokens_down() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    assert sample(logits.clone(), [_seq(SamplingParams(repetition_penalty=1.5), tokens=(0,))]) == [1]
    assert sample(logits.clone(), [_seq(SamplingParams(), tokens=(0,))]) == [0]


class ByteTokenizer:
    """Each token id is one UTF-8 byte, so characters arrive split across tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    detok = Detokenizer(ByteTokenizer(), list(b"> "), stop)
    pieces = []
    for byte in text.encode():
        piece, stopped = detok.add(byte)
        pieces.append(piece)
        if stopped:
            return pieces, True
    pieces.append(detok.flush())
    return pieces, False


def test_detokenizer_never_emits_half_a_multibyte_character() -> None:
    pieces, _ = _stream("héllo 世界 🙂")
    assert "".join(pieces) == "héllo 世界 🙂"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_ends_the_text_and_is_not_emitted() -> None:
    pieces, stopped = _stream("one two END three", stop=("END",))
    assert stopped
    assert "".join(pieces) == "one two "


def test_text_that_only_looks_like_a_stop_prefix_is_released_at_the_end() -> None:
    pieces, stopped = _stream("ends with EN", stop=("END",))
    assert not stopped
    assert "".join(pieces) == "ends with EN"
    assert pieces[-1] == "EN"
