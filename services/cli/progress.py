"""Progress on long CLI work, drawn with rich on stderr; silent when stdout is not a terminal.

Scripts that pipe or capture the CLI's output get only the result; a person at a terminal sees
bytes and rate for uploads and a spinner with elapsed time for work of unknown length.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def interactive() -> bool:
    """Progress is drawn only for a person: stdout is a terminal and TERM is not 'dumb'."""
    return sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"


@contextmanager
def transfer(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """Yields advance(n_bytes); a bar with bytes sent, rate and time left on a terminal."""
    if not interactive():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def working(label: str) -> Iterator[None]:
    """A spinner with elapsed time on a terminal, for work whose length is unknown."""
    if not interactive():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        bar.add_task(label, total=None)
        yield


def quiet_libraries() -> None:
    """Silences transformers/huggingface_hub/gguf progress bars and deprecation warnings.

    They write to stderr from inside pulls and conversions; the CLI draws its own progress.
    """
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("transformers", "huggingface_hub", "gguf", "peft", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
