"""`loraplex models import NAME --from DIR`: bring any HF safetensors model directory into the model cache.

Checked before anything is copied, so a directory a worker could not serve never lands in
`<home>/models`:
- the name is a plain catalog name (it becomes a directory and a registry key);
- weights are safetensors only (pickled `.bin`/`.pt` files are never read, and refused when they
  are the only weights);
- the config is one a worker loads (the worker's own config reader decides: one parser per format);
- every transformer block's LoRA-targetable linear layer (from `describe_model`) has its weight in
  the safetensors headers with the shape the config implies;
- a tokenizer is there (workers accept text and chat prompts).
Then the files are copied with `build_atomically` (a crash leaves no half model).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from services.common.base_models import build_atomically, describe_model, is_complete, models_dir
from services.common.model_spec import BaseModelSpec

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# What a worker reads from a model directory; anything else (READMEs, pickles, images) stays behind.
COPIED_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class ModelImportError(ValueError):
    """The directory cannot be imported; the message says why and what to do."""


def check_model_dir(name: str, source: Path) -> BaseModelSpec:
    """Validates `source` as a servable model called `name`; returns its LoRA geometry."""
    if not NAME_RE.fullmatch(name):
        raise ModelImportError(
            f"model name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-', starting alphanumeric"
        )
    if not (source / "config.json").is_file():
        raise ModelImportError(f"{source} has no config.json: point --from at a Hugging Face model directory")
    weights = sorted(source.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (
            f" (found {', '.join(pickles)}: pickles are never loaded; convert to safetensors)"
            if pickles
            else ""
        )
        raise ModelImportError(f"{source} holds no *.safetensors weights{hint}")
    if not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise ModelImportError(f"{source} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    from services.worker.models.config import read_config

    try:
        read_config(source)
        spec = describe_model(name, source)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelImportError(f"{source}/config.json is not a model a worker can serve: {exc}") from None
    _check_weights(spec, weights)
    return spec


def _check_weights(spec: BaseModelSpec, weights: list[Path]) -> None:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weights:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # a corrupt header is reported, not raised as a library error
            raise ModelImportError(f"{path.name} is not a readable safetensors file: {exc}") from None
    for layer in range(spec.num_layers):
        for m in spec.target_modules:
            key = f"{spec.layers_prefix}.{layer}.{m.path}.weight"
            want = (m.out_features, m.in_features)
            got = shapes.get(key)
            if got is None:
                raise ModelImportError(f"the weights have no {key}, which the config implies")
            if got != want:
                raise ModelImportError(f"{key} has shape {list(got)}; the config implies {list(want)}")


def import_model(name: str, source: Path, home: Path) -> tuple[Path, BaseModelSpec]:
    """Validates `source` and copies it to `<home>/models/<name>`; returns (path, spec)."""
    source = source.expanduser().resolve()
    if not source.is_dir():
        raise ModelImportError(f"{source} is not a directory")
    spec = check_model_dir(name, source)
    dest = models_dir(home) / name
    if dest.exists():
        raise ModelImportError(f"a model named {name!r} is already in {models_dir(home)}; pick another name")

    def copy(tmp: Path) -> None:
        for f in sorted(source.iterdir()):
            if f.is_file() and f.suffix in COPIED_SUFFIXES:
                shutil.copyfile(f, tmp / f.name)

    build_atomically(dest, copy, done=is_complete)
    return dest, spec
