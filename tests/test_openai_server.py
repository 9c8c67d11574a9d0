"""The two-process setup as operators run it: `circuitwatch serve` and vLLM's OpenAI-compatible
server (default compiled mode) as separate processes, driven by the real `openai` client, both
exporting spans to one OTLP receiver (a real gRPC TraceService in this process).

One pair of servers for the module: the metrics test counts only its own requests, the
traceparent test picks its own request's spans."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest
from probe_engine_helpers import tiny_model_and_spec
from prometheus_client.parser import text_string_to_metric_families
from test_traces import PARENT_ID, TRACE_ID, TRACEPARENT, Received, grpc_receiver

from sidecar.discover.engine_runs import ENGINE_START_S

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    return urllib.request.urlopen(url, timeout=5).read().decode()


def _wait_until(check, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: {proc.args[:4]} exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def _samples(text: str, name: str) -> list:
    families = text_string_to_metric_families(text)
    return [s for family in families for s in family.samples if s.name == name]


@dataclass(frozen=True)
class Servers:
    api: str  # vLLM's OpenAI API base URL
    metrics_url: str  # the sidecar's /metrics
    spans: Received  # what both processes exported over OTLP


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both processes export spans to one OTLP gRPC receiver; vLLM's own tracing has to be on,
    or it drops a request's trace headers before they reach the plugin."""
    with (
        grpc_receiver() as (endpoint, received),
        running_servers(
            tmp_path_factory.mktemp("openai"),
            sidecar_args=("--otlp-endpoint", endpoint, "--otlp-protocol", "grpc"),
            vllm_args=("--otlp-traces-endpoint", endpoint),
        ) as (api, metrics_url),
    ):
        yield Servers(api, metrics_url, received)


@contextlib.contextmanager
def running_servers(tmp, sidecar_args=(), vllm_args=()):
    """(API base URL, sidecar /metrics URL) of `circuitwatch serve` and vLLM's OpenAI server
    on the tiny model; extra command-line arguments for each."""
    model, spec = tiny_model_and_spec(tmp)
    listen = f"unix://{tmp}/ingest.sock"
    metrics_port, api_port = _free_port(), _free_port()
    logs = {name: open(tmp / f"{name}.log", "w") for name in ("sidecar", "vllm")}
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "serve", "--spec", str(spec), "--listen", listen,
         "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1", *sidecar_args],
        stdout=logs["sidecar"], stderr=subprocess.STDOUT,
    )  # fmt: skip
    env = dict(os.environ, CIRCUITWATCH_SPEC=str(spec), CIRCUITWATCH_ENDPOINT=listen)
    vllm = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", "reference", "--host", "127.0.0.1", "--port", str(api_port),
         "--gpu-memory-utilization", "0.2", "--max-model-len", "512", "--max-num-seqs", "8",
         *vllm_args],
        env=env, stdout=logs["vllm"], stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    procs = (sidecar, vllm)
    try:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        _wait_until(lambda: _get(metrics_url), 30, "sidecar /metrics", procs)
        api = f"http://127.0.0.1:{api_port}"
        _wait_until(lambda: _get(f"{api}/health") is not None, ENGINE_START_S, "vLLM", procs)
        yield api, metrics_url
    except AssertionError:
        for name, log in logs.items():
            log.flush()
            print(f"--- {name} log ---\n{(tmp / f'{name}.log').read_text()[-4000:]}")
        raise
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        # vLLM's engine core outlives a server stopped while it starts: end its whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(vllm.pid, signal.SIGKILL)
        for log in logs.values():
            log.close()


def _engine_scored(text: str) -> float:
    done = _samples(text, "circuitwatch_requests_scored_total")
    return sum(s.value for s in done if s.labels["finished_by"] == "engine")


def _heads_counts(text: str) -> list:
    wanted = {"circuit": "heads", "aggregation": "mean"}
    samples = _samples(text, "circuitwatch_circuit_score_count")
    return [s for s in samples if wanted.items() <= s.labels.items()]


def _prompt_count(text: str) -> float:
    return sum(s.value for s in _heads_counts(text) if s.labels["phase"] == "prompt")


def _tokens_sampled(text: str) -> float:
    return sum(s.value for s in _samples(text, "circuitwatch_tokens_sampled_total"))


def test_openai_client_requests_are_scored_by_the_sidecar(servers):
    from openai import OpenAI

    before = _get(servers.metrics_url)  # the module's other requests are counted too
    client = OpenAI(base_url=f"{servers.api}/v1", api_key="unused")
    prompts = ["import os\nimport sys\n", "def main():"]
    for prompt in prompts:
        completion = client.completions.create(
            model="reference", prompt=prompt, max_tokens=8, temperature=0.0
        )
        assert completion.choices[0].text is not None
        assert completion.usage.completion_tokens > 0

    def scored() -> bool:
        return _engine_scored(_get(servers.metrics_url)) - _engine_scored(before) >= len(prompts)

    _wait_until(scored, 30, "requests scored")
    text = _get(servers.metrics_url)
    assert {s.labels["model_name"] for s in _heads_counts(text)} == {"reference"}
    assert _prompt_count(text) - _prompt_count(before) == len(prompts)
    assert _tokens_sampled(text) > _tokens_sampled(before)
    assert "vllm:" in _get(f"{servers.api}/metrics")  # vLLM's own metrics still served alongside


def _attribute(span, key: str) -> str | None:
    return next((a.value.string_value for a in span.attributes if a.key == key), None)


def test_openai_request_with_traceparent_is_joined_to_the_callers_trace(servers):
    """vLLM's OpenAI server and the sidecar export to one receiver: both spans of the request
    are children of the caller's span."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{servers.api}/v1", api_key="unused")
    completion = client.completions.create(
        model="reference",
        prompt="import os\n",
        max_tokens=4,
        temperature=0.0,
        extra_headers={"traceparent": TRACEPARENT},
    )
    assert completion.usage.completion_tokens > 0

    def of_this_request(span) -> bool:  # vLLM numbers a completion's prompts: -0
        return (_attribute(span, "gen_ai.request.id") or "").startswith(completion.id)

    by_name = servers.spans.wait_for(
        ["circuitwatch.request", "llm_request"], timeout=60, where=of_this_request
    )
    ours, vllms = by_name["circuitwatch.request"], by_name["llm_request"]
    for span in (ours, vllms):
        assert (span.trace_id.hex(), span.parent_span_id.hex()) == (TRACE_ID, PARENT_ID)
    assert _attribute(ours, "gen_ai.request.id") == _attribute(vllms, "gen_ai.request.id")
