"""Calibration: thresholds at a target FPR, the calibrated spec, and the bundled harm monitor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sidecar.cli import main
from sidecar.discover import datasets
from sidecar.discover.calibrate import (
    CountRange,
    binomial_count_range,
    flagged_rate,
    split_count_range,
    split_holdout,
    threshold_at_fpr,
    wilson_interval,
)
from sidecar.discover.probe_train import aggregation_of
from sidecar.discover.scorer import ReferenceScorer
from sidecar.models.registry import model_path
from sidecar.spec.aggregation import aggregate
from sidecar.spec.identity import model_hash
from sidecar.spec.load import load_spec
from sidecar.spec.schema import Aggregation, AggregationKind
from sidecar.spec.writer import CircuitEntry, ComponentEntry, write_spec

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "sidecar" / "models" / "smollm2_harm_spec"
REPORT = ROOT / "benchmarks" / "results" / "harm-probe-smollm2"


def test_threshold_leaves_at_most_the_target_share_above():
    rng = np.random.default_rng(0)
    for n, fpr in ((100, 0.01), (350, 0.01), (1000, 0.05), (7, 0.1), (50, 0.0)):
        scores = rng.normal(size=n)
        threshold = threshold_at_fpr(scores, fpr)
        assert flagged_rate(scores, threshold) <= fpr
        assert (scores > threshold).sum() == int(np.floor(fpr * n + 1e-9))  # no ties: exact
    assert threshold_at_fpr(np.array([1.0, 1.0, 1.0]), 0.5) == 1.0  # ties: nothing above
    with pytest.raises(ValueError):
        threshold_at_fpr(np.array([]), 0.01)


def test_wilson_interval_matches_hand_computed_values():
    # 0/100: (0, z^2/(n+z^2)); 10/100: the textbook (0.0552, 0.1744)
    zero = wilson_interval(0, 100)
    assert zero.low == 0.0 and zero.high == pytest.approx(3.8415 / 103.8415, rel=1e-4)
    ten = wilson_interval(10, 100)
    assert ten.rate == 0.1
    assert (ten.low, ten.high) == pytest.approx((0.0552, 0.1744), abs=1e-4)


def test_binomial_count_range_matches_hand_computed_tails():
    # Binomial(534, 0.01): P(0) = 0.99^534 = 0.0047, P(<= 1) = 0.0299; P(<= 9) = 0.9550,
    # P(<= 10) = 0.9796: the central 95 % is 1-10.
    assert binomial_count_range(534, 0.01) == CountRange(1, 10, 534, 0.95)
    # Binomial(4, 0.1): P(0) = 0.6561 > 0.025, P(<= 1) = 0.9477, P(<= 2) = 0.9963.
    assert (binomial_count_range(4, 0.1).low, binomial_count_range(4, 0.1).high) == (0, 2)


def test_split_count_range_is_what_random_splits_give():
    # One held-out request against the maximum of three calibration ones: above it with
    # probability 1/4, so a 50 % range is 0-0 and a 90 % range 0-1.
    assert (split_count_range(3, 0, 1, 0.5).low, split_count_range(3, 0, 1, 0.5).high) == (0, 0)
    assert split_count_range(3, 0, 1, 0.9).high == 1
    # Seeded random splits of exchangeable scores, threshold as calibrate sets it.
    calibration, heldout, fpr = 60, 50, 0.05
    promised = split_count_range(calibration, 3, heldout)  # floor(0.05 * 60) = 3 above
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(4000):
        scores = rng.normal(size=calibration + heldout)
        threshold = threshold_at_fpr(scores[:calibration], fpr)
        counts.append(int((scores[calibration:] > threshold).sum()))
    counts = np.array(counts)
    assert abs(counts.mean() - heldout * 4 / 61) < 0.1  # E = heldout (allowed + 1) / (m + 1)
    assert (counts > promised.high).mean() <= 0.025 + 0.01
    assert (counts >= promised.high).mean() > 0.025 - 0.01  # the range is tight
    assert (counts < promised.low).mean() <= 0.025 + 0.01


def test_split_holdout_is_a_seeded_partition():
    groups = ["plain"] * 320 + ["twin"] * 120
    kept, held = split_holdout(groups, 0.5, 0)
    assert kept.size == held.size == 220
    assert sorted([*kept, *held]) == list(range(440))  # disjoint, covers every request
    again_kept, again_held = split_holdout(groups, 0.5, 0)
    assert np.array_equal(kept, again_kept) and np.array_equal(held, again_held)
    assert not np.array_equal(held, split_holdout(groups, 0.5, 1)[1])  # the seed matters
    assert held.tolist() != list(range(220))  # random, not the file's first half
    assert split_holdout(["a"] * 10, 0.0, 0)[1].size == 0
    assert split_holdout(["a"] * 7, 0.3, 0)[1].size == 2
    with pytest.raises(ValueError):
        split_holdout(["a"] * 10, 1.0, 0)


@pytest.mark.parametrize("seed", range(20))
def test_split_holdout_keeps_each_source_in_the_same_share(seed):
    # The bundled monitor's calibration file: 320 plain benign requests, then 120 twins whose
    # scores hold the whole upper tail. An unstratified half (seed 0) kept 53 twins and held
    # out 67, so the threshold set on one half flagged 5 % of the other; both halves must
    # hold 60 twins whatever the seed.
    groups = ["benign/calibration"] * 320 + ["twin/calibration"] * 120
    kept, held = split_holdout(groups, 0.5, seed)
    twins = np.arange(320, 440)
    assert np.isin(twins, kept).sum() == np.isin(twins, held).sum() == 60
    assert kept.size == held.size == 220


def _probe_spec(folder: Path) -> Path:
    """A direction at layer 2 of SmolLM2 (random, fixed), aggregated by the prompt's max."""
    direction = torch.randn(576, generator=torch.Generator().manual_seed(0)) / 24
    return write_spec(
        folder,
        "smollm2",
        model_hash(model_path("smollm2")),
        [ComponentEntry("d", "blocks.2.hook_resid_post", direction=direction, bias=0.5)],
        [CircuitEntry("c", {"d": 2.0}, aggregation=Aggregation(AggregationKind.MAX))],
    )


def test_calibrate_sets_thresholds_and_records_where_they_came_from(tmp_path):
    spec_path = _probe_spec(tmp_path / "spec")
    before = load_spec(spec_path)
    answers = ("Sure, here is a short answer.", "Happy to help with that.")
    benign = [
        datasets.Example(0, "benign", (("user", e.content), ("assistant", answers[i % 2])))
        for i, e in enumerate(datasets.composed_benign("calibration", 14))
    ]
    benign_file = datasets.write_jsonl(tmp_path / "benign.jsonl", benign)
    heldout_file = datasets.write_jsonl(
        tmp_path / "held.jsonl", datasets.composed_benign("test", 4)
    )
    report = tmp_path / "calibration.json"
    argv = ["calibrate", "--spec", str(spec_path), "--benign", str(benign_file), "--fpr", "0.1"]
    argv += ["--holdout-fraction", str(4 / 14), "--seed", "3"]  # 10 calibrate, 4 held out
    assert main([*argv, "--heldout", str(heldout_file), "--report", str(report)]) == 0
    kept, held = split_holdout([e.source for e in benign], 4 / 14, 3)

    spec = load_spec(spec_path, model_path("smollm2"))
    (circuit,) = spec.circuits
    record = circuit.calibration
    assert record.requests == 10 and record.target_fpr == 0.1
    assert record.data == "benign.jsonl (10 of 14, split stratified by source, seed 3; 4 held out)"
    assert record.data_hash == datasets.file_hash(benign_file)
    assert record.model_hash == spec.model.hash
    assert dict(record.achieved_fpr).keys() == {"prompt", "generation"}  # answers were given
    assert all(rate <= 0.1 for _, rate in record.achieved_fpr)
    assert np.array_equal(spec.components[0].direction, before.components[0].direction)
    assert circuit.aggregation == before.circuits[0].aggregation and circuit.weights == (2.0,)

    # The threshold is what aggregate() gives on the kept requests through the reference path;
    # the in-distribution check counts the held-out ones above it.
    scorer = ReferenceScorer(spec, model_path("smollm2"))
    prompt_max = np.array(
        [
            aggregate(scorer.score(e.token_ids(scorer.tokenizer)).scores[:, 0], circuit.aggregation)
            for e in benign
        ]
    )
    threshold = circuit.verdict_threshold("prompt")
    assert sum(v > threshold + 1e-4 for v in prompt_max[kept]) <= 1
    assert threshold == pytest.approx(sorted(prompt_max[kept])[-2], rel=1e-4)
    rows = {row["phase"]: row for row in json.loads(report.read_text())}
    prompt = rows["prompt"]
    assert prompt["calibration_requests"] == 10
    assert prompt["holdout"]["requests"] == 4 and prompt["heldout"]["requests"] == 4
    assert prompt["holdout"]["flagged"] == int((prompt_max[held] > threshold).sum())
    promised = binomial_count_range(4, 0.1)
    assert prompt["holdout_tolerance"] == {"low": 0, "high": 2, "requests": 4, "level": 0.95}
    inside = promised.low <= prompt["holdout"]["flagged"] <= promised.high
    assert prompt["within_tolerance"] is inside


def test_bundled_monitor_loads_flags_harmful_and_clears_benign():
    model_dir = model_path("smollm2")
    spec = load_spec(BUNDLED / "spec.yaml", model_dir)
    (circuit,) = spec.circuits
    assert circuit.calibration is not None and circuit.verdict_threshold("prompt") is not None
    threshold = circuit.verdict_threshold("prompt")
    scorer = ReferenceScorer(spec, model_dir)

    def aggregates(examples) -> np.ndarray:
        return np.array(
            [
                aggregate(scorer.score(e.token_ids(scorer.tokenizer)).scores[:, 0], agg)
                for e in examples
            ]
        )

    agg = circuit.aggregation
    harmful = aggregates(datasets.harmbench()[:32])
    benign = aggregates(datasets.composed_benign("test", 6) + datasets.twin_benign("test")[:6])
    # At its calibrated threshold the bundled probe flags an eighth of HarmBench (25/200, 3 of
    # these 32) and none of the 1,070 cross-template benign requests (see its report).
    report = json.loads((REPORT / "report.json").read_text())  # what probe-train chose
    assert circuit.aggregation == aggregation_of(report["chosen"]["position"])
    assert spec.components[0].site.name == report["chosen"]["site"]
    assert (harmful > threshold).sum() >= 2 and (benign > threshold).sum() <= 1
    assert harmful.mean() > benign.mean()
