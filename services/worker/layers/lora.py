"""A linear layer whose every row may carry its own LoRA adapter (SGMV-style, in plain PyTorch).

The base product x W^T is computed once for all T tokens. For the low-rank part, adapters are
grouped into rank buckets (8, 16, 32, ...); within a bucket the step's distinct adapters are
stacked into A_t [n, in, r] and B_t [n, r, out] (zero-padded only up to the bucket's rank), the
tokens of each adapter are gathered into one segment of a padded [n, L, in] tensor, and two
batched matmuls give every segment its own correction, which is added back row by row:

    y[t] = x[t] W^T + (x[t] A_i^T) (s_i B_i)^T          for token t of adapter i

DoRA rows are then rescaled by m_i / ||W + s_i B_i A_i||_row (precomputed when the adapter loads):

    y[t] = (m_i / ||W + s_i B_i A_i||) * (x[t] W^T + s_i x[t] A_i^T B_i^T) + bias
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ModuleKey = tuple[int, str]  # (layer index, module name)


@dataclass
class LoraGroup:
    """The rows of one rank bucket in one step."""

    num_adapters: int
    seg_len: int  # L: tokens of the busiest adapter in this bucket
    gather_index: torch.Tensor  # [n * L] flat token feeding each padded segment position
    valid: torch.Tensor | None  # positions of real tokens in the padded layout (None: no padding)
    dest: torch.Tensor  # [tokens] flat token receiving each real position's correction
    weights: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]  # A_t [n, in, r], B_t [n, r, out]
    span: tuple[int, int] | None = None  # the group's tokens are exactly x[start:end], in order


@dataclass
class LoraBatch:
    groups: list[LoraGroup]
    dora_tokens: torch.Tensor | None = None  # [Td] flat tokens whose adapter is DoRA
    dora_rows: torch.Tensor | None = None  # [Td] row of each in dora_scales
    dora_scales: dict[ModuleKey, torch.Tensor] = field(default_factory=dict)  # [n_dora, out]


def add_lora(y: torch.Tensor, x: torch.Tensor, key: ModuleKey, batch: LoraBatch) -> None:
    """y [T, out] += each row's low-rank correction of x [T, in]; DoRA rows rescaled, in place."""
    for g in batch.groups:
        ab = g.weights.get(key)
        if ab is None:
            continue
        a_t, b_t = ab
        if g.span is not None:
            start, end = g.span
            xs = x[start:end].view(g.num_adapters, g.seg_len, x.shape[1])
            # Accumulate straight into y's rows: no [tokens, out] temporary to write and re-read.
            y[start:end].view(g.num_adapters, g.seg_len, y.shape[1]).baddbmm_(torch.bmm(xs, a_t), b_t)
            continue
        xg = x.index_select(0, g.gather_index).view(g.num_adapters, g.seg_len, x.shape[1])
        delta = torch.bmm(torch.bmm(xg, a_t), b_t).view(-1, y.shape[1])
        if g.valid is not None:
            delta = delta.index_select(0, g.valid)
        y.index_add_(0, g.dest, delta)
    scales = batch.dora_scales.get(key)
    if scales is not None and batch.dora_tokens is not None and batch.dora_rows is not None:
        rows = y.index_select(0, batch.dora_tokens) * scales.index_select(0, batch.dora_rows)
        y.index_copy_(0, batch.dora_tokens, rows)


class LoRALinear(nn.Module):
    """y = x W^T (+ per-row LoRA) (+ bias). The base weight is never modified."""

    def __init__(self, key: ModuleKey, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.key = key
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        y = x @ self.weight.T
        if lora is not None:
            add_lora(y, x, self.key, lora)
        if self.bias is not None:
            y = y + self.bias
        return y
