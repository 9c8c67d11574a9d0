"""TCP ingest authenticates its clients: mutual TLS or a bearer token, else UNAUTHENTICATED.

Real servers, real TLS (a throwaway CA made per module), the probe's own channel code, and
``circuitwatch serve`` refusing an unauthenticated TCP listener.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server_grpc import Engine, make_spec
from tls_certs import Authority

from sidecar.probe.config import ProbeConfig
from sidecar.probe.host.channel import ChannelSecurity, open_channel
from sidecar.probe.host.shipper import Shipper
from sidecar.protocol.batch import GENERATED, to_message
from sidecar.protocol.circuitwatch.v1 import ingest_pb2
from sidecar.server.auth import IngestAuth, check_listener
from sidecar.server.records import CollectingSink
from sidecar.server.service import Sidecar

TOKEN = "s3cret-token"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def pki():
    ca, rogue = Authority("circuitwatch-test-ca"), Authority("someone-else")
    return {"ca": ca, "server": ca.server(), "client": ca.client(), "rogue": rogue.client()}


def one_batch() -> bytes:
    engine = Engine()
    batch = engine.batch([("r", 0, GENERATED), ("r", 1, GENERATED)], finished=["r"])
    return to_message(batch).SerializeToString()


def stream(address: str, security: ChannelSecurity | None) -> ingest_pb2.StreamSummary:
    with open_channel(address, (), security) as channel:
        call = channel.stream_unary(
            "/circuitwatch.v1.Ingest/Stream",
            response_deserializer=ingest_pb2.StreamSummary.FromString,
        )
        return call(iter([one_batch()]), timeout=10)


def refused(address: str, security: ChannelSecurity | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        stream(address, security)
    return info.value.code()


def counted_refusals(sidecar: Sidecar) -> float:
    errors = "circuitwatch_ingest_errors_total"
    return sidecar.registry.get_sample_value(errors, {"reason": "unauthenticated"}) or 0.0


def test_mutual_tls_lets_in_only_clients_with_a_certificate_from_the_ca(pki):
    ca, server, client, rogue = pki["ca"], pki["server"], pki["client"], pki["rogue"]
    auth = IngestAuth(server.cert, server.key, client_ca=ca.pem)
    with Sidecar(make_spec(), "127.0.0.1:0", auth=auth) as sidecar:
        address = sidecar.address
        trusted = ChannelSecurity(ca=ca.pem, cert=client.cert, key=client.key)
        assert stream(address, trusted).batches_accepted == 1
        # Without a client certificate, or with one from another CA, or in plaintext, the
        # handshake fails: no call reaches the server.
        assert refused(address, ChannelSecurity(ca=ca.pem)) == grpc.StatusCode.UNAVAILABLE
        untrusted = ChannelSecurity(ca=ca.pem, cert=rogue.cert, key=rogue.key)
        assert refused(address, untrusted) == grpc.StatusCode.UNAVAILABLE
        assert refused(address, None) == grpc.StatusCode.UNAVAILABLE
        batches = sidecar.registry.get_sample_value(
            "circuitwatch_batches_received_total", {"model_name": "tiny-llama"}
        )
        assert batches == 1


def test_a_bearer_token_is_required_on_every_ingest_call_but_not_for_health(pki):
    with Sidecar(make_spec(), "127.0.0.1:0", auth=IngestAuth(token=TOKEN)) as sidecar:
        address = sidecar.address
        assert stream(address, ChannelSecurity(token=TOKEN)).batches_accepted == 1
        assert refused(address, None) == UNAUTHENTICATED
        assert refused(address, ChannelSecurity(token="guess")) == UNAUTHENTICATED
        assert refused(address, ChannelSecurity(token=TOKEN + "x")) == UNAUTHENTICATED
        assert counted_refusals(sidecar) == 3
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="circuitwatch.v1.Ingest"), timeout=10
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_token_over_tls_without_client_certificates(pki):
    ca, server = pki["ca"], pki["server"]
    auth = IngestAuth(server.cert, server.key, token=TOKEN)
    with Sidecar(make_spec(), "127.0.0.1:0", auth=auth) as sidecar:
        address = sidecar.address
        assert stream(address, ChannelSecurity(ca=ca.pem, token=TOKEN)).batches_accepted == 1
        assert refused(address, ChannelSecurity(ca=ca.pem)) == UNAUTHENTICATED
        assert counted_refusals(sidecar) == 1


def test_the_token_guards_a_unix_socket_too(tmp_path):
    listen = f"unix://{tmp_path}/ingest.sock"
    with Sidecar(make_spec(), listen, auth=IngestAuth(token=TOKEN)) as sidecar:
        assert stream(sidecar.address, ChannelSecurity(token=TOKEN)).batches_accepted == 1
        assert refused(sidecar.address, None) == UNAUTHENTICATED


def test_the_probes_shipper_streams_over_mutual_tls_from_its_environment(pki, tmp_path):
    ca, server, client = pki["ca"], pki["server"], pki["client"]
    files = {"ca.pem": ca.pem, "client.pem": client.cert, "client.key": client.key}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "token").write_text(TOKEN + "\n")
    auth = IngestAuth(server.cert, server.key, client_ca=ca.pem, token=TOKEN)
    sink = CollectingSink()
    with Sidecar(make_spec(), "127.0.0.1:0", auth=auth, sinks=[sink]) as sidecar:
        config = ProbeConfig.from_env(
            {
                "CIRCUITWATCH_SPEC": "/unused/spec.yaml",
                "CIRCUITWATCH_ENDPOINT": sidecar.address,
                "CIRCUITWATCH_TLS_CA": str(tmp_path / "ca.pem"),
                "CIRCUITWATCH_TLS_CERT": str(tmp_path / "client.pem"),
                "CIRCUITWATCH_TLS_KEY": str(tmp_path / "client.key"),
                "CIRCUITWATCH_TOKEN_FILE": str(tmp_path / "token"),
            }
        )
        engine = Engine()
        batch = engine.batch([("p", 0, GENERATED), ("p", 1, GENERATED)], finished=["p"])
        shipper = Shipper(config.endpoint, lambda _: batch, security=config.security)
        try:
            shipper.submit(_Item())
            records = sink.wait_for(1, timeout=20)
        finally:
            shipper.close()
    assert records[0].request_id == "p" and records[0].phases[0].tokens == 2
    np.testing.assert_allclose(
        records[0].phases[0].circuits[0].mean, engine.expected("p", GENERATED)[:, 0].mean(), 1e-5
    )
    assert "s3cret" not in repr(config)  # the token and key stay out of logs


class _Item:
    tokens = 2

    def discard(self) -> None:
        pass


@pytest.mark.parametrize(
    "env, problem",
    [
        ({"CIRCUITWATCH_TOKEN_FILE": "{token}"}, "readable on the network"),
        ({"CIRCUITWATCH_TLS_CERT": "{token}"}, "go together"),
        ({"CIRCUITWATCH_TLS_CERT": "{token}", "CIRCUITWATCH_TLS_KEY": "{token}"}, "needs TLS"),
        ({"CIRCUITWATCH_TLS_CA": "/no/such/ca.pem"}, "CIRCUITWATCH_TLS_CA: cannot read"),
    ],
)
def test_probe_refuses_unsafe_or_broken_channel_settings(tmp_path, env, problem):
    (tmp_path / "token").write_text(TOKEN)
    base = {"CIRCUITWATCH_SPEC": "/s.yaml", "CIRCUITWATCH_ENDPOINT": "10.1.2.3:7000"}
    env = {k: v.format(token=tmp_path / "token") for k, v in env.items()}
    with pytest.raises(ValueError, match=problem):
        ProbeConfig.from_env({**base, **env})


def test_a_token_in_plaintext_is_allowed_to_loopback_and_unix_sockets_only():
    for endpoint in ("127.0.0.1:7000", "localhost:7000", "[::1]:7000", "unix:///run/cw.sock"):
        ChannelSecurity(token=TOKEN).check(endpoint)
    for endpoint in ("10.0.0.1:7000", "sidecar.svc:7000", "[2001:db8::1]:7000"):
        with pytest.raises(ValueError, match="readable on the network"):
            ChannelSecurity(token=TOKEN).check(endpoint)


def test_server_auth_settings_are_checked():
    with pytest.raises(ValueError, match="both a certificate and its key"):
        IngestAuth(tls_cert=b"cert")
    with pytest.raises(ValueError, match="needs the server's certificate"):
        IngestAuth(client_ca=b"ca")
    with pytest.raises(ValueError, match="whitespace"):
        IngestAuth(token="two words")
    with pytest.raises(ValueError, match="--insecure"):
        check_listener("0.0.0.0:7000", IngestAuth(b"cert", b"key"), insecure=False)
    check_listener("0.0.0.0:7000", IngestAuth(), insecure=True)
    check_listener("unix:///run/cw.sock", IngestAuth(), insecure=False)
    check_listener("0.0.0.0:7000", IngestAuth(token=TOKEN), insecure=False)


SPEC = Path(__file__).parents[1] / "sidecar" / "models" / "reference_spec" / "spec.yaml"


def serve(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "sidecar.cli", "serve", "--spec", str(SPEC), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_refuses_an_unauthenticated_tcp_listener_unless_told_insecure():
    process = serve("--listen", "127.0.0.1:0", "--metrics-port", "0")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    assert "--insecure" in stderr and "TCP" in stderr


def test_serve_with_a_token_file_refuses_calls_without_it(tmp_path):
    from test_server_cli import free_port

    (tmp_path / "token").write_text(TOKEN + "\n")
    listen = f"127.0.0.1:{free_port()}"
    process = serve("--listen", listen, "--metrics-port", "0", "--metrics-host", "127.0.0.1",
                    "--token-file", str(tmp_path / "token"))  # fmt: skip
    try:
        with grpc.insecure_channel(listen) as channel:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True
            )
        assert refused(listen, None) == UNAUTHENTICATED
        summary = stream(listen, ChannelSecurity(token=TOKEN))
        assert summary.batches_rejected == 1  # the reference spec's hash, not this test's
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
