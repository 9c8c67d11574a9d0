"""Every Prometheus metric the sidecar exports, declared in one place, on a registry passed in.

Names follow ``circuitwatch_<thing>_<unit>``; counters end in ``_total``. Labels are
bounded: ``circuit`` comes from the spec, ``phase``/``aggregation``/``finished_by``/
``verdict`` are fixed sets, and values that come from senders (``model_name``, the probe's drop
``reason``, the tensor-parallel ``rank``) are cut to a fixed number of distinct values (16
models, 32 reasons), the rest reported as "other"; a drop reason must also look like one
(lower-case words joined by ``_``, no digits, so no request id or other identifier passes).
No label carries a request id, a user id or prompt text: the sidecar never receives text,
and request ids go only to spans. The books (``circuitwatch_probe_*_tokens_total``, per
rank) are kept by ``sidecar.server.books``.

``circuitwatch_circuit_score`` buckets: scores are unbounded reals centred near zero, so
the default buckets are symmetric, 1-2-5 steps from 0.1 to 100 on both sides of 0. Every
circuit threshold and verdict threshold in the spec is added as a bucket boundary, so the
share of requests whose aggregate is above one can be read exactly from ``le``. With
buckets below zero prometheus_client exposes no ``_sum`` (OpenMetrics: a sum of values
that can be negative is not a counter); use ``histogram_quantile`` for typical scores.
Every circuit is observed with ``aggregation`` "mean" and "max", and, when its spec
configures another aggregation, with that kind too ("last", "ema_max", ...): at most
three series per circuit and phase, and the configured one always present.

``circuitwatch_verdicts_total`` counts finished requests per circuit, phase and verdict
("flagged": the phase's configured aggregate is above the circuit's verdict threshold,
else "clear"), for the circuits and phases that have a verdict threshold. Both verdicts'
series exist from a model's first batch, so the flagged share
``sum(rate(..{verdict="flagged"})) / sum(rate(..))`` is 0, not absent, while none is
flagged (recorded as ``circuitwatch:verdicts_flagged:ratio_rate5m``).

``circuitwatch_anomaly_score`` observes, per finished request past its model's warm-up,
each anomaly detector's score (``detector``: a circuit's name or "multivariate"; see
``sidecar.server.anomaly``): non-negative, z-scaled, buckets from 0.5 to 100 with the
anomaly threshold added as a boundary. ``circuitwatch_anomalous_requests_total`` counts
the requests whose score is above that threshold; its series exist from a model's first
batch.

``circuitwatch_probe_enabled`` (per model and rank) is 1 while the engine worker's probe
runs and 0 once a fault turned it off; ``circuitwatch_probe_errors_total`` counts those
faults by reason (``sidecar.probe.host.health.REASONS``). Both come from the probe's
cumulative state in every message (a probe that is off sends status messages), turned into
increments per (model, rank, reason) across streams, so a reconnect counts nothing twice;
a total lower than before (an engine restarted) counts afresh.

``circuitwatch_probe_overhead_ratio`` observes, per batch from a probe, the share of the
engine's step time the probe spent on the engine thread over the steps of that batch (about
one observation per probe message, i.e. per ``CIRCUITWATCH_LINGER_MS``), by model and
tensor-parallel rank; ``circuitwatch_probe_budget_ratio`` is the share it may spend
(``CIRCUITWATCH_BUDGET``), ``circuitwatch_probe_sample_level`` the share of each request's
tokens its budget lets through now, and ``circuitwatch_probe_graph_cost_ratio`` its in-graph
cost estimated at start (probe FLOPs over model FLOPs per token). See
``sidecar.probe.host.budget``.

``circuitwatch_token_to_metric_seconds`` measures, per request, from the arrival of the
request's first tokens to its record being observed: the longest any of its tokens waited
before showing in a metric (scores reach metrics once per request, when it finishes).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.protocol.batch import ProbeOverhead
from sidecar.server.anomaly import MULTIVARIATE, AnomalyConfig
from sidecar.server.records import FINISHED_BY_ENGINE, FINISHED_BY_IDLE, VERDICTS, RequestRecord
from sidecar.spec.schema import PHASE_NAMES, AggregationKind, Circuit

_MAGNITUDES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
DEFAULT_SCORE_BUCKETS = tuple(sorted({-m for m in _MAGNITUDES} | {0.0} | set(_MAGNITUDES)))
ANOMALY_BUCKETS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0, 50.0, 100.0)
OVERHEAD_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
AGGREGATIONS = ("mean", "max")  # observed for every circuit, besides its configured kind
OTHER = "other"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_MAX_PROBE_ERROR_KEYS = 1024  # (model, rank, reason) totals remembered for increments
_REASON = re.compile(r"^[a-z]+(_[a-z]+)*$")


class BoundedLabel:
    """Passes through at most ``limit`` distinct values that match ``pattern`` (and are at
    most 128 characters), then answers OTHER."""

    def __init__(self, limit: int, pattern: re.Pattern = _LABEL_VALUE) -> None:
        self.limit = limit
        self.pattern = pattern
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit or len(value) > 128 or not self.pattern.match(value):
            return OTHER
        self._seen.add(value)
        return value


@dataclass
class _ModelSeries:
    """Pre-resolved label children for one model: the per-batch path does no label lookups."""

    batches: Counter
    tokens: tuple[Counter, ...]  # by phase
    firing: tuple[Counter, ...]  # by circuit in SidecarMetrics.firing_circuits
    live: Gauge
    # [phase][circuit] -> by aggregation: mean, max, then the configured kind if another
    scores: tuple[tuple[tuple[Histogram, ...], ...], ...]
    # [phase][circuit] -> by verdict; empty where the circuit has no threshold for the phase
    verdicts: tuple[tuple[dict[str, Counter], ...], ...]
    requests: dict[str, Counter]  # by finished_by
    anomaly: dict[str, tuple[Histogram, Counter]]  # by detector: score, anomalous requests


class SidecarMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        circuits: Sequence[Circuit],
        score_buckets: Sequence[float] = DEFAULT_SCORE_BUCKETS,
        max_models: int = 16,
        max_drop_reasons: int = 32,
        max_ranks: int = 64,
        anomaly_threshold: float = AnomalyConfig.threshold,
    ) -> None:
        self.circuits = tuple(circuits)
        self.circuit_names = tuple(c.name for c in circuits)
        self.firing_circuits = tuple(i for i, c in enumerate(circuits) if c.threshold is not None)
        thresholds = {c.threshold for c in circuits if c.threshold is not None}
        thresholds |= {t for c in circuits for _, t in c.verdict_thresholds}
        self.model_label = BoundedLabel(max_models)
        self.reason_label = BoundedLabel(max_drop_reasons, _REASON)
        self.rank_label = BoundedLabel(max_ranks)
        self.probe_error_label = BoundedLabel(max_drop_reasons, _REASON)
        self._probe_errors: dict[tuple[str, str, str, str], int] = {}  # last total by key
        buckets = sorted(set(score_buckets) | thresholds)
        self.histogram_circuit_score = Histogram(
            "circuitwatch_circuit_score",
            "Per-request aggregate of a circuit's per-token scores, by phase and aggregation.",
            ["circuit", "model_name", "phase", "aggregation"],
            buckets=buckets,
            registry=registry,
        )
        self.histogram_token_to_metric_seconds = Histogram(
            "circuitwatch_token_to_metric_seconds",
            "Time from a request's first tokens arriving to its scores being observed.",
            ["model_name"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.counter_tokens_sampled = Counter(
            "circuitwatch_tokens_sampled_total",
            "Tokens whose component values were scored.",
            ["model_name", "phase"],
            registry=registry,
        )
        self.counter_batches_received = Counter(
            "circuitwatch_batches_received_total",
            "Sample batches decoded from the ingest streams (one per rank and engine step).",
            ["model_name"],
            registry=registry,
        )
        self.counter_requests_scored = Counter(
            "circuitwatch_requests_scored_total",
            "Requests whose circuit scores were aggregated and exported.",
            ["model_name", "finished_by"],
            registry=registry,
        )
        self.counter_samples_dropped = Counter(
            "circuitwatch_samples_dropped_total",
            "Sampled tokens lost before scoring, by the probe (its reasons) or the sidecar.",
            ["model_name", "reason"],
            registry=registry,
        )
        self.counter_probe_sampled_tokens = Counter(
            "circuitwatch_probe_sampled_tokens_total",
            "Tokens the probes sampled, as their cumulative counts say (see books.py): equals "
            "scored plus dropped, per rank.",
            ["model_name", "rank"],
            registry=registry,
        )
        self.counter_probe_scored_tokens = Counter(
            "circuitwatch_probe_scored_tokens_total",
            "Sampled tokens a probe sent that the sidecar scored, per rank.",
            ["model_name", "rank"],
            registry=registry,
        )
        self.counter_probe_dropped_tokens = Counter(
            "circuitwatch_probe_dropped_tokens_total",
            "Sampled tokens of a probe that were not scored, per rank and reason (the probe's "
            "reasons, lost_in_transit, and the sidecar's).",
            ["model_name", "rank", "reason"],
            registry=registry,
        )
        self.counter_prefix_cached_tokens = Counter(
            "circuitwatch_prefix_cached_tokens_total",
            "Prompt tokens served from the engine's prefix cache: no probe saw them, so a "
            "request's prompt aggregates cover only its uncached tail.",
            ["model_name"],
            registry=registry,
        )
        self.counter_ingest_errors = Counter(
            "circuitwatch_ingest_errors_total",
            "Ingest messages rejected, by reason.",
            ["reason"],
            registry=registry,
        )
        self.counter_circuit_firing_tokens = Counter(
            "circuitwatch_circuit_firing_tokens_total",
            "Tokens whose circuit score was above the circuit's threshold.",
            ["circuit", "model_name"],
            registry=registry,
        )
        self.counter_verdicts = Counter(
            "circuitwatch_verdicts_total",
            "Finished requests by verdict: flagged when the phase's configured aggregate is "
            "above the circuit's verdict threshold, else clear.",
            ["circuit", "model_name", "phase", "verdict"],
            registry=registry,
        )
        self.histogram_anomaly_score = Histogram(
            "circuitwatch_anomaly_score",
            "Per-request anomaly score against the model's recent requests, by detector.",
            ["detector", "model_name"],
            buckets=sorted(set(ANOMALY_BUCKETS) | {anomaly_threshold}),
            registry=registry,
        )
        self.counter_anomalous_requests = Counter(
            "circuitwatch_anomalous_requests_total",
            "Finished requests whose anomaly score was above the anomaly threshold.",
            ["detector", "model_name"],
            registry=registry,
        )
        self.counter_trace_context_invalid = Counter(
            "circuitwatch_trace_context_invalid_total",
            "W3C traceparent values from probes that were malformed and ignored (the request's "
            "span then starts a trace of its own).",
            registry=registry,
        )
        self.gauge_probe_enabled = Gauge(
            "circuitwatch_probe_enabled",
            "1 while an engine worker's probe runs, 0 once a fault turned it off.",
            ["model_name", "rank"],
            registry=registry,
        )
        self.counter_probe_errors = Counter(
            "circuitwatch_probe_errors_total",
            "Faults inside engine workers' probes, by reason; the first turns the probe off.",
            ["model_name", "rank", "reason"],
            registry=registry,
        )
        self.histogram_probe_overhead_ratio = Histogram(
            "circuitwatch_probe_overhead_ratio",
            "Share of the engine's step time the probe spent on the engine thread, per batch.",
            ["model_name", "rank"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.gauge_probe_budget_ratio = Gauge(
            "circuitwatch_probe_budget_ratio",
            "Share of the engine's step time the probe may spend (CIRCUITWATCH_BUDGET).",
            ["model_name", "rank"],
            registry=registry,
        )
        self.gauge_probe_sample_level = Gauge(
            "circuitwatch_probe_sample_level",
            "Share of each request's tokens the probe's latency budget lets through now.",
            ["model_name", "rank"],
            registry=registry,
        )
        self.gauge_probe_graph_cost_ratio = Gauge(
            "circuitwatch_probe_graph_cost_ratio",
            "The probe's in-graph cost estimated from its spec: its FLOPs per token over the "
            "model's.",
            ["model_name", "rank"],
            registry=registry,
        )
        self.gauge_live_requests = Gauge(
            "circuitwatch_live_requests",
            "Requests with aggregation state in the sidecar.",
            ["model_name"],
            registry=registry,
        )
        self.gauge_build_info = Gauge(
            "circuitwatch_build_info",
            "Always 1; labels name the sidecar version and the spec it scores.",
            ["version", "spec_hash", "model_hash", "model_name"],
            registry=registry,
        )
        self._models: dict[str, _ModelSeries] = {}

    def set_build_info(
        self, version: str, spec_hash: str, model_hash: str, model_name: str
    ) -> None:
        self.gauge_build_info.labels(version, spec_hash, model_hash, model_name).set(1)

    def model(self, model_name: str) -> _ModelSeries:
        """Label children for ``model_name`` (already bounded with ``model_label``)."""
        series = self._models.get(model_name)
        if series is None:
            series = self._models[model_name] = self._resolve(model_name)
        return series

    def drop(self, model_name: str, reason: str, tokens: int) -> None:
        if tokens > 0:
            self.counter_samples_dropped.labels(model_name, reason).inc(tokens)

    def probe_status(
        self,
        model_name: str,
        engine_id: str,
        rank: int,
        enabled: bool,
        errors_total: dict[str, int],
    ) -> None:
        """One message's probe state: ``errors_total`` are the sender's cumulative counts
        (kept per engine, so a restarted engine's fresh counts add to the series)."""
        rank_label = self.rank_label(str(rank))
        self.gauge_probe_enabled.labels(model_name, rank_label).set(1 if enabled else 0)
        for reason, total in errors_total.items():
            key = (engine_id, model_name, rank_label, reason)
            last = self._probe_errors.get(key)
            if last is None and len(self._probe_errors) >= _MAX_PROBE_ERROR_KEYS:
                continue
            self._probe_errors[key] = total
            delta = total if last is None or total < last else total - last
            if delta:
                label = self.probe_error_label(reason)
                self.counter_probe_errors.labels(model_name, rank_label, label).inc(delta)

    def probe_overhead(self, model_name: str, rank: int, overhead: ProbeOverhead) -> None:
        """One batch's overhead report (``model_name`` already bounded)."""
        labels = (model_name, self.rank_label(str(rank)))
        self.histogram_probe_overhead_ratio.labels(*labels).observe(overhead.ratio)
        self.gauge_probe_budget_ratio.labels(*labels).set(overhead.budget)
        self.gauge_probe_sample_level.labels(*labels).set(overhead.sample_level)
        self.gauge_probe_graph_cost_ratio.labels(*labels).set(overhead.graph_cost)

    def ingest_error(self, reason: str) -> None:
        self.counter_ingest_errors.labels(reason).inc()

    def _resolve(self, model_name: str) -> _ModelSeries:
        score, verdicts = self.histogram_circuit_score, self.counter_verdicts

        def aggregations(circuit: Circuit) -> tuple[str, ...]:
            kind = circuit.aggregation.kind
            mean_or_max = kind in (AggregationKind.MEAN, AggregationKind.MAX)
            return AGGREGATIONS if mean_or_max else (*AGGREGATIONS, kind.value)

        return _ModelSeries(
            batches=self.counter_batches_received.labels(model_name),
            tokens=tuple(self.counter_tokens_sampled.labels(model_name, p) for p in PHASE_NAMES),
            firing=tuple(
                self.counter_circuit_firing_tokens.labels(self.circuit_names[i], model_name)
                for i in self.firing_circuits
            ),
            live=self.gauge_live_requests.labels(model_name),
            scores=tuple(
                tuple(
                    tuple(score.labels(c.name, model_name, phase, a) for a in aggregations(c))
                    for c in self.circuits
                )
                for phase in PHASE_NAMES
            ),
            verdicts=tuple(
                tuple(
                    {v: verdicts.labels(c.name, model_name, phase, v) for v in VERDICTS}
                    if c.verdict_threshold(phase) is not None
                    else {}
                    for c in self.circuits
                )
                for phase in PHASE_NAMES
            ),
            requests={
                by: self.counter_requests_scored.labels(model_name, by)
                for by in (FINISHED_BY_ENGINE, FINISHED_BY_IDLE)
            },
            anomaly={
                detector: (
                    self.histogram_anomaly_score.labels(detector, model_name),
                    self.counter_anomalous_requests.labels(detector, model_name),
                )
                for detector in (*self.circuit_names, MULTIVARIATE)
            },
        )


class MetricsSink:
    """Observes each finished request's aggregates, verdicts and anomaly scores."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self.metrics = metrics

    def emit(self, record: RequestRecord) -> None:
        series = self.metrics.model(record.model_name)
        for stats in record.phases:
            phase = PHASE_NAMES.index(stats.phase)
            for circuit, children, verdicts in zip(
                stats.circuits, series.scores[phase], series.verdicts[phase], strict=True
            ):
                # mean, max and (only where the circuit configures another kind) aggregate
                values = (circuit.mean, circuit.max, circuit.aggregate)
                for child, value in zip(children, values, strict=False):
                    child.observe(value)
                if circuit.verdict is not None:
                    verdicts[circuit.verdict].inc()
        for anomaly in record.anomaly:
            score, anomalous = series.anomaly[anomaly.detector]
            score.observe(anomaly.score)
            if anomaly.anomalous:
                anomalous.inc()
        series.requests[record.finished_by].inc()
        self.metrics.histogram_token_to_metric_seconds.labels(record.model_name).observe(
            time.monotonic() - record.first_received
        )
