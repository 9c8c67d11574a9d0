"""The probe in a vLLM engine run with ``enforce_eager=True`` and without async scheduling,
and an engine given a spec that does not fit its model: it serves on, without probes."""

from __future__ import annotations

from pathlib import Path

import pytest
from probe_engine_helpers import (
    assert_matches_reference,
    engine_env,
    generate,
    make_tiny_llama,
    probed_engine,
    start_engine,
    stop_engine,
    write_spec,
)

from sidecar.probe.plugin import probe_flush, probe_stats

pytestmark = pytest.mark.engine

COMPONENTS = [
    {"name": "norm_l0h1", "kind": "head", "site": "blocks.0.attn.hook_z", "head": 1},
    {"name": "post0", "kind": "direction", "site": "blocks.0.hook_resid_post", "direction": 128},
    {"name": "mlp1", "kind": "direction", "site": "blocks.1.mlp.hook_post", "direction": 256},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("probe_eager") / "model")


@pytest.fixture(scope="module")
def setup(model_dir):
    with probed_engine(
        model_dir.parent, model_dir, COMPONENTS, enforce_eager=True, async_scheduling=False
    ) as engine:
        yield engine


def test_eager_engine_ships_what_transformers_computes(setup):
    prompts = [list(range(1, 14)), list(range(30, 33)), list(range(50, 58)), [7, 7, 7, 7]]
    outputs = generate(setup.llm, prompts, max_tokens=4)
    assert setup.llm.collective_rpc(probe_flush) == [True]
    assert_matches_reference(setup.server.batches, outputs, prompts, setup.model_dir, setup.spec)


def test_spec_that_does_not_fit_the_model_leaves_the_engine_serving(model_dir, tmp_path, capfd):
    """blocks.7 in a 2-layer model: logged with the field and the reason, probes stay off."""
    spec_path = write_spec(
        tmp_path / "spec",
        model_dir,
        [
            {
                "name": "deep",
                "kind": "direction",
                "site": "blocks.7.hook_resid_post",
                "direction": 128,
            }
        ],
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        engine_env(monkeypatch, spec_path, tmp_path / "unused.sock")
        llm = start_engine(model_dir, enforce_eager=True)
        try:
            outputs = generate(llm, [[1, 2, 3]], max_tokens=3)
            assert len(outputs[0].outputs[0].token_ids) == 3
            assert llm.collective_rpc(probe_stats) == [None]
        finally:
            stop_engine(llm)
    captured = capfd.readouterr()
    log = captured.out + captured.err
    assert "circuitwatch: probes off, the engine serves without them: SpecError" in log
    assert "components[0].site: layer 7 out of range" in log
