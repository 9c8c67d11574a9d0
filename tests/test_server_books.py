"""The sidecar's books (sampled = scored + dropped, per sender), engine identity, and request
ids reused by callers: the pipeline and the ingest service, without gRPC."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_server_aggregation import make_pipeline, rank_batch

from sidecar.protocol.batch import to_message
from sidecar.server.books import LOST_IN_TRANSIT
from sidecar.server.ingest import EngineStreams, IngestService
from sidecar.server.pipeline import Rejected

SAMPLED = "circuitwatch_probe_sampled_tokens_total"
SCORED = "circuitwatch_probe_scored_tokens_total"
DROPPED = "circuitwatch_probe_dropped_tokens_total"
LEGACY_DROPPED = "circuitwatch_samples_dropped_total"


def message(rank=0, step=1, shipped=3, dropped=None, engine="e1", world_size=1, **fields):
    """A three-row batch (requests x, y; components 0-2) with the sender's books."""
    ids = [0, 1, 2] if world_size == 1 else [[0, 1], [2]][rank]  # each rank its columns
    batch = rank_batch(rank, step, ids, np.ones((3, len(ids))), world_size=world_size)
    return replace(
        batch,
        engine_id=engine,
        shipped_tokens_total=shipped,
        dropped_total=dict(dropped or {}),
        **fields,
    )


def feed(pipeline, batch, now=0.0):
    pipeline.receive(batch)
    pipeline.ingest(batch, now)


def books(registry, rank=0):
    """(sampled, scored, dropped by reason) of one rank of model "tiny"."""
    labels = {"model_name": "tiny", "rank": str(rank)}
    dropped = {
        sample.labels["reason"]: sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == DROPPED and sample.labels["rank"] == str(rank)
    }
    return (
        registry.get_sample_value(SAMPLED, labels) or 0,
        registry.get_sample_value(SCORED, labels) or 0,
        dropped,
    )


def assert_balanced(registry, rank=0):
    sampled, scored, dropped = books(registry, rank)
    assert sampled == scored + sum(dropped.values()), (sampled, scored, dropped)


def test_a_probes_drops_count_once_however_often_it_reconnects():
    pipeline, registry, _ = make_pipeline()
    feed(pipeline, message(step=1, shipped=3, dropped={"queue_full": 5}))
    # The same sender after a reconnect: a new stream, the same cumulative counts.
    feed(pipeline, message(step=2, shipped=6, dropped={"queue_full": 5}))
    feed(pipeline, message(step=3, shipped=9, dropped={"queue_full": 7}))
    assert books(registry) == (16, 9, {"queue_full": 7})
    legacy = {"model_name": "tiny", "reason": "queue_full"}
    assert registry.get_sample_value(LEGACY_DROPPED, legacy) == 7


def test_messages_that_never_arrived_are_lost_in_transit_and_late_ones_are_refused():
    pipeline, registry, sink = make_pipeline()
    feed(pipeline, message(step=1, shipped=3))
    # Steps 2 and 3 (6 rows) were handed to a stream that broke; step 4 came on the next.
    feed(pipeline, message(step=4, shipped=12))
    assert books(registry) == (12, 6, {LOST_IN_TRANSIT: 6})
    # An old connection's last message read after the new one's: already counted lost.
    with pytest.raises(Rejected) as stale:
        pipeline.receive(message(step=3, shipped=9))
    assert stale.value.reason == "stale"
    assert books(registry) == (12, 6, {LOST_IN_TRANSIT: 6})
    # A message of finished requests only has no rows: its total is the last one's.
    finish_only = replace(
        message(step=5, shipped=12, finished_request_ids=["x"]),
        request_ids=[],
        request_index=np.zeros(0, np.uint32),
        positions=np.zeros(0, np.int32),
        phases=np.zeros(0, np.uint8),
        values=np.zeros((0, 3), np.float32),
    )
    feed(pipeline, finish_only)
    assert [r.request_id for r in sink.records] == ["x"]
    assert books(registry) == (12, 6, {LOST_IN_TRANSIT: 6})


def test_a_restarted_sidecar_starts_at_the_senders_base_and_counts_the_outages_drops():
    pipeline, registry, _ = make_pipeline()
    # The last message handed to the dead sidecar said shipped 6, queue_full 5; since then
    # the probe dropped 4 tokens while no sidecar listened and lost one 3-row message.
    feed(
        pipeline,
        message(
            step=9,
            shipped=12,
            dropped={"queue_full": 5, "sidecar_unavailable": 4},
            base_shipped_tokens_total=6,
            base_dropped_total={"queue_full": 5},
        ),
    )
    assert books(registry) == (10, 3, {LOST_IN_TRANSIT: 3, "sidecar_unavailable": 4})


def test_the_sidecars_own_drops_settle_the_rows_it_received():
    pipeline, registry, sink = make_pipeline()
    values = np.array([[1, 0, 0], [np.nan, 0, 0], [2, 0, 0]])
    feed(pipeline, replace(message(step=1, shipped=3, finished_request_ids=["x"]), values=values))
    feed(pipeline, message(step=2, shipped=6))  # x's tokens after its finish
    sampled, scored, dropped = books(registry)
    assert (sampled, scored) == (6, 3) and dropped == {"non_finite": 1, "after_finish": 2}
    service = IngestService(pipeline, "sha256:other", num_components=3)
    with pytest.raises(Rejected):
        service.accept(to_message(message(step=3, shipped=9)).SerializeToString(), 1.0)
    assert books(registry)[2]["rejected"] == 3
    assert_balanced(registry)


def test_books_balance_per_rank_under_tensor_parallelism():
    pipeline, registry, _ = make_pipeline(join_timeout=1.0)
    for rank in (0, 1):
        feed(pipeline, message(rank, step=1, shipped=3, world_size=2))
    feed(pipeline, message(0, step=2, shipped=6, world_size=2))  # rank 1's part never comes
    feed(pipeline, message(1, step=3, shipped=6, world_size=2, dropped={"queue_full": 3}))
    pipeline.tick(5.0)
    assert books(registry, 0) == (6, 3, {"tp_join_timeout": 3})
    assert books(registry, 1) == (9, 3, {"queue_full": 3, "tp_join_timeout": 3})
    # Without the rank label every rank's tokens are the same tokens: counted once.
    for reason, tokens in (("queue_full", None), ("tp_join_timeout", 3)):
        labels = {"model_name": "tiny", "reason": reason}
        assert registry.get_sample_value(LEGACY_DROPPED, labels) == tokens


def test_two_engines_with_the_same_steps_and_request_ids_are_kept_apart():
    pipeline, registry, sink = make_pipeline(join_timeout=1.0)
    for engine in ("a", "b"):
        for rank in (0, 1):
            batch = message(rank, step=1, engine=engine, world_size=2)
            feed(pipeline, replace(batch, finished_request_ids=["x", "y"]))
    records = sorted((r.engine_id, r.request_id, r.phase("prompt").tokens) for r in sink.records)
    assert records == [("a", "x", 2), ("a", "y", 1), ("b", "x", 2), ("b", "y", 1)]
    assert books(registry, 1) == (6, 6, {})


def test_a_request_id_used_again_after_its_request_finished_is_a_new_request():
    pipeline, _, sink = make_pipeline()
    feed(pipeline, message(step=1, shipped=3, finished_request_ids=["x", "y"]))
    # The probe marks the batch a request starts in (with its prefix-cached prompt tokens).
    again = message(step=2, shipped=6, prefix_cached_tokens={"x": 16, "y": 0})
    feed(pipeline, replace(again, finished_request_ids=["x", "y"]))
    records = [(r.request_id, r.prefix_cached_tokens, r.finished_by) for r in sink.records]
    assert records == [
        ("x", 0, "engine"),
        ("y", 0, "engine"),
        ("x", 16, "engine"),
        ("y", 0, "engine"),
    ]


def test_prefix_cached_tokens_are_counted_once_per_request():
    pipeline, registry, _ = make_pipeline(join_timeout=1.0)
    for rank in (0, 1):
        batch = message(rank, step=1, world_size=2, prefix_cached_tokens={"x": 32})
        feed(pipeline, batch)
    labels = {"model_name": "tiny"}
    assert registry.get_sample_value("circuitwatch_prefix_cached_tokens_total", labels) == 32


def test_a_gone_engines_requests_are_closed():
    pipeline, _, sink = make_pipeline(idle_timeout=1000.0)
    feed(pipeline, message(step=1, engine="old"))
    feed(pipeline, message(step=1, engine="new"))
    pipeline.forget_engine("old")
    assert sorted((r.engine_id, r.request_id, r.finished_by) for r in sink.records) == [
        ("old", "x", "idle"),
        ("old", "y", "idle"),
    ]


def test_an_engine_is_gone_after_its_grace_or_when_its_successor_streams():
    engines = EngineStreams(grace=10.0)
    engines.opened("a", "tiny", 2)
    engines.opened("a", "tiny", 2)  # both ranks
    engines.opened("other", "big", 1)
    engines.closed("a", 1.0)
    engines.closed("other", 1.0)
    assert engines.gone(5.0) == []  # a still has a stream; other is in its grace
    engines.opened("other", "big", 1)  # it came back
    engines.closed("a", 6.0)
    assert engines.gone(15.0) == []
    engines.opened("a2", "tiny", 2)  # a restarted: a new id for the same model and ranks
    assert engines.gone(15.0) == ["a"]
    engines.closed("other", 20.0)
    assert engines.gone(30.0) == ["other"]
