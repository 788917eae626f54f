"""`--push_to_hub`: what is uploaded when, retries, a Hub that fails mid-run, and start-up checks.

A fake `HfApi` (test_training.FakeHfApi) checks what the run uploads; a local HTTP server standing in for the Hub
(HF_ENDPOINT) checks that a Hub that answers 503 costs no training, no local file and no secret.
"""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from conftest import serve_http
from huggingface_hub import constants as hf_constants
from test_training import EXPORTED_FILES, RUN_MAE, FakeHfApi, assert_loadable, run_args, run_main, weights

from modeling_mae.errors import UsageError
from modeling_mae.interop.hub import HubUploader
from modeling_mae.training.checkpoints import list_checkpoints

TOKEN = "hf_FAKE_token_for_tests_0123456789"  # a made-up token that must never be written anywhere
REPO_ID = "someone/tiny-mae"


@pytest.fixture
def fake_hub(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> type[FakeHfApi]:
    FakeHfApi.remote, FakeHfApi.calls, FakeHfApi.failures = tmp_path / "remote", [], 0
    FakeHfApi.remote.mkdir()
    monkeypatch.setattr("modeling_mae.interop.hub.HfApi", FakeHfApi)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # the tests run offline; the fake needs no network
    return FakeHfApi


def test_push_to_hub_uploads_the_export_at_checkpoints_and_at_the_end(
    data_dir, model_config, tmp_path, fake_hub, hf_home
) -> None:
    output = tmp_path / "run"
    flags = ("--push_to_hub", "--hub_model_id", REPO_ID, "--hub_token", TOKEN, "--checkpointing_steps", "3")
    run_main(run_args(data_dir, model_config, output, *flags))
    uploads = [call for call in fake_hub.calls if call["call"] == "upload_folder"]
    assert fake_hub.calls[0] == {"call": "create_repo", "repo_id": REPO_ID, "private": False}
    assert [(u["background"], u["message"]) for u in uploads] == [
        (True, "Training in progress, step 3"),
        (True, "Training in progress, step 6"),
        (False, "End of training"),
    ]
    checkpoint_files = set(EXPORTED_FILES) - {"all_results.json", "log_history.json", "reconstruction.png"}
    assert set(uploads[0]["files"]) == checkpoint_files  # no results or figure yet, never the step_* state
    assert set(uploads[-1]["files"]) == EXPORTED_FILES | {"reconstruction_step6.png"}
    assert TOKEN not in (fake_hub.remote / "run_config.yaml").read_text()
    assert_loadable(fake_hub.remote, weights(output))


def test_an_upload_is_retried_with_a_doubling_wait_then_gives_the_command_to_push_by_hand(
    tmp_path, fake_hub, caplog
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    fake_hub.failures = 2
    HubUploader(REPO_ID, token=TOKEN, retries=2, retry_wait_s=0.01).upload(folder, "End of training")
    assert [call["message"] for call in fake_hub.calls[1:]] == ["End of training"] * 3
    assert (fake_hub.remote / "config.json").is_file()
    waits = [record.getMessage() for record in caplog.records if "try" in record.getMessage()]
    assert [wait.rsplit("in ", 1)[1] for wait in waits] == ["0.01 s", "0.02 s"]

    fake_hub.failures = 2  # one retry is not enough now
    with pytest.raises(UsageError, match=r"failed after 2 tries .* saved locally in .* hf upload someone/tiny-mae "):
        HubUploader(REPO_ID, token=TOKEN, retries=1, retry_wait_s=0.01).upload(folder, "End of training")


def test_push_to_hub_offline_or_without_a_token_fails_before_training(
    data_dir, model_config, tmp_path, monkeypatch, hf_home
) -> None:
    output = tmp_path / "run"
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):  # the tests run with HF_HUB_OFFLINE=1
        run_main(run_args(data_dir, model_config, output, "--push_to_hub", "--checkpointing_steps", "1"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("modeling_mae.interop.hub.get_token", lambda: None)  # nothing logged in on this machine
    with pytest.raises(UsageError, match="needs a Hub token: run `hf auth login`"):
        run_main(run_args(data_dir, model_config, output, "--push_to_hub", "--checkpointing_steps", "1"))
    assert list_checkpoints(output) == [] and not (output / "model.safetensors").exists()


class FailingHub(http.server.BaseHTTPRequestHandler):
    """The Hub on a bad day: creating the repository works, every other request gets 503 (Retry-After: 0, so that
    `huggingface_hub`'s own retries do not slow the test down)."""

    authorizations: ClassVar[list[str]] = []

    def do_POST(self) -> None:  # the name http.server dispatches to
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.authorizations.append(self.headers.get("Authorization", ""))
        if self.path == "/api/repos/create":
            host, port = self.server.server_address[:2]
            self._answer(200, {"url": f"http://{host}:{port}/{REPO_ID}", "name": REPO_ID})
        else:
            self._answer(503, {"error": "Service Unavailable"})

    do_GET = do_PUT = do_HEAD = do_POST

    def _answer(self, status: int, body: dict[str, str]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def failing_hub() -> Iterator[str]:
    FailingHub.authorizations = []
    with serve_http(FailingHub) as endpoint:
        yield endpoint


def test_a_hub_that_fails_mid_run_costs_no_training_and_leaks_no_token(
    data_dir, model_config, tmp_path, failing_hub
) -> None:
    output = tmp_path / "run"
    flags = run_args(data_dir, model_config, output, "--max_train_steps", "2", "--checkpointing_steps", "2")
    flags += ["--push_to_hub", "--hub_model_id", REPO_ID, "--hub_token", TOKEN, "--with_tracking"]
    flags += ["--hub_upload_retries", "1", "--hub_retry_wait_s", "0.01"]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": failing_hub, "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_TOKEN", None)
    completed = subprocess.run(
        [sys.executable, str(RUN_MAE), *flags], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert f"Bearer {TOKEN}" in FailingHub.authorizations  # the token was there to leak
    assert completed.returncode == 2, completed.stderr[-3000:]
    # Training went on past the failed checkpoint push, and everything was saved before the final push failed.
    assert "The Hub upload 'Training in progress, step 2' to someone/tiny-mae failed after 2 tries" in completed.stderr
    assert [path.name for path in list_checkpoints(output)] == ["step_2"]
    assert json.loads((output / "all_results.json").read_text())["train_steps"] == 2
    assert EXPORTED_FILES <= {path.name for path in output.iterdir()}
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: pushing {output} to the Hub repository someone/tiny-mae failed after 2 tries")
    assert last_line.endswith(
        f"Everything is saved locally in {output.resolve()}; push it later with: hf upload {REPO_ID} "
        f"{output.resolve()} . --exclude 'step_*' --exclude '.step_*' --exclude 'superseded/*' --exclude 'runs/*'"
    )
    assert "Done: 2 steps" in completed.stdout
    # The token is nowhere: not in the logs, the run's config, the model card, TensorBoard's hparams, checkpoints.
    assert TOKEN not in completed.stdout + completed.stderr
    leaks = [path for path in output.rglob("*") if path.is_file() and TOKEN.encode() in path.read_bytes()]
    assert leaks == []
