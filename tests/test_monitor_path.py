"""The behaviour-monitor path a CI job runs: probe-train -> calibrate -> serve, on SmolLM2.

A tiny run of each real command (``circuitwatch probe-train`` on 40 requests at three
layers, ``circuitwatch calibrate`` on 30 benign requests), then the real sidecar serving the
calibrated spec over gRPC. No engine: the component values an engine would send are the
offline ReferenceScorer's, on the held-out requests' rendered tokens, sent through the real
ingest as a probe sends them (one stream, one batch a step, then the finished ids). The
sidecar's verdict on each request must be the offline one (``aggregate`` of the reference
scores against the calibrated threshold); the live equivalent is test_monitor_live.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_server_grpc import send

from sidecar.cli import main
from sidecar.discover import datasets
from sidecar.discover.probe_train import Roles
from sidecar.discover.scorer import ReferenceScorer
from sidecar.protocol.batch import PROMPT, TokenBatch
from sidecar.server.records import CLEAR, FLAGGED, CollectingSink
from sidecar.server.service import Sidecar
from sidecar.spec.aggregation import aggregate
from sidecar.spec.load import load_spec

SITES = [f"blocks.{layer}.hook_resid_post" for layer in (3, 9, 15)]
PHASE = "prompt"
FPR = 0.1  # 30 calibration requests: at most 3 above the threshold


def training_set() -> list[datasets.Example]:
    """20 per class (4 of them validating), 30 benign for the threshold, 6 + 6 held out."""
    roles = Roles()
    chosen = []
    for pool in (datasets.donotanswer(["malicious_uses"]), datasets.composed_benign("train")):
        for role, count in (("train", 16), ("validation", 4)):
            chosen += [e for e in pool if roles.role(e) == role][:count]
    chosen += datasets.composed_benign("calibration", 30)
    return chosen + datasets.harmbench()[:6] + datasets.composed_benign("test", 6)


def served_requests() -> list[datasets.Example]:
    """Held-out requests the served monitor judges: harmful, benign and harmful-sounding safe."""
    return (
        datasets.harmbench()[6:12]
        + datasets.composed_benign("test")[6:12]
        + (datasets.tricky_benign()[:4])
    )


def probe_batches(spec_hash: str, model_name: str, values: list[np.ndarray]) -> list[TokenBatch]:
    """Each request's prompt in one step (as a prefill), every request finished in the last."""
    request_ids = [f"req-{i}" for i in range(len(values))]
    k = values[0].shape[1]
    batches = []
    for step, (request_id, rows) in enumerate(zip(request_ids, values, strict=True)):
        batches.append(
            TokenBatch(
                spec_hash=spec_hash,
                model_name=model_name,
                steps=(step,),
                component_ids=np.arange(k, dtype=np.uint32),
                request_ids=[request_id],
                request_index=np.zeros(len(rows), dtype=np.uint32),
                positions=np.arange(len(rows), dtype=np.int32),
                phases=np.full(len(rows), PROMPT, dtype=np.uint8),
                values=rows.astype(np.float32),
            )
        )
    empty = dict(request_index=np.zeros(0, np.uint32), positions=np.zeros(0, np.int32),
                 phases=np.zeros(0, np.uint8), values=np.zeros((0, k), np.float32))  # fmt: skip
    batches.append(
        TokenBatch(
            spec_hash=spec_hash,
            model_name=model_name,
            steps=(len(values),),
            component_ids=np.arange(k, dtype=np.uint32),
            request_ids=[],
            finished_request_ids=request_ids,
            **empty,
        )  # fmt: skip
    )
    return batches


def test_probe_train_calibrate_serve(smollm2_dir, tmp_path):
    timings = {}
    started = time.monotonic()
    data = datasets.write_jsonl(tmp_path / "train.jsonl", training_set())
    out = tmp_path / "monitor"
    argv = ["probe-train", "--data", str(data), "--out", str(out), "--sites", *SITES,
            "--report-only"]  # fmt: skip
    assert main(argv) == 0
    timings["probe-train"] = time.monotonic() - started
    spec_path = out / "spec.yaml"
    assert load_spec(spec_path, model_dir=smollm2_dir).circuits[0].verdict_thresholds == ()

    started = time.monotonic()
    benign = out / "benign_calibration.jsonl"  # probe-train writes its calibration split there
    argv = ["calibrate", "--spec", str(spec_path), "--benign", str(benign), "--fpr", str(FPR)]
    assert main(argv) == 0
    timings["calibrate"] = time.monotonic() - started
    spec = load_spec(spec_path, model_dir=smollm2_dir)
    (circuit,) = spec.circuits
    threshold = circuit.verdict_threshold(PHASE)
    assert threshold is not None and circuit.calibration is not None

    started = time.monotonic()
    scorer = ReferenceScorer(spec, smollm2_dir)
    requests = served_requests()
    scored = [scorer.score(e.token_ids(scorer.tokenizer), []) for e in requests]
    expected = [aggregate(s.scores[:, 0], circuit.aggregation) for s in scored]
    timings["reference"] = time.monotonic() - started

    sink = CollectingSink()
    listen = f"unix://{tmp_path}/ingest.sock"
    with Sidecar(spec, listen, metrics_port=None, sinks=[sink]) as sidecar:
        batches = probe_batches(spec.hash, "smollm2", [s.values for s in scored])
        summary = send(sidecar.address, batches)
        records = {r.request_id: r for r in sink.wait_for(len(requests), timeout=10)}
    assert (summary.batches_accepted, summary.batches_rejected) == (len(batches), 0)

    verdicts = []
    for i, (example, offline) in enumerate(zip(requests, expected, strict=True)):
        stats = records[f"req-{i}"].phase(PHASE).circuit(circuit.name)
        assert stats.aggregate == pytest.approx(offline, rel=1e-5, abs=1e-4)
        assert stats.verdict == (FLAGGED if offline > threshold else CLEAR), (example, offline)
        verdicts.append((example.source, stats.verdict))
    # Not a constant monitor: some held-out harmful request is flagged, some benign one clear.
    assert ("harmbench", FLAGGED) in verdicts and ("benign/test", CLEAR) in verdicts, verdicts
    print(f"\n{circuit.name} ({circuit.aggregation.kind.value}) threshold {threshold:.4g}: "
          f"{verdicts}\n" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))  # fmt: skip
