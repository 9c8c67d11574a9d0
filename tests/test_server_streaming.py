"""Streaming aggregations and verdicts: the request table's numbers equal the definition.

``sidecar.spec.aggregation.aggregate`` over a phase's scores in token order is the truth;
the table sees the same scores cut into batches at random places, rows shuffled within
a batch (positions give the order), requests interleaved and slots reused.
"""

import numpy as np
import pytest

from sidecar.server.records import CLEAR, FLAGGED
from sidecar.server.requests import RequestTable
from sidecar.spec.aggregation import aggregate
from sidecar.spec.schema import PHASE_NAMES, Aggregation, AggregationKind, Circuit

KINDS = AggregationKind
SEEDS = 300


def random_aggregations(rng: np.random.Generator) -> list[Aggregation]:
    # With a window longer than any phase the ring is longer than the other windows need;
    # without it the random window sets the ring's length, and its oldest entry is read.
    longest = 40 if rng.random() < 0.5 else int(rng.integers(2, 12))
    return [
        Aggregation(KINDS.MEAN),
        Aggregation(KINDS.MAX),
        Aggregation(KINDS.LAST),
        Aggregation(KINDS.EMA_MAX, alpha=float(rng.uniform(0.01, 1.0))),
        Aggregation(KINDS.EMA_MAX, alpha=1.0),
        Aggregation(KINDS.MAX_ROLLING_MEAN, window=1),
        Aggregation(KINDS.MAX_ROLLING_MEAN, window=int(rng.integers(2, 12))),
        Aggregation(KINDS.MAX_ROLLING_MEAN, window=longest),
        Aggregation(KINDS.SOFTMAX_MAX, temperature=float(10 ** rng.uniform(-2, 1))),
    ]


def make_circuits(aggregations: list[Aggregation], rng: np.random.Generator) -> list[Circuit]:
    circuits = []
    for i, aggregation in enumerate(aggregations):
        phases = [p for p in PHASE_NAMES if rng.random() < 0.7]
        thresholds = tuple((p, float(rng.normal(0.5, 0.5))) for p in phases)
        circuits.append(Circuit(f"c{i}", (1.0,), aggregation=aggregation,
                                verdict_thresholds=thresholds))  # fmt: skip
    return circuits


def chunks(length: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Positions 0..length-1 cut into consecutive runs of random size."""
    cuts = np.flatnonzero(rng.random(length - 1) < 0.3) + 1
    return np.split(np.arange(length), cuts)


def expected(circuit: Circuit, phase: str, scores: np.ndarray) -> tuple[float, str | None]:
    value = aggregate(scores, circuit.aggregation)
    threshold = circuit.verdict_threshold(phase)
    return value, None if threshold is None else FLAGGED if value > threshold else CLEAR


def check_record(record, circuits, prompt_length: int, scores: np.ndarray) -> None:
    parts = {"prompt": scores[:prompt_length], "generation": scores[prompt_length:]}
    assert [p.phase for p in record.phases] == [p for p in PHASE_NAMES if len(parts[p])]
    for stats in record.phases:
        assert stats.tokens == len(parts[stats.phase])
        for c, circuit in enumerate(circuits):
            got = stats.circuit(circuit.name)
            value, verdict = expected(circuit, stats.phase, parts[stats.phase][:, c])
            assert got.aggregate == pytest.approx(value, rel=1e-9, abs=1e-9), (
                circuit.aggregation,
                stats.phase,
            )
            if abs(value - (circuit.verdict_threshold(stats.phase) or 0.0)) > 1e-9:
                assert got.verdict == verdict


@pytest.mark.parametrize("seed", range(SEEDS))
def test_streaming_aggregates_equal_the_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    circuits = make_circuits(random_aggregations(rng), rng)
    table = RequestTable(circuits, max_requests=3)
    waiting = []
    for r in range(int(rng.integers(1, 9))):
        prompt, generated = int(rng.integers(1, 30)), int(rng.integers(0, 30))
        scale = 10 ** rng.uniform(-1, 1)
        scores = (rng.normal(size=(prompt + generated, len(circuits))) * scale).astype(np.float32)
        if rng.random() < 0.2:  # ties
            scores = np.round(scores)
        waiting.append((f"req-{seed}-{r}", prompt, scores, chunks(prompt + generated, rng)))
    live: list = []
    step = 0
    while waiting or live:
        while waiting and len(live) < table.max_requests:
            live.append(waiting.pop())
        step += 1
        names: list[str] = []
        rows = []  # (index into names, position, phase, scores)
        for name, prompt, scores, runs in live:
            if rng.random() < 0.3:  # not in this step
                continue
            names.append(name)
            take = 1 + int(rng.random() < 0.3)  # sometimes two steps gathered in one batch
            for position in np.concatenate(runs[:take]).tolist():
                rows.append((len(names) - 1, position, position >= prompt, scores[position]))
            del runs[:take]
        if rows:
            if rng.random() < 0.5:  # rows in any order: positions say which comes first
                rows = [rows[i] for i in rng.permutation(len(rows))]
            index, positions, phases, batch_scores = zip(*rows, strict=True)
            table.add(
                "tiny",
                names,
                np.array(index, np.uint32),
                np.array(positions, np.int32),
                np.array(phases, np.uint8),
                np.array(batch_scores),
                float(step),
            )
        for entry in [e for e in live if not e[3]]:
            name, prompt, scores, _ = entry
            check_record(table.finish(name, "engine"), circuits, prompt, scores)
            live.remove(entry)
    assert len(table) == 0


def test_long_prefill_in_one_batch_then_decode() -> None:
    rng = np.random.default_rng(1)
    aggregations = [
        Aggregation(KINDS.EMA_MAX, alpha=0.02),
        Aggregation(KINDS.EMA_MAX, alpha=0.9),
        Aggregation(KINDS.MAX_ROLLING_MEAN, window=64),
        Aggregation(KINDS.SOFTMAX_MAX, temperature=0.05),
        Aggregation(KINDS.LAST),
    ]
    circuits = make_circuits(aggregations, rng)
    table = RequestTable(circuits, max_requests=2)
    prompt, generated = 5000, 100
    scores = rng.normal(size=(prompt + generated, len(circuits))).astype(np.float32)
    scores[1000:1040] += 3.0  # a burst: the rolling and EMA maxima sit there
    table.add("tiny", ["r"], np.zeros(prompt, np.uint32), np.arange(prompt, dtype=np.int32),
              np.zeros(prompt, np.uint8), scores[:prompt], 0.0)  # fmt: skip
    for position in range(prompt, prompt + generated):
        table.add("tiny", ["r"], np.zeros(1, np.uint32), np.array([position], np.int32),
                  np.ones(1, np.uint8), scores[position : position + 1], 1.0)  # fmt: skip
    check_record(table.finish("r", "engine"), circuits, prompt, scores)


def test_verdict_is_flagged_only_above_the_threshold() -> None:
    circuits = [
        Circuit("at", (1.0,), verdict_thresholds=(("prompt", 2.0),)),
        Circuit("below", (1.0,), verdict_thresholds=(("prompt", 2.5), ("generation", 0.0))),
        Circuit(
            "above",
            (1.0,),
            aggregation=Aggregation(KINDS.MAX),
            verdict_thresholds=(("prompt", 2.5),),
        ),  # fmt: skip
    ]
    table = RequestTable(circuits, max_requests=1)
    table.add("tiny", ["r"], np.zeros(2, np.uint32), np.arange(2, dtype=np.int32),
              np.zeros(2, np.uint8), np.array([[1.0] * 3, [3.0] * 3], np.float32), 0.0)  # fmt: skip
    (prompt,) = table.finish("r", "engine").phases
    assert [(c.aggregate, c.verdict) for c in prompt.circuits] == [
        (2.0, CLEAR),
        (2.0, CLEAR),
        (3.0, FLAGGED),
    ]


def test_a_reused_slot_starts_from_nothing() -> None:
    circuits = [Circuit(f"c{i}", (1.0,), aggregation=a) for i, a in enumerate([
        Aggregation(KINDS.EMA_MAX, alpha=0.5),
        Aggregation(KINDS.MAX_ROLLING_MEAN, window=3),
        Aggregation(KINDS.SOFTMAX_MAX, temperature=1.0),
    ])]  # fmt: skip
    table = RequestTable(circuits, max_requests=1)
    for name, value in (("high", 9.0), ("low", -1.0)):
        table.add("tiny", [name], np.zeros(2, np.uint32), np.arange(2, dtype=np.int32),
                  np.zeros(2, np.uint8), np.full((2, 3), value, np.float32), 0.0)  # fmt: skip
        (prompt,) = table.finish(name, "engine").phases
        assert [c.aggregate for c in prompt.circuits] == pytest.approx([value] * 3)
