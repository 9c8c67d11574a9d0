"""The request span continues the caller's trace: traceparent on the wire, OTEL_* configuration,
and spans received by real OTLP receivers (gRPC TraceService, HTTP POST /v1/traces).

The same through vLLM's OpenAI server, with both processes exporting to one receiver, is
test_openai_server's (it runs on that module's servers)."""

from __future__ import annotations

import contextlib
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from test_probe_drain import make_drain, run_step
from test_server_grpc import MODEL, Engine, scrape, send, start, value

from sidecar.probe.runtime import TraceParents
from sidecar.probe.vllm_internals import carry_trace_context, new_trace_contexts
from sidecar.protocol.batch import GENERATED, PROMPT, from_message, to_message
from sidecar.server.tracing import OtlpConfig, otlp_config, tracer_provider_from_config

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Received:
    """Spans an OTLP receiver got, with their resources' service names."""

    def __init__(self) -> None:
        self.spans: list = []
        self.services: list[str] = []
        self._condition = threading.Condition()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._condition:
            for resource_spans in request.resource_spans:
                attributes = {
                    a.key: a.value.string_value for a in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(span)
                        self.services.append(attributes.get("service.name"))
            self._condition.notify_all()

    def wait_for(self, names: list[str], timeout: float = 10.0, where=lambda span: True) -> dict:
        """The first span of each name among those ``where`` accepts, once all have arrived."""

        def first(name: str):
            return next((s for s in self.spans if s.name == name and where(s)), None)

        with self._condition:
            if not self._condition.wait_for(
                lambda: all(first(name) is not None for name in names), timeout
            ):
                got = [s.name for s in self.spans]
                raise TimeoutError(f"spans {got} after {timeout} s, wanted {names}")
            return {name: first(name) for name in names}


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(self, request, context):  # noqa: N802 (the generated servicer's name)
        self.received.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(received: Received) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if (
                self.path != "/v1/traces"
                or self.headers["Content-Type"] != "application/x-protobuf"
            ):
                self.send_response(404)
                self.end_headers()
                return
            received.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    return Handler


@contextlib.contextmanager
def grpc_receiver():
    """(base endpoint, Received) of an OTLP gRPC TraceService on 127.0.0.1."""
    received = Received()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(GrpcReceiver(received), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(None)


@contextlib.contextmanager
def http_receiver():
    """(base endpoint, Received) of an OTLP/HTTP receiver (POST /v1/traces) on 127.0.0.1."""
    received = Received()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(received))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request):
    """(protocol, base endpoint, Received) of a running OTLP receiver."""
    with (grpc_receiver if request.param == "grpc" else http_receiver)() as (endpoint, received):
        yield request.param, endpoint, received


def test_spans_continue_the_traceparent_over_otlp(tmp_path, monkeypatch, receiver):
    protocol, endpoint, received = receiver
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sidecar-under-test")
    provider = tracer_provider_from_config()
    engine = Engine()
    traced = {"a": TRACEPARENT, "b": "00-not-a-trace-01"}  # "c" comes without one
    steps = [
        engine.batch(
            [("a", p, PROMPT) for p in range(3)] + [("b", 0, PROMPT)], traceparents=traced
        ),
        engine.batch([("c", 0, PROMPT), ("a", 3, GENERATED)]),
        engine.batch([("b", 1, GENERATED), ("c", 1, GENERATED)], finished=["a", "b", "c"]),
    ]
    try:
        with start(tmp_path, tracer_provider=provider) as sidecar:
            summary = send(sidecar.address, steps)
            provider.force_flush()  # returns once the receiver answered the export
            spans = list(received.spans)
            samples = scrape(sidecar.metrics_url)
    finally:
        provider.shutdown()
    assert (summary.batches_accepted, summary.batches_rejected) == (3, 0)
    assert set(received.services) == {"sidecar-under-test"}
    by_request = {}
    for span in spans:
        attributes = {a.key: a.value for a in span.attributes}
        assert (
            attributes["gen_ai.request.id"].string_value
            == attributes["circuitwatch.request_id"].string_value
        )
        assert attributes["gen_ai.request.model"].string_value == MODEL
        by_request[attributes["gen_ai.request.id"].string_value] = span
    assert sorted(by_request) == ["a", "b", "c"]
    child = by_request["a"]
    assert (child.trace_id.hex(), child.parent_span_id.hex()) == (TRACE_ID, PARENT_ID)
    assert child.span_id.hex() != PARENT_ID
    assert child.name == "circuitwatch.request"
    for orphan in (by_request["b"], by_request["c"]):  # a trace of their own
        assert orphan.parent_span_id == b"" and orphan.trace_id.hex() != TRACE_ID
    assert by_request["b"].trace_id != by_request["c"].trace_id
    assert value(samples, "circuitwatch_trace_context_invalid_total") == 1


def test_traceparents_cross_the_wire_and_follow_their_steps():
    engine = Engine()
    batch = engine.batch(
        [("a", 0, PROMPT), ("b", 0, PROMPT)], traceparents={"a": TRACEPARENT, "b": "junk"}
    )
    decoded = from_message(to_message(batch), num_components=3)
    assert decoded.traceparents == {"a": TRACEPARENT, "b": "junk"}  # checked by the tracing
    two_steps = engine.batch(
        [("a", 1, GENERATED), ("b", 1, GENERATED)],
        steps=(7, 8),
        step_tokens=(1, 1),
        step_finished=(0, 0),
        traceparents={"b": TRACEPARENT},
    )
    first, second = two_steps.split_steps()
    assert (first.traceparents, second.traceparents) == ({}, {"b": TRACEPARENT})
    assert from_message(to_message(engine.batch([])), 3).traceparents == {}


def test_the_drain_ships_each_requests_traceparent_once_under_its_exported_id():
    drain, taps, _ = make_drain()
    parents = TraceParents()
    drain.trace_parent = parents.take
    parents.remember("a-0000000a", TRACEPARENT)
    first = drain.resolve([run_step(drain, taps, 1, [("a-0000000a", 2, [0, 1])])])
    parents.remember("b-0000000b", "00-late-01")  # admitted after a's first step
    later = drain.resolve(
        [
            run_step(drain, taps, 2, [("a-0000000a", 2, [2]), ("b-0000000b", 1, [0])]),
            run_step(drain, taps, 3, [("a-0000000a", 2, [3])], finished=["b-0000000b"]),
        ]
    )
    assert first.traceparents == {"a": TRACEPARENT}
    assert later.traceparents == {"b": "00-late-01"}
    assert from_message(to_message(later), 5).traceparents == {"b": "00-late-01"}


def test_the_traceparent_rides_to_the_workers_in_the_sampling_params():
    """Engine core -> scheduler output -> (pickled, as vLLM's multiprocessing executor sends
    it) -> worker, with vLLM's own objects."""
    import pickle
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.request import Request

    def admitted(request_id, headers, extra_args=None):
        params = SamplingParams(max_tokens=4, extra_args=extra_args)
        request = Request(request_id, [1, 2, 3], params, None, trace_headers=headers)
        carry_trace_context(request)
        return NewRequestData.from_request(request, ([0],))

    new = [
        admitted("a-0000000a", {"traceparent": TRACEPARENT}, {"kv_transfer_params": None}),
        admitted("b-0000000b", {"tracestate": "k=v"}),
        admitted("c-0000000c", None),
    ]
    output = SimpleNamespace(scheduled_new_reqs=pickle.loads(pickle.dumps(new)))
    assert new_trace_contexts(output) == [("a-0000000a", TRACEPARENT)]
    assert "kv_transfer_params" in output.scheduled_new_reqs[0].sampling_params.extra_args


def test_trace_parents_are_given_once_and_bounded():
    parents = TraceParents(capacity=2)
    assert parents.take("x") is None
    for request_id in ("r1", "r2", "r3"):
        parents.remember(request_id, f"tp-{request_id}")
    assert parents.take("r1") is None  # the oldest was forgotten
    assert parents.take("r3") == "tp-r3"
    assert parents.take("r3") is None


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ((None, None), {}, None),
        (
            (None, None),
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
            OtlpConfig("http://c:4317", "grpc", "circuitwatch-sidecar"),
        ),
        (
            (None, None),
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            OtlpConfig("http://c:4318/v1/traces", "http/protobuf", "circuitwatch-sidecar"),
        ),
        (  # the signal's own variables win over the generic ones; its endpoint is used as is
            (None, None),
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/custom",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": "svc",
            },
            OtlpConfig("http://t:4318/custom", "http/protobuf", "svc"),
        ),
        (  # the command line wins over everything
            ("http://flag:4318", "http/protobuf"),
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            },
            OtlpConfig("http://flag:4318/v1/traces", "http/protobuf", "circuitwatch-sidecar"),
        ),
    ],
)
def test_configuration_order_flag_then_environment_then_default(flag, env, expected):
    assert otlp_config(*flag, environ=env) == expected


def test_a_bad_protocol_names_where_it_came_from():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "json"}
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL: .*'json'"):
        otlp_config(environ=env)
