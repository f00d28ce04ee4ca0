"""What a worker derives once from a model directory and reuses on every later start.

Kept in `<model dir>/.serving/` (a dot directory: model listings, imports and the safetensors
glob ignore it), each entry named by a key over what it was derived from, so a changed
checkpoint, layout or library version gets a new entry instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

SERVING_DIR = ".serving"


def cache_dir(model_dir: Path) -> Path:
    return model_dir / SERVING_DIR


def file_stats(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """Name, size and modification time of each file: cheap, and enough for files that are only
    ever replaced whole (model directories are written by an atomic rename)."""
    return [(p.name, (s := p.stat()).st_size, s.st_mtime_ns) for p in paths]


def key(*parts: object) -> str:
    blob = json.dumps(parts, default=str, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
