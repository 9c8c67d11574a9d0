"""The probe's shipper against a real ``circuitwatch serve`` it can kill, stop and restart.

The figure that matters is the time from a restarted sidecar accepting connections to the
first batch it receives from a shipper that kept submitting throughout the outage: it must
be under a second whatever the outage was (long, a stale socket file left behind, a sidecar
that was SIGSTOPped and continued).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from test_probe_shipper import Step, resolve, wait_until

from sidecar.probe.host.shipper import KEEPALIVE_TIME_MS, Shipper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks._sidecar_process import SidecarProcess  # noqa: E402

OUTAGE_S = 6.0  # longer than the shipper's old backoff cap (5 s)
RECONNECT_LIMIT_S = 1.0


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


def reconnect_after(
    serve: SidecarProcess, socket_path: Path, outage_s: float
) -> tuple[SidecarProcess, float]:
    """Kill ``serve``, wait ``outage_s`` and restart it on the same path; returns the new
    sidecar and the seconds from it accepting connections to its first batch."""
    serve.kill()
    assert socket_path.exists()  # SIGKILL leaves the socket file behind: the new one must rebind
    time.sleep(outage_s)
    serve = SidecarProcess(socket_path)
    accepted = serve.wait_accepting()
    return serve, serve.wait_first_batch() - accepted


def test_batches_flow_within_a_second_of_a_restart_after_a_long_outage(socket_path):
    serve = SidecarProcess(socket_path)
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
    serve = SidecarProcess(socket_path)
    submitting = Submitting(f"unix://{socket_path}")
    shipper = submitting.shipper
    figures = []
    try:
        serve.wait_accepting()
        serve.wait_first_batch()
        for _ in range(2):
            serve.pause()
            stopped = time.monotonic()
            # Keepalive ends the stream that flow control would otherwise hold forever.
            assert wait_until(lambda: not shipper.stats().connected, timeout_s=5)
            noticed = time.monotonic() - stopped
            time.sleep(max(0.0, 4.0 - noticed))
            label = submitting.label = f"continued-{len(figures)}"
            serve.resume()
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
    serve = SidecarProcess(path)
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
