"""The default-dtype SmolLM2 engine the package's test modules share.

A SmolLM2 engine takes minutes to start on this machine, so test_live_smollm2 (every site
kind against the offline reference) and test_monitor_live (the harm monitor's verdicts,
``calibrate --engine``) send their requests to one: package scope stops it after the
package's last test, before the rest of the suite runs. Each test reads its own circuits of
the served spec by name, and its own requests' records by their ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .smollm2_live import Server, build_served_spec, serve


@pytest.fixture(scope="package")
def spec_path(smollm2_dir, tmp_path_factory) -> Path:
    """The served spec (smollm2_live.build_served_spec), written once for every engine."""
    return build_served_spec(tmp_path_factory.mktemp("smollm2_spec"), smollm2_dir)


@pytest.fixture(scope="package")
def served(smollm2_dir, spec_path, tmp_path_factory) -> Iterator[Server]:
    """Sidecar (in this process) + vLLM's OpenAI server in the engine's default dtype."""
    with serve(smollm2_dir, spec_path, tmp_path_factory.mktemp("smollm2_default")) as server:
        # The tolerances of both modules are for bfloat16: the engine must really run in it.
        assert "dtype=torch.bfloat16" in server.log.read_text()
        yield server
