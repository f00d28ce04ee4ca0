"""What an adapter will occupy in the engine's layout on the device, known before anything is loaded.

From the safetensors header (which modules, which ranks, DoRA or not), the base model's layer
shapes and the engine's dtype: its slot (the rank padded to its bucket, A^T and (sB)^T per target
module, the DoRA row scale) and its edge LoRA on embed_tokens / lm_head, held beside the slots
unpadded (layers/lora_edges.py). This is the DEVICE (and HOST, which keeps the same layout) cost
of an adapter, which can be several times its file size (bf16 files padded to a bucket, or fp32
slots), or less. It equals `DeviceAdapter.resident_bytes` of the prepared adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from services.common.adapter_files import TensorInfo
from services.worker.engine.adapter_slots import slot_bytes
from services.worker.engine.adapter_weights import EDGE_TENSOR_NAME, TENSOR_NAME
from services.worker.layers.lora import ModuleKey

LinearShape = Callable[[ModuleKey], "tuple[int, int] | None"]  # (in, out), None: no such layer


def planned_device_bytes(
    tensors: Mapping[str, TensorInfo], linear_shape: LinearShape, dtype: torch.dtype
) -> int:
    """Device bytes for the adapter whose header lists `tensors`; ValueError if a tensor names no
    layer of this model (the parse would refuse it too). Edge LoRA neither pads the bucket nor
    lives in a slot: its A, B and DoRA magnitude count as they are, in the engine's dtype."""
    element = torch.empty(0, dtype=dtype).element_size()
    shapes: dict[ModuleKey, tuple[int, int]] = {}
    rank, dora, edges = 0, False, 0
    for name, info in tensors.items():
        if EDGE_TENSOR_NAME.match(name):
            edges += info.numel  # A^T [in, r], (sB)^T [r, out], the row scale [out]: same counts
            continue
        m = TENSOR_NAME.match(name)
        if m is None:
            raise ValueError(f"tensor {name!r} does not map to a supported linear layer")
        key = (int(m.group("layer")), m.group("name"))
        shape = linear_shape(key)
        if shape is None:
            raise ValueError(f"adapter targets layer {key[0]} {key[1]}, which this base model lacks")
        shapes[key] = shape
        if m.group("kind") == "lora_A" and info.shape:
            rank = max(rank, int(info.shape[0]))
        dora = dora or m.group("kind") == "lora_magnitude_vector"
    return slot_bytes(shapes, rank, dora, dtype) + element * edges
