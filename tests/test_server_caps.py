"""Every cap on the sidecar's state, per stream and overall, the oldest state going first.

The overall live-request cap and the overall waiting-step cap have their own tests in
test_server_aggregation.py and test_server_grpc.py; here: the per-stream caps, the bytes cap
on waiting steps, the caps on concurrent streams, and a flooding stream against a quiet one
through a real server.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from test_server_aggregation import CIRCUITS, add, rank_batch
from test_server_grpc import MODEL, Engine, scrape, send, start, value

from sidecar.protocol.batch import (
    GENERATED,
    MAX_BATCH_STEPS,
    MAX_STRING_CHARS,
    PROMPT,
    MalformedBatch,
    from_message,
    to_message,
)
from sidecar.protocol.circuitwatch.v1 import ingest_pb2
from sidecar.server.join import RankJoiner
from sidecar.server.records import CollectingSink
from sidecar.server.requests import RequestTable


def reasons(dropped) -> list[tuple[str, int]]:
    return [(d.reason, d.tokens) for d in dropped]


def add_owned(table: RequestTable, request_id: str, now: float, owner: int):
    """One prompt token of ``request_id``, opened by ``owner``."""
    one = np.ones((1, 2), np.float32)
    ints = np.zeros(1, np.uint32), np.zeros(1, np.int32), np.zeros(1, np.uint8)
    return table.add("tiny", [request_id], *ints, one, now, owner=owner)


def test_a_stream_at_its_request_cap_evicts_its_own_oldest_request_not_others():
    table = RequestTable(CIRCUITS, max_requests=8, max_per_owner=2)
    ones = np.ones((1, 2))
    add(table, ["a"], [0, 0], [0, 0], np.ones((2, 2)), 1.0)  # owner 0 (the default)
    add_owned(table, "other", 1.5, owner=1)
    add(table, ["b"], [0], [0], ones, 2.0)
    assert add(table, ["a"], [0], [0], ones, 3.0) == []  # a is now more recent than b
    assert reasons(add(table, ["c"], [0], [0], ones, 4.0)) == [("stream_state_full", 1)]
    assert table.finish("b", "engine") is None  # owner 0's least recently updated
    assert table.finish("other", "engine").phase("prompt").tokens == 1
    assert table.finish("a", "engine").phase("prompt").tokens == 3
    assert len(table) == 1  # c


def test_a_new_request_is_refused_when_all_of_its_streams_requests_are_in_the_batch():
    table = RequestTable(CIRCUITS, max_requests=8, max_per_owner=1)
    add(table, ["a"], [0], [0], [[1, 1]], 1.0)
    dropped = add(table, ["a", "b"], [0, 1, 1], [1, 0, 0], np.ones((3, 2)), 2.0)
    assert reasons(dropped) == [("stream_state_full", 2)]
    assert table.finish("a", "engine").phase("generation").tokens == 1


def test_a_streams_finished_requests_no_longer_count_against_its_cap():
    table = RequestTable(CIRCUITS, max_requests=4, max_per_owner=1)
    for owner in range(100):  # streams come and go; their requests finish
        add_owned(table, f"r{owner}", owner, owner=owner)
        assert table.finish(f"r{owner}", "engine") is not None
    # A fresh owner still gets its own slot: no owner is left counted.
    assert add(table, ["x"], [0], [0], [[1, 1]], 200.0) == []


def test_one_source_cannot_hold_more_than_its_share_of_waiting_steps():
    joiner = RankJoiner(timeout=10.0, max_pending=8, max_pending_per_source=2)
    joiner.add(rank_batch(0, 1, [0], [[1], [2], [3]]), 0.0, source=7)
    joiner.add(rank_batch(0, 2, [0], [[1], [2], [3]]), 0.1, source=0)
    joiner.add(rank_batch(0, 3, [0], [[1], [2], [3]]), 0.2, source=0)
    overflow = joiner.add(rank_batch(0, 4, [0], [[1], [2], [3]]), 0.3, source=0).dropped
    assert reasons(overflow) == [("tp_join_overflow", 3)]  # source 0's step 2, not step 1
    assert len(joiner) == 3
    (joined,) = joiner.add(rank_batch(1, 1, [1, 2], [[1, 1], [2, 2], [3, 3]]), 0.4).joined
    assert joined.batch.steps == (1,)
    assert joiner.add(rank_batch(1, 2, [1, 2], [[1, 1], [2, 2], [3, 3]]), 0.5).joined == []


def test_waiting_steps_are_capped_in_bytes_oldest_first():
    one_step = 3 * 4  # three tokens, one float32 component
    joiner = RankJoiner(timeout=10.0, max_pending_bytes=2 * one_step)
    for step in (1, 2):
        joiner.add(rank_batch(0, step, [0], [[1], [2], [3]]), 0.0)
    assert joiner.pending_bytes == 2 * one_step
    overflow = joiner.add(rank_batch(0, 3, [0], [[1], [2], [3]]), 0.1).dropped
    assert reasons(overflow) == [("tp_join_overflow", 3)]
    assert joiner.pending_bytes == 2 * one_step and len(joiner) == 2
    (joined,) = joiner.add(rank_batch(1, 2, [1], [[1], [2], [3]]), 0.2).joined
    assert joined.batch.steps == (2,) and joiner.pending_bytes == one_step


def test_a_flooding_stream_evicts_its_own_requests_not_a_quiet_streams(tmp_path):
    sink, quiet, flood = CollectingSink(), Engine(seed=1), Engine(seed=2)
    with start(tmp_path, sinks=[sink], max_requests=64, max_requests_per_stream=8) as sidecar:
        # The quiet engine's request is open on its own stream while the other one floods.
        gate = threading.Event()

        def quiet_stream():
            yield to_message(quiet.batch([("calm", 0, PROMPT), ("calm", 1, PROMPT)]))
            gate.wait(20)
            yield to_message(quiet.batch([("calm", 2, GENERATED)], finished=["calm"]))

        with grpc.insecure_channel(sidecar.address) as channel:
            call = channel.stream_unary(
                "/circuitwatch.v1.Ingest/Stream",
                request_serializer=ingest_pb2.SampleBatch.SerializeToString,
                response_deserializer=ingest_pb2.StreamSummary.FromString,
            )
            pending = call.future(quiet_stream(), timeout=30)
            deadline = time.monotonic() + 10
            while len(sidecar.pipeline.requests) == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            send(sidecar.address, [flood.batch([(f"f{i}", 0, PROMPT)]) for i in range(100)])
            gate.set()
            assert pending.result().batches_accepted == 2
        (record,) = sink.wait_for(1, timeout=10)
        samples = scrape(sidecar.metrics_url)
    assert record.request_id == "calm" and record.phase("prompt").tokens == 2
    evicted = dict(model_name=MODEL, reason="stream_state_full")
    assert value(samples, "circuitwatch_samples_dropped_total", **evicted) == 92
    assert value(samples, "circuitwatch_live_requests", model_name=MODEL) == 8


def blocked_stream(channel: grpc.Channel, gate: threading.Event, engine: Engine, rid: str):
    """A stream that sends one batch and then waits for ``gate``: (call future, sent)."""
    sent = threading.Event()

    def messages():
        yield to_message(engine.batch([(rid, 0, PROMPT)])).SerializeToString()
        sent.set()
        gate.wait(30)

    call = channel.stream_unary(
        "/circuitwatch.v1.Ingest/Stream",
        response_deserializer=ingest_pb2.StreamSummary.FromString,
    )
    return call.future(messages(), timeout=60), sent


def batches(sidecar) -> float:
    name = "circuitwatch_batches_received_total"
    return sidecar.registry.get_sample_value(name, {"model_name": MODEL}) or 0.0


def test_streams_beyond_the_servers_cap_are_refused_resource_exhausted(tmp_path):
    gate, engine = threading.Event(), Engine()
    with start(tmp_path, max_streams=2) as sidecar:
        channels = [grpc.insecure_channel(sidecar.address) for _ in range(3)]
        try:
            held = [blocked_stream(channels[i], gate, engine, f"r{i}") for i in range(2)]
            for _, sent in held:
                assert sent.wait(10)
            deadline = time.monotonic() + 10
            while batches(sidecar) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as info:
                send(sidecar.address, [engine.batch([("late", 0, PROMPT)])])
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gate.set()
            assert all(call.result().batches_accepted == 1 for call, _ in held)
            assert send(sidecar.address, [engine.batch([("now", 0, PROMPT)])]).batches_accepted
        finally:
            gate.set()
            for channel in channels:
                channel.close()


def test_streams_on_one_connection_beyond_its_cap_wait_for_a_free_one(tmp_path):
    gate, engine = threading.Event(), Engine()
    with start(tmp_path, max_streams_per_connection=1) as sidecar:
        with grpc.insecure_channel(sidecar.address) as channel:
            first, sent = blocked_stream(channel, gate, engine, "first")
            assert sent.wait(10)
            deadline = time.monotonic() + 10
            while batches(sidecar) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            second = channel.stream_unary(
                "/circuitwatch.v1.Ingest/Stream",
                response_deserializer=ingest_pb2.StreamSummary.FromString,
            ).future(iter([to_message(engine.batch([("second", 0, PROMPT)])).SerializeToString()]))
            time.sleep(1.0)
            assert batches(sidecar) == 1 and not second.done()  # held by HTTP/2, not refused
            # Another connection is not held back (its own subchannel: channels to one address
            # share their connection by default).
            own = (("grpc.use_local_subchannel_pool", 1),)
            with grpc.insecure_channel(sidecar.address, options=own) as other:
                call = other.stream_unary(
                    "/circuitwatch.v1.Ingest/Stream",
                    response_deserializer=ingest_pb2.StreamSummary.FromString,
                )
                message = to_message(engine.batch([("other", 0, PROMPT)])).SerializeToString()
                assert call(iter([message]), timeout=10).batches_accepted == 1
            gate.set()
            assert first.result().batches_accepted == 1
            assert second.result(timeout=10).batches_accepted == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("request_ids", ["r" * (MAX_STRING_CHARS + 1)]),
        ("finished_request_ids", ["f" * (MAX_STRING_CHARS + 1)]),
        ("model_name", "m" * (MAX_STRING_CHARS + 1)),
        ("dropped_total", {"q" * (MAX_STRING_CHARS + 1): 1}),
        ("traceparents", {"r": "0" * (MAX_STRING_CHARS + 1)}),
        ("steps", tuple(range(MAX_BATCH_STEPS + 1))),
    ],
)
def test_a_message_may_not_hold_overlong_strings_or_too_many_steps(field, value):
    batch = Engine().batch([("r", 0, PROMPT)], **{field: value})
    with pytest.raises(MalformedBatch, match=field):
        from_message(to_message(batch), 3)


def test_strings_and_steps_at_the_limits_pass():
    n = MAX_BATCH_STEPS
    batch = Engine().batch(
        [("r" * MAX_STRING_CHARS, 0, PROMPT)],
        model_name="m" * MAX_STRING_CHARS,
        steps=tuple(range(n)),
        step_tokens=(1,) + (0,) * (n - 1),
        step_finished=(0,) * n,
    )
    assert len(from_message(to_message(batch), 3).steps) == n
