"""Resident memory of a process tree, sampled over time, each process named by its role.

Read from ``/proc`` (Linux, where vLLM's CPU build and this project run). vLLM's OpenAI
server is one process tree: the API server (the process started), its engine core
(``VLLM::EngineCore``, titled with setproctitle) and, on the CPU build, a separate worker
(``VLLM::Worker``; ``VLLM::Worker_TP1`` ... under tensor parallelism; the CPU platform always
uses the multiprocess executor). Everything else in the tree (multiprocessing's resource
tracker, torch's compile workers) is summed as "other". The tree is walked afresh at each
sample, so processes that come and go are seen.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20
OTHER = "other"


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid``; None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process for good,
    since pids are reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> set[int]:
    """Every process below ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found: set[int] = set()
    frontier = [root]
    while frontier:
        for child in children.get(frontier.pop(), ()):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def role(pid: int) -> str:
    """``engine_core``, ``worker``, ``worker_tp1`` ... from a ``VLLM::<Name>`` title; else OTHER."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return OTHER
    if not title.startswith("VLLM::"):
        return OTHER
    name = title.removeprefix("VLLM::").strip()
    if name == "EngineCore" or name.startswith("EngineCore_"):
        return "engine_core"
    return name.lower()


def tree_rss(root: int, root_role: str) -> dict[str, float]:
    """MiB by role of ``root`` and its descendants (processes of one role summed)."""
    found: dict[str, float] = {}
    for pid, name in [(root, root_role)] + [(p, role(p)) for p in sorted(descendants(root))]:
        size = rss_bytes(pid)
        if size is not None:
            found[name] = found.get(name, 0.0) + size / MIB
    return found


class MemorySampler:
    """A daemon thread that records, every ``interval_s``, the RSS (MiB) of what ``sources``
    return: ``{role: MiB}`` per call, from a callable per source (so a restarted process is
    followed). Samples are ``(seconds since start, {role: MiB})``."""

    def __init__(self, sources, interval_s: float, start: float):
        self.sources = sources
        self.interval_s = interval_s
        self.start = start
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            row: dict[str, float] = {}
            for source in self.sources:
                row.update(source())
            self.samples.append((time.monotonic() - self.start, row))
            self._stop.wait(self.interval_s)

    def close(self) -> list[tuple[float, dict[str, float]]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples
