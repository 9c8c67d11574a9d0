"""Anomaly detection over finished requests: the estimators, false alarms, detection delay,
length control, warm-up, and what reaches metrics and spans through the pipeline."""

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from test_server_aggregation import make_spec

from sidecar.protocol.batch import GENERATED, PROMPT, TokenBatch
from sidecar.server.anomaly import (
    DEFAULT_ANOMALY,
    MAD_TO_SIGMA,
    MULTIVARIATE,
    AnomalyConfig,
    AnomalyMonitor,
    chi_square_to_z,
    fit_baseline,
    robust_location_scale,
    shrunk_covariance,
)
from sidecar.server.metrics import MetricsSink, SidecarMetrics
from sidecar.server.pipeline import Pipeline
from sidecar.server.records import CircuitStats, CollectingSink, PhaseStats, RequestRecord
from sidecar.server.scoring import Scorer
from sidecar.server.tracing import TracingSink
from sidecar.spec.schema import Circuit

NAMES = ("a", "b", "c")
CIRCUITS = tuple(Circuit(name, weights=(1.0,)) for name in NAMES)
SIGMA = 0.2  # noise of every aggregate in the synthetic streams
# Correlation of the 6 aggregates: circuits a, b, c in the prompt, then in generation.
CORRELATION = np.array(
    [
        [1.0, 0.9, 0.3, 0.5, 0.4, 0.2],
        [0.9, 1.0, 0.3, 0.4, 0.5, 0.2],
        [0.3, 0.3, 1.0, 0.2, 0.2, 0.5],
        [0.5, 0.4, 0.2, 1.0, 0.8, 0.3],
        [0.4, 0.5, 0.2, 0.8, 1.0, 0.3],
        [0.2, 0.2, 0.5, 0.3, 0.3, 1.0],
    ]
)
SEEDS = (0, 1, 2)
FALSE_ALARM_RATE = 0.005  # per detector, stationary Gaussian stream, default threshold
MAX_DELAY = 3  # shifted requests that may pass before the first alarm


def phase(name: str, tokens: int, aggregates) -> PhaseStats:
    stats = (CircuitStats(n, v, v, v, v) for n, v in zip(NAMES, aggregates, strict=True))
    return PhaseStats(name, tokens, tuple(stats))


def record(i: int, *phases: PhaseStats) -> RequestRecord:
    return RequestRecord(f"req-{i}", "m", "engine", phases, 0.0)


def stream(seed, n, shift=None, start=0, log_prompt=None, slope=0.5):
    """Aggregates = slope * log(tokens of the phase) + correlated Gaussian noise (+ shift)."""
    rng = np.random.default_rng(seed)
    log_prompt = rng.normal(4.0, 1.0, n) if log_prompt is None else log_prompt(rng, n)
    log_generated = rng.uniform(1.0, 6.0, n)
    prompt = (np.exp(log_prompt).round() + 1).astype(int)
    generated = (np.exp(log_generated).round() + 1).astype(int)
    x = rng.multivariate_normal(np.zeros(6), CORRELATION * SIGMA**2, size=n)
    x[:, :3] += slope * np.log(prompt)[:, None]
    x[:, 3:] += slope * np.log(generated)[:, None]
    if shift is not None:
        x[start:] += np.asarray(shift) * SIGMA
    return [
        record(i, phase("prompt", prompt[i], x[i, :3]), phase("generation", generated[i], x[i, 3:]))
        for i in range(n)
    ]


def anomalous(scores, detectors):
    return any(s.detector in detectors and s.anomalous for s in scores)


def run(records, config=DEFAULT_ANOMALY):
    monitor = AnomalyMonitor(CIRCUITS, config)
    return [monitor.score(r) for r in records]


def test_robust_location_scale_is_median_and_normalised_mad():
    values = np.array([3.0, -1.0, 7.5, 2.0, 2.5, 100.0, 0.0])
    median, scale = robust_location_scale(values)
    assert median == np.median(values)
    assert scale == pytest.approx(MAD_TO_SIGMA * np.median(np.abs(values - np.median(values))))
    # MAD 0 (most values equal): the scale falls back to the mean absolute deviation
    median, scale = robust_location_scale(np.array([1.0, 1.0, 1.0, 1.0, 3.0]))
    assert median == 1.0 and scale == pytest.approx(np.sqrt(np.pi / 2) * 0.4)
    assert robust_location_scale(np.full(9, 5.0))[1] == pytest.approx(5e-6)


def test_scores_are_sliding_window_robust_z_without_length_control():
    rng = np.random.default_rng(7)
    values = rng.standard_t(3, size=(120, 3))  # heavy tails: median and MAD differ from mean/sd
    config = AnomalyConfig(warmup=20, window=50, threshold=1e9, length_control=False, refit_every=1)
    monitor = AnomalyMonitor(CIRCUITS, config)
    for i, row in enumerate(values):
        scores = {
            s.detector: s.score for s in monitor.score(record(i, phase("prompt", i + 1, row)))
        }
        if i < config.warmup:
            assert scores == {}
            continue
        window = values[max(0, i - config.window) : i]
        median = np.median(window, axis=0)
        mad = np.median(np.abs(window - median), axis=0)
        expected = np.abs(row - median) / (MAD_TO_SIGMA * mad)
        np.testing.assert_allclose([scores[n] for n in NAMES], expected, rtol=1e-9)
        assert MULTIVARIATE in scores


def test_length_regression_matches_least_squares_and_ignores_outliers():
    rng = np.random.default_rng(3)
    log_tokens = rng.uniform(1, 8, size=(300, 1))
    y = 0.7 + 0.3 * log_tokens + rng.uniform(-0.1, 0.1, size=(300, 1))  # nothing to trim
    fit = fit_baseline(y, log_tokens, length_control=True)
    slope, intercept = np.polyfit(log_tokens[:, 0], y[:, 0], 1)
    assert fit.slope[0] == pytest.approx(slope) and fit.intercept[0] == pytest.approx(intercept)
    y[:15] += 50.0 * log_tokens[:15]  # 5 % gross outliers would tilt plain least squares
    assert abs(np.polyfit(log_tokens[:, 0], y[:, 0], 1)[0] - 0.3) > 0.1
    assert fit_baseline(y, log_tokens, length_control=True).slope[0] == pytest.approx(0.3, abs=0.02)


def test_lengths_outside_the_window_are_scored_at_its_nearest_end():
    # A window of 20-400 token prompts; a 50,000-token prompt must not be extrapolated to.
    config = AnomalyConfig(warmup=60, window=200, refit_every=10_000)  # one fit for both
    monitor = AnomalyMonitor(CIRCUITS, config)
    for r in stream(4, 60, log_prompt=lambda rng, n: rng.uniform(3.0, 6.0, n), slope=0.5):
        monitor.score(r)
    generation = phase("generation", 50, [0.5 * np.log(51)] * 3)

    def z(tokens: int) -> dict[str, float]:
        aggregates = [0.5 * np.log(400)] * 3  # what a 400-token prompt typically reads
        scores = monitor.score(record(tokens, phase("prompt", tokens, aggregates), generation))
        return {s.detector: s.score for s in scores}

    at_end, far = z(400), z(50_000)
    for name in NAMES:
        assert far[name] == pytest.approx(at_end[name], abs=0.1)
        assert far[name] < config.threshold  # unclamped, 0.5 * log(125) of drift reads as 10 sigma


def test_shrunk_covariance_matches_the_direct_formula():
    rng = np.random.default_rng(5)
    x = rng.multivariate_normal(np.zeros(4), CORRELATION[:4, :4], size=40)
    shrunk, shrinkage = shrunk_covariance(x)
    n = len(x)
    centred = x - x.mean(axis=0)
    products = centred[:, :, None] * centred[:, None, :]  # [n, p, p]: w_kij
    sample = np.cov(x, rowvar=False)
    variance = n / (n - 1) ** 3 * ((products - products.mean(axis=0)) ** 2).sum(axis=0)
    off = ~np.eye(4, dtype=bool)
    expected = variance[off].sum() / (sample[off] ** 2).sum()
    assert 0 < shrinkage < 1 and shrinkage == pytest.approx(expected)
    np.testing.assert_allclose(np.diag(shrunk), np.diag(sample))
    np.testing.assert_allclose(shrunk[off], (1 - shrinkage) * sample[off])
    # more data, less shrinkage
    assert shrunk_covariance(rng.multivariate_normal(np.zeros(4), CORRELATION[:4, :4], 4000))[1] < (
        shrinkage
    )


@pytest.mark.parametrize("dof", [1, 6, 20])
def test_chi_square_to_z_has_standard_normal_tails(dof):
    samples = np.random.default_rng(dof).chisquare(dof, size=200_000)
    z = chi_square_to_z(samples, dof)
    assert np.mean(z > 2.0) == pytest.approx(0.02275, rel=0.15)
    assert np.median(z) == pytest.approx(0.0, abs=0.05)


def test_warm_up_scores_nothing():
    config = AnomalyConfig(warmup=50)
    scores = run(stream(0, 60), config)
    assert all(s == () for s in scores[:50])
    assert all({s.detector for s in scored} == {*NAMES, MULTIVARIATE} for scored in scores[50:])


@pytest.mark.parametrize("seed", SEEDS)
def test_stationary_stream_stays_under_the_false_alarm_rate(seed):
    scores = run(stream(seed, 5000))[DEFAULT_ANOMALY.warmup :]
    for detector in (*NAMES, MULTIVARIATE):
        assert np.mean([anomalous(s, {detector}) for s in scores]) <= FALSE_ALARM_RATE


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_shift_in_one_circuit_is_flagged_at_once_and_stays_flagged(seed):
    shift = [5.0, 0, 0, 0, 0, 0]  # circuit a, prompt phase: 5 sigma (5 scaled MADs)
    scores = run(stream(seed, 2500, shift, start=1000))[1000:]
    flagged = [anomalous(s, {"a"}) for s in scores]
    assert flagged.index(True) <= MAX_DELAY
    # adapting only on non-anomalous requests: the sustained shift does not become normal
    assert np.mean(flagged[-500:]) >= 0.7


@pytest.mark.parametrize("seed", SEEDS)
def test_correlated_shift_is_seen_only_by_the_multivariate_detector(seed):
    shift = [2.0, -2.0, 0, 0, 0, 0]  # a and b (correlation 0.9) move apart, 2 sigma each
    scores = run(stream(seed, 2000, shift, start=1000))[1000:]
    multivariate = [anomalous(s, {MULTIVARIATE}) for s in scores]
    assert multivariate.index(True) <= MAX_DELAY
    assert np.mean(multivariate) >= 0.9
    assert np.mean([anomalous(s, set(NAMES)) for s in scores]) <= 0.1


def test_slow_drift_is_followed():
    # 4 sigma over 3000 requests: a frozen baseline would flag the last part of the stream
    scores = run(stream(0, 3000, np.linspace(0, 4, 3000)[:, None] * [1, 1, 1, 1, 1, 1]))
    assert np.mean([anomalous(s, {*NAMES, MULTIVARIATE}) for s in scores[200:]]) <= 0.01


def test_length_control_removes_the_length_confound():
    def lengths(rng, n):  # chat-sized prompts, and 5 % long documents
        return np.where(rng.random(n) < 0.05, rng.uniform(7.0, 8.0, n), rng.normal(4.0, 0.5, n))

    records = stream(0, 3000, log_prompt=lengths, slope=0.5)
    rates = {}
    for control in (True, False):
        scores = run(records, AnomalyConfig(length_control=control))[200:]
        rates[control] = np.mean([anomalous(s, {*NAMES, MULTIVARIATE}) for s in scores])
    assert rates[True] <= FALSE_ALARM_RATE
    assert rates[False] >= 0.03  # most of the 5 % long prompts read as anomalous


def test_pipeline_exports_anomaly_metrics_and_span_attributes():
    spec = make_spec()
    registry = CollectorRegistry()
    metrics = SidecarMetrics(registry, spec.circuits, anomaly_threshold=3.0)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sink = CollectingSink()
    pipeline = Pipeline(
        Scorer.from_spec(spec),
        metrics,
        [MetricsSink(metrics), TracingSink(provider), sink],
        anomaly=AnomalyMonitor(spec.circuits, AnomalyConfig(warmup=20, threshold=3.0)),
    )
    rng = np.random.default_rng(0)

    def one_request(i, values):
        n = len(values)
        phases = np.array([PROMPT] * (n - 1) + [GENERATED], dtype=np.uint8)
        batch = TokenBatch(
            spec_hash=spec.hash,
            model_name="tiny",
            steps=(i,),
            component_ids=np.arange(3, dtype=np.uint32),
            request_ids=[f"r{i}"],
            request_index=np.zeros(n, dtype=np.uint32),
            positions=np.arange(n, dtype=np.int32),
            phases=phases,
            values=np.asarray(values, dtype=np.float32),
            finished_request_ids=[f"r{i}"],
        )
        pipeline.ingest(batch, float(i))

    def sample(name, detector):
        return registry.get_sample_value(name, {"detector": detector, "model_name": "tiny"})

    for i in range(20):  # warm-up: the series exist, nothing observed
        one_request(i, rng.normal(0, 0.1, size=(5, 3)))
    assert sample("circuitwatch_anomaly_score_count", MULTIVARIATE) == 0
    assert sample("circuitwatch_anomalous_requests_total", "a") == 0
    assert not any(
        k.startswith("circuitwatch.anomaly.") for k in exporter.get_finished_spans()[-1].attributes
    )
    one_request(20, rng.normal(0, 0.1, size=(5, 3)) + [5.0, 0, 0])  # circuit a far off
    for detector in ("a", "b", MULTIVARIATE):
        assert sample("circuitwatch_anomaly_score_count", detector) == 1
    assert sample("circuitwatch_anomalous_requests_total", "a") == 1
    assert sample("circuitwatch_anomaly_score_bucket", "a") is None  # buckets carry "le"
    assert (
        registry.get_sample_value(
            "circuitwatch_anomaly_score_bucket",
            {"detector": "a", "model_name": "tiny", "le": "3.0"},
        )
        == 0
    )
    attributes = exporter.get_finished_spans()[-1].attributes
    (last,) = [r for r in sink.records if r.request_id == "r20"]
    a = next(s for s in last.anomaly if s.detector == "a")
    assert attributes["circuitwatch.anomaly.a.score"] == a.score > 3.0
    assert attributes["circuitwatch.anomaly.a.anomalous"] is True
    assert f"circuitwatch.anomaly.{MULTIVARIATE}.score" in attributes


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="warm-up"):
        AnomalyConfig(warmup=2)
    with pytest.raises(ValueError, match="window"):
        AnomalyConfig(warmup=500, window=100)
    with pytest.raises(ValueError, match="threshold"):
        AnomalyConfig(threshold=0)
