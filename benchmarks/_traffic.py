"""Synthetic engine traffic for the ingest benchmark: the steps of an engine serving many requests.

``EngineTraffic`` yields serialized ``SampleBatch`` messages like one engine worker's probe
sends them: each step carries ``batch_tokens`` sampled tokens of up to ``concurrency`` live
requests (the same number of consecutive positions of each), and lists in
``finished_request_ids`` every request whose last token it carries; a new request (fresh id)
takes the finished one's place. Requests start staggered, so every step finishes a few.
``write_spec`` writes the matching spec: 8 head components on two layers, 3 circuits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidecar.protocol.batch import GENERATED, PROMPT, TokenBatch, to_message

SPEC_HEADS = ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3))  # (layer, head)
CIRCUITS = 3


@dataclass(frozen=True)
class Workload:
    batch_tokens: int
    concurrency: int = 256
    request_tokens: int = 128  # rows a request contributes over its life
    prompt_tokens: int = 32

    @property
    def tokens_per_request(self) -> int:
        """Consecutive positions of each request in one step."""
        return max(1, self.batch_tokens // self.concurrency)


class EngineTraffic:
    """Serialized ``SampleBatch`` messages of an engine serving ``concurrency`` requests."""

    def __init__(self, workload: Workload, spec_hash: str, prefix: str, seed: int = 0):
        self.workload = workload
        self.spec_hash = spec_hash
        self.prefix = prefix
        m = workload.tokens_per_request
        self.slots = workload.batch_tokens // m
        if workload.request_tokens % m:
            raise ValueError(f"request length {workload.request_tokens} is not a multiple of {m}")
        # Stagger the requests' progress so that finishes are spread over the steps.
        stagger = np.arange(self.slots) * workload.request_tokens // self.slots
        self.progress = (stagger // m * m).astype(np.int32)
        self.serial = np.arange(self.slots, dtype=np.int64)
        self.next_serial = self.slots
        self.step = 0
        self.offsets = np.arange(m, dtype=np.int32)
        self.request_index = np.repeat(np.arange(self.slots, dtype=np.uint32), m)
        self.component_ids = np.arange(len(SPEC_HEADS), dtype=np.uint32)
        rows = self.slots * m
        rng = np.random.default_rng(seed)
        self.values = rng.normal(scale=2.0, size=(rows, len(SPEC_HEADS))).astype(np.float32)

    def next_message(self) -> tuple[bytes, list[str]]:
        """One step: its serialized message and the request ids it finishes."""
        w = self.workload
        positions = (self.progress[:, None] + self.offsets).reshape(-1)
        phases = np.where(positions >= w.prompt_tokens, GENERATED, PROMPT).astype(np.uint8)
        ids = [f"{self.prefix}{s}" for s in self.serial.tolist()]
        self.progress += w.tokens_per_request
        done = np.flatnonzero(self.progress >= w.request_tokens)
        finished = [ids[i] for i in done.tolist()]
        batch = TokenBatch(
            spec_hash=self.spec_hash,
            model_name="bench",
            steps=(self.step,),
            component_ids=self.component_ids,
            request_ids=ids,
            request_index=self.request_index,
            positions=positions,
            phases=phases,
            values=self.values,
            finished_request_ids=finished,
        )
        self.step += 1
        self.progress[done] = 0
        self.serial[done] = np.arange(self.next_serial, self.next_serial + done.size)
        self.next_serial += done.size
        return to_message(batch).SerializeToString(), finished


def write_spec(folder: Path) -> Path:
    """8 head components on two layers, 3 circuits (one with a threshold)."""
    lines = [
        "version: 1",
        "model: {name: bench, hash: 'sha256:" + "0" * 64 + "'}",
        "components:",
    ]
    names = [f"l{layer}h{head}" for layer, head in SPEC_HEADS]
    for name, (layer, head) in zip(names, SPEC_HEADS, strict=True):
        site = f"blocks.{layer}.attn.hook_z"
        lines.append(f"  - {{name: {name}, kind: head, site: {site}, head: {head}}}")
    lines.append("circuits:")
    for c in range(CIRCUITS):
        weights = ", ".join(f"{n}: {((i + c) % 3 - 1) * 0.5 + 0.25}" for i, n in enumerate(names))
        threshold = ", threshold: 1.5" if c == 0 else ""
        lines.append(f"  - {{name: circuit_{c}, components: {{{weights}}}{threshold}}}")
    path = folder / "spec.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
