"""The live path on the real model, SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, tied embeddings).

vLLM's OpenAI-compatible server in its default compiled mode with the plugin, the real sidecar
in this process (on a Unix socket, collecting every finished request), requests sent with the
real ``openai`` client through the chat API (the checkpoint's chat template applies) and the
completions API, concurrently so that requests share engine steps. Every online per-token
score and per-request aggregate must equal the offline ReferenceScorer on exactly the tokens
the engine ran (the server returns them: ``return_token_ids``).

Two engines, one after the other (the module fixture is parametrized by dtype, so pytest
finishes one before starting the next):

    float32    ``--dtype float32``: the same arithmetic as the reference up to kernel order.
    default    the engine's default dtype (bfloat16 for this float32 checkpoint on CPU):
               compared with a tolerance relative to each circuit's scale (see BF16_TOKEN).

Prefix caching is off: a cached prefix skips the forward pass, so its tokens are never
scored, and the chat template's shared system prompt would otherwise be cached across
requests (how many tokens depends on the block size).
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from smollm2_live import (
    BF16_MEAN,
    BF16_MEDIAN,
    BF16_TOKEN,
    SERVED_NAME,
    Ran,
    chat,
    openai_client,
    openai_server,
    records_for,
)

from sidecar.models.registry import SMOLLM2_SPEC
from sidecar.protocol.batch import GENERATED
from sidecar.server.records import CollectingSink
from sidecar.server.service import Sidecar
from sidecar.spec.identity import model_hash, read_model_shape
from sidecar.spec.load import SpecError, load_spec
from sidecar.spec.writer import CircuitEntry, ComponentEntry, write_spec

pytestmark = pytest.mark.engine

MAX_TOKENS = 8
# float32: the kernels differ (vLLM's CPU attention, fused RMSNorm, Inductor's reductions vs
# transformers' eager float32), so values agree to ~1e-5 relative, as in test_live.py.
F32_ATOL = F32_RTOL = 1e-3
CHATS = (
    "What is the capital of France?",
    "Give me two tips for sleeping better.",
    "Why is the sky blue? Answer in one sentence.",
)
WORDS = (
    "amber basil cedar delta ember fjord glyph heron iris jasper kelp lumen maple nectar "
    "onyx pixel quartz raven sable tundra umber vortex willow xenon yarrow zephyr"
).split()


def _repeated_chat(rng: random.Random) -> str:
    span = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 16)))
    return f"Repeat this text exactly: {span} {span}"


def build_test_spec(folder: Path, model_dir: Path) -> Path:
    """The discovered spec (sidecar/models/smollm2_spec: ``discover heads``' induction and
    previous-token heads by norm, with its z-scored circuits) plus every other kind.

    Added: the last query head of layer 18 by norm (H8: columns 512..576, beyond what a
    3-KV-head layout would have); a head along a direction; a direction on each of hook_z,
    resid_pre, resid_mid, resid_post and mlp.hook_post. One circuit per added direction, so a
    wrong value cannot hide in a sum.
    """
    shape = read_model_shape(model_dir)
    generator = torch.Generator().manual_seed(7)

    def unit(width: int) -> torch.Tensor:
        v = torch.randn(width, generator=generator)
        return v / v.norm()

    discovered = load_spec(SMOLLM2_SPEC, model_dir=model_dir)
    names = [c.name for c in discovered.components]
    heads = [ComponentEntry(c.name, c.site.name, head=c.head) for c in discovered.components]
    heads.append(ComponentEntry("l18h8", "blocks.18.attn.hook_z", head=8))
    z_width = shape.n_heads * shape.d_head
    singles = [
        ComponentEntry("l18h7_dir", "blocks.18.attn.hook_z", head=7, direction=unit(576)),
        ComponentEntry("z17_dir", "blocks.17.attn.hook_z", direction=unit(z_width), bias=0.5),
        ComponentEntry("pre5_dir", "blocks.5.hook_resid_pre", direction=unit(shape.d_model)),
        ComponentEntry("mid12_dir", "blocks.12.hook_resid_mid", direction=unit(shape.d_model)),
        ComponentEntry("post29_dir", "blocks.29.hook_resid_post", direction=unit(shape.d_model)),
        ComponentEntry("mlp20_dir", "blocks.20.mlp.hook_post", direction=unit(shape.d_mlp)),
    ]
    circuits = [
        CircuitEntry(
            c.name,
            {n: w for n, w in zip(names, c.weights, strict=True) if w},
            description=c.description,
            bias=c.bias,
            threshold=c.threshold,
        )
        for c in discovered.circuits
    ]
    # l18h8's norm hardly varies (about 5.48, spread 0.01), so on its own bfloat16 rounding
    # would be a large share of its spread; beside a direction a wrong slice still shows.
    circuits.append(CircuitEntry("c_l18h8", {"l18h8": 1.0, "l18h7_dir": 1.0}))
    circuits += [CircuitEntry(f"c_{c.name}", {c.name: 1.0}) for c in singles]
    return write_spec(folder, "smollm2", model_hash(model_dir), heads + singles, circuits)


@pytest.fixture(scope="module")
def spec_path(smollm2_dir, tmp_path_factory) -> Path:
    """The spec the live tests run: the discovered one, widened to every site kind."""
    return build_test_spec(tmp_path_factory.mktemp("smollm2_spec"), smollm2_dir)


@dataclass
class Server:
    dtype: str
    api: str
    sink: CollectingSink
    start_s: float


@pytest.fixture(scope="module", params=["float32", "default"])
def server(request, smollm2_dir, spec_path, tmp_path_factory):
    """Sidecar (in this process) + vLLM's OpenAI server for one dtype, one after the other."""
    dtype = request.param
    tmp = tmp_path_factory.mktemp(f"smollm2_{dtype}")
    listen = f"unix://{tmp}/ingest.sock"
    sink = CollectingSink()
    sidecar = Sidecar(load_spec(spec_path), listen, metrics_port=0, sinks=[sink],
                      keep_token_scores=4096)  # fmt: skip
    sidecar.__enter__()
    started = time.monotonic()
    engine_dtype = "float32" if dtype == "float32" else None
    try:
        with openai_server(smollm2_dir, spec_path, listen, tmp, dtype=engine_dtype) as (api, log):
            start_s = time.monotonic() - started
            print(f"\nSmolLM2 OpenAI server ({dtype}) up in {start_s:.0f} s")
            yield Server(dtype, api, sink, start_s)
    finally:
        sidecar.__exit__(None, None, None)
    if dtype == "default":  # the server must really have run in bfloat16 for this to mean much
        assert "dtype=torch.bfloat16" in log.read_text()


def _chat(client, tag: str, text: str) -> Ran:
    return chat(client, tag, text, MAX_TOKENS)


def _complete(client, tag: str, text: str) -> Ran:
    response = client.completions.create(
        model=SERVED_NAME,
        prompt=text,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
        extra_headers={"X-Request-Id": tag},
    )
    choice = response.choices[0]
    return Ran(f"cmpl-{tag}-0", choice.prompt_token_ids, choice.token_ids)


def _send_all(server: Server, tag: str) -> list[Ran]:
    """Chats (ordinary and repeated text) and completions, four at a time."""
    client = openai_client(server.api)
    rng = random.Random(3)
    jobs = [(_chat, text) for text in CHATS]
    jobs += [(_chat, _repeated_chat(rng)) for _ in range(2)]
    span = " ".join(rng.choice(WORDS) for _ in range(12))
    jobs += [(_complete, "The committee met on Tuesday to"), (_complete, f"{span}\n{span}")]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(f, client, f"{tag}-{i}", text) for i, (f, text) in enumerate(jobs)]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def reference(smollm2_dir, spec_path):
    from sidecar.discover.scorer import ReferenceScorer

    return ReferenceScorer(load_spec(spec_path, model_dir=smollm2_dir), smollm2_dir)


def test_online_scores_equal_the_offline_reference(server, reference):
    ran = _send_all(server, f"cw-{server.dtype}")
    records = records_for(server.sink, ran)
    expected = [reference.score(r.prompt_ids, r.generated_ids) for r in ran]
    # The chat template was applied: the prompt starts with its im_start turn markers.
    im_start = reference.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ran[0].prompt_ids[0] == im_start and ran[-1].prompt_ids[0] != im_start
    # Each circuit's scale: the spread of its offline scores over every token sent.
    pooled = np.concatenate([e.scores for e in expected]).astype(np.float64)
    scale = np.maximum(pooled.std(axis=0), 1e-6)
    float32 = server.dtype == "float32"
    deviations, shifted = [], []  # |online - offline| / scale, per token
    for record, offline in zip(records, expected, strict=True):
        assert record.finished_by == "engine"
        tokens = record.tokens
        order = np.argsort(tokens.positions, kind="stable")
        np.testing.assert_array_equal(tokens.positions[order], offline.positions)
        np.testing.assert_array_equal(tokens.phases[order], offline.phases)
        assert (offline.phases == GENERATED).sum() == MAX_TOKENS - 1
        online = tokens.scores[order].astype(np.float64)
        deviations.append(np.abs(online - offline.scores) / scale)
        shifted.append(np.abs(online[1:] - offline.scores[:-1]) / scale)
        if float32:
            np.testing.assert_allclose(online, offline.scores, atol=F32_ATOL, rtol=F32_RTOL)
        for agg in offline.aggregate():
            stats = record.phase(agg.phase_name).circuit(agg.circuit)
            if float32:
                assert stats.mean == pytest.approx(agg.mean, abs=F32_ATOL, rel=F32_RTOL)
                assert stats.max == pytest.approx(agg.max, abs=F32_ATOL, rel=F32_RTOL)
            else:
                j = offline.circuit_names.index(agg.circuit)
                assert abs(stats.mean - agg.mean) <= BF16_MEAN * scale[j], (agg, stats)
                assert abs(stats.max - agg.max) <= BF16_TOKEN * scale[j], (agg, stats)
    deviation, shifted = np.concatenate(deviations), np.concatenate(shifted)
    names = expected[0].circuit_names
    print(f"\n{server.dtype}: |online - offline| over {len(deviation)} tokens, per circuit")
    print(f"  {'circuit':<14} {'scale':>8} {'max abs':>9} {'max/scale':>9} {'median/scale':>12}"
          f" {'shifted by one: median/scale':>29}")  # fmt: skip
    for j, name in enumerate(names):
        print(f"  {name:<14} {scale[j]:8.3g} {deviation[:, j].max() * scale[j]:9.3g} "
              f"{deviation[:, j].max():9.3g} {np.median(deviation[:, j]):12.3g} "
              f"{np.median(shifted[:, j]):29.3g}")  # fmt: skip
    if not float32:
        assert (deviation.max(axis=0) <= BF16_TOKEN).all()
        assert (np.median(deviation, axis=0) <= BF16_MEDIAN).all()
    # The comparison has teeth: the same scores attributed one position off would fail it.
    assert np.median(shifted, axis=0).max() > 4 * BF16_MEDIAN


def test_sites_the_model_does_not_have_are_refused(smollm2_dir, spec_path, tmp_path):
    """Head 9 exists in no layer (9 query heads), layer 30 does not exist (30 layers)."""
    import yaml

    doc = yaml.safe_load(spec_path.read_text())
    for site, head, expected in (
        ("blocks.17.attn.hook_z", 9, "head"),
        ("blocks.30.hook_resid_post", None, "layer"),
    ):
        bad = dict(doc)
        component = {"name": "bad", "kind": "head" if head is not None else "direction",
                     "site": site}  # fmt: skip
        if head is not None:
            component["head"] = head
        else:
            component["direction"] = doc["components"][-1]["direction"]
        bad["components"] = [*doc["components"], component]
        path = tmp_path / f"bad_{expected}.yaml"
        path.write_text(yaml.safe_dump(bad, sort_keys=False))
        (tmp_path / "directions.safetensors").write_bytes(
            (spec_path.parent / "directions.safetensors").read_bytes()
        )
        with pytest.raises(SpecError, match=expected):
            load_spec(path, model_dir=smollm2_dir)
