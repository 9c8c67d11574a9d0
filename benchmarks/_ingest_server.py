"""The sidecar side of the ingest benchmark: a ``Sidecar`` in a subprocess pinned to one CPU.

``ServerProcess`` starts it (multiprocessing spawn: gRPC does not survive fork) and talks to
it over a pipe: ``drain`` returns the (request id, CLOCK_MONOTONIC) stamps its record sink
took when each finished request's record was emitted, ``counts`` its Prometheus counters,
``rss_bytes`` its resident memory, ``stop`` stops it (and returns cProfile hot spots of its
event-loop thread, where every Python step of ingest runs, when started with ``profile``).
"""

from __future__ import annotations

import asyncio
import cProfile
import multiprocessing
import os
import pstats
import time
from collections import deque
from pathlib import Path


class _StampSink:
    """Record sink: (request id, CLOCK_MONOTONIC at emit), drained by the client."""

    def __init__(self):
        self.stamps: deque[tuple[str, float]] = deque(maxlen=1_000_000)

    def emit(self, record) -> None:
        self.stamps.append((record.request_id, time.monotonic()))

    def take(self) -> list[tuple[str, float]]:
        taken = []
        while self.stamps:
            taken.append(self.stamps.popleft())
        return taken


def _serve(conn, spec_path: str, listen: str, cpu: int | None, profile: bool) -> None:
    """Subprocess entry: run a Sidecar on this process's main thread, answer the pipe."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    from sidecar.server.service import Sidecar
    from sidecar.spec.load import load_spec

    sink = _StampSink()
    sidecar = Sidecar(load_spec(spec_path), listen, metrics_port=None, sinks=[sink])
    profiler = cProfile.Profile() if profile else None
    asyncio.run(_serve_async(sidecar, conn, sink, profiler))
    conn.send(None if profiler is None else _hot_spots(profiler))
    conn.close()


async def _serve_async(sidecar, conn, sink: _StampSink, profiler) -> None:
    loop = asyncio.get_running_loop()
    await sidecar.start()
    conn.send(sidecar.address)
    if profiler is not None:
        profiler.enable()
    try:
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command == "drain":
                conn.send(sink.take())
            elif command == "counts":
                conn.send(_counts(sidecar.registry))
            else:
                break
    finally:
        if profiler is not None:
            profiler.disable()
        await sidecar.stop(grace=0)


def _counts(registry) -> dict[str, float]:
    totals = {"tokens": 0.0, "dropped": 0.0, "ingest_errors": 0.0, "requests": 0.0}
    names = {
        "circuitwatch_tokens_sampled_total": "tokens",
        "circuitwatch_samples_dropped_total": "dropped",
        "circuitwatch_ingest_errors_total": "ingest_errors",
        "circuitwatch_requests_scored_total": "requests",
    }
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
    return totals


def _hot_spots(profiler: cProfile.Profile, top: int = 15) -> list[dict]:
    stats = pstats.Stats(profiler)
    total = sum(tt for _, _, tt, _, _ in stats.stats.values()) or 1.0
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    spots = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in rows:
        spots.append(
            {
                "function": f"{_short_path(filename)}:{line}({name})",
                "calls": calls,
                "tottime_s": round(tottime, 4),
                "cumtime_s": round(cumtime, 4),
                "share_of_total": round(tottime / total, 4),
            }
        )
    return spots


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


class ServerProcess:
    """The sidecar subprocess: start, query over the pipe, stop."""

    def __init__(self, spec_path: Path, listen: str, cpu: int | None, profile: bool = False):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, str(spec_path), listen, cpu, profile), daemon=True
        )
        self.process.start()
        if not self.conn.poll(120):
            self.process.kill()
            raise RuntimeError("the sidecar subprocess did not start within 120 s")
        self.address: str = self.conn.recv()

    def drain(self) -> list[tuple[str, float]]:
        self.conn.send("drain")
        return self.conn.recv()

    def counts(self) -> dict[str, float]:
        self.conn.send("counts")
        return self.conn.recv()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self):
        """Stop the server; returns the profile's hot spots when it was profiled."""
        self.conn.send("stop")
        result = self.conn.recv() if self.conn.poll(30) else None
        self.process.join(30)
        if self.process.exitcode is None:
            self.process.kill()
        return result
