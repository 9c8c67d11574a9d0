"""The sidecar end to end: a real grpc.aio server, real client streams, /metrics over HTTP."""

import asyncio
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from sidecar.protocol.batch import GENERATED, PROMPT, TokenBatch, to_message
from sidecar.protocol.circuitwatch.v1 import ingest_pb2
from sidecar.server.records import CollectingSink
from sidecar.server.service import Sidecar
from sidecar.spec.schema import Circuit, CircuitSpec, Component, ComponentKind, ModelIdentity
from sidecar.spec.sites import Site

SPEC_HASH = "sha256:" + "5" * 64
MODEL = "tiny-llama"
WEIGHTS = np.array([[1.0, 0.5, 0.0], [0.0, -1.0, 2.0]])
BIAS = np.array([0.1, -0.2])
THRESHOLD = 1.5  # not a default bucket boundary: the spec adds it


def make_spec() -> CircuitSpec:
    return CircuitSpec(
        path=Path("spec.yaml"),
        model=ModelIdentity(MODEL, "sha256:" + "0" * 64),
        components=(
            Component("l1h2", ComponentKind.HEAD, Site.parse("blocks.1.attn.hook_z"), head=2),
            Component("l0h0", ComponentKind.HEAD, Site.parse("blocks.0.attn.hook_z"), head=0),
            Component("l1h0", ComponentKind.HEAD, Site.parse("blocks.1.attn.hook_z"), head=0),
        ),
        circuits=(
            Circuit("induction", weights=tuple(WEIGHTS[0]), bias=BIAS[0], threshold=THRESHOLD),
            Circuit("copying", weights=tuple(WEIGHTS[1]), bias=BIAS[1]),
        ),
        hash=SPEC_HASH,
    )


class Engine:
    """Builds batches like a probe would, and remembers every token it sent."""

    def __init__(self, seed: int = 0, component_ids=(2, 0, 1)) -> None:
        self.rng = np.random.default_rng(seed)
        self.component_ids = np.array(component_ids, dtype=np.uint32)
        self.step = 0
        self.sent: dict[str, list[tuple[int, int, np.ndarray]]] = {}  # id -> (pos, phase, values)

    def batch(self, tokens, finished=(), dropped_total=None, **overrides) -> TokenBatch:
        """``tokens``: (request_id, position, phase) per sampled token."""
        request_ids = list(dict.fromkeys(r for r, _, _ in tokens))
        values = self.rng.normal(scale=1.5, size=(len(tokens), 3)).astype(np.float32)
        for (request_id, position, phase), row in zip(tokens, values, strict=True):
            in_spec_order = np.empty(3, dtype=np.float32)
            in_spec_order[self.component_ids] = row
            self.sent.setdefault(request_id, []).append((position, phase, in_spec_order))
        fields = dict(
            spec_hash=SPEC_HASH,
            model_name=MODEL,
            steps=(self.step,),
            component_ids=self.component_ids,
            request_ids=request_ids,
            request_index=np.array([request_ids.index(r) for r, _, _ in tokens], dtype=np.uint32),
            positions=np.array([p for _, p, _ in tokens], dtype=np.int32),
            phases=np.array([ph for _, _, ph in tokens], dtype=np.uint8),
            values=values,
            finished_request_ids=list(finished),
            dropped_total=dropped_total or {},
        )
        fields.update(overrides)
        self.step += 1
        return TokenBatch(**fields)

    def expected(self, request_id: str, phase: int) -> np.ndarray:
        """Per-token circuit scores [m, 2] in float64, computed independently of the sidecar."""
        rows = [v for _, ph, v in self.sent[request_id] if ph == phase]
        return np.array(rows, dtype=np.float64) @ WEIGHTS.T + BIAS


def send(address: str, messages) -> ingest_pb2.StreamSummary:
    """One client stream of raw messages (bytes or TokenBatch), like one engine worker."""
    raw = [m if isinstance(m, bytes) else to_message(m).SerializeToString() for m in messages]
    with grpc.insecure_channel(address) as channel:
        stream = channel.stream_unary(
            "/circuitwatch.v1.Ingest/Stream",
            response_deserializer=ingest_pb2.StreamSummary.FromString,
        )
        return stream(iter(raw), timeout=10)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def start(tmp_path, transport="unix", **kwargs) -> Sidecar:
    listen = f"unix://{tmp_path}/ingest.sock" if transport == "unix" else "127.0.0.1:0"
    return Sidecar(make_spec(), listen, metrics_port=0, metrics_host="127.0.0.1", **kwargs)


def test_scores_aggregate_per_request_and_phase_over_a_unix_socket(tmp_path):
    sink, spans = CollectingSink(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    engine = Engine()
    steps = [
        engine.batch(
            [("a", p, PROMPT) for p in range(5)] + [("b", p, PROMPT) for p in range(4)],
            dropped_total={"queue_full": 3},
        ),
        engine.batch([("a", 5, GENERATED), ("b", 4, GENERATED)] + [("c", p, 0) for p in range(3)]),
        engine.batch([("b", 5, GENERATED), ("a", 6, GENERATED)], dropped_total={"queue_full": 5}),
        engine.batch([("a", 7, GENERATED), ("c", 3, GENERATED)], finished=["b"]),
        engine.batch([], finished=["a"], dropped_total={"queue_full": 5}),
    ]
    with start(tmp_path, sinks=[sink], tracer_provider=provider, keep_token_scores=64) as sidecar:
        assert sidecar.address.startswith("unix://")
        summary = send(sidecar.address, steps)
        records = sink.wait_for(2, timeout=5)
        samples = scrape(sidecar.metrics_url)
    assert (summary.batches_accepted, summary.batches_rejected) == (5, 0)

    assert sorted(r.request_id for r in records) == ["a", "b"]
    for record in records:
        assert record.finished_by == "engine" and record.model_name == MODEL
        for phase, name in ((PROMPT, "prompt"), (GENERATED, "generation")):
            expected = engine.expected(record.request_id, phase)
            stats = record.phase(name)
            assert stats.tokens == len(expected)
            for c, circuit in enumerate(("induction", "copying")):
                assert stats.circuit(circuit).mean == pytest.approx(expected[:, c].mean(), abs=1e-5)
                assert stats.circuit(circuit).max == pytest.approx(expected[:, c].max(), abs=1e-5)
        sent = engine.sent[record.request_id]
        assert record.tokens.positions.tolist() == [p for p, _, _ in sent]
        np.testing.assert_allclose(
            record.tokens.scores,
            np.array([v for *_, v in sent], dtype=np.float64) @ WEIGHTS.T + BIAS,
            atol=1e-5,
        )

    hist = "circuitwatch_circuit_score"
    labels = dict(circuit="induction", model_name=MODEL, phase="generation", aggregation="mean")
    assert value(samples, f"{hist}_count", **labels) == 2
    means = [engine.expected(r, GENERATED)[:, 0].mean() for r in "ab"]
    for le in ("-1.0", "0.0", str(THRESHOLD), "2.0"):  # the threshold is a bucket boundary
        below = sum(m <= float(le) for m in means)
        assert value(samples, f"{hist}_bucket", **labels, le=le) == below
    # Buckets below zero: prometheus_client exposes no _sum (OpenMetrics: not a counter).
    assert value(samples, f"{hist}_sum", **labels) is None

    assert (
        value(samples, "circuitwatch_tokens_sampled_total", model_name=MODEL, phase="prompt") == 12
    )
    generated = value(
        samples, "circuitwatch_tokens_sampled_total", model_name=MODEL, phase="generation"
    )
    assert generated == 6
    assert value(samples, "circuitwatch_batches_received_total", model_name=MODEL) == 5
    scored = dict(model_name=MODEL, finished_by="engine")
    assert value(samples, "circuitwatch_requests_scored_total", **scored) == 2
    assert value(samples, "circuitwatch_live_requests", model_name=MODEL) == 1
    dropped = dict(model_name=MODEL, reason="queue_full")
    assert value(samples, "circuitwatch_samples_dropped_total", **dropped) == 5
    all_scores = np.concatenate([engine.expected(r, ph) for r in "abc" for ph in (0, 1)])
    firing = value(
        samples, "circuitwatch_circuit_firing_tokens_total", circuit="induction", model_name=MODEL
    )
    assert firing == int((all_scores[:, 0] > THRESHOLD).sum())
    assert value(samples, "circuitwatch_token_to_metric_seconds_count", model_name=MODEL) == 2
    info = dict(version="0.1.0", spec_hash=SPEC_HASH, model_hash="sha256:" + "0" * 64)
    assert value(samples, "circuitwatch_build_info", **info, model_name=MODEL) == 1

    finished = spans.get_finished_spans()
    assert [s.name for s in finished] == ["circuitwatch.request"] * 2
    by_id = {s.attributes["circuitwatch.request_id"]: s for s in finished}
    attributes = by_id["a"].attributes
    assert attributes["gen_ai.request.model"] == MODEL
    expected_max = engine.expected("a", PROMPT)[:, 1].max()
    assert attributes["circuitwatch.circuit.copying.prompt.max"] == pytest.approx(expected_max)
    assert by_id["a"].start_time < by_id["a"].end_time


def test_bad_messages_are_rejected_and_counted_while_the_stream_goes_on(tmp_path):
    sink, engine = CollectingSink(), Engine(seed=1)
    good = engine.batch([("x", p, PROMPT) for p in range(4)])
    short = to_message(engine.batch([("bad", 0, PROMPT)]))
    short.positions = b"\x00\x00\x00"
    out_of_range = engine.batch([("bad", 0, PROMPT)], component_ids=np.array([0, 1, 7], np.uint32))
    bad_index = engine.batch([("bad", 0, PROMPT)], request_index=np.array([3], np.uint32))
    wrong_spec = engine.batch([("bad", 0, PROMPT)], spec_hash="sha256:" + "9" * 64)
    missing = engine.batch([("bad", 0, PROMPT)], values=np.zeros((1, 2), np.float32))
    missing.component_ids = np.array([0, 1], np.uint32)  # leaves out weighted component 2
    last = engine.batch([("x", 4, GENERATED)], finished=["x"])
    messages = [
        good,
        b"\xff\xff\xff\xff garbage",
        short.SerializeToString(),
        out_of_range,
        bad_index,
        wrong_spec,
        missing,
        last,
    ]
    with start(tmp_path, "tcp", sinks=[sink]) as sidecar:
        summary = send(sidecar.address, messages)
        (record,) = sink.wait_for(1, timeout=5)
        samples = scrape(sidecar.metrics_url)
    assert (summary.batches_accepted, summary.batches_rejected) == (2, 6)
    assert record.request_id == "x"
    assert record.phase("prompt").tokens == 4 and record.phase("generation").tokens == 1
    errors = {
        reason: value(samples, "circuitwatch_ingest_errors_total", reason=reason)
        for reason in ("decode", "malformed", "spec_hash", "component_ids")
    }
    assert errors == {"decode": 1, "malformed": 3, "spec_hash": 1, "component_ids": 1}
    decoded = value(samples, "circuitwatch_batches_received_total", model_name=MODEL)
    assert decoded == 4  # every message that decoded, accepted or not


def test_idle_requests_finish_after_the_timeout(tmp_path):
    sink, engine = CollectingSink(), Engine(seed=2)
    with start(tmp_path, sinks=[sink], idle_timeout=0.3) as sidecar:
        send(sidecar.address, [engine.batch([("quiet", p, PROMPT) for p in range(3)])])
        (record,) = sink.wait_for(1, timeout=5)
        samples = scrape(sidecar.metrics_url)
    assert (record.request_id, record.finished_by) == ("quiet", "idle")
    scored = dict(model_name=MODEL, finished_by="idle")
    assert value(samples, "circuitwatch_requests_scored_total", **scored) == 1
    assert value(samples, "circuitwatch_live_requests", model_name=MODEL) == 0


def test_state_bound_evicts_the_least_recently_updated_request(tmp_path):
    sink, engine = CollectingSink(), Engine(seed=3)
    steps = [
        engine.batch([("r1", p, PROMPT) for p in range(3)]),
        engine.batch([("r2", 0, PROMPT)]),
        engine.batch([("r3", 0, PROMPT), ("r3", 1, PROMPT)]),
        engine.batch([], finished=["r1", "r2", "r3"]),
    ]
    with start(tmp_path, sinks=[sink], max_requests=2) as sidecar:
        send(sidecar.address, steps)
        records = sink.wait_for(2, timeout=5)
        samples = scrape(sidecar.metrics_url)
    assert sorted(r.request_id for r in records) == ["r2", "r3"]
    dropped = dict(model_name=MODEL, reason="state_full")
    assert value(samples, "circuitwatch_samples_dropped_total", **dropped) == 3


def test_tensor_parallel_ranks_are_joined_and_incomplete_steps_time_out(tmp_path):
    sink, engine = CollectingSink(), Engine(seed=4, component_ids=(0, 1, 2))
    full = [
        engine.batch([("tp", p, PROMPT) for p in range(6)]),
        engine.batch([("tp", 6, GENERATED)], finished=["tp"]),
    ]

    def rank(batch, r, columns):
        return TokenBatch(
            **{
                **batch.__dict__,
                "rank": r,
                "world_size": 2,
                "component_ids": batch.component_ids[columns],
                "values": np.ascontiguousarray(batch.values[:, columns]),
            }
        )

    rank0 = [rank(b, 0, [0, 2]) for b in full]
    rank1 = [rank(b, 1, [1]) for b in full]
    # Both ranks lost the same earlier step: the tokens are counted once, from rank 0.
    rank0[-1].dropped_total = {"queue_full": 4}
    rank1[-1].dropped_total = {"queue_full": 4}
    lonely = rank(engine.batch([("gone", 0, PROMPT), ("gone", 1, PROMPT)]), 0, [0, 2])
    mismatched = rank(engine.batch([("tp2", 0, PROMPT)]), 1, [1])
    mismatched_peer = rank(engine.batch([("tp2", 5, PROMPT)]), 0, [0, 2])
    mismatched_peer.steps = mismatched.steps
    dropped = dict(model_name=MODEL, reason="tp_join_timeout")
    with start(tmp_path, sinks=[sink], join_timeout=1.0) as sidecar:
        summaries = [send(sidecar.address, rank1), send(sidecar.address, rank0)]
        (record,) = sink.wait_for(1, timeout=5)
        send(sidecar.address, [lonely, mismatched])
        summary = send(sidecar.address, [mismatched_peer])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            samples = scrape(sidecar.metrics_url)
            if value(samples, "circuitwatch_samples_dropped_total", **dropped):
                break
            time.sleep(0.1)
    assert [s.batches_accepted for s in summaries] == [2, 2]
    assert record.request_id == "tp"
    expected = engine.expected("tp", PROMPT)
    assert record.phase("prompt").circuit("copying").mean == pytest.approx(
        expected[:, 1].mean(), abs=1e-5
    )
    assert summary.batches_rejected == 1
    assert value(samples, "circuitwatch_ingest_errors_total", reason="tp_mismatch") == 1
    assert value(samples, "circuitwatch_samples_dropped_total", **dropped) == 2
    queue_full = dict(model_name=MODEL, reason="queue_full")
    assert value(samples, "circuitwatch_samples_dropped_total", **queue_full) == 4


def test_health_reports_serving(tmp_path):
    with start(tmp_path) as sidecar, grpc.insecure_channel(sidecar.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "circuitwatch.v1.Ingest"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_turns_not_serving_on_shutdown():
    async def scenario():
        sidecar = Sidecar(make_spec(), "127.0.0.1:0")
        await sidecar.start()
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            request = health_pb2.HealthCheckRequest(service="circuitwatch.v1.Ingest")
            watch = health_pb2_grpc.HealthStub(channel).Watch(request)
            before = await watch.read()
            stopping = asyncio.create_task(sidecar.stop(grace=0.5))
            after = await watch.read()
            await stopping
        return before.status, after.status

    status = health_pb2.HealthCheckResponse
    assert asyncio.run(scenario()) == (status.SERVING, status.NOT_SERVING)
