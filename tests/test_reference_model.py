"""The bundled reference model: its files, tokenizer and spec, and the script that trains it."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sidecar.models import data
from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.models.tokenizer import special_ids, train_tokenizer
from sidecar.models.train import (
    ModelShape,
    TrainConfig,
    add_arguments,
    build_model,
    run,
    train_model,
)
from sidecar.spec.load import load_spec

MAX_WEIGHT_BYTES = 20 * 1024 * 1024  # the brief's budget: the weights ship inside the package


def test_bundled_weights_load_with_the_shape_vllm_needs():
    weights = REFERENCE_DIR / "model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHT_BYTES
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR)
    config = model.config
    assert config.architectures == ["LlamaForCausalLM"]
    # vLLM's CPU attention kernel rejects head_dim 16; 64 is what it was verified with.
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (256, 4, 64)
    assert config.num_hidden_layers == 2
    assert config.max_position_embeddings >= 512
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_training_record_says_the_run_completed():
    record = json.loads((REFERENCE_DIR / "training.json").read_text())
    stages = ("previous_token_steps", "copy_steps", "natural_steps")
    assert record["complete"]
    assert record["log"][-1]["step"] == sum(record["config"][k] for k in stages)


@pytest.mark.parametrize(
    "text",
    ["def f(self, x):\n    return x ** 2  # squared\n", "naïve café — 東京 🙂", "", "   \t\n"],
)
def test_tokenizer_round_trips_text_and_starts_with_bos(text):
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"


def test_bundled_spec_loads_against_the_bundled_model():
    spec = load_spec(REFERENCE_SPEC, model_dir=REFERENCE_DIR)
    assert {c.name for c in spec.circuits} >= {"induction", "previous_token"}
    assert any(c.name == "repeat_probe" for c in spec.components)


# --- the training loop -------------------------------------------------------------------------

TINY = ModelShape(hidden=64, layers=2, heads=2, head_dim=32, intermediate=128, max_positions=64)


@pytest.fixture(scope="module")
def tiny_data():
    texts = data.read_texts(data.stdlib_files()[:3])
    tokenizer = train_tokenizer(texts, vocab_size=300)
    return tokenizer, data.encode_corpus(tokenizer, texts)


def tiny_run(tiny_data, seed: int) -> tuple[dict[str, torch.Tensor], list]:
    tokenizer, corpus = tiny_data
    config = TrainConfig(
        previous_token_steps=10,
        previous_token_batch=(4, 24),
        copy_steps=10,
        copy_batch=(4, 32),
        copy_spans=(3, 8),
        natural_steps=10,
        natural=data.SpanConfig(seq_len=48, min_span=3, max_span=8),
        natural_batch=4,
        lr=1e-2,
        warmup=2,
        eval_every=10,
        seed=seed,
    )
    sampler = data.WindowSampler(
        corpus, len(tokenizer), special_ids(tokenizer), tokenizer.bos_token_id, seed
    )
    model = build_model(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, TINY, config
    )
    entries = train_model(model, sampler, config)
    return {k: v.clone() for k, v in model.state_dict().items()}, entries


def test_training_is_deterministic_for_a_seed_and_keeps_layer_zero(tiny_data):
    torch.set_num_threads(2)
    first, entries = tiny_run(tiny_data, seed=0)
    second, _ = tiny_run(tiny_data, seed=0)
    other, _ = tiny_run(tiny_data, seed=1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert [e.step for e in entries] == [10, 20, 30]
    assert all(np.isfinite(e.train_loss) for e in entries)
    # Only head 0 of layer 0 writes: the switch zeroed the others' output columns for good.
    o_proj = first["model.layers.0.self_attn.o_proj.weight"]
    assert o_proj[:, TINY.head_dim :].abs().max() == 0
    assert o_proj[:, : TINY.head_dim].abs().max() > 0


def test_train_command_saves_a_loadable_model(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # Two steps of the real configuration: checks the data, the save format and the record.
    assert run(parser.parse_args(["--out", str(tmp_path), "--max-steps", "2"])) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tokenizer)
    record = json.loads((tmp_path / "training.json").read_text())
    assert not record["complete"] and [e["step"] for e in record["log"]] == [2]
