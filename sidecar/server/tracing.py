"""One OpenTelemetry span per finished request, carrying its circuit aggregates.

The span ``circuitwatch.request`` starts when the request's first tokens reached the
sidecar and ends when its record is built. Attributes:
``circuitwatch.request_id`` and ``gen_ai.request.id`` (the engine's request id, as in
vLLM's own spans), ``gen_ai.request.model``, ``circuitwatch.finished_by``,
``circuitwatch.tokens.<phase>``, ``circuitwatch.prefix_cached_tokens`` (prompt tokens
served from the prefix cache, which no probe saw: the prompt aggregates cover the rest),
``circuitwatch.engine_id``, ``circuitwatch.circuit.<name>.<phase>.mean|max``, the
circuit's configured aggregate ``circuitwatch.circuit.<name>.<phase>.aggregate`` and,
where the circuit has a verdict threshold for the phase,
``circuitwatch.circuit.<name>.<phase>.verdict`` ("flagged" or "clear"). With anomaly
detection past its warm-up, per detector (a circuit's name or "multivariate"):
``circuitwatch.anomaly.<detector>.score`` and ``circuitwatch.anomaly.<detector>.anomalous``.

No attribute carries text: the sidecar never receives prompt or completion text (the wire
protocol has no field for it), so there is nothing to enable; the request id is there to
join vLLM's own spans, which is also why spans, never /metrics, carry it.

Trace context: when the probe sent the request's W3C ``traceparent`` (see
``sidecar.probe.vllm_internals``; vLLM passes the header to its engine only when its own tracing is
on, ``--otlp-traces-endpoint``), the span is a child of that context: it joins the caller's
trace as a sibling of vLLM's ``llm_request`` span, whose own span id vLLM makes only in its
front end once the request has finished, so it can be no one's parent. Without one the
span starts a trace of its own, and ``gen_ai.request.id``, equal to vLLM's, joins the two.
A malformed traceparent is ignored and counted (``circuitwatch_trace_context_invalid_total``).

The TracerProvider is passed in; ``tracer_provider_from_config`` builds one that exports
over OTLP only when an endpoint is configured. Order: argument, then the OpenTelemetry
environment variables ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is), then
``OTEL_EXPORTER_OTLP_ENDPOINT`` (``/v1/traces`` appended for HTTP, as for an argument);
protocol: argument, ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``, ``OTEL_EXPORTER_OTLP_PROTOCOL``,
then "grpc". ``OTEL_SERVICE_NAME`` (default "circuitwatch-sidecar"),
``OTEL_RESOURCE_ATTRIBUTES`` and the exporters' own variables (``OTEL_EXPORTER_OTLP_HEADERS``,
``..._TIMEOUT``, ``..._CERTIFICATE``, ``..._INSECURE``) apply as the SDK defines them.
Spans go through a BatchSpanProcessor, so ``emit`` never waits on the network.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from sidecar.server.records import RequestRecord

SPAN_NAME = "circuitwatch.request"
SERVICE_NAME = "circuitwatch-sidecar"
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
_PROPAGATOR = TraceContextTextMapPropagator()


def parent_context(traceparent: str) -> Context | None:
    """The context a W3C ``traceparent`` names, or None when it is malformed."""
    context = _PROPAGATOR.extract({"traceparent": traceparent})
    return context if get_current_span(context).get_span_context().is_valid else None


class TracingSink:
    def __init__(
        self, tracer_provider: TracerProvider, invalid_trace_context: Counter | None = None
    ) -> None:
        """``invalid_trace_context`` counts the malformed traceparents that were ignored."""
        self._tracer = tracer_provider.get_tracer("circuitwatch.sidecar")
        self._invalid = invalid_trace_context

    def emit(self, record: RequestRecord) -> None:
        end = time.time_ns()
        start = end - int((time.monotonic() - record.first_received) * 1e9)
        attributes: dict[str, str | int | float | bool] = {
            "circuitwatch.request_id": record.request_id,
            "gen_ai.request.id": record.request_id,
            "gen_ai.request.model": record.model_name,
            "circuitwatch.finished_by": record.finished_by,
            "circuitwatch.engine_id": record.engine_id,
            "circuitwatch.prefix_cached_tokens": record.prefix_cached_tokens,
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
        parent = None
        if record.traceparent is not None:
            parent = parent_context(record.traceparent)
            if parent is None and self._invalid is not None:
                self._invalid.inc()
        span = self._tracer.start_span(
            SPAN_NAME, parent, SpanKind.INTERNAL, attributes=attributes, start_time=start
        )
        span.end(end_time=end)


@dataclass(frozen=True)
class OtlpConfig:
    endpoint: str  # the full traces URL for HTTP, the collector's address for gRPC
    protocol: str  # one of OTLP_PROTOCOLS
    service_name: str


def otlp_config(
    otlp_endpoint: str | None = None,
    protocol: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> OtlpConfig | None:
    """Where and how to export (see the module's docstring), or None when no endpoint is set.

    Raises ValueError for an unsupported protocol, naming where it came from.
    """
    sources = (
        ("--otlp-protocol", protocol),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")),
        ("default", "grpc"),
    )
    source, chosen = next((name, value) for name, value in sources if value)
    if chosen not in OTLP_PROTOCOLS:
        raise ValueError(
            f"{source}: OTLP protocol {chosen!r} is not supported: use 'grpc' or 'http/protobuf'"
        )
    service = environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME
    signal_endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not otlp_endpoint and signal_endpoint:
        return OtlpConfig(signal_endpoint, chosen, service)
    base = otlp_endpoint or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not base:
        return None
    if chosen == "http/protobuf":
        base = base.rstrip("/") + "/v1/traces"
    return OtlpConfig(base, chosen, service)


def tracer_provider_from_config(
    otlp_endpoint: str | None = None, protocol: str | None = None
) -> TracerProvider | None:
    """A provider exporting to OTLP as ``otlp_config`` says, or None when it says nothing."""
    config = otlp_config(otlp_endpoint, protocol)
    if config is None:
        return None
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint)))
    return provider
