"""Shared test setup: offline, deterministic, tiny."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from modeling_mae import MAEConfig

TINY = dict(
    image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
)


def tiny_config(**overrides) -> MAEConfig:
    """A 16x16 image in 16 patches of 4x4: big enough to exercise every code path, fast on CPU."""
    return MAEConfig(**{**TINY, **overrides})


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """Remote code is cached under HF_HOME: give each test its own."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    return home
