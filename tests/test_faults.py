"""Faults under steady load, and the probe -> sidecar books through them: one real CPU engine
(the reference model, default compiled mode, prefix caching on, the plugin on, every token
sampled) served from a client thread, the real ``circuitwatch serve`` in a subprocess
(``benchmarks._sidecar_process.SidecarProcess``) that the tests kill, stop and slow down,
and finally a fault inside the probe itself.

Each fault phase checks that every inference request was served (0 failed, every output
full length), that the engine's resident memory (the test process, where the LLM front end
runs, and the engine core process with the worker) stays within ``RSS_BOUND`` of what it
was after a warm-up phase, that throughput stays within a generous band of that warm-up
phase (this machine's 2 cores are shared with other work), and that what the sidecar
missed is counted as dropped. After the three sidecar faults the books balance exactly:
sampled = scored + dropped, by reason.

The tests share one engine and run in file order: prefix caching and a second engine on
the same sidecar first (a sidecar that has seen no fault), then the sidecar's faults, the
books through them, and last the drain fault, which turns the probe off for good
(``probe_inject_fault``, the documented test hook).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from probe_engine_helpers import engine_env, generate, start_engine, stop_engine, wait_for

from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.probe.host.health import DRAIN_COLLECT
from sidecar.probe.host.shipper import SIDECAR_UNAVAILABLE
from sidecar.probe.plugin import probe_flush, probe_inject_fault, probe_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks._processes import descendants, rss_bytes  # noqa: E402
from benchmarks._sidecar_process import SidecarProcess  # noqa: E402

pytestmark = pytest.mark.engine

BATCH = 4  # requests per generate call of the client thread
MAX_TOKENS = 16
BLOCK_SIZE = 32  # set, not the build's default (the CPU attention needs a multiple of 32)
PHASE_S = 8.0  # load before, during and after a fault
OUTAGE_S = 4.0
RSS_BOUND = 256 * 2**20  # growth allowed over the warm-up's resident memory
THROUGHPUT_BAND = 0.4  # a phase keeps at least this share of the warm-up's tokens per second
SIDECAR_FAULTS = ["kill", "stop", "slow"]  # what the books test expects to have come before it
PROBE_REASONS = ("queue_full", "sidecar_unavailable", "drain_backlog", "resolve_error")


@dataclass
class LoadResult:
    requests: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@contextmanager
def steady_load(llm, seed: int) -> Iterator[LoadResult]:
    """A client thread that sends ``BATCH`` requests at a time, back to back, until the block
    ends; the result counts requests, failures (an exception, or an output cut short) and
    generated tokens. The engine is used by that thread alone meanwhile."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    rng = random.Random(seed)
    result, stop = LoadResult(), threading.Event()

    def client() -> None:
        while not stop.is_set():
            prompts = [
                {"prompt_token_ids": [rng.randrange(2, 512) for _ in range(rng.randint(8, 48))]}
                for _ in range(BATCH)
            ]
            result.requests += BATCH
            try:
                outputs = llm.generate(prompts, params, use_tqdm=False)
            except Exception as error:  # a failed request is what these tests look for
                result.failed += BATCH
                result.errors.append(repr(error))
                continue
            for output in outputs:
                generated = len(output.outputs[0].token_ids)
                result.tokens += generated
                result.failed += generated != MAX_TOKENS

    thread = threading.Thread(target=client, name="client", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(120)
        result.seconds = time.monotonic() - started


def engine_rss(sidecar_pid: int) -> int:
    """Resident bytes of this process (the LLM front end) and its descendants (engine core,
    worker), the sidecar's tree left out."""
    me = os.getpid()
    sidecar = {sidecar_pid} | descendants(sidecar_pid)
    return sum(rss_bytes(pid) or 0 for pid in ({me} | descendants(me)) - sidecar)


def log_probe_to(worker, path: str) -> bool:
    """Run on a worker (``collective_rpc``): also write the probe's log records to ``path``."""
    logging.getLogger("sidecar.probe").addHandler(logging.FileHandler(path))
    return True


def start_probed_engine():
    return start_engine(
        REFERENCE_DIR, enable_prefix_caching=True, block_size=BLOCK_SIZE, max_num_seqs=BATCH
    )


@dataclass(repr=False)  # LLM's repr runs an RPC on the engine
class Rig:
    llm: object
    serve: SidecarProcess
    socket_path: Path
    engine_log: Path  # the probe's log records in the worker
    warm: LoadResult | None = None  # the warm-up phase, healthy sidecar (the ``warm`` fixture)
    warm_rss: int = 0
    faults: list[str] = field(default_factory=list)  # the sidecar faults done, in order

    def restart_sidecar(self) -> None:
        self.serve = SidecarProcess(self.socket_path)
        self.serve.wait_accepting()

    def probe(self):
        (stats,) = self.llm.collective_rpc(probe_stats)
        return stats

    def check_served(self, load: LoadResult, phase: str) -> None:
        ratio = load.tokens_per_s / self.warm.tokens_per_s
        rss = engine_rss(self.serve.pid)
        print(
            f"{phase}: {load.requests} requests, {load.failed} failed, "
            f"{load.tokens_per_s:.0f} tok/s ({ratio:.0%} of warm-up), "
            f"engine RSS {rss / 2**20:.0f} MiB ({(rss - self.warm_rss) / 2**20:+.0f} MiB)"
        )
        assert load.requests >= BATCH and load.failed == 0, load.errors[:3]
        assert ratio > THROUGHPUT_BAND, (phase, load.tokens_per_s, self.warm.tokens_per_s)
        assert rss - self.warm_rss < RSS_BOUND, (phase, rss, self.warm_rss)

    def dropped(self) -> int:
        return sum(self.probe().shipper.dropped.values())


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    socket_path = folder / "ingest.sock"
    serve = SidecarProcess(socket_path)
    # The environment stays set: collective_rpc checks its permission on every call.
    with pytest.MonkeyPatch.context() as monkeypatch:
        try:
            serve.wait_accepting()
            engine_env(monkeypatch, REFERENCE_SPEC, socket_path, sample="1.0")
            llm = start_probed_engine()
        except BaseException:
            serve.stop()
            raise
        rig = Rig(llm, serve, socket_path, folder / "engine.log")
        try:
            assert llm.collective_rpc(log_probe_to, args=(str(rig.engine_log),)) == [True]
            yield rig
        finally:
            rig.serve.stop()
            stop_engine(llm)


@pytest.fixture(scope="module")
def warm(rig) -> Rig:
    """The rig after a warm-up phase with a healthy sidecar, whose throughput and engine RSS
    the fault phases are held to."""
    with steady_load(rig.llm, seed=0):  # warm: compiled shapes, allocator, gRPC stream
        time.sleep(PHASE_S / 2)
    with steady_load(rig.llm, seed=1) as rig.warm:
        time.sleep(PHASE_S)
    rig.warm_rss = engine_rss(rig.serve.pid)
    print(f"warm-up: {rig.warm.tokens_per_s:.0f} tok/s, RSS {rig.warm_rss / 2**20:.0f} MiB")
    assert rig.warm.failed == 0 and rig.probe().status.enabled
    return rig


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    return [[1 + (seed * 131 + i * 17 + t * 7) % 500 for t in range(length)] for i in range(n)]


def total(serve: SidecarProcess, name: str, **labels: str) -> float:
    return serve.value(name, **labels) or 0.0


@dataclass(frozen=True)
class Books:
    sampled: float
    scored: float
    dropped: dict[str, float]

    @property
    def balanced(self) -> bool:
        return self.sampled == self.scored + sum(self.dropped.values())


def books(serve: SidecarProcess, rank: str = "0") -> Books:
    dropped: dict[str, float] = {}
    for labels, value in serve.samples("circuitwatch_probe_dropped_tokens_total", rank=rank):
        dropped[labels["reason"]] = dropped.get(labels["reason"], 0.0) + value
    return Books(
        total(serve, "circuitwatch_probe_sampled_tokens_total", rank=rank),
        total(serve, "circuitwatch_probe_scored_tokens_total", rank=rank),
        dropped,
    )


def settled(serve: SidecarProcess, timeout_s: float = 30.0) -> Books:
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
    other = start_probed_engine()  # the rig's environment: the same sidecar
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


def test_a_sidecar_killed_and_restarted_costs_no_request_and_its_outage_is_counted(warm):
    rig = warm
    rig.faults.append("kill")
    before = rig.probe().shipper.dropped.get(SIDECAR_UNAVAILABLE, 0)
    with steady_load(rig.llm, seed=2) as load:
        time.sleep(2.0)
        rig.serve.kill()  # with messages in flight
        time.sleep(OUTAGE_S)
        rig.restart_sidecar()
        time.sleep(PHASE_S / 2)
    rig.check_served(load, "sidecar SIGKILL + restart")
    assert rig.probe().shipper.dropped.get(SIDECAR_UNAVAILABLE, 0) > before
    # The new sidecar receives batches again and, with them, the probe's drop counts.
    assert rig.llm.collective_rpc(probe_flush) == [True]
    assert rig.serve.batches() > 0
    dropped = rig.serve.value("circuitwatch_samples_dropped_total", reason=SIDECAR_UNAVAILABLE)
    assert dropped is not None and dropped > 0


def test_a_sidecar_stopped_and_continued_costs_no_request_and_its_outage_is_counted(warm):
    rig = warm
    rig.faults.append("stop")
    before = rig.dropped()
    with steady_load(rig.llm, seed=3) as load:
        time.sleep(2.0)
        rig.serve.pause()
        time.sleep(OUTAGE_S)  # keepalive ends the stream after about 2 s
        rig.serve.resume()
        received = rig.serve.batches()
        time.sleep(PHASE_S / 2)
    rig.check_served(load, "sidecar SIGSTOP + SIGCONT")
    assert rig.dropped() > before
    assert rig.serve.batches() > received


def test_a_slow_sidecar_costs_no_request(warm):
    """The sidecar runs 0.1 s in every 0.6 s (SIGSTOP / SIGCONT): a reader at a sixth of its
    pace, slow enough for gRPC's flow control to push back on the probe's stream."""
    rig = warm
    rig.faults.append("slow")
    before = rig.dropped()
    received = rig.serve.batches()
    with steady_load(rig.llm, seed=4) as load:
        deadline = time.monotonic() + PHASE_S
        while time.monotonic() < deadline:
            rig.serve.pause()
            time.sleep(0.5)
            rig.serve.resume()
            time.sleep(0.1)
    rig.check_served(load, "slow sidecar")
    print(f"slow sidecar: {rig.dropped() - before} tokens dropped by the probe")
    assert rig.serve.batches() > received  # it read, slowly


def test_the_books_balance_exactly_through_the_kill_the_stop_and_the_slow_sidecar(rig):
    """On the sidecar started after the kill above, which was then stopped and slowed."""
    assert rig.faults == SIDECAR_FAULTS, "run the module's fault tests first, in file order"
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


def test_a_fault_in_the_drain_turns_the_probe_off_logged_once_exported_and_requests_served(warm):
    rig = warm
    assert rig.llm.collective_rpc(probe_inject_fault, args=("collect",)) == [True]
    with steady_load(rig.llm, seed=5) as load:
        time.sleep(PHASE_S)
    rig.check_served(load, "probe off (drain fault)")
    status = rig.probe().status
    assert not status.enabled and status.errors_total == {DRAIN_COLLECT: 1}  # not one per step
    off = {"rank": "0"}
    assert wait_for(lambda: rig.serve.value("circuitwatch_probe_enabled", **off) == 0)
    errors = rig.serve.value("circuitwatch_probe_errors_total", reason=DRAIN_COLLECT, **off)
    assert errors == 1
    assert rig.engine_log.read_text().count(f"probe off ({DRAIN_COLLECT})") == 1
    # A sidecar started after the fault learns it too, though the probe ships no more steps.
    rig.serve.kill()
    rig.restart_sidecar()
    assert wait_for(lambda: rig.serve.value("circuitwatch_probe_enabled", **off) == 0, 10)
    assert rig.serve.value("circuitwatch_probe_errors_total", reason=DRAIN_COLLECT) == 1
    assert rig.serve.batches() == 0  # status messages only
