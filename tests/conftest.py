"""Shared test setup: offline, deterministic, tiny."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import http.server
import json
import pathlib
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import datasets
import pytest
import torch
from data_fixtures import make_parquet_shards
from huggingface_hub import constants as hf_constants

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


@contextlib.contextmanager
def serve_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` answering on a free port of 127.0.0.1; yields its URL (e.g. a stand-in Hub for HF_ENDPOINT)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's model API as huggingface.co answers it: the model repositories in `models` exist, every other
    repository and file is not found (404, RepoNotFound)."""

    models: ClassVar[set[str]] = set()

    def do_GET(self) -> None:  # the name http.server dispatches to
        repo = self.path.removeprefix("/api/models/").split("/revision/")[0].split("?")[0]
        if self.path.startswith("/api/models/") and repo in self.models:
            self._answer(200, {"id": repo, "sha": "0" * 40, "siblings": [{"rfilename": "config.json"}]})
        else:
            self._answer(404, {"error": "Repository Not Found"}, {"X-Error-Code": "RepoNotFound"})

    do_HEAD = do_GET

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


def use_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Online, with `endpoint` as the Hub, for this process's `huggingface_hub` and `datasets`."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeHub]]:
    """Online, with a `FakeHub` (knowing no model until a test adds some) as the Hub."""
    FakeHub.models = set()
    with serve_http(FakeHub) as endpoint:
        use_hub(monkeypatch, endpoint)
        yield FakeHub
