"""The shipper against a real gRPC server on a Unix socket: delivery, drops, reconnection."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from probe_engine_helpers import CollectingServer

from sidecar.probe.host.shipper import QUEUE_FULL, SIDECAR_UNAVAILABLE, Backoff, Shipper
from sidecar.protocol.batch import PROMPT, TokenBatch
from sidecar.protocol.circuitwatch.v1 import ingest_pb2_grpc


class Step:
    """A drained step as the shipper sees it; ``gate`` holds its resolve until set."""

    tokens = 3  # drops are counted in tokens, not steps

    def __init__(self, step: int, gate: threading.Event | None = None):
        self.step = step
        self.gate = gate
        self.entered = threading.Event()
        self.discarded = False

    def discard(self) -> None:
        self.discarded = True


def resolve(steps: list[Step]) -> TokenBatch:
    """One token per step, at position ``step``, valued (step, -step)."""
    for step in steps:
        step.entered.set()
        if step.gate is not None:
            step.gate.wait(10)
    numbers = [s.step for s in steps]
    n = len(numbers)
    return TokenBatch(
        spec_hash="sha256:spec",
        model_name="tiny",
        steps=tuple(numbers),
        component_ids=np.array([0, 1], np.uint32),
        request_ids=["r"],
        request_index=np.zeros(n, np.uint32),
        positions=np.array(numbers, np.int32),
        phases=np.full(n, PROMPT, np.uint8),
        values=np.array([[s, -s] for s in numbers], np.float32).reshape(n, 2),
        step_tokens=(1,) * n,
        step_finished=(0,) * n,
    )


def steps_of(batches: list[TokenBatch]) -> list[int]:
    return [s for b in batches for s in b.steps]


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "ingest.sock"


@pytest.fixture
def shipper(socket_path: Path):
    shipper = Shipper(f"unix://{socket_path}", resolve, capacity=4, backoff=Backoff(0.05, 0.2))
    yield shipper
    shipper.close(timeout_s=2)


def test_steps_arrive_in_order_with_their_values(socket_path, shipper):
    server = CollectingServer(socket_path, num_components=2)
    try:
        for step in range(1, 4):
            shipper.submit(Step(step))
        assert wait_until(lambda: len(steps_of(server.batches)) == 3)
        batches = server.batches
        assert steps_of(batches) == [1, 2, 3]
        assert [b.shipped_tokens_total for b in batches][-1] == 3  # one row per step
        assert np.concatenate([b.values for b in batches]).tolist()[2] == [3.0, -3.0]
        assert batches[0].dropped_total == {}
        assert shipper.stats().sent == len(batches) and shipper.stats().connected
    finally:
        server.stop()


def test_steps_are_gathered_into_messages_of_at_most_max_tokens(socket_path):
    server = CollectingServer(socket_path, num_components=2)
    shipper = Shipper(f"unix://{socket_path}", resolve, capacity=64, linger_s=0.2, max_tokens=9)
    try:
        for step in range(1, 21):
            shipper.submit(Step(step))
        assert wait_until(lambda: len(steps_of(server.batches)) == 20)
        assert steps_of(server.batches) == list(range(1, 21))
        # 3 tokens per step, at most 9 per message: 3 steps per message, the last 2.
        assert [len(b.steps) for b in server.batches] == [3] * 6 + [2]
        assert shipper.stats().sent == 7
    finally:
        shipper.close(timeout_s=2)
        server.stop()


def test_a_step_waits_at_most_the_linger_before_it_is_sent(socket_path):
    server = CollectingServer(socket_path, num_components=2)
    shipper = Shipper(f"unix://{socket_path}", resolve, linger_s=0.3)
    try:
        shipper.submit(Step(1))  # connects first: the next step meets an open stream
        assert wait_until(lambda: steps_of(server.batches) == [1])
        submitted = time.monotonic()
        shipper.submit(Step(2))
        time.sleep(0.15)
        assert steps_of(server.batches) == [1]  # still gathering
        assert wait_until(lambda: steps_of(server.batches) == [1, 2], timeout_s=5)
        assert 0.25 < time.monotonic() - submitted < 2.0
    finally:
        shipper.close(timeout_s=2)
        server.stop()


def test_full_queue_drops_the_oldest_and_counts_it(socket_path, shipper):
    server = CollectingServer(socket_path, num_components=2)
    try:
        gate = threading.Event()
        first = Step(1, gate)
        shipper.submit(first)
        assert first.entered.wait(10)  # the shipper thread is busy with step 1
        steps = [Step(i) for i in range(2, 9)]  # 7 more into a queue of 4
        for step in steps:
            shipper.submit(step)
        assert [s.discarded for s in steps] == [True] * 3 + [False] * 4
        assert shipper.stats().dropped == {QUEUE_FULL: 3 * Step.tokens}
        gate.set()
        assert wait_until(lambda: len(steps_of(server.batches)) == 5)
        assert steps_of(server.batches) == [1, 5, 6, 7, 8]
        assert server.batches[-1].dropped_total == {QUEUE_FULL: 3 * Step.tokens}
    finally:
        server.stop()


def test_submit_never_blocks_while_the_sidecar_is_down(shipper):
    started = time.monotonic()
    for step in range(200):
        shipper.submit(Step(step))
    assert time.monotonic() - started < 0.5
    assert wait_until(lambda: shipper.stats().dropped.get(SIDECAR_UNAVAILABLE, 0) > 0)
    stats = shipper.stats()
    assert not stats.connected and stats.sent == 0
    assert stats.dropped[QUEUE_FULL] + stats.dropped[SIDECAR_UNAVAILABLE] == 200 * Step.tokens


def test_reconnects_when_the_sidecar_comes_back(socket_path, shipper):
    server = CollectingServer(socket_path, num_components=2)
    shipper.submit(Step(1))
    assert wait_until(lambda: steps_of(server.batches) == [1])
    server.stop()
    # Down: what is submitted now is dropped as unavailable, the engine is never blocked.
    for step in range(2, 6):
        shipper.submit(Step(step))
        time.sleep(0.05)
    assert wait_until(lambda: shipper.stats().dropped.get(SIDECAR_UNAVAILABLE, 0) >= 1)
    assert wait_until(lambda: shipper.stats().queued == 0)
    # Back up at the same address: batches flow again on a new stream.
    server = CollectingServer(socket_path, num_components=2)
    try:
        shipper.submit(Step(10))
        assert wait_until(lambda: steps_of(server.batches)[-1:] == [10])
        stats = shipper.stats()
        assert stats.streams >= 2
        last = server.batches[-1]
        assert last.dropped_total[SIDECAR_UNAVAILABLE] == stats.dropped[SIDECAR_UNAVAILABLE]
        # The books: rows handed to gRPC so far, and where a restarted sidecar starts (the
        # counts of the last message of an earlier stream, before the outage's drops).
        assert last.shipped_tokens_total == stats.shipped_tokens
        assert 1 <= last.base_shipped_tokens_total <= stats.shipped_tokens - last.num_tokens
        assert SIDECAR_UNAVAILABLE not in last.base_dropped_total
    finally:
        server.stop()


def test_close_sends_what_is_queued(socket_path):
    server = CollectingServer(socket_path, num_components=2)
    try:
        # A long linger: close must not wait for it.
        shipper = Shipper(f"unix://{socket_path}", resolve, capacity=16, linger_s=30.0)
        for step in range(1, 6):
            shipper.submit(Step(step))
        started = time.monotonic()
        shipper.close(timeout_s=5)
        assert time.monotonic() - started < 4
        assert steps_of(server.batches) == [1, 2, 3, 4, 5]
        late = Step(6)
        shipper.submit(late)
        assert late.discarded
    finally:
        server.stop()


class Refusing(ingest_pb2_grpc.IngestServicer):
    """A sidecar that turns every stream away, as one serving another spec would."""

    def __init__(self):
        self.streams = 0

    def Stream(self, request_iterator, context):
        self.streams += 1
        next(request_iterator)
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "spec hash mismatch")


def test_a_sidecar_that_refuses_every_stream_is_not_hammered(socket_path, shipper):
    refusing = Refusing()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ingest_pb2_grpc.add_IngestServicer_to_server(refusing, server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    try:
        for step in range(100):  # one step every 10 ms for a second
            shipper.submit(Step(step))
            time.sleep(0.01)
        # Backoff 0.05 s doubling to 0.2 s: a handful of streams, not one per step.
        assert 2 <= refusing.streams <= 12
        assert shipper.stats().dropped[SIDECAR_UNAVAILABLE] > 0
    finally:
        server.stop(grace=None)


def test_the_default_backoff_is_jittered_and_never_waits_past_half_a_second():
    first, second = (list(itertools.islice(Backoff().delays(), 12)) for _ in range(2))
    assert max(first + second) <= 0.5  # a restarted sidecar is met within a second
    assert 0.04 <= first[0] <= 0.05 and first[-1] >= 0.4  # starts fast, grows to the cap
    assert first != second  # ranks retrying together drift apart
