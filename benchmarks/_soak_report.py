"""The soak's report: tables (printed and Markdown for RELIABILITY.md) and the PNG plot."""

from __future__ import annotations

from pathlib import Path

from benchmarks._common import REPO_ROOT, Spread, Table
from benchmarks._sidecar_process import BATCHES, SCORED, TOKENS, total
from benchmarks.soak import BIN_S, FLOW_WINDOW_S, FLOW_WINDOWS, SoakResult

_GAP_S = 5.0  # no reading for longer: the sidecar was down or stopped
_FAULT_COLOURS = {"kill": "tab:red", "stop": "tab:orange"}


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def _spread(values: list[float]) -> str:
    return f"{Spread.of(values).text()} (n={len(values)})" if values else "-"


def tables(result: SoakResult) -> list[Table]:
    s = result.settings
    summary = Table(
        f"Soak: {s.model}, {result.seconds / 60:.1f} min of load from {s.clients} clients "
        f"(max {s.max_tokens} tokens), a sidecar fault every {s.restart_every_s:g} s "
        f"({s.outage_s:g} s each)",
        ("requests served", "failed", "output tokens", "latency p50 / p99 s",
         f"tokens/s, {BIN_S:g}-s bins without a fault", "tokens/s, bins with a fault"),
        ((f"{result.requests_served:,}", f"{result.requests_failed:,}",
          f"{result.output_tokens:,}",
          f"{result.latency_s['p50']:.1f} / {result.latency_s['p99']:.1f}",
          _spread(result.tokens_per_s(False)), _spread(result.tokens_per_s(True))),),
    )  # fmt: skip
    faults = Table(
        "Sidecar faults: seconds from the sidecar accepting again (new process listening, or "
        f"SIGCONT) to the first batch, and to batches flowing ({FLOW_WINDOWS} x "
        f"{FLOW_WINDOW_S:g}-s windows)",
        ("#", "fault", "at s", "first batch s", "flowing s"),
        tuple(
            (str(i + 1), f.kind, f"{f.at_s:.0f}", _s(f.first_batch_s), _s(f.flowing_s))
            for i, f in enumerate(result.faults)
        ),
    )
    return [summary, faults, _books(result), _memory(result)]


def _books(result: SoakResult) -> Table:
    """Each sidecar incarnation's last reading: batches, tokens, and every drop/error counter."""
    lives = result.incarnations
    keys = sorted({k for life in lives for k in life.drops})
    rows = [
        ("started by", *(life.started_by for life in lives)),
        ("lived s", *(f"{life.started_s:.0f}-{(life.ended_s or result.seconds):.0f}"
                      for life in lives)),
        (BATCHES, *(f"{total(life.last, BATCHES):,.0f}" for life in lives)),
        (TOKENS, *(f"{total(life.last, TOKENS):,.0f}" for life in lives)),
        (SCORED, *(f"{total(life.last, SCORED):,.0f}" for life in lives)),
    ]  # fmt: skip
    rows += [(key, *(f"{life.drops.get(key, 0):,.0f}" for life in lives)) for key in keys]
    if not keys:
        rows.append(("drop / error counters", *("none exported" for _ in lives)))
    rows.append(("RSS max MiB", *(f"{_sidecar_rss_max(result, life):.0f}" for life in lives)))
    return Table(
        "Sidecar books: each incarnation's last /metrics reading (counters restart with the "
        "process; a stopped sidecar keeps its incarnation)",
        ("counter", *(f"sidecar {life.index}" for life in lives)),
        tuple(tuple(row) for row in rows),
    )


def _sidecar_rss_max(result: SoakResult, life) -> float:
    end = life.ended_s if life.ended_s is not None else result.seconds
    found = [
        row["sidecar"]
        for t, row in result.rss_samples
        if "sidecar" in row and life.started_s <= t <= end
    ]
    return max(found, default=float("nan"))


def _memory(result: SoakResult) -> Table:
    rows = tuple(
        (role, f"{t.start:.0f}", f"{t.end:.0f}", f"{t.growth:+.1f}", f"{t.slope_per_min:+.2f}",
         f"{t.high:.0f}", "yes" if result.rss_bounded(role) else "NO")
        for role, t in sorted(result.memory.items())
    )  # fmt: skip
    rows += (("sidecar (every incarnation)", "", "", "", "", f"{result.sidecar_rss_mib_max:.0f}",
              ""),)  # fmt: skip
    return Table(
        "Resident memory (MiB) after a 20 % warm-up: start and end are medians of the first "
        "and last quarter of the samples",
        ("process", "start", "end", "growth", "slope MiB/min", "max", "bounded"),
        rows,
    )


def plot(result: SoakResult, path: Path) -> Path:
    """RSS per process over time with the faults marked, and throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (engine, sidecar, traffic) = plt.subplots(
        3, 1, figsize=(10, 9), sharex=True, height_ratios=(3, 2, 2)
    )
    roles = sorted({role for _, row in result.rss_samples for role in row} - {"sidecar"})
    for role in roles:
        points = [(t / 60, row[role]) for t, row in result.rss_samples if role in row]
        engine.plot(*zip(*points, strict=True), label=role)
    engine.set_ylabel("RSS MiB")
    engine.set_title(f"vLLM server processes ({result.settings.model})")
    for life in result.incarnations:
        end = life.ended_s if life.ended_s is not None else result.seconds
        points = [
            (t / 60, row["sidecar"])
            for t, row in result.rss_samples
            if "sidecar" in row and life.started_s <= t <= end
        ]
        if points:
            sidecar.plot(*zip(*points, strict=True), color="tab:purple")
    sidecar.set_ylabel("RSS MiB")
    sidecar.set_title("sidecar (circuitwatch serve), one line per process")
    minutes = [b.start_s / 60 for b in result.bins]
    traffic.step(minutes, [b.output_tokens / BIN_S for b in result.bins], where="post",
                 label=f"output tokens/s ({BIN_S:g}-s bins)", color="tab:blue")  # fmt: skip
    traffic.set_ylabel("output tokens/s")
    rates = traffic.twinx()
    rates.plot(*_batch_rates(result), color="tab:green", label="batches/s at the sidecar")
    rates.set_ylabel("batches/s")
    traffic.set_xlabel("minutes into the load")
    traffic.set_title("throughput")
    marked = set()
    for ax in (engine, sidecar, traffic):
        for f in result.faults:
            end = f.back_s + (f.flowing_s or 0.0)
            label = None if f.kind in marked else f"sidecar {f.kind}: fault until flowing"
            ax.axvspan(f.at_s / 60, end / 60, color=_FAULT_COLOURS[f.kind], alpha=0.25, label=label)
            if ax is engine:
                marked.add(f.kind)
    engine.legend(loc="upper left", fontsize="small")
    handles, labels = traffic.get_legend_handles_labels()
    more, more_labels = rates.get_legend_handles_labels()
    traffic.legend(handles + more, labels + more_labels, loc="lower left", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _batch_rates(result: SoakResult) -> tuple[list[float], list[float]]:
    """Batches/s of one incarnation over at least a second (minutes, rate); NaN (a break in
    the line) where readings stop: a restart or a stop."""
    times, rates = [], []
    last = None
    for t, life, batches in result.batch_samples:
        if last is not None and last[1] == life and t - last[0] < 1.0:
            continue
        if last is not None and last[1] == life and t - last[0] <= _GAP_S:
            times.append(t / 60)
            rates.append((batches - last[2]) / (t - last[0]))
        elif last is not None:
            times.append(t / 60)
            rates.append(float("nan"))
        last = (t, life, batches)
    return times, rates


def report_markdown(result: SoakResult, command: str, load: str, png: Path) -> str:
    from benchmarks._common import machine_info

    try:
        image = png.resolve().relative_to(REPO_ROOT)
    except ValueError:
        image = png
    lines = [f"`{command}` on {machine_info()['cpu_model']}; {load}.", ""]
    for table in tables(result):
        lines += [f"**{table.title}**", "", table.markdown(), ""]
    lines += [f"![soak: RSS per process and throughput, faults marked]({image})", ""]
    lines += [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in result.verdicts().items()]
    if result.errors:
        lines += ["", "Failed requests (distinct errors):", ""]
        lines += [f"- `{error}`" for error in result.errors]
    return "\n".join(lines)
