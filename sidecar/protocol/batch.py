"""One engine step's sampled component values, as plain arrays, and its wire conversion.

``TokenBatch`` is what crosses the probe -> sidecar boundary. ``to_message`` and
``from_message`` convert it to and from ``circuitwatch.v1.SampleBatch``; ``from_message``
checks every length and value so a malformed message is rejected with a clear reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sidecar.protocol.circuitwatch.v1 import ingest_pb2

PROMPT = 0
GENERATED = 1
PHASE_NAMES = ("prompt", "generation")


class MalformedBatch(ValueError):
    """A SampleBatch whose columns disagree or hold impossible values."""


@dataclass
class TokenBatch:
    spec_hash: str
    model_name: str
    step: int
    component_ids: np.ndarray  # uint32 [k]
    request_ids: list[str]
    request_index: np.ndarray  # uint32 [n]
    positions: np.ndarray  # int32 [n]
    phases: np.ndarray  # uint8 [n], PROMPT or GENERATED
    values: np.ndarray  # float32 [n, k]
    finished_request_ids: list[str] = field(default_factory=list)
    dropped_total: dict[str, int] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


def to_message(batch: TokenBatch) -> ingest_pb2.SampleBatch:
    return ingest_pb2.SampleBatch(
        spec_hash=batch.spec_hash,
        model_name=batch.model_name,
        rank=batch.rank,
        world_size=batch.world_size,
        step=batch.step,
        component_ids=batch.component_ids.tolist(),
        request_ids=batch.request_ids,
        request_index=np.ascontiguousarray(batch.request_index, dtype="<u4").tobytes(),
        positions=np.ascontiguousarray(batch.positions, dtype="<i4").tobytes(),
        phases=np.ascontiguousarray(batch.phases, dtype=np.uint8).tobytes(),
        values=np.ascontiguousarray(batch.values, dtype="<f4").tobytes(),
        finished_request_ids=batch.finished_request_ids,
        dropped_total=batch.dropped_total,
    )


def _column(data: bytes, dtype: str, name: str, count: int | None = None) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if len(data) % itemsize:
        raise MalformedBatch(f"{name}: {len(data)} bytes is not a whole number of {dtype} items")
    column = np.frombuffer(data, dtype=dtype)
    if count is not None and column.shape[0] != count:
        raise MalformedBatch(f"{name}: {column.shape[0]} items, expected {count}")
    return column


def from_message(msg: ingest_pb2.SampleBatch, num_components: int) -> TokenBatch:
    """Decode and validate; ``num_components`` is the size of the server's spec."""
    if msg.world_size < 1 or msg.rank >= msg.world_size:
        raise MalformedBatch(f"rank {msg.rank} out of range for world_size {msg.world_size}")
    component_ids = np.asarray(msg.component_ids, dtype=np.uint32)
    if component_ids.size and int(component_ids.max()) >= num_components:
        raise MalformedBatch(
            f"component_ids: id {int(component_ids.max())} out of range, spec has {num_components}"
        )
    positions = _column(msg.positions, "<i4", "positions")
    n = positions.shape[0]
    request_index = _column(msg.request_index, "<u4", "request_index", n)
    phases = _column(msg.phases, "u1", "phases", n)
    values = _column(msg.values, "<f4", "values", n * component_ids.size)
    if n and int(request_index.max()) >= len(msg.request_ids):
        raise MalformedBatch(
            f"request_index: {int(request_index.max())} out of range, "
            f"batch names {len(msg.request_ids)} requests"
        )
    if n and int(phases.max()) > GENERATED:
        raise MalformedBatch(f"phases: value {int(phases.max())} is neither 0 nor 1")
    return TokenBatch(
        spec_hash=msg.spec_hash,
        model_name=msg.model_name,
        step=msg.step,
        component_ids=component_ids,
        request_ids=list(msg.request_ids),
        request_index=request_index,
        positions=positions,
        phases=phases,
        values=values.reshape(n, component_ids.size),
        finished_request_ids=list(msg.finished_request_ids),
        dropped_total=dict(msg.dropped_total),
        rank=msg.rank,
        world_size=msg.world_size,
    )
