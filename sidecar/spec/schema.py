"""The circuit spec as loaded and validated: what the probes compute and the sidecar scores.

A spec names *components* (one float per token each, computed inside the engine) and
*circuits* (weighted sums of components, computed by the sidecar). Only component values
cross the wire, so the engine does k dot products per token and nothing more.

Component kinds:
    head       one attention head's contribution to the residual stream,
               ``c = z[h] @ W_O[:, h]^T``; value ``||c||`` or, with a direction u, ``c . u + bias``
    direction  a linear read-out at any site, ``x . w + bias``
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from sidecar.spec.sites import Site

# A request's two phases: its prompt tokens, then the tokens it generated (fed back).
PHASE_NAMES = ("prompt", "generation")


class ComponentKind(str, Enum):
    HEAD = "head"
    DIRECTION = "direction"


@dataclass(frozen=True, eq=False)
class Component:
    name: str
    kind: ComponentKind
    site: Site
    head: int | None = None  # set for kind=head
    direction: np.ndarray | None = None  # float32 [site width] (direction) or [d_model] (head)
    bias: float = 0.0


class AggregationKind(str, Enum):
    """How a request's per-token scores in one phase become one number (FORMAT.md)."""

    MEAN = "mean"
    MAX = "max"
    LAST = "last"  # the phase's final token: for the prompt, where the model settles its answer
    EMA_MAX = "ema_max"  # exponential moving average (``alpha``), then its max
    MAX_ROLLING_MEAN = "max_rolling_mean"  # max over the means of ``window`` consecutive tokens
    SOFTMAX_MAX = "softmax_max"  # scores weighted by softmax(score / temperature): a smooth max


@dataclass(frozen=True)
class Aggregation:
    kind: AggregationKind = AggregationKind.MEAN
    window: int = 0  # max_rolling_mean: tokens per window
    alpha: float = 0.0  # ema_max: weight of the newest token, in (0, 1]
    temperature: float = 0.0  # softmax_max: > 0; small tends to the max, large to the mean


@dataclass(frozen=True)
class Calibration:
    """Where a circuit's verdict thresholds came from (written by ``circuitwatch calibrate``)."""

    target_fpr: float
    achieved_fpr: tuple[tuple[str, float], ...]  # (phase, false-positive rate on the data)
    requests: int
    data: str  # what the benign data was (a file name or a description)
    data_hash: str
    model_hash: str
    date: str
    tool_version: str


@dataclass(frozen=True)
class Circuit:
    name: str
    weights: tuple[float, ...]  # one per spec component, zero where the circuit does not use it
    bias: float = 0.0
    description: str = ""
    threshold: float | None = None  # a per-token score above it counts as "firing"
    aggregation: Aggregation = Aggregation()
    # (phase, threshold): a request whose aggregate in that phase is above it is flagged
    verdict_thresholds: tuple[tuple[str, float], ...] = ()
    calibration: Calibration | None = None

    def verdict_threshold(self, phase: str) -> float | None:
        return dict(self.verdict_thresholds).get(phase)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    hash: str  # sidecar.spec.identity.model_hash of the model directory


@dataclass(frozen=True, eq=False)
class CircuitSpec:
    path: Path
    model: ModelIdentity
    components: tuple[Component, ...]
    circuits: tuple[Circuit, ...]
    hash: str  # sha256 over the spec file and every direction file it reads

    @property
    def sites(self) -> tuple[Site, ...]:
        """Distinct sites the components read, in first-use order."""
        return tuple(dict.fromkeys(c.site for c in self.components))

    def weight_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Circuits as a linear map: scores [T, n_circuits] = values [T, k] @ W.T + b (float32)."""
        weights = np.array([c.weights for c in self.circuits], dtype=np.float32)
        bias = np.array([c.bias for c in self.circuits], dtype=np.float32)
        return weights, bias
