"""Scorer: component values -> circuit scores, checked against a float64 reference."""

from pathlib import Path

import numpy as np
import pytest

from sidecar.server.scoring import ComponentLayoutError, Scorer
from sidecar.spec.schema import Circuit, CircuitSpec, Component, ComponentKind, ModelIdentity
from sidecar.spec.sites import Site


def make_spec() -> CircuitSpec:
    components = (
        Component("l1h2", ComponentKind.HEAD, Site.parse("blocks.1.attn.hook_z"), head=2),
        Component("l0h1", ComponentKind.HEAD, Site.parse("blocks.0.attn.hook_z"), head=1),
        Component("unused", ComponentKind.HEAD, Site.parse("blocks.0.attn.hook_z"), head=3),
    )
    circuits = (
        Circuit("induction", weights=(1.0, 0.5, 0.0), bias=0.25, threshold=1.0),
        Circuit("prev_token", weights=(-2.0, 1.0, 0.0)),
    )
    return CircuitSpec(
        path=Path("spec.yaml"),
        model=ModelIdentity("tiny", "sha256:" + "0" * 64),
        components=components,
        circuits=circuits,
        hash="sha256:" + "1" * 64,
    )


def reference(values_in_spec_order: np.ndarray) -> np.ndarray:
    weights = np.array([[1.0, 0.5, 0.0], [-2.0, 1.0, 0.0]])
    return values_in_spec_order.astype(np.float64) @ weights.T + np.array([0.25, 0.0])


def test_scores_match_reference_in_spec_order():
    scorer = Scorer.from_spec(make_spec())
    values = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    scores = scorer.score(values, np.arange(3, dtype=np.uint32))
    assert scores.dtype == np.float32 and scores.shape == (64, 2)
    np.testing.assert_allclose(scores, reference(values), rtol=1e-5, atol=1e-5)


def test_columns_in_any_order_and_unweighted_ones_may_be_left_out():
    scorer = Scorer.from_spec(make_spec())
    values = np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32)
    permuted = np.array([2, 0, 1], dtype=np.uint32)
    np.testing.assert_allclose(
        scorer.score(values[:, permuted], permuted), reference(values), rtol=1e-5, atol=1e-5
    )
    weighted_only = np.array([1, 0], dtype=np.uint32)
    np.testing.assert_allclose(
        scorer.score(values[:, weighted_only], weighted_only),
        reference(values),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "ids, problem", [([0, 0, 1], "twice"), ([0, 2], "lack weighted components \\[1\\]")]
)
def test_bad_layouts_are_refused(ids, problem):
    scorer = Scorer.from_spec(make_spec())
    values = np.zeros((2, len(ids)), dtype=np.float32)
    with pytest.raises(ComponentLayoutError, match=problem):
        scorer.score(values, np.array(ids, dtype=np.uint32))


def test_firing_counts_only_circuits_with_a_threshold():
    scorer = Scorer.from_spec(make_spec())
    scores = np.array([[0.5, 9.0], [1.5, 9.0], [2.0, -9.0]], dtype=np.float32)
    assert scorer.firing(scores).tolist() == [2, 0]
