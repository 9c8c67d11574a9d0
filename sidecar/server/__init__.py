"""The sidecar: gRPC ingest -> rank join -> scoring -> per-request aggregation -> exporters.

Modules, in the data's order: ``ingest`` (the gRPC service, validation), ``join``
(tensor-parallel ranks), ``scoring`` (values -> circuit scores), ``requests`` (bounded
per-request state), ``pipeline`` (the synchronous core tying them together), ``records``
(the finished-request record and sinks), ``metrics`` and ``tracing`` (exporters),
``auth`` (TLS and client authentication), ``service`` (the running server, its caps) and
``app`` (``circuitwatch serve``). The ingest's status codes are listed in ``ingest``.
"""

from sidecar.server.records import (
    CircuitStats,
    CollectingSink,
    PhaseStats,
    RecordSink,
    RequestRecord,
    TokenScores,
)
from sidecar.server.service import Sidecar

__all__ = [
    "CircuitStats",
    "CollectingSink",
    "PhaseStats",
    "RecordSink",
    "RequestRecord",
    "Sidecar",
    "TokenScores",
]
