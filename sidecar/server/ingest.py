"""The gRPC ingest service ``circuitwatch.v1.Ingest/Stream``: wire bytes -> validated batches.

One client stream per engine worker. Messages are taken as raw bytes (the handler has no
deserializer) so that an undecodable message is rejected and counted like any other bad
batch while its stream carries on. Each message is decoded with ``from_message``, checked
against the server's spec hash, and handed to the ``Pipeline``; rejections are counted in
``circuitwatch_ingest_errors_total{reason}`` and logged at most once per interval per
reason. Every decoded message is entered in the books first (``Pipeline.receive``, per
sender across its streams, see ``books.py``), so the rows of a refused one count too.
Every message's probe state goes to ``circuitwatch_probe_enabled`` /
``circuitwatch_probe_errors_total``; a status message (no steps, sent by a probe a fault
turned off) stops there.

``EngineStreams`` follows which engines have a stream open: an engine whose streams all
ended and that stays silent for ``grace`` seconds, or whose successor (a new engine id for
the same model and ranks) streams while it has none, is gone, and the pipeline closes its
requests (``Pipeline.forget_engine``).
Each stream is also a *source* for the pipeline's per-source caps (tracked requests,
waiting tensor-parallel steps).

Status codes a client sees (the stream's end; a rejected message does not end its stream):

    OK                  the stream ended; StreamSummary counts accepted and rejected messages
    UNAUTHENTICATED     TCP ingest without a valid bearer token (see ``auth.py``); without a
                        client certificate the TLS handshake itself fails (UNAVAILABLE)
    RESOURCE_EXHAUSTED  a message above MAX_MESSAGE_BYTES (the stream ends), or more
                        concurrent RPCs than the server's ``max_streams``
    UNIMPLEMENTED       any other method
    UNAVAILABLE         the sidecar is not there, or is shutting down
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from sidecar.protocol.batch import MalformedBatch, from_message
from sidecar.protocol.circuitwatch.v1 import ingest_pb2
from sidecar.server.pipeline import Pipeline, Rejected

logger = logging.getLogger(__name__)

SERVICE_NAME = "circuitwatch.v1.Ingest"


class RateLimitedLog:
    """Logs a warning per reason at most once per ``interval`` seconds, with a skipped count."""

    def __init__(self, log: logging.Logger, interval: float = 10.0) -> None:
        self.log = log
        self.interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, reason: str, message: str, now: float) -> None:
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._skipped[reason] = self._skipped.get(reason, 0) + 1
            return
        skipped = self._skipped.pop(reason, 0)
        suffix = f" ({skipped} more since last report)" if skipped else ""
        self.log.warning("rejected batch (%s): %s%s", reason, message, suffix)
        self._last[reason] = now


class EngineStreams:
    """Which engines have streams open, and which are gone (see the module's docstring)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        # Bounded: an engine is here while it has streams open, then for ``grace`` seconds.
        self._open: dict[str, int] = {}  # engine id -> streams open
        self._silent_since: dict[str, float] = {}  # engines with no stream open
        self._fleet: dict[str, tuple[str, int]] = {}  # engine id -> (model name, world size)
        self._gone: list[str] = []

    def opened(self, engine_id: str, model_name: str, world_size: int) -> None:
        fleet = (model_name, world_size)
        for other in list(self._silent_since):  # a successor is here
            if other != engine_id and self._fleet.get(other) == fleet:
                self._forget(other)
        self._silent_since.pop(engine_id, None)
        self._open[engine_id] = self._open.get(engine_id, 0) + 1
        self._fleet[engine_id] = fleet

    def closed(self, engine_id: str, now: float) -> None:
        left = self._open.get(engine_id, 0) - 1
        if left > 0:
            self._open[engine_id] = left
        elif engine_id in self._open:
            del self._open[engine_id]
            self._silent_since[engine_id] = now

    def gone(self, now: float) -> list[str]:
        """Engines gone since the last call, to forget."""
        for engine_id, since in list(self._silent_since.items()):
            if since <= now - self.grace:
                self._forget(engine_id)
        gone, self._gone = self._gone, []
        return gone

    def _forget(self, engine_id: str) -> None:
        self._silent_since.pop(engine_id, None)
        self._open.pop(engine_id, None)
        self._fleet.pop(engine_id, None)
        self._gone.append(engine_id)


class IngestService:
    def __init__(
        self,
        pipeline: Pipeline,
        spec_hash: str,
        num_components: int,
        engine_grace: float = 10.0,
    ) -> None:
        self.pipeline = pipeline
        self.spec_hash = spec_hash
        self.num_components = num_components
        self.log = RateLimitedLog(logger)
        self.engines = EngineStreams(engine_grace)
        self._sources = itertools.count()

    def handler(self) -> grpc.GenericRpcHandler:
        stream = grpc.stream_unary_rpc_method_handler(
            self.stream, response_serializer=ingest_pb2.StreamSummary.SerializeToString
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Stream": stream})

    async def stream(
        self, messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> ingest_pb2.StreamSummary:
        senders: set[str] = set()  # engines this stream spoke for (one, in practice)
        source = next(self._sources)
        accepted = rejected = 0
        try:
            async for raw in messages:
                now = time.monotonic()
                if self._receive(raw, senders, now, source):
                    accepted += 1
                else:
                    rejected += 1
        finally:
            for engine_id in senders:
                self.engines.closed(engine_id, time.monotonic())
        return ingest_pb2.StreamSummary(batches_accepted=accepted, batches_rejected=rejected)

    def _receive(self, raw: bytes, senders: set[str], now: float, source: int) -> bool:
        """One message; False (counted and logged) if it was rejected."""
        try:
            self.accept(raw, now, senders, source)
            return True
        except Rejected as error:
            self.pipeline.metrics.ingest_error(error.reason)
            self.log.warning(error.reason, str(error), now)
        except Exception as error:  # a bug on an odd input must not end the stream
            self.pipeline.metrics.ingest_error("internal")
            self.log.warning("internal", repr(error), now)
            logger.debug("batch processing failed", exc_info=True)
        return False

    def accept(
        self, raw: bytes, now: float, senders: set[str] | None = None, source: int = 0
    ) -> None:
        """Decode, validate and process one message from ``source``; raises Rejected.
        ``senders``: the engine of the stream so far (one at most), None: not tracked."""
        try:
            message = ingest_pb2.SampleBatch.FromString(raw)
        except DecodeError as error:
            raise Rejected("decode", f"not a SampleBatch: {error}") from error
        try:
            batch = from_message(message, self.num_components)
        except MalformedBatch as error:
            raise Rejected("malformed", str(error)) from error
        pipeline = self.pipeline
        metrics = pipeline.metrics
        model_name = metrics.model_label(batch.model_name)
        if not batch.is_status:
            metrics.model(model_name).batches.inc()
        if senders is not None and batch.engine_id not in senders:
            if senders:  # one worker, one stream: a stream naming engine after engine is hostile
                raise Rejected(
                    "malformed",
                    f"engine_id: {batch.engine_id[:64]!r} on a stream that carries engine "
                    f"{next(iter(senders))[:64]!r}; a stream carries one engine",
                )
            senders.add(batch.engine_id)
            self.engines.opened(batch.engine_id, batch.model_name, batch.world_size)
        pipeline.receive(batch)
        try:
            if len(set(batch.request_ids)) != len(batch.request_ids):
                raise Rejected("malformed", "request_ids: a request is listed twice")
            if batch.spec_hash != self.spec_hash:
                raise Rejected(
                    "spec_hash",
                    f"batch from {batch.model_name!r} rank {batch.rank} was built for spec "
                    f"{batch.spec_hash!r}, this sidecar scores {self.spec_hash!r}",
                )
        except Rejected:
            pipeline.refuse(batch)
            raise
        metrics.probe_status(
            model_name, batch.engine_id, batch.rank, not batch.probe_off, batch.probe_errors_total
        )
        if batch.overhead is not None:
            metrics.probe_overhead(model_name, batch.rank, batch.overhead)
        if not batch.is_status:
            pipeline.ingest(batch, now, source)

    def tick(self, now: float) -> None:
        """The periodic work: the pipeline's, and forgetting the engines that are gone."""
        for engine_id in self.engines.gone(now):
            self.pipeline.forget_engine(engine_id)
        self.pipeline.tick(now)
