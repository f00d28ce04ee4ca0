"""Engine configuration: one frozen dataclass validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    max_batch_size: int = 64
    max_step_tokens: int = 2048  # per-step token budget shared by prefill and decode
    kv_block_size: int = 16
    kv_cache_blocks: int | None = None  # None: sized from kv_cache_bytes
    max_waiting: int = 256
    # A sanity cap on resident adapters; the worker's device byte budget is what governs.
    max_adapter_slots: int = 4096
    max_lora_rank: int = 256
    kv_cache_bytes: int | None = None  # None: 512 MiB on CPU, half the free memory on CUDA
    # CPU weights are packed for oneDNN (layers/packed.py), ~1 s for SmolLM2: True packs bf16 ones
    # on a thread of its own while the worker finishes starting (its cold start), False before
    # the engine is returned; either way a step's results are the same. fp32 weights, whose packed
    # results differ in the last bits, are always packed before the engine is returned.
    pack_in_background: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {self.dtype} is not supported; use bfloat16, float16 or float32")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device {self.device!r} is not supported; use 'cpu' or 'cuda'")
        positive = {
            "max_batch_size": self.max_batch_size,
            "max_step_tokens": self.max_step_tokens,
            "kv_block_size": self.kv_block_size,
            "max_waiting": self.max_waiting,
            "max_adapter_slots": self.max_adapter_slots,
            "max_lora_rank": self.max_lora_rank,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError("max_step_tokens must be at least max_batch_size so every row can decode")
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 2:
            raise ValueError(f"kv_cache_blocks must be at least 2, got {self.kv_cache_blocks}")


def preferred_dtype(device: str) -> torch.dtype:
    """bf16 where the hardware computes in it natively (CUDA, CPUs with AVX512-BF16 or AMX);
    elsewhere fp32, because emulated bf16 matmuls run several times slower than fp32 ones."""
    if device.startswith("cuda"):
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32
