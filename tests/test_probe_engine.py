"""The probe inside a real vLLM engine in its default compiled mode (torch.compile).

One engine for the module (about a minute to start on CPU). Every component kind and every
site kind is watched; what the sidecar receives is compared with transformers on the same
weights, token by token, for requests of different lengths batched together.
"""

from __future__ import annotations

import pytest
from probe_engine_helpers import (
    CollectingServer,
    assert_matches_reference,
    compile_cache_tag,
    generate,
    make_tiny_llama,
    probed_engine,
    tokens_by_request,
    wait_for,
)

from sidecar.probe.host.shipper import SIDECAR_UNAVAILABLE
from sidecar.probe.plugin import probe_flush, probe_stats

pytestmark = pytest.mark.engine

COMPONENTS = [
    {"name": "norm_l1h0", "kind": "head", "site": "blocks.1.attn.hook_z", "head": 0},
    {
        "name": "dir_l0h1",
        "kind": "head",
        "site": "blocks.0.attn.hook_z",
        "head": 1,
        "direction": 128,
        "bias": 0.5,
    },
    {"name": "z1", "kind": "direction", "site": "blocks.1.attn.hook_z", "direction": 128},
    {"name": "pre0", "kind": "direction", "site": "blocks.0.hook_resid_pre", "direction": 128},
    {"name": "pre1", "kind": "direction", "site": "blocks.1.hook_resid_pre", "direction": 128},
    {
        "name": "mid1",
        "kind": "direction",
        "site": "blocks.1.hook_resid_mid",
        "direction": 128,
        "bias": -1.0,
    },
    {"name": "post1", "kind": "direction", "site": "blocks.1.hook_resid_post", "direction": 128},
    {"name": "mlp0", "kind": "direction", "site": "blocks.0.mlp.hook_post", "direction": 256},
]


class Sidecar:
    """The collecting server, started and stopped at will on one socket path."""

    def __init__(self, socket_path, num_components):
        self.socket_path = socket_path
        self.num_components = num_components
        self.server: CollectingServer | None = None

    def start(self) -> CollectingServer:
        if self.server is None:
            self.server = CollectingServer(self.socket_path, self.num_components)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_engine")
    model_dir = make_tiny_llama(root / "model")
    with probed_engine(root, model_dir, COMPONENTS, collect=False, block_size=32) as engine:
        yield engine


@pytest.fixture(scope="module")
def sidecar(setup):
    sidecar = Sidecar(setup.socket_path, len(COMPONENTS))
    yield sidecar
    sidecar.stop()


def test_compiled_engine_ships_what_transformers_computes(setup, sidecar):
    llm, model_dir, spec = setup.llm, setup.model_dir, setup.spec
    server = sidecar.start()
    prompts = [list(range(5, 8)), list(range(20, 31)), list(range(40, 46))]
    outputs = generate(llm, prompts)
    assert all(len(o.outputs[0].token_ids) == 5 for o in outputs)
    assert llm.collective_rpc(probe_flush) == [True]
    assert_matches_reference(server.batches, outputs, prompts, model_dir, spec)
    batches = server.batches
    assert {b.spec_hash for b in batches} == {spec.hash}
    assert {(b.rank, b.world_size) for b in batches} == {(0, 1)}
    steps = [s for b in batches for s in b.steps]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    # Several requests of different lengths shared forward passes.
    assert any(len(step.request_ids) == 3 for b in batches for step in b.split_steps())
    (stats,) = llm.collective_rpc(probe_stats)
    assert sorted(stats.component_ids) == list(range(len(COMPONENTS)))
    # The taps are part of the compiled graph, so they are part of its cache key.
    (tag,) = llm.collective_rpc(compile_cache_tag)
    assert tag.startswith(spec.hash)
    # vLLM tells workers a request finished on the step after; the engine runs that step.
    ids = {o.request_id for o in outputs}
    assert wait_for(lambda: ids <= {r for b in server.batches for r in b.finished_request_ids})


def test_prefix_cached_tokens_produce_no_samples(setup, sidecar):
    llm = setup.llm
    server = sidecar.start()
    prompt = list(range(100, 140))  # 40 tokens: one full 32-token block can be cached
    (first,) = generate(llm, [prompt], max_tokens=3)
    (second,) = generate(llm, [prompt], max_tokens=3)
    assert llm.collective_rpc(probe_flush) == [True]
    assert sorted(tokens_by_request(server.batches, first.request_id)) == list(range(42))
    assert sorted(tokens_by_request(server.batches, second.request_id)) == list(range(32, 42))
    assert second.num_cached_tokens == 32


def test_engine_serves_while_the_sidecar_is_down_and_reconnects(setup, sidecar):
    llm, model_dir, spec = setup.llm, setup.model_dir, setup.spec
    sidecar.stop()
    (before,) = llm.collective_rpc(probe_stats)
    outputs = generate(llm, [list(range(60, 70)), list(range(70, 74))])
    assert all(len(o.outputs[0].token_ids) == 5 for o in outputs)

    def unavailable() -> int:
        (stats,) = llm.collective_rpc(probe_stats)
        return stats.shipper.dropped.get(SIDECAR_UNAVAILABLE, 0)

    assert wait_for(lambda: unavailable() > before.shipper.dropped.get(SIDECAR_UNAVAILABLE, 0))
    server = sidecar.start()
    prompts = [list(range(80, 87))]
    outputs = generate(llm, prompts)
    assert llm.collective_rpc(probe_flush) == [True]
    assert wait_for(lambda: tokens_by_request(server.batches, outputs[0].request_id))
    assert_matches_reference(server.batches, outputs, prompts, model_dir, spec)
    assert server.batches[-1].dropped_total[SIDECAR_UNAVAILABLE] >= 1
