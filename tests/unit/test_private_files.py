"""Secret and billing files are created 0600; a secret file others can read is refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from services.common.private_files import InsecureFileError, read_secret, secret_file, write_private
from services.router.inflight import InflightJournal
from services.router.spool import Spool


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secret_file_is_created_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "token"
    token = secret_file(path)
    assert _mode(path) == 0o600
    assert len(token) >= 32
    assert secret_file(path) == token  # kept, not regenerated


def test_secret_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_private(path, b"s3cret-token-value")
    path.chmod(0o644)
    with pytest.raises(InsecureFileError, match=r"mode 0644.*chmod 600"):
        read_secret(path)
    with pytest.raises(InsecureFileError):
        secret_file(path)


def test_exclusive_write_never_replaces_an_existing_secret(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_private(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_private(path, b"second", exclusive=True)
    assert read_secret(path) == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["token"]  # no temporary file left behind


def test_spool_segments_and_checkpoints_are_private(tmp_path: Path) -> None:
    from loraplex.v1 import usage_pb2

    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    spool.append_many([b"record"])
    spool.quarantine([b"bad"])
    journal = InflightJournal(tmp_path / "inflight")
    journal.write(usage_pb2.UsageRecord(request_id="r1"))
    spool.close()
    files = [p for d in ("spool", "inflight") for p in (tmp_path / d).iterdir()]
    assert files
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    assert _mode(tmp_path / "spool") == 0o700
