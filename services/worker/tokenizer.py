"""The model's Hugging Face tokenizer: AutoTokenizer's choice, remembered.

AutoTokenizer first builds the model's config (config.json) to choose a tokenizer class, and
building a config imports much of transformers' modelling stack (torch.distributed.tensor,
accelerate): ~1.3 s, a quarter of a worker's cold start, to arrive at a class that rarely changes.
So the first load asks AutoTokenizer and records the class it built (keyed by the model's small
files and the transformers version, in the model's serving cache); later loads of a tokenizer
recorded as the generic `TokenizersBackend` build that class directly (the same object:
tests/unit/test_worker_tokenizer.py). Other classes go through AutoTokenizer every time.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from services.worker import serving_cache

log = logging.getLogger(__name__)

GENERIC_CLASS = "transformers.tokenization_utils_tokenizers.TokenizersBackend"


def load_tokenizer(model_dir: Path) -> Any:
    record = _record_path(model_dir)
    if _recorded_class(record) == GENERIC_CLASS:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    _record(record, f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}")
    return tokenizer


def copies(tokenizer: Any, n: int) -> list[Any]:
    """Independent copies (a fast tokenizer must not serve two threads at once); a deep copy is
    cheaper than reading the files again."""
    return [copy.deepcopy(tokenizer) for _ in range(n)]


def _record_path(model_dir: Path) -> Path:
    import transformers

    # Everything but the weights: config.json, tokenizer files, chat template.
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix != ".safetensors")
    version = serving_cache.key(transformers.__version__, serving_cache.file_stats(files))
    return serving_cache.cache_dir(model_dir) / f"tokenizer-{version}.json"


def _recorded_class(record: Path) -> str | None:
    try:
        value = json.loads(record.read_text()).get("class")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _record(record: Path, class_name: str) -> None:
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".tokenizer-", suffix=".tmp")
    except OSError as exc:  # a read-only model directory: AutoTokenizer on every start
        log.warning("cannot record the tokenizer class of %s: %s", record.parent.parent, exc)
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"class": class_name}, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, record)  # atomic: a concurrent start reads the old state or the new one
    finally:
        Path(tmp).unlink(missing_ok=True)
