"""``circuitwatch calibrate``: set circuits' verdict thresholds at a target false-positive rate.

Benign requests (JSONL, see ``datasets.read_jsonl``) run through the offline reference path
(``ReferenceScorer``, the engine's rendering); each circuit's per-token scores in a phase
become one number per request with the circuit's own aggregation (``spec.aggregation``,
the definition the sidecar follows). With ``--engine`` they run instead through a live
engine (vLLM's OpenAI server with the plugin, chats through the chat API, in the engine's
default dtype) and a sidecar in this process, and the aggregates are the sidecar's own
(``engine_runs.LiveEngine.aggregates``): the threshold is then set on exactly what the served
monitor computes, rounding of a bfloat16 engine included.

The threshold is the smallest order statistic that leaves at most ``floor(fpr * n)``
requests strictly above it, so the FPR on the calibration data is at most the target.
Thresholds are set for the prompt phase always, and for the generation phase only when
every request carries generated text (a chat ending in an assistant message; with
``--engine``: when ``--max-tokens`` >= 2, on the engine's own answers): without it there is
nothing to calibrate the generation phase on.

The spec is written back through ``write_spec`` with its components and directions
unchanged and a ``Calibration`` record per circuit. Two checks, never used for the threshold,
each reported as an FPR with its 95 % Wilson interval and against the tolerance a calibration
at the target promises on a set of that size: the central 95 % range of the flagged count
were the threshold's FPR exactly the target (``binomial_count_range``):

- ``--holdout-fraction`` holds out a seeded random share of each source of ``--benign``
  (stratified: same distribution as the calibration requests): this measures calibration
  error, and the calibration holds (``within_tolerance``) when that count is in range;
- ``--heldout`` scores another benign file (other templates or topics): this measures how
  the threshold transfers across benign traffic (distribution shift), a robustness figure
  (``heldout_within_tolerance``).

``split_count_range`` gives the wider range a split calibration has at best (the threshold's
own sampling error included); ``benchmarks.harm_calibration_check`` compares it with seeded
re-splits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from sidecar import __version__
from sidecar.discover.datasets import Example, file_hash, read_jsonl
from sidecar.protocol.batch import GENERATED, PROMPT
from sidecar.spec.aggregation import aggregate
from sidecar.spec.identity import model_hash
from sidecar.spec.load import load_spec
from sidecar.spec.schema import PHASE_NAMES, Calibration, CircuitSpec
from sidecar.spec.writer import CircuitEntry, ComponentEntry, write_spec

if TYPE_CHECKING:
    from sidecar.discover.engine_runs import LiveEngine

Z_95 = 1.959964


def threshold_at_fpr(benign_scores: np.ndarray, fpr: float) -> float:
    """The threshold leaving at most ``floor(fpr * n)`` of ``benign_scores`` strictly above."""
    scores = np.sort(np.asarray(benign_scores, dtype=np.float64))
    if scores.size == 0 or not 0.0 <= fpr < 1.0:
        raise ValueError(f"need benign scores and 0 <= fpr < 1 (got {scores.size}, {fpr})")
    allowed = math.floor(fpr * scores.size + 1e-9)
    return float(scores[scores.size - 1 - allowed])


def flagged_rate(scores: np.ndarray, threshold: float) -> float:
    """Fraction of requests flagged: aggregate strictly above the threshold."""
    return float((np.asarray(scores, dtype=np.float64) > threshold).mean())


@dataclass(frozen=True)
class RateInterval:
    rate: float
    low: float
    high: float
    flagged: int
    requests: int


def wilson_interval(flagged: int, requests: int, z: float = Z_95) -> RateInterval:
    """The Wilson score interval of a binomial rate (fine at 0 and at small counts)."""
    if requests <= 0:
        raise ValueError("a rate needs at least one request")
    p = flagged / requests
    denominator = 1 + z * z / requests
    centre = (p + z * z / (2 * requests)) / denominator
    half = z * math.sqrt(p * (1 - p) / requests + z * z / (4 * requests * requests)) / denominator
    return RateInterval(p, max(0.0, centre - half), min(1.0, centre + half), flagged, requests)


@dataclass(frozen=True)
class CountRange:
    """The central ``level`` range of a count: P(count < low) and P(count > high) are each
    at most (1 - level) / 2."""

    low: int
    high: int
    requests: int
    level: float


def _count_range(log_pmf: np.ndarray, level: float) -> CountRange:
    tail = (1.0 - level) / 2.0
    cdf = np.cumsum(np.exp(log_pmf - np.logaddexp.reduce(log_pmf)))
    low = int(np.searchsorted(cdf, tail + 1e-12, side="right"))
    high = int(np.searchsorted(cdf, 1.0 - tail - 1e-12, side="left"))
    return CountRange(low, min(high, cdf.size - 1), cdf.size - 1, level)


def _log_comb(n: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
    n, k = np.asarray(n, dtype=np.float64), np.asarray(k, dtype=np.float64)
    return _lgamma(n + 1) - _lgamma(k + 1) - _lgamma(n - k + 1)


_lgamma = np.vectorize(math.lgamma, otypes=[np.float64])


def binomial_count_range(requests: int, fpr: float, level: float = 0.95) -> CountRange:
    """How many of ``requests`` held-out benign requests a threshold whose true FPR is
    ``fpr`` flags, central ``level`` range of Binomial(requests, fpr): the tolerance a
    calibration at ``fpr`` promises on a held-out set of that size."""
    flagged = np.arange(requests + 1)
    log_pmf = (
        _log_comb(requests, flagged)
        + flagged * math.log(fpr)
        + (requests - flagged) * math.log1p(-fpr)
    )
    return _count_range(log_pmf, level)


def split_count_range(
    calibration: int, allowed: int, heldout: int, level: float = 0.95
) -> CountRange:
    """How many of ``heldout`` requests lie above a threshold that leaves ``allowed`` of
    ``calibration`` requests above it, when the two sets are a random split of exchangeable
    scores (no ties): every order of the combined scores is equally likely, so the count is
    x with probability C(x + allowed, allowed) C(heldout - x + calibration - allowed - 1,
    calibration - allowed - 1) / C(heldout + calibration, calibration). The spread a
    calibration of this size has at best, its own sampling error included."""
    flagged = np.arange(heldout + 1)
    rest = calibration - allowed - 1
    log_pmf = _log_comb(flagged + allowed, allowed) + _log_comb(heldout - flagged + rest, rest)
    return _count_range(log_pmf, level)


def split_holdout(
    groups: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(calibration indices, held-out indices), sorted: a seeded random ``fraction`` of each
    group (a request's source) held out, so both parts hold every group in the same share.

    Stratified because benign sources differ most in their upper tails, which set a 1 %
    threshold: an unstratified half of 440 requests once kept 53 of 120 harmful-topic twins
    and held out 67, and the twins held all 13 scores above the threshold it set."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1) (got {fraction})")
    labels = np.asarray(groups, dtype=object)
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for group in sorted(set(labels.tolist()), key=str):
        members = rng.permutation(np.flatnonzero(labels == group))
        count = round(fraction * members.size)
        held.append(members[:count])
        kept.append(members[count:])
    empty = [np.zeros(0, dtype=np.int64)]
    return np.sort(np.concatenate(kept + empty)), np.sort(np.concatenate(held + empty))


def _rate(scores: np.ndarray, threshold: float) -> RateInterval:
    return wilson_interval(int((scores > threshold).sum()), scores.size)


def phase_aggregates(
    spec: CircuitSpec, scorer, examples: Sequence[Example]
) -> dict[str, np.ndarray]:
    """Phase name -> [requests, circuits] aggregates; generation only if every request has one."""
    tokenizer = scorer.tokenizer
    with_generation = all(len(e.generated_ids(tokenizer)) >= 2 for e in examples)
    phases = (PROMPT, GENERATED) if with_generation else (PROMPT,)
    values = {PHASE_NAMES[p]: np.zeros((len(examples), len(spec.circuits))) for p in phases}
    for i, example in enumerate(tqdm(examples, desc="scoring", unit="request", leave=False)):
        scored = scorer.score(example.token_ids(tokenizer), example.generated_ids(tokenizer))
        for phase in phases:
            mask = scored.phases == phase
            for j, circuit in enumerate(spec.circuits):
                values[PHASE_NAMES[phase]][i, j] = aggregate(
                    scored.scores[mask, j], circuit.aggregation
                )
    return values


def entries(spec: CircuitSpec) -> tuple[list[ComponentEntry], list[CircuitEntry]]:
    """A loaded spec as the writer's entries, components and directions unchanged."""
    components = [
        ComponentEntry(
            name=c.name,
            site=c.site.name,
            head=c.head,
            direction=c.direction,  # the writer takes any 1-D float array
            bias=c.bias,
        )
        for c in spec.components
    ]
    circuits = [
        CircuitEntry(
            name=c.name,
            weights={spec.components[i].name: w for i, w in enumerate(c.weights) if w != 0.0},
            description=c.description,
            bias=c.bias,
            threshold=c.threshold,
            aggregation=c.aggregation,
            verdict_thresholds=dict(c.verdict_thresholds),
            calibration=c.calibration,
        )
        for c in spec.circuits
    ]
    return components, circuits


@dataclass(frozen=True)
class PhaseCalibration:
    """One circuit's threshold in one phase, with the FPR it reached where it was set, on the
    held-out part of the same benign requests (``holdout``) and on another benign set
    (``heldout``, distribution shift); None where there were none."""

    circuit: str
    phase: str
    threshold: float
    target_fpr: float
    calibration_fpr: float
    calibration_requests: int
    holdout: RateInterval | None = None
    heldout: RateInterval | None = None

    def tolerance(self, rate: RateInterval | None) -> CountRange | None:
        """The flagged counts a threshold at exactly the target FPR gives on that set, 95 %."""
        return None if rate is None else binomial_count_range(rate.requests, self.target_fpr)

    def _in_tolerance(self, rate: RateInterval | None) -> bool | None:
        promised = self.tolerance(rate)
        return None if promised is None else promised.low <= rate.flagged <= promised.high

    @property
    def within_tolerance(self) -> bool | None:
        """The in-distribution held-out count lies in the range the target promises."""
        return self._in_tolerance(self.holdout)

    @property
    def heldout_within_tolerance(self) -> bool | None:
        """The same for the other benign set (robustness across benign traffic)."""
        return self._in_tolerance(self.heldout)


def calibrate(
    spec_path: str | Path,
    benign_path: str | Path,
    fpr: float,
    model_dir: str | Path | None = None,
    heldout_path: str | Path | None = None,
    out: str | Path | None = None,
    holdout_fraction: float = 0.0,
    seed: int = 0,
    engine: LiveEngine | bool = False,
    max_tokens: int = 1,
    scores_out: str | Path | None = None,
) -> tuple[Path, list[PhaseCalibration]]:
    """Calibrate every circuit of the spec; returns (written spec path, report rows).
    ``engine``: True starts a live engine for the requests, a ``LiveEngine`` uses that one.
    ``scores_out``: an npz of every request's aggregates, ``benign_<phase>`` and
    ``heldout_<phase>`` ([requests, circuits], file order), for analyses not to re-score."""
    from sidecar.models.registry import resolve_model

    spec = load_spec(spec_path)
    model_dir = resolve_model(model_dir or spec.model.name)
    benign = read_jsonl(benign_path)
    groups = [benign] + ([read_jsonl(heldout_path)] if heldout_path else [])
    if engine is True:
        from sidecar.discover.engine_runs import live_engine

        with live_engine(spec, Path(spec_path), model_dir) as live:
            scored, *other = live.aggregates(spec, groups, max_tokens)
    elif engine:
        scored, *other = engine.aggregates(spec, groups, max_tokens)
    else:
        from sidecar.discover.scorer import ReferenceScorer

        scorer = ReferenceScorer(spec, model_dir)
        scored, *other = [phase_aggregates(spec, scorer, examples) for examples in groups]
    if scores_out:
        tables = {f"benign_{phase}": table for phase, table in scored.items()}
        tables.update({f"heldout_{phase}": table for phase, table in (other or [{}])[0].items()})
        np.savez(scores_out, **tables)
    kept, held = split_holdout([e.source for e in benign], holdout_fraction, seed)
    values = {phase: table[kept] for phase, table in scored.items()}
    holdout_values = {phase: table[held] for phase, table in scored.items()} if held.size else {}
    heldout_values = other[0] if other else {}
    components, circuits = entries(spec)
    data = Path(benign_path).name + (" (live engine)" if engine else "")
    if held.size:
        data += (
            f" ({kept.size} of {len(benign)}, split stratified by source, seed {seed}; "
            f"{held.size} held out)"
        )
    rows = []
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for j, circuit in enumerate(circuits):
        thresholds, achieved = {}, []
        for phase, table in values.items():
            threshold = threshold_at_fpr(table[:, j], fpr)
            thresholds[phase] = threshold
            achieved.append((phase, flagged_rate(table[:, j], threshold)))
            same, other = (
                _rate(checks[phase][:, j], threshold) if phase in checks else None
                for checks in (holdout_values, heldout_values)
            )
            rows.append(
                PhaseCalibration(
                    circuit.name, phase, threshold, fpr, achieved[-1][1], kept.size, same, other
                )
            )
        record = Calibration(
            target_fpr=fpr,
            achieved_fpr=tuple(achieved),
            requests=int(kept.size),
            data=data,
            data_hash=file_hash(benign_path),
            model_hash=model_hash(model_dir),
            date=date,
            tool_version=f"circuitwatch {__version__}",
        )
        circuits[j] = replace(circuit, verdict_thresholds=thresholds, calibration=record)
    header = (
        f"Calibrated by `circuitwatch calibrate` at FPR {fpr} on {Path(benign_path).name}\n"
        "(components and directions as trained); re-run it rather than editing by hand."
    )
    folder = Path(out) if out else Path(spec_path).parent
    path = write_spec(folder, spec.model.name, spec.model.hash, components, circuits, header)
    return path, rows


def _asdict_or_none(value) -> dict | None:
    return None if value is None else asdict(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", required=True, help="spec.yaml to calibrate")
    parser.add_argument("--benign", required=True, help="benign requests (JSONL) for the threshold")
    parser.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate")
    parser.add_argument("--model", help="model name or directory (default: the spec's model)")
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.0,
        help="share of each --benign source held out (seeded random, stratified) to check the "
        "FPR on, same distribution",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --holdout-fraction split")
    parser.add_argument(
        "--heldout", help="other benign requests (JSONL) to check the FPR on: distribution shift"
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help="run the requests through a live vLLM engine with the plugin and take the "
        "sidecar's aggregates (default: the offline reference path)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1,
        help="--engine: tokens generated per request; >= 2 also calibrates the generation phase",
    )
    parser.add_argument("--out", help="folder to write the calibrated spec to (default: in place)")
    parser.add_argument("--report", help="write the calibration report (JSON) here")
    parser.add_argument(
        "--scores", help="write every request's aggregates here (npz), for later analyses"
    )


def run(args: argparse.Namespace) -> int:
    path, rows = calibrate(
        args.spec,
        args.benign,
        args.fpr,
        args.model,
        args.heldout,
        args.out,
        args.holdout_fraction,
        args.seed,
        args.engine,
        args.max_tokens,
        args.scores,
    )
    for row in rows:
        line = (
            f"{row.circuit} [{row.phase}]: threshold {row.threshold:.4g}, FPR "
            f"{row.calibration_fpr:.4f} on {row.calibration_requests} calibration requests"
        )
        for label, rate, inside in (
            ("in-distribution held-out", row.holdout, row.within_tolerance),
            ("other-distribution held-out", row.heldout, row.heldout_within_tolerance),
        ):
            if rate is not None:
                promised = row.tolerance(rate)
                line += (
                    f"; {label} FPR {rate.rate:.4f} ({rate.flagged}/{rate.requests}, 95% CI "
                    f"{rate.low:.4f}-{rate.high:.4f}; tolerance {promised.low}-{promised.high}: "
                    f"{'inside' if inside else 'OUTSIDE'})"
                )
        print(line)
    if args.report:
        report = [
            {
                **asdict(r),
                "holdout_tolerance": _asdict_or_none(r.tolerance(r.holdout)),
                "within_tolerance": r.within_tolerance,
                "heldout_tolerance": _asdict_or_none(r.tolerance(r.heldout)),
                "heldout_within_tolerance": r.heldout_within_tolerance,
            }
            for r in rows
        ]
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
