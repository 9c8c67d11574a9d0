"""A tap that raises while vLLM's torch.compile traces it (``CIRCUITWATCH_FAULT=tap_error``, the
documented test hook): the engine compiles and serves every request, and the probe finds
the failed tap on its first step, turns off and tells the real sidecar. The drain's faults
and a sidecar killed, stopped or slowed under load are tests/test_faults.py's (one engine
per module: this fault has to be there before the engine starts)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from probe_engine_helpers import stop_engine, wait_for
from test_faults import steady_load

from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.probe.config import ENV_ENDPOINT, ENV_FAULT, ENV_SAMPLE, ENV_SPEC
from sidecar.probe.host.health import TAP_ERROR
from sidecar.probe.plugin import probe_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks._sidecar_process import SidecarProcess  # noqa: E402

pytestmark = pytest.mark.engine


def test_a_tap_that_raises_while_traced_turns_the_probe_off_and_the_engine_serves(tmp_path):
    from vllm import LLM

    socket_path = tmp_path / "ingest.sock"
    serve = SidecarProcess(socket_path)
    env = {
        ENV_SPEC: str(REFERENCE_SPEC),
        ENV_ENDPOINT: f"unix://{socket_path}",
        ENV_SAMPLE: "1.0",
        ENV_FAULT: "tap_error",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    try:
        serve.wait_accepting()
        with mock.patch.dict(os.environ, env):
            llm = LLM(model=str(REFERENCE_DIR), dtype="float32", gpu_memory_utilization=0.2,
                      max_model_len=256, max_num_seqs=4, seed=0)  # fmt: skip
            try:
                with steady_load(llm, seed=0) as load:
                    time.sleep(4.0)
                (stats,) = llm.collective_rpc(probe_stats)
            finally:
                stop_engine(llm)
        assert load.requests >= 4 and load.failed == 0, load.errors[:3]
        assert not stats.status.enabled and stats.status.errors_total == {TAP_ERROR: 1}
        assert wait_for(lambda: serve.value("circuitwatch_probe_enabled", rank="0") == 0)
        assert serve.value("circuitwatch_probe_errors_total", reason=TAP_ERROR) == 1
        assert serve.batches() == 0  # found on the first step, before anything was shipped
    finally:
        serve.stop()
