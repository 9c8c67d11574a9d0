"""Shared fixtures: a tiny random Llama model directory, as vLLM and HF load it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.json + model.safetensors of a 2-layer Llama (d_model 128, 2 heads of 64, random).

    Session-scoped and shared: copy it before changing anything in it.
    """
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=300,
        dtype=torch.float32,
    )
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(model_dir)  # safetensors: the default format
    return model_dir
