"""The probe on a CUDA GPU: taps fire under CUDA-graph replay and equal eager mode's values,
also when the latency budget's level thins the steps, without a host-device sync.

Skipped without a CUDA device (and without a CUDA build of vLLM). Two engines on the tiny
random Llama, one after the other: vLLM's default on a GPU (compiled, CUDA graphs captured
for decode batch sizes, so decode steps replay graphs that contain the taps) and
``enforce_eager=True`` (no compilation, no graphs). The same greedy requests run on both;
every token's values must be shipped by both and agree, and both must match transformers on
the same weights. The drain's host ring must be pinned (so its copies are asynchronous).

Then the graph engine runs the same requests again with the sampling level held at
``LEVEL``: decode steps are kept whole one in round(1 / LEVEL), and the other steps (the
prefill, the decode step after a request finished, which replays a graph) go through the
row choice and the gather on the device. Every ``Drain.collect`` runs under
``torch.cuda.set_sync_debug_mode("error")``, so a sync in it would turn the probe off; the
probe must stay on, ship fewer rows than there are tokens (at least one prompt token per
request), with the values eager mode computed for the same rows, and the layout must say
where each request starts in every step (what the choice reads instead of the positions).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from probe_engine_helpers import (
    assert_matches_reference,
    host_ring_pinned,
    make_tiny_llama,
    pin_level,
    probed_engine,
    tokens_by_request,
    unwatch_collect,
    watch_collect,
)

from sidecar.probe.plugin import probe_flush, probe_stats

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
# Unequal lengths: the step after the shortest finishes is a decode-only step (a replayed
# graph) that is not a plain decode step, so at a level below 1 its rows are chosen.
MAX_TOKENS = [8, 5, 11]
LEVEL = 0.25


def _generate(llm):
    """Greedy generation of exactly ``MAX_TOKENS[i]`` tokens for prompt i."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in MAX_TOKENS]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return llm.generate(prompts, params, use_tqdm=False)


def _values(batches, outputs) -> dict[tuple[int, int], np.ndarray]:
    """{(prompt index, position): values} of the requests ``outputs`` ran."""
    return {
        (i, position): row
        for i, output in enumerate(outputs)
        for position, (row, _) in tokens_by_request(batches, output.request_id).items()
    }


def _thinned(engine):
    """The graph engine's values at ``LEVEL``, checked while collected, and its tokens."""
    llm = engine.llm
    assert llm.collective_rpc(pin_level, args=(LEVEL,)) == [True]
    assert llm.collective_rpc(watch_collect, args=(True,)) == [True]
    before = len(engine.server.batches)
    outputs = _generate(llm)
    assert llm.collective_rpc(probe_flush) == [True]
    [(steps, mismatched)] = llm.collective_rpc(unwatch_collect)
    [stats] = llm.collective_rpc(probe_stats)
    assert stats.status.enabled and not stats.status.errors, stats.status  # no sync in collect
    assert stats.sample_level == LEVEL
    assert steps > 0 and mismatched == 0  # the layout said where every request started
    values = _values(engine.server.batches[before:], outputs)
    return values, [o.outputs[0].token_ids for o in outputs]


def _run(root, model_dir, thin: bool = False, **engine_kwargs):
    """{(prompt index, position): values} of one engine, its outputs' tokens, and with
    ``thin`` the same at ``LEVEL`` (None without)."""
    with probed_engine(root, model_dir, COMPONENTS, **engine_kwargs) as engine:
        outputs = _generate(engine.llm)
        assert engine.llm.collective_rpc(probe_flush) == [True]
        assert engine.llm.collective_rpc(host_ring_pinned) == [True]
        batches = engine.server.batches
        assert_matches_reference(batches, outputs, PROMPTS, model_dir, engine.spec)
        values = _values(batches, outputs)
        return values, [o.outputs[0].token_ids for o in outputs], _thinned(engine) if thin else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_cuda")
    model_dir = make_tiny_llama(root / "model")
    graphs = _run(root / "graphs", model_dir, thin=True)
    eager = _run(root / "eager", model_dir, enforce_eager=True)
    return graphs, eager


def assert_close(got: dict, expected: dict) -> None:
    """The rows of ``got`` equal those of ``expected`` at the same keys (1e-4 of the scale)."""
    keys = sorted(got)
    scale = np.abs(np.stack(list(expected.values()))).max(axis=0)
    error = np.abs(np.stack([got[k] for k in keys]) - np.stack([expected[k] for k in keys]))
    np.testing.assert_array_less(error, 1e-4 * scale + 1e-5)


def test_taps_under_cuda_graph_replay_equal_eager_mode(runs):
    (graph_values, graph_tokens, _), (eager_values, eager_tokens, _) = runs
    assert graph_tokens == eager_tokens  # the same tokens ran, so the same rows exist
    assert sorted(graph_values) == sorted(eager_values)
    assert_close(graph_values, eager_values)


def test_a_level_below_one_ships_the_eager_values_of_the_rows_it_keeps_without_a_sync(runs):
    (_, graph_tokens, (thinned, thinned_tokens)), (eager_values, _, _) = runs
    assert thinned_tokens == graph_tokens
    assert set(thinned) < set(eager_values)  # fewer rows, each one the model ran
    assert len(thinned) < 0.75 * len(eager_values)
    for i, prompt in enumerate(PROMPTS):  # no request starved
        assert any(key[0] == i and key[1] < len(prompt) for key in thinned), i
    assert_close(thinned, eager_values)
