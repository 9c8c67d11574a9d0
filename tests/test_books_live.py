"""The probe -> sidecar books against the real engine: sampled = scored + dropped, exactly.

One engine (the bundled reference model, compiled mode, plugin on) for the module, and a
real ``circuitwatch serve`` subprocess (``test_reconnect.Serve``) that the tests kill,
restart, stop, continue and slow down under steady requests; a second engine shares the
sidecar to show that engines are kept apart.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from probe_engine_helpers import engine_env, generate, start_engine, stop_engine, wait_for
from test_reconnect import Serve

from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.probe.plugin import probe_flush, probe_stats

pytestmark = pytest.mark.engine

BLOCK_SIZE = 32  # set, not the build's default (the CPU attention needs a multiple of 32)
PROBE_REASONS = ("queue_full", "sidecar_unavailable", "drain_backlog", "resolve_error")


@dataclass
class Rig:
    llm: object
    socket_path: Path
    serve: Serve

    def __repr__(self) -> str:  # LLM's repr runs an RPC on the engine
        return f"Rig({self.socket_path})"


def start_probed_engine():
    return start_engine(
        REFERENCE_DIR, enable_prefix_caching=True, block_size=BLOCK_SIZE, max_num_seqs=8
    )


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    socket_path = tmp_path_factory.mktemp("books") / "ingest.sock"
    rig = Rig(None, socket_path, Serve(socket_path))
    rig.serve.wait_accepting()
    with pytest.MonkeyPatch.context() as monkeypatch:
        engine_env(monkeypatch, REFERENCE_SPEC, socket_path, sample="1.0")
        rig.llm = start_probed_engine()
        try:
            yield rig
        finally:
            stop_engine(rig.llm)
            rig.serve.stop()


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    return [[1 + (seed * 131 + i * 17 + t * 7) % 500 for t in range(length)] for i in range(n)]


def total(serve: Serve, name: str, **labels: str) -> float:
    return sum(
        value
        for found, value in serve.samples(name)
        if all(found.get(k) == v for k, v in labels.items())
    )


@dataclass(frozen=True)
class Books:
    sampled: float
    scored: float
    dropped: dict[str, float]

    @property
    def balanced(self) -> bool:
        return self.sampled == self.scored + sum(self.dropped.values())


def books(serve: Serve, rank: str = "0") -> Books:
    dropped: dict[str, float] = {}
    for labels, value in serve.samples("circuitwatch_probe_dropped_tokens_total"):
        if labels["rank"] == rank:
            dropped[labels["reason"]] = dropped.get(labels["reason"], 0.0) + value
    return Books(
        total(serve, "circuitwatch_probe_sampled_tokens_total", rank=rank),
        total(serve, "circuitwatch_probe_scored_tokens_total", rank=rank),
        dropped,
    )


def settled(serve: Serve, timeout_s: float = 30.0) -> Books:
    """The books once every message has been read: balanced and unchanged for a while."""
    last = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = books(serve)
        if now == last and now.balanced:
            return now
        last = now
        time.sleep(0.5)
    raise AssertionError(f"the books did not settle: {last}")


def test_prefix_cached_prompt_tokens_are_counted(rig):
    (prompt,) = prompts(1, 5 * BLOCK_SIZE + 3, seed=1)
    first = generate(rig.llm, [prompt])
    second = generate(rig.llm, [prompt])
    cached = sum(o.num_cached_tokens or 0 for o in first + second)
    assert cached >= 4 * BLOCK_SIZE  # the second request found the first one's blocks
    assert wait_for(
        lambda: total(rig.serve, "circuitwatch_prefix_cached_tokens_total") == cached, 20
    )


def test_two_engines_sharing_a_sidecar_are_kept_apart(rig):
    """Both engines number their steps and requests from the start ("0", "1", ...): keyed
    only by model and step, their rows would join and their requests merge."""
    settled(rig.serve)  # earlier tests' requests all scored
    scored_before = total(rig.serve, "circuitwatch_requests_scored_total")
    with pytest.MonkeyPatch.context() as monkeypatch:
        engine_env(monkeypatch, REFERENCE_SPEC, rig.socket_path, sample="1.0")
        other = start_probed_engine()
    try:
        batch = prompts(4, 24, seed=2)
        threads = [
            threading.Thread(target=generate, args=(llm, batch, 8)) for llm in (rig.llm, other)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        settled(rig.serve)
        assert total(rig.serve, "circuitwatch_requests_scored_total") == scored_before + 8
        for reason in ("after_finish", "state_full", "rejected"):
            assert books(rig.serve).dropped.get(reason, 0) == 0, reason
    finally:
        stop_engine(other)


class SteadyLoad:
    """Requests in a loop from a client thread, as a steady stream of users would send."""

    def __init__(self, llm):
        self.llm = llm
        self.completed = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seed = 100
        while not self._stop.is_set():
            seed += 1
            try:
                self.completed += len(generate(self.llm, prompts(4, 40, seed), 16))
            except Exception as error:  # counted: the test asserts there are none
                self.failures.append(error)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)


def slow_down(serve: Serve, seconds: float, running_s: float = 0.05, stopped_s: float = 0.15):
    """A sidecar that reads slowly: stopped three quarters of the time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        serve.process.send_signal(signal.SIGSTOP)
        time.sleep(stopped_s)
        serve.process.send_signal(signal.SIGCONT)
        time.sleep(running_s)


def test_the_books_balance_through_a_kill_a_stop_and_a_slow_sidecar(rig):
    load = SteadyLoad(rig.llm)
    try:
        time.sleep(2)
        rig.serve.kill()  # SIGKILL, with messages in flight
        time.sleep(1.5)
        rig.serve = Serve(rig.socket_path)
        rig.serve.wait_accepting()
        time.sleep(2)
        rig.serve.process.send_signal(signal.SIGSTOP)
        time.sleep(3)
        rig.serve.process.send_signal(signal.SIGCONT)
        time.sleep(2)
        slow_down(rig.serve, 4)
        time.sleep(2)
    finally:
        load.stop()
    assert load.failures == [] and load.completed > 0
    assert rig.llm.collective_rpc(probe_flush) == [True]
    final = settled(rig.serve)
    (probe,) = rig.llm.collective_rpc(probe_stats)
    # The rows the sidecar says it scored are the rows its pipeline folded into requests...
    folded = total(rig.serve, "circuitwatch_tokens_sampled_total")
    late = final.dropped.get("after_finish", 0) + final.dropped.get("state_full", 0)
    assert final.scored + late == folded > 0
    # ...the drops of the outages reached it, each counted once however often the probe
    # reconnected (never more than the probe itself counted)...
    probe_drops = probe.shipper.dropped
    assert sum(final.dropped.get(r, 0) for r in PROBE_REASONS) > 0
    for reason in PROBE_REASONS:
        assert final.dropped.get(reason, 0) <= probe_drops.get(reason, 0), reason
    # ...and everything it counted is a part of what the probe sampled.
    assert final.sampled <= probe.shipper.sampled_tokens
    print(f"books after kill/stop/slow: {final}; probe: {probe.shipper}")
