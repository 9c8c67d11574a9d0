"""What each aggregation computes: one phase's per-token scores of one request -> one number.

This is the definition, written for reading: the sidecar's streaming implementation and
every offline path (calibration, probe reports, tests) are checked against it.

    mean              the mean
    max               the max
    last              the phase's final token (for the prompt: where the model settles its answer)
    ema_max           e_0 = s_0, e_t = alpha * s_t + (1 - alpha) * e_(t-1); the max of e
    max_rolling_mean  the max over the means of ``window`` consecutive tokens (the mean of
                      all of them when the phase is shorter than one window)
    softmax_max       sum_t s_t * softmax(s / temperature)_t: between the mean (large
                      temperature) and the max (small temperature)
"""

from __future__ import annotations

import numpy as np

from sidecar.spec.schema import Aggregation, AggregationKind


def aggregate(scores: np.ndarray, aggregation: Aggregation) -> float:
    """``scores`` [T] (T >= 1) in token order, aggregated in float64."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"expected a non-empty 1-D array of scores, got shape {list(s.shape)}")
    kind = aggregation.kind
    if kind is AggregationKind.MEAN:
        return float(s.mean())
    if kind is AggregationKind.MAX:
        return float(s.max())
    if kind is AggregationKind.LAST:
        return float(s[-1])
    if kind is AggregationKind.EMA_MAX:
        alpha, ema, best = aggregation.alpha, s[0], s[0]
        for value in s[1:]:
            ema = alpha * value + (1.0 - alpha) * ema
            best = max(best, ema)
        return float(best)
    if kind is AggregationKind.MAX_ROLLING_MEAN:
        window = min(aggregation.window, s.size)
        sums = np.convolve(s, np.ones(window), mode="valid")
        return float(sums.max() / window)
    weights = np.exp((s - s.max()) / aggregation.temperature)
    return float((s * weights).sum() / weights.sum())
