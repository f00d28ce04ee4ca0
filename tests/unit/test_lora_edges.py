"""layers/lora_edges.py: each row gets its own adapter's embedding and lm_head delta, nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from services.worker.layers.lora_edges import (
    EdgeLora,
    add_embedding_lora,
    add_lm_head_lora,
    build_edge_batch,
    edge_lora,
)

VOCAB, HIDDEN = 50, 12


@dataclass
class Adapter:
    embed: EdgeLora | None = None
    lm_head: EdgeLora | None = None


def _peft_pair(rank: int, inputs: int, outputs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inputs, generator=g), torch.randn(outputs, rank, generator=g)


def test_rows_get_their_own_adapters_edge_deltas_and_other_rows_none() -> None:
    table = torch.randn(VOCAB, HIDDEN)  # the embeddings, also lm_head's weight (tied)
    ea, eb = _peft_pair(4, VOCAB, HIDDEN, 1)  # lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]
    ha, hb = _peft_pair(8, HIDDEN, VOCAB, 2)  # lm_head lora_A [r, hidden], lora_B [vocab, r]
    magnitude = torch.rand(VOCAB) + 0.5
    both = Adapter(
        embed=edge_lora(ea, eb, 2.0, None, table.T, dtype=torch.float32, device="cpu"),
        lm_head=edge_lora(ha, hb, 0.5, None, table, dtype=torch.float32, device="cpu"),
    )
    head_dora = Adapter(lm_head=edge_lora(ha, hb, 0.25, magnitude, table, dtype=torch.float32, device="cpu"))
    ordinary = Adapter()
    # Sequences: [both: 3 tokens], [base: 2], [head_dora: 2], [ordinary: 1], [both: 1]; all sample.
    seqs: list[Adapter | None] = [both, None, head_dora, ordinary, both]
    offsets = [0, 3, 5, 7, 8, 9]
    ids = torch.tensor([3, 7, 7, 1, 2, 9, 4, 5, 3])
    edges = build_edge_batch(seqs, offsets, [0, 1, 2, 3, 4], "cpu")
    assert edges is not None

    x = table[ids].clone()
    add_embedding_lora(x, ids, edges)
    want = table[ids].clone()
    for row in (0, 1, 2, 8):
        want[row] += 2.0 * (eb @ ea[:, ids[row]])
    torch.testing.assert_close(x, want)

    hidden = torch.randn(5, HIDDEN)
    logits = hidden @ table.T
    add_lm_head_lora(logits, hidden, edges)
    want_logits = hidden @ table.T
    for row in (0, 4):
        want_logits[row] += 0.5 * (hb @ (ha @ hidden[row]))
    norm = torch.linalg.norm(table + 0.25 * hb @ ha, dim=1)  # PEFT's DoRA: ||W + s B A|| per output row
    want_logits[2] = magnitude / norm * (hidden[2] @ table.T + 0.25 * (hb @ (ha @ hidden[2])))
    torch.testing.assert_close(logits, want_logits)


def test_a_batch_without_edge_adapters_builds_nothing() -> None:
    assert build_edge_batch([None, Adapter(), None], [0, 1, 2, 3], [0, 2], "cpu") is None


def test_shapes_that_do_not_fit_the_layer_are_refused() -> None:
    a, b = _peft_pair(4, VOCAB + 1, HIDDEN, 3)
    with pytest.raises(ValueError, match=f"do not fit a layer of {VOCAB} inputs and {HIDDEN} outputs"):
        edge_lora(a, b, 1.0, None, torch.zeros(HIDDEN, VOCAB), dtype=torch.float32, device="cpu")
