"""Each supported base-model family against `transformers`' own implementation and PEFT.

A tiny random model per family (services/devtools/tiny_families.py) is loaded through the
worker's real loader; three PEFT adapters with random A and B (q/v only, every projection, and
embed_tokens + lm_head + one projection; Phi's fused modules on Phi) go through the worker's real
adapter path. One engine batch holds every prompt with
each adapter and without one: prompts of different lengths prefill together over a paged cache
(4-token blocks), then decode six tokens. Reference: PEFT's `PeftModel.generate` over
`transformers`' model class for the architecture (its adapters disabled for the base rows).

Logit agreement is measured per request and step as max|engine - reference| / max|reference|
over the vocabulary (relative to the step's largest logit).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from services.devtools.tiny_families import FAMILIES, build_tiny_family
from services.worker.engine.llm_engine import LLMEngine
from services.worker.models.config import Gemma3Config, read_config
from tests.engine_support import VARIANTS, PeftAdapterSpec, build_peft_adapter, digest_of, hf_greedy
from tests.integration.test_engine_peft_oracle import (
    NEW_TOKENS,
    PROMPTS,
    Reference,
    Run,
    _engine,
    _request,
    _run_mixed,
    peft_reference,
)

# qv-r8 (q/v, rank 8), all-r16 (all seven projections, rank 16), and LoRA on the model's edges
# (embed_tokens, lm_head) with one projection.
ADAPTERS = (*VARIANTS[:2], PeftAdapterSpec("edges-r8", 8, 16, ("embed_tokens", "lm_head", "k_proj")))
# Phi stores q/k/v and gate/up fused, and adapters trained on it target the fused modules.
PHI_ADAPTERS = (
    PeftAdapterSpec("qkv-r8", 8, 16, ("qkv_proj",)),
    PeftAdapterSpec("all-r16", 16, 32, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    PeftAdapterSpec("edges-r8", 8, 16, ("embed_tokens", "lm_head", "qkv_proj")),
)
FP32_RELATIVE = 1e-4
# bf16, the bare model: measured over these families, prompts and steps (the test prints it):
# 0.0048-0.0080, and 0.0115 for Gemma 3. (With the adapters, whose PEFT side stays fp32, it was
# 0.03-0.086, as in test_engine_peft_oracle's bf16 forms test, which covers bf16 adapters.) Greedy
# tokens must be equal except at a near-tie (the reference's own margin between the two tokens
# below BF16_TIE of the logit scale), after which the contexts differ and the comparison of that
# request stops.
BF16_RELATIVE = 0.02
BF16_TIE = 0.02

Cases = dict[str, tuple[str | None, str]]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _cases(adapters: dict[str, Path]) -> Cases:
    return {f"{name}/{p}": (name, prompt) for name in [*adapters, None] for p, prompt in enumerate(PROMPTS)}


@dataclass(frozen=True)
class Family:
    name: str
    model_dir: Path
    adapters: dict[str, Path]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Models this small gain nothing from more threads, and on a busy CPU an OpenMP pool waiting
    for its threads makes them many times slower (see test_engine_peft_oracle.peft_reference)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, family_root: Path, tiny_llama_dir: Path) -> Family:
    name: str = request.param
    model_dir = build_tiny_family(name, family_root / name, tiny_llama_dir)
    adapters = {
        spec.name: build_peft_adapter(model_dir, family_root / f"{name}-{spec.name}", spec, seed=i)
        for i, spec in enumerate(PHI_ADAPTERS if name.startswith("phi") else ADAPTERS)
    }
    return Family(name, model_dir, adapters)


def test_family_matches_transformers_and_peft_in_fp32(family: Family) -> None:
    reference = peft_reference(family.model_dir, family.adapters, torch.float32, PROMPTS, threads=1)
    cases = _cases(family.adapters)
    for name, prompt in cases.values():  # the adapters change the model, or matching proves little
        if name is not None:
            assert _relative(reference[(name, prompt)][1][0], reference[(None, prompt)][1][0]) > 0.05
    tokens, logits = _run_mixed(_engine(family.model_dir, family.adapters), family.adapters, cases)
    worst = 0.0
    for rid, key in cases.items():
        want_tokens, want_logits = reference[key]
        assert tokens[rid] == want_tokens, rid
        assert len(logits[rid]) == len(want_logits) == len(want_tokens), rid
        for step, (got, want) in enumerate(zip(logits[rid], want_logits, strict=True)):
            relative = _relative(got, want)
            worst = max(worst, relative)
            assert relative <= FP32_RELATIVE, (rid, step, relative)
    print(f"{family.name} fp32: worst relative logit difference {worst:.2e}")


def test_family_matches_transformers_in_bf16(family: Family) -> None:
    """The bare model in bf16, both sides from the same bf16 weights, one batch of every prompt."""
    reference = _transformers_reference(family.model_dir, torch.bfloat16)
    cases: Cases = {f"base/{p}": (None, prompt) for p, prompt in enumerate(PROMPTS)}
    tokens, logits = _run_mixed(_engine(family.model_dir, {}, torch.bfloat16), {}, cases)
    worst, ties = 0.0, 0
    for rid, key in cases.items():
        want_tokens, want_logits = reference[key]
        for step, want in enumerate(want_logits):
            relative = _relative(logits[rid][step], want)
            worst = max(worst, relative)
            assert relative <= BF16_RELATIVE, (rid, step, relative)
            if tokens[rid][step] != want_tokens[step]:
                margin = (want[want_tokens[step]] - want[tokens[rid][step]]) / want.abs().max()
                assert margin.item() <= BF16_TIE, (rid, step, margin)
                ties += 1
                break
    assert ties <= 1, ties
    print(f"{family.name} bf16: worst relative logit difference {worst:.4f}; {ties} near-tie(s)")


def _transformers_reference(model_dir: Path, dtype: torch.dtype) -> Reference:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ref: Reference = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            ref[(None, prompt)] = hf_greedy(model, ids, NEW_TOKENS)
    return ref


def test_phi_lora_targets_are_the_fused_modules(family_root: Path, tiny_llama_dir: Path) -> None:
    from services.common.base_models import describe_model

    model_dir = build_tiny_family("phi4-mini", family_root / "phi4-mini", tiny_llama_dir)
    spec = describe_model("phi4-mini", model_dir)
    assert [(m.name, m.in_features, m.out_features) for m in spec.target_modules] == [
        ("o_proj", 64, 64),
        ("qkv_proj", 64, 4 * 16 + 2 * 2 * 16),
        ("gate_up_proj", 64, 2 * 128),
        ("down_proj", 128, 64),
    ]
    assert read_config(model_dir).rotary_dim == 12  # partial_rotary_factor 0.75 of head_dim 16


def test_gemma3_fields_reach_the_engine(family_root: Path, tiny_llama_dir: Path) -> None:
    """The tiny Gemma 3 really has what its fp32 match above vouches for."""
    cfg = read_config(build_tiny_family("gemma3", family_root / "gemma3", tiny_llama_dir))
    assert isinstance(cfg, Gemma3Config)
    assert cfg.sliding_layers == (True, False) and cfg.sliding_window == 5
    assert (cfg.local_rope_theta, cfg.rope_theta) == (10000.0, 1e6)
    assert cfg.final_logit_softcapping == 2.0 and cfg.query_pre_attn_scalar == 24
    assert cfg.head_dim * cfg.num_heads != cfg.hidden_size


def test_sliding_window_changes_what_mistral_sees(family_root: Path, tiny_llama_dir: Path) -> None:
    """Same weights with and without the window: the references differ, so the fp32 match of
    `mistral-sliding` above shows the engine honours the window in prefill and decode."""
    full = build_tiny_family("mistral", family_root / "mistral", tiny_llama_dir)
    window = build_tiny_family("mistral-sliding", family_root / "mistral-sliding", tiny_llama_dir)
    assert read_config(window).sliding_window is not None and read_config(full).sliding_window is None
    from transformers import AutoModelForCausalLM

    ids = torch.arange(100, 120).unsqueeze(0)  # 20 tokens, four times the window
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(full).eval()(ids).logits[0, -1]
        b = AutoModelForCausalLM.from_pretrained(window).eval()(ids).logits[0, -1]
    assert _relative(b, a) > 1e-3


# LongRoPE (Phi-3 128k, Phi-4-mini) at toy scale: a pretraining context of 32 within 512
# positions, so one batch holds a prompt within it, one whose decode crosses it, and one past it.
LONGROPE_ORIGINAL = 32
LONGROPE: dict[str, Any] = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.75,  # 12 of head_dim 16 rotate: 6 factors each
    "short_factor": [1.0, 1.05, 1.2, 1.5, 1.9, 2.4],
    "long_factor": [1.0, 1.8, 3.5, 7.0, 13.0, 24.0],
    # No factor / attention_factor: 512 / 32 = 16 and sqrt(1 + ln 16 / ln 32), as transformers
}
LONGROPE_PROMPTS = (
    "Rain falls on the quiet town",
    "Every morning the baker opens her shop, lights the ovens, and sets out bread, rolls and cakes "
    "for the neighbours who live up the hill",
    "Once upon a time in a distant kingdom there lived a king who loved maps more than gold, and every "
    "year he sent riders to the edges of his land to draw the rivers, hills, forests and roads anew",
)


@pytest.fixture(scope="module")
def longrope_phi(family_root: Path, tiny_llama_dir: Path) -> Family:
    """The tiny Phi-4-mini's weights under a `longrope` config, with its fused-module adapters."""
    import json
    import shutil

    base = build_tiny_family("phi4-mini", family_root / "phi4-mini", tiny_llama_dir)
    model_dir = family_root / "phi4-mini-longrope"
    if not model_dir.is_dir():
        shutil.copytree(base, model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        config.pop("rope_scaling", None)
        config.update(rope_parameters=LONGROPE, original_max_position_embeddings=LONGROPE_ORIGINAL)
        (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    adapters = {
        spec.name: build_peft_adapter(model_dir, family_root / f"longrope-{spec.name}", spec, seed=10 + i)
        for i, spec in enumerate(PHI_ADAPTERS[:2])
    }
    return Family("phi4-mini-longrope", model_dir, adapters)


def test_phi_longrope_config_is_read_as_transformers_computes_it(longrope_phi: Family) -> None:
    import math

    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = read_config(longrope_phi.model_dir)
    assert cfg.longrope is not None and cfg.rope_scaling is None
    assert cfg.longrope.original_max_positions == LONGROPE_ORIGINAL
    assert cfg.longrope.attention_factor == pytest.approx(math.sqrt(1 + math.log(16) / math.log(32)))
    hf = AutoConfig.from_pretrained(longrope_phi.model_dir)
    _, hf_attention_factor = ROPE_INIT_FUNCTIONS["longrope"](hf)
    assert cfg.longrope.attention_factor == pytest.approx(hf_attention_factor)
    assert cfg.longrope.long_factor == tuple(LONGROPE["long_factor"])


def test_phi_reads_an_older_configs_su_rope_scaling_as_longrope(longrope_phi: Family, tmp_path: Path) -> None:
    """Early Phi-3 128k configs: `rope_scaling` with `type: su`, which transformers reads as longrope."""
    import json

    config = json.loads((longrope_phi.model_dir / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_scaling"] = {
        "type": "su",
        "short_factor": rope["short_factor"],
        "long_factor": rope["long_factor"],
    }
    config["partial_rotary_factor"] = 0.75
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_config(tmp_path).longrope == read_config(longrope_phi.model_dir).longrope


def _stepwise_reference(family: Family) -> Reference:
    """Greedy decoding through transformers' Phi3 + PEFT one forward call per token over its KV
    cache: its per-call long/short rule, for each request alone. (`generate` differs at the step
    that crosses the original context, see test_transformers_generate_recomputes_at_the_crossing.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    tokenizer = AutoTokenizer.from_pretrained(family.model_dir)
    base = AutoModelForCausalLM.from_pretrained(family.model_dir, dtype=torch.float32)
    names = list(family.adapters)
    model = PeftModel.from_pretrained(base, family.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(family.adapters[name], adapter_name=name)
    model.eval()

    def generate(prompt: str) -> tuple[list[int], list[torch.Tensor]]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        cache = DynamicCache(config=base.config)
        tokens: list[int] = []
        logits: list[torch.Tensor] = []
        for _ in range(NEW_TOKENS):
            step = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
            logits.append(step)
            tokens.append(int(step.argmax()))
            ids = torch.tensor([[tokens[-1]]])
        return tokens, logits

    ref: Reference = {}
    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            for prompt in LONGROPE_PROMPTS:
                ref[(name, prompt)] = generate(prompt)
        with model.disable_adapter():
            for prompt in LONGROPE_PROMPTS:
                ref[(None, prompt)] = generate(prompt)
    return ref


def _longrope_prompt_lengths(family: Family) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family.model_dir)
    return [len(tokenizer(p)["input_ids"]) for p in LONGROPE_PROMPTS]


def _run_joining(engine: LLMEngine, adapters: dict[str, Path], cases: Cases) -> Run:
    """The first two prompts of every adapter prefill together; the long ones join a step later,
    so that step mixes decode rows with prompt rows of both tables."""
    digests = {name: digest_of(path) for name, path in adapters.items()}
    waves = [
        [rid for rid, (_, prompt) in cases.items() if (prompt == LONGROPE_PROMPTS[2]) == late]
        for late in (False, True)
    ]
    step_logits: dict[str, list[torch.Tensor]] = {}
    tokens: dict[str, list[int]] = {}
    while waves or engine.has_unfinished():
        for rid in waves.pop(0) if waves else []:
            name, prompt = cases[rid]
            engine.add_request(_request(engine, rid, prompt, digests[name] if name else None))
        outputs = engine.step()
        logits, rids = engine.runner.last_logits
        for row, rid in enumerate(rids):
            step_logits.setdefault(rid, []).append(logits[row].float().clone())
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens, step_logits


def test_phi_longrope_matches_transformers_and_peft_across_the_original_context(
    longrope_phi: Family,
) -> None:
    """One paged batch: a prompt within the original context, one whose decode steps cross it
    (the step at position 32 is the first to read the long table), one past it from the start
    joining a step later, each with every adapter and without one. Each request is compared with transformers
    running it alone."""
    lengths = _longrope_prompt_lengths(longrope_phi)
    assert lengths[0] + NEW_TOKENS < LONGROPE_ORIGINAL
    assert lengths[1] <= LONGROPE_ORIGINAL < lengths[1] + NEW_TOKENS - 1
    assert lengths[2] > LONGROPE_ORIGINAL
    adapters = longrope_phi.adapters
    reference = _stepwise_reference(longrope_phi)
    cases: Cases = {
        f"{name}/{p}": (name, prompt)
        for name in [*adapters, None]
        for p, prompt in enumerate(LONGROPE_PROMPTS)
    }
    for name, prompt in cases.values():
        if name is not None:
            assert _relative(reference[(name, prompt)][1][0], reference[(None, prompt)][1][0]) > 0.05
    tokens, logits = _run_joining(_engine(longrope_phi.model_dir, adapters), adapters, cases)
    worst = 0.0
    for rid, key in cases.items():
        want_tokens, want_logits = reference[key]
        assert tokens[rid] == want_tokens, rid
        for step, (got, want) in enumerate(zip(logits[rid], want_logits, strict=True)):
            relative = _relative(got, want)
            worst = max(worst, relative)
            assert relative <= FP32_RELATIVE, (rid, step, relative)
    print(f"phi4-mini longrope fp32: worst relative logit difference {worst:.2e}")


def test_transformers_generate_recomputes_at_the_crossing(longrope_phi: Family) -> None:
    """Pins the one place the engine knowingly differs from `generate` (layers/rotary.py): at the
    first step past the original context, Phi3ForCausalLM.prepare_inputs_for_generation drops the
    KV cache and recomputes the whole sequence with the long factors. Up to that step `generate`
    and the stepwise reference agree; at it they differ. Prompts past the context from the start
    agree throughout."""
    stepwise = _stepwise_reference(longrope_phi)
    generated = peft_reference(
        longrope_phi.model_dir, longrope_phi.adapters, torch.float32, LONGROPE_PROMPTS, 1
    )
    crossing = LONGROPE_ORIGINAL - _longrope_prompt_lengths(longrope_phi)[1] + 1  # logits step at position 32
    for key, (_, want) in generated.items():
        got = stepwise[key][1]
        if key[1] == LONGROPE_PROMPTS[1]:
            assert all(
                _relative(g, w) <= FP32_RELATIVE for g, w in zip(got[:crossing], want[:crossing], strict=True)
            )
            assert _relative(got[crossing], want[crossing]) > 1e-3, key
        else:
            assert all(_relative(g, w) <= FP32_RELATIVE for g, w in zip(got, want, strict=True)), key


@pytest.mark.parametrize(
    ("rope", "sentence"),
    [
        ({"rope_type": "yarn", "factor": 4.0}, "rope_parameters.rope_type = 'yarn' is not supported"),
        ({"rope_type": "dynamic", "factor": 4.0}, "rope_parameters.rope_type = 'dynamic' is not supported"),
        (
            {**LONGROPE, "short_factor": [1.0] * 8},
            "rope_parameters.short_factor = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0] is not supported; "
            "it must list 6 numbers",
        ),
    ],
)
def test_phi_refuses_other_rope_types_and_misshapen_longrope(
    longrope_phi: Family, tmp_path: Path, rope: dict[str, Any], sentence: str
) -> None:
    import json
    import shutil

    from services.worker.models.config import UnsupportedModelError

    shutil.copyfile(longrope_phi.model_dir / "config.json", tmp_path / "config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {**rope, "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=re.escape(sentence)):
        read_config(tmp_path)
