"""``circuitwatch discover heads``: scores on hand-made patterns, the three ablations on tiny
random Llamas (one with grouped-query attention), the command end to end on the reference
model, and the committed SmolLM2 spec's heads recovered by a small fresh run."""

from __future__ import annotations

import json

import pytest
import torch
from probe_engine_helpers import make_tiny_llama, one_hot_pattern
from transformers import LlamaConfig, LlamaForCausalLM

from sidecar.cli import main
from sidecar.discover.ablation import (
    AblationKind,
    ablate_heads,
    clean_run,
    o_proj_inputs,
    replaced,
    replacement_for,
)
from sidecar.discover.hooks import hooks
from sidecar.discover.induction import (
    EvalSet,
    HeadRef,
    RepeatedTokens,
    head_scores,
    held_out_corpus,
    induction_score,
    load_model,
    make_eval_set,
    special_token_ids,
    top_heads,
)
from sidecar.models.registry import REFERENCE_DIR, ModelNotInstalled, model_path
from sidecar.spec.load import load_spec


def test_induction_score_without_bos():
    n = 4  # x + x, no BOS: query q >= 4 looks at q - 3
    perfect = one_hot_pattern([0] * n + [q - n + 1 for q in range(n, 2 * n)])
    off_by_one = one_hot_pattern([0] * n + [q - n for q in range(n, 2 * n)])
    scores = induction_score(torch.stack([perfect, off_by_one])[None], n, prefix=0)
    assert scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="expected 0 \\+ 2 \\* 5"):
        induction_score(perfect[None, None], 5, prefix=0)


def test_top_heads_above_threshold_best_first_else_top_k():
    scores = torch.tensor([[0.1, 0.5], [0.9, 0.2], [0.3, 0.0]])
    assert top_heads(scores, 0.4, k=1) == [HeadRef(1, 0), HeadRef(0, 1)]
    assert top_heads(scores, 0.95, k=2) == [HeadRef(1, 0), HeadRef(0, 1)]


def test_eval_set_uses_the_tokenizers_bos_and_no_special_tokens():
    _, tokenizer = load_model(REFERENCE_DIR)
    corpus = held_out_corpus(tokenizer)
    eval_set = make_eval_set(tokenizer, corpus, lengths=(7,), seeds=(3,), batch=2, natural_len=16)
    (repeated,) = eval_set.repeated
    assert repeated.ids.shape == (2, 15) and repeated.prefix == 1
    assert (repeated.ids[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(repeated.ids[:, 1:8], repeated.ids[:, 8:])
    assert not torch.isin(repeated.ids[:, 1:], torch.tensor(special_token_ids(tokenizer))).any()
    assert eval_set.natural.shape == (2, 16)
    assert (eval_set.natural[:, 0] == tokenizer.bos_token_id).all()


# --- ablations on tiny random Llamas ---------------------------------------------------------


def gqa_llama() -> LlamaForCausalLM:
    """4 query heads sharing 2 KV heads: hook_z still has one slice per query head."""
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=2, intermediate_size=128, vocab_size=96, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(params=["mha", "gqa"])
def tiny(request, tmp_path):
    if request.param == "mha":
        model = LlamaForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "tiny")).eval()
    else:
        model = gqa_llama()
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    x = torch.randint(3, vocab, (3, 6), generator=generator)
    bos = torch.zeros(3, 1, dtype=torch.long)
    eval_set = EvalSet(
        repeated=(RepeatedTokens(torch.cat([bos, x, x], dim=1), 6),),
        natural=torch.randint(3, vocab, (3, 10), generator=generator),
    )
    return model, eval_set


@pytest.mark.parametrize("kind", list(AblationKind))
def test_ablation_replaces_only_the_named_heads_and_restores_the_model(tiny, kind):
    model, eval_set = tiny
    ids = eval_set.natural
    d_head = model.config.head_dim
    head = HeadRef(1, model.config.num_attention_heads - 1)  # the last query head
    columns = slice(head.head * d_head, (head.head + 1) * d_head)
    clean_z_all = o_proj_inputs(model, ids)
    clean_z = clean_z_all[1]
    with torch.no_grad():
        clean = model(ids).logits
    run = clean_run(model, eval_set)
    means = run.means
    assert torch.equal(run.z[-1][1], clean_z)
    expected = {
        AblationKind.MEAN: means[1][columns].expand_as(clean_z[..., columns]),
        AblationKind.ZERO: torch.zeros_like(clean_z[..., columns]),
        AblationKind.RESAMPLE: clean_z.roll(1, dims=0)[..., columns],
    }[kind]
    seen = []
    o_proj = model.model.layers[1].self_attn.o_proj
    with replaced(model, [head], replacement_for(kind, clean_z_all, means)):
        # Registered after the ablation's hook, so it sees the replaced input.
        with hooks([(o_proj, "pre", lambda _m, args: seen.append(args[0].clone()))]):
            with torch.no_grad():
                ablated = model(ids).logits
    (z,) = seen
    torch.testing.assert_close(z[..., columns], expected)
    torch.testing.assert_close(z[..., : head.head * d_head], clean_z[..., : head.head * d_head])
    assert not torch.allclose(ablated, clean)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, clean)  # every hook gone

    result = ablate_heads(model, eval_set, [head], kind, run)
    assert result.kind is kind and result.heads == (head,)
    assert result.repeated_after != result.repeated_before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, clean)


def test_resample_ablation_needs_two_sequences(tiny):
    model, eval_set = tiny
    one = EvalSet(eval_set.repeated, eval_set.natural[:1])
    with pytest.raises(ValueError, match="at least two sequences"):
        ablate_heads(model, one, [HeadRef(0, 0)], "resample")


# --- the command ----------------------------------------------------------------------------


def test_discover_heads_on_the_reference_model_writes_a_report_that_loads(tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["discover", "heads", "--model", "reference", "--out", str(out)]
    assert main([*argv, "--seeds", "1001", "--batch", "4", "--spec-requests", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["n_layers"] == 2 and len(report["heads"]) == 2 * 4
    assert report["settings"]["lengths"] == [50, 60]
    # The reference model's circuit: l0h0 previous-token, layer-1 induction heads.
    assert report["previous_token_heads"] == ["l0h0"]
    assert report["induction_heads"] and all(n.startswith("l1h") for n in report["induction_heads"])
    effects = {(a["group"], a["kind"]): a for a in report["ablations"]}
    assert set(effects) == {
        (g, k.value) for g in ("induction", "previous_token") for k in AblationKind
    }
    for kind in AblationKind:
        induction = effects[("induction", kind.value)]
        # Specific: copying breaks (x10 with the full eval set), natural text much less.
        assert induction["repeated_factor"] > 3.0
        assert induction["repeated_factor"] > 3 * induction["natural_factor"]
    for figure in ("induction_scores.png", "previous_token_scores.png", "ablations.png"):
        assert (out / figure).read_bytes().startswith(b"\x89PNG")
    spec = load_spec(out / report["spec"], model_dir=REFERENCE_DIR)
    assert {c.name for c in spec.components} == {
        *(f"induction_{n}" for n in report["induction_heads"]),
        "previous_token_l0h0",
    }
    assert [c.name for c in spec.circuits] == ["induction", "previous_token"]
    assert all(c.threshold is not None for c in spec.circuits)
    assert "l0h0" in capsys.readouterr().out


# --- SmolLM2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        return model_path("smollm2")
    except ModelNotInstalled as e:
        pytest.skip(f"SmolLM2 is not installed ({e})")


def test_committed_smollm2_spec_heads_are_recovered_by_a_small_fresh_run(smollm2):
    from pathlib import Path

    spec = load_spec(
        Path(__file__).parents[1] / "sidecar/models/smollm2_spec/spec.yaml", model_dir=smollm2
    )
    named = {
        group: [HeadRef(c.site.layer, c.head) for c in spec.components if c.name.startswith(group)]
        for group in ("induction_", "previous_token_")
    }
    assert named["induction_"] and named["previous_token_"]
    torch.set_num_threads(2)
    model, tokenizer = load_model(smollm2)
    # Other seeds and a length the committed run did not use: the heads must not be noise.
    eval_set = make_eval_set(
        tokenizer, held_out_corpus(tokenizer), lengths=(40,), seeds=(7,), batch=4, natural_len=64
    )
    scores = head_scores(model, eval_set)
    for group, table in (
        ("induction_", scores.induction),
        ("previous_token_", scores.previous_token),
    ):
        found = top_heads(table, threshold=1.0, k=2 * len(named[group]))  # the best 2n heads
        missing = [h.name for h in named[group] if h not in found]
        assert not missing, f"{group} heads not among the best: {missing}"
