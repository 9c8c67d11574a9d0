"""The drain's host ring, and how it turns several engine steps into one batch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sidecar.probe.graph.taps import PositionTap, TapSet
from sidecar.probe.host.attribution import SamplePolicy
from sidecar.probe.host.drain import DRAIN_BACKLOG, BatchIdentity, Drain
from sidecar.probe.host.ring import HostRing, Span
from sidecar.probe.host.shipper import DropCounts
from sidecar.probe.vllm_internals import StepLayout
from sidecar.protocol.batch import GENERATED, PROMPT


def test_ring_hands_out_spans_first_in_first_out_and_wraps():
    ring = HostRing(2, rows=10)
    a, b = ring.take(4), ring.take(4)
    assert (a, b) == (Span(0, 4), Span(4, 8))
    assert ring.take(3) is None  # 2 rows left at the end, and 0..4 still in use
    ring.give_back(a)
    assert ring.take(3) == Span(0, 3)  # wraps to the start
    assert ring.take(2) is None  # 3..4 is free, but only one row of it
    ring.give_back(b)
    assert ring.take(2) == Span(3, 5)


def test_ring_frees_a_span_given_back_early_only_after_the_older_ones():
    ring = HostRing(1, rows=6)
    a, b, c = ring.take(2), ring.take(2), ring.take(2)
    ring.give_back(b)
    assert ring.in_use() == 3 and ring.take(1) is None
    ring.give_back(a)
    assert ring.in_use() == 1
    assert ring.take(4) == Span(0, 4)
    ring.give_back(c)
    assert ring.take(0) == Span(0, 0)  # a step with no rows takes nothing


def make_drain(sample: str = "512", ring_rows: int = 64, randomized: bool = True):
    """Two taps' columns over 8 rows: tap 0 writes columns 0-1 (both shipped), tap 1 columns
    2-4 (ships 2 and 4)."""
    taps = TapSet(
        taps=[],
        values=torch.zeros(8, 5),
        positions=PositionTap(8),
        shipped=np.array([0, 1, 2, 4]),
        component_ids=np.array([0, 1, 2, 4], np.uint32),
        handles=[],
    )
    identity = BatchIdentity("sha256:s", "m", 0, 1, randomized_ids=randomized)
    drops = DropCounts()
    return Drain(taps, identity, SamplePolicy.parse(sample), drops, ring_rows), taps, drops


def run_step(drain: Drain, taps: TapSet, step: int, requests, finished=(), prefix_cached=None):
    """Fill the taps as a forward would: requests = [(internal id, prompt len, positions)]."""
    positions = [p for _, _, ps in requests for p in ps]
    n = len(positions)
    taps.values[:n] = torch.tensor(positions, dtype=torch.float32)[:, None] * step
    taps.values[:n, 3] = float("nan")  # a column this rank does not ship
    taps.values[n:] = float("nan")  # padding must never be shipped
    taps.positions.positions[:n] = torch.tensor(positions)
    layout = StepLayout(
        [r for r, _, _ in requests],
        np.array([len(ps) for _, _, ps in requests], np.int64),
        np.array([p for _, p, _ in requests], np.int64),
        np.array([ps[0] for _, _, ps in requests], np.int64),
    )
    return drain.collect(step, layout, list(finished), prefix_cached)


def test_steps_gathered_into_one_batch_keep_each_steps_rows_and_finished_requests():
    drain, taps, _ = make_drain()
    steps = [
        run_step(drain, taps, 1, [("a-0000000a", 3, [0, 1, 2]), ("b-0000000b", 2, [0, 1])]),
        run_step(drain, taps, 2, [("b-0000000b", 2, [2]), ("a-0000000a", 3, [3])]),
        run_step(drain, taps, 3, [], finished=["a-0000000a"]),  # no rows: a finished
        run_step(drain, taps, 4, [("c-0000000c", 1, [1])]),
    ]
    batch = drain.resolve(steps)
    assert batch.steps == (1, 2, 3, 4)
    assert batch.step_tokens == (5, 2, 0, 1) and batch.step_finished == (0, 0, 1, 0)
    assert batch.request_ids == ["a", "b", "c"]  # suffixes stripped, one entry per request
    assert batch.request_index.tolist() == [0, 0, 0, 1, 1, 1, 0, 2]
    assert batch.positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 1]
    assert batch.phases.tolist() == [PROMPT] * 3 + [PROMPT] * 2 + [GENERATED] * 3
    assert batch.finished_request_ids == ["a"]
    # Each row holds the value its own step wrote (position x step), in shipped columns.
    expected = np.array([0, 1, 2, 0, 1, 4, 6, 4], np.float32)
    np.testing.assert_array_equal(batch.values, np.repeat(expected[:, None], 4, axis=1))
    assert drain.ring.in_use() == 0  # every span went back


def test_a_cap_thins_each_step_on_its_own_and_empty_steps_are_not_listed():
    drain, taps, _ = make_drain(sample="2")
    ids = [f"r{i}-0000000{i}" for i in range(3)]
    steps = [
        run_step(drain, taps, 1, [(r, 1, [5]) for r in ids]),  # 3 generated tokens, cap 2
        run_step(drain, taps, 2, []),
        run_step(drain, taps, 3, [(ids[0], 1, [6])]),
    ]
    batch = drain.resolve(steps)
    assert batch.steps == (1, 3) and batch.step_tokens == (2, 1)
    assert drain.resolve([run_step(drain, taps, 4, [])]) is None  # nothing to send


def test_a_full_ring_drops_the_step_and_counts_its_tokens():
    drain, taps, drops = make_drain(ring_rows=4)
    held = run_step(drain, taps, 1, [("a-0000000a", 3, [0, 1, 2])])
    assert run_step(drain, taps, 2, [("b-0000000b", 2, [0, 1])]) is None
    assert drops.snapshot() == {DRAIN_BACKLOG: 2}
    held.discard()
    assert run_step(drain, taps, 3, [("b-0000000b", 2, [0, 1])]) is not None


def test_drops_count_the_tokens_the_sample_policy_would_have_kept():
    drain, taps, drops = make_drain(sample="2", ring_rows=4)
    held = run_step(drain, taps, 1, [("a-0000000a", 3, [0, 1, 2])])
    assert (held.rows, held.tokens) == (3, 2)  # a queue drop of it loses 2 sampled tokens
    assert run_step(drain, taps, 2, [("b-0000000b", 3, [0, 1, 2])]) is None
    assert drops.snapshot() == {DRAIN_BACKLOG: 2}


def test_prefix_cached_tokens_go_with_the_first_batch_naming_the_request():
    drain, taps, _ = make_drain()
    first = run_step(
        drain, taps, 1, [("a-0000000a", 8, [5, 6, 7])], prefix_cached={"a-0000000a": 5}
    )
    batch = drain.resolve([first])
    assert batch.prefix_cached_tokens == {"a": 5}
    assert (
        drain.resolve([run_step(drain, taps, 2, [("a-0000000a", 8, [8])])]).prefix_cached_tokens
        == {}
    )


def test_discarded_steps_cannot_be_read():
    drain, taps, _ = make_drain()
    step = run_step(drain, taps, 1, [("a-0000000a", 3, [0])])
    step.discard()
    with pytest.raises(AssertionError, match="after discard"):
        drain.resolve([step])


def test_concurrent_requests_with_one_caller_id_stay_apart():
    drain, taps, _ = make_drain()
    steps = [
        run_step(drain, taps, 1, [("job-0000000a", 2, [0, 1]), ("job-0000000b", 2, [0, 1])]),
        run_step(drain, taps, 2, [("job-0000000b", 2, [2])], finished=["job-0000000a"]),
    ]
    batch = drain.resolve(steps)
    assert batch.request_ids == ["job", "job-0000000b"]
    assert batch.request_index.tolist() == [0, 0, 1, 1, 1]
    assert batch.finished_request_ids == ["job"]


def test_a_status_message_names_the_probes_engine():
    """The sidecar takes one engine per stream: a status message naming none would be
    refused, and a probe turned off would never be reported."""
    drain, _, _ = make_drain()
    drain.identity = replace(drain.identity, engine_id="e1-dp0")
    status = drain.empty()
    assert status.is_status and status.engine_id == "e1-dp0"
