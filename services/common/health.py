"""Waiting for a gRPC server to report SERVING on the standard health service."""

from __future__ import annotations

import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import TlsFiles, sync_channel


def wait_serving(
    target: str,
    *,
    tls: TlsFiles | None,
    timeout_s: float = 60.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Returns once `target` is SERVING; raises if `proc` exits first or the timeout passes.

    tls: the identity to connect with (any role: health is open to every verified peer); None: plaintext.
    """
    deadline = time.monotonic() + timeout_s
    with sync_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server for {target} exited with {proc.returncode} before serving")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} was not serving after {timeout_s:.0f}s")
