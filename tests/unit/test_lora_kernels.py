"""Which CPU kernels a step's LoRA matmuls run on: one-token bf16 segments skip oneDNN."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from services.worker.layers.lora import LoraBatch, LoraGroup, add_fused_lora, add_lora

IN, OUT, RANK, ADAPTERS = 64, 48, 8, 3
KEY = (0, "q_proj")


class OneDNNFlagAtMatmuls(TorchDispatchMode):
    """Records torch's oneDNN flag as each batched matmul is dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.flags: list[bool] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.baddbmm_):
            self.flags.append(torch._C._get_mkldnn_enabled())
        return func(*args, **(kwargs or {}))


def _batch(tokens: int, dtype: torch.dtype) -> tuple[LoraBatch, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    a = torch.randn(ADAPTERS, RANK, IN, generator=g)
    b_t = torch.randn(ADAPTERS, RANK, OUT, generator=g) / RANK
    rows = ADAPTERS * tokens
    group = LoraGroup(
        num_adapters=ADAPTERS,
        seg_len=tokens,
        gather_index=torch.arange(rows),
        valid=None,
        dest=torch.arange(rows),
        weights={KEY: (a.to(dtype), b_t.to(dtype))},
        span=(0, rows),
    )
    x = torch.randn(rows, IN, generator=g)
    # The fp32 reference: each token's own adapter, one at a time.
    per_row = [x[i] @ a[i // tokens].T @ b_t[i // tokens] for i in range(rows)]
    return LoraBatch([group]), x.to(dtype), torch.stack(per_row)


@pytest.mark.parametrize(
    ("tokens", "dtype", "onednn"),
    [(1, torch.bfloat16, False), (3, torch.bfloat16, True), (1, torch.float32, True)],
)
def test_only_one_token_bf16_segments_run_without_onednn_and_the_flag_is_restored(
    tokens: int, dtype: torch.dtype, onednn: bool
) -> None:
    batch, x, want = _batch(tokens, dtype)
    for add in (
        lambda y: add_lora(y, x, KEY, batch),
        lambda y: add_fused_lora(y, x, [(KEY, 0, OUT)], batch),
    ):
        y = torch.zeros(x.shape[0], OUT, dtype=dtype)
        with OneDNNFlagAtMatmuls() as seen:
            add(y)
        assert seen.flags == [onednn, onednn]  # shrink, expand
        assert torch._C._get_mkldnn_enabled()
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(y.float(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_the_onednn_flag_is_restored_when_a_one_token_segment_fails() -> None:
    batch, x, _ = _batch(1, torch.bfloat16)
    y = torch.zeros(x.shape[0], OUT + 1, dtype=torch.bfloat16)  # the expand cannot fit these columns
    with pytest.raises(RuntimeError):
        add_lora(y, x, KEY, batch)
    assert torch._C._get_mkldnn_enabled()
