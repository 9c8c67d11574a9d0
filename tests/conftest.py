"""Shared fixtures: a tiny random Llama model directory, as vLLM and HF load it."""

from __future__ import annotations

from pathlib import Path

import pytest
from probe_engine_helpers import make_tiny_llama

from sidecar.models.registry import ModelNotInstalled, model_path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.json + model.safetensors of a 2-layer Llama (d_model 128, 2 heads of 64, random,
    Hugging Face's default init std 0.02).

    Session-scoped and shared: copy it before changing anything in it.
    """
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), init_std=0.02)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The installed SmolLM2-135M-Instruct (skips the test where it is not installed)."""
    try:
        return model_path("smollm2")
    except ModelNotInstalled as e:
        pytest.skip(str(e))
