"""Soak: steady chat load on the real engine while the sidecar is killed and stopped, for minutes.

    python -m benchmarks.soak                                   # SmolLM2, 30 minutes
    python -m benchmarks.soak --minutes 5 --restart-every 60    # a shorter run
    python -m benchmarks.soak --model reference --minutes 2 --restart-every 30 --outage 5
    python -m benchmarks.soak --update-docs                     # also rewrite RELIABILITY.md

What runs: ``circuitwatch serve`` (the sidecar, its own process, Unix socket) and vLLM's
OpenAI server (``python -m vllm.entrypoints.openai.api_server``, default compiled mode,
prefix caching off so every token passes the probes) with the Circuitwatch plugin and the
model's own spec. ``--clients`` threads of the real ``openai`` client send chat requests
back to back (plain completions for a model without a chat template), never retrying.

Every ``--restart-every`` seconds the sidecar suffers a fault, alternately:
  kill   SIGKILL (its socket file stays behind), ``--outage`` seconds down, a new
         ``circuitwatch serve`` on the same socket and metrics port;
  stop   SIGSTOP, ``--outage`` seconds frozen, SIGCONT.

Figures:
  requests served / failed      from the client (target: 0 failed)
  reconnect                     from the sidecar accepting again (the new process's socket
                                accepts a connection; for stop, SIGCONT) to its
                                ``circuitwatch_batches_received_total`` rising ("first
                                batch", polled every 50 ms), and to batches "flowing": the
                                counter rising in each of 3 consecutive 0.5-s windows (after
                                a stop, the first batches may be ones queued before it)
  drops and errors              each sidecar incarnation's last reading of every
                                ``circuitwatch_*{drop,error,reject}*_total`` counter, by
                                labels (what the probes reported to it, and its own)
  RSS                           every ``--sample-every`` s, from /proc: the API server, the
                                engine core, the worker, other engine children, the sidecar;
                                start / end / slope after a 20 % warm-up
  throughput                    output tokens/s in 30-s bins, bins touched by a fault
                                (until batches flow again) apart from the others

Output: a table per figure, ``benchmarks/results/soak-<model>.json`` and ``.png`` (RSS per
process over time with the faults marked, and throughput); ``--update-docs`` rewrites the
soak section of RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._chat_load import ChatLoad, Completion
from benchmarks._common import (
    RESULTS_DIR,
    Trend,
    load_note,
    machine_info,
    percentiles,
    write_json,
)
from benchmarks._processes import MemorySampler, descendants, start_ticks, tree_rss
from benchmarks._sidecar_process import (
    BATCHES,
    DROP_PATTERN,
    Scrape,
    SidecarProcess,
    books,
    counters,
    total,
)

ENGINE_START_S = 900
BIN_S = 30.0  # a request's tokens count when it ends; SmolLM2's take 15 s here
POLL_S = 0.05
FLOW_WINDOW_S, FLOW_WINDOWS = 0.5, 3
RECONNECT_WAIT_S = 60.0
WARMUP = 0.2
RECONNECT_TARGET_S = 1.0
RSS_GROWTH_LIMIT = (64.0, 0.10)  # MiB, share of the start: whichever is larger
ENGINE_ROLES = ("api_server", "engine_core", "worker")


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2"
    minutes: float = 30.0
    restart_every_s: float = 180.0
    outage_s: float = 10.0
    clients: int = 4
    max_tokens: int = 64
    sample_every_s: float = 2.0
    kv_cache_mib: int = 512
    workdir: Path | None = None

    def faults(self) -> list[tuple[float, str]]:
        """(seconds into the load, "kill" | "stop"): alternating, each with time to recover."""
        found: list[tuple[float, str]] = []
        at = self.restart_every_s
        while at + self.outage_s + 15 < self.minutes * 60:
            found.append((at, "kill" if len(found) % 2 == 0 else "stop"))
            at += self.restart_every_s
        return found


@dataclass(frozen=True)
class Fault:
    kind: str  # "kill" | "stop"
    at_s: float  # fault began (seconds into the load)
    back_s: float  # sidecar accepting again: the new process's socket, or SIGCONT
    first_batch_s: float | None  # after back_s; None: none within RECONNECT_WAIT_S
    flowing_s: float | None


@dataclass
class Incarnation:
    """One ``circuitwatch serve`` process and its last /metrics reading."""

    index: int
    started_by: str  # "start" | "kill"
    started_s: float
    ended_s: float | None = None
    last: Scrape = field(default_factory=dict)

    @property
    def drops(self) -> Scrape:
        return counters(self.last, DROP_PATTERN)


@dataclass(frozen=True)
class Bin:
    start_s: float
    requests: int
    output_tokens: int
    faulted: bool  # overlaps a fault, from its start until batches flow again


def first_batch_at(samples: list[tuple[float, float]]) -> float | None:
    """The first time the count (relative to before the fault) is above 0."""
    return next((t for t, count in samples if count > 0), None)


def flowing_at(
    samples: list[tuple[float, float]], window_s: float = FLOW_WINDOW_S, windows: int = FLOW_WINDOWS
) -> float | None:
    """The first rise of the count from which it rises again in each of the following
    ``windows - 1`` windows of ``window_s``; None if the samples do not show one."""
    rises, previous = [], 0.0
    for t, count in samples:
        if count > previous:
            rises.append(t)
        previous = count
    end = samples[-1][0] if samples else 0.0
    for start in rises:
        if start + windows * window_s > end + 1e-9:
            return None  # not enough samples after it to tell
        if all(
            any(start + k * window_s <= r < start + (k + 1) * window_s for r in rises)
            for k in range(1, windows)
        ):
            return start
    return None


def throughput_bins(
    completions: list[Completion], seconds: float, faults: list[Fault]
) -> list[Bin]:
    """Completed requests and output tokens per ``BIN_S`` by end time, with fault overlap."""
    bins = []
    for i in range(int(seconds // BIN_S)):
        lo, hi = i * BIN_S, (i + 1) * BIN_S
        done = [c for c in completions if c.ok and lo <= c.end_s < hi]
        faulted = any(
            f.at_s < hi and lo < f.back_s + (f.flowing_s or RECONNECT_WAIT_S) for f in faults
        )
        bins.append(Bin(lo, len(done), sum(c.output_tokens for c in done), faulted))
    return bins


@dataclass
class SoakResult:
    settings: Settings
    seconds: float
    requests_served: int
    requests_failed: int
    errors: list[str]  # distinct, at most 10
    output_tokens: int
    latency_s: dict[str, float]  # of the requests served: p50, p99
    faults: list[Fault]
    incarnations: list[Incarnation]
    memory: dict[str, Trend]  # by role, after the warm-up
    sidecar_rss_mib_max: float
    bins: list[Bin]
    rss_samples: list[tuple[float, dict[str, float]]]
    batch_samples: list[tuple[float, int, float]]  # (s, incarnation, batches received)
    workdir: Path

    def tokens_per_s(self, faulted: bool) -> list[float]:
        return [b.output_tokens / BIN_S for b in self.bins if b.faulted == faulted]

    def rss_bounded(self, role: str) -> bool:
        trend = self.memory[role]
        mib, share = RSS_GROWTH_LIMIT
        return trend.growth <= max(mib, share * trend.start)

    def verdicts(self) -> dict[str, bool]:
        times = [f.first_batch_s for f in self.faults]
        found = {
            "0 failed requests": self.requests_failed == 0,
            f"first batch within {RECONNECT_TARGET_S:g} s of every restart": all(
                t is not None and t < RECONNECT_TARGET_S for t in times
            ),
        }
        mib, share = RSS_GROWTH_LIMIT
        for role in ENGINE_ROLES:
            if role in self.memory:
                name = f"{role} RSS growth after warm-up <= max({mib:g} MiB, {share:.0%})"
                found[name] = self.rss_bounded(role)
        return found


class Soak:
    """The processes of one soak run and the bookkeeping around them."""

    def __init__(self, settings: Settings, model_dir: Path, spec: Path, workdir: Path):
        from sidecar.monitoring import free_port

        self.settings = settings
        self.spec = spec
        self.workdir = workdir
        self.socket_path = workdir / "ingest.sock"
        self.metrics_port = free_port()
        self.api_port = free_port()
        self.incarnations: list[Incarnation] = []
        self.batch_samples: list[tuple[float, int, float]] = []
        self.start = time.monotonic()
        self.sidecar = self._start_sidecar("start")
        self.sidecar.wait_accepting(RECONNECT_WAIT_S)
        self.engine_log = open(workdir / "vllm.log", "w")
        self.engine = subprocess.Popen(
            _engine_command(settings, model_dir, self.api_port),
            env=_engine_env(spec, self.socket_path),
            stdout=self.engine_log,
            stderr=subprocess.STDOUT,
        )
        self.engine_children: dict[int, int | None] = {}  # pid -> start ticks

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def now(self) -> float:
        return time.monotonic() - self.start

    def _start_sidecar(self, started_by: str) -> SidecarProcess:
        index = len(self.incarnations)
        self.incarnations.append(Incarnation(index, started_by, self.now()))
        log = self.workdir / f"sidecar-{index}.log"
        return SidecarProcess(self.socket_path, self.spec, self.metrics_port, log)

    def read_sidecar(self) -> Scrape | None:
        """Scrapes the live sidecar, keeping the reading as its incarnation's latest."""
        scrape = self.sidecar.scrape() if not self.sidecar.paused else None
        if scrape is not None:
            incarnation = self.incarnations[-1]
            incarnation.last = books(scrape)
            self.batch_samples.append((self.now(), incarnation.index, total(scrape, BATCHES)))
        return scrape

    def wait_engine(self) -> None:
        from sidecar.monitoring import wait_until_up

        wait_until_up(f"{self.api}/health", self.engine, "vLLM", ENGINE_START_S)
        self._note_engine_children()

    def _note_engine_children(self) -> None:
        for pid in descendants(self.engine.pid):
            self.engine_children.setdefault(pid, start_ticks(pid))

    def idle_until(self, seconds: float) -> None:
        """Until ``seconds`` into the load: scrape the sidecar, watch the engine."""
        while self.now() < seconds:
            if self.engine.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.engine.returncode}; see its log")
            self.read_sidecar()
            time.sleep(min(self.settings.sample_every_s, max(0.0, seconds - self.now())))

    def fault(self, kind: str) -> Fault:
        at = self.now()
        self.read_sidecar()
        if kind == "kill":
            self.sidecar.kill()
            self.incarnations[-1].ended_s = self.now()
            time.sleep(self.settings.outage_s)
            self.sidecar = self._start_sidecar("kill")
            back = self.sidecar.wait_accepting(RECONNECT_WAIT_S)
            baseline = 0.0
        else:
            # The last reading before the stop; batches counted after it look like early
            # arrivals after SIGCONT, which is why "flowing" is reported beside "first batch".
            baseline = total(self.incarnations[-1].last, BATCHES)
            self.sidecar.pause()
            time.sleep(self.settings.outage_s)
            self.sidecar.resume()
            back = time.monotonic()
        samples = self._poll_batches(back, baseline)
        return Fault(kind, at, back - self.start, first_batch_at(samples), flowing_at(samples))

    def _poll_batches(self, back: float, baseline: float) -> list[tuple[float, float]]:
        """(seconds after ``back``, batches since ``baseline``) every POLL_S until flowing."""
        samples: list[tuple[float, float]] = []
        while time.monotonic() - back < RECONNECT_WAIT_S:
            scrape = self.read_sidecar()
            if scrape is not None:
                samples.append((time.monotonic() - back, total(scrape, BATCHES) - baseline))
                if flowing_at(samples) is not None:
                    break
            time.sleep(POLL_S)
        return samples

    def rss(self) -> dict[str, float]:
        return tree_rss(self.engine.pid, "api_server") if self.engine.poll() is None else {}

    def close(self) -> None:
        """Stops the sidecar and the engine; any engine process left is killed by its id."""
        from sidecar.monitoring import stop_process

        self.sidecar.stop()
        self.incarnations[-1].ended_s = self.incarnations[-1].ended_s or self.now()
        self._note_engine_children()
        stop_process(self.engine, timeout=60)
        self.engine_log.close()
        for pid, ticks in self.engine_children.items():
            if ticks is not None and start_ticks(pid) == ticks:  # still that process
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _engine_command(settings: Settings, model_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", settings.model,
            "--host", "127.0.0.1", "--port", str(port),
            "--gpu-memory-utilization", "0.2", "--no-enable-prefix-caching",
            "--max-model-len", "512", "--max-num-seqs", str(max(8, settings.clients)),
            "--kv-cache-memory-bytes", str(settings.kv_cache_mib * 2**20)]  # fmt: skip


def _engine_env(spec: Path, socket_path: Path) -> dict[str, str]:
    from sidecar.probe.config import ENV_ENDPOINT, ENV_SPEC

    return dict(os.environ, **{ENV_SPEC: str(spec), ENV_ENDPOINT: f"unix://{socket_path}"})


def run_soak(settings: Settings, log=print) -> SoakResult:
    """Runs the soak of ``settings``; raises RuntimeError when the setup itself fails."""
    from sidecar.demo import default_spec, has_chat_template
    from sidecar.models.registry import resolve_model

    model_dir = resolve_model(settings.model)
    spec = default_spec(settings.model)
    if spec is None:
        raise ValueError("--model must be a named model with a bundled spec (reference, smollm2)")
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="circuitwatch-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"logs in {workdir}; starting the sidecar and vLLM ({settings.model}) ...")
    soak = Soak(settings, model_dir, spec, workdir)
    load = sampler = None
    try:
        soak.wait_engine()
        chat = has_chat_template(model_dir)
        ChatLoad(soak.api, settings.model, chat, 0, settings.max_tokens, soak.start).request(0)
        _wait_first_batch(soak)
        log(f"engine up; {settings.minutes:g} min of load, faults at {settings.faults()}")
        soak.start = time.monotonic()  # the load's clock: everything after is relative to it
        soak.batch_samples.clear()
        soak.incarnations[-1].started_s = 0.0
        sampler = MemorySampler(
            [soak.rss, lambda: soak.sidecar.rss_mib()], settings.sample_every_s, soak.start
        )
        load = ChatLoad(
            soak.api, settings.model, chat, settings.clients, settings.max_tokens, soak.start
        )
        faults = []
        for at, kind in settings.faults():
            soak.idle_until(at)
            faults.append(soak.fault(kind))
            f = faults[-1]
            log(f"{f.at_s:7.1f} s  {kind:4s}  first batch {_s(f.first_batch_s)}, "
                f"flowing {_s(f.flowing_s)} after the sidecar accepted again; "
                f"{len(load.completions)} requests so far")  # fmt: skip
        soak.idle_until(settings.minutes * 60)
        seconds = soak.now()
        completions = load.close()
        soak.read_sidecar()
    finally:
        rss_samples = sampler.close() if sampler is not None else []
        soak.close()
        if load is not None:
            load.close(timeout_s=30)
    return _result(settings, soak, seconds, completions, faults, rss_samples)


def _wait_first_batch(soak: Soak) -> None:
    deadline = time.monotonic() + RECONNECT_WAIT_S
    while total(soak.read_sidecar(), BATCHES) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no batch reached the sidecar; see {soak.workdir}/vllm.log")
        time.sleep(0.5)


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _result(settings, soak, seconds, completions, faults, rss_samples) -> SoakResult:
    failed = [c for c in completions if not c.ok]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for t, row in rss_samples:
        for role, mib in row.items():
            series.setdefault(role, ([], []))
            series[role][0].append(t)
            series[role][1].append(mib)
    memory = {
        role: Trend.of(times, values, WARMUP)
        for role, (times, values) in series.items()
        if role != "sidecar" and len(values) > 1
    }
    return SoakResult(
        settings=settings,
        seconds=seconds,
        requests_served=len(completions) - len(failed),
        requests_failed=len(failed),
        errors=list(dict.fromkeys(c.error for c in failed))[:10],
        output_tokens=sum(c.output_tokens for c in completions),
        latency_s=percentiles([c.end_s - c.start_s for c in completions if c.ok]),
        faults=faults,
        incarnations=soak.incarnations,
        memory=memory,
        sidecar_rss_mib_max=max(series.get("sidecar", ([], [0.0]))[1]),
        bins=throughput_bins(completions, seconds, faults),
        rss_samples=rss_samples,
        batch_samples=soak.batch_samples,
        workdir=soak.workdir,
    )


def _arguments() -> argparse.ArgumentParser:
    d = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--model", default=d.model, help="smollm2 (default) or reference")
    parser.add_argument("--minutes", type=float, default=d.minutes, help="load duration")
    parser.add_argument(
        "--restart-every", type=float, default=d.restart_every_s, help="seconds between faults"
    )
    parser.add_argument(
        "--outage", type=float, default=d.outage_s, help="seconds the sidecar is down or stopped"
    )
    parser.add_argument("--clients", type=int, default=d.clients, help="client threads")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="per request")
    parser.add_argument(
        "--sample-every", type=float, default=d.sample_every_s, help="RSS/metrics interval, s"
    )
    parser.add_argument("--kv-cache-mib", type=int, default=d.kv_cache_mib, help="engine KV cache")
    parser.add_argument("--workdir", type=Path, help="logs (default: a new temporary folder)")
    parser.add_argument(
        "--output",
        type=Path,
        help="result JSON; the plot goes beside it (default benchmarks/results/soak-MODEL.json)",
    )
    parser.add_argument(
        "--update-docs", action="store_true", help="rewrite the soak section of RELIABILITY.md"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from benchmarks._soak_report import plot, report_markdown, tables

    args = _arguments().parse_args(argv)
    settings = Settings(
        model=args.model,
        minutes=args.minutes,
        restart_every_s=args.restart_every,
        outage_s=args.outage,
        clients=args.clients,
        max_tokens=args.max_tokens,
        sample_every_s=args.sample_every,
        kv_cache_mib=args.kv_cache_mib,
        workdir=args.workdir,
    )
    output = args.output or RESULTS_DIR / f"soak-{settings.model}.json"
    # SIGTERM stops the run as Ctrl-C does, so that no engine or sidecar outlives it.
    signal.signal(signal.SIGTERM, _interrupt)
    load_before = os.getloadavg()
    result = run_soak(settings)
    load = load_note(load_before, os.getloadavg())
    command = "python -m benchmarks.soak" + (" " + " ".join(argv) if argv else "")
    for table in tables(result):
        table.print()
    verdicts = result.verdicts()
    for name, ok in verdicts.items():
        print(f"{'met   ' if ok else 'MISSED'} {name}")
    png = plot(result, output.with_suffix(".png"))
    write_json(
        output,
        {
            "benchmark": "soak",
            "command": command,
            "machine": machine_info(),
            "load": load,
            "result": result,
            "targets_met": verdicts,
            "plot": png.name,
        },
    )
    print(f"wrote {output} and {png}")
    if args.update_docs:
        from benchmarks._common import RELIABILITY_MD, update_markdown_section

        body = report_markdown(result, command, load, png)
        update_markdown_section(f"soak-{settings.model}", body, RELIABILITY_MD)
        print(f"updated {RELIABILITY_MD}")
    return 0 if all(verdicts.values()) else 1


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
