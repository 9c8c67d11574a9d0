"""One OpenTelemetry span per finished request, carrying its circuit aggregates.

The span ``circuitwatch.request`` starts when the request's first tokens reached the
sidecar and ends when its record is built. Attributes:
``circuitwatch.request_id`` and ``gen_ai.request.id`` (the engine's request id, as in
vLLM's own spans), ``gen_ai.request.model``, ``circuitwatch.finished_by``,
``circuitwatch.tokens.<phase>``, ``circuitwatch.circuit.<name>.<phase>.mean|max``, the
circuit's configured aggregate ``circuitwatch.circuit.<name>.<phase>.aggregate`` and,
where the circuit has a verdict threshold for the phase,
``circuitwatch.circuit.<name>.<phase>.verdict`` ("flagged" or "clear"). With anomaly
detection past its warm-up, per detector (a circuit's name or "multivariate"):
``circuitwatch.anomaly.<detector>.score`` and ``circuitwatch.anomaly.<detector>.anomalous``.

The TracerProvider is passed in; ``tracer_provider_from_config`` builds one that exports
over OTLP only when an endpoint is configured (argument, then
``OTEL_EXPORTER_OTLP_ENDPOINT``). Spans go through a BatchSpanProcessor, so ``emit``
never waits on the network.
"""

from __future__ import annotations

import os
import time

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from sidecar.server.records import RequestRecord

SPAN_NAME = "circuitwatch.request"
SERVICE_NAME = "circuitwatch-sidecar"


class TracingSink:
    def __init__(self, tracer_provider: TracerProvider) -> None:
        self._tracer = tracer_provider.get_tracer("circuitwatch.sidecar")

    def emit(self, record: RequestRecord) -> None:
        end = time.time_ns()
        start = end - int((time.monotonic() - record.first_received) * 1e9)
        attributes: dict[str, str | int | float | bool] = {
            "circuitwatch.request_id": record.request_id,
            "gen_ai.request.id": record.request_id,
            "gen_ai.request.model": record.model_name,
            "circuitwatch.finished_by": record.finished_by,
        }
        for phase in record.phases:
            attributes[f"circuitwatch.tokens.{phase.phase}"] = phase.tokens
            for stats in phase.circuits:
                prefix = f"circuitwatch.circuit.{stats.circuit}.{phase.phase}"
                attributes[f"{prefix}.mean"] = stats.mean
                attributes[f"{prefix}.max"] = stats.max
                attributes[f"{prefix}.aggregate"] = stats.aggregate
                if stats.verdict is not None:
                    attributes[f"{prefix}.verdict"] = stats.verdict
        for anomaly in record.anomaly:
            attributes[f"circuitwatch.anomaly.{anomaly.detector}.score"] = anomaly.score
            attributes[f"circuitwatch.anomaly.{anomaly.detector}.anomalous"] = anomaly.anomalous
        span = self._tracer.start_span(
            SPAN_NAME, kind=SpanKind.INTERNAL, attributes=attributes, start_time=start
        )
        span.end(end_time=end)


def tracer_provider_from_config(
    otlp_endpoint: str | None = None, protocol: str | None = None
) -> TracerProvider | None:
    """A provider exporting to OTLP, or None when no endpoint is configured.

    ``protocol`` ("grpc" or "http/protobuf") falls back to OTEL_EXPORTER_OTLP_PROTOCOL,
    then "grpc".
    """
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    protocol = protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = endpoint.rstrip("/") + "/v1/traces"
    else:
        raise ValueError(
            f"OTLP protocol {protocol!r} is not supported: use 'grpc' or 'http/protobuf'"
        )
    service = os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider
