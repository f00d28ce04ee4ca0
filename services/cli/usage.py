"""`loraplex usage export|summary`: the billing ledger over the registry's UsageService (admin)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from services.cli.admin import UsageError
from services.client.usage import FORMATS, UsageClient
from services.common.config import ClientSettings


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time; without an offset it is UTC."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{text!r} is not an ISO 8601 time; use e.g. 2026-11-01 or 2026-11-01T12:00:00Z"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _client() -> UsageClient:
    settings = ClientSettings.from_env()
    if not settings.admin_token:
        raise UsageError("set LORAPLEX_ADMIN_TOKEN to the registry's admin token")
    return UsageClient(settings.registry, settings.admin_token, tls=settings.registry_tls())


def _copy(chunks: Iterable[bytes], out: BinaryIO) -> None:
    for chunk in chunks:
        out.write(chunk)
        out.flush()


def usage_export(args: argparse.Namespace) -> int:
    start, end = parse_time(args.start), parse_time(args.end)
    with _client() as c:
        chunks = c.export(args.format, start, end, args.tenant)
        if not args.output or args.output == "-":
            _copy(chunks, sys.stdout.buffer)
            return 0
        # Written beside the target and renamed at the end, so a failed export never leaves a
        # truncated file that looks complete.
        target = Path(args.output)
        partial = target.with_name(target.name + ".partial")
        try:
            with partial.open("wb") as out:
                _copy(chunks, out)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return 0


def usage_summary(args: argparse.Namespace) -> int:
    start, end = parse_time(args.start), parse_time(args.end)
    with _client() as c:
        rows = c.summarize(start, end, args.tenant)
    if args.json:
        fields = [f.name for f in rows[0].DESCRIPTOR.fields] if rows else []
        print(json.dumps([{f: getattr(r, f) for f in fields} for r in rows], indent=2))
        return 0
    header = ["tenant_id", "day", "base_model", "adapter_id", "requests", "input", "cached", "output", "usd"]
    table = [header] + [
        [
            r.tenant_id,
            r.day,
            r.base_model,
            r.adapter_id or "-",
            str(r.requests),
            str(r.input_tokens),
            str(r.cached_input_tokens),
            str(r.output_tokens),
            f"{r.amount_usd:.6f}",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def add_commands(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    cmd: Callable[
        [argparse._SubParsersAction[argparse.ArgumentParser], str, Callable[[argparse.Namespace], int], str],
        argparse.ArgumentParser,
    ],
) -> None:
    """The `usage` group's commands, added with main's `cmd` helper."""
    for name, fn, help_text in (
        ("export", usage_export, "stream the ledger for a time range (CSV, JSON lines or CloudEvents)"),
        ("summary", usage_summary, "totals per tenant, day, base model and adapter"),
    ):
        p = cmd(group, name, fn, help_text)
        p.add_argument(
            "--from", dest="start", required=True, help="ISO 8601 start (inclusive); UTC if no offset"
        )
        p.add_argument("--to", dest="end", required=True, help="ISO 8601 end, exclusive (UTC by default)")
        p.add_argument("--tenant", default="", help="only this tenant (id or name)")
        if name == "export":
            p.add_argument("--format", choices=sorted(FORMATS), default="csv")
            p.add_argument("--output", "-o", default="", help="file to write (default: stdout)")
