"""Per-request aggregation, rank joining and the synchronous pipeline, without a network."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from sidecar.protocol.batch import GENERATED, PROMPT, TokenBatch
from sidecar.server.join import RankJoiner
from sidecar.server.metrics import MetricsSink, SidecarMetrics
from sidecar.server.pipeline import Pipeline, Rejected
from sidecar.server.records import CollectingSink
from sidecar.server.requests import RequestTable
from sidecar.server.scoring import Scorer
from sidecar.spec.schema import (
    Aggregation,
    AggregationKind,
    Circuit,
    CircuitSpec,
    Component,
    ComponentKind,
    ModelIdentity,
)
from sidecar.spec.sites import Site


def make_spec() -> CircuitSpec:
    site = Site.parse("blocks.1.attn.hook_z")
    return CircuitSpec(
        path=Path("spec.yaml"),
        model=ModelIdentity("tiny", "sha256:" + "0" * 64),
        components=tuple(Component(f"h{h}", ComponentKind.HEAD, site, head=h) for h in range(3)),
        circuits=(
            Circuit("a", weights=(1.0, 0.0, 0.5), threshold=0.5),
            Circuit("b", weights=(0.0, -1.0, 1.0), bias=1.0),
        ),
        hash="sha256:" + "1" * 64,
    )


CIRCUITS = make_spec().circuits


def add(table, request_ids, index, phases, scores, now, positions=None):
    index = np.asarray(index, dtype=np.uint32)
    positions = np.arange(index.size, dtype=np.int32) if positions is None else positions
    return table.add(
        "tiny",
        request_ids,
        index,
        np.asarray(positions, dtype=np.int32),
        np.asarray(phases, dtype=np.uint8),
        np.asarray(scores, dtype=np.float32),
        now,
    )


def test_aggregates_match_numpy_over_shuffled_interleaved_batches():
    rng = np.random.default_rng(0)
    table = RequestTable(CIRCUITS, max_requests=16, keep_token_scores=1000)
    names = [f"req-{i}" for i in range(5)]
    seen = {name: [] for name in names}  # (phase, position, scores) in arrival order
    for step in range(20):
        present = sorted(rng.choice(5, size=rng.integers(1, 6), replace=False).tolist())
        n = int(rng.integers(1, 40))
        index = rng.integers(0, len(present), size=n)
        phases = rng.integers(0, 2, size=n)
        positions = rng.integers(0, 1000, size=n)
        scores = rng.normal(size=(n, 2)).astype(np.float32)
        add(table, [names[i] for i in present], index, phases, scores, step, positions)
        for token in range(n):
            name = names[present[index[token]]]
            seen[name].append((phases[token], positions[token], scores[token]))
    for name in names:
        record = table.finish(name, "engine")
        assert record is not None and record.request_id == name
        for phase, phase_name in ((PROMPT, "prompt"), (GENERATED, "generation")):
            mine = np.array([s for p, _, s in seen[name] if p == phase], dtype=np.float64)
            stats = record.phase(phase_name)
            if mine.size == 0:
                assert stats is None
                continue
            assert stats.tokens == len(mine)
            for c, circuit in enumerate(CIRCUITS):
                got = stats.circuit(circuit.name)
                assert got.mean == pytest.approx(mine[:, c].mean(), rel=1e-6, abs=1e-6)
                assert got.max == pytest.approx(mine[:, c].max(), rel=1e-6)
                assert got.min == pytest.approx(mine[:, c].min(), rel=1e-6)
        assert record.tokens.positions.tolist() == [pos for _, pos, _ in seen[name]]
        assert record.tokens.phases.tolist() == [p for p, _, _ in seen[name]]
        np.testing.assert_array_equal(record.tokens.scores, np.array([s for *_, s in seen[name]]))
    assert len(table) == 0


def test_kept_token_scores_are_capped_per_request():
    table = RequestTable(CIRCUITS, max_requests=4, keep_token_scores=3)
    add(table, ["r"], [0, 0], [0, 0], [[1, 1], [2, 2]], 1.0)
    add(table, ["r"], [0, 0], [1, 1], [[3, 3], [4, 4]], 2.0)
    record = table.finish("r", "engine")
    assert record.tokens.scores[:, 0].tolist() == [1, 2, 3]
    assert record.phase("generation").tokens == 2  # aggregates still see every token


def test_least_recently_updated_request_is_evicted_when_full():
    table = RequestTable(CIRCUITS, max_requests=2)
    add(table, ["old"], [0, 0, 0], [0, 0, 0], np.zeros((3, 2)), 1.0)
    add(table, ["mid"], [0], [0], np.zeros((1, 2)), 2.0)
    add(table, ["old"], [0], [1], np.zeros((1, 2)), 3.0)
    dropped = add(table, ["new"], [0, 0], [0, 0], np.ones((2, 2)), 4.0)
    assert [(d.reason, d.tokens) for d in dropped] == [("state_full", 1)]
    assert table.finish("mid", "engine") is None
    assert table.finish("old", "engine").phase("prompt").tokens == 3
    assert table.finish("new", "engine").phase("prompt").circuit("a").mean == 1.0


def test_new_request_is_refused_when_every_live_request_is_in_the_same_batch():
    table = RequestTable(CIRCUITS, max_requests=1)
    add(table, ["a"], [0], [0], [[1, 1]], 1.0)
    dropped = add(table, ["a", "b"], [0, 1, 1], [1, 0, 0], [[2, 2], [5, 5], [6, 6]], 2.0)
    assert [(d.reason, d.tokens) for d in dropped] == [("state_full", 2)]
    record = table.finish("a", "engine")
    assert record.phase("generation").circuit("a").max == 2.0
    assert table.finish("b", "engine") is None


def test_tokens_after_finish_are_dropped_not_reopened():
    table = RequestTable(CIRCUITS, max_requests=4)
    add(table, ["r"], [0], [0], [[1, 1]], 1.0)
    assert table.finish("r", "engine") is not None
    dropped = add(table, ["r"], [0, 0], [1, 1], [[1, 1], [1, 1]], 2.0)
    assert [(d.reason, d.tokens) for d in dropped] == [("after_finish", 2)]
    assert len(table) == 0


def test_idle_requests_expire():
    table = RequestTable(CIRCUITS, max_requests=4)
    add(table, ["quiet"], [0], [0], [[1, 1]], 1.0)
    add(table, ["busy"], [0], [0], [[1, 1]], 5.0)
    assert table.expire(now=5.5, idle_timeout=10.0) == []
    expired = table.expire(now=12.0, idle_timeout=10.0)
    assert [(r.request_id, r.finished_by) for r in expired] == [("quiet", "idle")]
    assert len(table) == 1


def rank_batch(rank, step, ids, values, world_size=2, positions=(0, 1, 2), finished=()):
    n = len(positions)
    return TokenBatch(
        spec_hash="sha256:" + "1" * 64,
        model_name="tiny",
        steps=(step,),
        component_ids=np.array(ids, dtype=np.uint32),
        request_ids=["x", "y"],
        request_index=np.array([0, 0, 1][:n], dtype=np.uint32),
        positions=np.array(positions, dtype=np.int32),
        phases=np.zeros(n, dtype=np.uint8),
        values=np.asarray(values, dtype=np.float32).reshape(n, len(ids)),
        finished_request_ids=list(finished),
        rank=rank,
        world_size=world_size,
    )


def gathered(*steps: TokenBatch) -> TokenBatch:
    """One-step batches of one rank as its probe gathers them into one message."""
    names = list(dict.fromkeys(r for b in steps for r in b.request_ids))
    return replace(
        steps[0],
        steps=tuple(s for b in steps for s in b.steps),
        request_ids=names,
        request_index=np.concatenate(
            [np.array([names.index(b.request_ids[i]) for i in b.request_index]) for b in steps]
        ).astype(np.uint32),
        positions=np.concatenate([b.positions for b in steps]),
        phases=np.concatenate([b.phases for b in steps]),
        values=np.concatenate([b.values for b in steps]),
        finished_request_ids=[r for b in steps for r in b.finished_request_ids],
        step_tokens=tuple(b.num_tokens for b in steps),
        step_finished=tuple(len(b.finished_request_ids) for b in steps),
    )


def test_ranks_are_joined_by_step_whatever_the_arrival_order():
    joiner = RankJoiner(timeout=1.0)
    assert joiner.add(rank_batch(1, 7, [2], [[3], [6], [9]], finished=["y"]), 0.0).joined == []
    (joined,) = joiner.add(rank_batch(0, 7, [0, 1], [[1, 2], [4, 5], [7, 8]]), 0.1).joined
    assert joined.ranks == (0, 1)
    joined = joined.batch
    assert joined.component_ids.tolist() == [0, 1, 2]
    assert joined.values.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert joined.finished_request_ids == ["y"]
    assert len(joiner) == 0


def test_ranks_that_gather_steps_differently_are_still_joined_step_by_step():
    joiner = RankJoiner(timeout=1.0)
    # Rank 0 sends steps 1 and 2 in one message (step 2 only has request y and finishes x)...
    step_1 = rank_batch(0, 1, [0], [[1], [2], [3]])
    step_2 = rank_batch(0, 2, [0], [[4]], positions=(3,), finished=["x"])
    step_2.request_index[:] = 1
    assert joiner.add(gathered(step_1, step_2), 0.0).joined == []
    # ...rank 1 sends them one at a time.
    (first,) = (j.batch for j in joiner.add(rank_batch(1, 1, [1], [[10], [20], [30]]), 0.1).joined)
    assert first.steps == (1,) and first.values.tolist() == [[1, 10], [2, 20], [3, 30]]
    assert first.finished_request_ids == []
    step_2_rank_1 = rank_batch(1, 2, [1], [[40]], positions=(3,))
    step_2_rank_1.request_index[:] = 1
    (second,) = (j.batch for j in joiner.add(gathered(step_2_rank_1), 0.2).joined)
    assert second.steps == (2,) and second.request_ids == ["y"]
    assert second.values.tolist() == [[4, 40]] and second.finished_request_ids == ["x"]
    assert len(joiner) == 0


def test_join_refuses_disagreeing_ranks_and_duplicates_but_keeps_the_other_steps():
    joiner = RankJoiner(timeout=1.0)
    joiner.add(rank_batch(0, 1, [0], [[1], [2], [3]]), 0.0)
    (duplicate,) = joiner.add(rank_batch(0, 1, [0], [[1], [2], [3]]), 0.0).errors
    assert duplicate.reason == "tp_duplicate_rank" and "twice" in str(duplicate)
    joiner.add(rank_batch(0, 2, [0], [[1], [2], [3]]), 0.0)
    bad_1 = rank_batch(1, 1, [1], [[1], [2], [3]], positions=(0, 1, 5))
    outcome = joiner.add(gathered(bad_1, rank_batch(1, 2, [1], [[1], [2], [3]])), 0.0)
    (mismatch,) = outcome.errors
    assert mismatch.reason == "tp_mismatch" and "differ" in str(mismatch)
    assert [j.batch.steps for j in outcome.joined] == [(2,)]
    # The books: the parts the errors cost, each its own rank's.
    assert [(p.rank, p.steps) for p in outcome.refused] == [(0, (1,)), (1, (1,))]


def test_incomplete_joins_time_out_or_overflow():
    joiner = RankJoiner(timeout=1.0, max_pending=2)
    joiner.add(rank_batch(0, 1, [0], [[1], [2], [3]]), 0.0)
    joiner.add(rank_batch(0, 2, [0], [[1], [2], [3]]), 0.5)
    overflow = joiner.add(rank_batch(0, 3, [0], [[1], [2], [3]]), 0.6).dropped
    assert [(d.reason, d.tokens) for d in overflow] == [("tp_join_overflow", 3)]
    assert joiner.expire(1.2) == []
    assert [(d.reason, d.tokens) for d in joiner.expire(1.55)] == [("tp_join_timeout", 3)]
    assert len(joiner) == 1


def test_steps_given_up_are_reported_by_the_rank_of_each_part():
    joiner = RankJoiner(timeout=1.0, max_pending=1)
    joiner.add(rank_batch(1, 1, [2], [[3], [6], [9]]), 0.0)
    overflow = joiner.add(rank_batch(1, 2, [2], [[3], [6], [9]]), 0.1).dropped
    assert [(d.rank, d.reason, d.tokens) for d in overflow] == [(1, "tp_join_overflow", 3)]
    assert joiner.expire(0.5) == []
    assert [(d.rank, d.reason, d.tokens) for d in joiner.expire(2.0)] == [(1, "tp_join_timeout", 3)]
    joiner.add(rank_batch(0, 3, [0, 1], [[1, 2]], positions=(0,)), 2.0)
    assert [(d.rank, d.reason, d.tokens) for d in joiner.expire(3.5)] == [(0, "tp_join_timeout", 1)]


def make_pipeline(spec=None, **kwargs):
    spec = spec or make_spec()
    registry = CollectorRegistry()
    sink = CollectingSink()
    metrics = SidecarMetrics(registry, spec.circuits)
    pipeline = Pipeline(Scorer.from_spec(spec), metrics, [MetricsSink(metrics), sink], **kwargs)
    return pipeline, registry, sink


def test_pipeline_drops_non_finite_rows_and_counts_them():
    pipeline, registry, sink = make_pipeline()
    values = [[1, 0, 0], [np.nan, 0, 0], [2, 0, 0]]
    batch = rank_batch(0, 1, [0, 1, 2], values, world_size=1, finished=["x", "y"])
    pipeline.ingest(batch, 1.0)
    dropped = registry.get_sample_value(
        "circuitwatch_samples_dropped_total", {"model_name": "tiny", "reason": "non_finite"}
    )
    assert dropped == 1
    by_id = {r.request_id: r for r in sink.records}
    assert by_id["x"].phase("prompt").tokens == 1
    assert by_id["y"].phase("prompt").circuit("a").mean == 2.0
    firing = {"circuit": "a", "model_name": "tiny"}
    assert registry.get_sample_value("circuitwatch_circuit_firing_tokens_total", firing) == 2
    assert (
        registry.get_sample_value(
            "circuitwatch_circuit_firing_tokens_total", {"circuit": "b", "model_name": "tiny"}
        )
        is None
    )


def test_pipeline_rejects_batches_missing_weighted_components():
    pipeline, _, _ = make_pipeline()
    with pytest.raises(Rejected) as rejected:
        pipeline.ingest(rank_batch(0, 1, [0, 1], np.zeros((3, 2)), world_size=1), 1.0)
    assert rejected.value.reason == "component_ids"


def test_pipeline_tick_expires_joins_and_idle_requests():
    pipeline, registry, sink = make_pipeline(idle_timeout=10.0, join_timeout=1.0)
    pipeline.ingest(rank_batch(0, 1, [0, 1, 2], np.zeros((3, 3)), world_size=1), 0.0)
    pipeline.ingest(rank_batch(0, 2, [0], np.zeros((3, 1))), 0.0)
    pipeline.tick(2.0)
    labels = {"model_name": "tiny", "reason": "tp_join_timeout"}
    assert registry.get_sample_value("circuitwatch_samples_dropped_total", labels) == 3
    assert registry.get_sample_value("circuitwatch_live_requests", {"model_name": "tiny"}) == 2
    pipeline.tick(11.0)
    assert sorted(r.request_id for r in sink.records) == ["x", "y"]
    assert {r.finished_by for r in sink.records} == {"idle"}
    assert registry.get_sample_value("circuitwatch_live_requests", {"model_name": "tiny"}) == 0


def test_pipeline_exports_configured_aggregates_and_verdicts():
    last = Aggregation(AggregationKind.LAST)
    circuits = (
        Circuit("a", (1.0, 0.0, 0.0), aggregation=last, verdict_thresholds=(("prompt", 1.5),)),
        Circuit("b", (1.0, 0.0, 0.0)),
    )
    pipeline, registry, sink = make_pipeline(replace(make_spec(), circuits=circuits))
    values = [[2, 0, 0], [1, 0, 0], [3, 0, 0]]  # x: 2 then 1, y: 3
    pipeline.ingest(rank_batch(0, 1, [0, 1, 2], values, world_size=1, finished=["x", "y"]), 1.0)
    by_id = {r.request_id: r.phase("prompt").circuit("a") for r in sink.records}
    assert (by_id["x"].aggregate, by_id["x"].verdict) == (1.0, "clear")
    assert (by_id["y"].aggregate, by_id["y"].verdict) == (3.0, "flagged")

    def verdicts(circuit, phase, verdict):
        labels = {"circuit": circuit, "model_name": "tiny", "phase": phase, "verdict": verdict}
        return registry.get_sample_value("circuitwatch_verdicts_total", labels)

    assert verdicts("a", "prompt", "flagged") == 1 and verdicts("a", "prompt", "clear") == 1
    assert verdicts("a", "generation", "clear") is None and verdicts("b", "prompt", "clear") is None

    def scores(circuit, aggregation, suffix="_count", **extra):
        labels = {"circuit": circuit, "model_name": "tiny", "phase": "prompt"}
        labels.update(aggregation=aggregation, **extra)
        return registry.get_sample_value(f"circuitwatch_circuit_score{suffix}", labels)

    assert scores("a", "last") == 2 and scores("a", "mean") == 2 and scores("a", "max") == 2
    assert scores("b", "last") is None and scores("b", "mean") == 2
    assert scores("a", "last", "_bucket", le="1.5") == 1  # the verdict threshold is a bucket
