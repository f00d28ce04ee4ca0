"""Base weights into a model built on the meta device: in the serving dtype and layout, memory-mapped.

A worker's cold start is mostly memory. Casting a fp32 checkpoint into new bf16 tensors, then
concatenating q/k/v and gate/up into fused copies, writes every weight byte twice into fresh pages,
and a fresh page costs far more than the cast (seconds for a 135M model on a VM). So the first load
writes the checkpoint once more, already cast and with each fused projection stored as one tensor
(a *serving copy* under `<model dir>/.serving/`), and every later load maps that file: parameters
are views of the page cache through a private (copy-on-write) mapping, so nothing is copied or
cast, the file can never be written through them, and workers of one model on one host share the
pages. The copy is keyed by the dtype, the layout and the source files' sizes and times, so a
changed checkpoint or model class gets a new one. Where the model directory is read-only, the
serving layout is built in memory instead (the old cost, same result).

Any model family calls `load_weights` on its meta-built model; `FusedLoRALinear.fuse()` then finds
each group's parts already side by side and adopts them without a copy.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from services.common.base_models import build_atomically
from services.worker import serving_cache
from services.worker.layers.lora import FusedLoRALinear

log = logging.getLogger(__name__)

# Bump when the serving copy's contents change meaning (names, fusion, padding).
LAYOUT_VERSION = 1
SERVING_FILE = "model.safetensors"


@dataclass(frozen=True)
class FusedGroup:
    """One FusedLoRALinear: its serving tensors hold its parts' rows in order."""

    path: str  # the fused module's name; the serving copy stores `<path>.weight` (and `.bias`)
    weights: tuple[str, ...]  # the parts' checkpoint names, in row order
    biases: tuple[str | None, ...]  # None: that part has no bias (zeros in the fused bias)
    rows: tuple[int, ...]

    def members(self) -> dict[str, tuple[str | None, ...]]:
        """Serving name -> the checkpoint names whose rows it holds, in order."""
        return {f"{self.path}.weight": self.weights, f"{self.path}.bias": self.biases}


@dataclass(frozen=True)
class ServingLayout:
    """Which checkpoint tensors the model needs, and how the serving copy names and groups them."""

    shapes: dict[str, tuple[int, ...]]  # every checkpoint name the model needs -> shape
    groups: tuple[FusedGroup, ...]
    plain: tuple[str, ...]  # checkpoint names stored as they are

    @classmethod
    def of(cls, model: nn.Module) -> ServingLayout:
        names = {id(p): name for name, p in model.named_parameters()}  # a tied weight: its first name
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        groups: list[FusedGroup] = []
        grouped: set[str] = set()
        for path, module in model.named_modules():
            if not isinstance(module, FusedLoRALinear):
                continue
            weights = tuple(names[id(p.weight)] for p in module.parts)
            biases = tuple(None if p.bias is None else names[id(p.bias)] for p in module.parts)
            groups.append(FusedGroup(path, weights, biases, tuple(p.out_features for p in module.parts)))
            grouped.update(weights, (b for b in biases if b is not None))
        plain = tuple(name for name in shapes if name not in grouped)
        return cls(shapes, tuple(groups), plain)

    def serving_shapes(self) -> dict[str, tuple[int, ...]]:
        out = {name: self.shapes[name] for name in self.plain}
        for g in self.groups:
            first = self.shapes[g.weights[0]]
            out[f"{g.path}.weight"] = (sum(g.rows), *first[1:])
            if any(b is not None for b in g.biases):
                out[f"{g.path}.bias"] = (sum(g.rows),)
        return out


def load_weights(model: nn.Module, model_dir: Path, dtype: torch.dtype, device: str) -> None:
    """Replace every parameter of a meta-built `model` with the checkpoint's weights in `dtype` on
    `device` (tied parameters stay tied). The parts of each FusedLoRALinear become consecutive row
    blocks of one tensor, so its fuse() copies nothing."""
    layout = ServingLayout.of(model)
    tensors = _serving_tensors(layout, model_dir, dtype)
    if device != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    loaded = {name: tensors[name] for name in layout.plain}
    for g in layout.groups:
        for fused, members in g.members().items():
            if fused in tensors:
                for name, part in zip(members, _row_blocks(tensors[fused], g.rows), strict=True):
                    if name is not None:
                        loaded[name] = part
    _install(model, loaded)


def _serving_tensors(layout: ServingLayout, model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The serving layout's tensors on the host: mapped from the serving copy (built on first use),
    or built in memory where the copy cannot be written."""
    sources = _checkpoint_files(model_dir)
    shapes = sorted(layout.serving_shapes().items())
    version = serving_cache.key(LAYOUT_VERSION, str(dtype), serving_cache.file_stats(sources), shapes)
    dest = serving_cache.cache_dir(model_dir) / f"{_dtype_name(dtype)}-{version}"
    try:
        build_atomically(
            dest, lambda tmp: _write_serving_copy(layout, sources, dtype, tmp), done=_has_serving_file
        )
    except OSError as exc:
        log.warning("no serving copy of %s (%s): casting in memory on every start", model_dir, exc)
        return _build_serving_tensors(layout, sources, dtype)
    _drop_stale_copies(dest)
    tensors = _read(dest / SERVING_FILE)
    found = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    if found != {name: (shape, dtype) for name, shape in layout.serving_shapes().items()}:
        raise ValueError(f"{dest} does not match the model; delete {dest.parent} and start again")
    return tensors


def _build_serving_tensors(
    layout: ServingLayout, sources: list[Path], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Cast and fuse the checkpoint: one pass, each weight written once into its final place."""
    checkpoint = _checkpoint_tensors(layout, sources)
    shapes = layout.serving_shapes()
    out = {name: checkpoint[name].to(dtype) for name in layout.plain}
    for g in layout.groups:
        for fused, members in g.members().items():
            if fused not in shapes:
                continue  # no part has a bias
            # Every weight row gets written; a part without a bias keeps zeros in the fused bias.
            make = torch.empty if fused.endswith(".weight") else torch.zeros
            out[fused] = make(shapes[fused], dtype=dtype)
            for name, part in zip(members, _row_blocks(out[fused], g.rows), strict=True):
                if name is not None:
                    part.copy_(checkpoint[name])
    return out


def _checkpoint_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def _checkpoint_tensors(layout: ServingLayout, sources: list[Path]) -> dict[str, torch.Tensor]:
    """The model's tensors from the HF checkpoint (memory-mapped, in the file's dtype)."""
    found: dict[str, torch.Tensor] = {}
    for path in sources:
        for name, tensor in _read(path).items():
            if name in layout.shapes:  # others, e.g. rotary inv_freq buffers in older checkpoints
                found[name] = tensor
    # A tied lm_head is not in the layout (named_parameters lists a shared weight once).
    missing = sorted(set(layout.shapes) - set(found))
    if missing:
        raise ValueError(f"{sources[0].parent} lacks weights for {missing[:5]}")
    wrong = [n for n, t in found.items() if tuple(t.shape) != layout.shapes[n]]
    if wrong:
        name = wrong[0]
        raise ValueError(
            f"{sources[0].parent}: {name} has shape {tuple(found[name].shape)}, the config implies "
            f"{layout.shapes[name]}"
        )
    return found


def _write_serving_copy(layout: ServingLayout, sources: list[Path], dtype: torch.dtype, out: Path) -> None:
    tensors = _build_serving_tensors(layout, sources, dtype)
    save_file(tensors, str(out / SERVING_FILE), metadata={"layout": str(LAYOUT_VERSION)})


def _has_serving_file(dest: Path) -> bool:
    return (dest / SERVING_FILE).is_file()


def _drop_stale_copies(current: Path) -> None:
    """Older copies of the same dtype (a replaced checkpoint or layout); a process still mapping
    one keeps its pages until it exits."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    for entry in current.parent.iterdir():
        if entry.is_dir() and entry.name.startswith(prefix) and entry != current:
            shutil.rmtree(entry, ignore_errors=True)
            (current.parent / f".{entry.name}.lock").unlink(missing_ok=True)


def _read(path: Path) -> dict[str, torch.Tensor]:
    # safe_open maps the file privately: the tensors are views of the page cache until written.
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a mapping


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _row_blocks(tensor: torch.Tensor, rows: tuple[int, ...]) -> Iterator[torch.Tensor]:
    offset = 0
    for n in rows:
        yield tensor[offset : offset + n]
        offset += n


def _install(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Swap each meta parameter for a real one (meta tensors cannot take `.data` from real ones);
    one new Parameter per old one, so tied weights stay one object."""
    old = dict(model.named_parameters())  # holds the meta parameters, so no id is reused meanwhile
    names = {id(p): name for name, p in old.items()}
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in new:
                new[id(param)] = nn.Parameter(tensors[names[id(param)]], requires_grad=False)
            module._parameters[attr] = new[id(param)]
