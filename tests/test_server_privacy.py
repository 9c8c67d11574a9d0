"""What leaves the sidecar: /metrics stays bounded under a flood and carries no request or user
ids; spans carry no text; the wire protocol has no field that could bring prompt text in."""

from __future__ import annotations

import re

import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from test_server_grpc import MODEL, Engine, send, start

from sidecar.protocol.batch import GENERATED, PROMPT
from sidecar.protocol.circuitwatch.v1 import ingest_pb2
from sidecar.server.metrics import OTHER, BoundedLabel, SidecarMetrics
from sidecar.server.records import CollectingSink

RNG = np.random.default_rng(5)


def random_word(length: int = 12) -> str:
    return "".join(RNG.choice(list("abcdefghijklmnopqrstuvwxyz0123456789-_"), length).tolist())


def flood(engine: Engine, batches: int, models: list[str]) -> tuple[list, list[str]]:
    """(batches, request ids): each batch 10 new requests finished at once, from ``models`` in
    turn, with a new drop reason (every third one shaped like an id) and a bad traceparent."""
    out = []
    for i in range(batches):
        ids = [f"user-{random_word()}-req-{i}-{j}" for j in range(10)]
        reason = random_word() if i % 3 == 0 else "flood_" + "".join(RNG.choice(list("xyz"), 12))
        batch = engine.batch(
            [(r, p, PROMPT if p < 2 else GENERATED) for r in ids for p in range(3)],
            finished=ids,
            dropped_total={reason: i + 1},
            model_name=models[i % len(models)],
            traceparents={ids[0]: f"00-{random_word(32)}-{random_word(16)}-01"},
        )
        out.append(batch)
    return out, [r for b in out for r in b.request_ids]


def series(sidecar) -> list[tuple[str, dict[str, str]]]:
    return [
        (sample.name, sample.labels)
        for family in sidecar.registry.collect()
        for sample in family.samples
    ]


def test_metrics_series_stay_bounded_and_carry_no_request_ids_under_a_flood(tmp_path):
    engine, sink = Engine(seed=4), CollectingSink(maxlen=10)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with start(tmp_path, sinks=[sink], tracer_provider=provider, max_requests=256) as sidecar:
        first, first_ids = flood(engine, 60, [MODEL] + [f"model-{i}" for i in range(40)])
        for chunk in range(0, len(first), 20):
            send(sidecar.address, first[chunk : chunk + 20])
        after_first = series(sidecar)
        second, second_ids = flood(engine, 120, [f"other-model-{i}" for i in range(120)])
        for chunk in range(0, len(second), 20):
            send(sidecar.address, second[chunk : chunk + 20])
        after_second = series(sidecar)
        text = generate_latest(sidecar.registry).decode()
    # 16 models named, then everything else is "other"; 32 drop reasons at most.
    models = {labels["model_name"] for _, labels in after_second if "model_name" in labels}
    assert len(models) == 17 and OTHER in models and MODEL in models
    reasons = {labels["reason"] for name, labels in after_second if name.startswith(
        "circuitwatch_samples_dropped")}  # fmt: skip
    assert len(reasons) <= 33 and all(re.fullmatch(r"[a-z]+(_[a-z]+)*", r) for r in reasons)
    # Twice the requests, new model names, new reasons: not one series more.
    assert len(after_second) == len(after_first)
    for request_id in first_ids + second_ids:
        assert request_id not in text
    assert "user-" not in text and "req-" not in text
    # Spans do carry the request id (that is what joins them to vLLM's), and nothing else
    # a client wrote: the traceparent becomes the parent, not an attribute.
    for span in exporter.get_finished_spans():
        strings = {k: v for k, v in span.attributes.items() if isinstance(v, str)}
        assert set(strings) <= {
            "circuitwatch.request_id", "gen_ai.request.id", "gen_ai.request.model",
            "circuitwatch.finished_by", "circuitwatch.engine_id",
        } | {k for k in strings if k.endswith(".verdict")}  # fmt: skip
        assert strings["gen_ai.request.model"] in models


def test_bounded_label_admits_a_fixed_number_of_well_formed_values():
    label = BoundedLabel(3)
    assert [label(v) for v in ("a", "b", "bad value", "c", "d", "a")] == [
        "a", "b", OTHER, "c", OTHER, "a",
    ]  # fmt: skip
    metrics = SidecarMetrics(CollectorRegistry(), ())
    assert metrics.reason_label("queue_full") == "queue_full"
    for id_like in ("req-123", "a1b2c3", "Queue_Full", "x" * 200, "", "_x", "user id"):
        assert metrics.reason_label(id_like) == OTHER
    assert metrics.model_label("m" * 129) == OTHER


def test_the_wire_protocol_has_no_field_for_text():
    """Every string the probe may send is an id, a name, a hash or a drop reason: a field
    that could carry prompt text would have to be added here, on purpose."""
    strings = {
        field.name
        for field in ingest_pb2.SampleBatch.DESCRIPTOR.fields
        if field.type == field.TYPE_STRING
        or (field.message_type and any(f.type == f.TYPE_STRING for f in field.message_type.fields))
    }
    assert strings == {
        "spec_hash", "model_name", "request_ids", "finished_request_ids", "dropped_total",
        "traceparents", "engine_id", "base_dropped_total", "prefix_cached_tokens",
        "probe_errors_total",
    }  # fmt: skip
