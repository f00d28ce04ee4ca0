"""Where a decode step's time goes, by kind of work: `bench engine --profile`.

For a run of its own (after the timed ones), the engine's entry points for each kind of work are
wrapped with the benchmark's clock: the base GEMMs (every packed or plain `matmul`, `lm_head`
included), the LoRA corrections (`add_lora`, `add_fused_lora`), paged attention (the KV write, the
gather of each row's blocks, and the attention math) with its gather also counted on its own, and
the sampler. `other` is the rest of the step: norms, rotary, activations, residuals, step metadata,
scheduling and Python. torch.profiler is not used because it times every op it records: a
multi-LoRA step runs ~30,000 small ones (a batched matmul over 8 adapters with one row each
dispatches one matmul per adapter), and recording them costs more than the work they do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from services.worker.engine.llm_engine import EngineRequest, LLMEngine
from services.worker.engine.sampling import SamplingParams

# Kind of work -> the (module, function) names the engine calls it through.
ENTRY_POINTS: dict[str, list[tuple[str, str]]] = {
    "gemm": [("services.worker.layers.lora", "matmul"), ("services.worker.models.llama", "matmul")],
    "lora": [("services.worker.layers.lora", "add_lora"), ("services.worker.layers.lora", "add_fused_lora")],
    "attention": [("services.worker.models.llama", "paged_attention")],
    "kv_gather": [("services.worker.layers.attention", "_gather")],  # part of attention
    "sampler": [("services.worker.engine.model_runner", "sample")],
}
EXCLUSIVE = ("gemm", "lora", "attention", "sampler")  # these and `other` add up to the step


@contextmanager
def timed_entry_points(clock: Callable[[], float], totals: dict[str, float]) -> Iterator[None]:
    """Within the block, every call through ENTRY_POINTS adds its clock time to totals[kind]."""
    saved: list[tuple[Any, str, Callable[..., Any]]] = []

    def wrap(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[kind] += clock() - start

        return timed

    try:
        for kind, names in ENTRY_POINTS.items():
            for module_name, attr in names:
                module = importlib.import_module(module_name)
                fn = getattr(module, attr)
                saved.append((module, attr, fn))
                setattr(module, attr, wrap(kind, fn))
        yield
    finally:
        for module, attr, fn in reversed(saved):
            setattr(module, attr, fn)


def profile_decode(
    engine: LLMEngine,
    prompts: list[list[int]],
    adapters: list[str | None],
    new_tokens: int,
    clock: Callable[[], float],
    label: str,
) -> dict[str, float]:
    """Mean milliseconds per decode step (the steps after every request's first token), by kind of
    work: `profile_{label}_{step,gemm,lora,attention,kv_gather,sampler,other}_ms`."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(EngineRequest(f"profile-{label}-{i}", prompt, params, adapter))
    started: set[str] = set()
    while len(started) < len(prompts) and engine.has_unfinished():
        started.update(o.request_id for o in engine.step())
    totals = dict.fromkeys([*ENTRY_POINTS, "step"], 0.0)
    steps = 0
    with timed_entry_points(clock, totals):
        while engine.has_unfinished():
            start = clock()
            engine.step()
            totals["step"] += clock() - start
            steps += 1
    if not steps:
        return {}
    per_step = {kind: 1000 * t / steps for kind, t in totals.items()}
    per_step["other"] = per_step["step"] - sum(per_step[k] for k in EXCLUSIVE)
    return {f"profile_{label}_{kind}_ms": ms for kind, ms in per_step.items()} | {
        f"profile_{label}_steps": steps
    }
