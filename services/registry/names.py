"""Names users choose (tenants, adapters, base models) are slugs: safe in paths, URLs and logs."""

from __future__ import annotations

import re

_SLUG = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def check_slug(what: str, value: str) -> None:
    """Raises ValueError with a fix-it sentence unless `value` is a safe slug."""
    if not _SLUG.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed: use 1-63 lowercase letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (no '/' or '..')"
        )
