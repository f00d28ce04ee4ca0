"""Object storage for adapter files: a local directory or an S3 bucket, behind one small interface.

Blocking calls (boto3, file copies); async callers run them in a thread. Names are relative,
'/'-separated keys under the store's root, e.g. "<digest hex>/adapter_config.json".
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from services.common.adapter_errors import NotFound, TooLarge, UriNotAllowed

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

_CHUNK = 1 << 20


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class ObjectStore(Protocol):
    def download(
        self, name: str, dest: Path, *, max_bytes: int, on_chunk: Callable[[bytes], None] | None = None
    ) -> int:
        """Stream `name` into `dest`; returns its size. TooLarge past max_bytes (dest removed).

        `on_chunk` sees every chunk as it is written (e.g. to hash while downloading)."""
        ...

    def read(
        self, name: str, *, max_bytes: int, on_chunk: Callable[[memoryview], None] | None = None
    ) -> bytearray:
        """`name`'s bytes in memory; the same limits and errors as `download`."""
        ...

    def read_head(self, name: str, length: int) -> tuple[bytes, int]:
        """At most the first `length` bytes of `name` (one ranged read), and its whole size."""
        ...

    def upload(self, name: str, src: Path) -> None: ...

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None:
        """Remove `name`; a missing object is not an error."""
        ...

    def uri_for(self, name: str) -> str: ...


def open_store(uri: str, s3: S3Client | None = None) -> ObjectStore:
    """'file:///abs/dir' or 's3://bucket/prefix' -> a store rooted there (S3 through `s3` if given;
    boto3 clients are thread-safe, creating them from the default session is not)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return FileStore(_file_uri_path(uri))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise UriNotAllowed(f"{uri!r} names no bucket; use s3://bucket/prefix.")
        return S3Store(parsed.netloc, parsed.path.strip("/"), client=s3)
    raise UriNotAllowed(f"{uri!r} is not a supported location; use s3://bucket/prefix or file:///abs/dir.")


def file_uri_path(uri: str) -> Path:
    """file:///abs/dir -> /abs/dir; anything else is UriNotAllowed."""
    return _file_uri_path(uri)


def _file_uri_path(uri: str) -> Path:
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise UriNotAllowed(f"{uri!r} is not an absolute file URI; write it as file:///abs/dir.")
    return Path(urllib.parse.unquote(parsed.path))


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{name!r} is not a relative object name")
    return name


def _copy_limited(
    src: _Readable,
    dest: Path,
    *,
    max_bytes: int,
    label: str,
    on_chunk: Callable[[bytes], None] | None = None,
) -> int:
    """Copy in chunks, stopping (and removing dest) as soon as more than max_bytes arrived."""
    total = 0
    try:
        with dest.open("wb") as out:
            while chunk := src.read(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise TooLarge(f"{label} is larger than the limit of {max_bytes} bytes.", limit=max_bytes)
                out.write(chunk)
                if on_chunk is not None:
                    on_chunk(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return total


def _read_sized(
    readinto: Callable[[Any], int],  # typeshed and botocore's stubs disagree on the buffer type
    size: int,
    *,
    max_bytes: int,
    label: str,
    on_chunk: Callable[[memoryview], None] | None,
) -> bytearray:
    """Exactly `size` bytes into one buffer allocated up front (no chunk list, no join copy)."""
    if size > max_bytes:
        raise TooLarge(f"{label} is {size} bytes, over the limit of {max_bytes} bytes.", limit=max_bytes)
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        n = readinto(view[pos : pos + _CHUNK])
        if not n:
            raise OSError(f"{label} ended after {pos} of its {size} bytes; it changed while being read")
        if on_chunk is not None:
            on_chunk(view[pos : pos + n])
        pos += n
    return buf


class FileStore:
    """A directory; writes land under a temporary name and are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / _check_name(name)

    def _open(self, name: str) -> io.BufferedReader:
        try:
            return self._path(name).open("rb")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{self.uri_for(name)} does not exist.") from None
        except IsADirectoryError:
            raise NotFound(f"{self.uri_for(name)} is a directory, not a file.") from None

    def download(
        self, name: str, dest: Path, *, max_bytes: int, on_chunk: Callable[[bytes], None] | None = None
    ) -> int:
        with self._open(name) as src:
            return _copy_limited(src, dest, max_bytes=max_bytes, label=self.uri_for(name), on_chunk=on_chunk)

    def read(
        self, name: str, *, max_bytes: int, on_chunk: Callable[[memoryview], None] | None = None
    ) -> bytearray:
        with self._open(name) as src:
            size = os.fstat(src.fileno()).st_size
            return _read_sized(
                src.readinto, size, max_bytes=max_bytes, label=self.uri_for(name), on_chunk=on_chunk
            )

    def read_head(self, name: str, length: int) -> tuple[bytes, int]:
        with self._open(name) as src:
            return src.read(length), os.fstat(src.fileno()).st_size

    def upload(self, name: str, src: Path) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
                shutil.copyfileobj(inp, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete(self, name: str) -> None:
        path = self._path(name)
        path.unlink(missing_ok=True)
        # Drop directories the object leaves empty, so a deleted adapter leaves no trace.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def uri_for(self, name: str) -> str:
        return (self.root / name).as_uri() if name else self.root.as_uri()


def s3_client(config: BotoConfig | None = None) -> S3Client:
    """boto3 reads AWS_ENDPOINT_URL and credentials itself; only the region gets a default."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", region_name=region, config=config)


class S3Store:
    def __init__(self, bucket: str, prefix: str, client: S3Client | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client or s3_client()

    def _key(self, name: str) -> str:
        _check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def download(
        self, name: str, dest: Path, *, max_bytes: int, on_chunk: Callable[[bytes], None] | None = None
    ) -> int:
        body, _ = self._get(name, max_bytes)
        try:
            return _copy_limited(body, dest, max_bytes=max_bytes, label=self.uri_for(name), on_chunk=on_chunk)
        finally:
            body.close()

    def read(
        self, name: str, *, max_bytes: int, on_chunk: Callable[[memoryview], None] | None = None
    ) -> bytearray:
        body, size = self._get(name, max_bytes)
        try:
            return _read_sized(
                body.readinto, size, max_bytes=max_bytes, label=self.uri_for(name), on_chunk=on_chunk
            )
        finally:
            body.close()

    def read_head(self, name: str, length: int) -> tuple[bytes, int]:
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._key(name), Range=f"bytes=0-{max(length, 1) - 1}"
            )
        except ClientError as exc:
            if _is_missing(exc):
                raise NotFound(f"{self.uri_for(name)} does not exist.") from None
            if exc.response.get("Error", {}).get("Code", "") == "InvalidRange":
                return b"", 0  # an empty object has no first byte to range over
            raise
        body = response["Body"]
        try:
            head = body.read(length)  # the server sent at most `length` bytes
        finally:
            body.close()
        # "bytes 0-N/TOTAL"; a server that ignores Range answers 200 with the whole length.
        total = response.get("ContentRange", "").rpartition("/")[2]
        return head[:length], int(total) if total.isdigit() else int(response.get("ContentLength", 0))

    def _get(self, name: str, max_bytes: int) -> tuple[StreamingBody, int]:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if _is_missing(exc):
                raise NotFound(f"{self.uri_for(name)} does not exist.") from None
            raise
        body = response["Body"]
        if response.get("ContentLength", 0) > max_bytes:
            body.close()
            raise TooLarge(
                f"{self.uri_for(name)} is {response['ContentLength']} bytes, over the limit of "
                f"{max_bytes} bytes.",
                limit=max_bytes,
            )
        return body, int(response.get("ContentLength", 0))

    def upload(self, name: str, src: Path) -> None:
        # S3 makes an object visible only once its upload completes, so this is atomic too.
        self._client.upload_file(str(src), self.bucket, self._key(name))

    def exists(self, name: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    def delete(self, name: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def uri_for(self, name: str) -> str:
        key = self._key(name) if name else self.prefix
        return f"s3://{self.bucket}/{key}"


def _is_missing(exc: ClientError) -> bool:
    code = exc.response.get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


@dataclass(frozen=True)
class AllowedSources:
    """The one allow-list for where adapter bytes may be read from: buckets and local directories.

    The registry checks a `--uri` against it before staging; a worker checks every AdapterRef's uri
    before fetching, so a caller that names another bucket or a file elsewhere gets nothing read.
    """

    buckets: tuple[str, ...]
    file_roots: tuple[str, ...]

    def check(self, uri: str, *, reader: str = "registry") -> None:
        """UriNotAllowed with a sentence when `uri` is outside the allow-list."""
        check_source_uri(uri, allowed_buckets=self.buckets, allowed_file_roots=self.file_roots, reader=reader)


def check_source_uri(
    uri: str,
    *,
    allowed_buckets: Iterable[str],
    allowed_file_roots: Iterable[str | Path],
    reader: str = "registry",
) -> None:
    """Refuse a source location outside the allow-lists; `reader` names who refuses, for the sentence."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "s3":
        buckets = tuple(allowed_buckets)
        if parsed.netloc not in buckets:
            allowed = ", ".join(buckets) if buckets else "none are configured"
            raise UriNotAllowed(
                f"bucket {parsed.netloc!r} is not one this {reader} reads from (allowed: {allowed}); "
                f"copy the adapter into an allowed bucket or add it to LORAPLEX_ALLOWED_BUCKETS."
            )
        return
    if parsed.scheme == "file":
        _check_file_source(uri, tuple(Path(r) for r in allowed_file_roots), reader)
        return
    raise UriNotAllowed(f"{uri!r} is not a supported location; use s3://bucket/prefix or file:///abs/dir.")


def _check_file_source(uri: str, roots: tuple[Path, ...], reader: str) -> None:
    if not roots:
        raise UriNotAllowed(
            f"{uri} is a local path but this {reader} reads no local directories; upload the files "
            f"instead, or set LORAPLEX_ALLOWED_FILE_ROOTS."
        )
    resolved_roots = [r.resolve() for r in roots]
    directory = _file_uri_path(uri)
    # resolve() follows symlinks and collapses '..', so what is checked is what will be read.
    targets = [directory.resolve()]
    if directory.is_dir():
        targets += [entry.resolve() for entry in directory.iterdir() if entry.is_symlink()]
    for target in targets:
        if not any(target.is_relative_to(root) for root in resolved_roots):
            raise UriNotAllowed(
                f"{uri} leads to {target}, which is outside the directories this {reader} may read "
                f"({', '.join(str(r) for r in resolved_roots)})."
            )
