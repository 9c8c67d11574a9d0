"""The sidecar's synchronous core: a decoded batch in, metrics and finished-request records out.

``Pipeline.ingest`` takes one validated ``TokenBatch`` (one rank, one or more engine steps):
join tensor-parallel ranks -> drop non-finite rows -> score -> fold into per-request
state -> count -> finish the requests the engine reported finished -> score each record
for anomalies (optional, ``sidecar.server.anomaly``) -> hand records to every sink.
``Pipeline.tick`` runs the periodic work: join timeouts and idle requests.
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
from sidecar.server.join import RankJoiner
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

    def ingest(self, batch: TokenBatch, now: float, source: int = 0) -> None:
        """Process one rank's batch; raises Rejected for a batch that cannot be used.
        ``source`` names the sender (the server passes its stream) for the per-source caps."""
        model_name = self.metrics.model_label(batch.model_name)
        outcome = self.joiner.add(batch, now, source)
        for dropped in outcome.dropped:
            self.metrics.drop(
                self.metrics.model_label(dropped.model_name), dropped.reason, dropped.tokens
            )
        for joined in outcome.joined:
            self._score(joined, model_name, now, source)
        if outcome.errors:
            error = outcome.errors[0]
            raise Rejected(error.reason, str(error)) from error

    def tick(self, now: float) -> None:
        for dropped in self.joiner.expire(now):
            self.metrics.drop(
                self.metrics.model_label(dropped.model_name), dropped.reason, dropped.tokens
            )
        self._emit(self.requests.expire(now, self.idle_timeout))

    def _score(self, batch: TokenBatch, model_name: str, now: float, source: int) -> None:
        try:
            scores = self.scorer.score(batch.values, batch.component_ids)
        except ComponentLayoutError as error:
            raise Rejected("component_ids", str(error)) from error
        series = self.metrics.model(model_name)
        request_index, positions, phases = batch.request_index, batch.positions, batch.phases
        if not np.isfinite(scores).all():
            finite = np.isfinite(scores).all(axis=1)
            self.metrics.drop(model_name, "non_finite", int(np.count_nonzero(~finite)))
            scores, request_index = scores[finite], request_index[finite]
            positions, phases = positions[finite], phases[finite]
        if scores.shape[0]:
            for dropped in self.requests.add(
                model_name,
                batch.request_ids,
                request_index,
                positions,
                phases,
                scores,
                now,
                batch.traceparents,
                owner=source,
            ):
                self.metrics.drop(dropped.model_name, dropped.reason, dropped.tokens)
                if dropped.model_name != model_name:  # an eviction frees another model's slot
                    self.metrics.model(dropped.model_name).live.set(
                        self.requests.live(dropped.model_name)
                    )
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
        records = (self.requests.finish(r, FINISHED_BY_ENGINE) for r in batch.finished_request_ids)
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
