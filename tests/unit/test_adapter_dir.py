"""The local check of an adapter directory before upload: each usual mistake is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.client.adapter_dir import AdapterDirError, check_adapter_dir

CONFIG = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}


def _dir(tmp_path: Path, files: dict[str, bytes | str]) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    for name, content in files.items():
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return d


def test_a_peft_directory_gives_its_two_files_and_nothing_else(tmp_path: Path) -> None:
    d = _dir(
        tmp_path,
        {
            "adapter_config.json": json.dumps(CONFIG),
            "adapter_model.safetensors": b"x",
            "training_args.bin": b"pickle",  # a Trainer's leftovers are never sent
            "README.md": "hi",
        },
    )
    assert check_adapter_dir(d) == [d / "adapter_config.json", d / "adapter_model.safetensors"]


@pytest.mark.parametrize(
    ("files", "phrases"),
    [
        ({}, ["is empty", "save_pretrained"]),
        ({"notes.txt": "x"}, ["no adapter_config.json", "not a PEFT adapter"]),
        (
            {"config.json": json.dumps({"model_type": "llama"}), "tokenizer.json": "{}"},
            ["base model", "model_type 'llama'"],
        ),
        ({"model.safetensors": b"x"}, ["base model", "model.safetensors"]),
        ({"adapter_config.json": json.dumps(CONFIG)}, ["no adapter_model.safetensors"]),
        (
            {"adapter_config.json": json.dumps(CONFIG), "adapter_model.bin": b"pickle"},
            ["pickled weights (adapter_model.bin)", "runs code"],
        ),
        (
            {"adapter_config.json": json.dumps(CONFIG), "weights.pt": b"p", "extra.pkl": b"p"},
            ["pickled weights (extra.pkl, weights.pt)"],
        ),
        (
            {"adapter_config.json": "{not json", "adapter_model.safetensors": b"x"},
            ["not readable JSON"],
        ),
        ({"adapter_config.json": "[1]", "adapter_model.safetensors": b"x"}, ["not a JSON object"]),
    ],
)
def test_each_mistake_is_named(tmp_path: Path, files: dict[str, bytes | str], phrases: list[str]) -> None:
    d = _dir(tmp_path, files)
    with pytest.raises(AdapterDirError) as err:
        check_adapter_dir(d)
    for phrase in phrases:
        assert phrase in str(err.value), str(err.value)
    assert str(d) in str(err.value)


def test_a_missing_path_and_a_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(AdapterDirError, match="does not exist"):
        check_adapter_dir(tmp_path / "nope")
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(AdapterDirError, match="is a file"):
        check_adapter_dir(f)
