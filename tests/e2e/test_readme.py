"""The README's "Try it" section, run as written, in order, on a fresh LORAPLEX_HOME against
`loraplex dev`: every command succeeds, and each sample output block has the shape (table
header, generate's summary line) of what the command before it prints today.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_dev_stack import DevStack, running_dev

REPO = Path(__file__).resolve().parents[2]
README_HOME = "~/.cache/loraplex"
# What `loraplex generate` prints on stderr when the stream ends.
FINISHED_LINE = re.compile(r"^\[(\d+) in, (\d+) out, (eos|length|stop), TTFT \d+ ms(, cold start)?\]$")


@dataclass
class Ran:
    command: str
    stdout: str
    stderr: str


def try_it_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block in the README's Try it section, in order."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Try it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w*)\n(.*?)```", section, re.S)


def commands(block: str) -> list[str]:
    """Logical lines of a shell block (backslash continuations joined), comments and blanks dropped."""
    text = block.replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def dev(
    tmp_path_factory: pytest.TempPathFactory, stack_database_url: str, smollm2_dir: Path
) -> Iterator[DevStack]:
    home = tmp_path_factory.mktemp("readme-home")
    with running_dev(home, stack_database_url, smollm2_dir, workers=1) as stack:
        yield stack


def test_the_readmes_try_it_commands_run_in_order_and_print_what_it_shows(
    dev: DevStack, tmp_path: Path
) -> None:
    # The banner says how to reach this stack from another shell, ports included.
    for name in ("LORAPLEX_HOME", "LORAPLEX_ROUTER", "LORAPLEX_REGISTRY"):
        assert f"  export {name}={dev.env[name]}" in dev.banner, dev.banner
    env = {k: v for k, v in dev.env.items() if k not in ("LORAPLEX_API_KEY", "LORAPLEX_ADMIN_TOKEN")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    prelude = (
        f'loraplex() {{ "{sys.executable}" -m services.cli.main "$@"; }}\n'
        f'python() {{ "{sys.executable}" "$@"; }}\n'
    )
    exports: list[str] = []
    ran: list[Ran] = []
    checked_samples = 0
    for lang, body in try_it_blocks():
        if lang == "sh":
            ran = []
            for command in commands(body.replace(README_HOME, str(dev.home))):
                if command.startswith("source "):
                    continue  # the venv: this test runs in it already
                if command.startswith("export "):
                    exports.append(command)
                    continue
                done = subprocess.run(
                    ["bash", "-c", prelude + "\n".join(exports) + "\n" + command],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                print(f"$ {command}\n{done.stdout}{done.stderr}")  # the transcript, shown on failure
                assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
                assert "UNKNOWN" not in done.stderr and "Traceback" not in done.stderr, done.stderr
                ran.append(Ran(command, done.stdout, done.stderr))
                _check_shape(command, done.stdout, done.stderr)
        elif lang == "" and ran:
            _check_sample(body, ran)
            checked_samples += 1
    assert checked_samples >= 2
    # The adapters the README trains into ./test-adapters are ignored by git.
    ignored = subprocess.run(["git", "check-ignore", "-q", "test-adapters/qv-r8"], cwd=REPO)
    assert ignored.returncode == 0


def _check_shape(command: str, stdout: str, stderr: str) -> None:
    if " generate " in f" {command} ":
        if "--json" in command:
            events = [json.loads(line) for line in stdout.splitlines()]
            assert next(iter(events[0])) == "started" and next(iter(events[-1])) == "finished"
        else:
            assert stdout.strip(), "no text streamed"
            last = stderr.strip().splitlines()[-1]
            match = FINISHED_LINE.match(last)
            assert match, stderr
            limit = re.search(r"--max-tokens (\d+)", command)
            assert limit, f"every README generate sets --max-tokens: {command}"
            assert int(match.group(2)) <= int(limit.group(1))
    if "devtools adapters" in command:
        assert stderr == "", f"progress bars or warnings leaked: {stderr[:2000]}"


def _check_sample(sample: str, ran: list[Ran]) -> None:
    """A sample block shows a table header some command printed, or generate's finished line."""
    lines = [line for line in sample.splitlines() if line.strip()]
    finished = [line for line in lines if line.startswith("[")]
    if finished:
        assert all(FINISHED_LINE.match(line) for line in finished), finished
        assert any(FINISHED_LINE.match((r.stderr.strip().splitlines() or [""])[-1]) for r in ran)
        return
    header = lines[0].split()
    printed = [r.stdout.splitlines()[0].split() for r in ran if r.stdout.strip()]
    assert header in printed, f"sample header {header} is not what any command printed: {printed}"
    # Every sample row has as many columns as the header (ids are not elided to '…').
    for line in lines[1:]:
        assert len(line.split()) == len(header), line
