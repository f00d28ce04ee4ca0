"""Adapter digest and the safetensors header reader, on real PEFT files and hand-broken ones."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from services.common.adapter_errors import AdapterRejected, InvalidSafetensors
from services.common.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_MAX_HEADER_BYTES,
    MAX_TENSOR_DIM,
    MAX_TENSOR_DIMS,
    AdapterDigest,
    adapter_digest,
    digest_hex,
    is_pickle_name,
    pickle_refusal,
    read_safetensors_header,
    split_safetensors,
)
from tests.fixtures.tiny_peft import write_adapter


def write_safetensors(path: Path, header: dict[str, Any], data_len: int, *, raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * data_len)
    return path


def f32(begin: int, shape: list[int]) -> dict[str, Any]:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


def test_digest_is_sha256_of_the_two_file_hashes(tmp_path: Path) -> None:
    adapter = write_adapter("lora", tmp_path / "a")
    config = (adapter / ADAPTER_CONFIG).read_bytes()
    weights = (adapter / ADAPTER_WEIGHTS).read_bytes()
    inner = hashlib.sha256(config).digest() + hashlib.sha256(weights).digest()
    assert adapter_digest(adapter) == "sha256:" + hashlib.sha256(inner).hexdigest()


def test_digest_is_equal_for_identical_bytes_in_different_places(tmp_path: Path) -> None:
    first = write_adapter("lora", tmp_path / "a")
    second = shutil.copytree(first, tmp_path / "b")
    assert adapter_digest(first) == adapter_digest(second)


@pytest.mark.parametrize("file_name", [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
def test_digest_changes_when_one_byte_changes(tmp_path: Path, file_name: str) -> None:
    adapter = write_adapter("lora", tmp_path / "a")
    before = adapter_digest(adapter)
    data = bytearray((adapter / file_name).read_bytes())
    data[-1] ^= 1
    (adapter / file_name).write_bytes(bytes(data))
    assert adapter_digest(adapter) != before


def test_streaming_digest_ignores_chunking_and_file_order(tmp_path: Path) -> None:
    adapter = write_adapter("dora", tmp_path / "a")
    files = {n: (adapter / n).read_bytes() for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    streamed = AdapterDigest()
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        data = files[name]
        for i in range(0, len(data), 777):
            streamed.update(name, data[i : i + 777])
    assert streamed.hexdigest() == adapter_digest(adapter)
    assert len(digest_hex(streamed.hexdigest())) == 64


def test_streaming_digest_refuses_other_file_names() -> None:
    with pytest.raises(ValueError, match="not an adapter file"):
        AdapterDigest().update("adapter_model.bin", b"x")


def test_digest_hex_rejects_malformed_digests() -> None:
    with pytest.raises(ValueError):
        digest_hex("sha256:../../etc")
    with pytest.raises(ValueError):
        digest_hex("md5:" + "0" * 64)


def test_header_of_real_peft_file_matches_safetensors(tmp_path: Path) -> None:
    weights = write_adapter("mixed", tmp_path / "a") / ADAPTER_WEIGHTS
    header = read_safetensors_header(weights)
    with safe_open(str(weights), "pt") as f:
        expected = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
        assert header.metadata == f.metadata()
    assert {k: (t.dtype, t.shape) for k, t in header.tensors.items()} == expected


def test_header_read_does_not_load_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    side = 8 << 10
    size = side * side  # 256 MiB of F32, as a sparse file
    body = json.dumps({"w": f32(0, [side, side])}).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + 4 * size)
    tracemalloc.start()
    header = read_safetensors_header(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert header.tensors["w"].shape == (side, side)
    assert peak < 1 << 20


def test_truncated_real_file_is_rejected(tmp_path: Path) -> None:
    weights = write_adapter("lora", tmp_path / "a") / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(InvalidSafetensors, match="truncated"):
        read_safetensors_header(weights)


def test_file_shorter_than_the_length_prefix_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / ADAPTER_WEIGHTS
    path.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidSafetensors, match="too short"):
        read_safetensors_header(path)


def test_header_over_the_limit_is_rejected_before_reading_it(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", {"w": f32(0, [4])}, 16)
    with pytest.raises(InvalidSafetensors, match="over the limit of 8 bytes"):
        read_safetensors_header(path, max_header_bytes=8)


def test_absurd_header_length_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(InvalidSafetensors, match="over the limit"):
        read_safetensors_header(path)


def test_header_longer_than_the_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(InvalidSafetensors, match="only 10 bytes"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe garbage", "not valid JSON"),
        (b'{"a": 1', "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}', "appears twice"),
    ],
)
def test_corrupted_header_is_rejected(tmp_path: Path, raw: bytes, message: str) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", {}, 4, raw=raw)
    with pytest.raises(InvalidSafetensors, match=message):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("header", "data_len", "message"),
    [
        ({"w": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 16]}}, 16, "unknown dtype 'Q4_K'"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, 12, "needs 16 bytes"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "not a list of sizes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, 4, "data_offsets"),
        ({"w": f32(0, [4]), "v": f32(8, [4])}, 24, "overlaps"),
        ({"w": f32(0, [4]), "v": f32(20, [4])}, 36, "unaccounted bytes"),
        ({"w": f32(0, [4])}, 20, "4 bytes after its last tensor"),
        ({"w": f32(0, [4]), "v": f32(16, [4])}, 24, "truncated"),
        ({"__metadata__": {"format": 1}, "w": f32(0, [1])}, 4, "__metadata__"),
        ({"w": [1, 2]}, 4, "not described by a JSON object"),
    ],
)
def test_inconsistent_header_is_rejected(
    tmp_path: Path, header: dict[str, Any], data_len: int, message: str
) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", header, data_len)
    with pytest.raises(InvalidSafetensors, match=message):
        read_safetensors_header(path)


# Headers whose layout is consistent (sizes match the data), so only the caps can refuse them.
CRAFTED = [
    # Five dimensions of one element each: 4 bytes of data, as declared.
    ({"w": f32(0, [1, 1, 1, 1, 1])}, 4, f"5 dimensions, over the limit of {MAX_TENSOR_DIMS}"),
    # Zero elements, so zero bytes of data, but a dimension of 2**40.
    ({"w": f32(0, [0, 1 << 40])}, 0, f"over the limit of {MAX_TENSOR_DIM}"),
    ({"w": f32(0, [MAX_TENSOR_DIM + 1])}, 4 * (MAX_TENSOR_DIM + 1), f"over the limit of {MAX_TENSOR_DIM}"),
    # A thousand dimensions: refused on the count, and the sentence stays short.
    ({"w": {"dtype": "F32", "shape": [1] * 1000, "data_offsets": [0, 4]}}, 4, "1000 dimensions"),
]


@pytest.mark.parametrize(("header", "data_len", "message"), CRAFTED)
def test_crafted_shapes_are_refused_from_a_file_and_from_memory(
    tmp_path: Path, header: dict[str, Any], data_len: int, message: str
) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", header, data_len)
    with pytest.raises(InvalidSafetensors, match=message) as from_file:
        read_safetensors_header(path)
    with pytest.raises(InvalidSafetensors, match=message):
        split_safetensors(path.read_bytes())
    assert len(str(from_file.value)) < 400


def test_shapes_at_the_caps_are_accepted(tmp_path: Path) -> None:
    header = {"w": f32(0, [1, 1, 1, MAX_TENSOR_DIM])}
    path = write_safetensors(tmp_path / "x.safetensors", header, 4 * MAX_TENSOR_DIM)
    assert read_safetensors_header(path).tensors["w"].shape == (1, 1, 1, MAX_TENSOR_DIM)
    parsed, base = split_safetensors(path.read_bytes())
    assert parsed.tensors["w"].shape == (1, 1, 1, MAX_TENSOR_DIM)
    assert base == path.stat().st_size - 4 * MAX_TENSOR_DIM


def test_header_over_the_default_cap_is_refused_in_memory_before_parsing() -> None:
    # Valid JSON, but 1 byte over the cap: a __metadata__ string padding it out.
    pad = DEFAULT_MAX_HEADER_BYTES - len(json.dumps({"__metadata__": {"p": ""}})) + 1
    body = json.dumps({"__metadata__": {"p": "x" * pad}}).encode()
    assert len(body) == DEFAULT_MAX_HEADER_BYTES + 1
    with pytest.raises(InvalidSafetensors, match=f"over the limit of {DEFAULT_MAX_HEADER_BYTES} bytes"):
        split_safetensors(struct.pack("<Q", len(body)) + body)
    ok = json.dumps({"__metadata__": {"p": "x" * (pad - 1)}}).encode()
    assert split_safetensors(struct.pack("<Q", len(ok)) + ok)[0].metadata["p"] == "x" * (pad - 1)


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 2**63) + b"{}", "over the limit"),
        (struct.pack("<Q", 1000) + b"{}", "only 10 bytes"),
    ],
)
def test_bad_length_prefix_in_memory_is_refused(buf: bytes, message: str) -> None:
    with pytest.raises(InvalidSafetensors, match=message):
        split_safetensors(buf)


def test_header_errors_are_adapter_rejections() -> None:
    assert issubclass(InvalidSafetensors, AdapterRejected)


def test_pickle_names_are_recognised_and_refused_with_a_fix() -> None:
    for name in ("adapter_model.bin", "model.pt", "x.pth", "last.ckpt", "state.pkl"):
        assert is_pickle_name(name)
    assert not is_pickle_name(ADAPTER_WEIGHTS)
    assert "safe_serialization" in str(pickle_refusal("adapter_model.bin"))
