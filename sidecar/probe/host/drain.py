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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sidecar.probe.graph.taps import TapSet
from sidecar.probe.host.attribution import RequestIds, SamplePolicy, attribute
from sidecar.probe.host.ring import HostRing, Span
from sidecar.probe.host.shipper import DropCounts
from sidecar.probe.vllm_internals import StepLayout
from sidecar.protocol.batch import TokenBatch

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
    ):
        """``trace_parent``: a request's W3C traceparent by engine id, given once."""
        self.taps = taps
        self.identity = identity
        self.sample = sample
        self.drops = drops
        self._cuda = taps.positions.positions.device.type == "cuda"
        self.ring = HostRing(taps.values.shape[1], ring_rows, pin=self._cuda)
        self.request_ids = RequestIds(identity.randomized_ids)
        self.trace_parent = trace_parent
        self._unsent_traces: dict[str, str] = {}  # shipper thread only: until a batch names it

    def collect(self, step: int, layout: StepLayout, finished: list[str]) -> PendingStep | None:
        """Start copying this step's rows out; None (and counted) if the ring is full."""
        # Named here, every step, before any drop: every rank names requests alike.
        ids = self.request_ids.step(layout.req_ids, finished)
        n = layout.num_tokens
        span = self.ring.take(n)
        if span is None:
            self.drops.add(DRAIN_BACKLOG, n)
            return None
        rows = slice(span.start, span.stop)
        self.ring.values[rows].copy_(self.taps.values[:n], non_blocking=self._cuda)
        self.ring.positions[rows].copy_(self.taps.positions.positions[:n], non_blocking=self._cuda)
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        traces = {
            name: traceparent
            for internal, name in zip(layout.req_ids, ids.req_ids, strict=True)
            if (traceparent := self.trace_parent(internal)) is not None
        }
        return PendingStep(self.ring, span, event, step, layout, ids.req_ids, ids.finished, traces)

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
            rows = attribute(slots, np.concatenate(positions))
            sizes = [p.tokens for p in steps]
            keep = self.sample.select(rows, slots.req_ids, sizes)
            values = np.concatenate(values)[keep][:, self.taps.shipped]
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
    ):
        """``names``: the exported ids of ``layout.req_ids``; ``finished``: exported ids;
        ``traces``: traceparents of requests by exported id."""
        self._ring = ring
        self._span: Span | None = span
        self._event = event
        self.step = step
        self.layout = layout
        self.names = names
        self.finished = finished
        self.traces = traces
        self.tokens = len(span)  # what a drop of this step loses

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
