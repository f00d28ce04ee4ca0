"""The intake pipeline end to end on real files, a file store and moto S3: good adapters are stored
once under their digest; every bad one is refused with a reason and leaves nothing in the store."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from services.common.adapter_errors import AdapterRejected, NotFound, TooLarge
from services.common.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_digest, digest_hex
from services.common.model_spec import BaseModelSpec
from services.common.object_store import FileStore, ObjectStore, open_store
from services.registry.intake import (
    AcceptedAdapter,
    StagedUpload,
    accept_staged,
    discard_stored,
    stage_from_uri,
)
from services.registry.validation import AdapterLimits
from tests.fixtures.tiny_peft import adapter_bytes, tiny_spec, write_adapter

LIMITS = AdapterLimits()


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_root: Path) -> ObjectStore:
    return open_store(store_root.as_uri())


def stored_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def bucket_keys(bucket: str) -> list[str]:
    return sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "mixed"])
def test_good_adapter_is_stored_under_its_digest(
    tmp_path: Path, store: ObjectStore, store_root: Path, kind: str
) -> None:
    source = write_adapter(kind, tmp_path / "src")
    staging = tmp_path / "staging"
    stage_from_uri(source.as_uri(), staging, max_bytes=LIMITS.max_bytes)
    accepted = accept_staged(staging, tiny_spec(), LIMITS, store)
    folder = digest_hex(accepted.digest)
    assert accepted.digest == adapter_digest(source)
    assert accepted.uri == (store_root / folder).as_uri()
    assert accepted.stored_new
    assert (
        accepted.validated.variant
        == {"lora": "LORA", "rslora": "RSLORA", "dora": "DORA", "mixed": "LORA"}[kind]
    )
    assert stored_files(store_root) == [folder, f"{folder}/{ADAPTER_CONFIG}", f"{folder}/{ADAPTER_WEIGHTS}"]
    for name, data in adapter_bytes(kind).items():
        assert (store_root / folder / name).read_bytes() == data
    assert accepted.size_bytes == sum(len(d) for d in adapter_bytes(kind).values())


def test_identical_bytes_are_stored_once(tmp_path: Path, store: ObjectStore, store_root: Path) -> None:
    first = accept_staged(write_adapter("lora", tmp_path / "a"), tiny_spec(), LIMITS, store)
    written = {p: p.stat().st_mtime_ns for p in store_root.rglob("*")}
    second = accept_staged(write_adapter("lora", tmp_path / "b"), tiny_spec(), LIMITS, store)
    assert (second.digest, second.uri, second.stored_new) == (first.digest, first.uri, False)
    assert {p: p.stat().st_mtime_ns for p in store_root.rglob("*")} == written


def test_one_changed_byte_is_a_different_adapter(
    tmp_path: Path, store: ObjectStore, store_root: Path
) -> None:
    first = accept_staged(write_adapter("lora", tmp_path / "a"), tiny_spec(), LIMITS, store)
    changed = write_adapter("lora", tmp_path / "b")
    config = json.loads((changed / ADAPTER_CONFIG).read_text())
    (changed / ADAPTER_CONFIG).write_text(json.dumps({**config, "revision": "x"}))
    second = accept_staged(changed, tiny_spec(), LIMITS, store)
    assert second.digest != first.digest and second.stored_new
    assert len([p for p in store_root.iterdir() if p.is_dir()]) == 2


def test_discard_stored_removes_what_accept_stored(
    tmp_path: Path, store: ObjectStore, store_root: Path
) -> None:
    accepted = accept_staged(write_adapter("dora", tmp_path / "a"), tiny_spec(), LIMITS, store)
    discard_stored(store, accepted)
    assert stored_files(store_root) == []


def test_discard_after_dedupe_keeps_the_earlier_copy(
    tmp_path: Path, store: ObjectStore, store_root: Path
) -> None:
    accept_staged(write_adapter("lora", tmp_path / "a"), tiny_spec(), LIMITS, store)
    before = stored_files(store_root)
    duplicate = accept_staged(write_adapter("lora", tmp_path / "b"), tiny_spec(), LIMITS, store)
    discard_stored(store, duplicate)
    assert stored_files(store_root) == before


# -- refusals: each one leaves the store empty ---------------------------------------------------


def _pickle_only(d: Path) -> None:
    (d / ADAPTER_WEIGHTS).rename(d / "adapter_model.bin")


def _corrupt_header(d: Path) -> None:
    data = bytearray((d / ADAPTER_WEIGHTS).read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"
    (d / ADAPTER_WEIGHTS).write_bytes(bytes(data))


def _oversized_header(d: Path) -> None:
    data = (d / ADAPTER_WEIGHTS).read_bytes()
    (d / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


def _truncate(d: Path) -> None:
    data = (d / ADAPTER_WEIGHTS).read_bytes()
    (d / ADAPTER_WEIGHTS).write_bytes(data[: len(data) - 100])


def _unknown_variant(d: Path) -> None:
    config = json.loads((d / ADAPTER_CONFIG).read_text())
    (d / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_hira": True}))


def _config_not_json(d: Path) -> None:
    (d / ADAPTER_CONFIG).write_text("{not json")


def _base_without_v_proj() -> BaseModelSpec:
    spec = tiny_spec()
    return BaseModelSpec(
        **{**spec.__dict__, "target_modules": spec.target_modules[:2] + spec.target_modules[3:]}
    )


def _base_with_wider_input() -> BaseModelSpec:
    spec = tiny_spec(name="wide-llama")
    modules = tuple(
        type(m)(m.name, m.path, 96, m.out_features) if m.name == "q_proj" else m for m in spec.target_modules
    )
    return BaseModelSpec(**{**spec.__dict__, "target_modules": modules})


def _keep(d: Path) -> None:
    return None


Refusal = tuple[str, Callable[[Path], None], Callable[[], BaseModelSpec], AdapterLimits, type[Exception], str]
REFUSALS: list[Refusal] = [
    ("corrupted header", _corrupt_header, tiny_spec, LIMITS, AdapterRejected, "not valid JSON"),
    ("oversized header", _oversized_header, tiny_spec, LIMITS, AdapterRejected, "over the limit"),
    ("truncated file", _truncate, tiny_spec, LIMITS, AdapterRejected, "truncated"),
    ("unknown variant", _unknown_variant, tiny_spec, LIMITS, AdapterRejected, "use_hira=True"),
    ("config not json", _config_not_json, tiny_spec, LIMITS, AdapterRejected, "not valid JSON"),
    ("module base lacks", _keep, _base_without_v_proj, LIMITS, AdapterRejected, "not a LoRA-targetable"),
    ("wrong shape", _keep, _base_with_wider_input, LIMITS, AdapterRejected, "takes 96 inputs"),
    ("rank over limit", _keep, tiny_spec, AdapterLimits(max_rank=2), AdapterRejected, "limit of 2"),
    ("over size limit", _keep, tiny_spec, AdapterLimits(max_bytes=1000), TooLarge, "limit of 1000 bytes"),
]


@pytest.mark.parametrize(
    ("corrupt", "base", "limits", "error", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_bad_adapter_is_refused_and_nothing_is_stored(
    tmp_path: Path,
    store: ObjectStore,
    store_root: Path,
    corrupt: Callable[[Path], None],
    base: Callable[[], BaseModelSpec],
    limits: AdapterLimits,
    error: type[Exception],
    message: str,
) -> None:
    staged = write_adapter("mixed", tmp_path / "staging")
    corrupt(staged)
    with pytest.raises(error, match=message):
        accept_staged(staged, base(), limits, store)
    assert stored_files(store_root) == []


def test_pickled_source_is_refused_with_how_to_fix(tmp_path: Path) -> None:
    source = write_adapter("lora", tmp_path / "src")
    _pickle_only(source)
    with pytest.raises(AdapterRejected, match=re.escape("adapter_model.bin is a pickle")) as info:
        stage_from_uri(source.as_uri(), tmp_path / "staging", max_bytes=LIMITS.max_bytes)
    assert "safe_serialization=True" in str(info.value)
    assert not (tmp_path / "staging").exists()


def test_source_without_adapter_files_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match=re.escape("has no adapter_model.safetensors")):
        stage_from_uri((tmp_path / "empty").as_uri(), tmp_path / "staging", max_bytes=LIMITS.max_bytes)
    (tmp_path / "empty" / ADAPTER_WEIGHTS).write_bytes(b"x")
    with pytest.raises(NotFound, match=re.escape("has no adapter_config.json")):
        stage_from_uri((tmp_path / "empty").as_uri(), tmp_path / "staging", max_bytes=LIMITS.max_bytes)


def test_source_over_the_size_limit_stops_streaming(tmp_path: Path) -> None:
    source = write_adapter("lora", tmp_path / "src")
    limit = (source / ADAPTER_CONFIG).stat().st_size + 100
    with pytest.raises(TooLarge, match=f"limit of {limit} bytes"):
        stage_from_uri(source.as_uri(), tmp_path / "staging", max_bytes=limit)
    assert not (tmp_path / "staging" / ADAPTER_WEIGHTS).exists()


def test_failed_upload_removes_the_objects_already_written(tmp_path: Path, store_root: Path) -> None:
    class ConfigUploadFails(FileStore):
        def upload(self, name: str, src: Path) -> None:
            if name.endswith(ADAPTER_CONFIG):
                raise OSError("disk full")
            super().upload(name, src)

    with pytest.raises(OSError, match="disk full"):
        accept_staged(
            write_adapter("lora", tmp_path / "a"), tiny_spec(), LIMITS, ConfigUploadFails(store_root)
        )
    assert stored_files(store_root) == []


# -- client-streamed uploads ---------------------------------------------------------------------


def stream(upload: StagedUpload, kind: str, chunk: int = 1000) -> None:
    for name, data in adapter_bytes(kind).items():
        for i in range(0, len(data), chunk):
            upload.add_chunk(name, data[i : i + chunk])


def test_streamed_upload_is_accepted_like_the_same_files(tmp_path: Path, store: ObjectStore) -> None:
    upload = StagedUpload(tmp_path / "staging", max_bytes=LIMITS.max_bytes)
    stream(upload, "dora")
    accepted = accept_staged(upload.finish(), tiny_spec(), LIMITS, store)
    assert accepted.digest == adapter_digest(write_adapter("dora", tmp_path / "ref"))
    assert accepted.validated.variant == "DORA"


@pytest.mark.parametrize("name", ["adapter_model.bin", "weights.pt", "optimizer.pth"])
def test_streamed_pickle_is_refused_by_name(tmp_path: Path, name: str) -> None:
    with (
        StagedUpload(tmp_path / "staging", max_bytes=1000) as upload,
        pytest.raises(AdapterRejected, match="safe_serialization"),
    ):
        upload.add_chunk(name, b"\x80\x04")


def test_streamed_unexpected_file_is_refused(tmp_path: Path) -> None:
    with (
        StagedUpload(tmp_path / "staging", max_bytes=1000) as upload,
        pytest.raises(
            AdapterRejected, match=re.escape("send only adapter_config.json and adapter_model.safetensors")
        ),
    ):
        upload.add_chunk("../../etc/passwd", b"x")
    assert list((tmp_path / "staging").iterdir()) == []


def test_streamed_upload_over_the_limit_stops_as_bytes_arrive(tmp_path: Path) -> None:
    upload = StagedUpload(tmp_path / "staging", max_bytes=5000)
    with pytest.raises(TooLarge, match="limit of 5000 bytes"):
        stream(upload, "lora", chunk=1000)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "staging").iterdir())
    assert on_disk <= 5000


def test_streamed_upload_missing_a_file_is_refused(tmp_path: Path) -> None:
    upload = StagedUpload(tmp_path / "staging", max_bytes=LIMITS.max_bytes)
    upload.add_chunk(ADAPTER_CONFIG, adapter_bytes("lora")[ADAPTER_CONFIG])
    with pytest.raises(AdapterRejected, match=re.escape("has no adapter_model.safetensors")):
        upload.finish()


# -- S3 -----------------------------------------------------------------------------------------


def upload_dir(bucket: str, prefix: str, directory: Path) -> None:
    client = boto3.client("s3")
    for path in directory.iterdir():
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_s3_round_trip_from_source_to_store_and_back(tmp_path: Path, s3_bucket: str) -> None:
    upload_dir(s3_bucket, "incoming/my-adapter", write_adapter("mixed", tmp_path / "src"))
    store = open_store(f"s3://{s3_bucket}/adapters")
    stage_from_uri(f"s3://{s3_bucket}/incoming/my-adapter/", tmp_path / "staging", max_bytes=LIMITS.max_bytes)
    accepted: AcceptedAdapter = accept_staged(tmp_path / "staging", tiny_spec(), LIMITS, store)
    folder = digest_hex(accepted.digest)
    assert accepted.uri == f"s3://{s3_bucket}/adapters/{folder}"
    assert f"adapters/{folder}/{ADAPTER_WEIGHTS}" in bucket_keys(s3_bucket)
    # What a worker does: fetch the stored directory and check it is the same adapter.
    fetched = tmp_path / "fetched"
    stage_from_uri(accepted.uri, fetched, max_bytes=LIMITS.max_bytes)
    assert adapter_digest(fetched) == accepted.digest
    assert accepted.validated.rank == 16


def test_rejected_adapter_leaves_nothing_in_the_bucket(tmp_path: Path, s3_bucket: str) -> None:
    staged = write_adapter("mixed", tmp_path / "staging")
    store = open_store(f"s3://{s3_bucket}/adapters")
    with pytest.raises(AdapterRejected, match="limit of 4"):
        accept_staged(staged, tiny_spec(), AdapterLimits(max_rank=4), store)
    assert bucket_keys(s3_bucket) == []


def test_s3_dedupe_and_discard(tmp_path: Path, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/adapters")
    first = accept_staged(write_adapter("lora", tmp_path / "a"), tiny_spec(), LIMITS, store)
    again = accept_staged(write_adapter("lora", tmp_path / "b"), tiny_spec(), LIMITS, store)
    assert not again.stored_new and again.uri == first.uri
    discard_stored(store, first)
    assert bucket_keys(s3_bucket) == []


def test_s3_pickle_source_is_refused(tmp_path: Path, s3_bucket: str) -> None:
    source = write_adapter("lora", tmp_path / "src")
    _pickle_only(source)
    upload_dir(s3_bucket, "incoming/pickled", source)
    with pytest.raises(AdapterRejected, match="pickle"):
        stage_from_uri(f"s3://{s3_bucket}/incoming/pickled", tmp_path / "staging", max_bytes=LIMITS.max_bytes)
