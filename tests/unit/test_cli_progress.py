"""Progress is drawn for a person at a terminal, and nothing is written when output is captured."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import progress

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import time
from services.cli.progress import transfer
with transfer(3 << 20, "uploading bot") as advance:
    for _ in range(3):
        advance(1 << 20)
        time.sleep(0.15)
print("done")
"""


def test_captured_output_gets_no_progress(capsys: pytest.CaptureFixture[str]) -> None:
    assert not progress.interactive()
    with progress.transfer(100, "uploading") as advance:
        advance(60)
        advance(40)
    with progress.working("pulling"):
        pass
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_a_terminal_sees_bytes_and_rate() -> None:
    """The same upload under a pseudo-terminal draws a rich bar with the size and a rate."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm", "COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdout=terminal, stderr=terminal, env=env, cwd=REPO
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    os.close(controller)
    text = b"".join(chunks).decode(errors="replace")
    assert "uploading bot" in text and "3.1 MB" in text and "/s" in text, text
    assert "done" in text
