"""The shipper against a real gRPC server on a Unix socket: delivery, drops, reconnection."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from probe_engine_helpers import CollectingServer

from sidecar.probe.shipper import QUEUE_FULL, SIDECAR_UNAVAILABLE, Backoff, Shipper
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

    def resolve(self) -> TokenBatch:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        return TokenBatch(
            spec_hash="sha256:spec",
            model_name="tiny",
            step=self.step,
            component_ids=np.array([0, 1], np.uint32),
            request_ids=["r"],
            request_index=np.zeros(1, np.uint32),
            positions=np.array([self.step], np.int32),
            phases=np.array([PROMPT], np.uint8),
            values=np.array([[self.step, -self.step]], np.float32),
        )

    def discard(self) -> None:
        self.discarded = True


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
    shipper = Shipper(f"unix://{socket_path}", capacity=4, backoff=Backoff(0.05, 0.2))
    yield shipper
    shipper.close(timeout_s=2)


def test_steps_arrive_in_order_with_their_values(socket_path, shipper):
    server = CollectingServer(socket_path, num_components=2)
    try:
        for step in range(1, 4):
            shipper.submit(Step(step))
        assert wait_until(lambda: len(server.batches) == 3)
        batches = server.batches
        assert [b.step for b in batches] == [1, 2, 3]
        assert batches[2].values.tolist() == [[3.0, -3.0]]
        assert batches[0].dropped_total == {}
        assert shipper.stats().sent == 3 and shipper.stats().connected
    finally:
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
        assert wait_until(lambda: len(server.batches) == 5)
        assert [b.step for b in server.batches] == [1, 5, 6, 7, 8]
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
    assert wait_until(lambda: len(server.batches) == 1)
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
        assert wait_until(lambda: [b.step for b in server.batches][-1:] == [10])
        stats = shipper.stats()
        assert stats.streams >= 2
        assert (
            server.batches[-1].dropped_total[SIDECAR_UNAVAILABLE]
            == stats.dropped[SIDECAR_UNAVAILABLE]
        )
    finally:
        server.stop()


def test_close_sends_what_is_queued(socket_path):
    server = CollectingServer(socket_path, num_components=2)
    try:
        shipper = Shipper(f"unix://{socket_path}", capacity=16)
        for step in range(1, 6):
            shipper.submit(Step(step))
        shipper.close(timeout_s=5)
        assert [b.step for b in server.batches] == [1, 2, 3, 4, 5]
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
