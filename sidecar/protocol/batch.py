"""Sampled component values of one or more engine steps, as plain arrays, and their wire form.

``TokenBatch`` is what crosses the probe -> sidecar boundary. ``to_message`` and
``from_message`` convert it to and from ``circuitwatch.v1.SampleBatch``; ``from_message``
checks every length and value so a malformed message is rejected with a clear reason.
A batch of several steps keeps each step's share of the rows and of the finished requests
(``step_tokens``, ``step_finished``), so that ``split_steps`` can take it apart again where
tensor-parallel ranks are joined step by step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from sidecar.protocol.circuitwatch.v1 import ingest_pb2

PROMPT = 0  # index into PHASE_NAMES, the value of a token's phase on the wire
GENERATED = 1

# The sidecar accepts messages up to this size (gRPC's default, 4 MiB, is less than one
# long prefill step of a wide spec); probes aim for far smaller ones (see ``row_bytes``).
MAX_MESSAGE_BYTES = 64 * 2**20
# Steps one message may carry: the sidecar's work per message grows with it (each step is
# joined on its own under tensor parallelism), and a probe never gathers more than its queue.
MAX_BATCH_STEPS = 65_536
# Ids, names, reasons and traceparents: the sidecar keeps some of them for up to
# max_requests requests, so their length is bounded too.
MAX_STRING_CHARS = 1024


def row_bytes(num_components: int) -> int:
    """Wire bytes per token: request index, position, phase and the float32 values."""
    return 4 + 4 + 1 + 4 * num_components


@dataclass(frozen=True)
class ProbeOverhead:
    """What the probe cost the engine over the steps since its previous batch, and the
    budget and sampling level it ran under (``sidecar.probe.host.budget``)."""

    probe_seconds: float
    step_seconds: float
    budget: float
    sample_level: float
    graph_cost: float

    @property
    def ratio(self) -> float:
        return self.probe_seconds / self.step_seconds


class MalformedBatch(ValueError):
    """A SampleBatch whose columns disagree or hold impossible values."""


@dataclass
class TokenBatch:
    spec_hash: str
    model_name: str
    steps: tuple[int, ...]  # engine steps, ascending
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
    # Per step, in order: how many rows and finished ids it has. Empty: one step has them all.
    step_tokens: tuple[int, ...] = ()
    step_finished: tuple[int, ...] = ()
    # W3C traceparent by request id, for requests whose trace context the engine knows; sent
    # once per request. Passed through unchecked: the sidecar's tracing validates it.
    traceparents: dict[str, str] = field(default_factory=dict)
    engine_id: str = ""  # the sending engine; the same on all its tensor-parallel ranks
    # The sender's books (see sidecar.server.books): cumulative tokens handed to gRPC, this
    # batch included, and where a sidecar that first hears of the sender starts counting.
    shipped_tokens_total: int = 0
    base_shipped_tokens_total: int = 0
    base_dropped_total: dict[str, int] = field(default_factory=dict)
    # Prompt tokens served from the prefix cache, by request id, sent with its first tokens.
    prefix_cached_tokens: dict[str, int] = field(default_factory=dict)
    # The sender's probe state (see ``sidecar.probe.host.health``), in every message.
    probe_off: bool = False
    probe_errors_total: dict[str, int] = field(default_factory=dict)

    @property
    def is_status(self) -> bool:
        """A status message: no steps, so no rows; only the probe state and drop counts."""
        return not self.steps

    overhead: ProbeOverhead | None = None  # None: the sender did not report it

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def split_steps(self) -> list[TokenBatch]:
        """One batch per step, each naming only its own requests in order of first row.

        That order depends only on the step's own rows, not on how a probe grouped the
        steps, so the ranks' parts of a step compare equal.
        """
        step_tokens = self.step_tokens or (self.num_tokens,)
        step_finished = self.step_finished or (len(self.finished_request_ids),)
        row_starts = np.cumsum([0, *step_tokens])
        finished_starts = np.cumsum([0, *step_finished])
        parts = []
        mentioned: set[str] = set()  # prefix_cached_tokens go with a request's first step
        for i, step in enumerate(self.steps):
            rows = slice(int(row_starts[i]), int(row_starts[i + 1]))
            present, first, inverse = np.unique(
                self.request_index[rows], return_index=True, return_inverse=True
            )
            order = np.argsort(first)
            renumber = np.empty_like(order)
            renumber[order] = np.arange(order.shape[0])
            parts.append(
                replace(
                    self,
                    steps=(step,),
                    request_ids=[self.request_ids[j] for j in present[order]],
                    request_index=renumber[inverse].astype(np.uint32),
                    positions=self.positions[rows],
                    phases=self.phases[rows],
                    values=self.values[rows],
                    finished_request_ids=self.finished_request_ids[
                        int(finished_starts[i]) : int(finished_starts[i + 1])
                    ],
                    step_tokens=(),
                    step_finished=(),
                    traceparents=_present(self.traceparents, self.request_ids, present),
                    prefix_cached_tokens=_present(
                        self.prefix_cached_tokens, self.request_ids, present, mentioned
                    ),
                )
            )
        return parts


def _present(
    by_request: dict, request_ids: list[str], present: np.ndarray, once: set[str] | None = None
) -> dict:
    """The entries of ``by_request`` for the requests ``present`` (indices into request_ids);
    with ``once``, only those not in it, which it then holds."""
    names = [request_ids[j] for j in present]
    found = {r: by_request[r] for r in names if r in by_request and (once is None or r not in once)}
    if once is not None:
        once.update(found)
    return found


def to_message(batch: TokenBatch) -> ingest_pb2.SampleBatch:
    return ingest_pb2.SampleBatch(
        spec_hash=batch.spec_hash,
        model_name=batch.model_name,
        rank=batch.rank,
        world_size=batch.world_size,
        steps=batch.steps,
        component_ids=batch.component_ids.tolist(),
        request_ids=batch.request_ids,
        request_index=np.ascontiguousarray(batch.request_index, dtype="<u4").tobytes(),
        positions=np.ascontiguousarray(batch.positions, dtype="<i4").tobytes(),
        phases=np.ascontiguousarray(batch.phases, dtype=np.uint8).tobytes(),
        values=np.ascontiguousarray(batch.values, dtype="<f4").tobytes(),
        finished_request_ids=batch.finished_request_ids,
        dropped_total=batch.dropped_total,
        step_tokens=batch.step_tokens,
        step_finished=batch.step_finished,
        traceparents=batch.traceparents,
        engine_id=batch.engine_id,
        shipped_tokens_total=batch.shipped_tokens_total,
        base_shipped_tokens_total=batch.base_shipped_tokens_total,
        base_dropped_total=batch.base_dropped_total,
        prefix_cached_tokens=batch.prefix_cached_tokens,
        probe_off=batch.probe_off,
        probe_errors_total=batch.probe_errors_total,
        **(vars(batch.overhead) if batch.overhead is not None else {}),
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
    _check_string_lengths(msg)
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
    steps = tuple(msg.steps)
    if not steps and (n or msg.request_ids or msg.finished_request_ids):
        raise MalformedBatch("steps: a batch with tokens or requests names an engine step")
    if len(steps) > MAX_BATCH_STEPS:
        raise MalformedBatch(f"steps: {len(steps)} in one batch, at most {MAX_BATCH_STEPS}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise MalformedBatch(f"steps: {list(steps)[:8]} is not strictly ascending")
    if msg.shipped_tokens_total and msg.shipped_tokens_total < n:
        raise MalformedBatch(
            f"shipped_tokens_total: {msg.shipped_tokens_total} is less than this batch's {n} rows"
        )
    finished = list(msg.finished_request_ids)
    step_tokens = _step_shares(msg.step_tokens, steps, n, "step_tokens")
    step_finished = _step_shares(msg.step_finished, steps, len(finished), "step_finished")
    return TokenBatch(
        spec_hash=msg.spec_hash,
        model_name=msg.model_name,
        steps=steps,
        component_ids=component_ids,
        request_ids=list(msg.request_ids),
        request_index=request_index,
        positions=positions,
        phases=phases,
        values=values.reshape(n, component_ids.size),
        finished_request_ids=finished,
        dropped_total=dict(msg.dropped_total),
        rank=msg.rank,
        world_size=msg.world_size,
        step_tokens=step_tokens,
        step_finished=step_finished,
        traceparents=dict(msg.traceparents),
        engine_id=msg.engine_id,
        shipped_tokens_total=msg.shipped_tokens_total,
        base_shipped_tokens_total=msg.base_shipped_tokens_total,
        base_dropped_total=dict(msg.base_dropped_total),
        prefix_cached_tokens=dict(msg.prefix_cached_tokens),
        probe_off=msg.probe_off,
        probe_errors_total=dict(msg.probe_errors_total),
        overhead=_overhead(msg),
    )


def _overhead(msg: ingest_pb2.SampleBatch) -> ProbeOverhead | None:
    """The message's overhead report, checked; None when it has none (step_seconds 0)."""
    if msg.step_seconds == 0:
        return None
    overhead = ProbeOverhead(
        msg.probe_seconds, msg.step_seconds, msg.budget, msg.sample_level, msg.graph_cost
    )
    for name, value in vars(overhead).items():
        if not (math.isfinite(value) and value >= 0):
            raise MalformedBatch(f"{name}: {value} is not a finite non-negative number")
    for name in ("budget", "sample_level"):
        if getattr(overhead, name) > 1:
            raise MalformedBatch(f"{name}: {getattr(overhead, name)} is not a share in [0, 1]")
    return overhead


def _step_shares(
    shares: Sequence[int], steps: tuple[int, ...], total: int, name: str
) -> tuple[int, ...]:
    """Check one per-step split of ``total`` items against ``steps`` (already checked)."""
    if not shares and len(steps) <= 1:
        return ()
    if len(shares) != len(steps):
        raise MalformedBatch(f"{name}: {len(shares)} entries for {len(steps)} steps")
    if sum(shares) != total:
        raise MalformedBatch(f"{name}: the steps' shares add up to {sum(shares)}, not {total}")
    return tuple(shares)


def _check_string_lengths(msg: ingest_pb2.SampleBatch) -> None:
    fields = {
        "spec_hash": [msg.spec_hash],
        "model_name": [msg.model_name],
        "request_ids": msg.request_ids,
        "finished_request_ids": msg.finished_request_ids,
        "dropped_total": msg.dropped_total.keys(),
        "traceparents": [*msg.traceparents.keys(), *msg.traceparents.values()],
    }
    for name, values in fields.items():
        if max(map(len, values), default=0) > MAX_STRING_CHARS:
            raise MalformedBatch(f"{name}: a value longer than {MAX_STRING_CHARS} characters")
