"""Fuzzing the ingest handler: hypothesis properties, and a short run of the fuzz script.

The dedicated run (10^6 inputs) is ``python -m benchmarks.fuzz_ingest``; its figures are in
benchmarks/results/fuzz-ingest.json. Here: any bytes and any well-formed-but-hostile batch are
either accepted or rejected with a reason (never another exception), and the state the caps
bound stays within them however many inputs arrive.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_grpc import SPEC_HASH, make_spec

from sidecar.protocol.circuitwatch.v1 import ingest_pb2
from sidecar.server.ingest import IngestService
from sidecar.server.pipeline import Rejected
from sidecar.server.service import Sidecar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import fuzz_ingest  # noqa: E402

MAX_REQUESTS = 32
SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


class Handler:
    """One sidecar's ingest handler shared by every example, its clock and streams moving on,
    so state accumulates across examples as it would in a long-running server."""

    def __init__(self) -> None:
        self.sidecar = Sidecar(make_spec(), "unix:///unused", max_requests=MAX_REQUESTS)
        pipeline = self.sidecar.pipeline
        self.service = IngestService(pipeline, SPEC_HASH, pipeline.scorer.num_components)
        self.clock = itertools.count(1000.0, 0.01)
        self.senders: set[str] = set()  # one long stream's engine

    def outcome(self, raw: bytes) -> str:
        now = next(self.clock)
        try:
            self.service.accept(raw, now, self.senders, source=int(now) % 3)
            outcome = "accepted"
        except Rejected as error:
            outcome = error.reason
        self.service.tick(now)
        requests, joiner = self.sidecar.pipeline.requests, self.sidecar.pipeline.joiner
        assert len(requests) <= MAX_REQUESTS and len(joiner) <= joiner.max_pending
        assert joiner.pending_bytes <= joiner.max_pending_bytes
        return outcome


HANDLER = Handler()


@SETTINGS
@given(st.binary(max_size=600))
def test_any_bytes_are_accepted_or_rejected(raw):
    HANDLER.outcome(raw)


@st.composite
def hostile_batches(draw) -> bytes:
    """Columns that agree in length (so decoding gets past the first checks) with hostile
    content: any ids, any floats, ranks, steps and shares, odd strings."""
    n = draw(st.integers(0, 12))
    ids = draw(st.permutations([0, 1, 2]) | st.lists(st.integers(0, 5), max_size=4))
    requests = draw(st.lists(st.text(max_size=6), min_size=1, max_size=5, unique=True))
    index = draw(st.lists(st.integers(0, len(requests)), min_size=n, max_size=n))
    positions = draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=n, max_size=n))
    phases = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    values = draw(st.lists(st.floats(width=32), min_size=n * len(ids), max_size=n * len(ids)))
    world_size = draw(st.integers(0, 3))
    steps = draw(st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 40), max_size=3))
    cut = draw(st.integers(0, n))
    message = ingest_pb2.SampleBatch(
        spec_hash=draw(st.sampled_from([SPEC_HASH, SPEC_HASH, "", "sha256:other"])),
        model_name=draw(st.sampled_from(["tiny-llama", "", "x" * 200]) | st.text(max_size=10)),
        rank=draw(st.integers(0, 3)),
        world_size=world_size,
        steps=steps,
        component_ids=ids,
        request_ids=requests,
        request_index=np.array(index, "<u4").tobytes(),
        positions=np.array(positions, "<i4").tobytes(),
        phases=np.array(phases, "u1").tobytes(),
        values=np.array(values, "<f4").tobytes(),
        finished_request_ids=draw(st.lists(st.sampled_from(requests) | st.text(), max_size=3)),
        dropped_total=draw(st.dictionaries(st.text(max_size=12), st.integers(0, 2**64 - 1))),
        step_tokens=[cut, n - cut] if len(steps) == 2 and draw(st.booleans()) else [],
        traceparents=draw(st.dictionaries(st.sampled_from(requests), st.text(max_size=60))),
    )
    return message.SerializeToString()


@SETTINGS
@given(hostile_batches())
def test_hostile_batches_are_accepted_or_rejected_within_the_caps(raw):
    HANDLER.outcome(raw)


def test_short_fuzz_run_finds_no_crash_and_writes_its_figures(tmp_path):
    output = tmp_path / "fuzz.json"
    arguments = ["--examples", "3000", "--wire-share", "0.1", "--output", str(output)]
    assert fuzz_ingest.main(arguments) == 0
    result = json.loads(output.read_text())
    assert result["examples"] == 3000 and result["crashes"] == 0
    local, wire = result["in_process"], result["over_wire"]
    assert set(local["by_kind"]) == set(fuzz_ingest.KINDS)
    assert local["outcomes"]["accepted"] > 100  # the well-formed share got through
    assert wire["status_codes"] == {"OK": 1, "UNAUTHENTICATED": 1, "RESOURCE_EXHAUSTED": 1}
    assert wire["alive_after"] and local["request_ids_in_metrics"] == 0
    assert result["peak_rss_mib"] > 0
