"""Check of the bundled harm monitor's calibration: the spread of the in-distribution held-out
FPR over seeded half splits, and the report sets' rates at the spec's calibrated threshold.

Scores every request once through the offline reference path (``calibrate.phase_aggregates``,
the code path ``circuitwatch calibrate`` uses), then re-splits the calibration file with
``calibrate.split_holdout`` for ``--seeds`` seeds, unstratified (one group) and stratified by
source, and counts the held-out requests above the threshold each split sets. The report sets
(HarmBench, tricky benign, the report's 64 jailbreaks) are only counted, never used to set
anything. Run: ``OMP_NUM_THREADS=1 python -m benchmarks.harm_calibration_check`` (about 5 min
on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import random

import numpy as np

from sidecar.discover import datasets
from sidecar.discover.calibrate import (
    phase_aggregates,
    split_holdout,
    threshold_at_fpr,
    wilson_interval,
)
from sidecar.discover.scorer import ReferenceScorer
from sidecar.models.registry import resolve_model
from sidecar.spec.load import load_spec

FOLDER = "benchmarks/results/harm-probe-smollm2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sidecar/models/smollm2_harm_spec/spec.yaml")
    parser.add_argument("--benign", default=f"{FOLDER}/benign_calibration.jsonl")
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=2000)
    args = parser.parse_args()
    spec = load_spec(args.spec)
    scorer = ReferenceScorer(spec, resolve_model(spec.model.name))
    benign = datasets.read_jsonl(args.benign)
    scores = phase_aggregates(spec, scorer, benign)["prompt"][:, 0]
    sources = [e.source for e in benign]
    for name, groups in (("unstratified", ["all"] * len(benign)), ("stratified", sources)):
        flagged = []
        for seed in range(args.seeds):
            kept, held = split_holdout(groups, 0.5, seed)
            threshold = threshold_at_fpr(scores[kept], args.fpr)
            flagged.append(int((scores[held] > threshold).sum()))
        counts = np.array(flagged)
        low, high = np.percentile(counts, [5, 95])
        print(
            f"{name}: held-out flagged of {held.size} over {args.seeds} seeds: mean "
            f"{counts.mean():.2f}, 5-95 % {low:.0f}-{high:.0f}, seed 0 {counts[0]} "
            f"(P >= seed 0's: {(counts >= counts[0]).mean():.3f})"
        )
    threshold = spec.circuits[0].verdict_threshold("prompt")
    short = [e for e in datasets.jailbreaks() if len(e.content) < 2000]
    report_sets = {
        "HarmBench TPR": datasets.harmbench(),
        "tricky benign FPR": datasets.tricky_benign(),
        "jailbreaks flagged": random.Random("0/jailbreak").sample(short, 64),
    }
    for name, examples in report_sets.items():
        values = phase_aggregates(spec, scorer, examples)["prompt"][:, 0]
        rate = wilson_interval(int((values > threshold).sum()), values.size)
        print(
            f"{name} at {threshold:.4g}: {rate.rate:.3f} ({rate.flagged}/{rate.requests}, "
            f"95 % Wilson {rate.low:.3f}-{rate.high:.3f})"
        )


if __name__ == "__main__":
    main()
