"""The dashboard's and the rules' queries against a real Prometheus scraping a real sidecar.

Prometheus (Debian's `prometheus` package) scrapes a running ``Sidecar`` every second,
with the target labels the chart's monitors give it, and evaluates deploy's rules; every
dashboard query and recording rule must then return series. This catches what a name
check cannot: a label the exporter does not set, a suffix it does not expose.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from sidecar.protocol.batch import GENERATED, PROMPT, ProbeOverhead, TokenBatch, to_message
from sidecar.server.service import Sidecar
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

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SPEC_HASH = "sha256:" + "7" * 64
MODEL = "tiny-llama"
SPEC = CircuitSpec(
    path=Path("spec.yaml"),
    model=ModelIdentity(MODEL, "sha256:" + "0" * 64),
    components=(Component("l1h2", ComponentKind.HEAD, Site.parse("blocks.1.attn.hook_z"), head=2),),
    circuits=(
        Circuit(
            "induction",
            weights=(1.0,),
            threshold=1.5,
            aggregation=Aggregation(AggregationKind.EMA_MAX, alpha=0.5),
            verdict_thresholds=(("prompt", 0.0), ("generation", 1.5)),
        ),
    ),
    hash=SPEC_HASH,
)


def load_generator():
    path = DEPLOY / "dashboards" / "generate.py"
    spec = importlib.util.spec_from_file_location("circuitwatch_dashboard_generate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def requests_batch(step: int, names: list[str], spec_hash: str = SPEC_HASH) -> TokenBatch:
    """Two prompt tokens and one generated token for each request, all finished."""
    tokens = [(i, position, phase) for i in range(len(names)) for position, phase in
              ((0, PROMPT), (1, PROMPT), (2, GENERATED))]  # fmt: skip
    return TokenBatch(
        spec_hash=spec_hash,
        model_name=MODEL,
        steps=(step,),
        component_ids=np.array([0], dtype=np.uint32),
        request_ids=names,
        request_index=np.array([i for i, _, _ in tokens], dtype=np.uint32),
        positions=np.array([p for _, p, _ in tokens], dtype=np.int32),
        phases=np.array([ph for _, _, ph in tokens], dtype=np.uint8),
        values=np.linspace(-1.0, 3.0, len(tokens), dtype=np.float32)[:, None],
        finished_request_ids=names,
        dropped_total={"queue_full": 4 * step},
        # What the probe panels read: its cost, prefix-cached prompt tokens, its faults
        # (counted from the second batch on, when the running total first grows).
        overhead=ProbeOverhead(0.001 * step, 0.1 * step, 0.005, 1.0, 0.001),
        prefix_cached_tokens={names[0]: 2},
        probe_errors_total={"drain_collect": step - 1},
    )


def send(address: str, batches: list[TokenBatch]) -> None:
    with grpc.insecure_channel(address) as channel:
        stream = channel.stream_unary("/circuitwatch.v1.Ingest/Stream")
        stream(iter(to_message(b).SerializeToString() for b in batches), timeout=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Prometheus:
    """A Prometheus server on loopback that scrapes one target and evaluates rules.yaml."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DEPLOY / "prometheus" / "rules.yaml")],
            "scrape_configs": [{"job_name": "circuitwatch", "static_configs": [{
                "targets": [target],
                "labels": {"circuitwatch": "sidecar", "namespace": "ml", "pod": "p1"},
            }]}],
        }  # fmt: skip
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)["data"]["result"]
        except OSError:  # not listening yet
            return []

    def wait_for(self, exprs: list[str], timeout: float) -> list[str]:
        """Polls until every expression returns series; answers those that never did."""
        deadline = time.monotonic() + timeout
        while True:
            empty = [expr for expr in exprs if not self.query(expr)]
            if not empty or time.monotonic() > deadline:
                return empty
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def prometheus_binary() -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not found: install Debian's `prometheus` package")


def test_dashboard_and_rules_find_series_in_a_real_scrape(prometheus_binary, tmp_path) -> None:
    generator = load_generator()
    dashboard_exprs = [
        expr.replace("$__rate_interval", "1m")
        .replace('"$model_name"', '".+"')
        .replace('"$circuit"', '"induction"')
        for expr in generator.queries(generator.build_dashboard())
    ]
    recorded = [
        "circuitwatch:circuit_score_mean:p50_5m",
        "circuitwatch:circuit_score_mean:p95_5m",
        "circuitwatch:circuit_score_max:p95_5m",
        "circuitwatch:circuit_firing_tokens:ratio_rate5m",
        "circuitwatch:verdicts_flagged:ratio_rate5m",
        "circuitwatch:samples_dropped:ratio_rate5m",
    ]
    listen = f"unix://{tmp_path}/ingest.sock"
    with Sidecar(SPEC, listen, metrics_port=0, metrics_host="127.0.0.1") as sidecar:
        send(sidecar.address, [requests_batch(1, ["a", "b"])])
        prometheus = Prometheus(tmp_path, sidecar.metrics_url.split("/")[2])
        try:
            assert not prometheus.wait_for(['up{circuitwatch="sidecar",pod="p1"} == 1'], 30)
            # Counters must grow between scrapes for rate() to see them.
            send(sidecar.address, [requests_batch(2, ["c", "d"]), requests_batch(3, ["e"], "x")])
            empty = prometheus.wait_for(dashboard_exprs + recorded, timeout=30)
        finally:
            prometheus.stop()
    assert not empty, f"no series for: {empty}"
