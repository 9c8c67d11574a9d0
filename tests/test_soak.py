"""The soak (benchmarks/soak.py) in one minute: steady chat load on the reference model behind
vLLM's OpenAI server while the sidecar (its own process) is killed and restarted, then stopped
and continued.
Every request must be served, memory must stay bounded, and batches must reach each new
sidecar within a few seconds. Also the soak's pure pieces, without an engine."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is not installed (see test_benchmarks_smoke.py)
from benchmarks._chat_load import Completion  # noqa: E402
from benchmarks._common import Trend  # noqa: E402
from benchmarks._processes import descendants, role, tree_rss  # noqa: E402
from benchmarks._sidecar_process import DROP_PATTERN, counters, total  # noqa: E402
from benchmarks.soak import (  # noqa: E402
    BIN_S,
    ENGINE_ROLES,
    Fault,
    Settings,
    first_batch_at,
    flowing_at,
    run_soak,
    throughput_bins,
)

CI_RECONNECT_LIMIT_S = 5.0  # "within a few seconds"; the 1-s target is tests/test_reconnect.py's
# One kill and one stop, each with 15 s or more of load after the sidecar is back.
CI_SETTINGS = Settings(
    model="reference",
    minutes=1,
    restart_every_s=18,
    outage_s=5,
    clients=4,
    max_tokens=32,
    sample_every_s=1.0,
)


def test_faults_alternate_and_leave_time_to_recover():
    settings = Settings(minutes=2, restart_every_s=30, outage_s=5)
    assert settings.faults() == [(30, "kill"), (60, "stop"), (90, "kill")]
    assert Settings(minutes=1, restart_every_s=50, outage_s=10).faults() == []
    assert CI_SETTINGS.faults() == [(18, "kill"), (36, "stop")]


def test_first_batch_and_flowing():
    # A burst of queued batches right after SIGCONT, a pause, then a steady stream.
    samples = [(0.0, 0), (0.05, 3), (0.1, 3), (1.9, 3)]
    samples += [(2.0 + 0.1 * i, 4 + i) for i in range(20)]
    assert first_batch_at(samples) == 0.05
    assert flowing_at(samples) == pytest.approx(2.0)
    assert flowing_at(samples[:8]) is None  # too few samples after the rise to tell
    assert first_batch_at([(0.0, 0), (0.5, 0)]) is None


def test_throughput_bins_mark_the_bins_a_fault_touches():
    completions = [Completion(0, t * BIN_S, True, 10) for t in (0.1, 0.2, 1.2, 2.5)]
    completions.append(Completion(0, 0.3 * BIN_S, False, 0, "boom"))
    fault = Fault("kill", 1.1 * BIN_S, 1.5 * BIN_S, 0.5, 0.8)
    bins = throughput_bins(completions, 3.2 * BIN_S, [fault])
    assert [(b.requests, b.output_tokens, b.faulted) for b in bins] == [
        (2, 20, False),
        (1, 10, True),
        (1, 10, False),
    ]


def test_trend_skips_the_warm_up():
    seconds = list(range(100))
    values = [500.0] * 10 + [100.0 + 0.5 * t for t in range(10, 100)]
    trend = Trend.of(seconds, values, warmup=0.2)
    assert trend.high == 500.0
    assert trend.slope_per_min == pytest.approx(30.0)
    assert 110 < trend.start < trend.end < 150


def test_drop_counters_are_found_by_name():
    scrape = {
        'circuitwatch_samples_dropped_total{model_name="m",reason="queue_full"}': 5.0,
        'circuitwatch_samples_dropped_created{model_name="m",reason="queue_full"}': 1e9,
        'circuitwatch_ingest_errors_total{reason="bad_spec"}': 2.0,
        'circuitwatch_batches_received_total{model_name="m"}': 7.0,
    }
    assert set(counters(scrape, DROP_PATTERN)) == {
        'circuitwatch_samples_dropped_total{model_name="m",reason="queue_full"}',
        'circuitwatch_ingest_errors_total{reason="bad_spec"}',
    }
    assert total(scrape, "circuitwatch_batches_received_total") == 7.0
    assert total(None, "circuitwatch_batches_received_total") == 0.0


def test_process_tree_rss_of_this_process():
    assert role(os.getpid()) == "other"  # not a vLLM process title
    found = tree_rss(os.getpid(), "me")
    assert found["me"] > 10  # MiB: a Python interpreter with numpy loaded
    assert os.getpid() not in descendants(os.getpid())


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    return run_soak(dataclasses.replace(CI_SETTINGS, workdir=tmp_path_factory.mktemp("soak")))


@pytest.mark.engine
def test_every_request_is_served_through_sidecar_faults(soak):
    assert [f.kind for f in soak.faults] == ["kill", "stop"]
    assert soak.requests_served > 20
    assert soak.requests_failed == 0, soak.errors
    # The first sidecar and the one started after the kill (then stopped): each scored tokens.
    assert [life.started_by for life in soak.incarnations] == ["start", "kill"]
    tokens = [total(life.last, "circuitwatch_tokens_sampled_total") for life in soak.incarnations]
    assert min(tokens) > 0, tokens


@pytest.mark.engine
def test_batches_reach_the_sidecar_within_seconds_of_every_fault(soak):
    times = [(f.kind, f.first_batch_s, f.flowing_s) for f in soak.faults]
    print(f"reconnect (fault, first batch s, flowing s): {times}")
    for kind, first, flowing in times:
        assert first is not None and first < CI_RECONNECT_LIMIT_S, (kind, first)
        assert flowing is not None and flowing < CI_RECONNECT_LIMIT_S + 2, (kind, flowing)


@pytest.mark.engine
def test_engine_memory_stays_bounded(soak, tmp_path):
    from benchmarks._soak_report import plot

    print({role: trend for role, trend in soak.memory.items()})
    assert {"api_server", "engine_core"} <= set(soak.memory)
    for engine_role in ENGINE_ROLES:
        if engine_role in soak.memory:
            assert soak.rss_bounded(engine_role), (engine_role, soak.memory[engine_role])
    assert 0 < soak.sidecar_rss_mib_max < 1024
    assert plot(soak, tmp_path / "soak.png").stat().st_size > 10_000
