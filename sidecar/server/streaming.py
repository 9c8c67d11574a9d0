"""Each circuit's configured aggregation, computed while a request's tokens stream in.

``sidecar.spec.aggregation.aggregate`` defines what each kind computes over a phase's
scores in token order; this module gets the same number without keeping the tokens. State
lives in preallocated arrays with one row per (slot, phase) and one column per circuit of
that kind, and a batch is folded in with whole-array operations over its groups (a group:
one request's tokens of one phase in this batch, in token order). Per row, float64 unless
marked, with C_kind the number of circuits of a kind:

    mean, max          nothing here: the request table's running sum and max give them
    last               the group's final score                          C_last floats
    ema_max            the EMA after the last token and the EMA's max   2 C_ema floats
    max_rolling_mean   the last window sum, the best full-window sum    2 C_roll floats +
                       so far, and the last R = max(window) scores      R C_roll float32
                       in a ring, to subtract as they leave the window
    softmax_max        the running max m and, shifted by it,            3 C_soft floats
                       Z = sum exp((s - m) / T), N = sum s exp((s - m) / T)

The EMA is a linear recurrence, e_t = (1 - alpha) e_(t-1) + alpha s_t: each token is an
affine map of the previous EMA, and a group's EMAs are the running compositions of those
maps, computed with a log-step (Hillis-Steele) scan: ceil(log2(longest group)) whole-array
steps, none for a decode batch of one token per request. A group's first map has slope 0
(it starts from the stored EMA, or from its score on the phase's first token), so the
compositions never reach into the group before it and one scan serves the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sidecar.spec.schema import Aggregation, AggregationKind


def _columns(aggregations: Sequence[Aggregation], kind: AggregationKind) -> np.ndarray:
    return np.array([i for i, a in enumerate(aggregations) if a.kind is kind], dtype=np.int64)


class StreamingAggregates:
    """Configured aggregates of ``rows`` (slot, phase) rows, one column per circuit."""

    def __init__(self, aggregations: Sequence[Aggregation], rows: int) -> None:
        self._is_max = np.array([a.kind is AggregationKind.MAX for a in aggregations])
        self._last = _columns(aggregations, AggregationKind.LAST)
        self._ema = _columns(aggregations, AggregationKind.EMA_MAX)
        self._roll = _columns(aggregations, AggregationKind.MAX_ROLLING_MEAN)
        self._soft = _columns(aggregations, AggregationKind.SOFTMAX_MAX)
        self._alpha = np.array([aggregations[c].alpha for c in self._ema])
        self._window = np.array([aggregations[c].window for c in self._roll], dtype=np.int64)
        self._temperature = np.array([aggregations[c].temperature for c in self._soft])
        self._ring_size = int(self._window.max()) if self._window.size else 0
        self._last_value = np.zeros((rows, self._last.size))
        self._ema_value = np.zeros((rows, self._ema.size))
        self._ema_best = np.full((rows, self._ema.size), -np.inf)
        self._roll_sum = np.zeros((rows, self._roll.size))
        self._roll_best = np.full((rows, self._roll.size), -np.inf)
        self._ring = np.zeros((rows, self._ring_size, self._roll.size), dtype=np.float32)
        self._soft_max = np.full((rows, self._soft.size), -np.inf)
        self._soft_z = np.zeros((rows, self._soft.size))
        self._soft_n = np.zeros((rows, self._soft.size))

    def update(
        self, rows: np.ndarray, starts: np.ndarray, seen: np.ndarray, scores: np.ndarray
    ) -> None:
        """Fold in ``scores`` [n, c], grouped and in token order within each group.

        ``rows`` [G]: each group's state row; ``starts`` [G]: where each group begins in
        ``scores``; ``seen`` [G]: tokens of the row folded in by earlier batches.
        """
        n = scores.shape[0]
        ends = np.append(starts[1:], n)
        if self._last.size:
            self._last_value[rows] = scores[ends - 1][:, self._last]
        if not (self._ema.size or self._roll.size or self._soft.size):
            return
        sizes = ends - starts
        group = np.repeat(np.arange(starts.size), sizes)
        if self._ema.size:
            self._update_ema(rows, starts, ends, sizes, seen, scores[:, self._ema])
        if self._roll.size:
            self._update_rolling(rows, starts, ends, group, seen, scores[:, self._roll])
        if self._soft.size:
            self._update_softmax(rows, starts, group, scores[:, self._soft])

    def values(self, row: int, count: int, mean: np.ndarray, high: np.ndarray) -> np.ndarray:
        """Every circuit's aggregate [c] of a row holding ``count`` tokens, given its
        per-circuit ``mean`` and max ``high`` (kept by the request table)."""
        out = np.where(self._is_max, high, mean).astype(np.float64)
        out[self._last] = self._last_value[row]
        out[self._ema] = self._ema_best[row]
        full = count >= self._window
        out[self._roll] = np.where(full, self._roll_best[row] / self._window, mean[self._roll])
        out[self._soft] = self._soft_n[row] / self._soft_z[row]
        return out

    def clear(self, rows: np.ndarray) -> None:
        """Forget ``rows`` (their slot was released). The ring needs no reset: ``seen``
        says which of its entries hold this row's scores."""
        self._ema_best[rows] = -np.inf
        self._roll_sum[rows] = 0.0
        self._roll_best[rows] = -np.inf
        self._soft_max[rows] = -np.inf
        self._soft_z[rows] = 0.0
        self._soft_n[rows] = 0.0

    def _update_ema(self, rows, starts, ends, sizes, seen, scores) -> None:
        alpha = self._alpha
        x = scores.astype(np.float64)
        # Token t maps the EMA before it, e, to slope_t * e + intercept_t.
        slope = np.broadcast_to(1.0 - alpha, x.shape).copy()
        intercept = alpha * x
        continued = (seen > 0)[:, None]
        first = x[starts]
        intercept[starts] = np.where(
            continued, alpha * first + (1.0 - alpha) * self._ema_value[rows], first
        )
        slope[starts] = 0.0
        step = 1
        longest = int(sizes.max())
        while step < longest:  # ceil(log2(longest)) passes; after them intercept_t = e_t
            intercept[step:] = slope[step:] * intercept[:-step] + intercept[step:]
            slope[step:] = slope[step:] * slope[:-step]
            step *= 2
        best = np.maximum.reduceat(intercept, starts, axis=0)
        self._ema_best[rows] = np.maximum(self._ema_best[rows], best)
        self._ema_value[rows] = intercept[ends - 1]

    def _update_rolling(self, rows, starts, ends, group, seen, scores) -> None:
        window, ring = self._window, self._ring_size
        n, width = scores.shape
        x = scores.astype(np.float64)
        offset = np.arange(n) - starts[group]  # each token's index in its group
        number = seen[group] + offset  # ... and in its phase
        # Window sum = the previous one + the entering score - the leaving one (`window`
        # tokens back: in this group, in the ring, or before the phase began).
        leaving = number[:, None] - window
        columns = np.broadcast_to(np.arange(width), leaving.shape)
        left = np.zeros((n, width))
        here = offset[:, None] >= window
        left[here] = x[(np.arange(n)[:, None] - window)[here], columns[here]]
        held = (leaving >= 0) & ~here
        owner = np.broadcast_to(rows[group][:, None], leaving.shape)
        left[held] = self._ring[owner[held], leaving[held] % ring, columns[held]]
        steps = np.concatenate((np.zeros((1, width)), np.cumsum(x - left, axis=0)))
        sums = self._roll_sum[rows][group] + steps[1:] - steps[starts][group]
        self._roll_sum[rows] = sums[ends - 1]
        sums[number[:, None] + 1 < window] = -np.inf  # not a full window yet
        best = np.maximum.reduceat(sums, starts, axis=0)
        self._roll_best[rows] = np.maximum(self._roll_best[rows], best)
        recent = offset >= (ends - starts)[group] - ring  # the group's last `ring` tokens
        self._ring[rows[group[recent]], number[recent] % ring] = scores[recent]

    def _update_softmax(self, rows, starts, group, scores) -> None:
        temperature = self._temperature
        x = scores.astype(np.float64)
        shift = np.maximum(self._soft_max[rows], np.maximum.reduceat(x, starts, axis=0))
        rescale = np.exp((self._soft_max[rows] - shift) / temperature)  # 0 on a fresh row
        weights = np.exp((x - shift[group]) / temperature)
        self._soft_z[rows] = self._soft_z[rows] * rescale + np.add.reduceat(weights, starts, axis=0)
        self._soft_n[rows] = self._soft_n[rows] * rescale + np.add.reduceat(
            weights * x, starts, axis=0
        )
        self._soft_max[rows] = shift
