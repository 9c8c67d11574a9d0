"""Helpers for the probe tests: a tiny Llama, specs for it, a collecting gRPC server, and the
reference component values computed with Hugging Face transformers on the same weights."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from sidecar.models.tokenizer import train_tokenizer
from sidecar.protocol.batch import GENERATED, TokenBatch, from_message
from sidecar.protocol.circuitwatch.v1 import ingest_pb2, ingest_pb2_grpc
from sidecar.spec.identity import model_hash
from sidecar.spec.load import load_spec
from sidecar.spec.schema import CircuitSpec, ComponentKind
from sidecar.spec.sites import Site, SiteKind

VOCAB = 300


def make_tiny_llama(model_dir: Path, seed: int = 0, init_std: float = 0.1) -> Path:
    """A 2-layer Llama (d_model 128, 2 heads of 64, d_mlp 256), random. The default init std
    (0.1) makes attention far from uniform and component values far from zero."""
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        initializer_range=init_std,
        dtype=torch.float32,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


def one_hot_pattern(targets: list[int]) -> torch.Tensor:
    """[T, T] attention where query q puts all its weight on key targets[q]."""
    pattern = torch.zeros(len(targets), len(targets))
    pattern[torch.arange(len(targets)), torch.tensor(targets)] = 1.0
    return pattern


def write_spec(folder: Path, model_dir: Path, components: list[dict], seed: int = 1) -> Path:
    """A spec for ``model_dir``; a component ``direction: <width>`` gets a random direction."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors, entries = {}, []
    for component in components:
        entry = dict(component)
        if isinstance(entry.get("direction"), int):
            tensors[entry["name"]] = torch.randn(entry["direction"], generator=generator)
            entry["direction"] = {"file": "directions.safetensors", "tensor": entry["name"]}
        entries.append(entry)
    if tensors:
        save_file(tensors, str(folder / "directions.safetensors"))
    doc = {
        "version": 1,
        "model": {"name": "tiny", "hash": model_hash(model_dir)},
        "components": entries,
        "circuits": [{"name": "all", "components": {entries[0]["name"]: 1.0}}],
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class _Collector(ingest_pb2_grpc.IngestServicer):
    def __init__(self, num_components: int):
        self.num_components = num_components
        self.batches: list[TokenBatch] = []
        self.lock = threading.Lock()

    def Stream(self, request_iterator, context):
        accepted = 0
        for message in request_iterator:
            batch = from_message(message, self.num_components)
            with self.lock:
                self.batches.append(batch)
            accepted += 1
        return ingest_pb2.StreamSummary(batches_accepted=accepted)


class CollectingServer:
    """A real gRPC Ingest server on a Unix socket that keeps every batch it receives."""

    def __init__(self, socket_path: Path, num_components: int):
        self.socket_path = socket_path
        self.collector = _Collector(num_components)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        ingest_pb2_grpc.add_IngestServicer_to_server(self.collector, self.server)
        self.server.add_insecure_port(f"unix://{socket_path}")
        self.server.start()

    @property
    def batches(self) -> list[TokenBatch]:
        with self.collector.lock:
            return list(self.collector.batches)

    def stop(self) -> None:
        self.server.stop(grace=None).wait()


def reference_values(model_dir: Path, spec: CircuitSpec, token_ids: list[int]) -> np.ndarray:
    """[len(token_ids), k] component values per the shared semantics, from HF transformers."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = model.model.layers
    acts: dict[str, torch.Tensor] = {}

    handles = []
    for L, layer in enumerate(layers):
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, L=L: acts.__setitem__(f"pre{L}", _first(a, k, "hidden_states")),
                with_kwargs=True,
            )
        )
        handles.append(
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, L=L: acts.__setitem__(f"mid{L}", a[0].clone())
            )
        )
        handles.append(
            layer.register_forward_hook(
                lambda m, a, o, L=L: acts.__setitem__(
                    f"post{L}", (o[0] if isinstance(o, tuple) else o).clone()
                )
            )
        )
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, L=L: acts.__setitem__(f"z{L}", a[0].clone())
            )
        )
        handles.append(
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, L=L: acts.__setitem__(f"mlp{L}", a[0].clone())
            )
        )
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        columns = [_component_value(c, acts, layers) for c in spec.components]
    return torch.stack(columns, dim=1).numpy()


def _first(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return (args[0] if args else kwargs[name]).clone()


def _component_value(component, acts, layers) -> torch.Tensor:
    site: Site = component.site
    key = {
        SiteKind.RESID_PRE: "pre",
        SiteKind.RESID_MID: "mid",
        SiteKind.RESID_POST: "post",
        SiteKind.ATTN_Z: "z",
        SiteKind.MLP_POST: "mlp",
    }[site.kind]
    x = acts[f"{key}{site.layer}"][0].double()  # [T, width]
    if component.kind is ComponentKind.DIRECTION:
        return (x @ torch.from_numpy(component.direction).double() + component.bias).float()
    w_o = layers[site.layer].self_attn.o_proj.weight.double()  # [d_model, n_heads * d_head]
    d_head = layers[site.layer].self_attn.head_dim
    cols = slice(component.head * d_head, (component.head + 1) * d_head)
    contribution = x[:, cols] @ w_o[:, cols].T
    if component.direction is None:
        return contribution.norm(dim=-1).float()
    return (contribution @ torch.from_numpy(component.direction).double() + component.bias).float()


def engine_env(monkeypatch, spec_path: Path, socket_path: Path, sample: str = "1.0") -> None:
    """What the engine's processes must see before it starts: the probe's settings, and
    permission to run ``probe_stats`` / ``probe_flush`` through ``collective_rpc``."""
    monkeypatch.setenv("CIRCUITWATCH_SPEC", str(spec_path))
    monkeypatch.setenv("CIRCUITWATCH_ENDPOINT", f"unix://{socket_path}")
    monkeypatch.setenv("CIRCUITWATCH_SAMPLE", sample)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def start_engine(model_dir: Path, **kwargs):
    """A small CPU engine for the tiny model; prompts go in as token ids (no tokenizer)."""
    from vllm import LLM

    settings = dict(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=256,
        max_num_seqs=4,
        gpu_memory_utilization=0.2,
        seed=0,
    )
    settings.update(kwargs)
    return LLM(**settings)


def stop_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


@dataclass(repr=False)
class ProbedEngine:
    """An engine with the plugin on, and what its batches are checked against."""

    llm: object  # LLM's repr runs an RPC on the engine; pytest must not call it in a traceback
    model_dir: Path
    spec: CircuitSpec
    socket_path: Path  # where the plugin sends its batches
    server: CollectingServer | None  # listening there from before the engine starts, if asked

    def __repr__(self) -> str:
        return f"ProbedEngine({self.model_dir})"


@contextmanager
def probed_engine(
    root: Path,
    model_dir: Path,
    components: list[dict],
    collect: bool = True,
    env: dict[str, str] | None = None,
    **engine_kwargs,
) -> Iterator[ProbedEngine]:
    """Write a spec for ``components`` under ``root`` and serve ``model_dir`` with the plugin
    on, sending to ``root / "ingest.sock"`` (where a collecting server listens if ``collect``);
    ``env`` adds environment variables, ``engine_kwargs`` go to ``start_engine``."""
    spec_path = write_spec(root / "spec", model_dir, components)
    socket_path = root / "ingest.sock"
    server = CollectingServer(socket_path, len(components)) if collect else None
    with pytest.MonkeyPatch.context() as monkeypatch:
        engine_env(monkeypatch, spec_path, socket_path)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        llm = start_engine(model_dir, **engine_kwargs)
        try:
            yield ProbedEngine(llm, model_dir, load_spec(spec_path), socket_path, server)
        finally:
            if server is not None:
                server.stop()
            stop_engine(llm)


def generate(llm, prompts: list[list[int]], max_tokens: int = 5):
    """Greedy generation of exactly ``max_tokens`` tokens per prompt."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def tokens_by_request(batches: list[TokenBatch], request_id: str, rank: int = 0):
    """{position: (values row, phase)} of one request across batches from one rank."""
    rows = {}
    for batch in batches:
        if batch.rank != rank or request_id not in batch.request_ids:
            continue
        index = batch.request_ids.index(request_id)
        for i in np.flatnonzero(batch.request_index == index):
            rows[int(batch.positions[i])] = (batch.values[i], int(batch.phases[i]))
    return rows


def wait_for(condition, timeout_s: float = 20.0, interval_s: float = 0.05) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return bool(condition())


def assert_matches_reference(
    batches: list[TokenBatch], outputs, prompts, model_dir: Path, spec, rank: int = 0
) -> None:
    """Every token the engine ran for each request was shipped once, with its phase, and
    the values equal the transformers reference.

    Tolerance: both sides compute in float32 with different kernels (oneDNN vs torch GEMMs,
    vLLM's paged attention and fused add-RMSNorm vs eager attention), which differ by a few
    float32 ulps per op; through two layers that stays near 1e-6 of a column's scale. A
    token attributed to the wrong request or position is off by the scale itself, so
    1e-4 of the scale separates the two by two orders of magnitude each way.
    """
    for output, prompt in zip(outputs, prompts, strict=True):
        fed = list(prompt) + list(output.outputs[0].token_ids)[:-1]  # last token never fed
        rows = tokens_by_request(batches, output.request_id, rank)
        assert sorted(rows) == list(range(len(fed))), output.request_id
        assert [rows[p][1] for p in sorted(rows)] == [0] * len(prompt) + [1] * (
            len(fed) - len(prompt)
        )
        ids = next(b.component_ids for b in batches if b.rank == rank)
        reference = reference_values(model_dir, spec, fed)[:, ids]
        got = np.stack([rows[p][0] for p in range(len(fed))])
        scale = np.abs(reference).max(axis=0)
        error = np.abs(got - reference)
        assert np.all(error < 1e-4 * scale + 1e-5), (output.request_id, error.max(axis=0), scale)


def scores_in_offline_order(record, offline, generated: int) -> np.ndarray:
    """A sidecar record's per-token scores in the offline scorer's order (by position),
    after checking that the engine finished the request and that the positions and phases
    equal the offline ones, ``generated`` of them in the generation phase."""
    assert record.finished_by == "engine"
    tokens = record.tokens
    order = np.argsort(tokens.positions, kind="stable")
    np.testing.assert_array_equal(tokens.positions[order], offline.positions)
    np.testing.assert_array_equal(tokens.phases[order], offline.phases)
    assert (offline.phases == GENERATED).sum() == generated
    return tokens.scores[order]


def compile_cache_tag(worker) -> str | None:
    """Run on a worker (``collective_rpc``): what the probe added to vLLM's compile-cache key."""
    return worker.vllm_config.additional_config.get("circuitwatch")


def host_ring_pinned(worker) -> bool:
    """Run on a worker (``collective_rpc``): whether the drain's host ring is pinned memory."""
    from sidecar.probe import vllm_internals

    ring = vllm_internals.attached_probe(worker).drain.ring
    return ring.values.is_pinned() and ring.positions.is_pinned()


def pin_level(worker, level: float) -> bool:
    """Run on a worker (``collective_rpc``): hold the latency budget's sampling level at
    ``level`` from now on, whatever the probe costs."""
    from sidecar.probe import vllm_internals

    budget = vllm_internals.attached_probe(worker).budget
    budget.adaptive = False
    budget.level = level
    return True


def watch_collect(worker, forbid_syncs: bool = False) -> bool:
    """Run on a worker (``collective_rpc``): from now on, after every ``Drain.collect`` of a
    step with tokens, compare each request's first position in the positions buffer (read
    with a sync, after collect) with the layout's ``num_computed``, which the budget's row
    choice reads instead. With ``forbid_syncs``, collect itself runs under
    ``torch.cuda.set_sync_debug_mode("error")``: a host-device sync in it (``.item()``,
    ``.cpu()``, ``torch.cuda.synchronize``, a blocking copy) raises, which turns the probe
    off (its status says ``drain_collect``). ``unwatch_collect`` ends it."""
    from sidecar.probe import vllm_internals

    drain = vllm_internals.attached_probe(worker).drain
    collect = drain.collect
    seen = {"steps": 0, "mismatched": 0}

    def watched(step, layout, finished, prefix_cached=None, level=1.0):
        if forbid_syncs:
            torch.cuda.set_sync_debug_mode("error")
        try:
            pending = collect(step, layout, finished, prefix_cached, level)
        finally:
            if forbid_syncs:
                torch.cuda.set_sync_debug_mode("default")
        if layout.num_tokens:
            positions = drain.taps.positions.positions.cpu().numpy()  # a sync: after collect
            firsts = positions[np.cumsum(layout.num_scheduled) - layout.num_scheduled]
            seen["steps"] += 1
            seen["mismatched"] += int(not np.array_equal(firsts, layout.num_computed))
        return pending

    def stop() -> tuple[int, int]:
        drain.collect = collect
        return seen["steps"], seen["mismatched"]

    watched.stop = stop
    drain.collect = watched
    return True


def unwatch_collect(worker) -> tuple[int, int]:
    """Run on a worker: end ``watch_collect``; (steps checked, steps whose layout did not say
    where a request started)."""
    from sidecar.probe import vllm_internals

    return vllm_internals.attached_probe(worker).drain.collect.stop()


COMPONENTS = [
    {"name": "l0h1", "kind": "head", "site": "blocks.0.attn.hook_z", "head": 1},
    {"name": "l1h0", "kind": "head", "site": "blocks.1.attn.hook_z", "head": 0},
    {"name": "resid", "kind": "direction", "site": "blocks.1.hook_resid_post", "direction": 128},
    {"name": "mid", "kind": "direction", "site": "blocks.0.hook_resid_mid", "direction": 128},
    {"name": "mlp", "kind": "direction", "site": "blocks.1.mlp.hook_post", "direction": 256},
]
CIRCUITS = [
    {"name": "heads", "components": {"l0h1": 1.0, "l1h0": 0.5}},
    {"name": "mixed", "components": {"l1h0": -1.0, "resid": 2.0, "mid": 1.0, "mlp": 0.5},
     "bias": 0.25},
]  # fmt: skip


def tiny_model_and_spec(folder: Path) -> tuple[Path, Path]:
    """The tiny random Llama, with a tokenizer so text prompts work, and a spec
    with head and direction components on every kind of site and two circuits."""
    model_dir = make_tiny_llama(folder / "model")
    texts = [Path(random.__file__).read_text()]  # any fixed text will do
    train_tokenizer(texts, vocab_size=VOCAB).save_pretrained(model_dir)
    spec_path = write_spec(folder / "spec", model_dir, COMPONENTS)
    doc = yaml.safe_load(spec_path.read_text())
    doc["circuits"] = CIRCUITS
    spec_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return model_dir, spec_path
