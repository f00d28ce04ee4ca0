"""Base weights pre-packed for oneDNN's bf16 GEMM, on CPUs with native bf16.

`x @ W.T` on a bf16 CPU tensor reorders W into oneDNN's blocked layout on every call. Reordering
once at load and calling the packed GEMM directly skips that. Measured on this repository's CPU
(Xeon with AVX512-BF16 and AMX, torch 2.13, 1 thread, 32 rows, SmolLM2 shapes): q/k/v 576→960
129 → 92 µs, gate/up 576→3072 404 → 279 µs, down 1536→576 218 → 141 µs, lm_head 576→49,152
6.7 → 3.7 ms; results bit-identical to `F.linear` at every row count tried (1–300).

Only on CPU and only for bf16: on CUDA cuBLAS needs no packing; fp32's packed MKL layout takes 2–4×
the weight's bytes (measured), too much memory for a ~1.4× faster GEMM. The plain weights stay
(adapter shape checks and DoRA norms read them), so packing costs one more copy of the packed
matrices in host memory.
"""

from __future__ import annotations

import torch

# oneDNN picks its blocking for this many rows; the packed weight is exact for any row count.
ROWS_HINT = 32


def can_pack(device: str, dtype: torch.dtype) -> bool:
    return (
        device == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """W [out, in] in oneDNN's layout for `matmul`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), ROWS_HINT)


def matmul(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ W.T -> [T, out], through the packed weight when there is one."""
    if packed is None:
        return x @ weight.T
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
