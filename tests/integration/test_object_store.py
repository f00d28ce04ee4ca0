"""File and S3 (moto server) object stores behave alike; source URIs are confined to allow-lists."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from services.common.adapter_errors import NotFound, TooLarge, UriNotAllowed
from services.common.object_store import FileStore, ObjectStore, S3Store, check_source_uri, open_store

StoreFactory = Callable[[], ObjectStore]


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/some/prefix")


def payload(tmp_path: Path, size: int, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def test_upload_download_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    src = payload(tmp_path, 3 << 20)
    assert not store.exists("ab/file.bin")
    store.upload("ab/file.bin", src)
    assert store.exists("ab/file.bin")
    size = store.download("ab/file.bin", tmp_path / "out.bin", max_bytes=4 << 20)
    assert size == 3 << 20
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()


def test_download_past_the_limit_raises_and_removes_the_partial_file(
    store: ObjectStore, tmp_path: Path
) -> None:
    store.upload("big.bin", payload(tmp_path, (2 << 20) + 1))
    dest = tmp_path / "out.bin"
    with pytest.raises(TooLarge, match="limit of 2097152 bytes") as info:
        store.download("big.bin", dest, max_bytes=2 << 20)
    assert info.value.limit == 2 << 20
    assert not dest.exists()


def test_download_of_a_missing_object_is_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        store.download("nope/adapter_config.json", tmp_path / "out", max_bytes=100)
    assert not (tmp_path / "out").exists()


def test_delete_is_idempotent(store: ObjectStore, tmp_path: Path) -> None:
    store.upload("x/y.bin", payload(tmp_path, 10))
    store.delete("x/y.bin")
    store.delete("x/y.bin")
    assert not store.exists("x/y.bin")


def test_object_names_cannot_escape_the_store(store: ObjectStore, tmp_path: Path) -> None:
    for name in ("../outside", "/abs", "a//b", ""):
        with pytest.raises(ValueError):
            store.upload(name, payload(tmp_path, 1))


def test_uri_for_names_the_object(tmp_path: Path, s3_bucket: str) -> None:
    assert open_store((tmp_path / "s").as_uri()).uri_for("d/f") == (tmp_path / "s" / "d" / "f").as_uri()
    assert open_store(f"s3://{s3_bucket}/pre/").uri_for("d/f") == f"s3://{s3_bucket}/pre/d/f"
    assert open_store(f"s3://{s3_bucket}").uri_for("d/f") == f"s3://{s3_bucket}/d/f"


def test_s3_store_writes_under_its_prefix(s3_bucket: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{s3_bucket}/adapters")
    assert isinstance(store, S3Store)
    store.upload("abc/adapter_config.json", payload(tmp_path, 5))
    client = boto3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys == ["adapters/abc/adapter_config.json"]


def test_file_store_overwrites_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    store.upload("d/f", payload(tmp_path, 100, "one"))
    store.upload("d/f", payload(tmp_path, 50, "two"))
    assert (tmp_path / "store" / "d" / "f").read_bytes() == (tmp_path / "two").read_bytes()
    assert [p.name for p in (tmp_path / "store" / "d").iterdir()] == ["f"]


def test_file_store_delete_removes_emptied_directories(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    store.upload("d/f", payload(tmp_path, 1))
    store.upload("d/g", payload(tmp_path, 1))
    store.delete("d/f")
    assert (tmp_path / "store" / "d").is_dir()
    store.delete("d/g")
    assert list((tmp_path / "store").iterdir()) == []


def test_unsupported_store_schemes_are_refused() -> None:
    for uri in ("http://example.com/x", "gs://bucket/x", "relative/dir", "s3:///no-bucket"):
        with pytest.raises(UriNotAllowed):
            open_store(uri)


# -- source URI allow-lists ---------------------------------------------------------------------


def allow(uri: str, roots: tuple[Path, ...] = (), buckets: tuple[str, ...] = ()) -> None:
    check_source_uri(uri, allowed_buckets=buckets, allowed_file_roots=roots)


def test_allowed_bucket_and_file_root_pass(tmp_path: Path) -> None:
    (tmp_path / "root" / "adapter").mkdir(parents=True)
    allow("s3://good/prefix/adapter", buckets=("good",))
    allow((tmp_path / "root" / "adapter").as_uri(), roots=(tmp_path / "root",))


def test_bucket_not_in_the_allow_list_is_refused() -> None:
    with pytest.raises(UriNotAllowed, match="bucket 'evil' is not one this registry reads from") as info:
        allow("s3://evil/x", buckets=("good",))
    assert "LORAPLEX_ALLOWED_BUCKETS" in str(info.value)


def test_dotdot_cannot_escape_an_allowed_root(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").mkdir()
    uri = "file://" + str(tmp_path / "root") + "/../secret"
    with pytest.raises(UriNotAllowed, match="outside the directories this registry may read"):
        allow(uri, roots=(tmp_path / "root",))


def test_symlink_out_of_an_allowed_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(UriNotAllowed, match="outside"):
        allow((tmp_path / "root" / "link").as_uri(), roots=(tmp_path / "root",))


def test_symlinked_file_inside_an_allowed_directory_is_refused(tmp_path: Path) -> None:
    adapter = tmp_path / "root" / "adapter"
    adapter.mkdir(parents=True)
    (tmp_path / "passwd").write_text("secret")
    (adapter / "adapter_config.json").symlink_to(tmp_path / "passwd")
    with pytest.raises(UriNotAllowed, match="passwd"):
        allow(adapter.as_uri(), roots=(tmp_path / "root",))


def test_root_prefix_is_not_a_parent(tmp_path: Path) -> None:
    (tmp_path / "root-evil").mkdir()
    with pytest.raises(UriNotAllowed):
        allow((tmp_path / "root-evil").as_uri(), roots=(tmp_path / "root",))


def test_file_uris_are_refused_without_configured_roots(tmp_path: Path) -> None:
    with pytest.raises(UriNotAllowed, match="LORAPLEX_ALLOWED_FILE_ROOTS"):
        allow(tmp_path.as_uri())


@pytest.mark.parametrize("uri", ["http://host/adapter", "gs://b/a", "file://otherhost/etc", "/plain/path"])
def test_other_schemes_and_hosts_are_refused(uri: str, tmp_path: Path) -> None:
    with pytest.raises(UriNotAllowed):
        allow(uri, roots=(Path("/"),), buckets=("b",))
