"""The wire protocol: committed stubs are current, and batches survive the round trip."""

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
        step=7,
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
    assert back.dropped_total == {"queue_full": 3} and back.step == 7


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
    ],
)
def test_malformed_batches_are_rejected_with_the_reason(corrupt, message):
    msg = to_message(_batch())
    corrupt(msg)
    with pytest.raises(MalformedBatch, match=message):
        from_message(msg, 3)
