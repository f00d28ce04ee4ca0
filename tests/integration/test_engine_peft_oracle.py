"""PEFT is the oracle: the engine's multi-adapter batches must reproduce PeftModel exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import EngineRequest, LLMEngine
from services.worker.engine.sampling import SamplingParams
from tests.engine_support import VARIANTS, build_peft_adapter, digest_of, load_weights, run_all, tokens_of

PROMPTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog and keeps running",
    "1 2 3 4 5 6 7 8 9 10 11 12",
)
# Given to two adapters only, so a rank bucket holds adapters with unequal token counts (the
# padded-segment path) next to buckets of equal ones (the plain-slice path).
EXTRA_PROMPT = "An extra prompt for some adapters"
UNEVEN = ("qv-r8", "rslora-r16")
NEW_TOKENS = 6
LOGIT_TOLERANCE = 1e-3  # fp32


Reference = dict[tuple[str | None, str], tuple[list[int], torch.Tensor, torch.Tensor]]


@dataclass
class Oracle:
    model_dir: Path
    adapters: dict[str, Path]  # variant name -> PEFT adapter dir
    reference: Reference


@pytest.fixture(scope="module", params=["tiny-llama", pytest.param("smollm2", marks=pytest.mark.slow)])
def oracle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Oracle:
    """The tiny model with strongly random adapters, and the real SmolLM2 with the shared trained
    test adapters (one per variant: LoRA, rsLoRA, DoRA, ranks 8 to 64)."""
    if request.param == "tiny-llama":
        model_dir: Path = request.getfixturevalue("tiny_llama_dir")
        root = tmp_path_factory.mktemp("tiny-peft")
        adapters = {
            spec.name: build_peft_adapter(model_dir, root / spec.name, spec, seed=i)
            for i, spec in enumerate(VARIANTS)
        }
    else:
        model_dir = request.getfixturevalue("smollm2_dir")
        adapters = request.getfixturevalue("smollm2_adapters")
    return Oracle(model_dir, adapters, peft_reference(model_dir, adapters))


def peft_reference(model_dir: Path, adapters: dict[str, Path]) -> Reference:
    """(adapter name or None, prompt) -> (greedy tokens, first-step logits, last-step logits)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    ref: Reference = {}

    def generate(prompt: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        return out.sequences[0, ids.shape[1] :].tolist(), out.logits[0][0], out.logits[-1][0]

    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            for prompt in (*PROMPTS, EXTRA_PROMPT):
                ref[(name, prompt)] = generate(prompt)
        with model.disable_adapter():
            for prompt in (*PROMPTS, EXTRA_PROMPT):
                ref[(None, prompt)] = generate(prompt)
    return ref


def _engine(model_dir: Path, adapters: dict[str, Path]) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(model_dir=model_dir, dtype=torch.float32, kv_block_size=4, kv_cache_blocks=512)
    )
    for path in adapters.values():
        engine.load_adapter(load_weights(path))
    return engine


def _request(engine: LLMEngine, rid: str, prompt: str, digest: str | None) -> EngineRequest:
    ids = engine.tokenizer(prompt)["input_ids"]
    return EngineRequest(rid, ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), digest)


def test_mixed_adapter_batch_matches_peft_tokens_and_logits(oracle: Oracle) -> None:
    engine = _engine(oracle.model_dir, oracle.adapters)
    peft_reference = oracle.reference
    digests = {name: digest_of(path) for name, path in oracle.adapters.items()}
    cases: dict[str, tuple[str | None, str]] = {}
    for name in [*oracle.adapters, None]:
        prompts = (*PROMPTS, EXTRA_PROMPT) if name in UNEVEN else PROMPTS
        for p, prompt in enumerate(prompts):
            rid = f"{name}/{p}"
            cases[rid] = (name, prompt)
            engine.add_request(_request(engine, rid, prompt, digests[name] if name else None))
    first_logits: dict[str, torch.Tensor] = {}
    last_logits: dict[str, torch.Tensor] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        outputs = engine.step()
        logits, rids = engine.runner.last_logits
        for row, rid in enumerate(rids):
            first_logits.setdefault(rid, logits[row].clone())
            last_logits[rid] = logits[row].clone()
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    # One step held every adapter and the base rows together.
    assert len(cases) == len(VARIANTS) * len(PROMPTS) + len(PROMPTS) + len(UNEVEN)
    for name, prompt in cases.values():
        if name is not None:  # the adapters really change the model, or this test proves nothing
            assert (peft_reference[(name, prompt)][1] - peft_reference[(None, prompt)][1]).abs().max() > 0.05
    for rid, key in cases.items():
        want_tokens, want_first, want_last = peft_reference[key]
        assert tokens[rid] == want_tokens, rid
        assert (first_logits[rid] - want_first).abs().max().item() <= LOGIT_TOLERANCE, rid
        assert (last_logits[rid] - want_last).abs().max().item() <= LOGIT_TOLERANCE, rid


def test_request_joining_a_busy_batch_mid_flight_gets_the_tokens_it_gets_alone(oracle: Oracle) -> None:
    engine = _engine(oracle.model_dir, oracle.adapters)
    names = list(oracle.adapters)
    probe_digest = digest_of(oracle.adapters[names[2]])
    engine.add_request(_request(engine, "alone", PROMPTS[1], probe_digest))
    alone = tokens_of(run_all(engine)["alone"])
    for i, name in enumerate(names * 2):
        engine.add_request(_request(engine, f"busy-{i}", PROMPTS[i % 3], digest_of(oracle.adapters[name])))
    for _ in range(3):
        engine.step()
    engine.add_request(_request(engine, "joiner", PROMPTS[1], probe_digest))
    assert engine.stats().running > 0
    joined = tokens_of(run_all(engine)["joiner"])
    assert joined == alone
