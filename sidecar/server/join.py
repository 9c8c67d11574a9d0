"""Joining tensor-parallel ranks: one engine step's batches from every rank -> one batch.

With tensor parallelism each rank reads the components whose heads/shards it holds, and
every rank sees the same sampled tokens in the same order. The ranks' batches for one
step are therefore joined by stacking their columns side by side; the rows must agree,
which is checked. Each rank groups steps into messages its own way, so a batch of several
steps is split into its steps first (``TokenBatch.split_steps``) and each step is joined.
A step waits at most ``timeout`` seconds for its missing ranks. Waiting steps are the
batches the sidecar holds, so they are capped, the oldest given up first when a cap is
reached (reason ``tp_join_overflow``): at most ``max_pending`` steps and ``max_pending_bytes``
of component values wait at once, and at most ``max_pending_per_source`` steps opened by one
source (the sidecar passes its ingest stream), so one sender cannot push out the others'.
Steps given up on are reported as dropped, every part that arrived by its own rank (the
books are per rank, ``sidecar.server.books``).

Steps are keyed by engine (``engine_id``) as well as by model, world size and step counter:
two engines sharing a sidecar (data parallelism, replicas) count their steps alike.
``forget_engine`` gives up on a dead engine's steps at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sidecar.protocol.batch import TokenBatch


class JoinError(ValueError):
    """A rank's batch cannot be joined: a rank sent twice, or the ranks' rows disagree."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DroppedJoin:
    model_name: str
    engine_id: str
    rank: int  # whose part was given up on
    reason: str  # "tp_join_timeout", "tp_join_overflow" or "engine_gone"
    tokens: int


@dataclass(frozen=True)
class Joined:
    batch: TokenBatch  # one step (or, without tensor parallelism, the batch as it came)
    ranks: tuple[int, ...]  # whose parts it holds


@dataclass
class JoinOutcome:
    joined: list[Joined]  # the steps whose every rank has now arrived, in order
    dropped: list[DroppedJoin]
    errors: list[JoinError]  # the steps that could not be joined; the others still count
    refused: list[TokenBatch]  # the parts those errors cost, each its rank's (the books)


@dataclass
class _Pending:
    created: float
    world_size: int
    source: int  # who opened the wait
    parts: dict[int, TokenBatch] = field(default_factory=dict)
    nbytes: int = 0  # of the parts' values


class RankJoiner:
    def __init__(
        self,
        timeout: float,
        max_pending: int = 1024,
        max_pending_per_source: int = 256,  # a probe's queue holds 256 steps by default
        max_pending_bytes: int = 256 * 2**20,
    ) -> None:
        self.timeout = timeout
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.max_pending_bytes = max_pending_bytes
        self._pending: dict[tuple[str, str, int, int], _Pending] = {}  # oldest first
        self._by_source: dict[int, int] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def add(self, batch: TokenBatch, now: float, source: int = 0) -> JoinOutcome:
        if batch.world_size == 1:
            return JoinOutcome([Joined(batch, (batch.rank,))], [], [], [])
        outcome = JoinOutcome([], [], [], [])
        for part in batch.split_steps():
            try:
                self._add_step(part, now, source, outcome)
            except JoinError as error:
                outcome.errors.append(error)
        return outcome

    def _add_step(self, part: TokenBatch, now: float, source: int, outcome: JoinOutcome) -> None:
        step = part.steps[0]
        key = (part.engine_id, part.model_name, part.world_size, step)
        pending = self._pending.get(key)
        if pending is None:
            if self._by_source.get(source, 0) >= self.max_pending_per_source:
                mine = next(k for k, p in self._pending.items() if p.source == source)
                self._give_up(mine, outcome)
            elif len(self._pending) >= self.max_pending:
                self._give_up(next(iter(self._pending)), outcome)
            pending = self._pending[key] = _Pending(now, part.world_size, source)
            self._by_source[source] = self._by_source.get(source, 0) + 1
        if part.rank in pending.parts:
            outcome.refused.append(part)
            raise JoinError("tp_duplicate_rank", f"rank {part.rank} sent step {step} twice")
        pending.parts[part.rank] = part
        pending.nbytes += part.values.nbytes
        self._bytes += part.values.nbytes
        if len(pending.parts) == pending.world_size:
            self._remove(key)
            parts = [pending.parts[r] for r in range(pending.world_size)]
            try:
                outcome.joined.append(Joined(_merge(parts), tuple(range(pending.world_size))))
            except JoinError:
                outcome.refused.extend(parts)
                raise
        while self._bytes > self.max_pending_bytes:
            self._give_up(next(iter(self._pending)), outcome)

    def expire(self, now: float) -> list[DroppedJoin]:
        """Give up on steps still missing ranks after ``timeout`` seconds."""
        stale = [k for k, p in self._pending.items() if p.created <= now - self.timeout]
        return _given_up([self._remove(k) for k in stale], "tp_join_timeout")

    def forget_engine(self, engine_id: str) -> list[DroppedJoin]:
        """Give up on every step of an engine that is gone."""
        gone = [k for k in self._pending if k[0] == engine_id]
        return _given_up([self._remove(k) for k in gone], "engine_gone")

    def _give_up(self, key: tuple[str, str, int, int], outcome: JoinOutcome) -> None:
        outcome.dropped.extend(_given_up([self._remove(key)], "tp_join_overflow"))

    def _remove(self, key: tuple[str, str, int, int]) -> _Pending:
        pending = self._pending.pop(key)
        self._bytes -= pending.nbytes
        if self._by_source[pending.source] == 1:
            del self._by_source[pending.source]
        else:
            self._by_source[pending.source] -= 1
        return pending


def _given_up(given_up: list[_Pending], reason: str) -> list[DroppedJoin]:
    return [
        DroppedJoin(part.model_name, part.engine_id, rank, reason, part.num_tokens)
        for p in given_up
        for rank, part in sorted(p.parts.items())
    ]


def _merge(parts: list[TokenBatch]) -> TokenBatch:
    first = parts[0]
    for part in parts[1:]:
        if (
            part.request_ids != first.request_ids
            or not np.array_equal(part.request_index, first.request_index)
            or not np.array_equal(part.positions, first.positions)
            or not np.array_equal(part.phases, first.phases)
        ):
            raise JoinError(
                "tp_mismatch",
                f"step {first.steps[0]}: rank {part.rank}'s tokens differ from rank {first.rank}'s",
            )
    finished = dict.fromkeys(r for part in parts for r in part.finished_request_ids)
    return TokenBatch(
        spec_hash=first.spec_hash,
        model_name=first.model_name,
        steps=first.steps,
        component_ids=np.concatenate([p.component_ids for p in parts]),
        request_ids=first.request_ids,
        request_index=first.request_index,
        positions=first.positions,
        phases=first.phases,
        values=np.hstack([p.values for p in parts]),
        finished_request_ids=list(finished),
        traceparents={k: v for part in parts for k, v in part.traceparents.items()},
        rank=0,
        world_size=1,
        engine_id=first.engine_id,
        prefix_cached_tokens=first.prefix_cached_tokens,
    )
