"""`loraplex dev --model NAME[:WORKERS]`: which base models get a worker pool, and how many workers each.

Pure: parsing and the address plan, tested without processes.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_WORKERS_PER_MODEL = 64


def parse_pools(specs: Sequence[str], default_workers: int, default_model: str) -> dict[str, int]:
    """`["smollm2-135m-instruct", "tiny:2"]` -> {model: workers}, in the order given.

    A model without `:WORKERS` gets `default_workers` (the `--workers` flag); no `--model` at all
    serves `default_model`. Raises ValueError with a sentence naming the bad spec.
    """
    if default_workers < 1:
        raise ValueError("--workers must be at least 1")
    pools: dict[str, int] = {}
    for spec in specs or [default_model]:
        name, sep, count = spec.strip().partition(":")
        if not name:
            raise ValueError(f"--model {spec!r} names no model; use NAME or NAME:WORKERS")
        workers = default_workers
        if sep:
            try:
                workers = int(count)
            except ValueError:
                raise ValueError(f"--model {spec!r}: WORKERS must be a whole number") from None
        if not 1 <= workers <= MAX_WORKERS_PER_MODEL:
            raise ValueError(f"--model {spec!r}: WORKERS must be between 1 and {MAX_WORKERS_PER_MODEL}")
        if name in pools:
            raise ValueError(f"--model {name!r} is given twice; give it once with NAME:WORKERS")
        pools[name] = workers
    return pools


def plan_addresses(pools: dict[str, int], first_port: int, host: str = "127.0.0.1") -> dict[str, list[str]]:
    """Consecutive ports from `first_port`, model by model: {model: [host:port, ...]}."""
    plan: dict[str, list[str]] = {}
    port = first_port
    for model, workers in pools.items():
        plan[model] = [f"{host}:{port + i}" for i in range(workers)]
        port += workers
    return plan
