"""A linear layer whose every row may carry its own LoRA adapter (SGMV-style, in plain PyTorch).

The base product x W^T is computed once for all T tokens. For the low-rank part, adapters are
grouped by rank bucket (8, 16, 32, ...), DoRA flag and target modules; a group's adapters of this
step sit in slots [0, n) of its preallocated buffers (engine/slot_pool.py), so A [n, r, in] and
B_t [n, r, out] are views, never stacked copies (one exception, for prompt chunks only: the A of a
fused projection's parts, stacked for one shrink; see add_fused_lora). The tokens of each adapter
form one segment of a [n, L, in] tensor (a view of x when the group's rows are contiguous and equal
in count, else a padded gather), and two batched matmuls give every segment its own correction:

    y[t] = x[t] W^T + (x[t] A_i^T) (s_i B_i)^T          for token t of adapter i

DoRA rows are then rescaled by m_i / ||W + s_i B_i A_i||_row (precomputed when the adapter loads):

    y[t] = (m_i / ||W + s_i B_i A_i||) * (x[t] W^T + s_i x[t] A_i^T B_i^T) + bias
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import nn

from services.worker.layers.packed import matmul, pack

ModuleKey = tuple[int, str]  # (layer index, module name)
SHARED_SHRINK_TOKENS = 16  # see add_fused_lora


@dataclass
class LoraGroup:
    """The rows of one group (rank bucket, DoRA flag, target modules) in one step."""

    num_adapters: int
    seg_len: int  # L: tokens of the busiest adapter in this group
    gather_index: torch.Tensor  # [n * L] flat token feeding each padded segment position
    valid: torch.Tensor | None  # positions of real tokens in the padded layout (None: no padding)
    dest: torch.Tensor  # [tokens] flat token receiving each real position's correction
    weights: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]  # A [n, r, in], B_t [n, r, out]
    span: tuple[int, int] | None = None  # the group's tokens are exactly x[start:end], in order
    dora_scales: dict[ModuleKey, torch.Tensor] = field(default_factory=dict)  # [n, out]; DoRA groups
    dest_slot: torch.Tensor | None = None  # [tokens] slot of each dest token (DoRA groups)


@dataclass
class LoraBatch:
    groups: list[LoraGroup]

    def index_tensors(self) -> list[torch.Tensor | None]:
        """The step's token index tensors, in a fixed order (built on the host, sent in one copy)."""
        out: list[torch.Tensor | None] = []
        for g in self.groups:
            out += [g.gather_index, g.valid, g.dest, g.dest_slot]
        return out

    def place(self, tensors: list[torch.Tensor | None]) -> None:
        """Take index_tensors()'s tensors back, now on the device."""
        it = iter(tensors)
        for g in self.groups:
            gather, g.valid, dest, g.dest_slot = next(it), next(it), next(it), next(it)
            assert gather is not None and dest is not None
            g.gather_index, g.dest = gather, dest


def add_lora(y: torch.Tensor, x: torch.Tensor, key: ModuleKey, batch: LoraBatch) -> None:
    """y [T, out] += each row's low-rank correction of x [T, in]; DoRA rows rescaled, in place."""
    for g in batch.groups:
        ab = g.weights.get(key)
        if ab is None:
            continue
        with _kernels_for(g, x):
            _expand(g, y, _shrink(_segments(g, x), ab[0]), ab[1], g.dora_scales.get(key))


def add_fused_lora(
    y: torch.Tensor, x: torch.Tensor, parts: Sequence[tuple[ModuleKey, int, int]], batch: LoraBatch
) -> None:
    """add_lora for modules that read the same x and write side by side in y: parts are (key,
    first column, width). A group's segments are formed once. For prompt chunks (segments of at
    least SHARED_SHRINK_TOKENS) the parts' shrinks are one matmul over their A stacked for the
    step, which reads x once and gives BLAS a wider N (fp32, 2,048 tokens: q/k/v LoRA 12.1 -> 9.1 ms
    a layer); the copy is small next to those segments, and decode rows, where a matrix-vector
    product reads A either way, never pay it."""
    for g in batch.groups:
        present = [(k, start, width) for k, start, width in parts if k in g.weights]
        if not present:
            continue
        xs = _segments(g, x)
        xa_all = None
        if g.seg_len >= SHARED_SHRINK_TOKENS and len(present) > 1:
            xa_all = _shrink(xs, torch.cat([g.weights[k][0] for k, _, _ in present], dim=1))
        with _kernels_for(g, x):
            for j, (k, start, width) in enumerate(present):
                a, b_t = g.weights[k]
                r = a.shape[1]
                xa = xa_all[..., j * r : (j + 1) * r] if xa_all is not None else _shrink(xs, a)
                _expand(g, y[:, start : start + width], xa, b_t, g.dora_scales.get(k))


class _OneDNNOff:
    """Runs its block with oneDNN's matmuls off (torch's process-wide flag, restored on exit).

    A CPU bf16 batched matmul with one token an adapter goes to oneDNN, which costs tens of µs a
    call whatever its size; with oneDNN off it runs ATen's bf16 matrix-vector kernel (fp32
    accumulation), 1.5-3x faster (Zen 4, AVX512-BF16, 1 thread, 8 adapters, shrink and expand,
    576 -> 576: rank 8 104 -> 70 µs, rank 64 576 -> 1536 506 -> 169 µs). For two or more tokens an
    adapter that path is a scalar GEMM (16 tokens, rank 64: 0.37 -> 15 ms), so only one-token
    segments take it. The flag is process-wide, but what other threads compute does not depend on
    it: oneDNN's weight packing and packed GEMMs ignore it and fp32 matmuls give bit-identical
    results either way (checked here); the engine's bf16 matmuls all run on its step thread."""

    def __init__(self) -> None:
        self.was = True

    # torch.backends.mkldnn.enabled reads and writes the flag through these.
    def __enter__(self) -> None:
        self.was = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        torch._C._set_mkldnn_enabled(self.was)


_ONEDNN_OFF = _OneDNNOff()


def _kernels_for(g: LoraGroup, x: torch.Tensor) -> AbstractContextManager[None]:
    if g.seg_len == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return _ONEDNN_OFF
    return nullcontext()


def _shrink(xs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """xs [n, L, in] @ A^T -> [n, L, r]. A stays as PEFT writes it, [r, in]: for a few tokens an
    adapter (decoding) the product runs as A @ xs^T, matrix-vector products over A's contiguous
    rows, which CPU BLAS runs faster than x @ A^T over a transposed operand (Zen 3, 1 thread, 8
    adapters, rank 64, 576 in, cold weights: fp32 123 -> 99 µs, bf16 343 -> 111 µs); longer
    segments are a GEMM either way."""
    if xs.shape[1] < SHARED_SHRINK_TOKENS:
        return torch.bmm(a, xs.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(xs, a.transpose(1, 2))


def _segments(g: LoraGroup, x: torch.Tensor) -> torch.Tensor:
    """[n, L, in]: each adapter's tokens, a view of x when the group's rows allow, else gathered."""
    if g.span is not None:
        start, end = g.span
        return x[start:end].view(g.num_adapters, g.seg_len, x.shape[1])
    return x.index_select(0, g.gather_index).view(g.num_adapters, g.seg_len, x.shape[1])


def _expand(
    g: LoraGroup, y: torch.Tensor, xa: torch.Tensor, b_t: torch.Tensor, scales: torch.Tensor | None
) -> None:
    """y += xa (sB)^T per segment, DoRA rows rescaled; xa [n, L, r] from `_segments`."""
    if g.span is not None:
        start, end = g.span
        # Accumulate straight into y's rows: no [tokens, out] temporary to write and re-read.
        ys = y[start:end].view(g.num_adapters, g.seg_len, y.shape[1])
        ys.baddbmm_(xa, b_t)
        if scales is not None:
            ys.mul_(scales.unsqueeze(1))
        return
    delta = torch.bmm(xa, b_t).view(-1, y.shape[1])
    if g.valid is not None:
        delta = delta.index_select(0, g.valid)
    y.index_add_(0, g.dest, delta)
    if scales is not None and g.dest_slot is not None:
        rows = y.index_select(0, g.dest) * scales.index_select(0, g.dest_slot)
        y.index_copy_(0, g.dest, rows)


class LoRALinear(nn.Module):
    """y = x W^T (+ per-row LoRA) (+ bias). The base weight is never modified."""

    def __init__(self, key: ModuleKey, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.key = key
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's layout (layers/packed.py)

    def pack(self) -> None:
        self.packed = pack(self.weight)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        y = matmul(x, self.weight, self.packed)
        if lora is not None:
            add_lora(y, x, self.key, lora)
        if self.bias is not None:
            y = y + self.bias
        return y


class FusedLoRALinear(nn.Module):
    """Several LoRALinears reading the same input (q/k/v, gate/up) as one matmul.

    The base weights are concatenated once, after loading, and each part's weight becomes a view
    of its rows, so memory is not doubled and everything that reads a part (adapter shape checks,
    DoRA norms) sees the same numbers. LoRA stays per original module: each part's low-rank delta
    (and DoRA rescale) is added to its own column slice of the fused output, then the biases, so
    adapters trained on split modules apply unchanged and a module no adapter targets costs
    nothing beyond the shared matmul.
    """

    weight: torch.Tensor

    def __init__(self, parts: Sequence[LoRALinear]) -> None:
        super().__init__()
        self.parts = tuple(parts)  # owned (and registered) by the parent module
        self.sizes = [p.out_features for p in parts]
        starts = [sum(self.sizes[:i]) for i in range(len(parts))]
        self.columns = [(p.key, start, p.out_features) for p, start in zip(parts, starts, strict=True)]
        self.register_buffer("weight", torch.empty(0), persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.packed: torch.Tensor | None = None

    def pack(self) -> None:
        self.packed = pack(self.weight)

    def fuse(self) -> None:
        """Concatenate the parts' loaded weights; each part then holds a view of its rows.

        Parts that already are consecutive rows of one tensor (models/weights.py loads them so)
        are adopted as they are: no copy, no second buffer."""
        weight = _adjacent_rows([p.weight.detach() for p in self.parts])
        if weight is None:
            weight = torch.cat([p.weight.detach() for p in self.parts])
        bias = None
        if any(p.bias is not None for p in self.parts):
            biases = [p.bias.detach() for p in self.parts if p.bias is not None]
            bias = _adjacent_rows(biases) if len(biases) == len(self.parts) else None
            if bias is None:
                bias = torch.cat(
                    [
                        p.bias.detach() if p.bias is not None else weight.new_zeros(p.out_features)
                        for p in self.parts
                    ]
                )
        offset = 0
        for p in self.parts:
            p.weight.data = weight[offset : offset + p.out_features]
            if p.bias is not None and bias is not None:
                p.bias.data = bias[offset : offset + p.out_features]
            offset += p.out_features
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> tuple[torch.Tensor, ...]:
        return self.fused(x, lora).split(self.sizes, dim=1)

    def fused(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """The parts' outputs side by side, [T, sum of out_features]."""
        y = matmul(x, self.weight, self.packed)
        if lora is not None:
            add_fused_lora(y, x, self.columns, lora)
        if self.bias is not None:
            y += self.bias
        return y


def _adjacent_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive row blocks are exactly `parts`, when they share one storage
    back to back; else None."""
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for p in parts:
        same_kind = p.dtype == first.dtype and p.device == first.device and p.shape[1:] == first.shape[1:]
        if not (same_kind and p.is_contiguous() and p.untyped_storage().data_ptr() == storage):
            return None
        if p.storage_offset() != offset:
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride())
