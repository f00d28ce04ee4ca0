"""Export encodings: what CSV, JSON lines and CloudEvents consumers parse back, and line-aligned chunks."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from typing import Any

import pytest

from services.registry.usage_export import (
    CHUNK_BYTES,
    EXPORT_COLUMNS,
    ExportFormat,
    ExportRow,
    LineChunker,
    csv_last_key,
    encode_rows,
    header,
)


def row(i: int = 0, **changes: Any) -> ExportRow:
    base = ExportRow(
        request_id=f"req-{i:06d}",
        tenant_id="6f1c1d55-8c4b-4c53-9d1e-2b7f3f1f0a01",
        api_key_id="0b7e1c0a-58a4-4c1f-8d2e-9a5c3e1b2d44",
        base_model="smollm2-135m-instruct",
        adapter_id="2c9d6a4e-3f1b-4e8a-b7c5-1d2e3f4a5b6c",
        adapter_version=2,
        input_tokens=100 + i,
        cached_input_tokens=i % 7,
        output_tokens=20 + 3 * i,
        finish_reason="eos",
        ttft_ms=12.5 + i,
        duration_ms=0.1 + i,
        worker_id="worker-a",
        cold_start=i % 2 == 0,
        started_at="2031-03-01T10:00:00.000000Z",
        finished_at=f"2031-03-01T10:00:{i % 60:02d}.250000Z",
        amount_usd="0.000027",
    )
    return base._replace(**changes)


BARE = row(1, api_key_id=None, adapter_id=None, adapter_version=None, worker_id=None, amount_usd=None)
# Every character a CSV or JSON writer must quote or escape, in every free-text field.
AWKWARD = row(
    2,
    request_id='id, with "quotes" \\ and ünïcode',
    base_model="model,name",
    finish_reason='say "stop"',
    worker_id="worker\\b",
)


@pytest.mark.parametrize("rows", [[row(i) for i in range(50)], [BARE, row(3)], [row(4), AWKWARD, BARE]])
def test_json_lines_parse_back_to_the_same_rows(rows: list[ExportRow]) -> None:
    lines = encode_rows(rows, ExportFormat.JSONL).decode().split("\n")
    assert lines[-1] == ""
    assert [ExportRow(**json.loads(line)) for line in lines[:-1]] == rows


@pytest.mark.parametrize("rows", [[row(i) for i in range(50)], [row(4), AWKWARD, BARE]])
def test_cloudevents_are_structured_events_keyed_by_tenant_and_request_id(rows: list[ExportRow]) -> None:
    events = [json.loads(x) for x in encode_rows(rows, ExportFormat.CLOUDEVENTS).decode().splitlines()]
    assert len(events) == len(rows)
    for event, r in zip(events, rows, strict=True):
        assert event == {
            "specversion": "1.0",
            "type": "loraplex.usage.v1",
            "source": "loraplex/registry",
            "id": f"{r.tenant_id}/{r.request_id}",
            "time": r.finished_at,
            "subject": r.tenant_id,
            "datacontenttype": "application/json",
            "data": r._asdict(),
        }


def test_amounts_stay_exact_decimal_strings_in_json_formats() -> None:
    # 0.1 + 0.2 style amounts must not pick up binary floating-point error on the way out.
    rows = [row(i, amount_usd=a) for i, a in enumerate(["0.1", "0.2", "0.000000000000001"])]
    expected = Decimal("0.300000000000001")
    jsonl = encode_rows(rows, ExportFormat.JSONL).decode().splitlines()
    assert sum(Decimal(json.loads(x)["amount_usd"]) for x in jsonl) == expected
    ce = encode_rows(rows, ExportFormat.CLOUDEVENTS).decode().splitlines()
    assert sum(Decimal(json.loads(x)["data"]["amount_usd"]) for x in ce) == expected


def test_only_csv_has_a_header() -> None:
    assert header(ExportFormat.CSV) == (",".join(EXPORT_COLUMNS) + "\n").encode()
    assert header(ExportFormat.JSONL) == header(ExportFormat.CLOUDEVENTS) == b""


def test_chunks_end_at_line_ends_and_lose_nothing() -> None:
    lines = [f"{i:05d}-{'x' * (i % 97)}\n".encode() for i in range(5000)]
    chunker = LineChunker(target=1000)
    chunks = [c for start in range(0, 5000, 333) for c in chunker.feed(b"".join(lines[start : start + 333]))]
    chunks += chunker.flush()
    assert b"".join(chunks) == b"".join(lines)
    assert all(c.endswith(b"\n") for c in chunks)
    assert all(len(c) <= 1000 for c in chunks)
    # Chunks are filled: only the last may be much shorter than the target.
    assert all(len(c) > 1000 - 200 for c in chunks[:-1])


def test_a_line_longer_than_the_target_is_one_chunk_of_its_own() -> None:
    chunker = LineChunker(target=10)
    long = b"y" * 35 + b"\n"
    chunks = chunker.feed(b"ab\n" + long + b"cd\n") + chunker.flush()
    assert chunks == [b"ab\n", long, b"cd\n"]


def test_a_whole_export_streams_in_chunks_of_about_64_kib() -> None:
    pages = [[row(i) for i in range(p * 500, p * 500 + 500)] for p in range(6)]
    chunker = LineChunker()
    chunks = [c for page in pages for c in chunker.feed(encode_rows(page, ExportFormat.CLOUDEVENTS))]
    chunks += chunker.flush()
    assert len(chunks) > 10
    assert all(CHUNK_BYTES - 2048 < len(c) <= CHUNK_BYTES for c in chunks[:-1])
    events = [json.loads(line) for c in chunks for line in c.splitlines()]
    assert [e["id"] for e in events] == [f"{r.tenant_id}/{r.request_id}" for page in pages for r in page]


def _csv_line(r: ExportRow) -> bytes:
    """A line as COPY ... CSV writes it (RFC 4180 quoting)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(r)
    return buf.getvalue().encode()


@pytest.mark.parametrize("last", [row(9), AWKWARD, BARE])
def test_the_next_page_starts_after_the_last_csv_line(last: ExportRow) -> None:
    page = _csv_line(row(1)) + _csv_line(row(2)) + _csv_line(last)
    assert csv_last_key(page) == (last.finished_at, last.tenant_id, last.request_id)
    assert csv_last_key(_csv_line(last)) == (last.finished_at, last.tenant_id, last.request_id)


def test_csv_rows_are_left_to_the_database() -> None:
    with pytest.raises(ValueError, match="database"):
        encode_rows([row()], ExportFormat.CSV)
