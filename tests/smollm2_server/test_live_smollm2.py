"""The live path on the real model, SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, tied embeddings).

vLLM's OpenAI-compatible server in its default compiled mode with the plugin, the real sidecar
in this process (on a Unix socket, collecting every finished request), requests sent with the
real ``openai`` client through the chat API (the checkpoint's chat template applies) and the
completions API, concurrently so that requests share engine steps. Every online per-token
score and per-request aggregate must equal the offline ReferenceScorer on exactly the tokens
the engine ran (the server returns them: ``return_token_ids``).

The package's engine (conftest.py: vLLM's default dtype, bfloat16 for this float32 checkpoint
on CPU, as users serve it), tapping the package's served spec (smollm2_live.build_served_spec:
every site kind, and the harm monitor's circuit, which is compared here like any other),
compared with a tolerance relative to each circuit's scale (see BF16_TOKEN) that a score one
position off, or a wrong head's, fails. Exact float32 equality with transformers is checked
on the reference model (test_live.py) and on a tiny GQA Llama (test_probe_engine.py); a
float32 SmolLM2 engine here cost three minutes of suite time for the same check.

Prefix caching is off: a cached prefix skips the forward pass, so its tokens are
never scored, and the chat template's shared system prompt would otherwise be cached across
requests (how many tokens depends on the block size).
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from probe_engine_helpers import scores_in_offline_order

from sidecar.spec.load import SpecError, load_spec

from .smollm2_live import (
    BF16_MEAN,
    BF16_MEDIAN,
    BF16_TOKEN,
    SERVED_NAME,
    Ran,
    Server,
    chat,
    openai_client,
    records_for,
)

pytestmark = pytest.mark.engine

MAX_TOKENS = 8
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


def test_online_scores_equal_the_offline_reference(served, reference):
    ran = _send_all(served, "cw")
    records = records_for(served.sink, ran)
    expected = [reference.score(r.prompt_ids, r.generated_ids) for r in ran]
    # The chat template was applied: the prompt starts with its im_start turn markers.
    im_start = reference.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ran[0].prompt_ids[0] == im_start and ran[-1].prompt_ids[0] != im_start
    # Each circuit's scale: the spread of its offline scores over every token sent.
    pooled = np.concatenate([e.scores for e in expected]).astype(np.float64)
    scale = np.maximum(pooled.std(axis=0), 1e-6)
    deviations, shifted = [], []  # |online - offline| / scale, per token
    for record, offline in zip(records, expected, strict=True):
        online = scores_in_offline_order(record, offline, MAX_TOKENS - 1).astype(np.float64)
        deviations.append(np.abs(online - offline.scores) / scale)
        shifted.append(np.abs(online[1:] - offline.scores[:-1]) / scale)
        for agg in offline.aggregate():
            stats = record.phase(agg.phase_name).circuit(agg.circuit)
            j = offline.circuit_names.index(agg.circuit)
            assert abs(stats.mean - agg.mean) <= BF16_MEAN * scale[j], (agg, stats)
            assert abs(stats.max - agg.max) <= BF16_TOKEN * scale[j], (agg, stats)
    deviation, shifted = np.concatenate(deviations), np.concatenate(shifted)
    names = expected[0].circuit_names
    print(f"\nbfloat16: |online - offline| over {len(deviation)} tokens, per circuit")
    print(f"  {'circuit':<16} {'scale':>8} {'max abs':>9} {'max/scale':>9} {'median/scale':>12}"
          f" {'shifted by one: median/scale':>29}")  # fmt: skip
    for j, name in enumerate(names):
        print(f"  {name:<16} {scale[j]:8.3g} {deviation[:, j].max() * scale[j]:9.3g} "
              f"{deviation[:, j].max():9.3g} {np.median(deviation[:, j]):12.3g} "
              f"{np.median(shifted[:, j]):29.3g}")  # fmt: skip
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
