"""Faults under steady load: a real CPU engine (the reference model, default compiled mode,
the plugin on) served from a client thread, the real ``circuitwatch serve`` in a subprocess
that the tests kill, stop and slow down, and finally a fault inside the probe itself.

Each phase checks that every inference request was served (0 failed, every output full
length), that the engine's resident memory (the test process, where the LLM front end
runs, and the engine core process with the worker) stays within ``RSS_BOUND`` of what it
was after a warm-up phase, that throughput stays within a generous band of that warm-up
phase (this machine's 2 cores are shared with other work), and that what the sidecar
missed is counted as dropped. The exact drop books (sampled = scored + dropped) are
tests/test_books.py's; here drops are only required to be counted.

The tests share one engine and run in file order; the last one turns the probe off for
good (``probe_inject_fault``, the documented test hook).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
from probe_engine_helpers import stop_engine, wait_for
from test_reconnect import Serve
from test_server_grpc import scrape

from benchmarks._processes import descendants, rss_bytes
from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.probe.config import ENV_ENDPOINT, ENV_SAMPLE, ENV_SPEC
from sidecar.probe.host.health import DRAIN_COLLECT
from sidecar.probe.host.shipper import SIDECAR_UNAVAILABLE
from sidecar.probe.plugin import probe_flush, probe_inject_fault, probe_stats

pytestmark = pytest.mark.engine

BATCH = 4  # requests per generate call of the client thread
MAX_TOKENS = 16
PHASE_S = 8.0  # load before, during and after a fault
OUTAGE_S = 4.0
RSS_BOUND = 256 * 2**20  # growth allowed over the warm-up's resident memory
THROUGHPUT_BAND = 0.4  # a phase keeps at least this share of the warm-up's tokens per second


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


def metric(serve: Serve, name: str, **labels: str) -> float | None:
    """Sum of the sidecar's samples of ``name`` whose labels include ``labels``; None if it
    has none (or does not answer)."""
    try:
        samples = scrape(f"http://127.0.0.1:{serve.port}/metrics")
    except OSError:
        return None
    values = [
        v for (n, have), v in samples.items() if n == name and set(labels.items()) <= set(have)
    ]
    return sum(values) if values else None


def batches(serve: Serve) -> float:
    return metric(serve, "circuitwatch_batches_received_total") or 0.0


def log_probe_to(worker, path: str) -> bool:
    """Run on a worker (``collective_rpc``): also write the probe's log records to ``path``."""
    logging.getLogger("sidecar.probe").addHandler(logging.FileHandler(path))
    return True


@dataclass(repr=False)
class Rig:
    llm: object
    serve: Serve
    socket_path: Path
    engine_log: Path  # the probe's log records in the worker
    warm: LoadResult  # the warm-up phase, healthy sidecar
    warm_rss: int

    def restart_sidecar(self) -> None:
        self.serve = Serve(self.socket_path)
        self.serve.wait_accepting()

    def probe(self):
        (stats,) = self.llm.collective_rpc(probe_stats)
        return stats

    def check_served(self, load: LoadResult, phase: str) -> None:
        ratio = load.tokens_per_s / self.warm.tokens_per_s
        rss = engine_rss(self.serve.process.pid)
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
    from vllm import LLM

    folder = tmp_path_factory.mktemp("faults")
    socket_path = folder / "ingest.sock"
    serve = Serve(socket_path)
    serve.wait_accepting()
    env = {
        ENV_SPEC: str(REFERENCE_SPEC),
        ENV_ENDPOINT: f"unix://{socket_path}",
        ENV_SAMPLE: "1.0",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc with the plugin's functions
    }
    engine_log = folder / "engine.log"
    # The environment stays set: collective_rpc checks its permission on every call.
    with mock.patch.dict(os.environ, env):
        try:
            llm = LLM(model=str(REFERENCE_DIR), dtype="float32", gpu_memory_utilization=0.2,
                      max_model_len=256, max_num_seqs=BATCH, seed=0)  # fmt: skip
        except BaseException:
            serve.stop()
            raise
        rig = Rig(llm, serve, socket_path, engine_log, LoadResult(), 0)
        try:
            assert llm.collective_rpc(log_probe_to, args=(str(engine_log),)) == [True]
            with steady_load(llm, seed=0):  # warm: compiled shapes, allocator, gRPC stream
                time.sleep(PHASE_S / 2)
            with steady_load(llm, seed=1) as rig.warm:
                time.sleep(PHASE_S)
            rig.warm_rss = engine_rss(serve.process.pid)
            print(f"warm-up: {rig.warm.tokens_per_s:.0f} tok/s, RSS {rig.warm_rss / 2**20:.0f} MiB")
            assert rig.warm.failed == 0 and rig.probe().status.enabled
            yield rig
        finally:
            rig.serve.stop()
            stop_engine(llm)


def test_a_sidecar_killed_and_restarted_costs_no_request_and_its_outage_is_counted(rig):
    before = rig.probe().shipper.dropped.get(SIDECAR_UNAVAILABLE, 0)
    with steady_load(rig.llm, seed=2) as load:
        time.sleep(2.0)
        rig.serve.kill()
        time.sleep(OUTAGE_S)
        rig.restart_sidecar()
        time.sleep(PHASE_S / 2)
    rig.check_served(load, "sidecar SIGKILL + restart")
    assert rig.probe().shipper.dropped.get(SIDECAR_UNAVAILABLE, 0) > before
    # The new sidecar receives batches again and, with them, the probe's drop counts.
    assert rig.llm.collective_rpc(probe_flush) == [True]
    assert batches(rig.serve) > 0
    dropped = metric(rig.serve, "circuitwatch_samples_dropped_total", reason=SIDECAR_UNAVAILABLE)
    assert dropped is not None and dropped > 0


def test_a_sidecar_stopped_and_continued_costs_no_request_and_its_outage_is_counted(rig):
    before = rig.dropped()
    with steady_load(rig.llm, seed=3) as load:
        time.sleep(2.0)
        rig.serve.process.send_signal(signal.SIGSTOP)
        time.sleep(OUTAGE_S)  # keepalive ends the stream after about 2 s
        rig.serve.process.send_signal(signal.SIGCONT)
        received = batches(rig.serve)
        time.sleep(PHASE_S / 2)
    rig.check_served(load, "sidecar SIGSTOP + SIGCONT")
    assert rig.dropped() > before
    assert batches(rig.serve) > received


def test_a_slow_sidecar_costs_no_request(rig):
    """The sidecar runs 0.1 s in every 0.6 s (SIGSTOP / SIGCONT): a reader at a sixth of its
    pace, slow enough for gRPC's flow control to push back on the probe's stream."""
    before = rig.dropped()
    received = batches(rig.serve)
    with steady_load(rig.llm, seed=4) as load:
        deadline = time.monotonic() + PHASE_S
        while time.monotonic() < deadline:
            rig.serve.process.send_signal(signal.SIGSTOP)
            time.sleep(0.5)
            rig.serve.process.send_signal(signal.SIGCONT)
            time.sleep(0.1)
    rig.check_served(load, "slow sidecar")
    print(f"slow sidecar: {rig.dropped() - before} tokens dropped by the probe")
    assert batches(rig.serve) > received  # it read, slowly


def test_a_fault_in_the_drain_turns_the_probe_off_logged_once_exported_and_requests_served(rig):
    assert rig.llm.collective_rpc(probe_inject_fault, args=("collect",)) == [True]
    with steady_load(rig.llm, seed=5) as load:
        time.sleep(PHASE_S)
    rig.check_served(load, "probe off (drain fault)")
    status = rig.probe().status
    assert not status.enabled and status.errors_total == {DRAIN_COLLECT: 1}  # not one per step
    off = {"rank": "0"}
    assert wait_for(lambda: metric(rig.serve, "circuitwatch_probe_enabled", **off) == 0)
    errors = metric(rig.serve, "circuitwatch_probe_errors_total", reason=DRAIN_COLLECT, **off)
    assert errors == 1
    assert rig.engine_log.read_text().count(f"probe off ({DRAIN_COLLECT})") == 1
    # A sidecar started after the fault learns it too, though the probe ships no more steps.
    rig.serve.kill()
    rig.restart_sidecar()
    assert wait_for(lambda: metric(rig.serve, "circuitwatch_probe_enabled", **off) == 0, 10)
    assert metric(rig.serve, "circuitwatch_probe_errors_total", reason=DRAIN_COLLECT) == 1
    assert batches(rig.serve) == 0  # status messages only
