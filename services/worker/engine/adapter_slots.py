"""An adapter in the layout the multi-LoRA layer reads, before it is written into its slot.

Loading pads each module to its adapter's rank bucket, folds the scale into B, stores A (as PEFT
writes it, [r, in]) and (sB)^T in the layout of a slot (engine/slot_pool.py), and computes the
DoRA factor m / ||W + s B A||_row once, against the untouched base weight. LoRA on
embed_tokens / lm_head is held per adapter beside the slots (layers/lora_edges.py), unpadded: it
is applied adapter by adapter.

The same layout lives in host memory for the worker's HOST tier: `to_device(..., device="cpu")`
prepares it there (pinned when the engine runs on CUDA), `move(adapter, device)` copies it to the
device and back. On a CPU engine host and device are one memory, so moving is free.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from services.worker.engine.adapter_weights import AdapterWeights
from services.worker.layers.lora import ModuleKey
from services.worker.layers.lora_edges import EdgeLora, edge_lora
from services.worker.models.llama import LlamaForCausalLM

MIN_BUCKET = 8
_uids = itertools.count(1)


class AdapterMismatch(ValueError):
    """The adapter's layers or shapes do not fit this base model."""


def rank_bucket(rank: int) -> int:
    bucket = MIN_BUCKET
    while bucket < rank:
        bucket *= 2
    return bucket


GroupKey = tuple[int, bool, tuple[ModuleKey, ...]]  # rank bucket, DoRA, target modules


@dataclass
class DeviceAdapter:
    digest: str
    uid: int  # changes on every load and move
    bucket: int
    is_dora: bool
    a: dict[ModuleKey, torch.Tensor]  # [bucket, in]: PEFT's lora_A, rank padded to the bucket
    b_t: dict[ModuleKey, torch.Tensor]  # [bucket, out], scale folded in
    dora_scale: dict[ModuleKey, torch.Tensor]  # [out]
    slot_bytes: int = 0  # what its slot occupies: rank padded to the bucket, the engine's dtype
    targets: tuple[ModuleKey, ...] = ()  # kept when the tensors are dropped (they live in a slot)
    embed: EdgeLora | None = None  # LoRA on embed_tokens (layers/lora_edges.py)
    lm_head: EdgeLora | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            self.targets = tuple(sorted(self.a))

    def without_tensors(self) -> DeviceAdapter:
        """Its description only, for an adapter whose weights now live in slot buffers."""
        return replace(self, a={}, b_t={}, dora_scale={})

    @property
    def group(self) -> GroupKey:
        """Adapters with the same rank bucket, DoRA flag and target modules share slot buffers and
        are computed together, so an adapter pays only at the modules it targets (a q/v-only
        adapter is never padded with zeros at the MLP next to an all-linear one)."""
        return self.bucket, self.is_dora, self.targets

    @property
    def resident_bytes(self) -> int:
        """Device bytes: its slot (rank padded to the bucket, the engine's dtype) and its edges."""
        return self.slot_bytes + sum(e.nbytes for e in (self.embed, self.lm_head) if e is not None)


def slot_bytes(
    targets: dict[ModuleKey, tuple[int, int]], rank: int, is_dora: bool, dtype: torch.dtype
) -> int:
    """Bytes an adapter's slot occupies, from its target modules' (in, out) shapes and its largest
    rank: known from the safetensors header and the model config before anything is loaded."""
    bucket = rank_bucket(rank)
    element = torch.empty(0, dtype=dtype).element_size()
    return element * sum(i * bucket + bucket * o + (o if is_dora else 0) for i, o in targets.values())


def to_device(
    weights: AdapterWeights, model: LlamaForCausalLM, max_rank: int, device: str, *, pin: bool = False
) -> DeviceAdapter:
    """The adapter in the step layout on `device`; `pin` page-locks host tensors for fast copies."""
    if weights.max_rank > max_rank:
        raise AdapterMismatch(f"adapter rank {weights.max_rank} exceeds this worker's limit of {max_rank}")
    dtype = model.lm_head.weight.dtype
    # The edges are never stacked, so their rank does not pad the block modules.
    bucket = rank_bucket(max((w.rank for w in weights.tensors.values()), default=1))
    a_rows: dict[ModuleKey, torch.Tensor] = {}
    b_t: dict[ModuleKey, torch.Tensor] = {}
    dora: dict[ModuleKey, torch.Tensor] = {}
    for key, w in weights.tensors.items():
        linear = model.linear(key)
        if linear is None:
            raise AdapterMismatch(f"adapter targets layer {key[0]} {key[1]}, which this base model lacks")
        if w.a.shape[1] != linear.in_features or w.b.shape[0] != linear.out_features:
            raise AdapterMismatch(
                f"layer {key[0]} {key[1]}: adapter shapes {tuple(w.a.shape)}/{tuple(w.b.shape)} do not fit "
                f"[{linear.out_features}, {linear.in_features}]; was it trained for another base model?"
            )
        a = torch.zeros(bucket, linear.in_features, dtype=dtype, device=device)
        b = torch.zeros(bucket, linear.out_features, dtype=dtype, device=device)
        a[: w.rank] = w.a.to(device=device, dtype=dtype)
        b[: w.rank] = (w.b.to(device=device, dtype=torch.float32) * w.scale).T.to(dtype)
        a_rows[key], b_t[key] = a, b
        if w.magnitude is not None:
            # Against the base weight where it lives (only read, so any thread may do this).
            at = linear.weight.device
            base = linear.weight.float()
            delta = (w.b.to(device=at, dtype=torch.float32) * w.scale) @ w.a.to(at, torch.float32)
            norm = torch.linalg.norm(base + delta, dim=1)
            dora[key] = (w.magnitude.to(at, torch.float32) / norm).to(device=device, dtype=dtype)
    embed, head = (_edge(weights, name, model, dtype, device, pin) for name in ("embed_tokens", "lm_head"))
    if pin:
        a_rows, b_t, dora = _pinned(a_rows), _pinned(b_t), _pinned(dora)
    is_dora = weights.variant == "DORA"
    shapes = {k: (t.shape[1], b_t[k].shape[1]) for k, t in a_rows.items()}
    return DeviceAdapter(
        digest=weights.digest,
        uid=next(_uids),
        bucket=bucket,
        is_dora=is_dora,
        a=a_rows,
        b_t=b_t,
        dora_scale=dora,
        slot_bytes=slot_bytes(shapes, bucket, is_dora, dtype),
        embed=embed,
        lm_head=head,
    )


def _edge(
    weights: AdapterWeights, name: str, model: LlamaForCausalLM, dtype: torch.dtype, device: str, pin: bool
) -> EdgeLora | None:
    w = weights.edges.get(name)
    if w is None:
        return None
    # Both as [out, in]: the embedding table read as a layer from one-hot tokens to hidden.
    base = model.model.embed_tokens.weight.T if name == "embed_tokens" else model.lm_head.weight
    try:
        edge = edge_lora(w.a, w.b, w.scale, w.magnitude, base, dtype=dtype, device=device)
    except ValueError as exc:
        raise AdapterMismatch(f"{name}: {exc}; was it trained for another base model?") from None
    return edge.to(device, pin=True) if pin else edge


def move(adapter: DeviceAdapter, device: str, *, pin: bool = False) -> DeviceAdapter:
    """The adapter's tensors on `device` under a new uid (no copy when they are already there).

    `pin` page-locks host copies of device tensors, so a later move back is a plain DMA.
    """

    def to(tensors: dict[ModuleKey, torch.Tensor]) -> dict[ModuleKey, torch.Tensor]:
        out: dict[ModuleKey, torch.Tensor] = {}
        for key, t in tensors.items():
            if pin and device == "cpu" and t.device.type != "cpu":
                out[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            else:
                out[key] = t.to(device, non_blocking=True)
        return out

    stream = _copy_stream(device, adapter)
    if stream is None:
        return replace(
            adapter,
            uid=next(_uids),
            a=to(adapter.a),
            b_t=to(adapter.b_t),
            dora_scale=to(adapter.dora_scale),
            embed=adapter.embed and adapter.embed.to(device, pin=pin),
            lm_head=adapter.lm_head and adapter.lm_head.to(device, pin=pin),
        )
    # On CUDA: the copies run on a stream of their own, so they overlap the steps' kernels, and
    # this (loader) thread waits on that stream's event only, never on the step's work.
    with torch.cuda.stream(stream):
        moved = replace(
            adapter,
            uid=next(_uids),
            a=to(adapter.a),
            b_t=to(adapter.b_t),
            dora_scale=to(adapter.dora_scale),
            embed=adapter.embed and adapter.embed.to(device, pin=pin),
            lm_head=adapter.lm_head and adapter.lm_head.to(device, pin=pin),
        )
        done = torch.cuda.Event()
        done.record(stream)
    done.synchronize()
    if device != "cpu":
        # Allocated on the copy stream, read by the step's stream: tell the caching allocator, so
        # their memory is not reused while a step may still read it.
        consumer = torch.cuda.default_stream(torch.device(device))
        edges = [t for e in (moved.embed, moved.lm_head) if e is not None for t in e.tensors()]
        for t in (*moved.a.values(), *moved.b_t.values(), *moved.dora_scale.values(), *edges):
            t.record_stream(consumer)
    return moved


_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: str, adapter: DeviceAdapter) -> torch.cuda.Stream | None:
    """The CUDA device a move involves (either side), or None when both sides are host memory."""
    at = torch.device(device)
    if at.type != "cuda":
        edges = [t for e in (adapter.embed, adapter.lm_head) if e is not None for t in e.tensors()]
        at = next((t.device for t in (*adapter.a.values(), *edges) if t.is_cuda), at)
    if at.type != "cuda":
        return None
    if at.index is None:
        at = torch.device("cuda", torch.cuda.current_device())
    if at not in _copy_streams:
        _copy_streams[at] = torch.cuda.Stream(at)
    return _copy_streams[at]


def _pinned(tensors: dict[ModuleKey, torch.Tensor]) -> dict[ModuleKey, torch.Tensor]:
    return {k: t if t.is_pinned() else t.pin_memory() for k, t in tensors.items()}
