"""Python client for the public InferenceService (the router): sync and asyncio, streaming.

with InferenceClient("127.0.0.1:50050", api_key) as client:
    for event in client.generate("Tell me a joke", GenerateOptions(adapter="support-bot")):
        print(event.delta.text, end="", flush=True)

A call that fails with UNAVAILABLE or RESOURCE_EXHAUSTED before its first token is retried with the
same request id (one is chosen here when the caller gave none), so it runs at most once; see
services.client.retry for the policy (LORAPLEX_CLIENT_RETRIES, LORAPLEX_CLIENT_RETRY_BUDGET_S,
LORAPLEX_CLIENT_MAX_BACKOFF_S).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from loraplex.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.client.retry import RetryPolicy, pushback_ms
from services.common.tls import ca_channel_credentials

PromptInput = str | Sequence[int] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 0  # 0: the server's default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    ignore_eos: bool = False

    def to_pb(self) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(
            max_tokens=self.max_tokens, stop=list(self.stop), ignore_eos=self.ignore_eos
        )
        for name in ("temperature", "top_p", "top_k", "seed", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        return msg


@dataclass(frozen=True)
class GenerateOptions:
    adapter: str = ""  # "name" or "name@version"; empty: the bare base model
    model: str = ""  # base model; may be empty when the adapter implies it
    # Idempotency key: runs once per tenant within the window; a repeat is refused (ALREADY_EXISTS).
    request_id: str = ""
    sampling: Sampling = field(default_factory=Sampling)


def prompt_pb(prompt: PromptInput) -> common_pb2.Prompt:
    """Text, token ids, or chat messages as (role, content) pairs."""
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    ids: list[int] = []
    messages: list[common_pb2.ChatMessage] = []
    for item in prompt:
        if isinstance(item, int):
            ids.append(item)
        else:
            role, content = item
            messages.append(common_pb2.ChatMessage(role=role, content=content))
    if messages and ids:
        raise ValueError("a prompt is either token ids or chat messages, not both")
    if messages:
        return common_pb2.Prompt(chat=common_pb2.ChatPrompt(messages=messages))
    return common_pb2.Prompt(token_ids=common_pb2.TokenIdsPrompt(ids=ids))


def generate_request(prompt: PromptInput, options: GenerateOptions) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id=options.request_id,
        model=options.model,
        adapter=options.adapter,
        prompt=prompt_pb(prompt),
        sampling=options.sampling.to_pb(),
    )


def _with_request_id(options: GenerateOptions | None, policy: RetryPolicy) -> GenerateOptions:
    """A retried call must carry the id of the first attempt, so a retrying client picks one."""
    options = options or GenerateOptions()
    if options.request_id or policy.retries == 0:
        return options
    return replace(options, request_id=str(uuid.uuid4()))


def _metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),)


def _router_credentials(ca: Path | None) -> grpc.ChannelCredentials | None:
    return None if ca is None else ca_channel_credentials(ca)


class InferenceClient:
    """ca: the CA that signed the router's certificate (LORAPLEX_TLS_CA); None: plaintext.
    retry: when to retry before the first token; None: RetryPolicy.from_env(). sleep: for tests."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        ca: Path | None = None,
        timeout_s: float | None = 300.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        creds = _router_credentials(ca)
        self._channel = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(api_key)
        self._timeout = timeout_s
        self.retry = retry if retry is not None else RetryPolicy.from_env()
        self._sleep = sleep

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self, prompt: PromptInput, options: GenerateOptions | None = None
    ) -> Iterator[inference_pb2.GenerateResponse]:
        """Streams Started, Deltas, Finished. Breaking out of the loop cancels the request.

        Retries (same request id) while no token has arrived; Started is yielded once.
        """
        request = generate_request(prompt, _with_request_id(options, self.retry))
        started = False
        attempt = 0
        first_began = time.monotonic()
        while True:
            generated = False
            call = self._stub.Generate(request, metadata=self._metadata, timeout=self._timeout)
            try:
                for event in call:
                    if event.HasField("started"):
                        if started:
                            continue  # a retry's Started: the caller has seen one already
                        started = True
                    elif event.HasField("delta"):
                        generated = True
                    yield event
                return
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                wait = self.retry.delay_s(
                    attempt,
                    code.name if code is not None else "",
                    generated=generated,
                    pushback_ms=pushback_ms(exc.trailing_metadata()),  # type: ignore[attr-defined]
                    elapsed_s=time.monotonic() - first_began,
                )
                if wait is None:
                    raise
            finally:
                call.cancel()
            self._sleep(wait)
            attempt += 1

    def list_models(self) -> list[inference_pb2.ModelInfo]:
        resp = self._stub.ListModels(inference_pb2.ListModelsRequest(), metadata=self._metadata, timeout=30)
        return list(resp.models)


class AsyncInferenceClient:
    """ca: the CA that signed the router's certificate (LORAPLEX_TLS_CA); None: plaintext.
    retry: when to retry before the first token; None: RetryPolicy.from_env()."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        ca: Path | None = None,
        timeout_s: float | None = 300.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        creds = _router_credentials(ca)
        self._channel = (
            grpc.aio.insecure_channel(target) if creds is None else grpc.aio.secure_channel(target, creds)
        )
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(api_key)
        self._timeout = timeout_s
        self.retry = retry if retry is not None else RetryPolicy.from_env()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self, prompt: PromptInput, options: GenerateOptions | None = None
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Streams Started, Deltas, Finished; retries like InferenceClient.generate."""
        request = generate_request(prompt, _with_request_id(options, self.retry))
        started = False
        attempt = 0
        first_began = time.monotonic()
        while True:
            generated = False
            call = self._stub.Generate(request, metadata=self._metadata, timeout=self._timeout)
            try:
                async for event in call:
                    if event.HasField("started"):
                        if started:
                            continue
                        started = True
                    elif event.HasField("delta"):
                        generated = True
                    yield event
                return
            except grpc.aio.AioRpcError as exc:
                wait = self.retry.delay_s(
                    attempt,
                    exc.code().name,
                    generated=generated,
                    pushback_ms=pushback_ms(exc.trailing_metadata()),
                    elapsed_s=time.monotonic() - first_began,
                )
                if wait is None:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(wait)
            attempt += 1

    async def list_models(self) -> list[inference_pb2.ModelInfo]:
        request = inference_pb2.ListModelsRequest()
        resp = await self._stub.ListModels(request, metadata=self._metadata, timeout=30)
        return list(resp.models)
