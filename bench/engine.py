"""Does multi-LoRA batching run near the base model's speed?  `python -m bench.engine --json`

Workloads (one run, same machine, same prompts; bf16 where the CPU computes it natively):
- decode: N concurrent requests over N distinct adapters (mixed ranks, all linear layers) versus
  the same batch without adapters, versus PEFT's mixed-adapter generate(adapter_names=...);
- roofline: the step time the hardware allows for the adapter batch is the measured bare-model
  step plus max(LoRA FLOPs / the FLOP rate the bare step achieved, adapter bytes read / memory
  bandwidth measured in this run by summing a tensor far larger than the caches);
  ratio_vs_roofline = that time / the measured multi-LoRA step (1.0: as fast as the hardware allows);
- prefill: N long prompts with the same adapters versus without;
- scale: traffic spread over a large resident pool (2,000) versus a small one (N), N distinct
  adapters per batch in both;
- --profile: a bare and a multi-LoRA decode run of their own, each step's time split by kind of
  work (base GEMMs, LoRA, attention and its KV gather, sampler, other; bench/step_profile.py);
- --vs-vllm: vLLM's CPU build (an isolated venv under $LORAPLEX_HOME/bench-venvs/, installed on first
  use) on the same model, adapter files, prompts and thread count, bare and with the N adapters,
  each engine alone in turn; both timed on the wall clock as generated tokens / seconds for the
  whole batch, prefill included (base_vs_vllm, lora_vs_vllm).
- constrained (`--constrained`, on its own): a batch where half the rows follow a JSON schema
  versus the same batch all free; `constrained_decode_ratio` = free tok/s / mixed tok/s on the
  process's CPU clock (which counts the grammar threads' work too), `_wall_ratio` on the wall.
Prints one JSON object as its last line and draws bench/results/engine.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.step_profile import profile_decode
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
    decode_s: float = 0.0  # CLOCK seconds of the steps after every request's first token
    decode_steps: int = 0
    wall_s: float = 0.0  # wall seconds from the first add_request to the last token
    output_tokens: int = 0

    @property
    def step_s(self) -> float:
        return self.decode_s / self.decode_steps if self.decode_steps else 0.0

    @property
    def wall_tok_s(self) -> float:
        """Every generated token over the whole run's wall time, prefill included (vLLM's measure)."""
        return self.output_tokens / self.wall_s if self.wall_s else 0.0


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
    decode_steps = 0
    while engine.has_unfinished():
        outputs = engine.step()
        now, cpu_now = time.perf_counter(), CLOCK()
        if cpu_all_first is not None:
            decode_steps += 1
        for out in outputs:
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
            counts[out.request_id] = out.num_output_tokens
        if cpu_all_first is None and len(first) == len(prompts):
            cpu_all_first = cpu_now
    cpu_end, end = CLOCK(), time.perf_counter()
    assert cpu_all_first is not None
    decode_tokens = sum(n - 1 for n in counts.values())
    return RunTimes(
        tok_s=decode_tokens / (cpu_end - cpu_all_first) if decode_tokens else 0.0,
        prefill_tok_s=sum(len(p) for p in prompts) / (cpu_all_first - cpu_start),
        ttft=[first[r] - start for r in first],
        tpot=[(last[r] - first[r]) / (counts[r] - 1) for r in first if counts[r] > 1],
        decode_s=cpu_end - cpu_all_first,
        decode_steps=decode_steps,
        wall_s=end - start,
        output_tokens=sum(counts.values()),
    )


@dataclass(frozen=True)
class ModelShapes:
    """The linear layers' shapes, read from the model's config.json (not the engine's layout, which
    may fuse projections): module name -> (in_features, out_features)."""

    num_layers: int
    modules: dict[str, tuple[int, int]]
    vocab_size: int
    hidden: int
    kv_dim: int

    @classmethod
    def of(cls, model_dir: Path) -> ModelShapes:
        c = json.loads((model_dir / "config.json").read_text())
        hidden, inter = c["hidden_size"], c["intermediate_size"]
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or hidden // heads
        kv = c.get("num_key_value_heads", heads) * head_dim
        q = heads * head_dim
        modules = {
            "q_proj": (hidden, q),
            "k_proj": (hidden, kv),
            "v_proj": (hidden, kv),
            "o_proj": (q, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        return cls(c["num_hidden_layers"], modules, c["vocab_size"], hidden, kv)

    def linear_params(self) -> int:
        """Weights every token multiplies by: the decoder's linear layers and the LM head."""
        per_layer = sum(i * o for i, o in self.modules.values())
        return self.num_layers * per_layer + self.hidden * self.vocab_size

    def step_flops(self, tokens: int, context: int) -> float:
        """A decode step's matmul FLOPs: 2 per weight per token, plus attention's QK^T and PV over
        `context` positions (per token, per layer: 2 * 2 * context * q_dim)."""
        q_dim = self.modules["q_proj"][1]
        return tokens * (2.0 * self.linear_params() + 4.0 * self.num_layers * context * q_dim)


def lora_flops_per_token(weights: AdapterWeights) -> float:
    """x @ A^T then @ B^T at every targeted module: 2 * r * (in + out) FLOPs per token."""
    return sum(2.0 * (t.a.numel() + t.b.numel()) for t in weights.tensors.values())


def measure_bandwidth(dtype: torch.dtype, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second this process reads from memory: the best of a few sums over a tensor far
    larger than the caches (what reading each adapter once per step costs at best). Timed on CLOCK,
    the clock the step times it is compared with use."""
    x = torch.ones(mib * 2**20 // torch.tensor([], dtype=dtype).element_size(), dtype=dtype)
    x.sum()  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        x.sum()
        best = min(best, CLOCK() - t0)
    return x.numel() * x.element_size() / best


def roofline(
    shapes: ModelShapes,
    base: RunTimes,
    multi: RunTimes,
    batch: int,
    context: int,
    weights: list[AdapterWeights],
    bandwidth: float,
) -> dict[str, float]:
    """The adapter batch's step time the hardware allows, its terms, and the measured step."""
    bare_step = base.step_s
    achieved = shapes.step_flops(batch, context) / bare_step  # FLOP/s the bare step reached
    lora_flops = sum(lora_flops_per_token(w) for w in weights)  # one token per row per step
    adapter_bytes = sum(w.size_bytes for w in weights)  # each distinct adapter read once
    roof = bare_step + max(lora_flops / achieved, adapter_bytes / bandwidth)
    return {
        "roofline_bare_step_ms": 1000 * bare_step,
        "roofline_lora_flops": lora_flops,
        "roofline_achieved_flop_s": achieved,
        "roofline_adapter_bytes": adapter_bytes,
        "roofline_bandwidth_bytes_s": bandwidth,
        "roofline_compute_ms": 1000 * lora_flops / achieved,
        "roofline_memory_ms": 1000 * adapter_bytes / bandwidth,
        "roofline_step_ms": 1000 * roof,
        "multilora_step_ms": 1000 * multi.step_s,
        "ratio_vs_roofline": roof / multi.step_s,
    }


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
    shapes: ModelShapes,
    digest: str,
    rank: int,
    seed: int,
    dtype: torch.dtype,
    targets: tuple[str, ...] = TARGETS,
) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes.num_layers):
        for name in targets:
            fan_in, fan_out = shapes.modules[name]
            a = (torch.randn(rank, fan_in, generator=gen) * 0.02).to(dtype)
            b = (torch.randn(fan_out, rank, generator=gen) * 0.02).to(dtype)
            tensors[(layer, name)] = LoraModuleWeights(a=a, b=b, scale=2.0)
    size = sum((t.a.numel() + t.b.numel()) * t.a.element_size() for t in tensors.values())
    return AdapterWeights(digest, "LORA", tensors, dict.fromkeys(targets, rank), size)


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


# Long enough that no constrained row can finish its grammar inside the measured tokens, so the
# mixed and the free batch decode the same number of tokens per row.
BENCH_SCHEMA = json.dumps(
    {
        "type": "array",
        "minItems": 64,
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "name": {"type": "string", "maxLength": 24},
                "tags": {"type": "array", "items": {"enum": ["new", "used", "sale"]}},
            },
            "required": ["id", "name", "tags"],
            "additionalProperties": False,
        },
    }
)


def _decode_with_grammars(
    engine: LLMEngine, prompts: list[list[int]], constrained: list[bool], new_tokens: int
):
    """Decode tokens per second after every row's first token, on the wall and on this process's
    CPU clock (which includes the grammar threads' work)."""
    from services.worker.engine.constrained import GrammarCompiler, ResponseFormat

    compiler = GrammarCompiler(engine.model.config.vocab_size)
    fmt = ResponseFormat("json_schema", BENCH_SCHEMA)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i, (prompt, c) in enumerate(zip(prompts, constrained, strict=True)):
        grammar = compiler.compile(fmt, engine.tokenizer) if c else None
        engine.add_request(EngineRequest(f"c{i}", prompt, params, grammar=grammar))
    started: set[str] = set()
    tokens = 0
    wall0 = cpu0 = 0.0
    while engine.has_unfinished():
        outputs = engine.step()
        if len(started) == len(prompts):
            tokens += sum(len(o.new_token_ids) for o in outputs)
        for o in outputs:
            assert o.finish_reason in (None, "length"), o.finish_reason
            started.add(o.request_id)
        if len(started) == len(prompts) and not wall0:
            wall0, cpu0 = time.perf_counter(), time.process_time()
    return tokens / (time.perf_counter() - wall0), tokens / (time.process_time() - cpu0)


def constrained_decode(
    engine: LLMEngine, n: int, prompt_tokens: int, new_tokens: int, rounds: int = 3
) -> dict:
    """Half the batch constrained versus none, alternated `rounds` times; medians."""
    half = [i % 2 == 0 for i in range(n)]
    _decode_with_grammars(engine, _prompts(engine, 2, prompt_tokens, salt=90), [True, False], 4)  # warm-up
    free: list[tuple[float, float]] = []
    mixed: list[tuple[float, float]] = []
    for r in range(rounds):
        free.append(
            _decode_with_grammars(
                engine, _prompts(engine, n, prompt_tokens, 100 + r), [False] * n, new_tokens
            )
        )
        mixed.append(
            _decode_with_grammars(engine, _prompts(engine, n, prompt_tokens, 200 + r), half, new_tokens)
        )
    free_wall, free_cpu = _pct([f[0] for f in free], 0.5), _pct([f[1] for f in free], 0.5)
    mixed_wall, mixed_cpu = _pct([m[0] for m in mixed], 0.5), _pct([m[1] for m in mixed], 0.5)
    return {
        "constrained_batch": n,
        "constrained_rows": sum(half),
        "constrained_free_tok_s": free_cpu,
        "constrained_mixed_tok_s": mixed_cpu,
        "constrained_decode_ratio": free_cpu / mixed_cpu,
        "constrained_decode_wall_ratio": free_wall / mixed_wall,
    }


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

    panels = [
        (
            "wall tok/s: loraplex vs vLLM",
            ["wall_base_tok_s", "vllm_base_tok_s", "wall_multilora_tok_s", "vllm_lora_tok_s"],
        ),
        ("decode tok/s", ["base_tok_s", "multilora_tok_s", "peft_mixed_tok_s"]),
        ("prefill tok/s", ["prefill_base_tok_s", "prefill_multilora_tok_s"]),
        ("scale: decode tok/s", ["scale_small_pool_tok_s", "scale_large_pool_tok_s"]),
    ]
    panels = [(title, keys) for title, keys in panels if any(k in result for k in keys)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        keys = [k for k in keys if k in result]
        colours = ["tab:orange" if k.startswith("vllm") else "tab:blue" for k in keys]
        ax.bar(range(len(keys)), [result[k] for k in keys], color=colours)
        ax.set_xticks(range(len(keys)), [k.replace("_tok_s", "") for k in keys], rotation=20, fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"loraplex engine on {result['device']} ({result['dtype']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def vs_vllm(
    args: argparse.Namespace,
    model_dir: Path,
    dtype: torch.dtype,
    prompts: tuple[list[list[int]], list[list[int]]],
    adapter_dirs: list[Path],
    ours: tuple[RunTimes, RunTimes],
    tmp: Path,
    log,
) -> dict:
    """vLLM bare and with the same adapters, each in its own process after ours finished."""
    from bench.vllm_env import ensure_vllm, run_driver
    from services.common.config import loraplex_home

    python = ensure_vllm(loraplex_home(), log=log)
    ours_base, ours_lora = ours
    spec = {
        "model_dir": str(model_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "max_lora_rank": max(64, max(int(r) for r in args.ranks.split(","))),
    }
    base = run_driver(python, spec | {"prompts": prompts[0], "adapters": []}, tmp / "vllm-base.json")
    log(f"vLLM bare {base['tok_s']:.1f} tok/s (ours {ours_base.wall_tok_s:.1f})")
    lora_spec = spec | {"prompts": prompts[1], "adapters": [str(d) for d in adapter_dirs]}
    lora = run_driver(python, lora_spec, tmp / "vllm-lora.json")
    log(f"vLLM {len(set(adapter_dirs))} adapters {lora['tok_s']:.1f} tok/s (ours {ours_lora.wall_tok_s:.1f})")
    return {
        "vllm_version": base["vllm_version"],
        "vllm_base_tok_s": base["tok_s"],
        "vllm_lora_tok_s": lora["tok_s"],
        # Engine construction (model load, KV cache, warm-up compile), not counted in tok/s.
        "vllm_base_load_s": base["load_s"],
        "vllm_lora_load_s": lora["load_s"],
        "wall_base_tok_s": ours_base.wall_tok_s,
        "wall_multilora_tok_s": ours_lora.wall_tok_s,
        "base_vs_vllm": ours_base.wall_tok_s / base["tok_s"],
        "lora_vs_vllm": ours_lora.wall_tok_s / lora["tok_s"],
    }


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
    p.add_argument("--scale-pool", type=int, default=2000)
    p.add_argument("--scale-rank", type=int, default=8)
    # q/v by default: 2,000 all-linear rank-8 adapters take ~10 GB in bf16 (20 GB in fp32), more
    # than a small machine has; the ratio compares the same adapter shape at both pool sizes.
    p.add_argument("--scale-targets", default="q_proj,v_proj", help="modules the pool's adapters target")
    p.add_argument("--scale-waves", type=int, default=2)
    p.add_argument("--scale-new-tokens", type=int, default=32)
    p.add_argument("--bandwidth-mib", type=int, default=512, help="tensor summed to measure memory bandwidth")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="clock for throughput")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also time a bare and a multi-LoRA decode run by kind of work (GEMM, LoRA, attention, ...)",
    )
    p.add_argument(
        "--vs-vllm",
        action="store_true",
        help="also run vLLM's CPU build (installed on first use under $LORAPLEX_HOME/bench-venvs/)",
    )
    p.add_argument("--plot", type=Path, default=RESULTS / "engine.png")
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    p.add_argument(
        "--constrained",
        action="store_true",
        help="only the JSON-schema workload: half the batch constrained vs none (no adapters, no plot)",
    )
    args = p.parse_args(argv)
    for flag in ("new_tokens", "peft_new_tokens", "scale_new_tokens"):
        if getattr(args, flag) < 2:
            p.error(
                f"--{flag.replace('_', '-')} must be at least 2: decode speed is timed over the steps "
                "after every request's first token"
            )
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
    scale_targets = tuple(args.scale_targets.split(","))
    unknown = set(scale_targets) - set(TARGETS)
    if unknown:
        p.error(f"--scale-targets: unknown modules {sorted(unknown)}; choose from {','.join(TARGETS)}")
    n = args.batch
    adapter_ranks = [ranks[i % len(ranks)] for i in range(n)]
    shapes = ModelShapes.of(model_dir)
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
    if args.constrained:
        result |= constrained_decode(engine, n, args.prompt_tokens, args.scale_new_tokens)
        log(f"constrained rows: decode ratio {result['constrained_decode_ratio']:.3f} (free / mixed, CPU)")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
        return 0
    # The adapter files outlive the decode phase: vLLM reads the same ones.
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        return _run(args, engine, shapes, model_dir, dtype, adapter_ranks, scale_targets, result, tmp, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    engine: LLMEngine,
    shapes: ModelShapes,
    model_dir: Path,
    dtype: torch.dtype,
    adapter_ranks: list[int],
    scale_targets: tuple[str, ...],
    result: dict[str, Any],
    tmp: Path,
    log: Callable[..., None],
) -> int:
    n = args.batch
    peft_model, dirs = make_peft_adapters(model_dir, adapter_ranks, tmp, dtype)
    weights = [load_adapter_weights(d, f"bench-{i}", dtype) for i, d in enumerate(dirs)]
    for w in weights:
        engine.load_adapter(w)
    digests: list[str | None] = [w.digest for w in weights]

    # Decode.
    prompts = _prompts(engine, n, args.prompt_tokens, salt=1)
    run_engine(engine, prompts[:2], digests[:2], 4)  # warm-up
    base = run_engine(engine, prompts, [None] * n, args.new_tokens)
    log(f"base decode {base.tok_s:.1f} tok/s")
    # Other prompts, so the prefix cache cannot make this run cheaper; vLLM gets the same two sets.
    lora_prompts = _prompts(engine, n, args.prompt_tokens, salt=2)
    multi = run_engine(engine, lora_prompts, digests, args.new_tokens)
    log(f"multi-LoRA decode {multi.tok_s:.1f} tok/s")
    bandwidth = measure_bandwidth(dtype, args.bandwidth_mib)
    # Mean context over the decode steps: the prompt plus half the generated tokens.
    context = args.prompt_tokens + args.new_tokens // 2
    roof = roofline(shapes, base, multi, n, context, weights, bandwidth)
    log(f"roofline step {roof['roofline_step_ms']:.2f} ms, measured {roof['multilora_step_ms']:.2f} ms")
    result |= {
        "multilora_tok_s": multi.tok_s,
        "base_tok_s": base.tok_s,
        "multilora_vs_base": multi.tok_s / base.tok_s,
        **roof,
    }
    result |= _latency("decode_base", base) | _latency("decode_multilora", multi)
    if args.profile:
        result |= step_profiles(engine, n, args.prompt_tokens, args.new_tokens, digests, log)
    if not args.skip_peft:
        peft = peft_decode_tok_s(peft_model, prompts, [f"a{i}" for i in range(n)], args.peft_new_tokens)
        log(f"PEFT mixed decode {peft:.1f} tok/s")
        result |= {"peft_mixed_tok_s": peft, "ratio_vs_peft": multi.tok_s / peft}
    del peft_model

    # Prefill.
    if not args.skip_prefill:
        m = args.prefill_requests
        long_prompts = _prompts(engine, m, args.prefill_tokens, salt=3)
        pre_base = run_engine(engine, long_prompts, [None] * m, 1)
        pre_multi = run_engine(engine, _prompts(engine, m, args.prefill_tokens, salt=4), digests[:m] * 1, 1)
        log(
            f"prefill base {pre_base.prefill_tok_s:.1f} tok/s, multi-LoRA {pre_multi.prefill_tok_s:.1f} tok/s"
        )
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
    if not args.skip_scale:
        result |= scale(args, engine, shapes, dtype, scale_targets, log)

    if args.vs_vllm:
        result |= vs_vllm(args, model_dir, dtype, (prompts, lora_prompts), dirs, (base, multi), tmp, log)

    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    plot(result, args.plot)
    result["plot"] = str(args.plot)
    args.plot.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


def step_profiles(
    engine: LLMEngine,
    n: int,
    prompt_tokens: int,
    new_tokens: int,
    digests: list[str | None],
    log: Callable[..., None],
) -> dict[str, float]:
    """The decode step by kind of work, bare and with the n adapters (runs of their own)."""
    out: dict[str, float] = {}
    bare: list[str | None] = [None] * n
    for label, adapters, salt in (("base", bare, 6), ("multilora", digests, 7)):
        prompts = _prompts(engine, n, prompt_tokens, salt=salt)
        times = profile_decode(engine, prompts, adapters, new_tokens, CLOCK, label)
        log(
            f"profile {label}: step {times[f'profile_{label}_step_ms']:.1f} ms = "
            + ", ".join(
                f"{kind} {times[f'profile_{label}_{kind}_ms']:.1f}"
                for kind in ("gemm", "lora", "attention", "sampler", "other")
            )
            + f" (KV gather {times[f'profile_{label}_kv_gather_ms']:.1f} of attention)"
        )
        out |= times
    return out


def scale(args, engine, shapes, dtype, targets, log) -> dict:
    """Waves of n requests over n distinct adapters, with n adapters resident, then with the whole
    pool resident and the traffic spread over all of it."""
    n = args.batch
    pool: list[str] = []
    runs_by: dict[str, RunTimes] = {}
    for label, size in (("small", n), ("large", args.scale_pool)):
        while len(pool) < size:
            w = random_weights(
                shapes,
                f"pool-{len(pool)}",
                args.scale_rank,
                seed=1000 + len(pool),
                dtype=dtype,
                targets=targets,
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
        runs_by[label] = RunTimes(
            tok_s=len(runs) / sum(1 / r.tok_s for r in runs),  # equal tokens per wave
            prefill_tok_s=len(runs) / sum(1 / r.prefill_tok_s for r in runs),
            ttft=[t for r in runs for t in r.ttft],
            tpot=[t for r in runs for t in r.tpot],
        )
        log(f"scale: {size} resident, {runs_by[label].tok_s:.1f} tok/s")
    for d in pool:
        engine.unload_adapter(d)
    out = {
        "scale_pool": args.scale_pool,
        "scale_targets": ",".join(targets),
        "scale_small_pool_tok_s": runs_by["small"].tok_s,
        "scale_large_pool_tok_s": runs_by["large"].tok_s,
        "scaling_ratio": runs_by["large"].tok_s / runs_by["small"].tok_s,
    }
    return out | _latency("scale_small", runs_by["small"]) | _latency("scale_large", runs_by["large"])


if __name__ == "__main__":
    raise SystemExit(main())
