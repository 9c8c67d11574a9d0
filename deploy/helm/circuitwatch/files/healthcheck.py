"""Exec probe for the sidecar: asks grpc.health.v1 over the Unix socket vLLM ships to.

Usage: python3 healthcheck.py TARGET TIMEOUT_S; exit 0 only if the server answers SERVING.
Kubernetes' own grpc probe dials the pod IP over TCP, which would not prove that the
socket in the shared volume works; this does.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target, timeout_s = sys.argv[1], float(sys.argv[2])
with grpc.insecure_channel(target) as channel:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout_s
        )
    except grpc.RpcError as error:
        sys.exit(f"{target}: {error.code().name}")
if reply.status != health_pb2.HealthCheckResponse.SERVING:
    sys.exit(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
