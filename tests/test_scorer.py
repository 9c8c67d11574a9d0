"""The offline reference scorer and its site capture, checked against direct computation."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from sidecar.discover.capture import capture
from sidecar.discover.scorer import ReferenceScorer, ScoredTokens, component_value
from sidecar.protocol.batch import GENERATED, PROMPT
from sidecar.spec.identity import model_hash
from sidecar.spec.load import SpecError, load_spec
from sidecar.spec.schema import Component, ComponentKind
from sidecar.spec.sites import Site, SiteKind

PROMPT_IDS = [1, 17, 42, 99, 17, 42]
N_HEADS, D_HEAD = 2, 64


def write_spec(folder: Path, model_dir: Path, components: list[dict], circuits: list[dict]) -> Path:
    doc = {
        "version": 1,
        "model": {"name": "tiny", "hash": model_hash(model_dir)},
        "components": components,
        "circuits": circuits,
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def direction(name: str) -> dict:
    return {"file": "dirs.safetensors", "tensor": name}


# --- component arithmetic on hand-made numbers ------------------------------------------------


def test_head_and_direction_values_by_hand() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # one token, 2 heads of d_head 2
    w_o = torch.tensor(  # [d_model 3, n_heads * d_head 4]
        [
            [2.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
            [0.0, 1.0, 0.0, 0.0],
        ]
    )
    site = Site(0, SiteKind.ATTN_Z)
    head0 = Component("h0", ComponentKind.HEAD, site, head=0)
    head1 = Component("h1", ComponentKind.HEAD, site, head=1)
    head1_read = Component(
        "h1u",
        ComponentKind.HEAD,
        site,
        head=1,
        direction=np.array([1.0, 0.0, 0.0], np.float32),
        bias=0.5,
    )
    flat = Component(
        "z",
        ComponentKind.DIRECTION,
        site,
        direction=np.array([0.5, 0.0, 0.0, -1.0], np.float32),
        bias=0.25,
    )
    # head 0: c = [2*1, 0, 1*2] -> ||c|| = sqrt(8); head 1: c = [3, 4, 0] -> ||c|| = 5
    assert component_value(head0, z, w_o, d_head=2).item() == pytest.approx(math.sqrt(8))
    assert component_value(head1, z, w_o, d_head=2).item() == pytest.approx(5.0)
    assert component_value(head1_read, z, w_o, d_head=2).item() == pytest.approx(3.5)
    assert component_value(flat, z, w_o, d_head=2).item() == pytest.approx(0.5 - 4.0 + 0.25)


# --- capture agrees with the model computed step by step --------------------------------------


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


ALL_SITES = tuple(Site(layer, kind) for layer in (0, 1) for kind in SiteKind)


def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Llama's rotary embedding of x [heads, T, d_head], written out (rotate-half layout)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return x * cos + rotated * sin


def test_hook_z_is_attention_per_head_in_head_order(model) -> None:
    ids = torch.tensor(PROMPT_IDS)
    got = capture(model, ids, (Site(0, SiteKind.ATTN_Z), Site(0, SiteKind.RESID_PRE)))
    attn = model.model.layers[0].self_attn
    t = len(PROMPT_IDS)
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(got[Site(0, SiteKind.RESID_PRE)])
        q = rope(attn.q_proj(h).view(t, N_HEADS, D_HEAD).transpose(0, 1))
        k = rope(attn.k_proj(h).view(t, N_HEADS, D_HEAD).transpose(0, 1))
        v = attn.v_proj(h).view(t, N_HEADS, D_HEAD).transpose(0, 1)
    causal = torch.full((t, t), float("-inf")).triu(1)
    pattern = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D_HEAD) + causal, dim=-1)
    z = (pattern @ v).transpose(0, 1).reshape(t, N_HEADS * D_HEAD)  # head h at h*64:(h+1)*64
    torch.testing.assert_close(got[Site(0, SiteKind.ATTN_Z)], z, atol=1e-5, rtol=1e-5)


def test_sites_compose_into_the_forward_pass(model) -> None:
    ids = torch.tensor(PROMPT_IDS)
    got = capture(model, ids, ALL_SITES)
    with torch.no_grad():
        hf = model(ids[None], output_hidden_states=True)
        # HF's own record of the residual stream: embeddings, then each layer's output.
        torch.testing.assert_close(got[Site(0, SiteKind.RESID_PRE)], hf.hidden_states[0][0])
        torch.testing.assert_close(got[Site(0, SiteKind.RESID_POST)], hf.hidden_states[1][0])
        torch.testing.assert_close(
            got[Site(0, SiteKind.RESID_PRE)], model.model.embed_tokens.weight[ids]
        )
        for layer in (0, 1):
            block = model.model.layers[layer]
            pre, mid, post = (got[Site(layer, k)] for k in list(SiteKind)[:3])
            z, neurons = got[Site(layer, SiteKind.ATTN_Z)], got[Site(layer, SiteKind.MLP_POST)]
            torch.testing.assert_close(mid, pre + block.self_attn.o_proj(z))
            x = block.post_attention_layernorm(mid)
            torch.testing.assert_close(
                neurons, torch.nn.functional.silu(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)
            )
            torch.testing.assert_close(post, mid + block.mlp.down_proj(neurons))
        torch.testing.assert_close(
            got[Site(1, SiteKind.RESID_PRE)], got[Site(0, SiteKind.RESID_POST)]
        )
        last = got[Site(1, SiteKind.RESID_POST)]
        torch.testing.assert_close(model.lm_head(model.model.norm(last)), hf.logits[0])
    torch.testing.assert_close(got.logits, hf.logits[0])


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_keeps_batch_shape_and_removes_its_hooks(model) -> None:
    ids = torch.tensor([PROMPT_IDS, PROMPT_IDS[::-1]])
    site = Site(1, SiteKind.MLP_POST)
    hooks_before = hook_count(model)
    got = capture(model, ids, ALL_SITES)
    assert got[site].shape == (2, len(PROMPT_IDS), 256)
    torch.testing.assert_close(got[site][1], capture(model, ids[1], (site,))[site])
    assert hook_count(model) == hooks_before


# --- the reference scorer on a model whose W_O is set by hand ---------------------------------


@pytest.fixture(scope="module")
def hand_set_model_dir(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    """The tiny model with layer 1's W_O = [3 * I_64 | 0]: head 0 writes 3*z into dims 0..63,
    head 1 writes nothing."""
    model_dir = tmp_path_factory.mktemp("hand_set")
    shutil.copytree(tiny_llama_dir, model_dir, dirs_exist_ok=True)
    weights = load_file(model_dir / "model.safetensors")
    w_o = torch.zeros(128, N_HEADS * D_HEAD)
    w_o[:64, :64] = 3 * torch.eye(64)
    weights["model.layers.1.self_attn.o_proj.weight"] = w_o
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def test_reference_values_on_hand_set_w_o(hand_set_model_dir: Path, tmp_path: Path) -> None:
    one_hot = {
        f"e{i}": torch.nn.functional.one_hot(torch.tensor(i), 128).float() for i in (0, 3, 70)
    }
    save_file(one_hot, tmp_path / "dirs.safetensors")
    z_site, mid_site = "blocks.1.attn.hook_z", "blocks.1.hook_resid_mid"
    spec_path = write_spec(
        tmp_path,
        hand_set_model_dir,
        components=[
            {"name": "h0", "kind": "head", "site": z_site, "head": 0},
            {"name": "h1", "kind": "head", "site": z_site, "head": 1},
            {
                "name": "h0_e0",
                "kind": "head",
                "site": z_site,
                "head": 0,
                "direction": direction("e0"),
                "bias": 0.5,
            },
            {"name": "mid_e3", "kind": "direction", "site": mid_site, "direction": direction("e3")},
            {
                "name": "mid_e70",
                "kind": "direction",
                "site": mid_site,
                "direction": direction("e70"),
                "bias": -0.25,
            },
        ],
        circuits=[{"name": "all", "components": {"h0": 1.0, "h1": 2.0}, "bias": 1.0}],
    )
    scorer = ReferenceScorer(load_spec(spec_path, hand_set_model_dir), hand_set_model_dir)
    scored = scorer.score(PROMPT_IDS)

    ids = torch.tensor(PROMPT_IDS)
    z = capture(scorer.model, ids, (Site(1, SiteKind.ATTN_Z),))[Site(1, SiteKind.ATTN_Z)].numpy()
    with torch.no_grad():
        resid_pre_1 = scorer.model(ids[None], output_hidden_states=True).hidden_states[1][0].numpy()
    h0, h1, h0_e0, mid_e3, mid_e70 = scored.values.T
    np.testing.assert_allclose(h0, 3 * np.linalg.norm(z[:, :64], axis=1), rtol=1e-5)
    assert np.all(h1 == 0.0)
    np.testing.assert_allclose(h0_e0, 3 * z[:, 0] + 0.5, rtol=1e-5)
    np.testing.assert_allclose(mid_e3, resid_pre_1[:, 3] + 3 * z[:, 3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mid_e70, resid_pre_1[:, 70] - 0.25, rtol=1e-5)  # head 1 adds 0
    np.testing.assert_allclose(scored.scores[:, 0], h0 + 2 * h1 + 1.0, rtol=1e-6)


# --- scoring requests: phases, positions, circuits, aggregation --------------------------------


@pytest.fixture(scope="module")
def scorer(tiny_llama_dir: Path, tmp_path_factory) -> ReferenceScorer:
    folder = tmp_path_factory.mktemp("spec")
    gen = torch.Generator().manual_seed(3)
    save_file(
        {
            name: torch.randn(width, generator=gen)
            for name, width in [
                ("u", 128),
                ("z", 128),
                ("pre", 128),
                ("mid", 128),
                ("post", 128),
                ("mlp", 256),
            ]
        },
        folder / "dirs.safetensors",
    )
    components = [
        {"name": "l1h0", "kind": "head", "site": "blocks.1.attn.hook_z", "head": 0},
        {
            "name": "l1h1_u",
            "kind": "head",
            "site": "blocks.1.attn.hook_z",
            "head": 1,
            "direction": direction("u"),
            "bias": 0.1,
        },
        {
            "name": "z0",
            "kind": "direction",
            "site": "blocks.0.attn.hook_z",
            "direction": direction("z"),
        },
        {
            "name": "pre0",
            "kind": "direction",
            "site": "blocks.0.hook_resid_pre",
            "direction": direction("pre"),
        },
        {
            "name": "mid1",
            "kind": "direction",
            "site": "blocks.1.hook_resid_mid",
            "direction": direction("mid"),
            "bias": -1.0,
        },
        {
            "name": "post1",
            "kind": "direction",
            "site": "blocks.1.hook_resid_post",
            "direction": direction("post"),
        },
        {
            "name": "mlp0",
            "kind": "direction",
            "site": "blocks.0.mlp.hook_post",
            "direction": direction("mlp"),
        },
    ]
    circuits = [
        {"name": "heads", "components": {"l1h0": 1.0, "l1h1_u": -0.5}, "bias": 0.2},
        {
            "name": "probes",
            "components": {"pre0": 0.3, "mid1": 1.0, "post1": 2.0, "mlp0": 1.5, "z0": -1.0},
        },
    ]
    spec_path = write_spec(folder, tiny_llama_dir, components, circuits)
    return ReferenceScorer(load_spec(spec_path, tiny_llama_dir), tiny_llama_dir)


def test_positions_and_phases_of_a_request(scorer: ReferenceScorer) -> None:
    generated = [5, 6, 7]
    scored = scorer.score(PROMPT_IDS, generated)
    p = len(PROMPT_IDS)
    assert scored.token_ids.tolist() == PROMPT_IDS + [5, 6]  # the last token is never fed
    assert scored.positions.tolist() == list(range(p + len(generated) - 1))
    assert scored.phases.tolist() == [PROMPT] * p + [GENERATED] * 2
    assert scored.values.shape == (p + 2, 7) and scored.values.dtype == np.float32
    assert scored.scores.shape == (p + 2, 2) and scored.scores.dtype == np.float32
    assert scored.generated_ids == (5, 6, 7)
    assert scored.component_names[0] == "l1h0" and scored.circuit_names == ("heads", "probes")

    prompt_only = scorer.score(PROMPT_IDS)
    assert prompt_only.phases.tolist() == [PROMPT] * p
    # Causal attention: what follows a token cannot change its values.
    np.testing.assert_allclose(scored.values[:p], prompt_only.values, rtol=1e-5, atol=1e-6)
    one_generated = scorer.score(PROMPT_IDS, [5])
    assert one_generated.phases.tolist() == [PROMPT] * p


def test_circuit_scores_are_the_spec_linear_map(scorer: ReferenceScorer) -> None:
    scored = scorer.score(PROMPT_IDS, [5, 6, 7])
    weights, bias = scorer.spec.weight_matrix()
    expected = scored.values.astype(np.float64) @ weights.T + bias
    np.testing.assert_allclose(scored.scores, expected, rtol=1e-5, atol=1e-5)
    assert np.all(scored.values[:, 0] > 0)  # a head norm


def test_direction_values_read_their_sites(scorer: ReferenceScorer) -> None:
    scored = scorer.score(PROMPT_IDS)
    spec = scorer.spec
    got = capture(scorer.model, torch.tensor(PROMPT_IDS), spec.sites)
    for i, component in enumerate(spec.components):
        if component.kind is ComponentKind.DIRECTION:
            x = got[component.site].double().numpy()
            expected = x @ component.direction.astype(np.float64) + component.bias
            np.testing.assert_allclose(scored.values[:, i], expected, rtol=1e-5, atol=1e-5)


def test_aggregate_per_phase() -> None:
    scored = ScoredTokens(
        component_names=("a",),
        circuit_names=("first", "second"),
        token_ids=np.array([1, 2, 3, 4, 5]),
        positions=np.arange(5, dtype=np.int32),
        phases=np.array([0, 0, 0, 1, 1], dtype=np.uint8),
        values=np.zeros((5, 1), dtype=np.float32),
        scores=np.array([[1, -1], [2, -2], [6, -3], [0.5, 4], [1.5, 8]], dtype=np.float32),
    )
    rows = {(a.circuit, a.phase_name): (a.mean, a.max, a.count) for a in scored.aggregate()}
    assert rows == {
        ("first", "prompt"): (3.0, 6.0, 3),
        ("first", "generation"): (1.0, 1.5, 2),
        ("second", "prompt"): (-2.0, -1.0, 3),
        ("second", "generation"): (6.0, 8.0, 2),
    }


def test_aggregate_leaves_out_empty_phases(scorer: ReferenceScorer) -> None:
    aggregates = scorer.score(PROMPT_IDS).aggregate()
    assert [(a.circuit, a.phase) for a in aggregates] == [("heads", PROMPT), ("probes", PROMPT)]
    assert all(a.count == len(PROMPT_IDS) for a in aggregates)


def test_generate_and_score_is_greedy(scorer: ReferenceScorer) -> None:
    scored = scorer.generate_and_score(PROMPT_IDS, max_new_tokens=4)
    sequence = list(PROMPT_IDS)
    eos = scorer.model.generation_config.eos_token_id
    with torch.no_grad():
        for _ in range(4):
            sequence.append(int(scorer.model(torch.tensor([sequence])).logits[0, -1].argmax()))
            if sequence[-1] == eos:
                break
    assert list(scored.generated_ids) == sequence[len(PROMPT_IDS) :]
    assert scored.token_ids.tolist() == sequence[:-1]
    np.testing.assert_allclose(
        scored.values, scorer.score(PROMPT_IDS, scored.generated_ids).values, rtol=1e-6
    )


def test_score_text_adds_bos_like_vllm(scorer: ReferenceScorer, tiny_llama_dir, tmp_path) -> None:
    model_dir = tmp_path / "with_tokenizer"
    shutil.copytree(tiny_llama_dir, model_dir)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: 17 + i for i, w in enumerate(["the", "cat"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(model_dir)  # tokenizer files do not change the model hash
    with_text = ReferenceScorer(scorer.spec, model_dir)

    scored = with_text.score_text("the cat the")
    assert scored.token_ids.tolist() == [1, 17, 18, 17]
    np.testing.assert_allclose(scored.values, scorer.score([1, 17, 18, 17]).values, rtol=1e-6)


def test_scorer_refuses_a_spec_for_another_model(scorer, hand_set_model_dir: Path) -> None:
    with pytest.raises(SpecError, match="spec was made for model tiny"):
        ReferenceScorer(scorer.spec, hand_set_model_dir)


def test_empty_prompt_is_refused(scorer: ReferenceScorer) -> None:
    with pytest.raises(ValueError, match="empty"):
        scorer.score([])
