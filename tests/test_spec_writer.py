"""The one spec writer: what it writes loads back as written, and what it refuses."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from sidecar.spec.aggregation import aggregate
from sidecar.spec.load import load_spec
from sidecar.spec.schema import Aggregation, AggregationKind, Calibration
from sidecar.spec.writer import CircuitEntry, ComponentEntry, write_spec

HASH = "sha256:" + "0" * 64
HEAD = ComponentEntry(name="l1h2", site="blocks.1.attn.hook_z", head=2)
PROBE = ComponentEntry(
    name="probe", site="blocks.1.hook_resid_post", direction=np.arange(4.0), bias=-0.5
)


def test_round_trip_keeps_every_field(tmp_path):
    calibration = Calibration(
        target_fpr=0.01,
        achieved_fpr=(("prompt", 0.0125),),
        requests=400,
        data="benign.jsonl",
        data_hash="sha256:" + "1" * 64,
        model_hash=HASH,
        date="2026-11-29",
        tool_version="0.1.0",
    )
    circuit = CircuitEntry(
        name="harm",
        weights={"probe": 1.0, "l1h2": -0.25},
        description="a probe and a head",
        bias=0.125,
        threshold=2.0,
        aggregation=Aggregation(AggregationKind.MAX_ROLLING_MEAN, window=8),
        verdict_thresholds={"prompt": 1.5},
        calibration=calibration,
    )
    path = write_spec(tmp_path, "tiny", HASH, [HEAD, PROBE], [circuit], header="made by a test")
    assert path.read_text().startswith("# made by a test\n")
    spec = load_spec(path)
    assert [c.name for c in spec.components] == ["l1h2", "probe"]
    assert spec.components[0].head == 2 and spec.components[0].direction is None
    np.testing.assert_array_equal(spec.components[1].direction, np.arange(4.0))
    assert spec.components[1].bias == -0.5
    (loaded,) = spec.circuits
    assert loaded.weights == (-0.25, 1.0)
    assert (loaded.bias, loaded.threshold) == (0.125, 2.0)
    assert loaded.aggregation == Aggregation(AggregationKind.MAX_ROLLING_MEAN, window=8)
    assert loaded.verdict_threshold("prompt") == 1.5
    assert loaded.verdict_threshold("generation") is None
    assert loaded.calibration == calibration


@pytest.mark.parametrize(
    "aggregation",
    [
        Aggregation(),
        Aggregation(AggregationKind.LAST),
        Aggregation(AggregationKind.EMA_MAX, alpha=0.25),
        Aggregation(AggregationKind.SOFTMAX_MAX, temperature=0.5),
    ],
)
def test_every_aggregation_round_trips(tmp_path, aggregation):
    circuit = CircuitEntry(name="c", weights={"l1h2": 1.0}, aggregation=aggregation)
    spec = load_spec(write_spec(tmp_path, "tiny", HASH, [HEAD], [circuit]))
    assert spec.circuits[0].aggregation == aggregation


@pytest.mark.parametrize(
    ("components", "circuits", "message"),
    [
        ([HEAD], [CircuitEntry(name="empty", weights={})], "circuit empty: no member"),
        ([HEAD], [CircuitEntry(name="c", weights={"l1h9": 1.0})], "unknown component 'l1h9'"),
        (
            [HEAD],
            [CircuitEntry(name="c", weights={"l1h2": math.nan})],
            "weight of l1h2 is nan, not a finite number (a component with zero spread?)",
        ),
        (
            [HEAD],
            [
                CircuitEntry(
                    name="c", weights={"l1h2": 1.0}, verdict_thresholds={"prompt": math.inf}
                )
            ],
            "verdict threshold (prompt) is inf",
        ),
        (
            [
                ComponentEntry(
                    name="bad", site="blocks.0.hook_resid_post", direction=[1.0, math.nan]
                )
            ],
            [CircuitEntry(name="c", weights={"bad": 1.0})],
            "direction must be a finite, non-empty 1-D vector",
        ),
        ([HEAD, HEAD], [CircuitEntry(name="c", weights={"l1h2": 1.0})], "duplicate component"),
    ],
)
def test_refuses_before_writing(tmp_path, components, circuits, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        write_spec(tmp_path, "tiny", HASH, components, circuits)
    assert not (tmp_path / "spec.yaml").exists()


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        (Aggregation(), 1.5),
        (Aggregation(AggregationKind.MAX), 4.0),
        (Aggregation(AggregationKind.LAST), 2.0),
        # e = 1, 0.5*4+0.5*1 = 2.5, 0.5*(-1)+0.5*2.5 = 0.75, 0.5*2+0.5*0.75 = 1.375
        (Aggregation(AggregationKind.EMA_MAX, alpha=0.5), 2.5),
        # windows of 2: (1+4)/2, (4-1)/2, (-1+2)/2
        (Aggregation(AggregationKind.MAX_ROLLING_MEAN, window=2), 2.5),
        (Aggregation(AggregationKind.MAX_ROLLING_MEAN, window=9), 1.5),
        # weights e^(s-4): e^-3, 1, e^-5, e^-2
        (
            Aggregation(AggregationKind.SOFTMAX_MAX, temperature=1.0),
            (1 * math.exp(-3) + 4 + -1 * math.exp(-5) + 2 * math.exp(-2))
            / (math.exp(-3) + 1 + math.exp(-5) + math.exp(-2)),
        ),
    ],
)
def test_aggregations_by_hand(aggregation, expected):
    assert aggregate(np.array([1.0, 4.0, -1.0, 2.0]), aggregation) == pytest.approx(expected)
