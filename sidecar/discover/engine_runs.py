"""Chats through a live engine: vLLM's OpenAI server with the plugin, and what the sidecar made
of each request.

``openai_server`` starts ``python -m vllm.entrypoints.openai.api_server`` (the command that
works on the CUDA and the CPU build) in the default compiled mode, with the plugin sending
to a sidecar at ``listen``; ``chat`` sends one conversation through the real ``openai``
client (the model's chat template, as any client's request is rendered) and gets the
engine's token ids back; ``records_for`` waits for the sidecar's record of each. Used by
``circuitwatch calibrate --engine`` (``live_engine``, ``LiveEngine.aggregates``) and by the
live SmolLM2 tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sidecar.discover.datasets import Example
from sidecar.monitoring import free_port, stop_process, wait_until_up
from sidecar.probe.config import ENV_ENDPOINT, ENV_SAMPLE, ENV_SPEC
from sidecar.server.records import CollectingSink, RequestRecord
from sidecar.spec.schema import PHASE_NAMES, AggregationKind, CircuitSpec

ENGINE_START_S = 900  # ~140 s for SmolLM2 on an idle 2-core machine; far more on a busy one
SERVED_NAME = "smollm2"


@contextmanager
def openai_server(
    model_dir: Path,
    spec_path: Path,
    listen: str,
    workdir: Path,
    *,
    served_name: str = SERVED_NAME,
    prefix_caching: bool = False,
    max_num_seqs: int = 4,
) -> Iterator[tuple[str, Path]]:
    """vLLM's OpenAI server with the plugin sending every token's scores to ``listen``.

    Yields (base URL, log path); prints the log's tail when the body raises. The engine runs
    in its default dtype (bfloat16 for SmolLM2's float32 checkpoint on CPU), as served.
    """
    port = free_port()
    env = dict(os.environ, **{ENV_SPEC: str(spec_path), ENV_ENDPOINT: listen, ENV_SAMPLE: "1.0"})
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model_dir), "--served-model-name", served_name,
               "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.2",
               "--max-model-len", "1024", "--max-num-seqs", str(max_num_seqs),
               "--seed", "0"]  # fmt: skip
    command.append("--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching")
    log_path = workdir / "vllm.log"
    log = open(log_path, "w")
    vllm = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{api}/health", vllm, f"vLLM (log: {log_path})", ENGINE_START_S)
        yield api, log_path
    except BaseException:
        log.flush()
        print(f"--- vLLM log ---\n{log_path.read_text()[-6000:]}", file=sys.stderr)
        raise
    finally:
        stop_process(vllm, timeout=60)
        log.close()


def openai_client(api: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{api}/v1", api_key="unused", timeout=300)


@dataclass(frozen=True)
class Ran:
    """One request as the engine ran it."""

    request_id: str  # the engine's (external) request id
    prompt_ids: list[int]
    generated_ids: list[int]


def chat(
    client,
    tag: str,
    conversation: str | Sequence[tuple[str, str]],
    max_tokens: int,
    served_name: str = SERVED_NAME,
) -> Ran:
    """One conversation (a user text, or (role, content) turns) through the chat API, greedy,
    exactly ``max_tokens`` generated; the engine's tokens come back (``return_token_ids``).
    ``tag`` becomes the request id (``chatcmpl-<tag>``), the key of the sidecar's record."""
    turns = [("user", conversation)] if isinstance(conversation, str) else conversation
    response = client.chat.completions.create(
        model=served_name,
        messages=[{"role": role, "content": content} for role, content in turns],
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
        extra_headers={"X-Request-Id": tag},
    )
    if response.id != f"chatcmpl-{tag}":
        raise RuntimeError(f"the engine named request {tag!r} {response.id!r}")
    choice = response.choices[0]
    return Ran(response.id, response.prompt_token_ids, choice.token_ids)


def records_for(
    sink: CollectingSink, ran: Sequence[Ran], timeout: float = 60
) -> list[RequestRecord]:
    """The sidecar's record of each request, in ``ran``'s order (waits for them to finish)."""
    wanted = {r.request_id for r in ran}
    deadline = time.monotonic() + timeout
    got: dict[str, RequestRecord] = {}
    while time.monotonic() < deadline:
        got = {r.request_id: r for r in sink.records if r.request_id in wanted}
        if len(got) == len(wanted):
            return [got[r.request_id] for r in ran]
        time.sleep(0.1)
    seen = sorted(r.request_id for r in sink.records)
    raise TimeoutError(f"sidecar scored {len(got)} of {len(wanted)} requests; it saw {seen}")


@dataclass(frozen=True, eq=False)
class LiveEngine:
    """A running engine tapping ``spec`` and the sink of the sidecar it sends to."""

    spec: CircuitSpec
    client: object  # openai.OpenAI on the engine's API
    sink: CollectingSink
    served_name: str = SERVED_NAME

    def aggregates(
        self,
        spec: CircuitSpec,
        groups: Sequence[Sequence[Example]],
        max_tokens: int = 1,
        workers: int = 4,
    ) -> list[dict[str, np.ndarray]]:
        """Every group's chats through the engine; per group, phase name -> [requests,
        circuits of ``spec``] aggregates from the sidecar's records. The prompt phase always;
        the generation phase when ``max_tokens`` >= 2 (the engine's own greedy answers; a
        chat's final assistant message, if any, is dropped)."""
        if _shape(spec) != _shape(self.spec):
            raise ValueError("the engine taps another spec (components or circuits differ)")
        for examples in groups:
            if any(e.text is not None for e in examples):
                raise ValueError("--engine sends chats: completion texts are not supported")
        phases = PHASE_NAMES if max_tokens >= 2 else PHASE_NAMES[:1]
        run = uuid.uuid4().hex[:8]  # request ids stay unique across calls on one engine
        results = []
        for g, examples in enumerate(groups):

            def send(item: tuple[int, Example], g: int = g) -> Ran:
                i, example = item
                turns = example.messages[:-1] if example.has_generation else example.messages
                return chat(self.client, f"{run}-{g}-{i}", turns, max_tokens, self.served_name)

            with ThreadPoolExecutor(workers) as pool:
                jobs = pool.map(send, enumerate(examples))
                ran = list(tqdm(jobs, total=len(examples), desc="engine", unit="request"))
            values = {p: np.zeros((len(examples), len(spec.circuits))) for p in phases}
            for i, record in enumerate(records_for(self.sink, ran)):
                for phase in phases:
                    stats = record.phase(phase)
                    if stats is None:
                        raise RuntimeError(f"{record.request_id}: no {phase} tokens scored")
                    for j, circuit in enumerate(spec.circuits):
                        values[phase][i, j] = stats.circuit(circuit.name).aggregate
            results.append(values)
        return results


def _shape(spec: CircuitSpec) -> tuple:
    """What decides a circuit's live aggregate: components, weights, biases, aggregations."""
    components = tuple((c.name, c.site.name, c.head, c.bias) for c in spec.components)
    circuits = tuple((c.name, c.weights, c.bias, c.aggregation) for c in spec.circuits)
    return components, circuits


@contextmanager
def live_engine(spec: CircuitSpec, spec_path: Path, model_dir: Path) -> Iterator[LiveEngine]:
    """A sidecar in this process and vLLM's OpenAI server tapping ``spec_path`` (its default
    dtype, compiled mode). Prefix caching is on only when every circuit aggregates with
    ``last``, the one aggregation it cannot change."""
    from sidecar.server.service import Sidecar

    prefix_caching = all(c.aggregation.kind is AggregationKind.LAST for c in spec.circuits)
    sink = CollectingSink()
    with tempfile.TemporaryDirectory(prefix="circuitwatch-engine-") as tmp:
        listen = f"unix://{tmp}/ingest.sock"
        server = openai_server(
            model_dir,
            spec_path,
            listen,
            Path(tmp),
            served_name=spec.model.name,
            prefix_caching=prefix_caching,
        )
        with Sidecar(spec, listen, sinks=[sink], anomaly=None), server as (api, _):
            yield LiveEngine(spec, openai_client(api), sink, spec.model.name)
