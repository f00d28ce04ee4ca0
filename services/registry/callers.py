"""Who is calling a registry RPC: the operator (admin token) or one tenant (API key).

No token, or a token that is neither, is UNAUTHENTICATED. A valid API key on an admin-only call
is PERMISSION_DENIED, so a tenant learns its key works, just not for that call.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.auth import admin_token_matches, bearer_token
from services.common.grpc_errors import RpcError
from services.registry import queries

MISSING_CREDENTIALS = "missing credentials: send metadata 'authorization: Bearer <admin token or API key>'"
INVALID_CREDENTIALS = "the token is not a valid admin token or API key"
ADMIN_ONLY = "this call needs the admin token; API keys cannot make it"


@dataclass(frozen=True)
class Caller:
    tenant_id: uuid.UUID | None  # None: admin

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None


ADMIN = Caller(tenant_id=None)


class Authenticator:
    def __init__(self, admin_token: str, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._admin_token = admin_token
        self._sessions = sessions

    async def caller(self, context: grpc.aio.ServicerContext, *, allow_api_key: bool) -> Caller:
        token = bearer_token(context.invocation_metadata() or ())
        if token is None:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, MISSING_CREDENTIALS)
        if admin_token_matches(token, self._admin_token):
            return ADMIN
        async with self._sessions() as s:
            key = await queries.authenticate_api_key(s, token)
        if key is None:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, INVALID_CREDENTIALS)
        if not allow_api_key:
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, ADMIN_ONLY)
        return Caller(tenant_id=key.tenant_id)

    async def require_admin(self, context: grpc.aio.ServicerContext) -> None:
        await self.caller(context, allow_api_key=False)
