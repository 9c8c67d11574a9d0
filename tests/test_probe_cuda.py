"""The probe on a CUDA GPU: taps fire under CUDA-graph replay and equal eager mode's values.

Skipped without a CUDA device (and without a CUDA build of vLLM). Two engines on the tiny
random Llama, one after the other: vLLM's default on a GPU (compiled, CUDA graphs captured
for decode batch sizes, so decode steps replay graphs that contain the taps) and
``enforce_eager=True`` (no compilation, no graphs). The same greedy requests run on both;
every token's values must be shipped by both and agree, and both must match transformers on
the same weights. The drain's host ring must be pinned (so its copies are asynchronous).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from probe_engine_helpers import (
    assert_matches_reference,
    generate,
    host_ring_pinned,
    make_tiny_llama,
    probed_engine,
    tokens_by_request,
)

from sidecar.probe.plugin import probe_flush

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

COMPONENTS = [
    {"name": "l0h1", "kind": "head", "site": "blocks.0.attn.hook_z", "head": 1},
    {"name": "l1h0", "kind": "head", "site": "blocks.1.attn.hook_z", "head": 0},
    {"name": "resid", "kind": "direction", "site": "blocks.1.hook_resid_post", "direction": 128},
    {"name": "mlp", "kind": "direction", "site": "blocks.0.mlp.hook_post", "direction": 256},
]
PROMPTS = [list(range(5, 8)), list(range(20, 31)), list(range(40, 46))]
MAX_TOKENS = 8


def _run(root, model_dir, **engine_kwargs):
    """{(prompt index, position): values} of one engine, and its outputs."""
    with probed_engine(root, model_dir, COMPONENTS, **engine_kwargs) as engine:
        outputs = generate(engine.llm, PROMPTS, max_tokens=MAX_TOKENS)
        assert engine.llm.collective_rpc(probe_flush) == [True]
        assert engine.llm.collective_rpc(host_ring_pinned) == [True]
        batches = engine.server.batches
        assert_matches_reference(batches, outputs, PROMPTS, model_dir, engine.spec)
        values = {}
        for i, output in enumerate(outputs):
            for position, (row, _) in tokens_by_request(batches, output.request_id).items():
                values[i, position] = row
        return values, [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_cuda")
    model_dir = make_tiny_llama(root / "model")
    graphs = _run(root / "graphs", model_dir)
    eager = _run(root / "eager", model_dir, enforce_eager=True)
    return graphs, eager


def test_taps_under_cuda_graph_replay_equal_eager_mode(runs):
    (graph_values, graph_tokens), (eager_values, eager_tokens) = runs
    assert graph_tokens == eager_tokens  # the same tokens ran, so the same rows exist
    assert sorted(graph_values) == sorted(eager_values)
    got = np.stack([graph_values[key] for key in sorted(graph_values)])
    expected = np.stack([eager_values[key] for key in sorted(eager_values)])
    scale = np.abs(expected).max(axis=0)
    np.testing.assert_array_less(np.abs(got - expected), 1e-4 * scale + 1e-5)
