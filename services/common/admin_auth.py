"""The admin-token gate shared by admin-only RPCs: UNAUTHENTICATED vs PERMISSION_DENIED.

A caller with no token, or a token that is neither the admin token nor a live API key, is
UNAUTHENTICATED; a valid API key is authenticated but not allowed (PERMISSION_DENIED), so a
tenant learns its key works, just not for this call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from services.common.auth import admin_token_matches, bearer_token
from services.common.grpc_errors import RpcError

MISSING_CREDENTIALS = "missing credentials: send metadata 'authorization: Bearer <admin token or API key>'"
INVALID_CREDENTIALS = "the token is not a valid admin token or API key"
ADMIN_ONLY = "this call needs the admin token; API keys cannot make it"


async def require_admin(
    context: grpc.aio.ServicerContext,
    admin_token: str,
    is_api_key: Callable[[str], Awaitable[bool]],
) -> None:
    """Returns when the call carries the admin token; raises RpcError otherwise.

    `is_api_key(token)` says whether a non-admin token is a live API key; it is only asked when
    the token is not the admin token.
    """
    token = bearer_token(context.invocation_metadata() or ())
    if token is None:
        raise RpcError(grpc.StatusCode.UNAUTHENTICATED, MISSING_CREDENTIALS)
    if admin_token_matches(token, admin_token):
        return
    if await is_api_key(token):
        raise RpcError(grpc.StatusCode.PERMISSION_DENIED, ADMIN_ONLY)
    raise RpcError(grpc.StatusCode.UNAUTHENTICATED, INVALID_CREDENTIALS)
