"""The ingest benchmark end to end at tiny sizes: a real sidecar subprocess, real gRPC streams."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from sidecar.protocol.batch import GENERATED, PROMPT, from_message
from sidecar.protocol.circuitwatch.v1 import ingest_pb2

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of scripts next to the package, run as ``python -m benchmarks.X``
# from the repository root; it is not installed, so the tests import it from there too.
sys.path.insert(0, str(REPO))
from benchmarks._traffic import SPEC_HEADS, EngineTraffic, Workload  # noqa: E402


def decode(message: bytes):
    return from_message(ingest_pb2.SampleBatch.FromString(message), len(SPEC_HEADS))


def test_traffic_finishes_every_request_once_after_all_its_tokens():
    workload = Workload(batch_tokens=64, concurrency=16, request_tokens=8, prompt_tokens=3)
    traffic = EngineTraffic(workload, "sha256:" + "1" * 64, prefix="t-")
    seen: dict[str, list[int]] = {}
    finished: list[str] = []
    for _ in range(12):
        message, done = traffic.next_message()
        batch = decode(message)
        assert batch.num_tokens == 64 and batch.finished_request_ids == done
        for i, request_id in enumerate(batch.request_ids):
            rows = batch.request_index == i
            seen.setdefault(request_id, []).extend(batch.positions[rows].tolist())
            expected = np.where(batch.positions[rows] < 3, PROMPT, GENERATED)
            assert (batch.phases[rows] == expected).all()
        finished += done
    assert len(finished) == len(set(finished)) > 16  # requests were replaced and finished again
    for request_id in finished:
        assert sorted(seen[request_id])[-1] == 7  # finished with its last position
    fresh = [r for r in finished if seen[r][0] == 0]
    assert fresh and all(seen[r] == list(range(8)) for r in fresh)


def test_quick_run_scores_every_token_and_writes_results(tmp_path):
    output = tmp_path / "ingest.json"
    command = ["-m", "benchmarks.ingest", "--quick", "--sizes", "256", "1024"]
    command += ["--sustain-seconds", "2", "--output", str(output)]
    run = subprocess.run(
        [sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "token-scores/s" in run.stdout
    result = json.loads(output.read_text())
    cells = result["cells"]
    assert [(c["transport"], c["batch_tokens"]) for c in cells] == [
        ("uds", 256),
        ("uds", 1024),
        ("tcp", 256),
        ("tcp", 1024),
    ]
    for cell in cells:
        assert cell["tokens_per_s"] > 0
        assert cell["token_scores_per_s"] == cell["tokens_per_s"] * len(SPEC_HEADS)
        assert cell["finished_measured"] > 0
        assert 0 < cell["latency_s"]["p50"] <= cell["latency_s"]["p99"]
    sustained = result["sustained"]
    assert sustained["finished_measured"] > 0 and len(sustained["rss_samples_mib"]) >= 2
    assert sustained["rss_mib_start"] > 10  # a real process with torch and gRPC loaded
    assert any("sidecar/server" in spot["function"] for spot in result["hot_spots"])
    assert set(result["targets_met"]) and result["machine"]["logical_cpus"] >= 1
