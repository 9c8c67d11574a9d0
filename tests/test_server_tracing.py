"""Trace export configuration and the per-request span."""

import time

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.server.records import CircuitStats, PhaseStats, RequestRecord, TokenScores
from sidecar.server.tracing import TracingSink, tracer_provider_from_config


def test_no_endpoint_means_no_provider(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert tracer_provider_from_config() is None


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_endpoint_from_argument_or_environment(monkeypatch, protocol):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sidecar-under-test")
    provider = tracer_provider_from_config(protocol=protocol)
    try:
        assert provider.resource.attributes["service.name"] == "sidecar-under-test"
    finally:
        provider.shutdown()


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="'json'"):
        tracer_provider_from_config("http://127.0.0.1:1", protocol="json")


def test_span_covers_the_request_and_carries_its_aggregates():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    record = RequestRecord(
        request_id="cmpl-1",
        model_name="tiny",
        finished_by="idle",
        phases=(
            PhaseStats("prompt", 3, (CircuitStats("induction", 0.5, 2.0, -1.0, 1.25, "flagged"),)),
            PhaseStats("generation", 2, (CircuitStats("induction", 1.5, 1.75, 1.25, 1.5),)),
        ),
        first_received=time.monotonic() - 2.0,
        tokens=TokenScores(np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros((0, 1))),
    )
    TracingSink(provider).emit(record)
    (span,) = exporter.get_finished_spans()
    assert span.name == "circuitwatch.request"
    assert (span.end_time - span.start_time) / 1e9 == pytest.approx(2.0, abs=0.5)
    assert dict(span.attributes) == {
        "circuitwatch.request_id": "cmpl-1",
        "gen_ai.request.id": "cmpl-1",
        "gen_ai.request.model": "tiny",
        "circuitwatch.finished_by": "idle",
        "circuitwatch.engine_id": "",
        "circuitwatch.prefix_cached_tokens": 0,
        "circuitwatch.tokens.prompt": 3,
        "circuitwatch.circuit.induction.prompt.mean": 0.5,
        "circuitwatch.circuit.induction.prompt.max": 2.0,
        "circuitwatch.circuit.induction.prompt.aggregate": 1.25,
        "circuitwatch.circuit.induction.prompt.verdict": "flagged",
        "circuitwatch.tokens.generation": 2,
        "circuitwatch.circuit.induction.generation.mean": 1.5,
        "circuitwatch.circuit.induction.generation.max": 1.75,
        "circuitwatch.circuit.induction.generation.aggregate": 1.5,
    }
