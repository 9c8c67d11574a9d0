"""The gRPC ingest service ``circuitwatch.v1.Ingest/Stream``: wire bytes -> validated batches.

One client stream per engine worker. Messages are taken as raw bytes (the handler has no
deserializer) so that an undecodable message is rejected and counted like any other bad
batch while its stream carries on. Each message is decoded with ``from_message``, checked
against the server's spec hash, and handed to the ``Pipeline``; rejections are counted in
``circuitwatch_ingest_errors_total{reason}`` and logged at most once per interval per
reason. The probe's cumulative ``dropped_total`` is turned into increments per stream
(rank 0's only under tensor parallelism, see ``join.py``). Each stream is a *source* for the
pipeline's per-source caps (tracked requests, waiting tensor-parallel steps).

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
_MAX_DROP_KEYS = 256  # per stream: a sender inventing reasons cannot grow memory unbounded


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


class SenderDrops:
    """Turns one sender's cumulative ``dropped_total`` counts into increments."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] = {}

    def increments(self, model_name: str, dropped_total: dict[str, int]) -> list[tuple[str, int]]:
        result = []
        for reason, total in dropped_total.items():
            key = (model_name, reason)
            last = self._last.get(key)
            if last is None and len(self._last) >= _MAX_DROP_KEYS:
                continue
            self._last[key] = total
            # A total lower than before means the sender restarted its count.
            delta = total if last is None or total < last else total - last
            if delta:
                result.append((reason, delta))
        return result


class IngestService:
    def __init__(self, pipeline: Pipeline, spec_hash: str, num_components: int) -> None:
        self.pipeline = pipeline
        self.spec_hash = spec_hash
        self.num_components = num_components
        self.log = RateLimitedLog(logger)
        self._sources = itertools.count()

    def handler(self) -> grpc.GenericRpcHandler:
        stream = grpc.stream_unary_rpc_method_handler(
            self.stream, response_serializer=ingest_pb2.StreamSummary.SerializeToString
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Stream": stream})

    async def stream(
        self, messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> ingest_pb2.StreamSummary:
        drops = SenderDrops()
        source = next(self._sources)
        accepted = rejected = 0
        async for raw in messages:
            now = time.monotonic()
            try:
                self.accept(raw, drops, now, source)
                accepted += 1
            except Rejected as error:
                rejected += 1
                self.pipeline.metrics.ingest_error(error.reason)
                self.log.warning(error.reason, str(error), now)
            except Exception as error:  # a bug on an odd input must not end the stream
                rejected += 1
                self.pipeline.metrics.ingest_error("internal")
                self.log.warning("internal", repr(error), now)
                logger.debug("batch processing failed", exc_info=True)
        return ingest_pb2.StreamSummary(batches_accepted=accepted, batches_rejected=rejected)

    def accept(self, raw: bytes, drops: SenderDrops, now: float, source: int = 0) -> None:
        """Decode, validate and process one message from ``source``; raises Rejected."""
        try:
            message = ingest_pb2.SampleBatch.FromString(raw)
        except DecodeError as error:
            raise Rejected("decode", f"not a SampleBatch: {error}") from error
        try:
            batch = from_message(message, self.num_components)
        except MalformedBatch as error:
            raise Rejected("malformed", str(error)) from error
        metrics = self.pipeline.metrics
        model_name = metrics.model_label(batch.model_name)
        metrics.model(model_name).batches.inc()
        if len(set(batch.request_ids)) != len(batch.request_ids):
            raise Rejected("malformed", "request_ids: a request is listed twice")
        if batch.spec_hash != self.spec_hash:
            raise Rejected(
                "spec_hash",
                f"batch from {batch.model_name!r} rank {batch.rank} was built for spec "
                f"{batch.spec_hash!r}, this sidecar scores {self.spec_hash!r}",
            )
        if batch.rank == 0:  # the ranks drop the same tokens: count them once (see join.py)
            for reason, count in drops.increments(batch.model_name, batch.dropped_total):
                metrics.drop(model_name, metrics.reason_label(reason), count)
        self.pipeline.ingest(batch, now, source)
