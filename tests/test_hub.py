"""`--push_to_hub`: what is uploaded when, retries, a Hub that fails mid-run, and start-up checks.

A fake `HfApi` (test_training.FakeHfApi) checks what the run uploads; a local HTTP server standing in for the Hub
(HF_ENDPOINT) checks that a Hub that answers 503 costs no training, no local file and no secret.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import pathlib
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import serve_http, tiny_config
from huggingface_hub import constants as hf_constants
from test_training import (
    EXPORTED_FILES,
    RUN_MAE,
    FakeHfApi,
    assert_loadable,
    run_args,
    run_main,
    weights,
)

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.arguments import OptimizationArguments, RunArguments
from modeling_mae.errors import UsageError
from modeling_mae.interop.hub import (
    SNAPSHOTS_FOLDER,
    HubUploader,
    build_uploader,
    export_model,
    manual_upload_command,
    snapshot_for_upload,
)
from modeling_mae.interop.model_card import (
    finetuning_card,
    pretraining_card,
    render_model_card,
)
from modeling_mae.training.checkpoints import list_checkpoints
from modeling_mae.training.optimization import TrainingPlan

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
    assert set(uploads[-1]["files"]) == EXPORTED_FILES  # no --log_images_steps: the final figure, no step file
    assert TOKEN not in (fake_hub.remote / "run_config.yaml").read_text()
    assert f'.from_pretrained("{REPO_ID}", trust_remote_code=True)' in (fake_hub.remote / "README.md").read_text()
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
    # The final push cuts a checkpoint upload's retries short: it sends everything that one would.
    assert re.search(r"The Hub upload 'Training in progress, step 2' to someone/tiny-mae failed after (1 try|2 tries)",
                     completed.stderr)
    assert [path.name for path in list_checkpoints(output)] == ["step_2"]
    assert json.loads((output / "all_results.json").read_text())["train_steps"] == 2
    assert EXPORTED_FILES <= {path.name for path in output.iterdir()}
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: pushing {output} to the Hub repository someone/tiny-mae failed after 2 tries")
    assert last_line.endswith(
        f"Everything is saved locally in {output.resolve()}; push it later with: hf upload {REPO_ID} "
        f"{output.resolve()} . --exclude 'step_*' --exclude '.step_*' --exclude 'superseded/*' --exclude 'runs/*' "
        "--exclude '.hub_snapshots/*' --exclude '.run.lock*'"
    )
    assert "Done: 2 steps" in completed.stdout
    # The token is nowhere: not in the logs, the run's config, the model card, TensorBoard's hparams, checkpoints.
    assert TOKEN not in completed.stdout + completed.stderr
    leaks = [path for path in output.rglob("*") if path.is_file() and TOKEN.encode() in path.read_bytes()]
    assert leaks == []


class EchoingHfApi(FakeHfApi):
    """A Hub client whose errors quote the token on their first line, as a server that echoes a refused
    credential does: creating `refused/*` repositories fails, every upload fails."""

    def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False) -> Any:
        if repo_id.startswith("refused/"):
            raise PermissionError(f"401 Unauthorized: invalid token {self.token} for {repo_id}")
        return super().create_repo(repo_id, private, exist_ok)

    def upload_folder(self, **kwargs: Any) -> None:
        raise ConnectionError(f"503 Service Unavailable (Authorization: Bearer {self.token})")


def test_an_error_that_quotes_the_token_is_told_with_the_token_masked(
    tmp_path: pathlib.Path, fake_hub: type[FakeHfApi], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The refused repository, each retry's warning, a failed background upload and the final push: each message
    tells the error, with *** where the token was."""
    monkeypatch.setattr("modeling_mae.interop.hub.HfApi", EchoingHfApi)
    with pytest.raises(UsageError) as refused:
        HubUploader("refused/tiny-mae", token=TOKEN)
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    uploader = HubUploader(REPO_ID, token=TOKEN, retries=1, retry_wait_s=0.0)
    uploader.upload_in_background(folder, "step 2")
    with pytest.raises(UsageError) as final:
        uploader.upload(folder, "End of training")
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 3  # step 2: a retry, then given up; the final push: a retry
    for message in (str(refused.value), str(final.value), *warnings):
        assert TOKEN not in message and "***" in message, message
    assert "(PermissionError: 401 Unauthorized: invalid token *** for refused/tiny-mae)" in str(refused.value)


# ------------------------------------------------------------------------------------- uploads never block the loop


def test_checkpoint_uploads_return_at_once_and_only_the_newest_waiting_one_is_kept(
    tmp_path: pathlib.Path, fake_hub: type[FakeHfApi], caplog: pytest.LogCaptureFixture
) -> None:
    """A Hub that fails: each of three checkpoint uploads returns at once (one upload's retries wait 1 + 2 s). Step 4,
    still waiting when step 6 comes, is skipped with a warning; the final push cuts step 2's retries short."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    fake_hub.failures = 10**6
    uploader = HubUploader(REPO_ID, token=TOKEN, retries=2, retry_wait_s=1.0)
    durations = []
    for step in (2, 4, 6):
        start = time.perf_counter()
        uploader.upload_in_background(folder, f"step {step}")
        durations.append(time.perf_counter() - start)
    assert max(durations) < 0.5, durations  # waiting for step 2 would take 3 s
    assert "Hub upload 'step 4' skipped: the upload before it is still in flight, and 'step 6' replaces it" in [
        record.getMessage() for record in caplog.records]

    fake_hub.failures = 0  # the Hub is back for the final push
    start = time.perf_counter()
    uploader.upload(folder, "End of training")
    assert time.perf_counter() - start < 1.0  # step 2's retries (1 s, then 2 s) ended with the final push
    assert [call["message"] for call in fake_hub.calls[1:]] == ["step 2", "step 6", "End of training"]
    assert (fake_hub.remote / "config.json").is_file() and not (folder / SNAPSHOTS_FOLDER).exists()


def test_a_checkpoint_upload_sends_the_export_as_it_was_at_that_checkpoint(tmp_path: pathlib.Path) -> None:
    """The loop rewrites the export while an upload of the previous one runs: the snapshot keeps the old weights (a
    hard link: safetensors replaces its file) and the old config (a copy: transformers rewrites it in place), and
    holds no checkpoint."""
    folder = tmp_path / "run"
    old_model, new_model = MAEForPreTraining(tiny_config(mask_ratio=0.5)), MAEForPreTraining(tiny_config())
    old_model.save_pretrained(folder)
    (folder / "step_2").mkdir()
    (folder / "step_2" / "optimizer.bin").write_bytes(b"state")
    snapshot = snapshot_for_upload(folder)
    assert (snapshot / "model.safetensors").samefile(folder / "model.safetensors")  # no copy of the weights
    new_model.save_pretrained(folder)
    old = MAEForPreTraining.from_pretrained(snapshot)
    assert old.config.mask_ratio == 0.5 and MAEConfig.from_pretrained(folder).mask_ratio == 0.75
    for name, tensor in old_model.state_dict().items():
        torch.testing.assert_close(old.state_dict()[name], tensor)
    assert not (snapshot / "step_2").exists() and not (snapshot / SNAPSHOTS_FOLDER).exists()
    assert snapshot.parent == folder / SNAPSHOTS_FOLDER


def test_a_hub_down_for_the_whole_run_costs_the_loop_no_time(
    data_dir, model_config, tmp_path, fake_hub, hf_home, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """6 steps, a checkpoint every 2, a Hub that fails until the final push, 30 s before the retry of an upload: the
    loop never waits for one (it did at every checkpoint: 30 s, then 60, 120, 240 with the default flags)."""
    fake_hub.failures = 10**6
    entered: list[tuple[str, float]] = []
    background, final = HubUploader.upload_in_background, HubUploader.upload

    def timed_background(self: HubUploader, folder: pathlib.Path, commit_message: str) -> None:
        start = time.perf_counter()
        background(self, folder, commit_message)
        entered.append((commit_message, start))
        assert time.perf_counter() - start < 1.0, "a checkpoint upload blocked the loop"

    def recovered_final(self: HubUploader, folder: pathlib.Path, commit_message: str) -> None:
        entered.append((commit_message, time.perf_counter()))
        fake_hub.failures = 0  # the Hub is back: the final push, and the upload still waiting, go through
        final(self, folder, commit_message)

    monkeypatch.setattr(HubUploader, "upload_in_background", timed_background)
    monkeypatch.setattr(HubUploader, "upload", recovered_final)
    output = tmp_path / "run"
    flags = ("--push_to_hub", "--hub_model_id", REPO_ID, "--hub_token", TOKEN, "--checkpointing_steps", "2",
             "--hub_upload_retries", "1", "--hub_retry_wait_s", "30")
    run_main(run_args(data_dir, model_config, output, *flags))
    messages = [message for message, _ in entered]
    assert messages == [f"Training in progress, step {step}" for step in (2, 4, 6)] + ["End of training"]
    # From the first checkpoint to the final push: 4 steps and 2 checkpoints, not one 30 s wait for the Hub.
    assert entered[-1][1] - entered[0][1] < 10.0
    assert any("'Training in progress, step 4' skipped" in record.getMessage() for record in caplog.records)
    uploads = [call["message"] for call in fake_hub.calls if call["call"] == "upload_folder"]
    assert uploads == ["Training in progress, step 2", "Training in progress, step 6", "End of training"]
    assert_loadable(fake_hub.remote, weights(output))


# ---------------------------------------------------------------------------------------------------- model cards


def card_metadata(card: str) -> list[str]:
    """The lines of the card's YAML front matter."""
    return card.split("---\n")[1].splitlines()


def pretraining_card_of(dataset_name: str | None, model_source: str, repo_id: str | None) -> str:
    return pretraining_card(
        tiny_config(), model_source=model_source, dataset_name=dataset_name, train_split="train", images_per_epoch=64,
        optim=OptimizationArguments(), learning_rate=1e-3, plan=TrainingPlan(8, 16, 2, 2), completed_steps=16,
        num_processes=1, mixed_precision="no", results={"train_runtime": 12.345, "train_loss": 0.8371186554431915},
        final=True, repo_id=repo_id,
    )


def finetuning_card_of(model_name_or_path: str | None, model_config: str | None, dataset_name: str | None,
                       repo_id: str | None = None) -> str:
    return finetuning_card(
        tiny_config(), model_name_or_path=model_name_or_path, model_config=model_config, seed=3,
        dataset_name=dataset_name, layer_decay=0.75, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
        results={"eval_accuracy": 0.5}, repo_id=repo_id,
    )


def test_a_card_names_hub_ids_and_no_local_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card is uploaded: local models and data are "a local checkpoint" / "local data", whether their path is
    absolute or relative; Hub ids are named, and Hub datasets go to the `datasets:` metadata."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "mae-pretrain").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    local_cards = [
        pretraining_card_of(str(tmp_path / "data"), "outputs/mae-pretrain", None),
        finetuning_card_of("outputs/mae-pretrain", None, str(tmp_path / "data")),
        finetuning_card_of(None, str(tmp_path / "data"), "data"),  # a random init of a local config.json
    ]
    for card in local_cards:
        assert str(tmp_path) not in card and "outputs/mae-pretrain" not in card and "| data |" not in card
        assert "datasets:" not in card
    assert "| dataset | local data |" in local_cards[0] and "| model | a local model: ViT 32x2" in local_cards[0]
    assert "| initialisation | a local checkpoint |" in local_cards[1] and "| dataset | local data |" in local_cards[1]
    assert "| initialisation | random init of a local config (seed 3) |" in local_cards[2]

    hub = finetuning_card_of("facebook/vit-mae-base", None, "ILSVRC/imagenet-1k")
    assert "| initialisation | facebook/vit-mae-base |" in hub and "| dataset | ILSVRC/imagenet-1k |" in hub
    assert card_metadata(hub)[-2:] == ["datasets:", "- ILSVRC/imagenet-1k"]
    assert "| initialisation | random init of tiny-32px (seed 3) |" in finetuning_card_of(None, None, None)


@pytest.mark.parametrize("kind", ["pretraining", "fine-tuning"])
def test_a_card_shows_how_to_load_its_own_repository_and_its_pipeline(kind: str) -> None:
    make_card = (lambda repo_id: pretraining_card_of(None, "tiny-32px", repo_id)) if kind == "pretraining" else (
        lambda repo_id: finetuning_card_of(None, None, None, repo_id))
    pushed, local = make_card(REPO_ID), make_card(None)
    assert f'.from_pretrained("{REPO_ID}", trust_remote_code=True)' in pushed and "PATH_OR_REPO" not in pushed
    assert '.from_pretrained("PATH_OR_REPO", trust_remote_code=True)' in local  # the repository is not known yet
    pipeline = "image-feature-extraction" if kind == "pretraining" else "image-classification"
    assert f"pipeline_tag: {pipeline}" in card_metadata(pushed)


def test_a_pretraining_card_gives_runtimes_in_seconds() -> None:
    card = pretraining_card_of(None, "tiny-32px", None)
    assert "| train_runtime | 12.35 s |" in card and "| train_loss | 0.8371 |" in card


def test_the_exported_weights_have_the_mode_of_every_other_file(tmp_path: pathlib.Path) -> None:
    """safetensors writes its files with mode 0600: the export's weights get 0644 under umask 022, like its config."""
    previous = os.umask(0o022)
    try:
        export_model(Accelerator(cpu=True), MAEForPreTraining(tiny_config()), tmp_path)
    finally:
        os.umask(previous)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644


# Whole cards against hand-written text: every row's key and value, the headings, the metadata and the usage snippet
# (mutation testing found rows, headings and tags that no test read).
CHECKPOINT_CARD = """---
library_name: transformers
license: apache-2.0
pipeline_tag: image-feature-extraction
tags:
- mae
- masked-autoencoder
- self-supervised
- vision
- image-feature-extraction
datasets:
- org/faces
---

# Masked Autoencoder (MAE) pretrained with modeling_mae

A ViT encoder pretrained with the masked-autoencoder objective of He et al., *Masked Autoencoders Are Scalable Vision \
Learners* (2021): 75% of the patches are removed and the decoder reconstructs their pixels.

## Usage

```python
from transformers import AutoModel, AutoModelForPreTraining

encoder = AutoModel.from_pretrained("me/mae", trust_remote_code=True)
mae = AutoModelForPreTraining.from_pretrained("me/mae", trust_remote_code=True)
```

## Data

| | |
|---|---|
| dataset | org/faces |
| split | train |
| images per epoch | 64 |
| augmentation | RandomResizedCrop(scale=(0.2, 1)) + horizontal flip |
| input | 3 channels, pixel values x 1/255, normalised with mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225] |

## Recipe

| | |
|---|---|
| model | tiny-32px: ViT 32x2, patch (4, 4), image (16, 16), decoder 16x1 |
| mask ratio | 0.75 |
| norm_pix_loss | False |
| optimizer | AdamW, betas (0.9, 0.95), weight decay 0.05 (none on biases and norms) |
| learning rate | 0.000125 (base 0.001 x 32 / 256) |
| schedule | 1 warmup step, half-cycle cosine to 0 |
| effective batch | 32 |
| processes | 2 |
| mixed precision | bf16 |
| steps | 6 of 8 |

## Results

| | |
|---|---|
| state | checkpoint at step 6 |
| train_loss | 0.5 |
"""

CLS_CLASSIFIER_CARD = """---
library_name: transformers
license: apache-2.0
pipeline_tag: image-classification
tags:
- mae
- image-classification
- vision
---

# MAE fine-tuned image classifier

A ViT fine-tuned end to end from a Masked Autoencoder encoder (He et al., 2021) with the paper's recipe.

## Usage

```python
from transformers import AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
```

## Recipe

| | |
|---|---|
| initialisation | random init of tiny-32px (seed 3) |
| dataset | the embedded Fashion-MNIST sample |
| model | ViT 32x2, patch (4, 4), image (16, 16) |
| input | 3 channels, pixel values x 1/255, normalised with mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225] |
| head | CLS token |
| layer decay | 0.75 |
| drop path | 0.1 |
| augmentation | RandAugment(9, 0.5), random erasing 0.25, MixUp 0.8, CutMix 1.0, label smoothing 0.1 |

## Results

| | |
|---|---|
| eval_accuracy | 0.5 |
"""


def test_a_checkpoint_card_of_an_accumulated_two_process_run_is_the_hand_written_one() -> None:
    """8 images x 2 micro-batches x 2 processes: an effective batch of 32, so the base lr 1e-3 scales to
    1e-3 * 32 / 256 = 1.25e-4; saved at step 6 of 8, not final."""
    optim = OptimizationArguments(per_device_train_batch_size=8, gradient_accumulation_steps=2, base_learning_rate=1e-3)
    card = pretraining_card(
        tiny_config(), model_source="tiny-32px", dataset_name="org/faces", train_split="train", images_per_epoch=64,
        optim=optim, learning_rate=1.25e-4, plan=TrainingPlan(2, 8, 4, 1), completed_steps=6, num_processes=2,
        mixed_precision="bf16", results={"train_loss": 0.5}, final=False, repo_id="me/mae",
    )
    assert card == CHECKPOINT_CARD


def test_a_card_with_a_learning_rate_given_shows_it_without_the_scaling() -> None:
    optim = OptimizationArguments(learning_rate=5e-4)
    card = pretraining_card(
        tiny_config(), model_source="tiny-32px", dataset_name=None, train_split="train", images_per_epoch=64,
        optim=optim, learning_rate=5e-4, plan=TrainingPlan(2, 8, 4, 1), completed_steps=8, num_processes=1,
        mixed_precision="no", results={}, final=True,
    )
    assert "| learning rate | 0.0005 |" in card.splitlines() and "| state | final |" in card.splitlines()


def test_a_cls_token_classifier_card_is_the_hand_written_one() -> None:
    card = finetuning_card(
        tiny_config(use_mean_pooling=False, drop_path_rate=0.1), model_name_or_path=None, model_config=None, seed=3,
        dataset_name=None, layer_decay=0.75, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
        results={"eval_accuracy": 0.5},
    )
    assert card == CLS_CLASSIFIER_CARD


def test_a_card_without_a_pipeline_has_no_pipeline_tag() -> None:
    """A converted checkpoint's card (conversion.py): no pipeline, no tags, no data set, no usage, one table."""
    card = render_model_card("Title", "Text.", {"Weights": {"source": "timm", "tokens": 3}})
    assert card == ("---\nlibrary_name: transformers\nlicense: apache-2.0\ntags:\n---\n\n# Title\n\nText.\n\n"
                    "## Weights\n\n| | |\n|---|---|\n| source | timm |\n| tokens | 3 |\n")


# ------------------------------------------------------ what the uploader is told and tells (found by mutation testing)


def test_the_command_to_push_by_hand_sends_the_folder_without_the_training_state(tmp_path: pathlib.Path) -> None:
    assert manual_upload_command("me/mae", tmp_path / "my run") == (
        f"hf upload me/mae '{tmp_path}/my run' . --exclude 'step_*' --exclude '.step_*' --exclude 'superseded/*' "
        "--exclude 'runs/*' --exclude '.hub_snapshots/*' --exclude '.run.lock*'")


def test_the_uploader_gets_the_run_flags_and_names_the_repository_after_the_output_folder(
    tmp_path: pathlib.Path, fake_hub: type[FakeHfApi]
) -> None:
    run = RunArguments(output_dir=str(tmp_path / "outputs" / "mae-small"), push_to_hub=True, hub_token=TOKEN,
                       hub_private_repo=True, hub_upload_retries=3, hub_retry_wait_s=0.5)
    uploader = build_uploader(run, is_main_process=True)
    assert (uploader.repo_id, uploader.retries, uploader.retry_wait_s) == ("mae-small", 3, 0.5)
    assert fake_hub.calls == [{"call": "create_repo", "repo_id": "mae-small", "private": True}]
    assert build_uploader(run, is_main_process=False) is None


class ExistingRepoHfApi(FakeHfApi):
    """The Hub refuses to create a repository that exists (HTTP 409) unless asked with exist_ok."""

    def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False) -> Any:
        if not exist_ok:
            raise FileExistsError(f"409 Conflict: You already created this model repo: {repo_id}")
        return super().create_repo(repo_id, private, exist_ok)


def test_a_second_run_pushes_to_the_repository_the_first_one_created(
    fake_hub: type[FakeHfApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modeling_mae.interop.hub.HfApi", ExistingRepoHfApi)
    assert HubUploader(REPO_ID, token=TOKEN).repo_id == REPO_ID


def test_uploads_log_what_went_where_and_a_failed_one_the_command_to_push_by_hand(
    tmp_path: pathlib.Path, fake_hub: type[FakeHfApi], caplog: pytest.LogCaptureFixture
) -> None:
    """retries=0: one try each. The checkpoint upload fails (a warning, training goes on), the final push succeeds;
    then a final push that fails says "1 try"."""
    caplog.set_level("INFO", logger="modeling_mae.interop.hub")
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    uploader = HubUploader(REPO_ID, token=TOKEN, retries=0, retry_wait_s=0.0)
    fake_hub.failures = 1
    uploader.upload_in_background(folder, "step 2")
    uploader.upload(folder, "End of training")
    messages = [record.getMessage() for record in caplog.records]
    assert (f"The Hub upload 'step 2' to {REPO_ID} failed after 1 try (ConnectionError: Connection reset by peer); "
            "training goes on, the next checkpoint and the end of training upload the folder again. To push it by "
            f"hand: {manual_upload_command(REPO_ID, folder)}") in messages
    assert f"Uploaded {folder} to {REPO_ID} (End of training)" in messages

    caplog.clear()
    uploader = HubUploader(REPO_ID, token=TOKEN, retries=0, retry_wait_s=0.0)
    uploader.upload_in_background(folder, "step 4")
    uploader._worker.result()  # the background upload is done before the next one is set to fail
    assert f"Uploaded {folder} to {REPO_ID} (step 4)" in [record.getMessage() for record in caplog.records]
    fake_hub.failures = 1
    with pytest.raises(UsageError, match=rf"^pushing {re.escape(str(folder))} to the Hub repository {REPO_ID} failed "
                       r"after 1 try \(ConnectionError: "):
        uploader.upload(folder, "End of training")


def test_a_retry_warning_says_why_and_which_try_comes_next(
    tmp_path: pathlib.Path, fake_hub: type[FakeHfApi], caplog: pytest.LogCaptureFixture
) -> None:
    fake_hub.failures = 1
    HubUploader(REPO_ID, token=TOKEN, retries=1, retry_wait_s=0.0).upload(tmp_path, "End of training")
    assert [record.getMessage() for record in caplog.records if record.levelname == "WARNING"] == [
        "Hub upload 'End of training' failed (ConnectionError: Connection reset by peer): try 2 of 2 in 0 s"]


def test_a_snapshot_copies_the_weights_where_hard_links_fail_and_keeps_nested_folders(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another filesystem (EXDEV) or one without hard links: the weights are copied; files two folders down too."""
    folder = tmp_path / "run"
    (folder / "figures" / "epoch_1").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "figures" / "epoch_1" / "reconstruction.png").write_bytes(b"png")

    def no_hard_links(source: object, link: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    snapshot = snapshot_for_upload(folder)
    assert (snapshot / "model.safetensors").read_bytes() == b"weights"
    assert not (snapshot / "model.safetensors").samefile(folder / "model.safetensors")
    assert (snapshot / "figures" / "epoch_1" / "reconstruction.png").read_bytes() == b"png"
