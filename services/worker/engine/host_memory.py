"""Zero-filled tensors whose host pages are only paid for when first written.

`torch.zeros` on the host writes every byte before returning: 512 MiB of KV cache cost ~1.8 s of a
worker's cold start on this VM (fresh pages are expensive to touch), most of it for blocks no
request may ever use. An anonymous private mapping reads as zeros by definition and the kernel
supplies each page on first touch, so the cost moves to the step that first fills a block.
"""

from __future__ import annotations

import math
import mmap

import torch


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Like torch.zeros; on the host, backed by an anonymous mapping (the tensor keeps it alive)."""
    if device != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)
