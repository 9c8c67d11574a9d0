"""What the sidecar knows about one finished request, and where it sends that.

A ``RequestRecord`` is built once per request, when the engine reports it finished or
when no data arrived for it for the idle timeout. Every ``RecordSink`` (Prometheus
histograms, OpenTelemetry spans, a test's collector) receives the same record. Sinks run
on the server's event loop: ``emit`` must not block.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

FINISHED_BY_ENGINE = "engine"
FINISHED_BY_IDLE = "idle"
# A request's verdict in a phase where its circuit has a verdict threshold.
FLAGGED = "flagged"  # the phase's aggregate is above the threshold
CLEAR = "clear"
VERDICTS = (FLAGGED, CLEAR)


@dataclass(frozen=True)
class CircuitStats:
    """One circuit's per-token scores over one phase of one request."""

    circuit: str
    mean: float
    max: float
    min: float
    aggregate: float  # the circuit's configured aggregation (sidecar.spec.aggregation)
    verdict: str | None = None  # FLAGGED | CLEAR; None without a threshold for this phase


@dataclass(frozen=True)
class PhaseStats:
    phase: str  # "prompt" | "generation"
    tokens: int  # scored tokens in this phase
    circuits: tuple[CircuitStats, ...]  # in spec order

    def circuit(self, name: str) -> CircuitStats:
        for stats in self.circuits:
            if stats.circuit == name:
                return stats
        raise KeyError(f"no circuit named {name!r} in this record")


@dataclass(frozen=True)
class TokenScores:
    """Per-token scores kept for debugging (``keep_token_scores``), in arrival order."""

    positions: np.ndarray  # int32 [m]
    phases: np.ndarray  # uint8 [m], PROMPT or GENERATED
    scores: np.ndarray  # float32 [m, n_circuits]


@dataclass(frozen=True)
class AnomalyScore:
    """One detector's verdict on a request (sidecar.server.anomaly)."""

    detector: str  # a circuit's name, or "multivariate"
    score: float  # robust z, or the multivariate distance on the z scale; >= 0
    anomalous: bool  # score above the configured anomaly threshold


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    model_name: str
    finished_by: str  # FINISHED_BY_ENGINE | FINISHED_BY_IDLE
    phases: tuple[PhaseStats, ...]  # only phases that had tokens, prompt first
    first_received: float  # time.monotonic() when the request's first tokens arrived
    tokens: TokenScores | None = None  # set when the sidecar keeps per-token scores
    anomaly: tuple[AnomalyScore, ...] = ()  # empty without anomaly detection or in warm-up
    traceparent: str | None = None  # W3C traceparent the probe sent, unchecked
    engine_id: str = ""  # the engine that served it (request ids are unique per engine)
    # Prompt tokens the engine served from its prefix cache: no probe saw them, so the prompt
    # phase's aggregates cover only the tokens after them.
    prefix_cached_tokens: int = 0

    def phase(self, name: str) -> PhaseStats | None:
        for stats in self.phases:
            if stats.phase == name:
                return stats
        return None


class RecordSink(Protocol):
    def emit(self, record: RequestRecord) -> None: ...


class CollectingSink:
    """Keeps records in memory and lets another thread wait for them (tests, debugging)."""

    def __init__(self, maxlen: int | None = None) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=maxlen)
        self._condition = threading.Condition()

    def emit(self, record: RequestRecord) -> None:
        with self._condition:
            self._records.append(record)
            self._condition.notify_all()

    @property
    def records(self) -> list[RequestRecord]:
        with self._condition:
            return list(self._records)

    def wait_for(self, count: int, timeout: float) -> list[RequestRecord]:
        """Block until at least ``count`` records arrived; raises TimeoutError otherwise."""
        with self._condition:
            if not self._condition.wait_for(lambda: len(self._records) >= count, timeout):
                raise TimeoutError(
                    f"{len(self._records)} records after {timeout} s, wanted {count}"
                )
            return list(self._records)
