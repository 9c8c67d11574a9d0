"""Unsupervised anomaly scores for finished requests, against a rolling baseline of recent ones.

A circuit's verdict threshold says "above this is bad" from offline calibration; these
detectors say "unlike this deployment's recent traffic", without labels. For each finished
request the sidecar builds the vector of its circuits' configured aggregates (sidecar.spec.
aggregation), one entry per circuit and phase present (prompt, generation), and scores it:

* **Per circuit (detector = the circuit's name)**: a robust z per phase,
  ``|r - median(r)| / (1.4826 * MAD(r))`` over the window, where ``r`` is the aggregate
  after length control (below); the circuit's score is the larger of its phases' z. When
  the MAD is 0 (more than half the window has one value, e.g. a saturating ``max``) the
  scale falls back to the mean absolute deviation times sqrt(pi/2) (the same sigma for
  normal data), and never below ``1e-6 * max(1, |median|)``.
* **Multivariate (detector = "multivariate")**: the Mahalanobis distance of the vector of
  robust-standardised residuals ``u = (r - median) / scale``, under a covariance shrunk
  toward its diagonal with the Schäfer–Strimmer (2005, target "D") estimate of the
  Ledoit–Wolf optimal intensity, computed in numpy. It catches shifts that no single
  circuit shows (two correlated circuits moving apart). A request is scored on the
  dimensions it has (a request without a generation phase: the prompt block of the
  covariance, which is the exact marginal for Gaussian data), so the squared distance is
  ~chi-square with k = that many dimensions. It is reported on the z scale via the
  Wilson–Hilferty transform, ``((d2/k)^(1/3) - (1 - 2/(9k))) / sqrt(2/(9k))``, clipped at
  0: comparable across k, and one threshold means about the same tail probability for
  both kinds of detector (4.0: ~3e-5 one-sided; the univariate |z| > 4: ~6e-5 two-sided,
  for Gaussian data).

**Length control.** White-box scores depend on how long the text is (a ``max`` over more
tokens is larger; a ``mean`` over few tokens is noisier), so a stream of long but benign
prompts would read as anomalous. Each dimension is regressed on log(token count of its
phase) over the window (least squares, refit once without the points beyond 3.5 robust z,
so outliers do not tilt the line), and the detectors score the residual. Chosen over
per-length buckets because a regression uses the whole window (a bucket of rare lengths
would never warm up) and removes the trend inside what would be one bucket too; its limit
is that a dependence that is not linear in log length is only partly removed. The token
count is the phase's scored tokens: the length itself when every token is sampled; a
fractional ``CIRCUITWATCH_SAMPLE`` shifts log length by a constant, which the intercept
absorbs; a token cap flattens it. A request longer or shorter than every request in the
window is scored at the window's nearest length: the line is not extrapolated, so a
10,000-token jailbreak is judged by its content, not by a slope fitted on short chats.
``length_control=False`` scores the raw aggregates.

**Warm-up and adaptation.** Each model (``model_name``) has its own baseline. Its first
``warmup`` requests only fill the window; they get no scores. After that the baseline is
refit every ``refit_every`` requests admitted to the window (the last ``window`` admitted).
Policy: *slowly adapting on non-anomalous requests only* -- a request enters the window
only when none of its detectors is above the threshold. Frozen-after-warm-up was rejected
because real traffic drifts (new prompts, time of day) and a frozen baseline would alarm
on every slow drift forever; adapting on everything was rejected because a sustained
attack would become the new normal within one window. With this policy a sustained shift
stays flagged while most of its requests are above the threshold; only the part of a
shifted stream that looks normal enters the window, so a shift of a few MADs is absorbed
slowly (over many windows), and a large one never. The price: a genuine, abrupt and
permanent change of traffic alarms until the sidecar is restarted (or the warm-up
redone), which is the behaviour an operator should see after such a change anyway.

False alarms (tests/test_server_anomaly.py): on stationary Gaussian streams, at the
default threshold 4.0, under 0.5 % of post-warm-up requests per detector. Heavier tails
raise it: the robust z is calibrated for the normal distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sidecar.server.records import AnomalyScore, RequestRecord
from sidecar.spec.schema import PHASE_NAMES, Circuit

MULTIVARIATE = "multivariate"
MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): the MAD of a normal distribution is 0.6745 sigma
MEAN_ABS_TO_SIGMA = float(np.sqrt(np.pi / 2))  # the mean absolute deviation is 0.7979 sigma
MIN_SCALE = 1e-6
TRIM_Z = 3.5  # residuals beyond this do not steer the length regression
MIN_FIT = 10  # fewer values than this in the window: the dimension is not scored


@dataclass(frozen=True)
class AnomalyConfig:
    warmup: int = 200  # requests per model that only fill the window
    window: int = 1000  # admitted requests the baseline is computed from
    threshold: float = 4.0  # a detector's score above this marks the request anomalous
    length_control: bool = True  # regress each aggregate on log(token count) first
    refit_every: int = 25  # admitted requests between refits of the baseline

    def __post_init__(self) -> None:
        if self.warmup < MIN_FIT:
            raise ValueError(f"anomaly warm-up must be at least {MIN_FIT}, got {self.warmup}")
        if self.window < self.warmup:
            raise ValueError(
                f"anomaly window ({self.window}) must hold the warm-up ({self.warmup})"
            )
        if not self.threshold > 0:
            raise ValueError(f"anomaly threshold must be positive, got {self.threshold}")
        if self.refit_every < 1:
            raise ValueError(f"anomaly refit interval must be >= 1, got {self.refit_every}")


DEFAULT_ANOMALY = AnomalyConfig()


def robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and a MAD-based sigma of a 1-d sample (see the module docstring for MAD = 0)."""
    median = float(np.median(values))
    deviation = np.abs(values - median)
    floor = MIN_SCALE * max(1.0, abs(median))
    scale = MAD_TO_SIGMA * float(np.median(deviation))
    if scale < floor:
        scale = max(MEAN_ABS_TO_SIGMA * float(np.mean(deviation)), floor)
    return median, scale


def shrunk_covariance(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Covariance of the rows of ``x`` [n, p], off-diagonals shrunk by the estimated intensity.

    Schäfer & Strimmer (2005), target D: lambda = sum_{i!=j} Var(s_ij) / sum_{i!=j} s_ij^2,
    clipped to [0, 1]; Var(s_ij) from the spread of the products x_ki x_kj.
    """
    n, p = x.shape
    centred = x - x.mean(axis=0)
    mean_products = centred.T @ centred / n  # w̄_ij
    cov = mean_products * n / (n - 1)
    squares = centred**2
    # sum_k (w_kij - w̄_ij)^2 = sum_k x_ki^2 x_kj^2 - n w̄_ij^2, without an [n, p, p] array
    spread = squares.T @ squares - n * mean_products**2
    var_cov = spread * n / (n - 1) ** 3
    off = ~np.eye(p, dtype=bool)
    denominator = float(np.sum(cov[off] ** 2))
    shrinkage = 1.0 if denominator == 0 else float(np.clip(var_cov[off].sum() / denominator, 0, 1))
    shrunk = cov * (1 - shrinkage)
    np.fill_diagonal(shrunk, np.diag(cov))
    return shrunk, shrinkage


def chi_square_to_z(distance2: float, dof: int) -> float:
    """Wilson–Hilferty: a chi-square(dof) value as the standard normal quantile of its tail."""
    a = 2.0 / (9.0 * dof)
    return (np.cbrt(distance2 / dof) - (1.0 - a)) / np.sqrt(a)


@dataclass(frozen=True)
class BaselineFit:
    """A baseline fitted on the window; NaN in a dimension's entries where it is not scored."""

    intercept: np.ndarray  # [d]
    slope: np.ndarray  # [d], per log token
    centre: np.ndarray  # [d], median of the residuals
    scale: np.ndarray  # [d], robust sigma of the residuals
    covered: np.ndarray  # bool [d]: dimensions in the covariance
    covariance: np.ndarray | None  # [covered, covered] of the standardised residuals
    # The window's range of log token counts [d]: a request outside it is scored at the
    # nearest end, because a line fitted on 20-200 tokens says nothing about 5,000.
    log_low: np.ndarray
    log_high: np.ndarray


def _line(log_tokens: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Least-squares line, refit without points beyond TRIM_Z robust z of the first fit."""
    if np.ptp(log_tokens) < 1e-9:
        return 0.0, 0.0  # one length only: nothing to control for
    design = np.stack([np.ones_like(log_tokens), log_tokens], axis=1)
    coef = np.linalg.lstsq(design, values, rcond=None)[0]
    residuals = values - design @ coef
    centre, scale = robust_location_scale(residuals)
    keep = np.abs(residuals - centre) <= TRIM_Z * scale
    if keep.sum() >= MIN_FIT and np.ptp(log_tokens[keep]) >= 1e-9:
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
    return float(coef[0]), float(coef[1])


def fit_baseline(values: np.ndarray, log_tokens: np.ndarray, length_control: bool) -> BaselineFit:
    """Fit every dimension of ``values`` [n, d] (NaN: phase absent) given its log token counts."""
    d = values.shape[1]
    intercept, slope = np.zeros(d), np.zeros(d)
    centre, scale = np.full(d, np.nan), np.full(d, np.nan)
    log_low, log_high = np.zeros(d), np.zeros(d)
    for j in range(d):
        present = ~np.isnan(values[:, j])
        if present.sum() < MIN_FIT:
            continue
        y, lengths = values[present, j], log_tokens[present, j]
        log_low[j], log_high[j] = lengths.min(), lengths.max()
        if length_control:
            intercept[j], slope[j] = _line(lengths, y)
        centre[j], scale[j] = robust_location_scale(y - intercept[j] - slope[j] * lengths)
    standardised = (values - intercept - slope * log_tokens - centre) / scale
    present = ~np.isnan(standardised)
    covered = present.mean(axis=0) >= 0.5  # rare phases would leave too few complete rows
    complete = present[:, covered].all(axis=1)
    covariance = None
    if covered.any() and complete.sum() >= MIN_FIT:
        covariance = shrunk_covariance(standardised[np.ix_(complete, covered)])[0]
    return BaselineFit(intercept, slope, centre, scale, covered, covariance, log_low, log_high)


class _Baseline:
    """One model's window of admitted requests and the fit made from it."""

    def __init__(self, dims: int, config: AnomalyConfig) -> None:
        self.config = config
        self._values = np.full((config.window, dims), np.nan)
        self._log_tokens = np.zeros((config.window, dims))
        self._size = 0
        self._next = 0
        self._since_fit = 0
        self._fit: BaselineFit | None = None

    def observe(self, x: np.ndarray, log_tokens: np.ndarray) -> tuple[np.ndarray, float] | None:
        """Score ``x`` [d] (per-dimension z, NaN where not scored; multivariate z, NaN when
        not scored), then admit it to the window unless anomalous. None during warm-up."""
        scores = None if self._fit is None else self._score(self._fit, x, log_tokens)
        anomalous = scores is not None and (
            bool(np.nanmax(scores[0], initial=0.0) > self.config.threshold)
            or scores[1] > self.config.threshold
        )
        if not anomalous:
            self._admit(x, log_tokens)
        return scores

    def _score(
        self, fit: BaselineFit, x: np.ndarray, log_tokens: np.ndarray
    ) -> tuple[np.ndarray, float]:
        log_tokens = np.clip(log_tokens, fit.log_low, fit.log_high)
        u = (x - fit.intercept - fit.slope * log_tokens - fit.centre) / fit.scale
        if fit.covariance is None:
            return np.abs(u), float("nan")
        covered = u[fit.covered]
        seen = ~np.isnan(covered)
        if not seen.any():
            return np.abs(u), float("nan")
        sub = fit.covariance[np.ix_(seen, seen)]
        distance2 = float(covered[seen] @ np.linalg.solve(sub, covered[seen]))
        return np.abs(u), max(0.0, float(chi_square_to_z(distance2, int(seen.sum()))))

    def _admit(self, x: np.ndarray, log_tokens: np.ndarray) -> None:
        self._values[self._next] = x
        self._log_tokens[self._next] = log_tokens
        self._next = (self._next + 1) % self.config.window
        self._size = min(self._size + 1, self.config.window)
        self._since_fit += 1
        warm = self._fit is None and self._size >= self.config.warmup
        if warm or (self._fit is not None and self._since_fit >= self.config.refit_every):
            self._fit = fit_baseline(
                self._values[: self._size],
                self._log_tokens[: self._size],
                self.config.length_control,
            )
            self._since_fit = 0


class AnomalyMonitor:
    """Scores each finished request against its model's baseline, then updates the baseline."""

    def __init__(self, circuits: Sequence[Circuit], config: AnomalyConfig) -> None:
        self.config = config
        self.circuit_names = tuple(c.name for c in circuits)
        self.detectors = (*self.circuit_names, MULTIVARIATE)
        self._baselines: dict[str, _Baseline] = {}  # model names are bounded labels

    def score(self, record: RequestRecord) -> tuple[AnomalyScore, ...]:
        """The request's scores by detector (in ``detectors`` order, only those scored);
        empty during the model's warm-up."""
        width = len(self.circuit_names)
        x = np.full(len(PHASE_NAMES) * width, np.nan)
        log_tokens = np.zeros_like(x)
        for phase in record.phases:
            start = PHASE_NAMES.index(phase.phase) * width
            block = slice(start, start + width)
            x[block] = [stats.aggregate for stats in phase.circuits]
            log_tokens[block] = np.log(max(phase.tokens, 1))
        baseline = self._baselines.get(record.model_name)
        if baseline is None:
            baseline = self._baselines[record.model_name] = _Baseline(x.size, self.config)
        scored = baseline.observe(x, log_tokens)
        if scored is None:
            return ()
        per_dimension, multivariate = scored
        by_circuit = per_dimension.reshape(len(PHASE_NAMES), width)
        threshold = self.config.threshold
        scores = []
        for name, z in zip(self.circuit_names, by_circuit.T, strict=True):
            if not np.isnan(z).all():
                score = float(np.nanmax(z))
                scores.append(AnomalyScore(name, score, score > threshold))
        if not np.isnan(multivariate):
            scores.append(AnomalyScore(MULTIVARIATE, multivariate, multivariate > threshold))
        return tuple(scores)
