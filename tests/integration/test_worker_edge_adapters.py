"""Adapters on embed_tokens / lm_head through the real worker: fetched from the store by digest,
loaded through the tiers, and generated over gRPC in one batch with other adapters and base rows,
each stream getting PEFT's greedy tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from services.devtools.tiny_model import TINY_LLAMA
from tests.fixtures.worker import AdapterStore
from tests.integration.test_worker_service import PROMPT, Stub, gen_request, generate

NEW_TOKENS = 6


def _peft_greedy(
    model_dir: Path, adapters: dict[str, Path], prompt: list[int], n: int
) -> dict[str | None, list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    ids = torch.tensor([prompt])
    out: dict[str | None, list[int]] = {}

    def greedy() -> list[int]:
        seq = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
        return seq[0, len(prompt) :].tolist()

    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            out[name] = greedy()
        with model.disable_adapter():
            out[None] = greedy()
    return out


async def test_edge_adapters_stream_in_one_batch_with_peft_greedy_tokens(
    tiny_llama_dir: Path, tiny_worker_stub: Stub, tiny_edge_adapters: dict[str, Path], tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path / "store")
    kinds: list[str | None] = [None, *tiny_edge_adapters]
    refs = [
        None if k is None else store.publish(tiny_edge_adapters[k], base_model=TINY_LLAMA, name=k)
        for k in kinds
    ]
    requests = [gen_request(adapter=ref, max_tokens=NEW_TOKENS, ignore_eos=True) for ref in refs]
    together = await asyncio.gather(*(generate(tiny_worker_stub, r) for r in requests))
    want = await asyncio.to_thread(_peft_greedy, tiny_llama_dir, tiny_edge_adapters, PROMPT, NEW_TOKENS)
    assert {k: o.token_ids for k, o in zip(kinds, together, strict=True)} == want
    assert len({tuple(ids) for ids in want.values()}) == len(kinds)  # every adapter changes the tokens
