"""The bundled harmful-request monitor served live: its verdicts equal the offline ones.

sidecar/models/smollm2_harm_spec (whatever it holds now: site, aggregation and threshold are
read from it) on the package's engine (conftest.py): vLLM's OpenAI server in its default
dtype (bfloat16 on CPU) and compiled mode, with the plugin and the real sidecar in this
process, tapping the served spec, which holds the monitor's circuit beside those of
test_live_smollm2. Held-out chats go through the real ``openai`` client: HarmBench requests,
benign requests of the test templates and topics, and harmful-sounding safe ("tricky")
requests; none of them trained the probe or set its threshold. Each request's live prompt
aggregate and verdict are compared with the offline reference (ReferenceScorer in float32 +
``sidecar.spec.aggregation.aggregate``) on exactly the prompt tokens the engine ran
(``return_token_ids``).

The bfloat16 engine's aggregate may differ from the float32 reference by up to the
tolerance of test_live_smollm2 (in units of the circuit's scale, the spread of its offline
scores over every prompt token sent): a verdict must agree wherever the offline aggregate is
further than that from the threshold; inside the band either verdict is right.

Prefix caching is off on the shared engine (test_live_smollm2 compares every token), so
every prompt token is scored and the live aggregate covers what the offline one does, whatever
the aggregation. In production prefix caching is on: a cached prefix skips the forward pass,
so only ``last`` (the bundled monitor's aggregation when this was written), which reads the
final prompt token that the engine always computes, is unchanged by it; any other aggregation
covers the uncached suffix only, so serve such a monitor with ``--no-enable-prefix-caching``.
That cached tokens go unscored and the rest keep their positions is tested in
test_probe_engine (``test_prefix_cached_tokens_produce_no_samples``).
"""

from __future__ import annotations

import random
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.discover import datasets
from sidecar.discover.calibrate import calibrate
from sidecar.discover.datasets import composed_benign, harmbench, tricky_benign
from sidecar.discover.engine_runs import LiveEngine
from sidecar.models.registry import SMOLLM2_HARM_SPEC
from sidecar.protocol.batch import PROMPT
from sidecar.server.records import CLEAR, FLAGGED, VERDICTS, CollectingSink
from sidecar.spec.aggregation import aggregate
from sidecar.spec.load import load_spec
from sidecar.spec.schema import AggregationKind, Circuit, CircuitSpec

from .smollm2_live import BF16_MEAN, BF16_TOKEN, SERVED_NAME, chat, openai_client, records_for

pytestmark = pytest.mark.engine

MAX_TOKENS = 2  # the verdict is on the prompt; generation only has to happen
PHASE = "prompt"
COUNTS = {"harmbench": 16, "benign/test": 16, "tricky": 8}


def heldout_texts(seed: int = 0) -> list[tuple[str, str]]:
    """(source, text): a fixed random draw from each held-out set."""
    rng = random.Random(seed)
    pools = {"harmbench": harmbench(), "benign/test": composed_benign("test"),
             "tricky": tricky_benign()}  # fmt: skip
    return [
        (source, example.content)
        for source, pool in pools.items()
        for example in rng.sample(pool, COUNTS[source])
    ]


def aggregate_tolerance(circuit: Circuit, scale: float) -> float:
    """How far a bfloat16 engine's aggregate may be from the float32 reference's: a mean is
    held to test_live_smollm2's per-mean bound, anything that can rest on one token to its
    per-token bound."""
    per_unit = BF16_MEAN if circuit.aggregation.kind is AggregationKind.MEAN else BF16_TOKEN
    return per_unit * scale


@dataclass
class Live:
    circuit: Circuit
    metrics_url: str
    sink: CollectingSink
    api: str


@pytest.fixture(scope="module")
def spec(smollm2_dir):
    spec = load_spec(SMOLLM2_HARM_SPEC, model_dir=smollm2_dir)
    assert any(c.verdict_threshold(PHASE) is not None for c in spec.circuits)
    return spec


def _verdict_terms(spec: CircuitSpec, circuit: Circuit) -> tuple:
    """What decides a circuit's verdict, independent of the rest of the spec."""
    members = {spec.components[i].name: w for i, w in enumerate(circuit.weights) if w}
    return members, circuit.bias, circuit.aggregation, circuit.verdict_thresholds


@pytest.fixture(scope="module")
def live(spec, spec_path, served) -> Live:
    """The monitor's circuit on the package's engine, which serves it as the bundled spec has it."""
    circuit = next(c for c in spec.circuits if c.verdict_threshold(PHASE) is not None)
    served_spec = load_spec(spec_path)
    (served_circuit,) = [c for c in served_spec.circuits if c.name == circuit.name]
    assert _verdict_terms(served_spec, served_circuit) == _verdict_terms(spec, circuit)
    return Live(circuit, served.metrics_url, served.sink, served.api)


@pytest.fixture(scope="module")
def reference(smollm2_dir, spec):
    from sidecar.discover.scorer import ReferenceScorer

    return ReferenceScorer(spec, smollm2_dir)


def verdict_counts(url: str, circuit: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    counts = dict.fromkeys(VERDICTS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            wanted = {"circuit": circuit, "phase": PHASE, "model_name": SERVED_NAME}
            if sample.name == "circuitwatch_verdicts_total" and wanted.items() <= labels.items():
                counts[labels["verdict"]] += sample.value
    return counts


def test_live_verdicts_equal_the_offline_reference(live, reference, spec):
    circuit = live.circuit
    threshold = circuit.verdict_threshold(PHASE)
    j = [c.name for c in spec.circuits].index(circuit.name)
    texts = heldout_texts()
    before = verdict_counts(live.metrics_url, circuit.name)
    client = openai_client(live.api)
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(chat, client, f"harm-{i}", text, MAX_TOKENS)
                   for i, (_, text) in enumerate(texts)]  # fmt: skip
        ran = [f.result() for f in futures]
    records = records_for(live.sink, ran)
    print(f"\n{len(ran)} chats answered and scored in {time.monotonic() - started:.0f} s")

    offline = []  # per request: the prompt's per-token scores, float64
    for r in ran:
        scored = reference.score(r.prompt_ids, r.generated_ids)
        offline.append(scored.scores[scored.phases == PROMPT, j].astype(np.float64))
    scale = float(np.concatenate(offline).std())
    tolerance = aggregate_tolerance(circuit, scale)

    rows = []  # (source, offline aggregate, live aggregate, offline verdict, live verdict)
    for (source, _), record, scores in zip(texts, records, offline, strict=True):
        stats = record.phase(PHASE).circuit(circuit.name)
        expected = aggregate(scores, circuit.aggregation)
        rows.append((source, expected, stats.aggregate,
                     FLAGGED if expected > threshold else CLEAR, stats.verdict))  # fmt: skip
    deviation = np.array([abs(live_agg - off) for _, off, live_agg, _, _ in rows])
    clear_of_band = [row for row in rows if abs(row[1] - threshold) > tolerance]
    agreed = sum(row[3] == row[4] for row in rows)
    print(f"circuit {circuit.name!r}: {circuit.aggregation.kind.value} of the prompt, threshold "
          f"{threshold:.4g}, scale {scale:.4g}, tolerance {tolerance:.4g}")  # fmt: skip
    print(
        f"|live - offline| aggregate: median {np.median(deviation):.4g}, "
        f"max {deviation.max():.4g} ({deviation.max() / scale:.3f} of the scale)"
    )
    print(
        f"verdicts agree on {agreed}/{len(rows)} ({agreed / len(rows):.1%}); "
        f"{len(rows) - len(clear_of_band)} within the tolerance band of the threshold"
    )
    for source in COUNTS:
        mine = [row for row in rows if row[0] == source]
        flagged = sum(row[4] == FLAGGED for row in mine)
        print(f"  {source:<12} flagged live {flagged}/{len(mine)}")

    assert all(row[4] in VERDICTS for row in rows)
    assert (deviation <= tolerance).all(), (tolerance, rows)
    for row in clear_of_band:
        assert row[3] == row[4], row
    # The comparison has teeth: the threshold falls among these requests.
    assert {row[3] for row in rows} == set(VERDICTS), rows

    # The verdict counter counts exactly these requests, each under its live verdict.
    after = verdict_counts(live.metrics_url, circuit.name)
    for verdict in VERDICTS:
        assert after[verdict] - before[verdict] == sum(row[4] == verdict for row in rows)


def test_calibrate_through_the_engine_sets_thresholds_on_live_aggregates(
    live, reference, spec, spec_path, tmp_path
):
    """``calibrate --engine`` on the package's engine, calibrating (a copy of) the spec it
    serves, as an operator calibrates the spec their engine taps: 12 benign chats set the
    monitor's threshold (FPR 0.1: one above it), 4 others check it. The threshold is one of
    the sidecar's live aggregates of those 12, and within the bfloat16 tolerance of the
    offline reference's."""
    circuit = live.circuit
    folder = tmp_path / "spec"
    shutil.copytree(spec_path.parent, folder)
    benign = datasets.composed_benign("calibration", 12, seed=5)
    benign_file = datasets.write_jsonl(tmp_path / "benign.jsonl", benign)
    heldout_file = datasets.write_jsonl(tmp_path / "held.jsonl", datasets.twin_benign("test")[:4])
    engine = LiveEngine(load_spec(spec_path), openai_client(live.api), live.sink, SERVED_NAME)
    earlier = len(live.sink.records)  # other tests' requests, on the same engine
    path, rows = calibrate(
        folder / "spec.yaml", benign_file, 0.1, heldout_path=heldout_file, engine=engine
    )
    calibrated = next(c for c in load_spec(path).circuits if c.name == circuit.name)
    record = calibrated.calibration
    assert record.data == "benign.jsonl (live engine)" and record.requests == 12
    assert dict(record.achieved_fpr) == {"prompt": pytest.approx(1 / 12)}
    (row,) = [r for r in rows if r.circuit == circuit.name]
    assert row.heldout.requests == 4
    threshold = calibrated.verdict_threshold(PHASE)

    live_values = [
        r.phase(PHASE).circuit(circuit.name).aggregate
        for r in live.sink.records[earlier:]
        if r.phase(PHASE) is not None
    ]
    # the spec keeps 6 significant digits
    assert min(abs(v - threshold) for v in live_values) <= 1e-5 * max(1.0, abs(threshold))
    j = [c.name for c in spec.circuits].index(circuit.name)
    offline = [
        reference.score(e.token_ids(reference.tokenizer)).scores[:, j].astype(np.float64)
        for e in benign
    ]
    expected = sorted(aggregate(s, circuit.aggregation) for s in offline)[-2]
    tolerance = aggregate_tolerance(circuit, float(np.concatenate(offline).std()))
    print(f"\nlive threshold {threshold:.4g}, offline {expected:.4g}, tolerance {tolerance:.3g}")
    assert abs(threshold - expected) <= tolerance
