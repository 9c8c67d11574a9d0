"""Per-step drain: copy the taps' buffers out after a forward, without syncing the device.

``Drain.collect`` runs on the engine thread once per step, after the model runner launched
the forward. It copies the first ``num_tokens`` rows of every tap buffer and of the
position buffer (padding rows never leave the device) into a span of the ``HostRing`` and
returns a ``PendingStep``: that span and the step's metadata. Everything else (waiting for
the copy, attribution, sampling, building the ``TokenBatch``) happens in ``Drain.resolve``
on the shipper's thread, once for all the steps that go into one message.

On a GPU the ring is pinned host memory, the copies are ``non_blocking`` on the current
stream and a CUDA event fences them; ``resolve`` waits on that event. When the ring has no
room (the shipper is far behind) the step is dropped and counted (``drain_backlog``)
rather than waiting. On a CPU the copies are plain copies.

Below a sampling level of 1 (the latency budget's, ``sidecar.probe.host.budget``) ``collect``
first chooses the rows to keep (``SpreadSample``) and copies only those; a step left with
no row and no finished request is not copied or queued at all. Choosing reads the step's
positions on the host, which on a CPU are in host memory already. On a GPU it would need
a sync, so there the level stays at 1; what would keep it there without one is a fixed
number of slots chosen on the device (``torch.nonzero_static`` of the same test on the
position buffer, written into a [slots, k] buffer), which keeps shapes static under CUDA
graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sidecar.probe.graph.taps import TapSet
from sidecar.probe.host.attribution import RequestIds, SamplePolicy, SpreadSample, attribute
from sidecar.probe.host.ring import HostRing, Span
from sidecar.probe.host.shipper import DropCounts
from sidecar.probe.vllm_internals import StepLayout
from sidecar.protocol.batch import ProbeOverhead, TokenBatch

DRAIN_BACKLOG = "drain_backlog"


@dataclass(frozen=True)
class BatchIdentity:
    """What every batch of this probe says about its origin."""

    spec_hash: str
    model_name: str
    rank: int
    world_size: int
    randomized_ids: bool = True  # vLLM added a random suffix to request ids


class Drain:
    def __init__(
        self,
        taps: TapSet,
        identity: BatchIdentity,
        sample: SamplePolicy,
        drops: DropCounts,
        ring_rows: int,
        trace_parent: Callable[[str], str | None] = lambda request_id: None,
        overhead: Callable[[], ProbeOverhead | None] = lambda: None,
    ):
        """``trace_parent``: a request's W3C traceparent by engine id, given once;
        ``overhead``: what the probe cost since the last batch, taken once per batch."""
        self.taps = taps
        self.identity = identity
        self.sample = sample
        self.drops = drops
        self._cuda = taps.positions.positions.device.type == "cuda"
        widths = [tap.values.shape[1] for tap in taps.taps]
        self.ring = HostRing(widths, ring_rows, pin=self._cuda)
        self.request_ids = RequestIds(identity.randomized_ids)
        self.trace_parent = trace_parent
        self.overhead = overhead
        self.spread = SpreadSample()
        self._unsent_traces: dict[str, str] = {}  # shipper thread only: until a batch names it

    def collect(
        self, step: int, layout: StepLayout, finished: list[str], level: float = 1.0
    ) -> PendingStep | None:
        """Start copying this step's rows out, those ``level`` keeps; None when there is
        nothing to send, or (counted) when the ring is full."""
        # Named here, every step, before any drop: every rank names requests alike.
        ids = self.request_ids.step(layout.req_ids, finished)
        n = layout.num_tokens
        positions = self.taps.positions.positions
        kept = None
        if level < 1.0 and n:
            kept = self.spread.select(layout, positions.numpy(), level)
            n = kept.shape[0]
        self.spread.forget(finished)
        if kept is not None and n == 0 and not finished:
            return None  # the level kept nothing: no copy, no message
        span = self.ring.take(n)
        if span is None:
            self.drops.add(DRAIN_BACKLOG, n)
            return None
        rows = slice(span.start, span.stop)
        if kept is None:
            for tap, host in zip(self.taps.taps, self.ring.values, strict=True):
                host[rows].copy_(tap.values[:n], non_blocking=self._cuda)
            self.ring.positions[rows].copy_(positions[:n], non_blocking=self._cuda)
        else:
            index = torch.from_numpy(kept)
            for tap, host in zip(self.taps.taps, self.ring.values, strict=True):
                torch.index_select(tap.values, 0, index, out=host[rows])
            torch.index_select(positions, 0, index, out=self.ring.positions[rows])
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        traces = {
            name: traceparent
            for internal, name in zip(layout.req_ids, ids.req_ids, strict=True)
            if (traceparent := self.trace_parent(internal)) is not None
        }
        return PendingStep(
            self.ring, span, event, step, layout, ids.req_ids, ids.finished, traces, kept
        )

    def resolve(self, steps: list[PendingStep]) -> TokenBatch | None:
        """One ``TokenBatch`` of ``steps`` (in order), or None when none has anything to send.

        Runs on the shipper's thread, once for all the steps gathered since the last
        message: every step's rows are attributed and sampled in one pass of array ops.
        """
        try:
            values, positions = zip(*(p.arrays() for p in steps), strict=True)
            # The steps' requests, one entry per (step, request): "slots" of one big layout.
            slots = StepLayout(
                [r for p in steps for r in p.layout.req_ids],
                np.concatenate([p.layout.num_scheduled for p in steps]),
                np.concatenate([p.layout.prompt_lens for p in steps]),
            )
            starts = np.cumsum([0, *(p.layout.num_tokens for p in steps[:-1])])
            kept = np.concatenate([s + p.kept_rows() for s, p in zip(starts, steps, strict=True)])
            rows = attribute(slots, np.concatenate(positions), kept)
            sizes = [p.tokens for p in steps]
            keep = self.sample.select(rows, slots.req_ids, sizes)
            columns = [
                np.concatenate([v[i] for v in values])[keep][:, shipped]
                for i, shipped in enumerate(self.taps.shipped)
            ]
        finally:
            for pending in steps:
                pending.discard()
        finished = [p.finished for p in steps]
        for pending in steps:
            self._unsent_traces.update(pending.traces)
        step_of_row = np.repeat(np.arange(len(steps)), sizes)
        step_tokens = np.bincount(step_of_row[keep], minlength=len(steps))
        listed = [i for i in range(len(steps)) if step_tokens[i] or finished[i]]
        if not listed:
            return None
        rows = rows.take(keep)
        # Slots -> requests: a request in several steps is one request of the batch, and
        # requests are numbered in order of first appearance.
        numbers: dict[str, int] = {}
        request_of_slot = np.array(
            [numbers.setdefault(name, len(numbers)) for p in steps for name in p.names],
            dtype=np.int64,
        )
        present, request_index = np.unique(request_of_slot[rows.request_index], return_inverse=True)
        names = list(numbers)
        k = self.taps.component_ids.shape[0]
        values = np.concatenate(columns, axis=1) if columns else np.zeros((keep.shape[0], k))
        identity = self.identity
        request_ids = [names[r] for r in present]
        # Each traceparent goes with the first batch that names its request.
        traces = {r: self._unsent_traces.pop(r) for r in request_ids if r in self._unsent_traces}
        for name in (r for done in finished for r in done):
            self._unsent_traces.pop(name, None)
        return TokenBatch(
            spec_hash=identity.spec_hash,
            model_name=identity.model_name,
            steps=tuple(steps[i].step for i in listed),
            component_ids=self.taps.component_ids,
            request_ids=request_ids,
            request_index=request_index.astype(np.uint32),
            positions=rows.positions,
            phases=rows.phases,
            values=values.astype(np.float32),
            finished_request_ids=[r for i in listed for r in finished[i]],
            rank=identity.rank,
            world_size=identity.world_size,
            step_tokens=tuple(int(step_tokens[i]) for i in listed),
            step_finished=tuple(len(finished[i]) for i in listed),
            traceparents=traces,
            overhead=self.overhead(),
        )


class PendingStep:
    """One step's rows in the ring, until ``Drain.resolve`` (shipper thread) takes them."""

    def __init__(
        self,
        ring: HostRing,
        span: Span,
        event: torch.cuda.Event | None,
        step: int,
        layout: StepLayout,
        names: list[str],
        finished: list[str],
        traces: dict[str, str],
        kept: np.ndarray | None = None,
    ):
        """``names``: the exported ids of ``layout.req_ids``; ``finished``: exported ids;
        ``traces``: traceparents of requests by exported id; ``kept``: which of the
        layout's rows the span holds (None: all)."""
        self._ring = ring
        self._span: Span | None = span
        self._event = event
        self.step = step
        self.layout = layout
        self.names = names
        self.finished = finished
        self.traces = traces
        self.tokens = len(span)  # what a drop of this step loses
        self._kept = kept

    def kept_rows(self) -> np.ndarray:
        """Indices of the layout's rows the span holds, ascending."""
        return np.arange(self.layout.num_tokens) if self._kept is None else self._kept

    def arrays(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(each tap's rows, positions) as host arrays, once the device copy has landed."""
        assert self._span is not None, "read after discard"
        if self._event is not None:
            self._event.synchronize()
        rows = slice(self._span.start, self._span.stop)
        return [v[rows].numpy() for v in self._ring.values], self._ring.positions[rows].numpy()

    def discard(self) -> None:
        if self._span is not None:
            self._ring.give_back(self._span)
            self._span = None
