"""Serving under open-loop load, S-LoRA's method.  `python -m bench.serving --json [--quick]`

One seeded trace: Poisson arrivals at several offered rates (requests/s); each request draws its
adapter from 1,000 adapters with Zipf(1.0) popularity (ranks 8/16/32/64; target sets q/v only,
attention, all linear), its prompt and output lengths uniformly from [mean/2, 3*mean/2] (means 200
and 100 tokens by default), and distinct prompt tokens (no prefix cache hits). The same trace
(arrivals, lengths, prompts) runs again with no adapters: the baseline. The engine is the
worker's (in-process, one step loop); an adapter not resident when its request arrives is made
resident then, evicting the least recently used idle one past --resident, inside the timed loop
as the worker's own load would be.

The 1,000 adapters are made cheaply: one PEFT-written adapter per (rank, target set), 12 files,
cached under $LORAPLEX_HOME/bench-adapters/serving/ and read through the worker's loader; adapter
i is its template with B scaled by a seeded per-adapter factor (distinct weights, its own memory).

Per rate and trace: throughput (generated tokens / seconds from the first arrival to the last
token), TTFT and TPOT p50/p99. Key: throughput_ratio_vs_base at the highest offered rate
(saturation: `saturated` says whether the base trace fell behind its offered rate there).
Prints one JSON object as its last line; writes bench/results/serving.json and serving.png.
A default run (16 requests per rate and trace, rates 0.5/1/2/4 req/s) spends at least 60 s per trace
in arrivals alone and about 5 minutes in all on a quiet 2-core machine, far longer on a loaded one
(scale it with --requests, --prompt-mean, --output-mean, --rates); --quick is a smoke test.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.engine import _pct
from services.worker.engine.adapter_weights import AdapterWeights, LoraModuleWeights, load_adapter_weights
from services.worker.engine.config import EngineConfig, preferred_dtype
from services.worker.engine.llm_engine import AdapterInUse, EngineRequest, LLMEngine
from services.worker.engine.sampling import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = 1  # bump when the template recipe changes, so cached templates are rebuilt
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "qv": ("q_proj", "v_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds after the trace's start
    prompt: list[int]
    output_tokens: int
    adapter: int  # index into the adapter population


@dataclass
class RunStats:
    throughput_tok_s: float
    request_rate: float  # finished requests per second
    duration_s: float
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    adapter_loads: int = 0

    def summary(self) -> dict[str, float]:
        return {
            "throughput_tok_s": self.throughput_tok_s,
            "request_rate": self.request_rate,
            "duration_s": self.duration_s,
            "ttft_p50_ms": 1000 * _pct(self.ttft, 0.5),
            "ttft_p99_ms": 1000 * _pct(self.ttft, 0.99),
            "tpot_p50_ms": 1000 * _pct(self.tpot, 0.5),
            "tpot_p99_ms": 1000 * _pct(self.tpot, 0.99),
            "adapter_loads": self.adapter_loads,
        }


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k**s) for k in range(1, n + 1)]


def make_trace(
    *,
    rate: float,
    requests: int,
    num_adapters: int,
    zipf_s: float,
    prompt_mean: int,
    output_mean: int,
    vocab: tuple[int, int],
    seed: int,
) -> list[TraceRequest]:
    """Poisson arrivals at `rate`; Zipf popularity over a seeded permutation of the adapters (so
    the popular ones are not all of one rank or target set); uniform lengths around the means."""
    rng = random.Random(seed)
    by_popularity = list(range(num_adapters))
    rng.shuffle(by_popularity)
    weights = zipf_weights(num_adapters, zipf_s)
    t = 0.0
    trace = []
    for _ in range(requests):
        t += rng.expovariate(rate)
        plen = rng.randint(max(1, prompt_mean // 2), max(1, prompt_mean * 3 // 2))
        olen = rng.randint(max(1, output_mean // 2), max(1, output_mean * 3 // 2))
        prompt = [rng.randrange(*vocab) for _ in range(plen)]
        adapter = by_popularity[rng.choices(range(num_adapters), weights)[0]]
        trace.append(TraceRequest(t, prompt, olen, adapter))
    return trace


def adapter_kind(i: int, ranks: list[int]) -> tuple[int, str]:
    """Adapter i's rank and target set: every combination equally often."""
    return ranks[i % len(ranks)], list(TARGET_SETS)[(i // len(ranks)) % len(TARGET_SETS)]


def build_templates(model_dir: Path, ranks: list[int], cache: Path, dtype: torch.dtype) -> dict:
    """One PEFT-written adapter per (rank, target set), cached; read through the worker's loader."""
    from services.common.base_models import build_atomically
    from services.devtools.adapters import AdapterSpec, is_adapter_dir, model_name

    templates: dict[tuple[int, str], AdapterWeights] = {}
    for j, (kind, targets) in enumerate(TARGET_SETS.items()):
        for r in ranks:
            spec = AdapterSpec(f"serving-{kind}-r{r}", targets, r=r, lora_alpha=2 * r, seed=7000 + 10 * j + r)
            dest = cache / f"{model_name(model_dir)}--{spec.name}--v{RECIPE}"
            path = build_atomically(dest, functools.partial(_write, model_dir, spec), done=is_adapter_dir)
            templates[(r, kind)] = load_adapter_weights(path, f"template-{kind}-r{r}", dtype)
    return templates


def _write(model_dir: Path, spec, out: Path) -> None:
    from services.devtools.adapters import random_adapter

    random_adapter(model_dir, spec, out)


def derive(template: AdapterWeights, index: int, digest: str) -> AdapterWeights:
    """Adapter `index`: its template with B scaled by a seeded factor (A shared, B its own copy)."""
    factor = random.Random(index).uniform(0.5, 1.5)
    tensors = {
        key: LoraModuleWeights(a=m.a, b=m.b * factor, scale=m.scale, magnitude=m.magnitude)
        for key, m in template.tensors.items()
    }
    return AdapterWeights(digest, template.variant, tensors, dict(template.ranks), template.size_bytes)


class AdapterPool:
    """The resident set: at most `capacity` adapters, least recently used idle one evicted first."""

    def __init__(self, engine: LLMEngine, templates: dict, ranks: list[int], capacity: int) -> None:
        self.engine, self.templates, self.ranks, self.capacity = engine, templates, ranks, capacity
        self.lru: dict[str, None] = {}  # insertion order = recency
        self.loads = 0

    def ensure(self, index: int) -> str:
        digest = f"serving-{index}"
        if digest in self.lru:
            self.lru.pop(digest)
            self.lru[digest] = None
            return digest
        for victim in list(self.lru):
            if len(self.lru) < self.capacity:
                break
            try:
                self.engine.unload_adapter(victim)
            except AdapterInUse:
                continue  # serving requests: the next least recently used instead
            del self.lru[victim]
        rank, kind = adapter_kind(index, self.ranks)
        self.engine.load_adapter(derive(self.templates[(rank, kind)], index, digest))
        self.lru[digest] = None
        self.loads += 1
        return digest

    def clear(self) -> None:
        for digest in list(self.lru):
            self.engine.unload_adapter(digest)
        self.lru.clear()


def run_trace(engine: LLMEngine, trace: list[TraceRequest], pool: AdapterPool | None, tag: str) -> RunStats:
    """Replay the trace open-loop on the wall clock: a request is added when its arrival time has
    passed, whatever the engine's backlog; the loop steps while anything is unfinished."""
    loads_before = pool.loads if pool else 0
    arrivals: dict[str, float] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    pending = sorted(enumerate(trace), key=lambda x: x[1].arrival)
    nxt = 0
    t0 = time.perf_counter()
    while nxt < len(pending) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(pending) and pending[nxt][1].arrival <= now:
            i, req = pending[nxt]
            nxt += 1
            rid = f"{tag}-{i}"
            adapter = pool.ensure(req.adapter) if pool else None
            params = SamplingParams(max_tokens=req.output_tokens, ignore_eos=True)
            engine.add_request(EngineRequest(rid, req.prompt, params, adapter))
            arrivals[rid] = req.arrival
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[nxt][1].arrival - (time.perf_counter() - t0)))
            continue
        outputs = engine.step()
        now = time.perf_counter() - t0
        for out in outputs:
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
            counts[out.request_id] = out.num_output_tokens
    span = max(last.values()) - min(arrivals.values())
    return RunStats(
        throughput_tok_s=sum(counts.values()) / span,
        request_rate=len(counts) / span,
        duration_s=span,
        ttft=[first[r] - arrivals[r] for r in first],
        tpot=[(last[r] - first[r]) / (counts[r] - 1) for r in first if counts[r] > 1],
        adapter_loads=(pool.loads - loads_before) if pool else 0,
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [row["offered_rate"] for row in result["rates"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        ("throughput (tok/s)", "throughput_tok_s", ("",)),
        ("TTFT (ms)", "ttft_{}_ms", ("p50", "p99")),
        ("TPOT (ms)", "tpot_{}_ms", ("p50", "p99")),
    ]
    for ax, (title, key, pcts) in zip(axes, panels, strict=True):
        for trace, colour in (("base", "tab:gray"), ("lora", "tab:blue")):
            for pct, style in zip(pcts, ("-o", "--x"), strict=False):
                name = key.format(pct) if pct else key
                values = [row[trace][name] for row in result["rates"]]
                ax.plot(rates, values, style, color=colour, label=f"{trace} {pct}".strip())
        ax.set_xlabel("offered rate (req/s)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"loraplex serving: {result['adapters']} adapters, Zipf({result['zipf']}), "
        f"{result['requests']} requests per rate ({result['dtype']}, {result['threads']} thread(s))"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.serving", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, help="HF model dir (default: pull SmolLM2 into LORAPLEX_HOME)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--rates", default="0.5,1,2,4", help="offered request rates (req/s), at least 4")
    p.add_argument("--requests", type=int, default=16, help="requests per rate and trace")
    p.add_argument("--adapters", type=int, default=1000, help="adapter population")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--resident", type=int, default=64, help="adapters resident at once (LRU beyond)")
    p.add_argument("--prompt-mean", type=int, default=200)
    p.add_argument("--output-mean", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter-cache", type=Path, help="default: $LORAPLEX_HOME/bench-adapters/serving")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny trace, seconds")
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.requests, args.adapters, args.resident = "2,4,8,16", 6, 50, 8
        args.prompt_mean, args.output_mean = 24, 6
    rates = [float(r) for r in args.rates.split(",")]
    if len(rates) < 4 or min(rates) <= 0:
        p.error("--rates needs at least 4 positive rates")
    if args.threads:
        torch.set_num_threads(args.threads)
    from services.common.config import DEFAULT_MODEL, loraplex_home

    home = loraplex_home()
    model_dir = args.model_dir
    if model_dir is None:
        from services.common.base_models import pull_model

        model_dir = pull_model(DEFAULT_MODEL, home)
    cache = args.adapter_cache or home / "bench-adapters" / "serving"
    dtype = preferred_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    log = (lambda *a: None) if args.json else print
    ranks = [int(r) for r in args.ranks.split(",")]

    templates = build_templates(model_dir, ranks, cache, dtype)
    base_config = EngineConfig(model_dir=model_dir, dtype=dtype)
    # Requests in flight or queued pin their adapters, so the resident set may pass --resident
    # while every resident adapter is busy; the slots leave room for one per such request.
    slots = args.resident + base_config.max_batch_size + base_config.max_waiting
    engine = LLMEngine(EngineConfig(model_dir=model_dir, dtype=dtype, max_adapter_slots=slots))
    pool = AdapterPool(engine, templates, ranks, args.resident)
    vocab = (10, engine.model.config.vocab_size)
    # Warm-up: one request without and one with an adapter, untimed.
    warm = make_trace(
        rate=100.0, requests=2, num_adapters=1, zipf_s=1.0, prompt_mean=8, output_mean=4, vocab=vocab, seed=99
    )
    run_trace(engine, warm, None, "warm-base")
    run_trace(engine, warm, pool, "warm-lora")
    pool.clear()

    rows = []
    for k, rate in enumerate(rates):
        trace = make_trace(
            rate=rate,
            requests=args.requests,
            num_adapters=args.adapters,
            zipf_s=args.zipf,
            prompt_mean=args.prompt_mean,
            output_mean=args.output_mean,
            vocab=vocab,
            seed=args.seed * 1000 + k,
        )
        base = run_trace(engine, trace, None, f"base-{k}")
        lora = run_trace(engine, trace, pool, f"lora-{k}")
        pool.clear()  # each rate starts cold, as the base does
        row = {
            "offered_rate": rate,
            "distinct_adapters": len({r.adapter for r in trace}),
            "base": base.summary(),
            "lora": lora.summary(),
            "throughput_ratio_vs_base": lora.throughput_tok_s / base.throughput_tok_s,
        }
        rows.append(row)
        log(
            f"rate {rate:g}/s: base {base.throughput_tok_s:.1f} tok/s, "
            f"lora {lora.throughput_tok_s:.1f} tok/s ({len({r.adapter for r in trace})} adapters, "
            f"{lora.adapter_loads} loads)"
        )
    top: dict = rows[-1]
    result = {
        "model": model_dir.name,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "adapters": args.adapters,
        "zipf": args.zipf,
        "ranks": ranks,
        "target_sets": list(TARGET_SETS),
        "resident": args.resident,
        "requests": args.requests,
        "prompt_mean": args.prompt_mean,
        "output_mean": args.output_mean,
        "rates": rows,
        "saturation_rate": top["offered_rate"],
        # The base trace finished slower than requests arrived: the engine was the bottleneck.
        "saturated": top["base"]["request_rate"] < 0.9 * top["offered_rate"],
        "throughput_ratio_vs_base": top["throughput_ratio_vs_base"],
    }
    result = json.loads(json.dumps(result), parse_float=lambda s: round(float(s), 4))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    plot(result, args.results_dir / "serving.png")
    result["plot"] = str(args.results_dir / "serving.png")
    (args.results_dir / "serving.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
