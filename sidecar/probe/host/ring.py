"""Host memory for drained steps: rows handed out, and given back, first in first out.

Every engine step copies its rows of the taps' values (and its positions) out of the
device buffers, which the next forward overwrites, and the shipper holds them until the step
is sent, a few tens of milliseconds later. ``HostRing`` preallocates that memory once: one
block for the values and one for positions (pinned on a GPU, so the copies run
asynchronously), of which each step takes a contiguous span of rows. Steps leave the shipper
oldest first, so the rows in use are one circular range and taking a span is two comparisons.
When the ring is full, ``take`` says so and the caller drops the step.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Span:
    """Rows ``start:stop`` of every block of a ring."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


class HostRing:
    def __init__(self, width: int, rows: int, pin: bool = False):
        self.rows = rows
        self.values = torch.empty((rows, width), pin_memory=pin)
        self.positions = torch.empty(rows, dtype=torch.long, pin_memory=pin)
        self._lock = threading.Lock()
        self._head = 0  # where the next span starts, unless it wraps to 0
        self._in_use: collections.OrderedDict[int, bool] = collections.OrderedDict()
        # span start -> given back yet; oldest first. Spans come back oldest first, but a
        # span given back early is only freed once every older one is back.

    def take(self, n: int) -> Span | None:
        """A span of ``n`` rows, or None when the ring has no room for it now."""
        if n == 0:
            return Span(0, 0)
        with self._lock:
            if not self._in_use:
                start = 0 if n <= self.rows else None
            else:
                oldest = next(iter(self._in_use))
                if self._head > oldest:  # in use: oldest..head; free: head..end and 0..oldest
                    if self._head + n <= self.rows:
                        start = self._head
                    else:
                        start = 0 if n <= oldest else None
                else:  # wrapped around; free: head..oldest
                    start = self._head if self._head + n <= oldest else None
            if start is None:
                return None
            self._head = start + n
            self._in_use[start] = False
            return Span(start, start + n)

    def give_back(self, span: Span) -> None:
        if not len(span):
            return
        with self._lock:
            self._in_use[span.start] = True
            while self._in_use and next(iter(self._in_use.values())):
                self._in_use.popitem(last=False)

    def in_use(self) -> int:
        """Spans taken and not yet freed."""
        with self._lock:
            return len(self._in_use)
