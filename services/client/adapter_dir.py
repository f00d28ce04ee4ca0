"""A local check of a PEFT adapter directory before it is uploaded (pure: no gRPC, unit-tested).

The registry validates everything again at intake; this only catches the usual mistakes on the
operator's machine, with a sentence naming the problem, before any bytes are sent: a wrong
directory, a base model given by mistake, a pickled checkpoint, a missing file.
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

from services.common.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# Pickle-based checkpoints: loading them runs arbitrary code, so they are never uploaded.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.pickle")
# Files that mark a base model's directory (transformers' save_pretrained of a whole model).
BASE_MODEL_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")

SAVE_HINT = "save it with PEFT's model.save_pretrained(directory) (safetensors is the default)"


class AdapterDirError(ValueError):
    """The directory cannot be uploaded as an adapter; the message says why and what to do."""


def check_adapter_dir(directory: Path) -> list[Path]:
    """The two files to upload from `directory`, or AdapterDirError naming what is wrong.

    Other files beside the two (a Trainer's training_args.bin, a README) are never read or sent.
    """
    if not directory.exists():
        raise AdapterDirError(f"{directory} does not exist; give the directory PEFT saved the adapter to")
    if not directory.is_dir():
        raise AdapterDirError(
            f"{directory} is a file; give the directory holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        raise AdapterDirError(f"{directory} is empty; {SAVE_HINT}")
    config, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config.is_file():
        base = _base_model_marker(directory, names)
        if base:
            raise AdapterDirError(
                f"{directory} is a base model's directory ({base}), not a LoRA adapter; "
                f"give the directory holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
            )
        raise AdapterDirError(
            f"{directory} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter; {SAVE_HINT}"
        )
    if not weights.is_file():
        pickles = [n for n in names if any(fnmatch(n, pat) for pat in PICKLE_PATTERNS)]
        if pickles:
            raise AdapterDirError(
                f"{directory} holds pickled weights ({', '.join(pickles)}), which are refused because "
                f"loading a pickle runs code; {SAVE_HINT} to get {ADAPTER_WEIGHTS}"
            )
        raise AdapterDirError(f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; {SAVE_HINT}")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterDirError(f"{config} is not readable JSON ({exc}); {SAVE_HINT}") from None
    if not isinstance(parsed, dict):
        raise AdapterDirError(f"{config} is not a JSON object; {SAVE_HINT}")
    files = [config, weights]
    for f in files:
        try:
            with f.open("rb"):
                pass
        except OSError as exc:
            raise AdapterDirError(f"cannot read {f}: {exc.strerror or exc}") from None
    return files


def _base_model_marker(directory: Path, names: list[str]) -> str:
    """Why `directory` looks like a base model ("" if it does not)."""
    weights = [n for n in names if any(fnmatch(n, pat) for pat in BASE_MODEL_WEIGHTS)]
    if weights:
        return f"it holds {weights[0]}"
    config = directory / "config.json"
    if config.is_file():
        try:
            parsed = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return ""
        if isinstance(parsed, dict) and "model_type" in parsed:
            return f"config.json has model_type {parsed['model_type']!r}"
    return ""
