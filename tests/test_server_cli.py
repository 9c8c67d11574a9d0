"""``circuitwatch serve`` as a process: refuses bad specs, serves a good one, stops on SIGTERM."""

import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]

SPEC = """\
version: 1
model:
  name: cli-model
  hash: "sha256:{zeros}"
components:
  - name: l0h1
    kind: head
    site: blocks.0.attn.hook_z
    head: 1
circuits:
  - name: only
    components: {{l0h1: 1.0}}
    threshold: 2.0
""".format(zeros="0" * 64)


def serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "serve", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "content, field",
    [(None, "not found"), (SPEC.replace("head: 1", "head: one"), "components[0].head")],
)
def test_bad_spec_exits_2_naming_the_file(tmp_path, content, field):
    spec = tmp_path / "missing.yaml"
    if content is not None:
        spec.write_text(content)
    process = serve("--spec", str(spec), "--listen", f"unix://{tmp_path}/s.sock")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    assert str(spec) in stderr and field in stderr
    assert not (tmp_path / "s.sock").exists()


def test_serves_health_and_metrics_then_stops_on_sigterm(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    listen, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    process = serve(
        "--spec", str(spec), "--listen", listen, "--metrics-port", str(metrics_port),
        "--metrics-host", "127.0.0.1", "--insecure",
    )  # fmt: skip
    try:
        with grpc.insecure_channel(listen) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="circuitwatch.v1.Ingest")
            response = health.Check(request, timeout=60, wait_for_ready=True)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'circuitwatch_build_info{model_hash="sha256:' in text
        assert 'model_name="cli-model"' in text
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "stopping" in stderr


def test_unusable_listen_address_exits_1(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    process = serve("--spec", str(spec), "--listen", "unix:///nonexistent-dir/x.sock",
                    "--metrics-port", "0")  # fmt: skip
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert "cannot serve" in stderr
