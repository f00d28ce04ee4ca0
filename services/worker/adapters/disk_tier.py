"""The disk tier: verified adapter files in `<cache_dir>/<digest hex>/` (written by fetch.py)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from services.common.adapter_files import digest_hex
from services.worker.adapters.fetch import STAGING_PREFIX

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class CachedAdapter:
    digest: str
    size_bytes: int
    mtime: float


class DiskTier:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        return self.root / digest_hex(digest)

    def size(self, digest: str) -> int:
        """Bytes of the cached files; 0 when the adapter is not cached."""
        try:
            return _dir_size(self.path(digest))
        except (FileNotFoundError, NotADirectoryError):  # absent, or deleted while we looked
            return 0

    def delete(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)

    def scan(self) -> list[CachedAdapter]:
        """Entries an earlier run left, newest first; staging leftovers of crashed fetches are removed.

        Only complete entries are ever renamed into place, and each is verified again before use.
        """
        found: list[CachedAdapter] = []
        if not self.root.is_dir():
            return found
        for path in self.root.iterdir():
            if path.name.startswith(STAGING_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and len(path.name) == 64 and set(path.name) <= _HEX:
                found.append(CachedAdapter("sha256:" + path.name, _dir_size(path), path.stat().st_mtime))
        return sorted(found, key=lambda c: c.mtime, reverse=True)


def _dir_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
