"""Shared parts of the live SmolLM2 tests: the spec the engines tap, the engine with its sidecar,
and the bfloat16 tolerances; vLLM's OpenAI server with the plugin, chats through the real
``openai`` client and the sidecar's records for them come from ``sidecar.discover.engine_runs``
(which ``circuitwatch calibrate --engine`` uses too).

Used by test_live_smollm2.py (every site kind) and test_monitor_live.py (the bundled
harmful-request monitor's verdicts); the engine is started once for both (conftest.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sidecar.discover.calibrate import entries
from sidecar.discover.engine_runs import (  # noqa: F401 (re-exported to the test modules)
    SERVED_NAME,
    Ran,
    chat,
    openai_client,
    openai_server,
    records_for,
)
from sidecar.models.registry import SMOLLM2_HARM_SPEC, SMOLLM2_SPEC
from sidecar.server.records import CollectingSink
from sidecar.server.service import Sidecar
from sidecar.spec.identity import model_hash, read_model_shape
from sidecar.spec.load import load_spec
from sidecar.spec.writer import CircuitEntry, ComponentEntry, write_spec

# bfloat16 engine against the float32 reference: every activation and weight is rounded to
# 8 mantissa bits and the error grows over 30 layers. In units of a circuit's scale (the
# standard deviation of its offline scores over all tokens sent), measured over 364 tokens of
# 7 requests: the median per-token deviation is at most 0.011, the 99th percentile 0.11, the
# worst 0.25 (hook_resid_post of layer 29 on the first token of a completion, where the
# residual stream is largest). What the tests exist to catch is O(1): the same scores one
# position off deviate by a median 0.5-1.0 on the residual and MLP directions, and a wrong
# head or column slice changes a value altogether. So: every token within 0.35, each
# circuit's median within 0.05, each prompt or generation mean within 0.15 (measured: 0.06).
BF16_TOKEN = 0.35
BF16_MEDIAN = 0.05
BF16_MEAN = 0.15
KEEP_TOKEN_SCORES = 4096  # per request: every token of the longest request sent


def build_served_spec(folder: Path, model_dir: Path) -> Path:
    """The spec every live SmolLM2 engine taps: the discovered spec (sidecar/models/smollm2_spec:
    ``discover heads``' induction and previous-token heads by norm, with its z-scored
    circuits) plus every other site kind, plus the bundled harm monitor
    (sidecar/models/smollm2_harm_spec, its circuit and threshold as they are now).

    Added kinds: the last query head of layer 18 by norm (H8: columns 512..576, beyond what a
    3-KV-head layout would have); a head along a direction; a direction on each of hook_z,
    resid_pre, resid_mid, resid_post and mlp.hook_post. One circuit per added direction, so a
    wrong value cannot hide in a sum. Each test reads its own circuits by name.
    """
    shape = read_model_shape(model_dir)
    generator = torch.Generator().manual_seed(7)

    def unit(width: int) -> torch.Tensor:
        v = torch.randn(width, generator=generator)
        return v / v.norm()

    components, circuits = entries(load_spec(SMOLLM2_SPEC, model_dir=model_dir))
    z_width = shape.n_heads * shape.d_head
    singles = [
        ComponentEntry("l18h7_dir", "blocks.18.attn.hook_z", head=7, direction=unit(576)),
        ComponentEntry("z17_dir", "blocks.17.attn.hook_z", direction=unit(z_width), bias=0.5),
        ComponentEntry("pre5_dir", "blocks.5.hook_resid_pre", direction=unit(shape.d_model)),
        ComponentEntry("mid12_dir", "blocks.12.hook_resid_mid", direction=unit(shape.d_model)),
        ComponentEntry("post29_dir", "blocks.29.hook_resid_post", direction=unit(shape.d_model)),
        ComponentEntry("mlp20_dir", "blocks.20.mlp.hook_post", direction=unit(shape.d_mlp)),
    ]
    components += [ComponentEntry("l18h8", "blocks.18.attn.hook_z", head=8), *singles]
    # l18h8's norm hardly varies (about 5.48, spread 0.01), so on its own bfloat16 rounding
    # would be a large share of its spread; beside a direction a wrong slice still shows.
    circuits.append(CircuitEntry("c_l18h8", {"l18h8": 1.0, "l18h7_dir": 1.0}))
    circuits += [CircuitEntry(f"c_{c.name}", {c.name: 1.0}) for c in singles]
    harm_components, harm_circuits = entries(load_spec(SMOLLM2_HARM_SPEC, model_dir=model_dir))
    header = "every site kind + the bundled harm monitor (tests/smollm2_server)"
    return write_spec(folder, "smollm2", model_hash(model_dir), components + harm_components,
                      circuits + harm_circuits, header)  # fmt: skip


@dataclass(frozen=True)
class Server:
    """A running engine and what its sidecar (in this process) collected and exports."""

    api: str  # vLLM's OpenAI API base URL
    sink: CollectingSink  # every finished request, with every token's scores
    metrics_url: str  # the sidecar's /metrics
    log: Path  # vLLM's log
    start_s: float


@contextmanager
def serve(model_dir: Path, spec_path: Path, workdir: Path) -> Iterator[Server]:
    """The real sidecar in this process (on a Unix socket, /metrics on a free port) and vLLM's
    OpenAI server tapping ``spec_path`` in the engine's default dtype, compiled
    mode, prefix caching off: a cached prefix skips the forward pass, so its tokens would
    never be scored (see test_live_smollm2)."""
    listen = f"unix://{workdir}/ingest.sock"
    sink = CollectingSink()
    sidecar = Sidecar(load_spec(spec_path), listen, metrics_port=0, metrics_host="127.0.0.1",
                      sinks=[sink], keep_token_scores=KEEP_TOKEN_SCORES)  # fmt: skip
    with sidecar:
        started = time.monotonic()
        with openai_server(model_dir, spec_path, listen, workdir) as (api, log):
            start_s = time.monotonic() - started
            print(f"\nSmolLM2 OpenAI server up in {start_s:.0f} s")
            yield Server(api, sink, sidecar.metrics_url, log, start_s)
