"""Shared test setup: offline, deterministic, tiny."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest
import torch
from data_fixtures import make_parquet_shards

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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Parquet shards of solid-colour images, 64 train and 16 validation (one shard each: processes split it
    sample by sample); one per test module."""
    directory = tmp_path_factory.mktemp("data")
    make_parquet_shards(directory, 64, num_shards=1)
    make_parquet_shards(directory, 16, num_shards=1, split="validation")
    return directory


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A saved `tiny_config()`: its config.json, for `--model_config`."""
    directory = tmp_path_factory.mktemp("model")
    tiny_config().save_pretrained(directory)
    return directory / "config.json"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """Remote code is cached under HF_HOME: give each test its own."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    return home
