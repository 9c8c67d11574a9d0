"""``circuitwatch serve`` imports neither torch nor vLLM, so the sidecar image can leave both out.

A fresh interpreter runs the real command (``sidecar.cli.main``) on the bundled reference spec,
which has a direction component read from safetensors and is checked against the reference
model: argument parsing, spec loading, model check, building the scorer, binding a Unix
socket and /metrics, then a SIGTERM stop. Afterwards no heavy module may be in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, signal, sys, threading, time
from pathlib import Path

import sidecar.cli

socket_path = Path(sys.argv[1])
spec = Path(sys.argv[2])


bound = []


def stop_when_bound():
    deadline = time.monotonic() + 60
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    bound.append(socket_path.exists())
    os.kill(os.getpid(), signal.SIGTERM)  # the serve loop's handler: a graceful stop


threading.Thread(target=stop_when_bound, daemon=True).start()
status = sidecar.cli.main([
    "serve", "--spec", str(spec), "--model-dir", sys.argv[3], "--listen", f"unix://{socket_path}",
    "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--log-level", "WARNING",
])
from sidecar.spec.load import load_spec

print("RESULT " + json.dumps({
    "status": status,
    "bound": bound == [True],
    "directions": [type(c.direction).__module__ for c in load_spec(spec).components
                   if c.direction is not None],
    "heavy": sorted(m for m in sys.modules
                    if m.split(".")[0] in ("torch", "vllm", "transformers", "triton")),
}))
"""


def test_serve_runs_without_importing_torch_or_vllm(tmp_path: Path) -> None:
    spec = REPO / "sidecar" / "models" / "reference_spec" / "spec.yaml"
    model = REPO / "sidecar" / "models" / "reference"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "s.sock"), str(spec), str(model)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["status"] == 0 and result["bound"], done.stderr
    assert result["directions"] == ["numpy"]  # the reference spec's probe direction
    assert result["heavy"] == []
