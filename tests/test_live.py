"""The live path end to end: a real vLLM engine in its default compiled mode with the plugin,
the real sidecar over gRPC on a Unix socket, and the per-token and per-request scores it
produces checked against the offline reference scorer. (Eager mode is checked against a
direct transformers computation in test_probe_engine_eager.py.)

One engine for the module: the bundled reference model, with its spec (the induction
circuit) widened by a component on each site kind that spec leaves out."""

from __future__ import annotations

import gc
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from probe_engine_helpers import scores_in_offline_order, write_spec

from sidecar.discover.scorer import ReferenceScorer
from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.probe.config import ENV_ENDPOINT, ENV_SAMPLE, ENV_SPEC
from sidecar.probe.plugin import probe_flush, probe_stats
from sidecar.server.records import CollectingSink, RequestRecord
from sidecar.server.service import Sidecar
from sidecar.spec.load import load_spec

pytestmark = pytest.mark.engine

MAX_TOKENS = 6
# float32 in both paths, but different kernels (vLLM's CPU attention and fused RMSNorm vs
# transformers' eager attention) and, in compiled mode, Inductor's fused reductions: the
# component values agree to ~1e-5 relative; 1e-3 absolute + 1e-3 relative leaves room for
# sums over 64-512 features without letting an attribution slip (a token attributed to
# the wrong request or position is off by far more: on this model and spec, neighbouring
# tokens' circuit scores differ by 0.4-6, the median over the test's prompts).
ATOL = RTOL = 1e-3
# The reference spec has heads on both layers and a direction on the residual stream after
# layer 1; these add the residual stream mid-layer and the MLP's neurons, and a circuit that
# mixes every site kind with weights of both signs.
WIDER_COMPONENTS = [
    {"name": "mid", "kind": "direction", "site": "blocks.0.hook_resid_mid", "direction": 256},
    {"name": "mlp", "kind": "direction", "site": "blocks.1.mlp.hook_post", "direction": 512},
]
MIXED = {
    "name": "mixed",
    "components": {"previous_token_l0h0": -1.0, "repeat_probe": 2.0, "mid": 1.0, "mlp": 0.5},
    "bias": 0.25,
}


@dataclass
class Live:
    llm: object
    sidecar: Sidecar
    sink: CollectingSink
    socket: str
    model_dir: Path
    spec_path: Path


def _start_sidecar(spec, listen: str, sink: CollectingSink) -> Sidecar:
    sidecar = Sidecar(spec, listen, metrics_port=0, sinks=[sink], keep_token_scores=4096)
    sidecar.__enter__()
    return sidecar


@contextmanager
def _live(model_dir: Path, spec_path: Path, folder: Path):
    """Sidecar on a Unix socket + vLLM engine in its default compiled mode with the plugin."""
    from vllm import LLM

    listen = f"unix://{folder}/ingest.sock"
    sink = CollectingSink()
    state = Live(None, _start_sidecar(load_spec(spec_path), listen, sink), sink, listen,
                 model_dir, spec_path)  # fmt: skip
    env = {
        ENV_SPEC: str(spec_path),
        ENV_ENDPOINT: listen,
        ENV_SAMPLE: "1.0",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc(probe_stats) in the tests
    }
    with mock.patch.dict(os.environ, env):
        # No prefix caching: a cached block skips the forward pass, so whether a prompt sent
        # twice is scored in full would depend on the build's default block size.
        state.llm = LLM(model=str(model_dir), dtype="float32", gpu_memory_utilization=0.2,
                        max_model_len=512, max_num_seqs=8, seed=0,
                        enable_prefix_caching=False)  # fmt: skip
        try:
            yield state
        finally:
            state.sidecar.__exit__(None, None, None)
            state.llm = None
            gc.collect()


def wider_reference_spec(folder: Path) -> Path:
    """The reference spec (its components, directions and circuits) plus ``WIDER_COMPONENTS``
    and the ``MIXED`` circuit."""
    reference = yaml.safe_load(REFERENCE_SPEC.read_text())
    folder.mkdir(parents=True)
    for direction in {c["direction"]["file"] for c in reference["components"] if "direction" in c}:
        shutil.copy(REFERENCE_SPEC.parent / direction, folder)
    spec_path = write_spec(folder, REFERENCE_DIR, reference["components"] + WIDER_COMPONENTS)
    doc = yaml.safe_load(spec_path.read_text())
    doc["model"] = reference["model"]
    doc["circuits"] = reference["circuits"] + [MIXED]
    spec_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return spec_path


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    with _live(REFERENCE_DIR, wider_reference_spec(folder / "spec"), folder) as state:
        yield state


def _token_prompts(tokenizer, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` repeated-random-token prompts and ``n`` ordinary text prompts, as token ids."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    bos = [tokenizer.bos_token_id]
    repeated = []
    for _ in range(n):
        span = [rng.choice(vocab) for _ in range(rng.randint(12, 40))]
        repeated.append(bos + span + span)
    text = Path(random.__file__).read_text()
    ordinary = []
    for i in range(n):
        ids = tokenizer(text[2000 + 900 * i : 2600 + 900 * i], add_special_tokens=False)
        ordinary.append(bos + ids["input_ids"][: rng.randint(24, 80)])
    return repeated, ordinary


def _generate(live: Live, prompts: list, timeout: float = 30) -> tuple[list, list[RequestRecord]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    inputs = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
    outputs = live.llm.generate(inputs, params, use_tqdm=False)
    wanted = {o.request_id for o in outputs}
    deadline = time.monotonic() + timeout
    got: dict[str, RequestRecord] = {}
    while time.monotonic() < deadline:
        got = {r.request_id: r for r in live.sink.records if r.request_id in wanted}
        if len(got) == len(wanted):
            return outputs, [got[o.request_id] for o in outputs]
        time.sleep(0.05)
    raise AssertionError(f"sidecar scored {len(got)} of {len(wanted)} requests in {timeout} s")


def test_online_scores_equal_the_offline_reference(live):
    reference = ReferenceScorer(load_spec(live.spec_path, model_dir=live.model_dir), live.model_dir)
    repeated, ordinary = _token_prompts(reference.tokenizer, 3, seed=1)
    # one batch: several requests of different lengths share each step; one text prompt
    prompts = repeated + ordinary + ["def main(argv):\n    return 0\n"]
    outputs, records = _generate(live, prompts)
    for output, record in zip(outputs, records, strict=True):
        expected = reference.score(output.prompt_token_ids, list(output.outputs[0].token_ids))
        online = scores_in_offline_order(record, expected, MAX_TOKENS - 1)
        np.testing.assert_allclose(online, expected.scores, atol=ATOL, rtol=RTOL)
        for agg in expected.aggregate():
            stats = record.phase(agg.phase_name).circuit(agg.circuit)
            assert stats.mean == pytest.approx(agg.mean, abs=ATOL, rel=RTOL)
            assert stats.max == pytest.approx(agg.max, abs=ATOL, rel=RTOL)


def test_engine_serves_without_sidecar_and_data_flows_again_when_it_returns(live):
    from transformers import AutoTokenizer

    repeated, _ = _token_prompts(AutoTokenizer.from_pretrained(live.model_dir), 2, seed=3)
    live.sidecar.__exit__(None, None, None)
    dropped_before = _dropped(live)
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = live.llm.generate([{"prompt_token_ids": p} for p in repeated], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outputs)
    live.llm.collective_rpc(probe_flush)
    assert _dropped(live) > dropped_before

    live.sink = CollectingSink()
    live.sidecar = _start_sidecar(live.sidecar.spec, live.socket, live.sink)
    deadline = time.monotonic() + 30
    while True:  # the shipper reconnects with backoff: retry until a request gets through
        try:
            _, records = _generate(live, repeated[:1], timeout=5)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    assert records[0].phase("prompt").tokens == len(repeated[0])


def _dropped(live: Live) -> int:
    (stats,) = live.llm.collective_rpc(probe_stats)
    return sum(stats.shipper.dropped.values())


def _auroc(positives: list[float], negatives: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_auroc_counts_ties_as_half():
    assert _auroc([3.0, 2.0], [1.0, 0.0]) == 1.0
    assert _auroc([1.0], [1.0]) == 0.5
    assert _auroc([0.0], [1.0, -1.0]) == 0.5


def test_induction_circuit_separates_repeated_from_ordinary_text(live):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    repeated, ordinary = _token_prompts(tokenizer, 12, seed=2)
    _, records = _generate(live, repeated + ordinary)
    scores = [r.phase("prompt").circuit("induction").mean for r in records]
    auroc = _auroc(scores[:12], scores[12:])
    print(f"induction AUROC, repeated vs ordinary prompts: {auroc:.3f}")
    assert auroc >= 0.95
