"""Does multi-LoRA batching run near the base model's speed?  `python -m bench.engine --json`

Workloads (one run, same machine, same prompts; bf16 by default):
- decode: N concurrent requests over N distinct adapters (mixed ranks, all linear layers) versus
  the same batch without adapters, versus PEFT's mixed-adapter generate(adapter_names=...);
  the ceiling is base speed scaled by W / (W + A), the bytes a decode step must read;
- prefill: N long prompts with the same adapters versus without;
- scale: traffic spread over a large resident pool versus a small one, N distinct adapters per
  batch in both.
Prints one JSON object as its last line and draws bench/results/engine.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.worker.engine.adapter_weights import AdapterWeights, LoraModuleWeights, load_adapter_weights
from services.worker.engine.config import EngineConfig, preferred_dtype
from services.worker.engine.llm_engine import EngineRequest, LLMEngine
from services.worker.engine.sampling import SamplingParams

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULTS = Path(__file__).resolve().parent / "results"
# Throughput is timed on this process's CPU clock by default (single-threaded, that is its busy
# time), so other work on a shared machine does not skew the ratios; --clock wall for wall time.
CLOCK = time.process_time


@dataclass
class RunTimes:
    tok_s: float  # decode tokens per second (after every request's first token)
    prefill_tok_s: float  # prompt tokens per second until every first token
    ttft: list[float]
    tpot: list[float]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _latency(prefix: str, t: RunTimes) -> dict[str, float]:
    return {
        f"{prefix}_ttft_p50_ms": 1000 * _pct(t.ttft, 0.5),
        f"{prefix}_ttft_p99_ms": 1000 * _pct(t.ttft, 0.99),
        f"{prefix}_tpot_p50_ms": 1000 * _pct(t.tpot, 0.5),
        f"{prefix}_tpot_p99_ms": 1000 * _pct(t.tpot, 0.99),
    }


def run_engine(
    engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int
) -> RunTimes:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    start, cpu_start = time.perf_counter(), CLOCK()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(EngineRequest(f"r{i}", prompt, params, adapter))
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    cpu_all_first: float | None = None  # when the last request got its first token
    while engine.has_unfinished():
        outputs = engine.step()
        now, cpu_now = time.perf_counter(), CLOCK()
        for out in outputs:
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
            counts[out.request_id] = out.num_output_tokens
        if cpu_all_first is None and len(first) == len(prompts):
            cpu_all_first = cpu_now
    cpu_end = CLOCK()
    assert cpu_all_first is not None
    decode_tokens = sum(n - 1 for n in counts.values())
    return RunTimes(
        tok_s=decode_tokens / (cpu_end - cpu_all_first) if decode_tokens else 0.0,
        prefill_tok_s=sum(len(p) for p in prompts) / (cpu_all_first - cpu_start),
        ttft=[first[r] - start for r in first],
        tpot=[(last[r] - first[r]) / (counts[r] - 1) for r in first if counts[r] > 1],
    )


def make_peft_adapters(model_dir: Path, ranks: list[int], out: Path, dtype: torch.dtype):
    """A PEFT model holding len(ranks) random adapters (all linear layers), saved under `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = None
    for i, r in enumerate(ranks):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    assert model is not None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(dtype))
    model.save_pretrained(str(out), selected_adapters=[f"a{i}" for i in range(len(ranks))])
    model.eval()
    # PEFT writes each non-"default" adapter in a subfolder named after it.
    dirs = [out / f"a{i}" for i in range(len(ranks))]
    return model, dirs


def random_weights(
    engine: LLMEngine, digest: str, rank: int, seed: int, dtype: torch.dtype
) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(engine.model.config.num_layers):
        for name in TARGETS:
            linear = engine.model.linear((layer, name))
            assert linear is not None
            a = (torch.randn(rank, linear.in_features, generator=gen) * 0.02).to(dtype)
            b = (torch.randn(linear.out_features, rank, generator=gen) * 0.02).to(dtype)
            tensors[(layer, name)] = LoraModuleWeights(a=a, b=b, scale=2.0)
    size = sum((t.a.numel() + t.b.numel()) * t.a.element_size() for t in tensors.values())
    return AdapterWeights(digest, "LORA", tensors, dict.fromkeys(TARGETS, rank), size)


def peft_decode_tok_s(model, prompts: list[list[int]], names: list[str], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "adapter_names": names,
        "do_sample": False,
    }
    with torch.no_grad():
        model.generate(**kwargs, max_new_tokens=2, min_new_tokens=2)  # warm-up
        t0 = CLOCK()
        model.generate(**kwargs, max_new_tokens=1, min_new_tokens=1)
        prefill = CLOCK() - t0
        t0 = CLOCK()
        model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        total = CLOCK() - t0
    return len(prompts) * (new_tokens - 1) / (total - prefill)


def _prompts(engine: LLMEngine, n: int, length: int, salt: int) -> list[list[int]]:
    # Distinct token ids per request, so the prefix cache cannot make one workload cheaper.
    g = torch.Generator().manual_seed(salt)
    return torch.randint(1000, 40000, (n, length), generator=g).tolist()


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine (scripts/gpu-check): the JSON line is the result
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [
        ("decode tok/s", ["base_tok_s", "decode_ceiling_tok_s", "multilora_tok_s", "peft_mixed_tok_s"]),
        ("prefill tok/s", ["prefill_base_tok_s", "prefill_multilora_tok_s"]),
        ("scale: decode tok/s", ["scale_small_pool_tok_s", "scale_large_pool_tok_s"]),
    ]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        keys = [k for k in keys if k in result]
        ax.bar(range(len(keys)), [result[k] for k in keys], color="tab:blue")
        ax.set_xticks(range(len(keys)), [k.replace("_tok_s", "") for k in keys], rotation=20, fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"loraplex engine on {result['device']} ({result['dtype']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.engine", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, help="HF model dir (default: pull SmolLM2 into LORAPLEX_HOME)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="auto: bf16 where the hardware computes in it natively, else fp32",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # One thread by default: on a small shared machine, a second OpenMP thread that loses its core
    # stalls every op at the barrier, which makes timings noisy rather than faster.
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--batch", type=int, default=32, help="concurrent requests = distinct adapters")
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--peft-new-tokens", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--prefill-requests", type=int, default=32)
    p.add_argument("--scale-pool", type=int, default=500)
    p.add_argument("--scale-rank", type=int, default=8)
    p.add_argument("--scale-waves", type=int, default=2)
    p.add_argument("--scale-new-tokens", type=int, default=32)
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="clock for throughput")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--plot", type=Path, default=RESULTS / "engine.png")
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = preferred_dtype(args.device) if args.dtype == "auto" else getattr(torch, args.dtype)
    model_dir = args.model_dir
    if model_dir is None:
        from services.common.base_models import pull_model
        from services.common.config import DEFAULT_MODEL, loraplex_home

        model_dir = pull_model(DEFAULT_MODEL, loraplex_home())
    log = (lambda *a: None) if args.json else print
    ranks = [int(r) for r in args.ranks.split(",")]
    n = args.batch
    adapter_ranks = [ranks[i % len(ranks)] for i in range(n)]
    config = EngineConfig(
        model_dir=model_dir,
        dtype=dtype,
        device=args.device,
        max_batch_size=max(64, n),
        max_adapter_slots=max(args.scale_pool, n),
    )
    engine = LLMEngine(config)
    result: dict = {
        "device": args.device,
        "dtype": str(dtype).removeprefix("torch."),
        "clock": args.clock,
        "threads": torch.get_num_threads(),
        "batch": n,
    }

    with tempfile.TemporaryDirectory() as tmp:
        peft_model, dirs = make_peft_adapters(model_dir, adapter_ranks, Path(tmp), dtype)
        weights = [load_adapter_weights(d, f"bench-{i}", dtype) for i, d in enumerate(dirs)]
    for w in weights:
        engine.load_adapter(w)
    digests: list[str | None] = [w.digest for w in weights]
    base_bytes = (
        sum(
            t.numel() * t.element_size()
            for name, t in engine.model.named_parameters()
            if "embed_tokens" not in name
        )
        + engine.model.lm_head.weight.numel() * engine.model.lm_head.weight.element_size()
    )
    adapter_bytes = sum(w.size_bytes for w in weights)

    # Decode.
    prompts = _prompts(engine, n, args.prompt_tokens, salt=1)
    run_engine(engine, prompts[:2], digests[:2], 4)  # warm-up
    base = run_engine(engine, prompts, [None] * n, args.new_tokens)
    log(f"base decode {base.tok_s:.1f} tok/s")
    multi = run_engine(engine, _prompts(engine, n, args.prompt_tokens, salt=2), digests, args.new_tokens)
    log(f"multi-LoRA decode {multi.tok_s:.1f} tok/s")
    ceiling = base.tok_s * base_bytes / (base_bytes + adapter_bytes)
    result |= {
        "multilora_tok_s": multi.tok_s,
        "base_tok_s": base.tok_s,
        "W_bytes": base_bytes,
        "A_bytes": adapter_bytes,
        "decode_ceiling_tok_s": ceiling,
        "ratio_vs_ceiling": multi.tok_s / ceiling,
        "multilora_vs_base": multi.tok_s / base.tok_s,
    }
    result |= _latency("decode_base", base) | _latency("decode_multilora", multi)
    if not args.skip_peft:
        peft = peft_decode_tok_s(peft_model, prompts, [f"a{i}" for i in range(n)], args.peft_new_tokens)
        log(f"PEFT mixed decode {peft:.1f} tok/s")
        result |= {"peft_mixed_tok_s": peft, "ratio_vs_peft": multi.tok_s / peft}
    del peft_model

    # Prefill.
    m = args.prefill_requests
    long_prompts = _prompts(engine, m, args.prefill_tokens, salt=3)
    pre_base = run_engine(engine, long_prompts, [None] * m, 1)
    pre_multi = run_engine(engine, _prompts(engine, m, args.prefill_tokens, salt=4), digests[:m] * 1, 1)
    log(f"prefill base {pre_base.prefill_tok_s:.1f} tok/s, multi-LoRA {pre_multi.prefill_tok_s:.1f} tok/s")
    result |= {
        "prefill_base_tok_s": pre_base.prefill_tok_s,
        "prefill_multilora_tok_s": pre_multi.prefill_tok_s,
        "prefill_ratio_vs_base": pre_multi.prefill_tok_s / pre_base.prefill_tok_s,
    }
    result |= _latency("prefill_base", pre_base) | _latency("prefill_multilora", pre_multi)

    # Scale: the same traffic shape over a small and a large resident pool.
    for d in list(engine.resident_adapters()):
        engine.unload_adapter(d)
    del weights
    # Scale: the same traffic shape (waves of n requests over n distinct adapters) with n adapters
    # resident, then with the whole pool resident and the traffic spread over all of it.
    pool: list[str] = []
    scale: dict[str, RunTimes] = {}
    for label, size in (("small", n), ("large", args.scale_pool)):
        while len(pool) < size:
            w = random_weights(
                engine, f"pool-{len(pool)}", args.scale_rank, seed=1000 + len(pool), dtype=dtype
            )
            engine.load_adapter(w)
            pool.append(w.digest)
        assert len(engine.resident_adapters()) == size
        # Each wave: n distinct adapters spread evenly over the resident set.
        waves: list[list[str | None]] = [
            [pool[(j * (size // n) + w) % size] for j in range(n)] for w in range(args.scale_waves)
        ]
        runs = [
            run_engine(
                engine, _prompts(engine, n, args.prompt_tokens, salt=5 + w), wave, args.scale_new_tokens
            )
            for w, wave in enumerate(waves)
        ]
        scale[label] = RunTimes(
            tok_s=len(runs) / sum(1 / r.tok_s for r in runs),  # equal tokens per wave
            prefill_tok_s=len(runs) / sum(1 / r.prefill_tok_s for r in runs),
            ttft=[t for r in runs for t in r.ttft],
            tpot=[t for r in runs for t in r.tpot],
        )
        log(f"scale: {size} resident, {scale[label].tok_s:.1f} tok/s")
    result |= {
        "scale_pool": args.scale_pool,
        "scale_small_pool_tok_s": scale["small"].tok_s,
        "scale_large_pool_tok_s": scale["large"].tok_s,
        "scaling_ratio": scale["large"].tok_s / scale["small"].tok_s,
    }
    result |= _latency("scale_small", scale["small"]) | _latency("scale_large", scale["large"])
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    plot(result, args.plot)
    result["plot"] = str(args.plot)
    args.plot.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
