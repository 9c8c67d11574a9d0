"""The probe under tensor parallelism (2 ranks, compiled mode) on a 2-core CPU.

hook_z is sharded by heads: each rank ships the heads it holds. The residual stream is
replicated: rank 0 ships it. A direction over MLP neurons reads a sharded site: each rank
computes its partial sum, an all-reduce inside the compiled graph adds them, rank 0 ships
it. Both ranks ship the same token rows for the same step, which the sidecar joins on.
"""

from __future__ import annotations

import numpy as np
import pytest
from probe_engine_helpers import assert_matches_reference, generate, make_tiny_llama, probed_engine

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
    },
    {"name": "post1", "kind": "direction", "site": "blocks.1.hook_resid_post", "direction": 128},
    {"name": "mlp0", "kind": "direction", "site": "blocks.0.mlp.hook_post", "direction": 256},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_tp")
    with probed_engine(
        root,
        make_tiny_llama(root / "model"),
        COMPONENTS,
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},  # one core per rank
        tensor_parallel_size=2,
    ) as engine:
        yield engine


def test_each_rank_ships_its_columns_for_the_same_rows(setup):
    prompts = [list(range(3, 12)), list(range(40, 44))]
    outputs = generate(setup.llm, prompts, max_tokens=4)
    assert setup.llm.collective_rpc(probe_flush) == [True, True]
    stats = setup.llm.collective_rpc(probe_stats)
    assert [(s.rank, s.world_size) for s in stats] == [(0, 2), (1, 2)]
    assert sorted(stats[0].component_ids) == [0, 2, 3]  # head 0, residual, MLP (all-reduced)
    assert sorted(stats[1].component_ids) == [1]  # head 1
    batches = setup.server.batches
    by_rank = {
        rank: {s.steps[0]: s for b in batches if b.rank == rank for s in b.split_steps()}
        for rank in (0, 1)
    }
    assert by_rank[0].keys() == by_rank[1].keys() and by_rank[0]
    # One engine: one identity on both ranks (the sidecar joins their steps by it).
    (engine_id,) = {b.engine_id for b in batches}
    assert engine_id.endswith("-dp0") and len(engine_id) > len("-dp0")
    for step, first in by_rank[0].items():
        second = by_rank[1][step]
        assert first.request_ids == second.request_ids
        for column in ("request_index", "positions", "phases"):
            np.testing.assert_array_equal(getattr(first, column), getattr(second, column))
    for rank in (0, 1):
        assert_matches_reference(batches, outputs, prompts, setup.model_dir, setup.spec, rank)
