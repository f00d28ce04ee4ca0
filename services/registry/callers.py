"""Who is calling a registry RPC: the operator, a router, a worker, or one tenant.

- The operator sends the admin token (admin RPCs take nothing else).
- A router or a worker is known by the role in its verified client certificate (mutual TLS,
  services.common.identity) and sends no token: routers resolve keys and adapters and ship usage,
  workers register and heartbeat, each only for the hosts in its certificate's SANs.
- A tenant sends an API key, on the few reads that serve tenants.

No credentials at all is UNAUTHENTICATED. Credentials that are valid but not accepted by this call
are PERMISSION_DENIED with a sentence naming who the call serves, so the caller learns what to fix.
On a plaintext registry (LORAPLEX_INSECURE_PLAINTEXT, trusted networks only) no peer can prove a
role, so a call without a token is taken to come from a trusted service.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Collection
from dataclasses import dataclass

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.auth import admin_token_matches, bearer_token
from services.common.grpc_errors import RpcError
from services.common.identity import peer_role, peer_san_hosts
from services.common.tls import Role, address_host, host_matches
from services.registry import queries

MISSING_CREDENTIALS = (
    "missing credentials: send metadata 'authorization: Bearer <admin token or API key>', "
    "or call as a router or worker identity over mutual TLS"
)
INVALID_CREDENTIALS = "the token is not a valid admin token or API key"
ADMIN_ONLY = "this call needs the admin token; API keys cannot make it"


class CallerKind(enum.Enum):
    ADMIN = "the admin token"
    ROUTER = "a router identity"
    WORKER = "a worker identity"
    TENANT = "an API key"


@dataclass(frozen=True)
class Caller:
    kind: CallerKind
    tenant_id: uuid.UUID | None = None  # TENANT only
    # WORKER only: the DNS names and IPs of its certificate; None: unchecked (plaintext registry).
    hosts: tuple[str, ...] | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind is CallerKind.ADMIN

    @property
    def sees_all_tenants(self) -> bool:
        """The operator and routers act on any tenant (a router resolves every tenant's adapters)."""
        return self.kind in (CallerKind.ADMIN, CallerKind.ROUTER)

    def check_worker_address(self, address: str) -> None:
        """A worker speaks only for an address whose host is in its certificate's SANs."""
        if self.kind is not CallerKind.WORKER or self.hosts is None:
            return
        host = address_host(address)
        if not host_matches(host, self.hosts):
            raise RpcError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this worker's certificate is for {', '.join(self.hosts) or 'no host'}, not {host!r}: "
                f"a worker registers and heartbeats only its own address; advertise a host its "
                f"certificate names (LORAPLEX_WORKER_ADVERTISE) or issue it a certificate for {host!r}",
            )


ADMIN = Caller(CallerKind.ADMIN)
ROUTER = Caller(CallerKind.ROUTER)

# The RPCs of each kind of service caller, as the servicers pass them to `caller`.
ADMIN_CALLS = frozenset({CallerKind.ADMIN})
ROUTER_CALLS = frozenset({CallerKind.ADMIN, CallerKind.ROUTER})
TENANT_READS = frozenset({CallerKind.ADMIN, CallerKind.ROUTER, CallerKind.TENANT})
WORKER_CALLS = frozenset({CallerKind.WORKER})


def _refused(allowed: Collection[CallerKind], presented: CallerKind) -> RpcError:
    names = " or ".join(k.value for k in CallerKind if k in allowed)
    return RpcError(
        grpc.StatusCode.PERMISSION_DENIED, f"this call takes {names}; this caller presented {presented.value}"
    )


class Authenticator:
    def __init__(
        self, admin_token: str, sessions: async_sessionmaker[AsyncSession], *, plaintext: bool = False
    ) -> None:
        self._admin_token = admin_token
        self._sessions = sessions
        self._plaintext = plaintext

    async def caller(self, context: grpc.aio.ServicerContext, allowed: Collection[CallerKind]) -> Caller:
        token = bearer_token(context.invocation_metadata() or ())
        if token is None:
            return self._service_caller(context, allowed)
        if admin_token_matches(token, self._admin_token):
            if CallerKind.ADMIN not in allowed:
                raise _refused(allowed, CallerKind.ADMIN)
            return ADMIN
        async with self._sessions() as s:
            key = await queries.authenticate_api_key(s, token)
        if key is None:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, INVALID_CREDENTIALS)
        if CallerKind.TENANT not in allowed:
            if allowed == ADMIN_CALLS:
                raise RpcError(grpc.StatusCode.PERMISSION_DENIED, ADMIN_ONLY)
            raise _refused(allowed, CallerKind.TENANT)
        return Caller(CallerKind.TENANT, tenant_id=key.tenant_id)

    def _service_caller(self, context: grpc.aio.ServicerContext, allowed: Collection[CallerKind]) -> Caller:
        """A call without a token: a router or worker, by its certificate."""
        if self._plaintext:
            # No identity to check: a trusted network's service, whichever this call serves.
            if CallerKind.ROUTER in allowed:
                return ROUTER
            if CallerKind.WORKER in allowed:
                return Caller(CallerKind.WORKER)
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, MISSING_CREDENTIALS)
        role = peer_role(context)
        if role is Role.ROUTER and CallerKind.ROUTER in allowed:
            return ROUTER
        if role is Role.WORKER and CallerKind.WORKER in allowed:
            return Caller(CallerKind.WORKER, hosts=peer_san_hosts(context))
        if role in (Role.ROUTER, Role.WORKER):
            presented = CallerKind.ROUTER if role is Role.ROUTER else CallerKind.WORKER
            raise _refused(allowed, presented)
        raise RpcError(grpc.StatusCode.UNAUTHENTICATED, MISSING_CREDENTIALS)

    async def require_admin(self, context: grpc.aio.ServicerContext) -> None:
        await self.caller(context, ADMIN_CALLS)
