"""``circuitwatch serve`` as a separate process that the soak kills, stops and restarts.

It is watched from outside, as an operator would: whether its Unix socket accepts
connections, and its ``/metrics``. Counters are read generically (``counters(scrape,
pattern)``) so that the soak reports whatever drop and error counters the sidecar exports.
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
from sidecar.monitoring import stop_process

BATCHES = "circuitwatch_batches_received_total"
TOKENS = "circuitwatch_tokens_sampled_total"
SCORED = "circuitwatch_requests_scored_total"
# Counters whose name says they count lost or refused work, whatever they are called.
DROP_PATTERN = re.compile(r"^circuitwatch_\w*(drop|error|reject)\w*_total$")

Scrape = dict[str, float]  # "name{label="value",...}" -> value


class SidecarProcess:
    """One ``circuitwatch serve`` incarnation on ``socket_path`` with /metrics on ``port``."""

    def __init__(self, spec: Path, socket_path: Path, port: int, log: Path):
        self.socket_path = socket_path
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self._log = open(log, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "serve", "--spec", str(spec),
             "--listen", f"unix://{socket_path}", "--metrics-host", "127.0.0.1",
             "--metrics-port", str(port), "--log-level", "WARNING"],
            stdout=self._log, stderr=subprocess.STDOUT,
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

    def wait_accepting(self, timeout_s: float) -> float:
        """Polls the socket every 5 ms; the monotonic time it first accepted."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"circuitwatch serve exited with {self.process.returncode}")
            if self.accepting():
                return time.monotonic()
            time.sleep(0.005)
        raise TimeoutError(f"circuitwatch serve did not accept connections in {timeout_s:.0f} s")

    def scrape(self, timeout_s: float = 2.0) -> Scrape | None:
        """Every sample of /metrics; None when it does not answer (stopped, starting, gone)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as response:
                text = response.read().decode()
        except OSError:
            return None
        return {
            _key(sample.name, sample.labels): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def rss_mib(self) -> dict[str, float]:
        size = rss_bytes(self.pid) if self.alive() else None
        return {} if size is None else {"sidecar": size / 2**20}

    def kill(self) -> None:
        self.process.kill()
        # Generous: on a loaded 2-core machine a killed process has been seen to take over
        # 10 s to be reaped (the 30-minute soak died on that once).
        self.process.wait(120)
        self._log.close()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.alive():
            if self.paused:
                self.resume()
            stop_process(self.process, timeout=10)
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
