"""Who is on the other end of a call: the role in the peer's verified certificate, and what it may call.

Servers run with mutual TLS (services.common.tls), so by the time a handler runs the peer's
certificate chains to our CA. `RoleGate` then checks the role against an allow table keyed by
full method name ("/loraplex.v1.WorkerService/Generate") or by service ("loraplex.v1.WorkerService");
a method in no entry is refused, so a new RPC is closed until someone says who may call it. Health
and reflection are open to every verified peer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from cryptography import x509

from services.common.grpc_server import RunningServer, start_server
from services.common.tls import Role, TlsFiles, role_of_common_name, server_credentials, warn_plaintext

log = logging.getLogger(__name__)

OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

AllowTable = Mapping[str, frozenset[Role]]

_WORKER = "loraplex.v1.WorkerService"
_REGISTRY = "loraplex.v1.AdapterRegistryService"
_USAGE = "loraplex.v1.UsageService"

# A worker serves routers only: tenants reach it through a router, which meters and bills.
# Operators may read GetInfo to see what a worker runs.
WORKER_ALLOW: AllowTable = {
    f"/{_WORKER}/GetInfo": frozenset({Role.ROUTER, Role.OPERATOR}),
    _WORKER: frozenset({Role.ROUTER}),
}
# The registry's worker RPCs take worker certificates only (each for its own hosts, checked in
# services.registry.callers); everything else takes routers and operators, and callers.py then
# asks admin RPCs for the admin token on top.
REGISTRY_ALLOW: AllowTable = {
    f"/{_REGISTRY}/RegisterWorker": frozenset({Role.WORKER}),
    f"/{_REGISTRY}/HeartbeatWorker": frozenset({Role.WORKER}),
    _REGISTRY: frozenset({Role.ROUTER, Role.OPERATOR}),
    _USAGE: frozenset({Role.ROUTER, Role.OPERATOR}),
}


def peer_role(context: Any) -> Role | None:
    """The role of the peer's verified certificate (its CN), or None: plaintext or an unknown CN."""
    auth = context.auth_context() or {}
    for cn in auth.get("x509_common_name", ()):
        role = role_of_common_name(cn.decode("utf-8", "replace") if isinstance(cn, bytes) else cn)
        if role is not None:
            return role
    return None


@functools.lru_cache(maxsize=256)
def _san_hosts(pem: bytes) -> tuple[str, ...]:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(names)


def peer_san_hosts(context: Any) -> tuple[str, ...]:
    """The DNS names and IPs in the peer certificate's SAN: the hosts it may speak for."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert", ())
    return _san_hosts(bytes(pems[0])) if pems else ()


def method_label(method: str) -> str:
    """'/loraplex.v1.WorkerService/Generate' -> 'WorkerService.Generate'."""
    service, _, name = method.strip("/").partition("/")
    return f"{service.rpartition('.')[2]}.{name}"


def allowed_roles(table: AllowTable, method: str) -> frozenset[Role] | None:
    """The roles `method` serves (method entry before service entry); None: open to any verified peer."""
    service = method.strip("/").partition("/")[0]
    if service in OPEN_SERVICES:
        return None
    if method in table:
        return table[method]
    return table.get(service, frozenset())


def refusal(method: str, allowed: Iterable[Role], presented: Role | None) -> str:
    roles = sorted(r.value for r in allowed)
    serves = (
        " or ".join(roles) + (" identity" if len(roles) == 1 else " identities") if roles else "no identity"
    )
    caller = f"presented {presented.value!r}" if presented else "presented no loraplex role"
    return f"{method_label(method)} serves only the {serves}; this caller {caller}"


class RoleGate(grpc.aio.ServerInterceptor):
    """Refuses, with PERMISSION_DENIED and a sentence, a call from a role the allow table does not name."""

    def __init__(self, table: AllowTable) -> None:
        self._table = dict(table)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        allowed = allowed_roles(self._table, method)
        if handler is None or allowed is None:
            return handler
        return _gated(handler, method, allowed)


def _check(context: Any, method: str, allowed: frozenset[Role]) -> str | None:
    role = peer_role(context)
    if role is not None and role in allowed:
        return None
    return refusal(method, allowed, role)


def _gated(handler: grpc.RpcMethodHandler, method: str, allowed: frozenset[Role]) -> grpc.RpcMethodHandler:
    """The same handler, whose behavior first checks the caller's role."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            if (why := _check(context, method, allowed)) is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if (why := _check(context, method, allowed)) is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
            result = inner_us(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a handler that writes with context.write() and returns None
                await result

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            if (why := _check(context, method, allowed)) is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        if (why := _check(context, method, allowed)) is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        result = inner_ss(requests, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            await result

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


async def start_internal_server(
    listen: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    *,
    tls: TlsFiles | None,
    allow: AllowTable,
    what: str,
) -> RunningServer:
    """A service only other services call (registry, worker): mutual TLS with every RPC checked
    against `allow`, or, without TLS material (LORAPLEX_INSECURE_PLAINTEXT), plaintext with a
    warning naming `what`."""
    if tls is None:
        warn_plaintext(what)
        return await start_server(listen, register, service_names)
    return await start_server(
        listen,
        register,
        service_names,
        interceptors=[RoleGate(allow)],
        credentials=server_credentials(tls),
    )
