"""Reading PEFT adapter directories: variants, scales, and refusals."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.adapter_files import DEFAULT_MAX_HEADER_BYTES, MAX_TENSOR_DIM, MAX_TENSOR_DIMS
from services.worker.engine.adapter_slots import rank_bucket
from services.worker.engine.adapter_weights import (
    AdapterFormatError,
    adapter_weights_from_bytes,
    load_adapter_weights,
    tensors_in,
)

PREFIX = "base_model.model.model.layers"


def _write(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    # The tensors below adapt q_proj and v_proj; a config may say otherwise to test a mismatch.
    full = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], **config}
    (path / "adapter_config.json").write_text(json.dumps(full))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _qv(rank: int) -> dict[str, torch.Tensor]:
    return {
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(rank, 64),
        f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.randn(64, rank),
        f"{PREFIX}.1.self_attn.v_proj.lora_A.weight": torch.randn(rank, 64),
        f"{PREFIX}.1.self_attn.v_proj.lora_B.weight": torch.randn(32, rank),
    }


def test_plain_lora_scale_is_alpha_over_rank_and_rslora_alpha_over_sqrt_rank(tmp_path: Path) -> None:
    lora = load_adapter_weights(
        _write(tmp_path / "l", {"r": 8, "lora_alpha": 16}, _qv(8)), "d1", torch.float32
    )
    rs = load_adapter_weights(
        _write(tmp_path / "r", {"r": 16, "lora_alpha": 16, "use_rslora": True}, _qv(16)), "d2", torch.float32
    )
    assert lora.variant == "LORA" and rs.variant == "RSLORA"
    assert lora.tensors[(0, "q_proj")].scale == 2.0
    assert rs.tensors[(1, "v_proj")].scale == pytest.approx(16 / math.sqrt(16))
    assert lora.ranks == {"q_proj": 8, "v_proj": 8}
    assert lora.size_bytes == sum(t.numel() for t in _qv(8).values()) * 4


def test_dora_adapter_carries_its_magnitude_vectors(tmp_path: Path) -> None:
    tensors = _qv(4) | {
        f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector": torch.rand(64),
        f"{PREFIX}.1.self_attn.v_proj.lora_magnitude_vector": torch.rand(32),
    }
    weights = load_adapter_weights(
        _write(tmp_path / "d", {"r": 4, "lora_alpha": 8, "use_dora": True}, tensors), "d", torch.bfloat16
    )
    assert weights.variant == "DORA"
    magnitude = weights.tensors[(1, "v_proj")].magnitude
    assert magnitude is not None and magnitude.shape == (32,) and magnitude.dtype == torch.bfloat16


def test_pickled_weights_are_refused_without_being_read(tmp_path: Path) -> None:
    path = tmp_path / "pickle"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (path / "adapter_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(AdapterFormatError, match="pickles are refused"):
        load_adapter_weights(path, "d", torch.float32)


@pytest.mark.parametrize(
    "extra",
    [
        "base_model.model.model.norm.lora_A.weight",
        # PEFT writes lora_embedding_A for the embeddings and lora_A for lm_head, never the reverse.
        "base_model.model.model.embed_tokens.lora_A.weight",
        "base_model.model.lm_head.lora_embedding_A",
    ],
)
def test_tensors_outside_the_supported_layers_are_refused(tmp_path: Path, extra: str) -> None:
    tensors = _qv(4) | {extra: torch.randn(4, 10)}
    with pytest.raises(AdapterFormatError, match="does not map to a supported"):
        load_adapter_weights(_write(tmp_path / "e", {"r": 4, "lora_alpha": 8}, tensors), "d", torch.float32)


def test_embedding_and_lm_head_lora_are_read_with_peft_scales(tmp_path: Path) -> None:
    tensors = _qv(8) | {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(8, 100),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(64, 8),
        "base_model.model.lm_head.lora_A.weight": torch.randn(8, 64),
        "base_model.model.lm_head.lora_B.weight": torch.randn(100, 8),
    }
    config = {
        "r": 8,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "embed_tokens", "lm_head"],
        "alpha_pattern": {"lm_head": 4},
    }
    weights = load_adapter_weights(_write(tmp_path / "edges", config, tensors), "d", torch.float32)
    embed, head = weights.edges["embed_tokens"], weights.edges["lm_head"]
    assert (tuple(embed.a.shape), tuple(embed.b.shape)) == ((8, 100), (64, 8))
    assert embed.scale == pytest.approx(16 / math.sqrt(8)) and head.scale == pytest.approx(4 / math.sqrt(8))
    assert weights.ranks["embed_tokens"] == weights.ranks["lm_head"] == 8
    assert weights.size_bytes == sum(t.numel() for t in tensors.values()) * 4


def test_edge_tensors_the_config_does_not_target_are_refused(tmp_path: Path) -> None:
    tensors = _qv(4) | {
        "base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
        "base_model.model.lm_head.lora_B.weight": torch.randn(100, 4),
    }
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}  # all-linear never takes lm_head
    with pytest.raises(AdapterFormatError, match=r"lm_head, which adapter_config\.json does not target"):
        load_adapter_weights(_write(tmp_path / "h", config, tensors), "d", torch.float32)


def test_rank_buckets_pad_only_to_the_next_power_of_two() -> None:
    assert [rank_bucket(r) for r in (1, 8, 9, 16, 33, 64, 200)] == [8, 8, 16, 16, 64, 64, 256]


def test_weights_read_from_bytes_in_memory_equal_the_file_read_and_views_stay_in_bounds(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "m", {"r": 8, "lora_alpha": 16}, {**_qv(8), "empty": torch.zeros(0)})
    config = (path / "adapter_config.json").read_bytes()
    raw = bytearray((path / "adapter_model.safetensors").read_bytes())
    viewed = tensors_in(raw)
    assert set(viewed) == set(load_file(str(path / "adapter_model.safetensors")))
    for name, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        assert torch.equal(viewed[name], tensor)
    save_file(_qv(8), str(path / "adapter_model.safetensors"))  # only LoRA tensors, for the parse
    from_disk = load_adapter_weights(path, "d", torch.float32)
    in_memory = adapter_weights_from_bytes(
        config, bytearray((path / "adapter_model.safetensors").read_bytes()), "d", torch.float32
    )
    assert from_disk.ranks == in_memory.ranks and from_disk.size_bytes == in_memory.size_bytes
    for key, w in from_disk.tensors.items():
        assert torch.equal(w.a, in_memory.tensors[key].a) and torch.equal(w.b, in_memory.tensors[key].b)

    # A header whose offsets point past the end is refused, never read out of bounds.
    (header_len,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(bytes(raw[8 : 8 + header_len]))
    name = next(k for k in header if k != "__metadata__" and header[k]["shape"] != [0])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + len(raw), end + len(raw)]
    text = json.dumps(header).encode()
    bad = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + header_len :])
    with pytest.raises(AdapterFormatError, match="not a valid safetensors file"):
        tensors_in(bad)
    for shape, offsets in (([-1, 1], [4, 0]), ([2.5, 2], [0, 20]), ([2, 2], [8])):
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": offsets}
        text = json.dumps(header).encode()
        with pytest.raises(AdapterFormatError, match="not a valid safetensors file"):
            tensors_in(bytearray(struct.pack("<Q", len(text)) + text + raw[8 + header_len :]))


def _crafted(header: dict, data: bytes) -> bytearray:
    text = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    ("header", "data", "phrase"),
    [
        (
            {
                f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": {
                    "dtype": "F32",
                    "shape": [1, 1, 1, 1, 1],
                    "data_offsets": [0, 4],
                }
            },
            b"\0" * 4,
            f"over the limit of {MAX_TENSOR_DIMS}",
        ),
        (
            {
                f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": {
                    "dtype": "F32",
                    "shape": [0, 1 << 40],
                    "data_offsets": [0, 0],
                }
            },
            b"",
            f"over the limit of {MAX_TENSOR_DIM}",
        ),
        (
            {"__metadata__": {"pad": "x" * DEFAULT_MAX_HEADER_BYTES}},
            b"",
            f"over the limit of {DEFAULT_MAX_HEADER_BYTES} bytes",
        ),
    ],
    ids=["five-dims", "huge-dim", "huge-header"],
)
def test_worker_refuses_crafted_headers_with_the_registrys_caps(
    tmp_path: Path, header: dict, data: bytes, phrase: str
) -> None:
    """The same caps on both of the worker's paths: bytes just fetched, and the disk cache."""
    buf = _crafted(header, data)
    with pytest.raises(AdapterFormatError, match=phrase):
        tensors_in(buf)
    path = tmp_path / "a"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    (path / "adapter_model.safetensors").write_bytes(buf)
    with pytest.raises(AdapterFormatError, match=phrase):
        load_adapter_weights(path, "d", torch.float32)


def test_dotted_and_per_layer_pattern_keys_give_peft_scales(tmp_path: Path) -> None:
    """Regression: keys were searched in "model.layers.0.q_proj" (no self_attn), so a dotted key
    such as "self_attn.q_proj" never matched and the layer kept the default alpha."""
    config = {
        "r": 8,
        "lora_alpha": 16,
        "alpha_pattern": {"self_attn.q_proj": 4, "layers.1.self_attn.v_proj": 64},
        "rank_pattern": {},
    }
    weights = load_adapter_weights(_write(tmp_path / "p", config, _qv(8)), "d", torch.float32)
    assert weights.tensors[(0, "q_proj")].scale == 4 / 8
    assert weights.tensors[(1, "v_proj")].scale == 64 / 8


def test_tensors_the_config_does_not_target_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "t", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}, _qv(8))
    with pytest.raises(AdapterFormatError, match="does not target"):
        load_adapter_weights(path, "d", torch.float32)


def test_a_rank_the_config_does_not_give_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "k", {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4}}, _qv(8))
    with pytest.raises(AdapterFormatError, match="rank 4"):
        load_adapter_weights(path, "d", torch.float32)
