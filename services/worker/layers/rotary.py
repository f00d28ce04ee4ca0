"""Rotary position embedding (RoFormer), HF "rotate half" layout, with Llama 3's frequency scaling."""

from __future__ import annotations

import math

import torch

from services.worker.models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths (beyond the pretraining context / low_freq_factor) are slowed by
    # `factor`, short ones (below context / high_freq_factor) kept, the band between interpolated.
    s = scaling
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_positions / s.low_freq_factor
    high_wavelen = s.original_max_positions / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    band = s.high_freq_factor - s.low_freq_factor
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / band
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cache(
    head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [max_positions, head_dim], computed in fp32 on the host.

    The host even inside a `torch.device("meta")` block: arange on meta runs through torch's
    Python reference ops, whose first use imports torch._dynamo (~1.3 s of a cold start)."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos, sin [T, 1, r] already in x's dtype. With r < d (partial rotary, as in
    Phi-4-mini) only the first r dims of each head rotate; the rest pass through."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
