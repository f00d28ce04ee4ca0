"""The worker's tokenizer is the one AutoTokenizer builds, after the first load without its detour."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from services.worker import tokenizer
from services.worker.serving_cache import SERVING_DIR

TEXTS = ("Hello world!", "  spaces\tand\nlines ", "émoji 🤗 ünïcode", "<|im_start|>user\nhi<|im_end|>")


def _tokenizer_files(model_dir: Path, tmp_path: Path) -> Path:
    """The model directory without its weights (the tokenizer reads none of them)."""
    ignore = shutil.ignore_patterns("*.safetensors", SERVING_DIR)
    return Path(shutil.copytree(model_dir, tmp_path / model_dir.name, ignore=ignore))


def _records(model_dir: Path) -> list[Path]:
    return sorted((model_dir / SERVING_DIR).glob("tokenizer-*.json"))


def _assert_same(ours: Any, reference: Any) -> None:
    assert type(ours) is type(reference)
    assert ours._tokenizer.to_str() == reference._tokenizer.to_str()
    state = {k: repr(v) for k, v in vars(ours).items() if k != "_tokenizer"}
    assert state == {k: repr(v) for k, v in vars(reference).items() if k != "_tokenizer"}
    for text in TEXTS:
        ids = reference(text).input_ids
        assert ours(text).input_ids == ids
        assert (
            ours(text, add_special_tokens=False).input_ids
            == reference(text, add_special_tokens=False).input_ids
        )
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )


def test_the_recorded_tokenizer_is_the_one_autotokenizer_builds(smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir = _tokenizer_files(smollm2_dir, tmp_path)
    reference = AutoTokenizer.from_pretrained(str(model_dir))
    first = tokenizer.load_tokenizer(model_dir)  # asks AutoTokenizer, records its choice
    [record] = _records(model_dir)
    assert tokenizer.GENERIC_CLASS in record.read_text()
    second = tokenizer.load_tokenizer(model_dir)  # builds the recorded class directly
    _assert_same(first, reference)
    _assert_same(second, reference)
    copies = tokenizer.copies(second, 2)
    assert len({id(c) for c in copies} | {id(c._tokenizer) for c in copies} | {id(second._tokenizer)}) == 5
    for copy in copies:
        _assert_same(copy, reference)


def test_a_changed_tokenizer_file_is_asked_again(smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir = _tokenizer_files(smollm2_dir, tmp_path)
    tokenizer.load_tokenizer(model_dir)
    [old] = _records(model_dir)
    stat = (model_dir / "tokenizer_config.json").stat()
    os.utime(model_dir / "tokenizer_config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    tokenizer.load_tokenizer(model_dir)
    assert len(_records(model_dir)) == 2 and old in _records(model_dir)


def test_without_a_writable_serving_dir_autotokenizer_serves_every_time(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    model_dir = _tokenizer_files(smollm2_dir, tmp_path)
    (model_dir / SERVING_DIR).write_text("not a directory")
    _assert_same(tokenizer.load_tokenizer(model_dir), AutoTokenizer.from_pretrained(str(model_dir)))
