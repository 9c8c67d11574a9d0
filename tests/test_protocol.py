"""The wire protocol: committed stubs are current, and batches survive the round trip."""

from dataclasses import replace

import numpy as np
import pytest

from sidecar.protocol import generate
from sidecar.protocol.batch import MalformedBatch, TokenBatch, from_message, to_message
from sidecar.protocol.circuitwatch.v1 import ingest_pb2


def test_committed_stubs_match_the_protos(tmp_path):
    for fresh in generate.generate(tmp_path):
        committed = generate.OUT_ROOT / fresh.relative_to(tmp_path)
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run python -m sidecar.protocol.generate"
        )


def _batch(n=3, k=2):
    return TokenBatch(
        spec_hash="sha256:abc",
        model_name="m",
        steps=(7,),
        component_ids=np.arange(k, dtype=np.uint32),
        request_ids=["a", "b"],
        request_index=np.array([0, 1, 1][:n], dtype=np.uint32),
        positions=np.array([0, 4, 5][:n], dtype=np.int32),
        phases=np.array([0, 0, 1][:n], dtype=np.uint8),
        values=np.arange(n * k, dtype=np.float32).reshape(n, k),
        finished_request_ids=["a"],
        dropped_total={"queue_full": 3},
    )


def test_round_trip_keeps_every_column():
    batch = _batch()
    back = from_message(ingest_pb2.SampleBatch.FromString(to_message(batch).SerializeToString()), 2)
    np.testing.assert_array_equal(back.values, batch.values)
    np.testing.assert_array_equal(back.positions, batch.positions)
    np.testing.assert_array_equal(back.request_index, batch.request_index)
    np.testing.assert_array_equal(back.phases, batch.phases)
    assert (back.request_ids, back.finished_request_ids) == (["a", "b"], ["a"])
    assert back.dropped_total == {"queue_full": 3} and back.steps == (7,)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda m: setattr(m, "values", m.values[:-4]), "values: 5 items, expected 6"),
        (lambda m: setattr(m, "positions", m.positions[:-1]), "positions: 11 bytes"),
        (lambda m: m.component_ids.append(9), "component_ids: id 9 out of range"),
        (lambda m: setattr(m, "phases", b"\x00\x00\x02"), "phases: value 2"),
        (
            lambda m: setattr(m, "request_index", np.array([0, 1, 5], "<u4").tobytes()),
            "request_index: 5",
        ),
        (lambda m: setattr(m, "rank", 1), "rank 1 out of range"),
        (lambda m: m.ClearField("steps"), "a batch with tokens or requests names an engine step"),
        (lambda m: m.steps.append(3), r"steps: \[7, 3\] is not strictly ascending"),
        (lambda m: m.steps.append(8), "step_tokens: 0 entries for 2 steps"),
        (lambda m: m.step_tokens.extend([1, 1]), "step_tokens: 2 entries for 1 steps"),
        (lambda m: m.step_finished.append(2), "step_finished: the steps' shares add up to 2"),
    ],
)
def test_malformed_batches_are_rejected_with_the_reason(corrupt, message):
    msg = to_message(_batch())
    corrupt(msg)
    with pytest.raises(MalformedBatch, match=message):
        from_message(msg, 3)


def test_a_status_message_carries_the_probe_state_and_nothing_else():
    status = TokenBatch(
        spec_hash="sha256:abc",
        model_name="m",
        steps=(),
        component_ids=np.arange(2, dtype=np.uint32),
        request_ids=[],
        request_index=np.zeros(0, np.uint32),
        positions=np.zeros(0, np.int32),
        phases=np.zeros(0, np.uint8),
        values=np.zeros((0, 2), np.float32),
        dropped_total={"queue_full": 3},
        probe_off=True,
        probe_errors_total={"drain_collect": 1},
    )
    raw = to_message(status).SerializeToString()
    back = from_message(ingest_pb2.SampleBatch.FromString(raw), 2)
    assert back.is_status and back.num_tokens == 0 and back.split_steps() == []
    assert back.probe_off and back.probe_errors_total == {"drain_collect": 1}
    assert back.dropped_total == {"queue_full": 3}
    assert not from_message(to_message(_batch()), 2).probe_off


def _two_steps() -> TokenBatch:
    """Steps 7 (requests a, b; finishes a) and 9 (request b), as a probe gathers them."""
    return TokenBatch(
        spec_hash="sha256:abc",
        model_name="m",
        steps=(7, 9),
        component_ids=np.arange(2, dtype=np.uint32),
        request_ids=["a", "b"],
        request_index=np.array([0, 1, 1], dtype=np.uint32),
        positions=np.array([4, 5, 6], dtype=np.int32),
        phases=np.array([1, 1, 1], dtype=np.uint8),
        values=np.arange(6, dtype=np.float32).reshape(3, 2),
        finished_request_ids=["a"],
        step_tokens=(2, 1),
        step_finished=(1, 0),
    )


def test_a_batch_of_several_steps_round_trips_and_splits_into_its_steps():
    batch = replace(_two_steps(), prefix_cached_tokens={"b": 32}, engine_id="e-dp0")
    back = from_message(ingest_pb2.SampleBatch.FromString(to_message(batch).SerializeToString()), 2)
    assert (back.steps, back.step_tokens, back.step_finished) == ((7, 9), (2, 1), (1, 0))
    first, second = back.split_steps()
    assert (first.steps, first.request_ids, first.finished_request_ids) == ((7,), ["a", "b"], ["a"])
    assert first.request_index.tolist() == [0, 1] and first.positions.tolist() == [4, 5]
    assert (second.steps, second.request_ids, second.finished_request_ids) == ((9,), ["b"], [])
    assert second.request_index.tolist() == [0] and second.values.tolist() == [[4.0, 5.0]]
    # A request's start goes with its first step only; the engine with every step.
    assert (first.prefix_cached_tokens, second.prefix_cached_tokens) == ({"b": 32}, {})
    assert first.engine_id == second.engine_id == "e-dp0"


def test_the_books_round_trip_and_a_total_below_the_batch_is_malformed():
    batch = replace(
        _batch(),
        shipped_tokens_total=10,
        base_shipped_tokens_total=4,
        base_dropped_total={"queue_full": 1},
    )
    back = from_message(ingest_pb2.SampleBatch.FromString(to_message(batch).SerializeToString()), 2)
    assert (back.shipped_tokens_total, back.base_shipped_tokens_total) == (10, 4)
    assert back.base_dropped_total == {"queue_full": 1}
    with pytest.raises(MalformedBatch, match="shipped_tokens_total: 2 is less"):
        from_message(to_message(replace(batch, shipped_tokens_total=2)), 2)


def test_a_one_step_message_from_an_older_probe_still_reads():
    """Field 5 was a single ``step``; a repeated field reads the old encoding as one step."""
    # spec_hash, world_size = 1, then field 5 = 300 as a plain varint
    old = b"\x0a\x0asha256:abc" + b"\x20\x01" + b"\x28\xac\x02"
    assert from_message(ingest_pb2.SampleBatch.FromString(old), 2).steps == (300,)


def test_a_split_step_names_its_requests_in_the_order_of_its_own_rows():
    # Step 9 runs b before a (vLLM reorders its batch); the gathered batch numbered a first.
    batch = replace(
        _two_steps(),
        request_index=np.array([0, 1, 1, 0], dtype=np.uint32),
        positions=np.array([4, 5, 6, 5], dtype=np.int32),
        phases=np.ones(4, dtype=np.uint8),
        values=np.arange(8, dtype=np.float32).reshape(4, 2),
        step_tokens=(2, 2),
    )
    _, second = batch.split_steps()
    assert second.request_ids == ["b", "a"] and second.request_index.tolist() == [0, 1]
