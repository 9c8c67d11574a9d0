"""Per-step drain: copy the taps' buffers out after a forward, without syncing the device.

``Drain.collect`` runs on the engine thread once per step, after the model runner launched
the forward. It copies the first ``num_tokens`` rows of every tap buffer and of the
position buffer (padding rows never leave the device) and returns a ``PendingStep``
carrying those copies and the step's metadata. Everything else — waiting for the copy,
attribution, sampling, building the ``TokenBatch`` — happens in ``PendingStep.resolve`` on
the shipper's thread.

On a GPU the copy goes to pinned host memory with ``non_blocking=True`` on the current
stream, followed by a CUDA event; ``resolve`` waits on that event. The pinned memory comes
from a small pool of slots: when every slot is still in flight the step is dropped and
counted (``drain_backlog``) rather than waiting. On a CPU the copy is a plain copy.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

import numpy as np
import torch

from sidecar.probe.attribution import SamplePolicy, StepLayout, attribute, external_request_id
from sidecar.probe.shipper import DropCounts
from sidecar.probe.taps import TapSet
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


class _Slot:
    """Pinned host buffers for one step's copies and the CUDA event that fences them."""

    def __init__(self, taps: TapSet):
        self.values = [torch.empty(t.values.shape, pin_memory=True) for t in taps.taps]
        self.positions = torch.empty(
            taps.positions.positions.shape, dtype=torch.long, pin_memory=True
        )
        self.event = torch.cuda.Event()


class Drain:
    def __init__(
        self,
        taps: TapSet,
        identity: BatchIdentity,
        sample: SamplePolicy,
        drops: DropCounts,
        slots: int = 8,
    ):
        self.taps = taps
        self.identity = identity
        self.sample = sample
        self.drops = drops
        self._free: queue.SimpleQueue[_Slot] | None = None
        if taps.positions.positions.device.type == "cuda":
            self._free = queue.SimpleQueue()
            for _ in range(slots):
                self._free.put(_Slot(taps))

    def collect(self, step: int, layout: StepLayout, finished: list[str]) -> PendingStep | None:
        """Start copying this step's rows out; None (and counted) if no slot is free."""
        n = layout.num_tokens
        if self._free is None:
            values = [tap.values[:n].clone() for tap in self.taps.taps]
            positions = self.taps.positions.positions[:n].clone()
            return PendingStep(self, values, positions, None, step, layout, finished)
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            self.drops.add(DRAIN_BACKLOG, n)
            return None
        for tap, host in zip(self.taps.taps, slot.values, strict=True):
            host[:n].copy_(tap.values[:n], non_blocking=True)
        slot.positions[:n].copy_(self.taps.positions.positions[:n], non_blocking=True)
        slot.event.record()
        values = [host[:n] for host in slot.values]
        return PendingStep(self, values, slot.positions[:n], slot, step, layout, finished)

    def _release(self, slot: _Slot) -> None:
        assert self._free is not None
        self._free.put(slot)


class PendingStep:
    """One step's copies in flight; ``resolve`` (shipper thread) builds its ``TokenBatch``."""

    def __init__(
        self,
        drain: Drain,
        values: list[torch.Tensor],
        positions: torch.Tensor,
        slot: _Slot | None,
        step: int,
        layout: StepLayout,
        finished: list[str],
    ):
        self._drain = drain
        self._values = values
        self._positions = positions
        self._slot = slot
        self.step = step
        self.layout = layout
        self.finished = finished

    @property
    def tokens(self) -> int:
        return self.layout.num_tokens

    def discard(self) -> None:
        if self._slot is not None:
            self._drain._release(self._slot)
            self._slot = None

    def resolve(self) -> TokenBatch | None:
        drain, layout = self._drain, self.layout
        try:
            if self._slot is not None:
                self._slot.event.synchronize()
            rows = attribute(layout, self._positions.numpy())
            keep = drain.sample.select(rows, layout.req_ids)
            columns = [
                values.numpy()[keep][:, shipped]
                for values, shipped in zip(self._values, drain.taps.shipped, strict=True)
            ]
        finally:
            self.discard()
        if keep.shape[0] == 0 and not self.finished:
            return None
        rows = rows.take(keep)
        present, request_index = np.unique(rows.request_index, return_inverse=True)
        k = drain.taps.component_ids.shape[0]
        values = np.concatenate(columns, axis=1) if columns else np.zeros((keep.shape[0], k))
        identity = drain.identity
        return TokenBatch(
            spec_hash=identity.spec_hash,
            model_name=identity.model_name,
            step=self.step,
            component_ids=drain.taps.component_ids,
            request_ids=[
                external_request_id(layout.req_ids[i], identity.randomized_ids) for i in present
            ],
            request_index=request_index.astype(np.uint32),
            positions=rows.positions,
            phases=rows.phases,
            values=values.astype(np.float32),
            finished_request_ids=[
                external_request_id(r, identity.randomized_ids) for r in self.finished
            ],
            rank=identity.rank,
            world_size=identity.world_size,
        )
