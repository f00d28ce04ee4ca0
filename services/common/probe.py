"""`python -m services.common.probe HOST:PORT`: exit 0 when the service there reports SERVING.

Kubernetes' built-in gRPC probe speaks plaintext, and every loraplex service serves mutual TLS, so
the manifests run this as an exec readiness probe: it connects with the pod's own identity
(LORAPLEX_TLS_CA/CERT/KEY; health is open to every verified peer) and asks grpc.health.v1. A
draining service answers NOT_SERVING, so the pod leaves its Service's endpoints before its streams
end. LORAPLEX_INSECURE_PLAINTEXT=true probes without TLS.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import Role, sync_channel, tls_files


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m services.common.probe HOST:PORT", file=sys.stderr)
        return 2
    # Any role's files: the probe only needs a certificate the CA signed.
    tls = tls_files(None, Role.OPERATOR)
    try:
        with sync_channel(args[0], tls) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    except grpc.RpcError as exc:
        print(f"{args[0]}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args[0]}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main())
