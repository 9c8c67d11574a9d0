"""The probe's shipper against a real ``circuitwatch serve`` it can kill, stop and restart.

The figure that matters is the time from a restarted sidecar accepting connections to the
first batch it receives from a shipper that kept submitting throughout the outage: it must
be under a second whatever the outage was (long, a stale socket file left behind, a sidecar
that was SIGSTOPped and continued).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_probe_shipper import Step, resolve, wait_until

from sidecar.probe.host.shipper import KEEPALIVE_TIME_MS, Shipper

SPEC = Path(__file__).parents[1] / "sidecar" / "models" / "reference_spec" / "spec.yaml"
OUTAGE_S = 6.0  # longer than the shipper's old backoff cap (5 s)
RECONNECT_LIMIT_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """``circuitwatch serve`` in a subprocess, observed from outside like an operator would."""

    def __init__(self, socket_path: Path, *extra: str):
        self.socket_path = socket_path
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar.cli",
                "serve",
                "--spec",
                str(SPEC),
                "--listen",
                f"unix://{socket_path}",
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                str(self.port),
                "--log-level",
                "WARNING",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def accepting(self) -> bool:
        """True once a connect to the socket succeeds (the kernel accepts it for us)."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket_path))
                return True
            except OSError:
                return False

    def wait_accepting(self, timeout_s: float = 60.0) -> float:
        """Polls the socket every 2 ms; returns the monotonic time it first accepted."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "circuitwatch serve exited"
            if self.accepting():
                return time.monotonic()
            time.sleep(0.002)
        raise AssertionError("circuitwatch serve did not accept connections in time")

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every sample of metric ``name`` on /metrics; [] if unreachable."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1) as r:
                text = r.read().decode()
        except OSError:
            return []
        return [
            (sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]

    def batches(self, model_name: str | None = None) -> float:
        """Batches received, from /metrics; only those labelled ``model_name`` if given."""
        return sum(
            value
            for labels, value in self.samples("circuitwatch_batches_received_total")
            if model_name in (None, labels["model_name"])
        )

    def wait_first_batch(self, timeout_s: float = 30.0) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.batches() > 0:
                return time.monotonic()
            time.sleep(0.01)
        raise AssertionError("no batch reached the sidecar")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Submitting:
    """A shipper fed one step every 10 ms from its own thread, as a busy engine would.

    Batches are labelled (as their model name) with ``label`` as it is when they are built,
    so the sidecar's per-model batch count tells batches built after a moment from those
    built before it and stuck in a dead connection."""

    def __init__(self, endpoint: str):
        self.label = "tiny"
        self.shipper = Shipper(endpoint, self._resolve, capacity=64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()

    def _resolve(self, steps: list[Step]):
        batch = resolve(steps)
        batch.model_name = self.label
        return batch

    def _feed(self) -> None:
        step = 0
        while not self._stop.wait(0.01):
            step += 1
            self.shipper.submit(Step(step))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.shipper.close(timeout_s=2)


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "ingest.sock"


def reconnect_after(serve: Serve, socket_path: Path, outage_s: float) -> tuple[Serve, float]:
    """Kill ``serve``, wait ``outage_s`` and restart it on the same path; returns the new
    sidecar and the seconds from it accepting connections to its first batch."""
    serve.kill()
    assert socket_path.exists()  # SIGKILL leaves the socket file behind: the new one must rebind
    time.sleep(outage_s)
    serve = Serve(socket_path)
    accepted = serve.wait_accepting()
    return serve, serve.wait_first_batch() - accepted


def test_batches_flow_within_a_second_of_a_restart_after_a_long_outage(socket_path):
    serve = Serve(socket_path)
    submitting = Submitting(f"unix://{socket_path}")
    figures = []
    try:
        serve.wait_accepting()
        serve.wait_first_batch()
        for _ in range(2):
            serve, seconds = reconnect_after(serve, socket_path, OUTAGE_S)
            figures.append(seconds)
        print(f"reconnect after a {OUTAGE_S:.0f} s outage: {figures}")
        assert max(figures) < RECONNECT_LIMIT_S, figures
    finally:
        submitting.close()
        serve.stop()


def test_a_stopped_sidecar_is_noticed_and_batches_flow_within_a_second_of_it_continuing(
    socket_path,
):
    serve = Serve(socket_path)
    submitting = Submitting(f"unix://{socket_path}")
    shipper = submitting.shipper
    figures = []
    try:
        serve.wait_accepting()
        serve.wait_first_batch()
        for _ in range(2):
            serve.process.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            # Keepalive ends the stream that flow control would otherwise hold forever.
            assert wait_until(lambda: not shipper.stats().connected, timeout_s=5)
            noticed = time.monotonic() - stopped
            time.sleep(max(0.0, 4.0 - noticed))
            label = submitting.label = f"continued-{len(figures)}"
            serve.process.send_signal(signal.SIGCONT)
            continued = time.monotonic()
            assert wait_until(lambda label=label: serve.batches(label) > 0, timeout_s=10)
            figures.append((round(noticed, 3), round(time.monotonic() - continued, 3)))
        print(f"stopped sidecar (noticed after s, streaming again after s): {figures}")
        assert max(again for _, again in figures) < RECONNECT_LIMIT_S, figures
        assert max(noticed for noticed, _ in figures) < 3.0, figures
    finally:
        submitting.close()
        serve.stop()


def test_a_stream_is_not_closed_for_its_keepalive_pings(tmp_path):
    """The sidecar permits the probe's pings: one stream carries batches for many seconds."""
    path = tmp_path / "ingest.sock"
    serve = Serve(path)
    submitting = Submitting(f"unix://{path}")
    try:
        serve.wait_accepting()
        serve.wait_first_batch()
        time.sleep(6 * KEEPALIVE_TIME_MS / 1000)
        stats = submitting.shipper.stats()
        assert stats.connected and stats.streams == 1
    finally:
        submitting.close()
        serve.stop()
