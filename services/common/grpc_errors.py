"""Domain errors cross the gRPC boundary as a status code plus a sentence, never as half a response.

Pure modules raise their own exceptions; each servicer declares once which exception means which
status, and `status_errors` applies that table to every RPC of the servicer.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

ErrorTable = Mapping[type[BaseException], grpc.StatusCode]


class RpcError(Exception):
    """Raised inside a servicer to end the call with this status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _status_for(exc: BaseException, table: ErrorTable) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls], str(exc)
    return None


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, table: ErrorTable) -> None:
    mapped = _status_for(exc, table)
    if mapped is None:
        log.exception("unhandled error in RPC", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server logged the details")
    else:
        await context.abort(mapped[0], mapped[1])


F = TypeVar("F", bound=Callable[..., Any])


def status_errors(table: ErrorTable) -> Callable[[type], type]:
    """Class decorator: wraps every public coroutine / async-generator method with `table`."""

    def wrap_method(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def gen_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in fn(self, request, context):
                        yield item
                except (grpc.aio.AbortError, GeneratorExit):
                    raise
                except Exception as exc:
                    await _abort(context, exc, table)

            return gen_wrapper

        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: Any) -> Any:
            try:
                return await fn(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, table)

        return wrapper

    def decorate(cls: type) -> type:
        for name, fn in list(vars(cls).items()):
            if name[:1].isupper() and (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
                setattr(cls, name, wrap_method(fn))
        return cls

    return decorate
