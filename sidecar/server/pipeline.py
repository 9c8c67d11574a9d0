"""The sidecar's synchronous core: a decoded batch in, metrics and finished-request records out.

``Pipeline.receive`` enters a decoded batch in the books (``sidecar.server.books``), and
``refuse`` settles the rows of one the sidecar will not use. ``Pipeline.ingest`` takes one
validated ``TokenBatch`` (one rank, one or more engine steps): join tensor-parallel ranks ->
drop non-finite rows -> score -> fold into per-request state -> count -> finish the
requests the engine reported finished -> score each record for anomalies (optional,
``sidecar.server.anomaly``) -> hand records to every sink. Every row received is settled in
the books once: scored, or dropped with a reason.
``Pipeline.tick`` runs the periodic work: join timeouts and idle requests;
``forget_engine`` closes what a gone engine left behind.
Both take ``now`` (``time.monotonic()``) from the caller, and neither does I/O, so the
same object runs under the gRPC server, in a benchmark, or in a unit test.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from sidecar.protocol.batch import TokenBatch
from sidecar.server.anomaly import AnomalyMonitor
from sidecar.server.books import REJECTED, Books
from sidecar.server.join import DroppedJoin, RankJoiner
from sidecar.server.metrics import SidecarMetrics
from sidecar.server.records import FINISHED_BY_ENGINE, RecordSink, RequestRecord
from sidecar.server.requests import RequestTable
from sidecar.server.scoring import ComponentLayoutError, Scorer

logger = logging.getLogger(__name__)


class Rejected(ValueError):
    """A batch the sidecar refuses; ``reason`` is its bounded ``ingest_errors`` label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Pipeline:
    def __init__(
        self,
        scorer: Scorer,
        metrics: SidecarMetrics,
        sinks: Sequence[RecordSink],
        idle_timeout: float = 60.0,
        max_requests: int = 10_000,
        keep_token_scores: int = 0,
        join_timeout: float = 5.0,
        anomaly: AnomalyMonitor | None = None,
        max_requests_per_source: int | None = None,
    ) -> None:
        """``max_requests_per_source``: live requests one source may open (None: no cap
        beyond ``max_requests``); see ``RequestTable``."""
        self.scorer = scorer
        self.metrics = metrics
        self.sinks = tuple(sinks)
        self.idle_timeout = idle_timeout
        self.requests = RequestTable(
            scorer.circuits, max_requests, keep_token_scores, max_requests_per_source
        )
        self.joiner = RankJoiner(join_timeout)
        self.anomaly = anomaly
        self.books = Books(metrics)

    def receive(self, batch: TokenBatch) -> None:
        """Enter a decoded batch in the books; raises Rejected for one already counted lost."""
        if self.books.is_stale(batch):
            raise Rejected(
                "stale",
                f"engine {batch.engine_id!r} rank {batch.rank}: a message that arrived after a "
                "later one (counted lost in transit)",
            )
        model_name = self.metrics.model_label(batch.model_name)
        self.books.receive(batch, model_name)
        if batch.rank == 0 and batch.prefix_cached_tokens:  # every rank sends the same
            self.metrics.counter_prefix_cached_tokens.labels(model_name).inc(
                sum(batch.prefix_cached_tokens.values())
            )

    def refuse(self, batch: TokenBatch) -> None:
        """Settle the rows of a received batch the sidecar will not use."""
        model_name = self.metrics.model_label(batch.model_name)
        self.books.settle(model_name, (batch.rank,), REJECTED, batch.num_tokens)

    def ingest(self, batch: TokenBatch, now: float, source: int = 0) -> None:
        """Process one rank's batch; raises Rejected for a batch that cannot be used.
        ``source`` names the sender (the server passes its stream) for the per-source caps."""
        model_name = self.metrics.model_label(batch.model_name)
        outcome = self.joiner.add(batch, now, source)
        self._given_up(outcome.dropped)
        for part in outcome.refused:
            self.books.settle(model_name, (part.rank,), REJECTED, part.num_tokens)
        for joined in outcome.joined:
            self._score(joined.batch, joined.ranks, model_name, now, source)
        if outcome.errors:
            error = outcome.errors[0]
            raise Rejected(error.reason, str(error)) from error

    def tick(self, now: float) -> None:
        self._given_up(self.joiner.expire(now))
        self._emit(self.requests.expire(now, self.idle_timeout))

    def forget_engine(self, engine_id: str) -> None:
        """An engine is gone: give up on its steps and close its requests."""
        self._given_up(self.joiner.forget_engine(engine_id))
        self._emit(self.requests.forget_engine(engine_id))

    def _given_up(self, dropped: list[DroppedJoin]) -> None:
        for join in dropped:
            model_name = self.metrics.model_label(join.model_name)
            self.books.settle(model_name, (join.rank,), join.reason, join.tokens)
            if join.rank == 0:  # the ranks' parts hold the same tokens: count them once
                self.metrics.drop(model_name, join.reason, join.tokens)

    def _score(
        self, batch: TokenBatch, ranks: tuple[int, ...], model_name: str, now: float, source: int
    ) -> None:
        settle = self.books.settle
        try:
            scores = self.scorer.score(batch.values, batch.component_ids)
        except ComponentLayoutError as error:
            settle(model_name, ranks, REJECTED, batch.num_tokens)
            raise Rejected("component_ids", str(error)) from error
        series = self.metrics.model(model_name)
        request_index, positions, phases = batch.request_index, batch.positions, batch.phases
        if not np.isfinite(scores).all():
            finite = np.isfinite(scores).all(axis=1)
            non_finite = int(np.count_nonzero(~finite))
            self.metrics.drop(model_name, "non_finite", non_finite)
            settle(model_name, ranks, "non_finite", non_finite)
            scores, request_index = scores[finite], request_index[finite]
            positions, phases = positions[finite], phases[finite]
        # Requests that start in this batch: a caller's id used again is a new request.
        self._emit(self.requests.start(batch.prefix_cached_tokens, batch.engine_id))
        scored = scores.shape[0]
        if scored:
            for dropped in self.requests.add(
                model_name,
                batch.request_ids,
                request_index,
                positions,
                phases,
                scores,
                now,
                batch.traceparents,
                batch.prefix_cached_tokens,
                batch.engine_id,
                owner=source,
            ):
                self.metrics.drop(dropped.model_name, dropped.reason, dropped.tokens)
                if dropped.incoming:
                    settle(model_name, ranks, dropped.reason, dropped.tokens)
                    scored -= dropped.tokens
                if dropped.model_name != model_name:  # an eviction frees another model's slot
                    self.metrics.model(dropped.model_name).live.set(
                        self.requests.live(dropped.model_name)
                    )
            settle(model_name, ranks, None, scored)
            for counter, tokens in zip(
                series.tokens, np.bincount(phases, minlength=2), strict=True
            ):
                if tokens:
                    counter.inc(int(tokens))
            if series.firing:
                firing = self.scorer.firing(scores)
                for counter, index in zip(series.firing, self.metrics.firing_circuits, strict=True):
                    if firing[index]:
                        counter.inc(int(firing[index]))
        records = (
            self.requests.finish(r, FINISHED_BY_ENGINE, batch.engine_id)
            for r in batch.finished_request_ids
        )
        self._emit([r for r in records if r is not None])
        series.live.set(self.requests.live(model_name))

    def _emit(self, records: list[RequestRecord]) -> None:
        for record in records:
            if self.anomaly is not None:
                try:
                    record = replace(record, anomaly=self.anomaly.score(record))
                except Exception:  # a failing detector must not cost the record
                    logger.exception("anomaly scoring failed for %s", record.request_id)
            for sink in self.sinks:
                try:
                    sink.emit(record)
                except Exception:  # a broken sink must not stop scoring
                    logger.exception("record sink %r failed", sink)
        for model_name in {r.model_name for r in records}:
            self.metrics.model(model_name).live.set(self.requests.live(model_name))
