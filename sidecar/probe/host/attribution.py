"""Which request, position and phase each token of an engine step belongs to, and sampling.

A step's forward pass carries the scheduled tokens of every request in the batch, request
after request in the model runner's batch order, followed by padding (CUDA graph sizes).
``StepLayout`` (read by ``vllm_internals``) is that order with each request's scheduled
token count and prompt length; ``attribute`` turns it and the positions the model saw into
per-token rows, dropping padding. A token is a prompt token when its position is below its
request's prompt length, else a generated token (the engine feeds generated tokens back one
per step; the last one is never fed back). Prefix-cached tokens skip the forward pass, so
they have no rows.

Request ids: vLLM's front ends add a random suffix to the id a user gives, so that ids are
unique inside the engine; ``vllm_internals.external_request_id`` strips it: the probe ships
the id the user sees. For the OpenAI server that is the response ``id`` for chat completions
and ``<response id>-<prompt index>`` for completions. A caller may give the same id to
concurrent requests (``LLM.generate`` ids, the OpenAI server's ``X-Request-Id``):
``RequestIds`` keeps the engine id as the identity and exports the caller's id only while no
other live request exports it, so such requests are never merged into one.

Sampling (``SamplePolicy``, env ``CIRCUITWATCH_SAMPLE``), identical on every
tensor-parallel rank because it reads only the step's metadata:
    "0.25"  a fraction (text with a dot, in (0, 1]): a token is kept when a hash of its
            request id and position falls below it, so a token's fate does not depend on
            which step or batch it came in
    "256"   a cap (an integer >= 1): at most that many tokens per step; generated tokens
            first, then prompt tokens evenly spread over the step
Default ``"512"``: every token of a step up to 512, which covers every decode step of a
batch of up to 512 requests, and thins out only long prefill chunks.

The latency budget's level (``sidecar.probe.host.budget``) thins steps before the policy
above, and before the rows are copied. Plain decode steps are kept or left whole (see
there); in the others ``SpreadSample`` keeps a systematic sample of each request's tokens,
evenly spread over its positions from an offset drawn from its id. Each token is kept with
probability exactly the level (over the offset), so a request's sampled tokens estimate its
per-phase aggregates without bias, and a request of L tokens at level p gets floor(L·p) or
ceil(L·p) of them, never left to chance. Prompt tokens are kept at least at 1/(prompt
length), so every request has a sampled prompt token however low the level: no request is
starved. The decision reads only the request id, the position and the level: a token's fate
does not depend on which step or batch it came in.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from sidecar.probe.vllm_internals import StepLayout, external_request_id
from sidecar.protocol.batch import GENERATED, PROMPT

DEFAULT_SAMPLE = "512"


@dataclass(frozen=True)
class StepIds:
    """One step's request ids as exported: its requests' (in batch order) and its finished."""

    req_ids: list[str]
    finished: list[str]


class RequestIds:
    """The id each live engine request is exported under, unique among live requests.

    A request is exported under its caller's id (``external_request_id``) unless another
    live request already is, then under its full engine id (unique in the engine); the name
    holds until the request finishes. Fed every step in engine order, as ``step`` is on
    every tensor-parallel rank, it gives every rank the same names.
    """

    def __init__(self, randomized: bool = True, max_live: int = 65_536):
        self._randomized = randomized
        self._max_live = max_live  # a request whose finish was never seen must not leak
        self._live: dict[str, str] = {}  # engine id -> exported id, oldest first
        self._exported: set[str] = set()

    def step(self, req_ids: list[str], finished: list[str]) -> StepIds:
        """Names for a step's requests, then release its finished ones. A request that
        starts in the step its namesake finishes in gets a new name: the sidecar must not
        read its tokens as the finished one's."""
        names = [self._name(r) for r in req_ids]
        return StepIds(names, [self._release(r) for r in finished])

    def _name(self, internal: str) -> str:
        name = self._live.get(internal)
        if name is not None:
            return name
        name = external_request_id(internal, self._randomized)
        if name in self._exported:
            name = internal
        suffix = 1
        while name in self._exported:  # a caller's id that equals another's engine id
            suffix += 1
            name = f"{internal}#{suffix}"
        if len(self._live) >= self._max_live:
            self._exported.discard(self._live.pop(next(iter(self._live))))
        self._live[internal] = name
        self._exported.add(name)
        return name

    def _release(self, internal: str) -> str:
        name = self._live.pop(internal, None)
        if name is None:  # never ran in a step seen here: not the live namesake's finish
            name = external_request_id(internal, self._randomized)
            return internal if name in self._exported else name
        self._exported.discard(name)
        return name


@dataclass(frozen=True)
class TokenRows:
    """Per-token attribution of one step: index into ``StepLayout.req_ids``, position, phase."""

    request_index: np.ndarray  # uint32 [n]
    positions: np.ndarray  # int32 [n]
    phases: np.ndarray  # uint8 [n]

    def take(self, rows: np.ndarray) -> TokenRows:
        return TokenRows(self.request_index[rows], self.positions[rows], self.phases[rows])


def attribute(
    layout: StepLayout, positions: np.ndarray, kept: np.ndarray | None = None
) -> TokenRows:
    """Rows for the first ``layout.num_tokens`` entries of ``positions``; the rest is padding.

    With ``kept`` (indices of the layout's rows), rows for those only, ``positions`` theirs.
    """
    n = layout.num_tokens if kept is None else kept.shape[0]
    if positions.shape[0] < n:
        raise ValueError(f"{positions.shape[0]} positions for a step of {n} tokens")
    request_index = np.repeat(np.arange(len(layout.req_ids), dtype=np.uint32), layout.num_scheduled)
    if kept is not None:
        request_index = request_index[kept]
    positions = positions[:n].astype(np.int32)
    prompt = positions < np.asarray(layout.prompt_lens)[request_index]
    phases = np.where(prompt, PROMPT, GENERATED).astype(np.uint8)
    return TokenRows(request_index, positions, phases)


@dataclass(frozen=True)
class SamplePolicy:
    """Which tokens of a step to ship: a ``fraction`` of them, or at most ``cap`` of them."""

    fraction: float | None = None
    cap: int | None = None

    def __post_init__(self):
        if (self.fraction is None) == (self.cap is None):
            raise ValueError("a sample policy is either a fraction or a cap")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"sample fraction {self.fraction} is not in (0, 1]")
        if self.cap is not None and self.cap < 1:
            raise ValueError(f"sample cap {self.cap} is not >= 1")

    @classmethod
    def parse(cls, text: str) -> SamplePolicy:
        """``"0.25"`` (a fraction, has a dot) or ``"256"`` (a per-step cap); ValueError else."""
        text = text.strip()
        try:
            if "." in text:
                return cls(fraction=float(text))
            return cls(cap=int(text))
        except ValueError as e:
            raise ValueError(
                f"sample {text!r}: expected a fraction in (0, 1] such as '0.25' "
                f"or a per-step token cap such as '256' ({e})"
            ) from None

    def select(self, rows: TokenRows, req_ids: list[str], step_sizes: list[int]) -> np.ndarray:
        """Indices of the rows to keep, ascending.

        ``rows`` are the rows of consecutive steps, ``step_sizes`` how many each has: a cap
        applies to each step on its own.
        """
        n = rows.positions.shape[0]
        if self.fraction is not None:
            if self.fraction >= 1.0:
                return np.arange(n)
            keys = np.array([zlib.crc32(r.encode()) for r in req_ids], dtype=np.uint64)
            unit = _mix(
                (keys[rows.request_index] << np.uint64(32)) | rows.positions.astype(np.uint64)
            )
            return np.flatnonzero(unit < self.fraction)
        if max(step_sizes, default=0) <= self.cap:
            return np.arange(n)
        starts = np.cumsum([0, *step_sizes[:-1]])
        return np.concatenate(
            [
                start + self._capped(rows.phases[start : start + size])
                for start, size in zip(starts.tolist(), step_sizes, strict=True)
            ]
        )

    def count(self, layout: StepLayout, kept: np.ndarray | None = None) -> int:
        """How many of one step's tokens ``select`` keeps, from its layout alone: what a drop
        of the step before its rows are read loses (the probe's books are in sampled tokens).
        ``kept``: the layout's rows the latency budget let through (None: all). A fraction
        needs the positions, which start at each request's computed tokens."""
        n = layout.num_tokens if kept is None else kept.shape[0]
        if self.cap is not None:
            return min(n, self.cap)
        if self.fraction >= 1.0 or n == 0:
            return n
        if layout.num_computed is None:
            raise ValueError("counting a fraction's tokens needs the layout's num_computed")
        scheduled = layout.num_scheduled
        offsets = np.cumsum(scheduled) - scheduled  # each request's first row in the step
        positions = np.repeat(layout.num_computed - offsets, scheduled) + np.arange(
            layout.num_tokens
        )
        if kept is not None:
            positions = positions[kept]
        rows = attribute(layout, positions, kept)
        return int(self.select(rows, layout.req_ids, [n]).shape[0])

    def _capped(self, phases: np.ndarray) -> np.ndarray:
        """At most ``cap`` of one step's rows: generated tokens first, then prompt tokens spread."""
        if phases.shape[0] <= self.cap:
            return np.arange(phases.shape[0])
        generated = np.flatnonzero(phases == GENERATED)
        if generated.shape[0] >= self.cap:
            return generated[_spread(generated.shape[0], self.cap)]
        prompt = np.flatnonzero(phases == PROMPT)
        keep = prompt[_spread(prompt.shape[0], self.cap - generated.shape[0])]
        return np.sort(np.concatenate([generated, keep]))


def _spread(n: int, k: int) -> np.ndarray:
    """k distinct indices evenly spread over range(n), k <= n."""
    return (np.arange(k, dtype=np.int64) * n) // k


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 keys, as floats in [0, 1)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class SpreadSample:
    """Which of a step's rows the budget's level keeps: see the module docstring.

    Remembers each live request's offset (drawn from its engine id) until it finishes.
    """

    def __init__(self, max_live: int = 65_536):
        self._max_live = max_live  # a request whose finish was never seen must not leak
        self._offsets: dict[str, float] = {}

    def select(
        self, layout: StepLayout, level: float, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """Indices of the step's rows to keep, ascending.

        Only each request's first position in the step is read: the layout's
        ``num_computed`` (known on the host before the forward, so choosing reads no device
        memory), else, for a layout that does not say, ``positions`` (those the model saw).

        Position x of a request, sampled at rate r from its offset u, is kept when an integer
        k falls in (x·r + u, (x+1)·r + u]. A request's tokens in one step are consecutive
        positions, so a chunk [a, b) keeps one token per integer k in (a·r + u, b·r + u],
        x = ceil((k - u) / r) - 1: the chunks' bounds are computed for all requests at once
        and only the kept tokens are walked, so a low level costs the engine thread little
        whatever the batch size.
        """
        if len(self._offsets) > self._max_live:
            self._offsets.clear()
        get = self._offsets.get
        start = np.array(
            [u if (u := get(r)) is not None else self._offset(r) for r in layout.req_ids]
        )
        n = layout.num_scheduled
        row = np.cumsum(n) - n
        if layout.num_computed is not None:
            first = np.asarray(layout.num_computed, dtype=np.int64)
        elif positions is not None:
            first = positions[row].astype(np.int64)
        else:
            raise ValueError("choosing rows needs the layout's num_computed or the positions")
        end = first + n
        prompt_len = np.asarray(layout.prompt_lens)
        boundary = np.clip(prompt_len, first, end)  # prompt tokens before it, generated after
        prompt_rate = np.maximum(level, 1.0 / np.maximum(prompt_len, 1))
        # Per request, its prompt part [first, boundary), then its generated part.
        chunks = (
            (first, boundary, prompt_rate),
            (boundary, end, np.full(first.shape, level)),
        )
        bounds = [(np.floor(a * r + start), np.floor(b * r + start)) for a, b, r in chunks]
        if not any((hi > lo).any() for lo, hi in bounds):
            return np.zeros(0, dtype=np.int64)
        kept: list[int] = []
        for i in np.flatnonzero(np.logical_or.reduce([hi > lo for lo, hi in bounds])).tolist():
            u, offset = float(start[i]), int(row[i] - first[i])
            for (a, b, rate), (lo, hi) in zip(chunks, bounds, strict=True):
                a_i, b_i, r_i = int(a[i]), int(b[i]), float(rate[i])
                for k in range(int(lo[i]) + 1, int(hi[i]) + 1):
                    x = min(max(math.ceil((k - u) / r_i) - 1, a_i), b_i - 1)  # float-safe
                    kept.append(offset + x)
        return np.array(sorted(kept), dtype=np.int64)

    def forget(self, finished: list[str]) -> None:
        for request_id in finished:
            self._offsets.pop(request_id, None)

    def _offset(self, request_id: str) -> float:
        offset = self._offsets[request_id] = request_offset(request_id)
        return offset


def request_offset(request_id: str) -> float:
    """A request's sampling offset in [0, 1): a hash of its id, the same on every rank."""
    key = np.array([zlib.crc32(request_id.encode())], dtype=np.uint64) << np.uint64(32)
    return float(_mix(key)[0])
