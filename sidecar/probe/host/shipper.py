"""Ships drained steps to the sidecar without ever blocking the engine.

Like OpenTelemetry's ``BatchSpanProcessor``: ``submit`` appends to a bounded deque and
returns (when the deque is full the oldest step is dropped and its tokens counted, reason
``queue_full``); one daemon thread gathers the steps of up to ``linger_s`` (or up to
``max_tokens`` tokens) into one ``SampleBatch`` message and writes it to a gRPC client stream
``circuitwatch.v1.Ingest/Stream`` over a Unix socket or TCP. Gathering pays the
per-message costs (building, sending, decoding, scoring) once for many steps, and wakes
this thread once per message rather than once per step. When the sidecar is unreachable or
the stream breaks, the steps waiting are dropped and their tokens counted
(``sidecar_unavailable``) and the thread reconnects (after a stream ended, with a jittered
exponential backoff of 0.05 s doubling to 0.5 s that only a stream that lasted resets), so
the sidecar can start, stop and restart under a running engine and batches flow again
within a second of it accepting connections, however long it was away (measured in
tests/test_reconnect.py).

The books: every item's ``tokens`` are the tokens the probe sampled from its step, and each
of them leaves the probe once, either in a message (counted in ``shipped_tokens_total``, from
the moment it is handed to gRPC) or dropped (``dropped_total``, by reason). Every message
carries both counts, cumulative since the probe started, so the sidecar can tell what was
lost in transit (a gap in ``shipped_tokens_total``) and, as the counts are cumulative, learns
of drops made while it was away once it is back. Every message of a stream also carries the
counts as of the last message handed to an earlier stream (``base_*``): where a sidecar that
restarted starts its books for this sender (see sidecar/server/books.py).

gRPC keeps its own reconnect backoff inside a channel (1 s growing to 120 s by default) and
shares subchannels, and their backoff, between channels to the same address: a fresh
channel after a long outage would wait out that backoff. ``CHANNEL_OPTIONS`` give each
channel its own subchannel and a connect backoff capped at 0.25 s, which paces the attempts
while the sidecar is away (so a connect that times out is retried at once, with a new
channel), and keepalive pings so that a sidecar that stops answering (SIGSTOP, a hung host)
ends the stream within seconds instead of leaving it blocked on flow control; the sidecar
permits those pings (see service.py).

The items queued are any ``Shippable``; the ``resolve`` function given to the shipper turns
a group of them into one batch on the shipper thread, so waiting for a device copy and
building arrays stay off the engine's hot path.

Every message also carries the probe's state (``status``, see ``health.py``). When that
state is not what the current stream last carried and nothing is queued (a fault turned
the probe off, so no more steps come), the shipper sends a status message (``empty``: no
steps, no rows) on its own; a probe that is off keeps a stream open, reconnecting like any
other, so a sidecar started or restarted after the fault learns of it within a second.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from sidecar.probe.config import DEFAULT_LINGER_MS
from sidecar.probe.host.channel import ChannelSecurity, open_channel
from sidecar.probe.host.cpus import bind_current_thread
from sidecar.probe.host.health import HEALTHY, ProbeStatus
from sidecar.protocol.batch import TokenBatch, to_message
from sidecar.protocol.circuitwatch.v1 import ingest_pb2_grpc

logger = logging.getLogger(__name__)

QUEUE_FULL = "queue_full"
SIDECAR_UNAVAILABLE = "sidecar_unavailable"


class Shippable(Protocol):
    tokens: int  # what a drop of this item loses, in tokens

    def discard(self) -> None:
        """Release what the step holds without sending it."""


# Turns queued items, oldest first, into the batch to send (None: nothing to send).
Resolve = Callable[[list[Shippable]], TokenBatch | None]
# A batch of no steps from this probe, for a status message.
Empty = Callable[[], TokenBatch]


class DropCounts:
    """Thread-safe cumulative counts of dropped tokens, by reason."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._counts[reason] = self._counts.get(reason, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


@dataclass(frozen=True)
class ShipperStats:
    sent: int  # messages handed to the stream
    dropped: dict[str, int]  # tokens dropped, by reason
    queued: int
    connected: bool
    streams: int  # streams opened so far (1 + reconnects)
    shipped_tokens: int  # tokens in the messages handed to gRPC

    @property
    def sampled_tokens(self) -> int:
        """Every token that left the queue: shipped or dropped."""
        return self.shipped_tokens + sum(self.dropped.values())


KEEPALIVE_TIME_MS = 1000  # a ping after this long without a frame from the sidecar
KEEPALIVE_TIMEOUT_MS = 1000  # no answer to it: the connection is dead
CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC 1.6x times a keepalive ping out after this one (default 60 s), not the above.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # Keep pinging while flow control holds our data back: that is when a stopped sidecar
    # must be noticed.
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.05
    max_s: float = 0.5
    jitter: float = 0.2  # each delay is scaled by a random factor in [1 - jitter, 1]

    def delays(self):
        """Jittered so that the ranks of a tensor-parallel engine do not retry in lockstep;
        never above ``max_s``."""
        delay = self.initial_s
        while True:
            yield delay * random.uniform(1 - self.jitter, 1)
            delay = min(delay * 2, self.max_s)


class Shipper:
    """Bounded queue + one thread holding a client stream to ``endpoint``."""

    def __init__(
        self,
        endpoint: str,
        resolve: Resolve,
        capacity: int = 256,
        drops: DropCounts | None = None,
        backoff: Backoff | None = None,
        connect_timeout_s: float = 1.0,
        cpus: frozenset[int] | None = None,
        linger_s: float = DEFAULT_LINGER_MS / 1000,
        max_tokens: int = 8192,
        status: Callable[[], ProbeStatus] = lambda: HEALTHY,
        empty: Empty | None = None,
        security: ChannelSecurity | None = None,
    ):
        """``status``: the probe's state, read on the shipper thread; ``empty`` is needed
        only if that state can change."""
        self.endpoint = endpoint
        self._status = status
        self._empty = empty
        self._security = security  # TLS and token (channel.py); None: plaintext
        self._resolve = resolve
        self._cpus = cpus  # the thread's CPUs (see cpus.py); None: the creator's
        self.drops = drops or DropCounts()
        self._backoff = backoff or Backoff()
        self._connect_timeout_s = connect_timeout_s
        self._linger_s = linger_s
        self._max_tokens = max_tokens  # a message holds at most this many, or one item
        self._queue: collections.deque[tuple[float, Shippable]] = collections.deque()
        self._queued_tokens = 0
        self._in_flight = False  # a group taken from the queue and not yet handed to gRPC
        self._capacity = capacity
        self._cond = threading.Condition()
        self._closed = False
        self._sent = 0
        self._shipped_tokens = 0
        # The books as of the last message handed to gRPC, and as of the last one handed to
        # a stream before the current one (where a restarted sidecar starts counting).
        self._last_handed: tuple[int, dict[str, int]] = (0, {})
        self._base: tuple[int, dict[str, int]] = (0, {})
        self._streams = 0
        self._connected = False
        self._thread = threading.Thread(target=self._run, name="circuitwatch-shipper", daemon=True)
        self._thread.start()

    def submit(self, item: Shippable) -> None:
        """Queue ``item``; never blocks (beyond a short lock) and never raises."""
        with self._cond:
            if self._closed:
                item.discard()
                return
            if len(self._queue) >= self._capacity:
                _, oldest = self._queue.popleft()
                self._queued_tokens -= oldest.tokens
                oldest.discard()
                self.drops.add(QUEUE_FULL, oldest.tokens)
            self._queue.append((time.monotonic(), item))
            self._queued_tokens += item.tokens
            # Wake the thread only when it has something new to do: waking it every step
            # would cost the engine the interpreter lock every step.
            if len(self._queue) == 1 or self._queued_tokens >= self._max_tokens:
                self._cond.notify_all()

    def stats(self) -> ShipperStats:
        with self._cond:
            return ShipperStats(
                sent=self._sent,
                dropped=self.drops.snapshot(),
                queued=len(self._queue),
                connected=self._connected,
                streams=self._streams,
                shipped_tokens=self._shipped_tokens,
            )

    def wake(self) -> None:
        """The probe's status changed: let the thread tell the sidecar."""
        with self._cond:
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is handed to gRPC or dropped; True if in time."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._queue and not self._in_flight, timeout=timeout_s
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued if the sidecar is there, end the stream and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        # Before the first channel: gRPC's threads start from this one and inherit its CPUs.
        bind_current_thread(self._cpus)
        delays = self._backoff.delays()
        while True:
            with self._cond:
                # A probe that is off has a status to tell every sidecar it reaches.
                self._cond.wait_for(
                    lambda: self._queue or self._closed or self._status() != HEALTHY
                )
                if self._closed and not self._queue:
                    return
            channel = open_channel(self.endpoint, CHANNEL_OPTIONS, self._security)
            try:
                grpc.channel_ready_future(channel).result(timeout=self._connect_timeout_s)
            except grpc.FutureTimeoutError:
                channel.close()
                self._drop_queued()
                if self._closed:
                    return
                continue  # the channel's own backoff paced the attempts
            started = time.monotonic()
            self._stream(channel)
            channel.close()
            if self._closed:
                continue
            # Only a stream that lasted resets the backoff: a sidecar that refuses every
            # stream (say, a different spec) must not be hammered.
            if time.monotonic() - started > self._backoff.max_s:
                delays = self._backoff.delays()
            self._sleep(next(delays))

    def _stream(self, channel: grpc.Channel) -> None:
        stub = ingest_pb2_grpc.IngestStub(channel)
        done = threading.Event()
        with self._cond:
            self._connected = True
            self._streams += 1
            self._base = self._last_handed
        try:
            stub.Stream(self._messages(done))
        except grpc.RpcError as e:
            logger.warning(
                "circuitwatch: stream to %s ended: %s %s", self.endpoint, e.code(), e.details()
            )
            self._drop_queued()
        finally:
            done.set()
            with self._cond:
                self._connected = False
                self._cond.notify_all()

    def _messages(self, done: threading.Event):
        told = HEALTHY  # what this stream's sidecar knows of the probe: healthy unless told

        def status_due() -> bool:
            return self._empty is not None and self._status() != told

        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._queue or self._closed or done.is_set() or status_due(), 0.5
                )
                if done.is_set() or (self._closed and not self._queue):
                    return
                idle = not self._queue
            if idle:  # nothing to send but, perhaps, news of the probe (outside the lock)
                if status_due():
                    told = self._status()
                    with self._cond:
                        status = self._stamp(self._empty(), told)
                    yield to_message(status)
                continue
            with self._cond:
                # Gather: until the oldest item has waited linger_s, or enough has come.
                self._cond.wait_for(
                    lambda: (
                        self._closed or done.is_set() or self._queued_tokens >= self._max_tokens
                    ),
                    self._queue[0][0] + self._linger_s - time.monotonic(),
                )
                if done.is_set():
                    return
                group = self._take_group()
                self._in_flight = True
            try:
                batch = self._resolve(group)
            except Exception:
                logger.exception("circuitwatch: could not build a batch; dropped")
                self.drops.add("resolve_error", sum(item.tokens for item in group))
                for item in group:
                    item.discard()
                batch = None
            try:
                if batch is not None:
                    told = self._status()
                    with self._cond:
                        self._sent += 1
                        self._shipped_tokens += batch.num_tokens
                        self._stamp(batch, told)
                    yield to_message(batch)  # returns once gRPC asks for the next one
            finally:
                with self._cond:
                    self._in_flight = False
                    self._cond.notify_all()

    def _stamp(self, batch: TokenBatch, status: ProbeStatus) -> TokenBatch:
        """``batch`` with the books (cumulative counts, see sidecar.server.books) and the
        probe's ``status``; holds the lock."""
        batch.dropped_total = self.drops.snapshot()
        batch.shipped_tokens_total = self._shipped_tokens
        batch.base_shipped_tokens_total, batch.base_dropped_total = self._base
        self._last_handed = (self._shipped_tokens, batch.dropped_total)
        batch.probe_off = not status.enabled
        batch.probe_errors_total = status.errors_total
        return batch

    def _take_group(self) -> list[Shippable]:
        """The oldest items, up to ``max_tokens`` tokens (at least one); holds the lock."""
        group: list[Shippable] = []
        tokens = 0
        while self._queue and (not group or tokens + self._queue[0][1].tokens <= self._max_tokens):
            _, item = self._queue.popleft()
            tokens += item.tokens
            group.append(item)
        self._queued_tokens -= tokens
        return group

    def _drop_queued(self) -> None:
        with self._cond:
            items = [item for _, item in self._queue]
            self._queue.clear()
            self._queued_tokens = 0
            self._cond.notify_all()
        for item in items:
            item.discard()
        self.drops.add(SIDECAR_UNAVAILABLE, sum(item.tokens for item in items))

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed, timeout=seconds)
