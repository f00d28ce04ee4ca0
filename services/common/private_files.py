"""Files that hold secrets or billing state: created 0600, refused when someone widened them.

Admin tokens, API keys, private keys, spool segments and in-flight checkpoints all go through
here. A secret file that group or others can read may already have leaked, and a billing file
others can write may have been altered, so reading one is refused with a sentence that says how
to fix it rather than silently tightened.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

PRIVATE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class InsecureFileError(PermissionError):
    """A secret file (or its directory) is readable or writable by others than its owner."""


def check_private(path: Path) -> None:
    """Raises InsecureFileError when `path` grants any permission to group or others."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InsecureFileError(
            f"{path} has mode {mode:04o}, so other users may read or change it; "
            f"run 'chmod 600 {path}' (or remove it to have a new one made) and start again"
        )


def private_dir(path: Path) -> Path:
    """Creates `path` (and parents) if missing; the directory itself is made 0700."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(PRIVATE_DIR_MODE)
    return path


def open_private(path: Path, flags: int) -> int:
    """os.open with mode 0600 (O_CREAT implied); the umask can only narrow it."""
    return os.open(path, flags | os.O_CREAT, PRIVATE_MODE)


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Writes `data` to a 0600 file atomically (temporary file, fsync, rename).

    exclusive: FileExistsError instead of replacing a file already there.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # FileExistsError when another writer got there first
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_secret(path: Path) -> str:
    """The stripped text of a secret file, refused when its mode is wider than 0600."""
    check_private(path)
    return path.read_text().strip()


def secret_file(path: Path, make: str | None = None) -> str:
    """Reads a 0600 secret file, creating it with `make` (or a random token) the first time."""
    if not path.exists():
        # A concurrent caller may have made it first: then read theirs.
        with contextlib.suppress(FileExistsError):
            write_private(path, (make or secrets.token_urlsafe(32)).encode(), exclusive=True)
    return read_secret(path)
