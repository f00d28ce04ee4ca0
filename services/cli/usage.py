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

from loraplex.v1 import usage_pb2
from services.cli.admin import UsageError
from services.cli.format import money, table
from services.client.registry import RegistryClient
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


SUMMARY_HEADER = [
    "TENANT", "DAY", "BASE_MODEL", "ADAPTER", "REQUESTS", "INPUT", "CACHED", "OUTPUT", "USD",
]  # fmt: skip


def usage_summary(args: argparse.Namespace) -> int:
    start, end = parse_time(args.start), parse_time(args.end)
    with _client() as c:
        rows = c.summarize(start, end, args.tenant)
    names = _names(rows)
    records = [summary_record(r, names) for r in rows]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(
        table(
            SUMMARY_HEADER,
            [
                [
                    r["tenant"],
                    r["day"],
                    r["base_model"],
                    r["adapter"] or "-",
                    r["requests"],
                    r["input_tokens"],
                    r["cached_input_tokens"],
                    r["output_tokens"],
                    r["amount_usd"],
                ]
                for r in records
            ],
        )
    )
    return 0


def summary_record(row: usage_pb2.UsageSummaryRow, names: dict[str, str]) -> dict[str, object]:
    """One summary row for people and machines: names beside ids, money as a decimal string."""
    return {
        "tenant": names.get(row.tenant_id, row.tenant_id),
        "tenant_id": row.tenant_id,
        "day": row.day,
        "base_model": row.base_model,
        "adapter": names.get(row.adapter_id, row.adapter_id) if row.adapter_id else "",
        "adapter_id": row.adapter_id,
        "requests": row.requests,
        "input_tokens": row.input_tokens,
        "cached_input_tokens": row.cached_input_tokens,
        "output_tokens": row.output_tokens,
        # The exact ledger value when the registry sends it (older registries: the float).
        "amount_usd": money(row.amount_usd_decimal or row.amount_usd),
    }


def _names(rows: list[usage_pb2.UsageSummaryRow]) -> dict[str, str]:
    """Tenant id -> name and adapter id -> name@version, from the registry (admin list calls)."""
    if not rows:
        return {}
    settings = ClientSettings.from_env()
    with RegistryClient(settings.registry, settings.admin_token, tls=settings.registry_tls()) as c:
        names = {t.tenant_id: t.name for t in c.list_tenants()}
        wanted = {r.adapter_id for r in rows if r.adapter_id}
        if wanted:
            for tenant_id in {r.tenant_id for r in rows if r.adapter_id}:
                for a in c.list_adapters(tenant=tenant_id):
                    if a.ref.adapter_id in wanted:
                        names[a.ref.adapter_id] = f"{a.ref.name}@{a.ref.version}"
    return names


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
