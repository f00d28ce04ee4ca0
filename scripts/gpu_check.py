"""The engine on CUDA, one command: the PEFT oracle, then `bench engine`, on a Llama-3.2-1B-shaped
model with random weights built on the spot (no weights travel). Run it as `scripts/gpu-check`.

Needs only torch (with CUDA), transformers, peft and safetensors (a transformers dependency):
nothing else this repository depends on (no database, gRPC or plotting libraries), so it runs on a
bare GPU machine. Budget: well under 8 minutes on one H100/H200-class GPU.

The model has Llama-3.2-1B's shapes (16 layers, hidden 2048, MLP 8192, 32 query heads over 8 KV
heads, head_dim 64, vocab 128256, tied embeddings, rope theta 500000) but plain RoPE: the engine
refuses Llama 3's rope scaling, and scaling does not change any kernel's cost. Its tokenizer is a
word-level vocabulary ("t0" ... "t128255"); prompts are token ids.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VOCAB = 128256
NEW_TOKENS = 6
Reference = dict[tuple[str | None, int], tuple[list[int], torch.Tensor, torch.Tensor]]
LOGIT_TOLERANCE = 2e-3  # fp32, 16 layers of width 2048 (the CPU oracle's tiny model allows 1e-3)


LLAMA_3_2_1B = {
    "vocab_size": VOCAB,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
}
# --smoke: the same script end to end on the CPU with a small model, to check the script itself.
SMOKE = {**LLAMA_3_2_1B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}


def build_model(out: Path, shape: dict, device: str) -> Path:
    """A random Llama-3.2-1B-shaped checkpoint (bf16 safetensors) and a word-level tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
    )
    config.architectures = ["LlamaForCausalLM"]
    # transformers 5 keeps theta in rope_parameters, 4.x as an attribute; the engine reads either.
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = 500000.0
    else:
        config.rope_theta = 500000.0
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).bfloat16()
    model.save_pretrained(out, safe_serialization=True)
    del model
    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", bos_token="t2")
    fast.save_pretrained(out)
    return out


def peft_reference(
    model_dir: Path, adapters: dict[str, Path], prompts: list[list[int]], device: str
) -> Reference:
    """(adapter or None, prompt index) -> PEFT's greedy tokens, first and last step logits (fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = cast(Any, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)).to(device)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    want: Reference = {}

    def generate(ids: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        x = torch.tensor([ids], device=device)
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        return out.sequences[0, len(ids) :].tolist(), out.logits[0][0].cpu(), out.logits[-1][0].cpu()

    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            for p, ids in enumerate(prompts):
                want[(name, p)] = generate(ids)
        with model.disable_adapter():
            for p, ids in enumerate(prompts):
                want[(None, p)] = generate(ids)
    return want


def oracle(model_dir: Path, work: Path, device: str) -> dict:
    """A mixed batch (every PEFT variant and base rows in one step) against PeftModel, fp32 on CUDA:
    greedy tokens must match exactly and logits within LOGIT_TOLERANCE."""
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.llm_engine import EngineRequest, LLMEngine
    from services.worker.engine.sampling import SamplingParams
    from tests.engine_support import VARIANTS, build_peft_adapter, digest_of, load_weights

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    adapters = {
        s.name: build_peft_adapter(model_dir, work / s.name, s, seed=i) for i, s in enumerate(VARIANTS)
    }
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 17, 11)]
    want = peft_reference(model_dir, adapters, prompts, device)

    engine = LLMEngine(
        EngineConfig(model_dir=model_dir, dtype=torch.float32, device=device, kv_cache_bytes=4 << 30)
    )
    for path in adapters.values():
        engine.load_adapter(load_weights(path))
    cases: dict[str, tuple[str | None, int]] = {}
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for name in [*adapters, None]:
        digest = digest_of(adapters[name]) if name is not None else None
        for p, ids in enumerate(prompts):
            rid = f"{name}/{p}"
            cases[rid] = (name, p)
            engine.add_request(EngineRequest(rid, ids, params, digest))
    first: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        outputs = engine.step()
        logits, rids = engine.runner.last_logits
        for row, rid in enumerate(rids):
            first.setdefault(rid, logits[row].cpu())
            last[rid] = logits[row].cpu()
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    worst = 0.0
    failures = []
    for rid, key in cases.items():
        want_tokens, want_first, want_last = want[key]
        diff = max((first[rid] - want_first).abs().max().item(), (last[rid] - want_last).abs().max().item())
        worst = max(worst, diff)
        if tokens[rid] != want_tokens or diff > LOGIT_TOLERANCE:
            failures.append(f"{rid}: tokens {tokens[rid]} vs PEFT {want_tokens}, max logit diff {diff:.2e}")
    return {"oracle_cases": len(cases), "oracle_max_logit_diff": worst, "oracle_failures": failures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n")[0])
    p.add_argument("--skip-oracle", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--keep", type=Path, help="build the model here and keep it (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU, oracle only")
    args = p.parse_args(argv)
    device, shape = ("cpu", SMOKE) if args.smoke else ("cuda", LLAMA_3_2_1B)
    if args.smoke:
        args.skip_bench = True
    elif not torch.cuda.is_available():
        print(
            "gpu-check needs a CUDA device; this machine has none (run it on a GPU machine)", file=sys.stderr
        )
        return 2
    t0 = time.perf_counter()
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    result: dict = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        model_dir = root / "llama-3.2-1b-shaped"
        if not (model_dir / "config.json").is_file():
            build_model(model_dir, shape, device)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        if not args.skip_oracle:
            result |= oracle(model_dir, root / "adapters", device)
            result["oracle_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({k: v for k, v in result.items() if k != "oracle_failures"}), flush=True)
            for line in result["oracle_failures"]:
                print("ORACLE MISMATCH", line, flush=True)
        if not args.skip_bench:
            # PEFT's own decode runs on the CPU inside bench engine, which says nothing about a GPU
            # and takes long on a 1B model: --skip-peft (the oracle above covers PEFT exactness).
            cmd = [
                sys.executable, "-m", "bench.engine", "--model-dir", str(model_dir), "--device", "cuda",
                "--dtype", "bfloat16", "--threads", "0", "--clock", "wall", "--skip-peft",
                "--scale-pool", "128", "--plot", str(root / "engine.png"), "--json",
            ]  # fmt: skip
            bench = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
            if bench.returncode != 0:
                print(bench.stderr[-4000:], file=sys.stderr)
                result["bench_error"] = f"bench engine exited {bench.returncode}"
            else:
                result["bench_engine"] = json.loads(bench.stdout.strip().splitlines()[-1])
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return 1 if result.get("oracle_failures") or "bench_error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
