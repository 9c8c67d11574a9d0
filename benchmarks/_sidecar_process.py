"""``circuitwatch serve`` as a separate process that a test or the soak kills, stops and restarts.

It is watched from outside, as an operator would: whether its Unix socket accepts
connections, and its ``/metrics``. Counters are read generically (``counters(scrape,
pattern)``) so that the soak reports whatever drop and error counters the sidecar exports;
tests read one metric's samples by name and labels (``samples``, ``value``).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks._processes import rss_bytes
from sidecar.models.registry import REFERENCE_SPEC
from sidecar.monitoring import free_port, stop_process

BATCHES = "circuitwatch_batches_received_total"
TOKENS = "circuitwatch_tokens_sampled_total"
SCORED = "circuitwatch_requests_scored_total"
# Counters whose name says they count lost or refused work, whatever they are called.
DROP_PATTERN = re.compile(r"^circuitwatch_\w*(drop|error|reject)\w*_total$")
ACCEPT_POLL_S = 0.002  # how finely wait_accepting times the socket's first accept

Scrape = dict[str, float]  # "name{label="value",...}" -> value
Labels = dict[str, str]


class SidecarProcess:
    """One ``circuitwatch serve`` incarnation on ``socket_path`` (scoring with ``spec``), with
    /metrics on ``port`` (a free one if not given) and its output appended to ``log``
    (discarded if not given)."""

    def __init__(
        self,
        socket_path: Path,
        spec: Path = REFERENCE_SPEC,
        port: int | None = None,
        log: Path | None = None,
    ):
        self.socket_path = socket_path
        self.port = free_port() if port is None else port
        self.metrics_url = f"http://127.0.0.1:{self.port}/metrics"
        self._log = open(log, "a") if log is not None else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "serve", "--spec", str(spec),
             "--listen", f"unix://{socket_path}", "--metrics-host", "127.0.0.1",
             "--metrics-port", str(self.port), "--log-level", "WARNING"],
            stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.paused = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def accepting(self) -> bool:
        """True once a connect to the socket succeeds (the kernel accepts it for the server)."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket_path))
                return True
            except OSError:
                return False

    def wait_accepting(self, timeout_s: float = 60.0) -> float:
        """Polls the socket every ``ACCEPT_POLL_S``; the monotonic time it first accepted."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"circuitwatch serve exited with {self.process.returncode}")
            if self.accepting():
                return time.monotonic()
            time.sleep(ACCEPT_POLL_S)
        raise TimeoutError(f"circuitwatch serve did not accept connections in {timeout_s:.0f} s")

    def _read(self, timeout_s: float) -> list[tuple[str, Labels, float]] | None:
        """(name, labels, value) of every sample on /metrics; None when it does not answer
        (stopped, starting, gone)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as response:
                text = response.read().decode()
        except OSError:
            return None
        return [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def scrape(self, timeout_s: float = 2.0) -> Scrape | None:
        """Every sample of /metrics by name and labels; None when it does not answer."""
        found = self._read(timeout_s)
        if found is None:
            return None
        return {_key(name, labels): value for name, labels, value in found}

    def samples(self, name: str, **labels: str) -> list[tuple[Labels, float]]:
        """(labels, value) of the samples of metric ``name`` whose labels include ``labels``;
        [] when /metrics does not answer."""
        wanted = labels.items()
        return [
            (have, value)
            for found, have, value in self._read(2.0) or []
            if found == name and wanted <= have.items()
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of those samples; None if there are none (or /metrics does not answer)."""
        found = self.samples(name, **labels)
        return sum(value for _, value in found) if found else None

    def batches(self, model_name: str | None = None) -> float:
        """Batches received; only those labelled ``model_name`` if given."""
        labels = {} if model_name is None else {"model_name": model_name}
        return self.value(BATCHES, **labels) or 0.0

    def wait_first_batch(self, timeout_s: float = 30.0) -> float:
        """Polls /metrics every 10 ms; the monotonic time a batch was first counted."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.batches() > 0:
                return time.monotonic()
            time.sleep(0.01)
        raise AssertionError("no batch reached the sidecar")

    def rss_mib(self) -> dict[str, float]:
        size = rss_bytes(self.pid) if self.alive() else None
        return {} if size is None else {"sidecar": size / 2**20}

    def kill(self) -> None:
        """SIGKILL: its socket file stays behind, as after a crash."""
        self.process.kill()
        # Generous: on a loaded 2-core machine a killed process has been seen to take over
        # 10 s to be reaped (the 30-minute soak died on that once).
        self.process.wait(120)
        self._close_log()

    def pause(self) -> None:
        """SIGSTOP: frozen, its connections open and unread."""
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """SIGTERM (continued first if paused), SIGKILL if it has not exited within 10 s."""
        if self.alive():
            self.resume()  # harmless if it was not stopped
            stop_process(self.process, timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()  # closing twice is harmless


def _key(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def counters(scrape: Scrape, pattern: re.Pattern | str) -> Scrape:
    """The samples whose metric name matches ``pattern`` (a name, or a compiled pattern)."""
    if isinstance(pattern, str):
        return {k: v for k, v in scrape.items() if k.split("{", 1)[0] == pattern}
    return {k: v for k, v in scrape.items() if pattern.match(k.split("{", 1)[0])}


def books(scrape: Scrape) -> Scrape:
    """What the soak keeps of a reading: batches, tokens, requests, drops and errors (the
    score histograms are left out)."""
    found = counters(scrape, DROP_PATTERN)
    for name in (BATCHES, TOKENS, SCORED):
        found.update(counters(scrape, name))
    return found


def total(scrape: Scrape | None, name: str) -> float:
    """The sum of a metric's samples over all labels (0 when not exported or no scrape)."""
    return sum(counters(scrape, name).values()) if scrape else 0.0
