"""The engine loop: admit requests, run one scheduler step at a time, stream outputs."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from services.worker.engine.adapter_slots import AdapterMismatch, DeviceAdapter, move, to_device
from services.worker.engine.adapter_weights import AdapterWeights
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig
from services.worker.engine.constrained import RowGrammar
from services.worker.engine.detokenizer import Detokenizer
from services.worker.engine.model_runner import ModelRunner
from services.worker.engine.sampling import SamplingParams
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.sequence import Sequence, SequenceStatus
from services.worker.layers.packed import can_pack, packs_exactly
from services.worker.models.families import load_model
from services.worker.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "AdapterInUse",
    "AdapterMismatch",
    "AdapterSlotsFull",
    "EngineRequest",
    "EngineStats",
    "LLMEngine",
    "QueueFull",
    "RequestOutput",
    "UnknownAdapter",
]


class QueueFull(Exception):
    """The waiting queue is at max_waiting; shed load and retry later."""


class UnknownAdapter(Exception):
    """The request names an adapter digest that is not resident; load it first."""


class AdapterSlotsFull(Exception):
    """Every device adapter slot is taken; unload one first."""


class AdapterInUse(Exception):
    """The adapter still serves running or waiting requests."""


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter_digest: str | None = None
    # Whose request (the router's authenticated tenant): prefix reuse and admission fairness are
    # per tenant. "" for callers with no tenants (tests, benchmarks), which then share one.
    tenant_id: str = ""
    # The response_format's matcher (GrammarCompiler.compile, off the step thread); None: free text.
    grammar: RowGrammar | None = None


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finish_reason: str | None  # None while running; "eos", "stop", "length" or "aborted"
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hits: int
    prefix_cache_queries: int
    resident_adapters: int
    preemptions: int
    slot_bytes_copied_total: int = 0  # moved between adapter slots (membership changes, removals)
    slot_capacity_slack_bytes: int = 0  # preallocated adapter slots not in use


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model = load_model(config.model_dir, config.dtype, config.device)
        self.packing = self._pack_weights()
        self.tokenizer: Any = load_tokenizer(config.model_dir)
        self.context_length = self.model.config.max_positions
        self.eos_token_ids = set(self.model.config.eos_token_ids)
        self.runner = ModelRunner(config, self.model)
        self.blocks = BlockManager(self.runner.num_blocks, config.kv_block_size)
        self.scheduler = Scheduler(config, self.blocks)
        self.adapters: dict[str, DeviceAdapter] = {}
        self.seqs: dict[str, Sequence] = {}
        self.detok: dict[str, Detokenizer] = {}
        self._aborted: list[RequestOutput] = []

    def _pack_weights(self) -> threading.Thread | None:
        """oneDNN-packed weights where they help (CPU bf16 and fp32): now, or on a thread of their own.

        In bf16 packed and plain GEMMs give bit-identical results and each layer switches to its
        packed weight in one attribute assignment, so steps may run while the thread works; fp32
        results differ in the last bits, so fp32 weights are packed before the engine serves."""
        if not can_pack(self.config.device, self.config.dtype):
            return None
        if not (self.config.pack_in_background and packs_exactly(self.config.dtype)):
            self.model.pack_weights()
            return None
        thread = threading.Thread(target=self._pack_logged, name="pack-weights")
        thread.start()
        return thread

    def _pack_logged(self) -> None:
        started = time.monotonic()
        try:
            self.model.pack_weights()
        except Exception:
            log.exception("packing the base weights failed; steps keep using the plain ones")
            return
        log.info("base weights packed for oneDNN in %.2f s", time.monotonic() - started)

    # Adapters -------------------------------------------------------------------------------
    # The worker's loader prepares an adapter in host memory and moves it to the device off the
    # step thread (prepare_adapter, to_engine_device, to_host only read the base weights); only
    # install_adapter and remove_adapter touch the resident set, between two steps.
    @property
    def pins_host_memory(self) -> bool:
        return self.config.device.startswith("cuda")

    def prepare_adapter(self, weights: AdapterWeights) -> DeviceAdapter:
        """The adapter in the step layout, in host memory (pinned on CUDA). Any thread."""
        return to_device(weights, self.model, self.config.max_lora_rank, "cpu", pin=self.pins_host_memory)

    def to_engine_device(self, adapter: DeviceAdapter) -> DeviceAdapter:
        """A prepared adapter copied to the engine's device (a new uid; no copy on CPU). Any thread."""
        return move(adapter, self.config.device)

    def to_host(self, adapter: DeviceAdapter) -> DeviceAdapter:
        """A removed device adapter back in host memory (no copy on CPU). Any thread."""
        return move(adapter, "cpu", pin=self.pins_host_memory)

    def linear_shape(self, key: tuple[int, str]) -> tuple[int, int] | None:
        """(in, out) of a layer adapters may target, None if the model lacks it (for sizing a slot
        before loading: adapters/sizing.py). Any thread."""
        linear = self.model.linear(key)
        return None if linear is None else (linear.in_features, linear.out_features)

    def install_adapter(self, adapter: DeviceAdapter) -> None:
        """Make an adapter already on the engine's device usable by the next step. Step thread."""
        if adapter.digest in self.adapters:
            return
        if len(self.adapters) >= self.config.max_adapter_slots:
            raise AdapterSlotsFull(f"all {self.config.max_adapter_slots} adapter slots are taken; unload one")
        # Written into its group's slot buffers once; the engine keeps only its description.
        self.runner.lora.slots.install(adapter)
        self.adapters[adapter.digest] = adapter.without_tensors()

    def remove_adapter(self, digest: str) -> DeviceAdapter:
        """Take an adapter out of the resident set and return it (for a host copy). Step thread."""
        if digest not in self.adapters:
            raise UnknownAdapter(f"adapter {digest} is not resident")
        if any(s.adapter == digest for s in self.seqs.values()):
            raise AdapterInUse(f"adapter {digest} is serving requests; unload it when they finish")
        return self.runner.lora.slots.remove(self.adapters.pop(digest))

    def load_adapter(self, weights: AdapterWeights) -> None:
        if weights.digest in self.adapters:
            return
        if len(self.adapters) >= self.config.max_adapter_slots:
            raise AdapterSlotsFull(f"all {self.config.max_adapter_slots} adapter slots are taken; unload one")
        self.install_adapter(to_device(weights, self.model, self.config.max_lora_rank, self.config.device))

    def unload_adapter(self, digest: str) -> None:
        self.remove_adapter(digest)

    def resident_adapters(self) -> list[str]:
        return list(self.adapters)

    # Requests -------------------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        req.sampling.validate()
        if req.request_id in self.seqs:
            raise ValueError(f"request id {req.request_id!r} is already in flight")
        if not req.prompt_token_ids:
            raise ValueError("the prompt is empty; send at least one token")
        if len(req.prompt_token_ids) >= self.context_length:
            raise ValueError(
                f"the prompt has {len(req.prompt_token_ids)} tokens; this model's context is "
                f"{self.context_length}, so send at most {self.context_length - 1}"
            )
        blocks = -(-(len(req.prompt_token_ids) + 1) // self.config.kv_block_size)
        if blocks > len(self.blocks.blocks):
            raise ValueError(
                f"the prompt needs {blocks} KV cache blocks but this worker has {len(self.blocks.blocks)}; "
                "send a shorter prompt"
            )
        vocab = self.model.config.vocab_size
        if min(req.prompt_token_ids) < 0 or max(req.prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if req.adapter_digest is not None and req.adapter_digest not in self.adapters:
            raise UnknownAdapter(f"adapter {req.adapter_digest} is not resident on this worker")
        if self.scheduler.num_waiting >= self.config.max_waiting:
            raise QueueFull(f"{self.config.max_waiting} requests are already waiting; retry later")
        seq = Sequence(req.request_id, req.prompt_token_ids, req.sampling, req.adapter_digest, req.tenant_id)
        seq.grammar = req.grammar
        self.seqs[req.request_id] = seq
        self.detok[req.request_id] = Detokenizer(self.tokenizer, req.prompt_token_ids, req.sampling.stop)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Free the request's KV blocks now; its final "aborted" output comes with the next step."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return
        self.scheduler.remove(seq)
        self._finish(seq, "aborted")
        self._aborted.append(self._output(seq, [], ""))

    def has_unfinished(self) -> bool:
        return bool(self.seqs) or bool(self._aborted)

    # The loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        sampled = self.runner.run(batch, self.adapters)
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed_tokens += n
            self.blocks.register_full_blocks(seq)
            if seq.num_computed_tokens < len(seq):
                continue  # a prompt chunk; the prompt's last chunk samples the first token
            token = sampled[seq.request_id]
            outputs.append(self._append(seq, token))
        return outputs

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
        seq.token_ids.append(token)
        text, stopped = self.detok[seq.request_id].add(token)
        p = seq.sampling
        if seq.grammar is not None:
            seq.grammar.advance(token)
        if stopped:
            reason: str | None = "stop"
        elif seq.grammar is not None and seq.grammar.done:
            reason = "stop"  # the JSON is complete; the detokenizer's held-back text is flushed below
        elif token in self.eos_token_ids and not p.ignore_eos:
            reason = "eos"
        elif seq.num_output_tokens >= p.max_tokens or len(seq) >= self.context_length:
            reason = "length"
        else:
            reason = None
        if reason is not None:
            if not stopped:
                text += self.detok[seq.request_id].flush()
            self.scheduler.remove(seq)
            self._finish(seq, reason)
        return self._output(seq, [token], text)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self.seqs[seq.request_id]
        del self.detok[seq.request_id]

    def _output(self, seq: Sequence, tokens: list[int], text: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            text_delta=text,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=self.scheduler.num_waiting,
            running=len(self.scheduler.running),
            kv_blocks_used=self.blocks.num_used,
            kv_blocks_total=len(self.blocks.blocks),
            prefix_cache_hits=self.blocks.prefix_hits,
            prefix_cache_queries=self.blocks.prefix_queries,
            resident_adapters=len(self.adapters),
            preemptions=self.scheduler.num_preemptions,
            slot_bytes_copied_total=self.runner.lora.slots.stats.bytes_copied,
            slot_capacity_slack_bytes=self.runner.lora.slots.slack_bytes,
        )
