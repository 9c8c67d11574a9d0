"""Sidecar ingest benchmark: throughput, token-to-metric latency and memory on one core.

    python -m benchmarks.ingest                      # full run, about 2 minutes
    python -m benchmarks.ingest --quick              # smoke run, seconds
    python -m benchmarks.ingest --update-docs        # also rewrite BENCHMARKS.md's section

The sidecar (``sidecar.server.service.Sidecar``, the object ``circuitwatch serve`` runs) runs
in a subprocess pinned to CPU 0, with every one of its threads (gRPC's included); this
process, the client, is pinned to CPU 1. The client plays one engine worker: a single
``circuitwatch.v1.Ingest/Stream`` carrying one ``SampleBatch`` per engine step. Each step
holds ``batch`` sampled tokens of ``concurrency`` (256) live requests, the same number of
consecutive positions of each (1 per request at 256 tokens, 16 at 4096), over 8 head
components scored into 3 circuits. A request lives 128 tokens (32 prompt, 96 generated);
the step carrying its last token lists it in ``finished_request_ids`` and a new request
takes its place, so every step finishes some requests.

Units:
    tokens/s            sampled tokens scored per second
    token-scores/s      tokens x components per second: component values ingested and
                        scored (the unit of the 1,000,000/s target)
    circuit scores/s    tokens x circuits per second

Throughput cells (per transport: Unix socket, TCP 127.0.0.1; per batch size) send
pre-built messages as fast as gRPC flow control lets them: wall time from the first
message to the server's stream summary, which it sends after processing the last one.

Token-to-metric latency: from the client handing gRPC the step that carries a request's
finish marker to the sidecar emitting that request's record to its record sinks (the same
moment the Prometheus sink observes the request's histograms). Both ends read
CLOCK_MONOTONIC, which is one clock for every process on a Linux machine. Measured both in
the saturated throughput cells (queueing included) and in the sustained run.

Sustained run: a fresh sidecar fed at a fixed pace (by default half the measured Unix-socket
throughput at 1024 tokens) for 60 s; the server's RSS is sampled every second and fitted
with a line after a 20 % warm-up. Profile: one more short Unix-socket run under cProfile
(the sidecar's event-loop thread, where all Python work of ingest runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import (
    RESULTS_DIR,
    Table,
    Trend,
    load_note,
    machine_info,
    percentiles,
    update_markdown_section,
    write_json,
)
from benchmarks._ingest_server import ServerProcess
from benchmarks._traffic import CIRCUITS, SPEC_HEADS, EngineTraffic, Workload, write_spec

SERVER_CPU, CLIENT_CPU = 0, 1
TARGET_SCORES_PER_S = 1_000_000
TARGET_P99_S = 1.0
_METHOD = "/circuitwatch.v1.Ingest/Stream"


@dataclass(frozen=True)
class Setup:
    spec_path: Path
    spec_hash: str
    server_cpu: int | None  # None: not pinned (fewer than two usable CPUs)
    folder: Path

    def server(self, listen: str, profile: bool = False) -> ServerProcess:
        return ServerProcess(self.spec_path, listen, self.server_cpu, profile)


def _stream(address: str, messages: Iterator[bytes]):
    """(channel, future) of one Ingest stream of already serialized messages."""
    import grpc

    from sidecar.protocol.circuitwatch.v1 import ingest_pb2

    channel = grpc.insecure_channel(address)
    call = channel.stream_unary(
        _METHOD, request_serializer=None, response_deserializer=ingest_pb2.StreamSummary.FromString
    )
    return channel, call.future(messages)


def _stamped(messages, sent: dict[str, float]) -> Iterator[bytes]:
    """Yields the messages, noting when each finish marker was handed to gRPC."""
    for message, finished in messages:
        if finished:
            now = time.monotonic()
            for request_id in finished:
                sent[request_id] = now
        yield message


def _latencies(stamps: list[tuple[str, float]], sent: dict[str, float]) -> list[float]:
    return [t - sent[r] for r, t in stamps if r in sent]


@dataclass
class Cell:
    transport: str
    batch_tokens: int
    batches: int
    tokens: int
    seconds: float
    tokens_per_s: float
    token_scores_per_s: float
    circuit_scores_per_s: float
    latency_s: dict[str, float]
    finished_measured: int  # requests whose latency was measured


def throughput_cell(
    setup: Setup, server: ServerProcess, transport: str, batch_tokens: int, total: int, cell: int
) -> Cell:
    """Stream ``total`` tokens in pre-built batches as fast as the server takes them."""
    traffic = EngineTraffic(Workload(batch_tokens), setup.spec_hash, prefix=f"c{cell}-", seed=cell)
    n_batches = max(8, -(-total // batch_tokens))
    messages = [traffic.next_message() for _ in range(n_batches)]
    tokens = n_batches * traffic.slots * traffic.workload.tokens_per_request
    before = server.counts()
    sent: dict[str, float] = {}
    start = time.monotonic()
    channel, future = _stream(server.address, _stamped(messages, sent))
    summary = future.result(timeout=600)
    seconds = time.monotonic() - start
    channel.close()
    _check(f"{transport}/{batch_tokens}", summary, n_batches, tokens, before, server.counts())
    latency = _latencies(server.drain(), sent)
    return Cell(
        transport=transport,
        batch_tokens=batch_tokens,
        batches=n_batches,
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        token_scores_per_s=tokens * len(SPEC_HEADS) / seconds,
        circuit_scores_per_s=tokens * CIRCUITS / seconds,
        latency_s=percentiles(latency),
        finished_measured=len(latency),
    )


def _check(name: str, summary, batches: int, tokens: int, before: dict, after: dict) -> None:
    """Refuse numbers for work the sidecar did not do: every batch and token must count."""
    delta = {k: after[k] - before[k] for k in after}
    if summary.batches_accepted != batches or summary.batches_rejected:
        raise RuntimeError(f"{name}: sent {batches} batches, server summary: {summary}")
    if delta["tokens"] != tokens or delta["dropped"] or delta["ingest_errors"]:
        raise RuntimeError(f"{name}: sent {tokens} tokens, server counted {delta}")


@dataclass
class Sustained:
    batch_tokens: int
    seconds: float
    target_batches_per_s: float
    achieved_batches_per_s: float
    tokens: int
    latency_s: dict[str, float]
    finished_measured: int
    rss_mib_start: float  # median of the first quarter of the samples after the warm-up
    rss_mib_end: float  # median of the last quarter
    rss_mib_max: float
    rss_slope_mib_per_min: float  # least-squares line over the samples after the warm-up
    rss_samples_mib: list[float]  # one per second
    flat: bool  # end - start <= max(1 MiB, 1 %)


def sustained_run(setup: Setup, batch_tokens: int, rate: float, seconds: float) -> Sustained:
    """Feed a fresh sidecar ``rate`` batches/s for ``seconds``, sampling its RSS every second."""
    server = setup.server(f"unix://{setup.folder}/sustain.sock")
    traffic = EngineTraffic(Workload(batch_tokens), setup.spec_hash, prefix="s-", seed=99)
    total = int(rate * seconds)
    start = time.monotonic()

    def paced() -> Iterator[tuple[bytes, list[str]]]:
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield traffic.next_message()

    before = server.counts()
    sent: dict[str, float] = {}
    channel, future = _stream(server.address, _stamped(paced(), sent))
    rss: list[tuple[float, float]] = []
    latency: list[float] = []
    while not future.done():
        rss.append((time.monotonic() - start, server.rss_bytes() / 2**20))
        latency += _latencies(server.drain(), sent)
        time.sleep(1.0)
    summary = future.result()
    elapsed = time.monotonic() - start
    channel.close()
    latency += _latencies(server.drain(), sent)
    tokens = total * traffic.slots * traffic.workload.tokens_per_request
    _check("sustained", summary, total, tokens, before, server.counts())
    server.stop()
    mib = [m for _, m in rss]
    trend = Trend.of([t for t, _ in rss], mib, warmup=0.2)
    return Sustained(
        batch_tokens=batch_tokens,
        seconds=elapsed,
        target_batches_per_s=rate,
        achieved_batches_per_s=total / elapsed,
        tokens=tokens,
        latency_s=percentiles(latency),
        finished_measured=len(latency),
        rss_mib_start=trend.start,
        rss_mib_end=trend.end,
        rss_mib_max=trend.high,
        rss_slope_mib_per_min=trend.slope_per_min,
        rss_samples_mib=[round(float(m), 2) for m in mib],
        flat=trend.growth <= max(1.0, 0.01 * trend.start),
    )


def profile_run(setup: Setup, batch_tokens: int, total: int) -> list[dict]:
    server = setup.server(f"unix://{setup.folder}/profile.sock", profile=True)
    throughput_cell(setup, server, "uds", batch_tokens, total, cell=1000)
    return server.stop() or []


def _tables(cells: list[Cell], sustained: Sustained, spots: list[dict]) -> list[Table]:
    def ms(latency: dict[str, float]) -> str:
        return f"{latency['p50'] * 1e3:.1f} / {latency['p99'] * 1e3:.1f}"

    throughput = Table(
        "Sidecar ingest on one core, saturated",
        (
            "transport",
            "batch tokens",
            "tokens/s",
            "token-scores/s",
            "circuit scores/s",
            "latency p50 / p99 ms",
        ),
        tuple(
            (
                c.transport,
                str(c.batch_tokens),
                f"{c.tokens_per_s:,.0f}",
                f"{c.token_scores_per_s:,.0f}",
                f"{c.circuit_scores_per_s:,.0f}",
                ms(c.latency_s),
            )
            for c in cells
        ),
    )
    s = sustained
    memory = Table(
        f"Sustained: {s.seconds:.0f} s, {s.achieved_batches_per_s:.0f} batches/s of "
        f"{s.batch_tokens} tokens ({s.achieved_batches_per_s * s.batch_tokens:,.0f} tokens/s), "
        "Unix socket",
        (
            "latency p50 / p99 ms",
            "RSS start MiB",
            "RSS end MiB",
            "RSS max MiB",
            "slope MiB/min",
            "flat",
        ),
        (
            (
                ms(s.latency_s),
                f"{s.rss_mib_start:.1f}",
                f"{s.rss_mib_end:.1f}",
                f"{s.rss_mib_max:.1f}",
                f"{s.rss_slope_mib_per_min:+.3f}",
                "yes" if s.flat else "NO",
            ),
        ),
    )
    hot = Table(
        "Sidecar hot spots (cProfile of the event-loop thread, by own time)",
        ("function", "calls", "own s", "share"),
        tuple(
            (h["function"], str(h["calls"]), f"{h['tottime_s']:.3f}", f"{h['share_of_total']:.1%}")
            for h in spots[:12]
        ),
    )
    return [throughput, memory, hot]


def _verdicts(cells: list[Cell], sustained: Sustained) -> dict[str, bool]:
    best = max(c.token_scores_per_s for c in cells)
    p99 = max([c.latency_s["p99"] for c in cells] + [sustained.latency_s["p99"]])
    return {
        f"token-scores/s >= {TARGET_SCORES_PER_S:,} on one core (best cell)": (
            best >= TARGET_SCORES_PER_S
        ),
        f"token-to-metric p99 < {TARGET_P99_S:g} s (every cell)": p99 < TARGET_P99_S,
        "server RSS flat over the sustained run": sustained.flat,
    }


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (smoke test)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="batch sizes in tokens"
    )
    parser.add_argument("--tokens", type=int, help="tokens per cell (default 2400000; quick 8192)")
    parser.add_argument(
        "--sustain-seconds", type=float, help="sustained run length (default 60; quick 3)"
    )
    parser.add_argument(
        "--sustain-load",
        type=float,
        default=0.5,
        help="sustained pace, fraction of the measured Unix-socket rate (default 0.5)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="result JSON (default benchmarks/results/ingest-cpu.json; none with --quick)",
    )
    parser.add_argument(
        "--update-docs", action="store_true", help="rewrite the ingest section of BENCHMARKS.md"
    )
    return parser


def _throughput_cells(setup: Setup, sizes: list[int], total: int) -> list[Cell]:
    cells: list[Cell] = []
    transports = (("uds", f"unix://{setup.folder}/ingest.sock"), ("tcp", "127.0.0.1:0"))
    for transport, listen in transports:
        server = setup.server(listen)
        try:
            for size in sizes:
                cell = throughput_cell(setup, server, transport, size, total, len(cells))
                print(f"{transport} {size}: {cell.token_scores_per_s:,.0f} token-scores/s")
                cells.append(cell)
        finally:
            server.stop()
    return cells


def main(argv: list[str] | None = None) -> int:
    args = _arguments().parse_args(argv)
    total = args.tokens or (8192 if args.quick else 2_400_000)
    sustain = args.sustain_seconds or (3.0 if args.quick else 60.0)
    output = args.output or (None if args.quick else RESULTS_DIR / "ingest-cpu.json")
    affinity = os.sched_getaffinity(0)
    pinned = {SERVER_CPU, CLIENT_CPU} <= affinity
    load_before = os.getloadavg()
    if pinned:
        os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        with tempfile.TemporaryDirectory(prefix="cw-ingest-") as tmp:
            from sidecar.spec.load import load_spec

            spec_path = write_spec(Path(tmp))
            setup = Setup(
                spec_path, load_spec(spec_path).hash, SERVER_CPU if pinned else None, Path(tmp)
            )
            cells = _throughput_cells(setup, args.sizes, total)
            middle = min(args.sizes, key=lambda size: abs(size - 1024))
            uds = next(c for c in cells if c.transport == "uds" and c.batch_tokens == middle)
            rate = args.sustain_load * uds.batches / uds.seconds
            sustained = sustained_run(setup, middle, rate, sustain)
            spots = profile_run(setup, middle, total // 2)
    finally:
        os.sched_setaffinity(0, affinity)
    load = load_note(load_before, os.getloadavg())

    tables = _tables(cells, sustained, spots)
    for table in tables:
        table.print()
    verdicts = _verdicts(cells, sustained)
    for name, ok in verdicts.items():
        print(f"{'met   ' if ok else 'MISSED'} {name}")
    command = "python -m benchmarks.ingest" + (" " + " ".join(argv) if argv else "")
    payload = {
        "benchmark": "ingest",
        "command": command,
        "pinned": {"server_cpu": SERVER_CPU, "client_cpu": CLIENT_CPU} if pinned else None,
        "components": len(SPEC_HEADS),
        "circuits": CIRCUITS,
        "workload": {**Workload(0).__dict__, "batch_tokens": args.sizes, "tokens_per_cell": total},
        "machine": machine_info(),
        "load": load,
        "cells": cells,
        "sustained": sustained,
        "hot_spots": spots,
        "targets_met": verdicts,
    }
    if output is not None:
        write_json(output, payload)
        print(f"wrote {output}")
    if args.update_docs:
        lines = [f"`{command}` on {payload['machine']['cpu_model']}; {load}.", ""]
        for table in tables:
            lines += [f"**{table.title}**", "", table.markdown(), ""]
        lines += [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in verdicts.items()]
        update_markdown_section("ingest", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
