"""Per-request running aggregates, bounded, updated a whole batch at a time.

State lives in preallocated arrays indexed by *slot* (one slot per live request):
token count, sum, max and min of every circuit's score, per phase, and the state of each
circuit's configured aggregation (``streaming``). A batch updates them with a sort +
``reduceat`` over (slot, phase) groups and one fancy-indexed write per array, so the
Python work per batch is one loop over the batch's distinct requests (to find their
slots), never over tokens. Within a group tokens are taken in position order (a
request's batches arrive in step order), which the order-dependent aggregations need.

A finished request's record carries, per phase, each circuit's mean, max, min, configured
aggregate and, where the circuit has a verdict threshold for the phase, its verdict.

Requests are keyed by engine (``engine_id``) and request id: two engines sharing a sidecar
may use the same ids. A request finishes when the engine says so (``finish``), when no data
arrived for it for the idle timeout (``expire``), or when its engine is gone
(``forget_engine``). At most ``max_requests`` are live; a new request beyond that evicts the
least recently updated one, whose tokens are reported dropped (``state_full``). Each
request belongs to the *owner* whose batch opened it (the sidecar passes its ingest
stream), and one owner holds at most ``max_per_owner`` live requests: a new one beyond that
evicts that owner's least recently updated request (``stream_state_full``), so one sender
flooding request ids evicts its own state first, not other engines'. Requests finished
recently are remembered (bounded) so that late tokens for them are dropped instead of
opening a second record, unless the probe says the id starts a new request (``start``: a
caller that reuses a request id once the first request with it finished).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sidecar.server.records import (
    CLEAR,
    FINISHED_BY_IDLE,
    FLAGGED,
    CircuitStats,
    PhaseStats,
    RequestRecord,
    TokenScores,
)
from sidecar.server.streaming import StreamingAggregates
from sidecar.spec.schema import PHASE_NAMES, Circuit

_NO_SLOT = -1


@dataclass(frozen=True)
class DroppedTokens:
    model_name: str
    # "state_full": evicted or never admitted; "stream_state_full": evicted for its owner's
    # cap; "after_finish": late tokens
    reason: str
    tokens: int
    incoming: bool = True  # tokens of the batch being added; False: an evicted request's


@dataclass
class _Kept:
    """Per-token scores of one request, kept only when keep_token_scores > 0."""

    positions: list[np.ndarray]
    phases: list[np.ndarray]
    scores: list[np.ndarray]
    count: int = 0


class RequestTable:
    def __init__(
        self,
        circuits: Sequence[Circuit],
        max_requests: int,
        keep_token_scores: int = 0,
        max_per_owner: int | None = None,
    ) -> None:
        """``max_per_owner``: live requests one owner may hold (None: ``max_requests``)."""
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        if max_per_owner is not None and max_per_owner < 1:
            raise ValueError(f"max_per_owner must be at least 1, got {max_per_owner}")
        self.circuit_names = tuple(c.name for c in circuits)
        self.max_requests = max_requests
        self.max_per_owner = max_requests if max_per_owner is None else max_per_owner
        self.keep_token_scores = keep_token_scores
        slots, phases = max_requests, len(PHASE_NAMES)
        # [phase, circuit] verdict threshold, NaN where the circuit has none for the phase
        self._verdict_thresholds = np.array(
            [[np.nan if (t := c.verdict_threshold(p)) is None else t for c in circuits]
             for p in PHASE_NAMES]
        )  # fmt: skip
        self._streaming = StreamingAggregates([c.aggregation for c in circuits], slots * phases)
        width = len(self.circuit_names)
        self._count = np.zeros((slots, phases), dtype=np.int64)
        self._sum = np.zeros((slots, phases, width), dtype=np.float64)
        self._max = np.full((slots, phases, width), -np.inf, dtype=np.float64)
        self._min = np.full((slots, phases, width), np.inf, dtype=np.float64)
        self._first_seen = np.zeros(slots, dtype=np.float64)
        self._last_seen = np.full(slots, np.inf, dtype=np.float64)  # inf marks a free slot
        self._slot_of: dict[tuple[str, str], int] = {}  # (engine id, request id) -> slot
        self._request_of: list[tuple[str, str]] = [("", "")] * slots
        self._prefix_cached = np.zeros(slots, dtype=np.int64)
        self._model_of: list[str] = [""] * slots
        self._owner_of = np.full(slots, -1, dtype=np.int64)
        self._live_by_owner: dict[int, int] = {}
        self._kept: list[_Kept | None] = [None] * slots
        self._trace_of: list[str | None] = [None] * slots
        self._free = list(range(slots - 1, -1, -1))
        self._recently_finished: dict[tuple[str, str], None] = {}
        self._live_by_model: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._slot_of)

    def live(self, model_name: str) -> int:
        return self._live_by_model.get(model_name, 0)

    def start(self, request_ids: Iterable[str], engine_id: str = "") -> list[RequestRecord]:
        """Requests the probe says start now: an id finished before is free again, and a
        live namesake (its finish never arrived) is closed; returns its record."""
        records = []
        for request_id in request_ids:
            key = (engine_id, request_id)
            self._recently_finished.pop(key, None)
            slot = self._slot_of.get(key)
            if slot is not None:
                records.append(self._record(slot, FINISHED_BY_IDLE))
                self._release(slot)
        return records

    def add(
        self,
        model_name: str,
        request_ids: list[str],
        request_index: np.ndarray,
        positions: np.ndarray,
        phases: np.ndarray,
        scores: np.ndarray,
        now: float,
        traceparents: Mapping[str, str] | None = None,
        prefix_cached: Mapping[str, int] | None = None,
        engine_id: str = "",
        owner: int = 0,
    ) -> list[DroppedTokens]:
        """Fold one batch's scores [n, c] into the requests' aggregates; ``traceparents``
        and ``prefix_cached`` tokens (by request id) are kept for the requests' records;
        ``owner`` opens new requests."""
        slot_of_request, dropped = self._slots_for(
            model_name, engine_id, request_ids, request_index, now, owner
        )
        for request_id, traceparent in (traceparents or {}).items():
            slot = self._slot_of.get((engine_id, request_id))
            if slot is not None:
                self._trace_of[slot] = traceparent
        for request_id, tokens in (prefix_cached or {}).items():
            slot = self._slot_of.get((engine_id, request_id))
            if slot is not None:
                self._prefix_cached[slot] = tokens
        if dropped:
            keep = slot_of_request[request_index] != _NO_SLOT
            request_index, positions = request_index[keep], positions[keep]
            phases, scores = phases[keep], scores[keep]
        if request_index.size == 0:
            return dropped
        if self.keep_token_scores:
            self._keep(slot_of_request[request_index], positions, phases, scores)
        # Group by (request in this batch, phase), positions ascending within a group:
        # engines list a request's tokens together and in order, so the sort is usually
        # skipped.
        keys = request_index.astype(np.int64) * 2 + phases
        if keys.size > 1:
            step, rise = np.diff(keys), np.diff(positions.astype(np.int64))
            if bool(((step < 0) | ((step == 0) & (rise < 0))).any()):
                order = np.lexsort((positions, keys))
                keys, scores = keys[order], scores[order]
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        groups = keys[starts]
        groups = slot_of_request[groups >> 1] * 2 + (groups & 1)  # -> rows of the state arrays
        self._streaming.update(groups, starts, self._count.reshape(-1)[groups], scores)
        if starts.size == keys.size:  # one token per group, as in pure decode steps
            counts, sums, maxima, minima = 1, scores, scores, scores
        else:
            counts = np.diff(starts, append=keys.size)
            sums = np.add.reduceat(scores, starts, axis=0, dtype=np.float64)
            maxima = np.maximum.reduceat(scores, starts, axis=0)
            minima = np.minimum.reduceat(scores, starts, axis=0)
        width = scores.shape[1]
        self._count.reshape(-1)[groups] += counts
        self._sum.reshape(-1, width)[groups] += sums
        state = self._max.reshape(-1, width)
        state[groups] = np.maximum(state[groups], maxima)
        state = self._min.reshape(-1, width)
        state[groups] = np.minimum(state[groups], minima)
        return dropped

    def finish(
        self, request_id: str, finished_by: str, engine_id: str = ""
    ) -> RequestRecord | None:
        """Close a request; None if it is not live (never seen, already closed or evicted)."""
        key = (engine_id, request_id)
        self._remember_finished(key)
        slot = self._slot_of.get(key)
        if slot is None:
            return None
        record = self._record(slot, finished_by)
        self._release(slot)
        return record

    def expire(self, now: float, idle_timeout: float) -> list[RequestRecord]:
        """Close every request with no data for ``idle_timeout`` seconds."""
        idle = np.flatnonzero(self._last_seen <= now - idle_timeout)
        return [
            record
            for engine_id, request_id in (self._request_of[s] for s in idle)
            if (record := self.finish(request_id, FINISHED_BY_IDLE, engine_id))
        ]

    def forget_engine(self, engine_id: str) -> list[RequestRecord]:
        """Close an engine's requests (it is gone) and forget the ones it finished."""
        gone = [slot for (engine, _), slot in self._slot_of.items() if engine == engine_id]
        for key in [k for k in self._recently_finished if k[0] == engine_id]:
            del self._recently_finished[key]
        records = [self._record(slot, FINISHED_BY_IDLE) for slot in gone]
        for slot in gone:
            self._release(slot)
        return records

    def _slots_for(
        self,
        model_name: str,
        engine_id: str,
        request_ids: list[str],
        request_index: np.ndarray,
        now: float,
        owner: int,
    ) -> tuple[np.ndarray, list[DroppedTokens]]:
        get = self._slot_of.get
        slot_list = [get((engine_id, request_id), _NO_SLOT) for request_id in request_ids]
        slots = np.array(slot_list, dtype=np.int64)
        if _NO_SLOT not in slot_list:
            self._last_seen[slots] = now
            return slots, []
        self._last_seen[slots[slots != _NO_SLOT]] = now
        new: list[int] = []
        late: list[int] = []
        for i in np.flatnonzero(slots == _NO_SLOT).tolist():
            (late if (engine_id, request_ids[i]) in self._recently_finished else new).append(i)
        dropped: list[DroppedTokens] = []
        refused: dict[str, list[int]] = {"state_full": [], "stream_state_full": []}
        for i in new:
            victim, reason = self._victim(owner)
            if victim != _NO_SLOT:
                if self._last_seen[victim] >= now:  # every candidate is in this batch
                    refused[reason].append(i)
                    continue
                tokens = int(self._count[victim].sum())
                dropped.append(
                    DroppedTokens(self._model_of[victim], reason, tokens, incoming=False)
                )
                self._release(victim)
            slots[i] = self._open((engine_id, request_ids[i]), model_name, now, owner)
        for reason, indices in (("after_finish", late), *refused.items()):
            if indices:
                tokens = int(np.isin(request_index, indices).sum())
                dropped.append(DroppedTokens(model_name, reason, tokens))
        return slots, dropped

    def _victim(self, owner: int) -> tuple[int, str]:
        """The slot a new request of ``owner`` must take over (least recently updated among
        the owner's when it is at its cap, else among all when none is free), and why."""
        at_cap = self._live_by_owner.get(owner, 0) >= self.max_per_owner
        if at_cap and self.max_per_owner < self.max_requests:
            mine = np.where(self._owner_of == owner, self._last_seen, np.inf)
            return int(np.argmin(mine)), "stream_state_full"
        if not self._free:
            return int(np.argmin(self._last_seen)), "state_full"
        return _NO_SLOT, ""

    def _open(self, key: tuple[str, str], model_name: str, now: float, owner: int) -> int:
        slot = self._free.pop()
        self._owner_of[slot] = owner
        self._live_by_owner[owner] = self._live_by_owner.get(owner, 0) + 1
        self._slot_of[key] = slot
        self._request_of[slot] = key
        self._model_of[slot] = model_name
        self._first_seen[slot] = now
        self._last_seen[slot] = now
        if self.keep_token_scores:
            self._kept[slot] = _Kept([], [], [])
        self._live_by_model[model_name] = self._live_by_model.get(model_name, 0) + 1
        return slot

    def _release(self, slot: int) -> None:
        del self._slot_of[self._request_of[slot]]
        model_name = self._model_of[slot]
        self._live_by_model[model_name] -= 1
        owner = int(self._owner_of[slot])
        if self._live_by_owner[owner] == 1:  # forget owners with nothing live: streams come and go
            del self._live_by_owner[owner]
        else:
            self._live_by_owner[owner] -= 1
        self._owner_of[slot] = -1
        self._count[slot] = 0
        self._sum[slot] = 0.0
        self._max[slot] = -np.inf
        self._min[slot] = np.inf
        self._streaming.clear(slot * 2 + np.arange(2))
        self._last_seen[slot] = np.inf
        self._kept[slot] = None
        self._trace_of[slot] = None
        self._prefix_cached[slot] = 0
        self._free.append(slot)

    def _remember_finished(self, key: tuple[str, str]) -> None:
        self._recently_finished[key] = None
        if len(self._recently_finished) > self.max_requests:
            del self._recently_finished[next(iter(self._recently_finished))]

    def _keep(
        self, slots: np.ndarray, positions: np.ndarray, phases: np.ndarray, scores: np.ndarray
    ) -> None:
        order = np.argsort(slots, kind="stable")  # group by request, arrival order within
        slots, positions, phases, scores = (
            slots[order],
            positions[order],
            phases[order],
            scores[order],
        )
        bounds = np.flatnonzero(np.concatenate(([True], slots[1:] != slots[:-1], [True])))
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            kept = self._kept[int(slots[start])]
            if kept is None:
                continue
            take = min(int(end - start), self.keep_token_scores - kept.count)
            if take <= 0:
                continue
            kept.positions.append(positions[start : start + take].copy())
            kept.phases.append(phases[start : start + take].copy())
            kept.scores.append(scores[start : start + take].copy())
            kept.count += take

    def _record(self, slot: int, finished_by: str) -> RequestRecord:
        phases = []
        for phase, name in enumerate(PHASE_NAMES):
            count = int(self._count[slot, phase])
            if count == 0:
                continue
            means = self._sum[slot, phase] / count
            highs = self._max[slot, phase]
            aggregates = self._streaming.values(slot * 2 + phase, count, means, highs)
            thresholds = self._verdict_thresholds[phase]
            verdicts = [
                None if np.isnan(t) else FLAGGED if a > t else CLEAR
                for a, t in zip(aggregates.tolist(), thresholds.tolist(), strict=True)
            ]
            circuits = tuple(
                CircuitStats(circuit, float(mean), float(high), float(low), aggregate, verdict)
                for circuit, mean, high, low, aggregate, verdict in zip(
                    self.circuit_names,
                    means,
                    highs,
                    self._min[slot, phase],
                    aggregates.tolist(),
                    verdicts,
                    strict=True,
                )
            )
            phases.append(PhaseStats(name, count, circuits))
        kept = self._kept[slot]
        tokens = None
        if kept is not None:
            tokens = TokenScores(
                positions=np.concatenate(kept.positions or [np.zeros(0, np.int32)]),
                phases=np.concatenate(kept.phases or [np.zeros(0, np.uint8)]),
                scores=np.concatenate(
                    kept.scores or [np.zeros((0, len(self.circuit_names)), np.float32)]
                ),
            )
        engine_id, request_id = self._request_of[slot]
        return RequestRecord(
            request_id=request_id,
            engine_id=engine_id,
            model_name=self._model_of[slot],
            finished_by=finished_by,
            phases=tuple(phases),
            first_received=float(self._first_seen[slot]),
            tokens=tokens,
            traceparent=self._trace_of[slot],
            prefix_cached_tokens=int(self._prefix_cached[slot]),
        )
