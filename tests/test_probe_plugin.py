"""``register()``, the vLLM entry point: free when off, never raising, idempotent.

Each case runs in a fresh interpreter, as vLLM's processes do, so what it imports and what
it wraps are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from sidecar.probe.plugin import register
register()
register()
result = {"heavy": sorted(m for m in ("torch", "vllm", "grpc") if m in sys.modules)}
if "vllm.v1.worker.gpu_worker" in sys.modules:
    from vllm.v1.worker.gpu_worker import Worker
    wrapped = Worker.load_model
    result["wrapped_once"] = not hasattr(wrapped.__wrapped__, "__circuitwatch_wrapped__")
    result["wrapped"] = [
        hasattr(getattr(Worker, name), "__circuitwatch_wrapped__")
        for name in ("load_model", "execute_model", "shutdown")
    ]
print("RESULT " + json.dumps(result))
"""


def run_register(env: dict[str, str]) -> tuple[dict, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUITWATCH_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), done.stderr


def test_entry_point_is_declared_for_vllm():
    (plugin,) = [p for p in entry_points(group="vllm.general_plugins") if p.name == "circuitwatch"]
    assert plugin.value == "sidecar.probe.plugin:register"


def test_without_a_spec_register_does_nothing_and_imports_nothing_heavy():
    result, _ = run_register({})
    assert result == {"heavy": []}


def test_bad_settings_are_logged_and_nothing_is_wrapped():
    result, log = run_register({"CIRCUITWATCH_SPEC": "/specs/a.yaml"})
    assert result == {"heavy": []}
    assert "circuitwatch: probes off: CIRCUITWATCH_SPEC is set but CIRCUITWATCH_ENDPOINT" in log


@pytest.mark.engine  # imports vLLM: about 15 s
def test_register_twice_wraps_the_worker_once():
    result, _ = run_register(
        {"CIRCUITWATCH_SPEC": "/specs/a.yaml", "CIRCUITWATCH_ENDPOINT": "localhost:1"}
    )
    assert result["wrapped"] == [True, True, True]
    assert result["wrapped_once"]
