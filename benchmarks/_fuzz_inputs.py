"""Hostile ingest messages for the fuzz run: one seeded generator, one kind of damage per input.

``FuzzInputs(spec_hash, num_components, seed).next()`` returns ``(kind, raw bytes)``. Kinds,
drawn with fixed weights:

    valid          a well-formed batch: requests continued from a pool and new ones, both
                   phases, some finished, sometimes a tensor-parallel rank (world size 2-4)
    truncated      a valid message cut at a random byte
    bit_flip       a valid message with 1-8 bytes overwritten
    random_bytes   0-2048 random bytes
    unknown_ids    component ids out of range, duplicated, or missing a weighted component
    non_finite     NaN, +inf and -inf among the values, or values near float32's limits
    counts         columns of inconsistent lengths, request indices or phases out of range,
                   per-step shares that do not add up, rank >= world size, world size 0
    steps          steps out of order, duplicated, empty, near 2^64, or a step sent again
    request_flood  32-256 new request ids in one batch, never finished, odd strings among them
    strings        long or non-ASCII model names, spec hashes, drop reasons, traceparents
    huge_counts    dropped_total near 2^64, positions at int32's limits
    oversize       a batch of tens of thousands of tokens (in process; over the wire the
                   fuzz run sends messages above the server's limit instead)

Every input is a function of the seed and its index, so a failure reproduces.
"""

from __future__ import annotations

import string

import numpy as np

from sidecar.protocol.circuitwatch.v1 import ingest_pb2

KINDS = {
    "valid": 30,
    "truncated": 8,
    "bit_flip": 8,
    "random_bytes": 6,
    "unknown_ids": 6,
    "non_finite": 6,
    "counts": 8,
    "steps": 6,
    "request_flood": 6,
    "strings": 6,
    "huge_counts": 4,
    "oversize": 1,
}
MODEL = "fuzz-model"
REASONS = ("queue_full", "sidecar_unavailable", "drain_backlog")
_ODD = ("", " ", "é", "模型", "\x00", "a" * 300, "../../etc/passwd", "{x}", "%s", "\U0001f600")


class FuzzInputs:
    def __init__(self, spec_hash: str, num_components: int, seed: int = 0) -> None:
        self.spec_hash = spec_hash
        self.k = num_components
        self.rng = np.random.default_rng(seed)
        self.kinds = tuple(KINDS)
        weights = np.array(list(KINDS.values()), dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.step = 0
        self.serial = 0
        self.live: list[str] = []  # request ids recently used, for continued requests

    def next(self) -> tuple[str, bytes]:
        draw = int(np.searchsorted(self.cumulative, self.rng.random()))
        kind = self.kinds[min(draw, len(self.kinds) - 1)]
        return kind, getattr(self, f"_{kind}")()

    # --- well-formed ---------------------------------------------------------------------

    def batch(
        self, tokens: int | None = None, new_requests: int | None = None, finish: float = 0.2
    ):
        """A well-formed SampleBatch (a message object, to be damaged or serialized) that
        finishes each of its requests with probability ``finish``."""
        rng = self.rng
        n = int(rng.integers(0, 65)) if tokens is None else tokens
        fresh = int(rng.integers(0, 5)) if new_requests is None else new_requests
        continued = [self.live[i] for i in rng.integers(0, len(self.live), 4)] if self.live else []
        requests = list(dict.fromkeys(continued + [self._new_id() for _ in range(fresh)]))
        if n and not requests:
            requests = [self._new_id()]
        index = rng.integers(0, max(1, len(requests)), n).astype("<u4")
        positions = rng.integers(0, 4096, n).astype("<i4")
        phases = rng.integers(0, 2, n).astype("u1")
        ids = np.arange(self.k, dtype=np.uint32)
        if rng.random() < 0.3:
            ids = rng.permutation(ids)
        values = rng.normal(scale=2.0, size=(n, self.k)).astype("<f4")
        finished = [r for r in requests if rng.random() < finish]
        self.live = (self.live + requests)[-256:]
        world_size, rank = 1, 0
        if rng.random() < 0.15:
            world_size = int(rng.integers(2, 5))
            rank = int(rng.integers(0, world_size))
        self.step += 1
        message = ingest_pb2.SampleBatch(
            spec_hash=self.spec_hash if rng.random() < 0.97 else "sha256:" + "f" * 64,
            model_name=MODEL,
            rank=rank,
            world_size=world_size,
            steps=[self.step],
            component_ids=ids.tolist(),
            request_ids=requests,
            request_index=index.tobytes(),
            positions=positions.tobytes(),
            phases=phases.tobytes(),
            values=values.tobytes(),
            finished_request_ids=finished,
            dropped_total={r: int(rng.integers(0, 1000)) for r in REASONS if rng.random() < 0.3},
        )
        return message

    def _new_id(self) -> str:
        self.serial += 1
        return f"req-{self.serial}"

    def _valid(self) -> bytes:
        return self.batch().SerializeToString()

    # --- damaged bytes ---------------------------------------------------------------------

    def _truncated(self) -> bytes:
        raw = self._valid()
        return raw[: int(self.rng.integers(0, max(1, len(raw))))]

    def _bit_flip(self) -> bytes:
        raw = bytearray(self._valid())
        if raw:
            where = self.rng.integers(0, len(raw), int(self.rng.integers(1, 9)))
            raw_values = self.rng.integers(0, 256, where.size)
            for i, v in zip(where.tolist(), raw_values.tolist(), strict=True):
                raw[i] = v
        return bytes(raw)

    def _random_bytes(self) -> bytes:
        return self.rng.bytes(int(self.rng.integers(0, 2049)))

    # --- well-formed protobuf, wrong content ------------------------------------------------

    def _unknown_ids(self) -> bytes:
        choice = int(self.rng.integers(0, 3))
        if choice == 0:
            ids = [int(self.rng.integers(self.k, 2**32))] + list(range(self.k - 1))
        elif choice == 1:
            ids = [0] + list(range(self.k - 1))  # 0 twice
        else:
            ids = list(range(self.k // 2))  # weighted components missing
        message = self.batch()
        n = len(message.positions) // 4
        values = self.rng.normal(size=(n, len(ids))).astype("<f4")
        return self.batch_with(message, component_ids=ids, values=values.tobytes())

    def _non_finite(self) -> bytes:
        message = self.batch(tokens=int(self.rng.integers(1, 33)))
        values = np.frombuffer(message.values, dtype="<f4").copy()
        specials = np.array([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45], dtype="<f4")
        hit = self.rng.integers(0, values.size, max(1, values.size // 8))
        values[hit] = specials[self.rng.integers(0, specials.size, hit.size)]
        return self.batch_with(message, values=values.tobytes())

    def _counts(self) -> bytes:
        message = self.batch(tokens=int(self.rng.integers(1, 33)))
        choice = int(self.rng.integers(0, 8))
        if choice == 0:
            message.positions = message.positions[:-4]
        elif choice == 1:
            message.values = message.values + b"\x00\x00"
        elif choice == 2:
            index = np.frombuffer(message.request_index, dtype="<u4").copy()
            index[0] = len(message.request_ids) + int(self.rng.integers(0, 2**31))
            message.request_index = index.tobytes()
        elif choice == 3:
            phases = bytearray(message.phases)
            phases[0] = int(self.rng.integers(2, 256))
            message.phases = bytes(phases)
        elif choice == 4:
            message.world_size = 0
        elif choice == 5:
            message.world_size = int(self.rng.integers(1, 4))
            message.rank = message.world_size + int(self.rng.integers(0, 100))
        elif choice == 6:
            message.steps.append(message.steps[0] + 1)
            message.step_tokens.extend([len(message.positions) // 4, 7])
        else:
            message.step_finished.extend([int(self.rng.integers(0, 2**32))])
        return message.SerializeToString()

    def _steps(self) -> bytes:
        choice = int(self.rng.integers(0, 5))
        if choice == 0:
            steps = [self.step + 2, self.step + 1]
        elif choice == 1:
            steps = [self.step, self.step]
        elif choice == 2:
            steps = []
        elif choice == 3:
            steps = [2**64 - 1]
        else:
            steps = [max(1, self.step - int(self.rng.integers(0, 8)))]  # a step sent again
        message = self.batch(tokens=int(self.rng.integers(0, 9)))
        if self.rng.random() < 0.5:
            message.world_size, message.rank = 2, int(self.rng.integers(0, 2))
        return self.batch_with(message, steps=steps)

    def _request_flood(self) -> bytes:
        # Never finished: flooded requests stay until evicted or idle, as in an attack.
        fresh = int(self.rng.integers(32, 257))
        message = self.batch(tokens=fresh, new_requests=fresh, finish=0.0)
        requests = list(message.request_ids)
        for i in self.rng.integers(0, len(requests), 4).tolist():
            requests[i] = f"{requests[i]}{self._odd()}"
        requests = list(dict.fromkeys(requests))
        index = self.rng.integers(0, len(requests), fresh).astype("<u4")
        return self.batch_with(message, request_ids=requests, request_index=index.tobytes())

    def _strings(self) -> bytes:
        message = self.batch()
        field = int(self.rng.integers(0, 5))
        if field == 0:
            message.model_name = self._odd() + self._random_text()
        elif field == 1:
            message.spec_hash = self._random_text()
        elif field == 2:
            message.dropped_total[self._odd() + self._random_text()] = 5
        elif field == 3 and message.request_ids:
            message.traceparents[message.request_ids[0]] = self._random_text()
        else:
            message.finished_request_ids.extend([self._random_text() for _ in range(8)])
        return message.SerializeToString()

    def _huge_counts(self) -> bytes:
        message = self.batch(tokens=int(self.rng.integers(1, 9)))
        message.dropped_total["queue_full"] = 2**64 - 1 - int(self.rng.integers(0, 10))
        positions = np.frombuffer(message.positions, dtype="<i4").copy()
        positions[:] = self.rng.choice(np.array([-(2**31), 2**31 - 1, -1], dtype="<i4"))
        message.positions = positions.tobytes()
        return message.SerializeToString()

    def _oversize(self) -> bytes:
        n = int(self.rng.integers(20_000, 60_000))
        return self.batch(tokens=n, new_requests=int(self.rng.integers(1, 64))).SerializeToString()

    # --- helpers ------------------------------------------------------------------------------

    def batch_with(self, message, **fields) -> bytes:
        for name, value in fields.items():
            if isinstance(value, list):
                message.ClearField(name)
                getattr(message, name).extend(value)
            else:
                setattr(message, name, value)
        return message.SerializeToString()

    def _odd(self) -> str:
        return _ODD[int(self.rng.integers(0, len(_ODD)))]

    def _random_text(self) -> str:
        length = int(self.rng.choice([0, 1, 8, 64, 1024, 10_000]))
        alphabet = string.printable + "éü模型\u200b"
        return "".join(self.rng.choice(list(alphabet), length).tolist())
