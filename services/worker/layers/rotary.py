"""Rotary position embedding (RoFormer), HF "rotate half" layout, with Llama 3's frequency
scaling and Phi's `longrope`.

LongRoPE keeps two cos/sin tables, one from `short_factor` and one from `long_factor`, stacked
as one table of 2 * max_positions rows (short, then long), both already multiplied by
`attention_factor`. Which one a token reads is decided per sequence, from the largest position
that sequence has in this step: long when that position + 1 exceeds `original_max_positions`.

transformers' rotary module decides once per forward call, from the largest position in the
whole call (`dynamic_rope_update`: seq_len = max(position_ids) + 1). For one sequence run alone,
one forward call per step over its KV cache, the two rules agree (tests/integration/
test_model_families.py checks it): a prompt longer than the original context reads the long table
for every prompt token, and a decode token at position p reads it when p + 1 > original, the keys
already cached keeping the rotation they were written with. They differ:
- `generate` (Phi3ForCausalLM.prepare_inputs_for_generation) drops the KV cache at the first step
  past the original context (the token at position `original_max_positions`) and recomputes the
  whole sequence with the long table. The engine does not: a sequence whose decode crosses the
  original context keeps its short-rotated keys (and the hidden states built on them), so from
  that step on its logits differ from `generate`'s (in the tiny test model, by up to half the
  logit scale). Matching it needs the scheduler to re-prefill such a sequence once, outside this
  module; prompts that start past the context and ones that never reach it are unaffected.
- when one HF call holds several sequences (a padded batch): one long sequence switches every
  sequence in the call to the long table; here each sequence keeps its own;
- when our scheduler splits a long prompt into chunks over several steps: a chunk that ends
  within the original context is rotated with the short table (HF, given the whole prompt at
  once, uses the long one for all of it);
- when a prompt reuses cached prefix blocks that a shorter sequence computed with the short
  table, the reused keys keep that rotation (HF has no prefix cache).
"""

from __future__ import annotations

import math

import torch

from services.worker.layers.attention import AttentionMetadata
from services.worker.models.config import LongRope, RopeScaling


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
    """cos, sin tables of shape [max_positions, head_dim], computed in fp32 on the host; sin's
    first half negated (see `rotate_`).

    The host even inside a `torch.device("meta")` block: arange on meta runs through torch's
    Python reference ops, whose first use imports torch._dynamo (~1.3 s of a cold start)."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
    return _tables(freqs)


def _tables(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[positions, d/2] angles -> cos [positions, d] and sin [positions, d], sin's first half negated."""
    sin = freqs.sin()
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


def longrope_cache(
    rotary_dim: int, max_positions: int, theta: float, longrope: LongRope
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [2 * max_positions, rotary_dim] in fp32: the short-factor table, then the
    long-factor one, each times `attention_factor` (as transformers scales them); sin's first half
    negated (see `rotate_`)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
    tables = []
    for factors in (longrope.short_factor, longrope.long_factor):
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)
        tables.append(torch.outer(positions, inv_freq))
    cos, sin = _tables(torch.cat(tables))
    return cos * longrope.attention_factor, sin * longrope.attention_factor


def longrope_rows(
    positions: torch.Tensor, attention: AttentionMetadata, max_positions: int, original_max: int
) -> torch.Tensor:
    """Each token's row in `longrope_cache`'s table: its position, plus max_positions when its
    sequence's largest position in this step + 1 exceeds `original_max`.

    A decode row is one token, its own largest position; a prompt chunk's tokens are grouped by
    the attention metadata's padded layout (row = padded index // max_q)."""
    largest = positions.clone()
    prefill = attention.prefill
    if prefill is not None:
        flat = (
            prefill.dest
            if prefill.dest is not None
            else torch.arange(len(positions), device=positions.device)
        )
        row = prefill.unpad_index // prefill.max_q
        chunk = positions[flat]
        row_max = torch.zeros(int(prefill.mask.shape[0]), dtype=positions.dtype, device=positions.device)
        row_max = row_max.scatter_reduce(0, row, chunk, reduce="amax")
        largest[flat] = row_max[row]
    return positions + (largest + 1 > original_max).long() * max_positions


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates x [T, heads, d] in place (any strides: q and k are rotated as one view of the q/k/v
    projection); cos, sin [T, 1, r] in x's dtype, from the tables above. With r < d (partial
    rotary, as in Phi-4-mini) only the first r dims of each head rotate; the rest pass through.

    HF's rotate-half, x * cos + cat(-x2, x1) * sin, as x * cos + roll(x, r/2) * sin with sin's
    first half negated: three kernels a call instead of five, the same products."""
    x = x[..., : cos.shape[-1]]
    rolled = x.roll(x.shape[-1] // 2, dims=-1)
    x.mul_(cos).addcmul_(rolled, sin)
