"""Encoding ledger rows for export: JSON lines, CloudEvents 1.0, the CSV header, line-aligned chunks.

Pure: no database, no gRPC. CSV rows are written by PostgreSQL's COPY (see usage_ledger) in the
same columns and spellings as the JSON formats here.

Rows arrive export-ready from the ledger query (`EXPORT_COLUMNS` order): ids as text, timestamps
as RFC 3339 strings, and `amount_usd` as an exact decimal string. Amounts stay strings in every
format because a float would round them; OpenMeter, Lago and Stripe all accept numeric strings,
and the integer token counts are there for meters that price tokens themselves.

Chunks handed to the transport split only at line ends (`LineChunker`), so a consumer can parse
each chunk on its own.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, NamedTuple

CLOUDEVENT_TYPE = "loraplex.usage.v1"
CLOUDEVENT_SOURCE = "loraplex/registry"
CHUNK_BYTES = 64 << 10


class ExportFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"
    CLOUDEVENTS = "cloudevents"


class ExportRow(NamedTuple):
    """One ledger record as exported. The ledger query yields rows in exactly this column order."""

    request_id: str
    tenant_id: str
    api_key_id: str | None
    base_model: str
    adapter_id: str | None
    adapter_version: int | None
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    finish_reason: str
    ttft_ms: float
    duration_ms: float
    worker_id: str | None
    cold_start: bool
    started_at: str  # RFC 3339, UTC
    finished_at: str  # RFC 3339, UTC
    # exact decimal, from the prices stored with the record (in force when it finished); None when
    # no price was known
    amount_usd: str | None


EXPORT_COLUMNS: tuple[str, ...] = ExportRow._fields
_FINISHED_AT = EXPORT_COLUMNS.index("finished_at")


def header(fmt: ExportFormat) -> bytes:
    """What the export starts with, before any row (the CSV header; nothing for JSON lines)."""
    if fmt is ExportFormat.CSV:
        return (",".join(EXPORT_COLUMNS) + "\n").encode()
    return b""


def encode_rows(rows: Sequence[Sequence[Any]], fmt: ExportFormat) -> bytes:
    """Rows (in EXPORT_COLUMNS order) as JSON lines or CloudEvents, each line ending in "\\n".

    CSV is not encoded here: PostgreSQL's COPY writes it (usage_ledger.export_csv_pages).
    """
    if fmt is ExportFormat.JSONL:
        return _jsonl(rows)
    if fmt is ExportFormat.CLOUDEVENTS:
        return _cloudevents(rows)
    raise ValueError(f"{fmt} rows are written by the database, not encoded here")


def csv_last_key(page: bytes) -> tuple[str, str, str]:
    """(finished_at, tenant_id, request_id) of the last line of a CSV page: where the next page starts.

    Lines are records: the ledger's text fields are printable (checked at ingest), so no quoted
    field holds a line break.
    """
    end = len(page) - 1 if page.endswith(b"\n") else len(page)
    line = page[page.rfind(b"\n", 0, end) + 1 : end].decode()
    fields = next(csv.reader([line]))
    return fields[_FINISHED_AT], fields[1], fields[0]


def _plain_text(rows: Sequence[Sequence[Any]], specials: str) -> bool:
    """True when the page's free-text fields are printable and hold none of `specials`.

    Ids, numbers and timestamps never need quoting or escaping; only these fields can.
    """
    blob = "|".join([f"{r[0]}|{r[3]}|{r[9]}|{r[12] or ''}" for r in rows])
    return blob.isprintable() and not any(ch in blob for ch in specials)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


def _record(r: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(EXPORT_COLUMNS, r, strict=True))


def _objects(rows: Sequence[Sequence[Any]]) -> list[str]:
    """Each row as one compact JSON object (the JSON lines record, and the CloudEvents `data`)."""
    # Floats need no check: repr and json agree on every finite float, and the ledger holds no others.
    if _plain_text(rows, '"\\'):
        return _objects_plain(rows)
    return [_dumps(_record(r)) for r in rows]


def _objects_plain(rows: Sequence[Sequence[Any]]) -> list[str]:
    # As _plain_text guarantees, no string needs escaping, so each object is one f-string (about three
    # times faster than building dicts for json). Must equal what json would write.
    def s(v: str | None) -> str:
        return "null" if v is None else f'"{v}"'

    return [
        f'{{"request_id":"{r[0]}","tenant_id":"{r[1]}","api_key_id":{s(r[2])},"base_model":"{r[3]}",'
        f'"adapter_id":{s(r[4])},"adapter_version":{"null" if r[5] is None else r[5]},'
        f'"input_tokens":{r[6]},"cached_input_tokens":{r[7]},"output_tokens":{r[8]},'
        f'"finish_reason":"{r[9]}","ttft_ms":{r[10]!r},"duration_ms":{r[11]!r},"worker_id":{s(r[12])},'
        f'"cold_start":{"true" if r[13] else "false"},"started_at":"{r[14]}","finished_at":"{r[15]}",'
        f'"amount_usd":{s(r[16])}}}'
        for r in rows
    ]


def _jsonl(rows: Sequence[Sequence[Any]]) -> bytes:
    return "".join([o + "\n" for o in _objects(rows)]).encode()


def cloudevent(r: Sequence[Any]) -> dict[str, Any]:
    """The CloudEvents 1.0 structured-mode event of one record: id = "<tenant id>/<request id>"
    (request ids are unique only per tenant, and source + id must be unique), subject = tenant."""
    return {
        "specversion": "1.0",
        "type": CLOUDEVENT_TYPE,
        "source": CLOUDEVENT_SOURCE,
        "id": f"{r[1]}/{r[0]}",
        "time": r[15],
        "subject": r[1],
        "datacontenttype": "application/json",
        "data": _record(r),
    }


_CE_HEAD = f'{{"specversion":"1.0","type":"{CLOUDEVENT_TYPE}","source":"{CLOUDEVENT_SOURCE}",'


def _cloudevents(rows: Sequence[Sequence[Any]]) -> bytes:
    # The envelope's strings are the record's own (already escaped inside `o`), so they are dumped
    # on their own only when the page needed escaping.
    plain = _plain_text(rows, '"\\')
    return "".join(
        [
            f'{_CE_HEAD}"id":{_q(f"{r[1]}/{r[0]}", plain)},"time":"{r[15]}","subject":"{r[1]}",'
            f'"datacontenttype":"application/json","data":{o}}}\n'
            for r, o in zip(rows, _objects(rows), strict=True)
        ]
    ).encode()


def _q(v: str, plain: bool) -> str:
    return f'"{v}"' if plain else _dumps(v)


class LineChunker:
    """Cuts a byte stream of whole lines into chunks of about `target` bytes, each ending at a line end.

    A single line longer than `target` becomes one chunk of its own rather than being split.
    """

    def __init__(self, target: int = CHUNK_BYTES) -> None:
        self._target = target
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Chunks that are complete once `data` (whole lines) is appended; the rest waits for more."""
        buf = self._pending + data if self._pending else data
        chunks: list[bytes] = []
        pos, n, target = 0, len(buf), self._target
        while n - pos >= target:
            cut = buf.rfind(b"\n", pos, pos + target)
            if cut < 0:
                cut = buf.find(b"\n", pos + target)
                if cut < 0:
                    break
            chunks.append(buf[pos : cut + 1])
            pos = cut + 1
        self._pending = buf[pos:]
        return chunks

    def flush(self) -> list[bytes]:
        """What is left at the end of the stream (at most one chunk)."""
        rest, self._pending = self._pending, b""
        return [rest] if rest else []
