"""LoRA on the model's two edges, the token embeddings and lm_head, multiplexed per row.

PEFT's embedding LoRA (lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]) is a linear
LoRA whose input is the one-hot token: row t gains s * A^T[id_t] B^T. So both edges are held in
the same layout, A^T [in, r] and (s B)^T [r, out], with in = vocab, out = hidden for the
embeddings and in = hidden, out = vocab for lm_head; the embedding's A^T is read by gathering
rows by token id, never multiplied by a one-hot.

DoRA (PEFT: DoraEmbeddingLayer / DoraLinearLayer) rescales each output column of the layer by
m / ||W' + s B A||, with W' [out, in] the base weight in the same orientation (the embedding
table transposed), computed once at load:

    embedding: x[t] = f * (E[id_t] + s A^T[id_t] B^T)        f [hidden]
    lm_head:   z[t] = f * (h[t] W^T + s h[t] A^T B^T)        f [vocab]

Per step, each adapter with an edge LoRA adds its delta to its own rows: all tokens of its
sequences at the embeddings, its sampled rows at lm_head (only those are projected to logits).
The edges are one small gather-and-matmul per such adapter, the same work per row as any other
LoRA target; rows of other adapters and base rows are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

EMBED_TOKENS = "embed_tokens"
LM_HEAD = "lm_head"


@dataclass
class EdgeLora:
    """One adapter's LoRA at one edge, in the step layout."""

    a_t: torch.Tensor  # [in, r]: embeddings [vocab, r], lm_head [hidden, r]
    b_t: torch.Tensor  # [r, out], scale folded in
    dora_scale: torch.Tensor | None = None  # [out]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.a_t, self.b_t) if self.dora_scale is None else (self.a_t, self.b_t, self.dora_scale)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: str, *, pin: bool = False) -> EdgeLora:
        def move(t: torch.Tensor) -> torch.Tensor:
            if pin and device == "cpu" and t.device.type != "cpu":
                return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            moved = t.to(device, non_blocking=True)
            return moved.pin_memory() if pin and device == "cpu" and not moved.is_pinned() else moved

        scale = None if self.dora_scale is None else move(self.dora_scale)
        return EdgeLora(move(self.a_t), move(self.b_t), scale)


def edge_lora(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor | None,
    base: torch.Tensor,
    *,
    dtype: torch.dtype,
    device: str,
) -> EdgeLora:
    """PEFT's A [r, in], B [out, r] (and DoRA magnitude [out]) at an edge whose base weight, as
    [out, in], is `base`; raises ValueError when the shapes do not fit it."""
    out_features, in_features = base.shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, a.shape[0]):
        raise ValueError(
            f"A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a layer of {in_features} inputs and "
            f"{out_features} outputs"
        )
    a_t = a.to(device=device, dtype=dtype).T.contiguous()
    b_t = (b.to(device=device, dtype=torch.float32) * scale).T.to(dtype).contiguous()
    dora = None
    if magnitude is not None:
        if magnitude.shape != (out_features,):
            raise ValueError(f"DoRA magnitude {tuple(magnitude.shape)} does not fit {out_features} outputs")
        at = base.device
        delta = (b.to(at, torch.float32) * scale) @ a.to(at, torch.float32)  # [out, in]
        norm = torch.linalg.norm(base.float() + delta, dim=1)
        dora = (magnitude.to(at, torch.float32) / norm).to(device=device, dtype=dtype)
    return EdgeLora(a_t, b_t, dora)


class HasEdges(Protocol):
    """What a step needs of a resident adapter: its edge LoRAs, if any."""

    embed: EdgeLora | None
    lm_head: EdgeLora | None


@dataclass
class EdgeBatch:
    """One step's edge LoRAs, each with the rows it applies to (on the step's device)."""

    embed: list[tuple[EdgeLora, torch.Tensor]]  # flat token rows of the adapter's sequences
    lm_head: list[tuple[EdgeLora, torch.Tensor]]  # rows of the sampled hidden states


def build_edge_batch(
    seq_adapters: Sequence[HasEdges | None], offsets: Sequence[int], sampled: Sequence[int], device: str
) -> EdgeBatch | None:
    """`seq_adapters[i]` is sequence i's adapter (None: base), whose tokens are flat rows
    offsets[i]:offsets[i + 1]; `sampled` lists the sequences whose last row is projected to logits,
    in logits-row order. None when no adapter of the step has an edge LoRA (the common case)."""
    if not any(a is not None and (a.embed is not None or a.lm_head is not None) for a in seq_adapters):
        return None
    token_rows: dict[int, list[int]] = {}
    logit_rows: dict[int, list[int]] = {}
    by_id: dict[int, HasEdges] = {}
    for i, adapter in enumerate(seq_adapters):
        if adapter is not None and adapter.embed is not None:
            by_id[id(adapter)] = adapter
            token_rows.setdefault(id(adapter), []).extend(range(offsets[i], offsets[i + 1]))
    for row, i in enumerate(sampled):
        adapter = seq_adapters[i]
        if adapter is not None and adapter.lm_head is not None:
            by_id[id(adapter)] = adapter
            logit_rows.setdefault(id(adapter), []).append(row)

    def rows(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    embed = [(e, rows(r)) for k, r in token_rows.items() if (e := by_id[k].embed) is not None]
    head = [(h, rows(r)) for k, r in logit_rows.items() if (h := by_id[k].lm_head) is not None]
    return EdgeBatch(embed, head)


def add_embedding_lora(x: torch.Tensor, input_ids: torch.Tensor, edges: EdgeBatch) -> None:
    """x [T, hidden] (the embedded input_ids [T]) += each row's adapter delta, in place."""
    for lora, rows in edges.embed:
        after_a = lora.a_t.index_select(0, input_ids.index_select(0, rows))  # [n, r]
        adapted = x.index_select(0, rows).addmm_(after_a, lora.b_t)
        if lora.dora_scale is not None:
            adapted *= lora.dora_scale
        x.index_copy_(0, rows, adapted)


def add_lm_head_lora(logits: torch.Tensor, hidden: torch.Tensor, edges: EdgeBatch) -> None:
    """logits [S, vocab] (of hidden [S, hidden]) += each sampled row's adapter delta, in place."""
    for lora, rows in edges.lm_head:
        h = hidden.index_select(0, rows)
        delta = ((h @ lora.a_t) @ lora.b_t).to(logits.dtype)  # [n, vocab]; the model's dtype, as the base
        if lora.dora_scale is None:
            logits.index_add_(0, rows, delta)  # no [n, vocab] read-modify-copy of the logits
            continue
        adapted = logits.index_select(0, rows).add_(delta).mul_(lora.dora_scale.to(logits.dtype))
        logits.index_copy_(0, rows, adapted)
