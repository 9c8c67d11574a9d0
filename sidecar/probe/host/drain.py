"""Per-step drain: copy the taps' buffers out after a forward, without syncing the device.

``Drain.collect`` runs on the engine thread once per step, after the model runner launched
the forward. It copies the first ``num_tokens`` rows of the taps' one buffer and of the
position buffer (padding rows never leave the device) into a span of the ``HostRing``, two
copies whatever the number of sites, and returns a ``PendingStep``: that span and the
step's metadata. Everything else (waiting for the copy, attribution, sampling, building the
``TokenBatch``) happens in ``Drain.resolve`` on the shipper's thread, once for all the steps
that go into one message.

On a GPU the ring is pinned host memory, the copies are ``non_blocking`` on the current
stream and a CUDA event fences them; ``resolve`` waits on that event. When the ring has no
room (the shipper is far behind) the step is dropped and counted (``drain_backlog``)
rather than waiting. On a CPU the copies are plain copies.

Below a sampling level of 1 (the latency budget's, ``sidecar.probe.host.budget``) ``collect``
first chooses the rows to keep (``SpreadSample``) and copies only those; a step left with
no row and no finished request is not copied or queued at all. Choosing needs only where
each request starts in the step, which the layout says (``StepLayout.num_computed``, from the
scheduler's output, on the host): it reads no device memory, on a CPU or a GPU. Only a layout
that does not say (one built by hand) falls back to the positions buffer, which a CPU holds
in host memory; on a GPU such a step is copied whole rather than read with a sync.

On a GPU the kept rows' indices go to the device from pinned memory (``non_blocking``; PyTorch's
caching host allocator keeps that block until the copy that reads it has run), an
``index_select`` gathers those rows of the taps' buffer and of the position buffer, and the
gathered rows are copied into the ring (``non_blocking``), all queued on the current stream
after the forward and fenced by the same event: the engine thread never waits for the device.
The gathered tensors are freed when ``collect`` returns; the CUDA caching allocator hands
their memory only to work queued later on the same stream, so the copies read them first.
This also keeps shapes static under CUDA graphs: the taps write full rows into their
preallocated buffers inside the graph, and the selection, whose shapes change every step,
runs on the engine thread after the graph was launched, outside any captured graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from sidecar.probe.graph.taps import TapSet
from sidecar.probe.host.attribution import RequestIds, SamplePolicy, SpreadSample, attribute
from sidecar.probe.host.ring import HostRing, Span
from sidecar.probe.host.shipper import DropCounts
from sidecar.probe.vllm_internals import StepLayout
from sidecar.protocol.batch import ProbeOverhead, TokenBatch

DRAIN_BACKLOG = "drain_backlog"
T = TypeVar("T")


@dataclass(frozen=True)
class BatchIdentity:
    """What every batch of this probe says about its origin."""

    spec_hash: str
    model_name: str
    rank: int
    world_size: int
    randomized_ids: bool = True  # vLLM added a random suffix to request ids
    engine_id: str = ""  # vllm_internals.engine_id: the same on every rank of the engine


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
        self.ring = HostRing(taps.values.shape[1], ring_rows, pin=self._cuda)
        self.request_ids = RequestIds(identity.randomized_ids)
        self.trace_parent = trace_parent
        self.overhead = overhead
        self.spread = SpreadSample()
        # Shipper thread only: what goes with the first batch that names a request.
        self._unsent_traces = FirstMention[str]()
        self._unsent_prefix_cached = FirstMention[int]()

    def collect(
        self,
        step: int,
        layout: StepLayout,
        finished: list[str],
        prefix_cached: Mapping[str, int] | None = None,
        level: float = 1.0,
    ) -> PendingStep | None:
        """Start copying this step's rows out, those ``level`` keeps; None when there is
        nothing to send, or (counted) when the ring is full. ``prefix_cached``: prompt tokens
        new requests found in the prefix cache, by engine id."""
        # Named here, every step, before any drop: every rank names requests alike.
        ids = self.request_ids.step(layout.req_ids, finished)
        n = layout.num_tokens
        positions = self.taps.positions.positions
        kept = None
        # Chosen on the host from the layout; only a layout that does not say where its
        # requests start reads the positions, on a CPU (on a GPU it goes whole: no sync).
        if level < 1.0 and n and (layout.num_computed is not None or not self._cuda):
            fallback = None if layout.num_computed is not None else positions.numpy()
            kept = self.spread.select(layout, level, fallback)
            n = kept.shape[0]
        self.spread.forget(finished)
        if kept is not None and n == 0 and not finished:
            return None  # the level kept nothing: no copy, no message
        sampled = self.sample.count(layout, kept)
        span = self.ring.take(n)
        if span is None:
            self.drops.add(DRAIN_BACKLOG, sampled)
            return None
        rows = slice(span.start, span.stop)
        if kept is None:
            self.ring.values[rows].copy_(self.taps.values[:n], non_blocking=self._cuda)
            self.ring.positions[rows].copy_(positions[:n], non_blocking=self._cuda)
        elif n:  # a step that finishes a request may keep no row
            self._gather(kept, rows)
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        traces = {
            name: traceparent
            for internal, name in zip(layout.req_ids, ids.req_ids, strict=True)
            if (traceparent := self.trace_parent(internal)) is not None
        }
        cached = {
            name: prefix_cached[internal]
            for internal, name in zip(layout.req_ids, ids.req_ids, strict=True)
            if prefix_cached and internal in prefix_cached
        }
        return PendingStep(
            self.ring,
            span,
            event,
            step,
            layout,
            ids.req_ids,
            ids.finished,
            traces,
            cached,
            sampled,
            kept,
        )

    def _gather(self, kept: np.ndarray, rows: slice) -> None:
        """Copy the ``kept`` rows of the taps' and the position buffer into ``rows`` of the
        ring; on a GPU without a sync (see the module docstring)."""
        positions = self.taps.positions.positions
        index = torch.from_numpy(kept)
        if self._cuda:
            index = index.pin_memory().to(positions.device, non_blocking=True)
            self.ring.values[rows].copy_(self.taps.values.index_select(0, index), non_blocking=True)
            self.ring.positions[rows].copy_(positions.index_select(0, index), non_blocking=True)
        else:
            torch.index_select(self.taps.values, 0, index, out=self.ring.values[rows])
            torch.index_select(positions, 0, index, out=self.ring.positions[rows])

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
            sizes = [p.rows for p in steps]
            keep = self.sample.select(rows, slots.req_ids, sizes)
            values = np.concatenate(values)[keep][:, self.taps.shipped]
        finally:
            for pending in steps:
                pending.discard()
        finished = [p.finished for p in steps]
        for pending in steps:
            self._unsent_traces.add(pending.traces)
            self._unsent_prefix_cached.add(pending.prefix_cached)
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
        identity = self.identity
        request_ids = [names[r] for r in present]
        traces = self._unsent_traces.take(request_ids)
        prefix_cached = self._unsent_prefix_cached.take(request_ids)
        for done in finished:
            self._unsent_traces.forget(done)
            self._unsent_prefix_cached.forget(done)
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
            engine_id=identity.engine_id,
            prefix_cached_tokens=prefix_cached,
            overhead=self.overhead(),
        )

    def empty(self) -> TokenBatch:
        """A batch of no steps from this probe: what a status message carries."""
        identity, k = self.identity, self.taps.component_ids
        return TokenBatch(
            spec_hash=identity.spec_hash,
            model_name=identity.model_name,
            steps=(),
            component_ids=k,
            request_ids=[],
            request_index=np.zeros(0, np.uint32),
            positions=np.zeros(0, np.int32),
            phases=np.zeros(0, np.uint8),
            values=np.zeros((0, k.shape[0]), np.float32),
            rank=identity.rank,
            world_size=identity.world_size,
            engine_id=identity.engine_id,
        )


class FirstMention(Generic[T]):
    """Per-request facts that go with the first batch naming the request, then never again."""

    def __init__(self) -> None:
        self._waiting: dict[str, T] = {}

    def add(self, by_request: Mapping[str, T]) -> None:
        self._waiting.update(by_request)

    def take(self, request_ids: list[str]) -> dict[str, T]:
        if not self._waiting:
            return {}
        return {r: self._waiting.pop(r) for r in request_ids if r in self._waiting}

    def forget(self, request_ids: list[str]) -> None:
        """Finished requests: what no batch carried is not carried later."""
        for r in request_ids:
            self._waiting.pop(r, None)


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
        prefix_cached: dict[str, int],
        sampled: int,
        kept: np.ndarray | None = None,
    ):
        """``names``: the exported ids of ``layout.req_ids``; ``finished``: exported ids;
        ``traces``: traceparents of requests by exported id; ``prefix_cached``: prompt
        tokens found in the prefix cache, by exported id; ``sampled``: the tokens of the
        step the sample policy keeps; ``kept``: which of the layout's rows the span holds
        (None: all)."""
        self._ring = ring
        self._span: Span | None = span
        self._event = event
        self.step = step
        self.layout = layout
        self.names = names
        self.finished = finished
        self.traces = traces
        self.prefix_cached = prefix_cached
        self.rows = len(span)
        self.tokens = sampled  # what a drop of this step loses, in sampled tokens
        self._kept = kept

    def kept_rows(self) -> np.ndarray:
        """Indices of the layout's rows the span holds, ascending."""
        return np.arange(self.layout.num_tokens) if self._kept is None else self._kept

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(the taps' rows, positions) as host arrays, once the device copy has landed."""
        assert self._span is not None, "read after discard"
        if self._event is not None:
            self._event.synchronize()
        rows = slice(self._span.start, self._span.stop)
        return self._ring.values[rows].numpy(), self._ring.positions[rows].numpy()

    def discard(self) -> None:
        if self._span is not None:
            self._ring.give_back(self._span)
            self._span = None
