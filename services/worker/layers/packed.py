"""Base weights pre-packed for oneDNN's GEMM on the CPU (bf16 where the CPU computes it natively,
and fp32).

`x @ W.T` on a CPU tensor reorders W into oneDNN's blocked layout on every call (bf16), or runs
MKL's GEMM on the plain layout (fp32). Reordering once at load and calling the packed GEMM directly
is faster. bf16, measured on a Xeon with AVX512-BF16 and AMX (torch 2.13, 1 thread, 32 rows,
SmolLM2 shapes): q/k/v 576→960 129 → 92 µs, gate/up 576→3072 404 → 279 µs, down 1536→576
218 → 141 µs, lm_head 576→49,152 6.7 → 3.7 ms; results bit-identical to `F.linear` at every row
count tried (1–300). fp32, measured on a 2-core AMD EPYC (AVX512, 1 thread, 32 rows): q/k/v
366 → 164 µs, gate/up 1,193 → 473 µs, down 581 → 249 µs, lm_head 30.3 → 11.0 ms, a step's GEMMs
101 → 41 ms; the packed fp32 weight takes the plain one's bytes (MKL's own packed format takes
2–7×, and is no faster here), and its results differ from `F.linear`'s in the last bits (≤ 5e-6
absolute at these shapes), so fp32 weights are packed before the engine serves (config.py).

Not on CUDA, where cuBLAS needs no packing. The plain weights stay (adapter shape checks and DoRA
norms read them), so packing costs one more copy of the packed matrices in host memory.
"""

from __future__ import annotations

import torch

# oneDNN picks its blocking for this many rows; the packed weight is exact for any row count.
ROWS_HINT = 32


def can_pack(device: str, dtype: torch.dtype) -> bool:
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def packs_exactly(dtype: torch.dtype) -> bool:
    """Whether packed and plain GEMMs give bit-identical results (so steps may run while packing)."""
    return dtype == torch.bfloat16


def pack(weight: torch.Tensor) -> torch.Tensor:
    """W [out, in] in oneDNN's layout for `matmul`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), ROWS_HINT)


def matmul(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ W.T -> [T, out], through the packed weight when there is one."""
    if packed is None:
        return x @ weight.T
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
