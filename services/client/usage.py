"""A small synchronous client for UsageService, used by the CLI, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import usage_pb2, usage_pb2_grpc
from services.common.tls import TlsFiles, sync_channel

FORMATS = {
    "csv": usage_pb2.EXPORT_FORMAT_CSV,
    "jsonl": usage_pb2.EXPORT_FORMAT_JSONL,
    "cloudevents": usage_pb2.EXPORT_FORMAT_CLOUDEVENTS,
}


def timestamp(at: datetime) -> Timestamp:
    """A tz-aware datetime as a protobuf Timestamp (naive datetimes are refused: they are ambiguous)."""
    if at.tzinfo is None:
        raise ValueError(f"{at.isoformat()} has no timezone; give one (e.g. +00:00 or Z)")
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


def _range(start: datetime | None, end: datetime | None) -> dict[str, Timestamp]:
    window = {}
    if start is not None:
        window["start"] = timestamp(start)
    if end is not None:
        window["end"] = timestamp(end)
    return window


class UsageClient:
    def __init__(
        self, target: str, token: str | None, *, tls: TlsFiles | None, timeout_s: float = 600.0
    ) -> None:
        """tls: the identity to present (the operator's for the CLI); None: a plaintext registry."""
        self._channel = sync_channel(target, tls)
        self._stub = usage_pb2_grpc.UsageServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> UsageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, records: Iterable[usage_pb2.UsageRecord]) -> usage_pb2.RecordUsageResponse:
        req = usage_pb2.RecordUsageRequest(records=list(records))
        return self._stub.RecordUsage(req, metadata=self._metadata, timeout=self._timeout)

    def lookup(self, tenant_id: str, request_ids: Iterable[str], window_s: int = 0) -> list[str]:
        """Which of a tenant's request ids the ledger holds, finished within window_s (0: ever)."""
        req = usage_pb2.LookupRequestsRequest(
            tenant_id=tenant_id, request_ids=list(request_ids), window_s=window_s
        )
        return list(self._stub.LookupRequests(req, metadata=self._metadata, timeout=self._timeout).found)

    def export(
        self,
        fmt: str,
        start: datetime | None = None,
        end: datetime | None = None,
        tenant: str = "",
    ) -> Iterator[bytes]:
        """The export's chunks as they arrive; each ends at a line end."""
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
        req = usage_pb2.ExportUsageRequest(tenant=tenant, format=FORMATS[fmt], **_range(start, end))
        for chunk in self._stub.ExportUsage(req, metadata=self._metadata, timeout=self._timeout):
            yield chunk.data

    def summarize(
        self, start: datetime | None = None, end: datetime | None = None, tenant: str = ""
    ) -> list[usage_pb2.UsageSummaryRow]:
        req = usage_pb2.SummarizeUsageRequest(tenant=tenant, **_range(start, end))
        return list(self._stub.SummarizeUsage(req, metadata=self._metadata, timeout=self._timeout).rows)
