"""Fuzzing the sidecar's gRPC ingest: hostile messages in, no crash, bounded memory.

    python -m benchmarks.fuzz_ingest --examples 1000000   # the dedicated run, ~20-40 min here
    python -m benchmarks.fuzz_ingest --examples 1000000 --update-docs   # and RELIABILITY.md
    python -m benchmarks.fuzz_ingest --examples 3000 --output /tmp/f.json   # seconds (tests)

Inputs come from ``benchmarks._fuzz_inputs`` (seeded; every kind of damage the issue lists).
Two paths, both the real code:

* **In process** (all but ``--wire-share`` of the examples, for throughput, in ``--workers``
  processes of seeds ``--seed``, ``--seed + 1``, ...): the ingest handler
  ``IngestService.accept`` on the pipeline of a ``Sidecar`` (anomaly detection on, like
  production; spans only over the wire), its clock advanced 1 ms per input and ticked every
  1,000 inputs (so idle requests and tensor-parallel waits expire), a new stream (a source
  for the per-stream caps, fresh drop counters) every 1,000 inputs. Outcome per input:
  ``accepted``, ``rejected:<reason>`` (the ``ingest_errors`` label), or a crash (any other
  exception, which the server would count as ``internal``).
* **Over the wire** (``--wire-share``, default 1 %): a started ``Sidecar`` on TCP 127.0.0.1
  with a bearer token, fed by streams of 100 inputs through the probe's own channel code.
  One stream in 10 has no token (expect UNAUTHENTICATED) and in one in 25 the last input
  is replaced by random bytes above the size limit (expect RESOURCE_EXHAUSTED); the gRPC
  status of every stream is counted. Afterwards the server must still answer health checks
  and score a well-formed batch.

A crash is an exception other than a rejection in process, and over the wire an
``internal`` ingest error or a status other than the expected ones. Memory: the process's
resident set is sampled 20 times; the peak (getrusage) is reported, and the state the
caps bound (live requests, waiting steps, /metrics series) is read at the end. /metrics must
not contain any request id the fuzzer sent.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._common import (
    RELIABILITY_MD,
    RESULTS_DIR,
    Table,
    load_note,
    machine_info,
    update_markdown_section,
    write_json,
)
from benchmarks._fuzz_inputs import KINDS, FuzzInputs
from benchmarks._traffic import write_spec
from sidecar.probe.host.channel import ChannelSecurity, open_channel
from sidecar.protocol.batch import MAX_MESSAGE_BYTES
from sidecar.protocol.circuitwatch.v1 import ingest_pb2
from sidecar.server.auth import IngestAuth
from sidecar.server.ingest import IngestService
from sidecar.server.pipeline import Rejected
from sidecar.server.service import Sidecar
from sidecar.spec.load import load_spec
from sidecar.spec.schema import CircuitSpec

STREAM_INPUTS = 1000  # in process: inputs per simulated stream, and between ticks
WIRE_STREAM_INPUTS = 100
TOKEN = "fuzz-token-0123456789"
EXPECTED_STATUS = {"OK", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}


@dataclass
class InProcess:
    examples: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=collections.Counter)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    crashes: int = 0
    crash_samples: list[str] = field(default_factory=list)
    rss_mib: list[tuple[int, float]] = field(default_factory=list)  # (inputs so far, RSS)
    live_requests: int = 0
    max_requests: int = 0
    pending_steps: int = 0
    pending_bytes: int = 0
    metric_series: int = 0
    request_ids_in_metrics: int = 0


@dataclass
class OverWire:
    messages: int = 0
    streams: int = 0
    seconds: float = 0.0
    status_codes: dict[str, int] = field(default_factory=collections.Counter)
    internal_errors: float = 0.0
    unauthenticated_counted: float = 0.0
    alive_after: bool = False
    crashes: int = 0


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fuzz_in_process(
    spec: CircuitSpec,
    seed: int,
    examples: int,
    checkpoint: Path | None = None,
    deadline: float | None = None,
) -> InProcess:
    """``examples`` inputs of seed ``seed`` through one sidecar's ingest handler, or fewer if
    ``time.time()`` passes ``deadline`` first; prints progress ten times, and then writes the
    counts so far to ``checkpoint``."""
    inputs = FuzzInputs(spec.hash, len(spec.components), seed)
    sidecar = Sidecar(spec, "unix:///unused")
    pipeline = sidecar.pipeline
    service = IngestService(pipeline, spec.hash, pipeline.scorer.num_components)
    result = InProcess(examples=examples, max_requests=pipeline.requests.max_requests)
    by_kind = collections.defaultdict(collections.Counter)
    sample_every = max(1, examples // 20)
    now, senders, source = 1000.0, set(), 0
    started = time.perf_counter()
    done = 0
    for i in range(examples):
        if deadline is not None and i % 100 == 0 and time.time() > deadline:
            break
        done = i + 1
        if i % STREAM_INPUTS == 0 and i:
            for engine_id in senders:  # the stream ends
                service.engines.closed(engine_id, now)
            service.tick(now)
            senders, source = set(), source + 1
        if i % sample_every == 0:
            result.rss_mib.append((i, rss_mib()))
            if i and i % (sample_every * 2) == 0:
                print(f"seed {seed}: {i:,}/{examples:,} inputs, {result.crashes} crashes, RSS "
                      f"{result.rss_mib[-1][1]:.0f} MiB, {time.perf_counter() - started:.0f} s",
                      flush=True)  # fmt: skip
                if checkpoint is not None:
                    write_json(checkpoint, {"inputs_done": i, "partial": result})
        kind, raw = inputs.next()
        now += 0.001
        try:
            service.accept(raw, now, senders, source)
            outcome = "accepted"
        except Rejected as error:
            outcome = f"rejected:{error.reason}"
        except Exception:
            outcome = "crash"
            result.crashes += 1
            if len(result.crash_samples) < 5:
                result.crash_samples.append(f"input {i} ({kind}): {traceback.format_exc()}")
        result.outcomes[outcome] += 1
        by_kind[kind][outcome] += 1
    pipeline.tick(now)
    result.seconds = time.perf_counter() - started
    result.examples = done
    result.rss_mib.append((done, rss_mib()))
    result.by_kind = {k: dict(v) for k, v in sorted(by_kind.items())}
    result.outcomes = dict(result.outcomes)
    result.live_requests = len(pipeline.requests)
    result.pending_steps = len(pipeline.joiner)
    result.pending_bytes = pipeline.joiner.pending_bytes
    text = generate_latest(sidecar.registry).decode()
    result.metric_series = sum(
        len(family.samples) for family in text_string_to_metric_families(text)
    )
    result.request_ids_in_metrics = text.count("req-")
    return result


def fuzz_in_processes(
    spec: CircuitSpec, seed: int, examples: int, workers: int, deadline: float | None
) -> InProcess:
    """``fuzz_in_process`` in ``workers`` processes (seeds ``seed``, ``seed + 1``, ...), merged:
    counts added, state and memory from the worker that held the most."""
    if workers == 1:
        return fuzz_in_process(spec, seed, examples, deadline=deadline)
    shares = [examples // workers + (i < examples % workers) for i in range(workers)]
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.starmap(
            fuzz_in_process,
            [
                (spec, seed + i, n, Path(tempfile.gettempdir()) / f"fuzz-{seed + i}.json", deadline)
                for i, n in enumerate(shares)
            ],
        )
    merged = InProcess(
        examples=sum(part.examples for part in parts), seconds=time.perf_counter() - started
    )
    by_kind = collections.defaultdict(collections.Counter)
    for part in parts:
        merged.outcomes.update(part.outcomes)
        for kind, counts in part.by_kind.items():
            by_kind[kind].update(counts)
        merged.crashes += part.crashes
        merged.crash_samples += part.crash_samples
    merged.outcomes = dict(merged.outcomes)
    merged.by_kind = {k: dict(v) for k, v in sorted(by_kind.items())}
    fullest = max(parts, key=lambda part: part.rss_mib[-1][1])
    for name in ("rss_mib", "live_requests", "max_requests", "pending_steps", "pending_bytes"):
        setattr(merged, name, getattr(fullest, name))
    merged.metric_series = max(part.metric_series for part in parts)
    merged.request_ids_in_metrics = sum(part.request_ids_in_metrics for part in parts)
    return merged


def fuzz_over_wire(spec: CircuitSpec, inputs: FuzzInputs, messages: int) -> OverWire:
    result = OverWire()
    auth = IngestAuth(token=TOKEN)
    with Sidecar(spec, "127.0.0.1:0", auth=auth, tracer_provider=TracerProvider()) as sidecar:
        started = time.perf_counter()
        sent = 0
        while sent < messages:
            chunk = [inputs.next()[1] for _ in range(min(WIRE_STREAM_INPUTS, messages - sent))]
            if result.streams % 25 == 2:
                chunk[-1] = os.urandom(MAX_MESSAGE_BYTES + 1)
            code = _stream(sidecar.address, chunk, token=result.streams % 10 != 1)
            result.status_codes[code] += 1
            result.streams += 1
            sent += len(chunk)
        result.messages = sent
        result.seconds = time.perf_counter() - started
        result.alive_after = _still_serving(sidecar.address, spec, inputs)
        registry = sidecar.registry
        name = "circuitwatch_ingest_errors_total"
        result.internal_errors = registry.get_sample_value(name, {"reason": "internal"}) or 0.0
        result.unauthenticated_counted = (
            registry.get_sample_value(name, {"reason": "unauthenticated"}) or 0.0
        )
    result.status_codes = dict(result.status_codes)
    unexpected = sum(n for c, n in result.status_codes.items() if c not in EXPECTED_STATUS)
    result.crashes = int(result.internal_errors) + unexpected + (not result.alive_after)
    return result


def _stream(address: str, chunk: list[bytes], token: bool) -> str:
    security = ChannelSecurity(token=TOKEN) if token else None
    with open_channel(address, (), security) as channel:
        stream = channel.stream_unary(
            "/circuitwatch.v1.Ingest/Stream",
            response_deserializer=ingest_pb2.StreamSummary.FromString,
        )
        try:
            stream(iter(chunk), timeout=120)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name


def _still_serving(address: str, spec: CircuitSpec, inputs: FuzzInputs) -> bool:
    message = inputs.batch(tokens=4, new_requests=1)
    message.spec_hash, message.world_size, message.rank = spec.hash, 1, 0
    with open_channel(address, (), ChannelSecurity(token=TOKEN)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="circuitwatch.v1.Ingest"), timeout=10
        )
        summary = channel.stream_unary(
            "/circuitwatch.v1.Ingest/Stream",
            response_deserializer=ingest_pb2.StreamSummary.FromString,
        )(iter([message.SerializeToString()]), timeout=10)
    return health.status == health_pb2.HealthCheckResponse.SERVING and (
        summary.batches_accepted == 1
    )


def _tables(local: InProcess, wire: OverWire, peak_rss_mib: float) -> list[Table]:
    total = local.examples + wire.messages
    seconds = local.seconds + wire.seconds
    summary = Table(
        "Ingest fuzz",
        ("", "in process", "over gRPC"),
        (
            ("inputs", f"{local.examples:,}", f"{wire.messages:,} in {wire.streams} streams"),
            ("time", f"{local.seconds:.0f} s", f"{wire.seconds:.0f} s"),
            ("inputs/s", f"{local.examples / max(local.seconds, 1e-9):,.0f}",
             f"{wire.messages / max(wire.seconds, 1e-9):,.0f}"),
            ("crashes", str(local.crashes), str(wire.crashes)),
            ("outcomes", _counts(local.outcomes), _counts(wire.status_codes)),
            ("RSS first / last sample", f"{local.rss_mib[0][1]:.0f} / {local.rss_mib[-1][1]:.0f}"
             " MiB", f"peak {peak_rss_mib:.0f} MiB (whole run)"),
            ("state at end", f"{local.live_requests} live requests (cap {local.max_requests}), "
             f"{local.pending_steps} waiting steps", f"alive after: {wire.alive_after}"),
            ("/metrics", f"{local.metric_series} series, {local.request_ids_in_metrics} "
             "request ids", f"{wire.unauthenticated_counted:.0f} unauthenticated counted"),
            ("total", f"{total:,} inputs in {seconds:.0f} s", ""),
        ),
    )  # fmt: skip
    kinds = Table(
        "In process, by kind of input",
        ("kind", "inputs", "accepted", "rejected (by reason)", "crashes"),
        tuple(
            (
                kind,
                f"{sum(counts.values()):,}",
                f"{counts.get('accepted', 0):,}",
                _counts({k.split(":", 1)[1]: v for k, v in counts.items() if ":" in k}),
                str(counts.get("crash", 0)),
            )
            for kind, counts in local.by_kind.items()
        ),
    )
    return [summary, kinds]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_ingest", description=__doc__)
    parser.add_argument("--examples", type=int, default=1_000_000, help="inputs in all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wire-share", type=float, default=0.01, help="share sent over gRPC (default 0.01)"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR / "fuzz-ingest.json", help="result JSON"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes for the in-process share (default 1)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="stop the in-process share after this long (the inputs run are reported)",
    )
    parser.add_argument(
        "--update-docs", action="store_true", help="rewrite the fuzz section of RELIABILITY.md"
    )
    args = parser.parse_args(argv)
    command = "python -m benchmarks.fuzz_ingest " + " ".join(argv or sys.argv[1:])
    load_before = os.getloadavg()
    wire_messages = max(WIRE_STREAM_INPUTS, int(args.examples * args.wire_share))
    with tempfile.TemporaryDirectory(prefix="cw-fuzz-") as tmp:
        spec = load_spec(write_spec(Path(tmp)))
    local_examples = max(0, args.examples - wire_messages)
    deadline = None if args.max_seconds is None else time.time() + args.max_seconds
    local = fuzz_in_processes(spec, args.seed, local_examples, args.workers, deadline)
    wire_inputs = FuzzInputs(spec.hash, len(spec.components), args.seed + args.workers)
    wire = fuzz_over_wire(spec, wire_inputs, wire_messages)
    # ru_maxrss is in KiB: of this process, and of the largest worker process.
    usage = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    peak = max(u.ru_maxrss for u in usage) / 1024
    tables = _tables(local, wire, peak)
    for table in tables:
        table.print()
    if args.update_docs:
        body = "\n\n".join(f"**{t.title}**\n\n{t.markdown()}" for t in tables)
        update_markdown_section("fuzz-ingest", f"`{command}`\n\n{body}", RELIABILITY_MD)
    crashes = local.crashes + wire.crashes
    for sample in local.crash_samples:
        print(sample, file=sys.stderr)
    write_json(
        args.output,
        {
            "benchmark": "fuzz_ingest",
            "command": command,
            "seed": args.seed,
            "workers": args.workers,
            "kinds": KINDS,
            "examples_requested": args.examples,
            "examples": local.examples + wire.messages,
            "seconds": local.seconds + wire.seconds,
            "crashes": crashes,
            "peak_rss_mib": peak,
            "in_process": local,
            "over_wire": wire,
            "machine": machine_info(),
            "load": load_note(load_before, os.getloadavg()),
        },
    )
    print(f"{'no crash' if not crashes else f'{crashes} CRASHES'}; wrote {args.output}")
    return 1 if crashes or local.request_ids_in_metrics else 0


if __name__ == "__main__":
    sys.exit(main())
