"""Export a trained model as a self-contained `from_pretrained` folder and push it to the Hub.

The export folder is the run's `output_dir`: weights (safetensors), `config.json` with an `auto_map`, the two code
files, `preprocessor_config.json`, README.md (the model card: `model_card.py`), results and figures. Checkpoint
folders inside it are never uploaded.
"""

from __future__ import annotations

import logging
import os
import pathlib
from concurrent.futures import Future
from typing import Any

from accelerate import Accelerator
from huggingface_hub import HfApi
from torch import nn

logger = logging.getLogger(__name__)

# Training state stays local: checkpoints (and their staging folders) and tracker logs that are still being written.
UPLOAD_IGNORE_PATTERNS = ["step_*", ".step_*", "runs/*"]


def export_model(accelerator: Accelerator, model: nn.Module, output_dir: str | os.PathLike[str]) -> None:
    """Write `model` (as prepared by Accelerate) to `output_dir` in the `save_pretrained` layout; call on every process.

    The full state dict is gathered first (a collective under DeepSpeed ZeRO-3) and saved in float32 whatever the
    training precision, like the official checkpoints.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state_dict = {
            name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()
        }
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(
            output_dir, state_dict=state_dict, safe_serialization=True
        )
    accelerator.wait_for_everyone()


def default_repo_name(output_dir: str | os.PathLike[str]) -> str:
    return pathlib.Path(output_dir).resolve().name


class HubUploader:
    """Creates the Hub repository once, then uploads the export folder, in the background when asked.

    At most one upload is in flight: `upload` first waits for the previous one, because the caller rewrites the
    folder's files before each upload.
    """

    def __init__(self, repo_id: str, token: str | None = None, private: bool = False) -> None:
        self.api = HfApi(token=token)
        self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        self._pending: Future[Any] | None = None

    def upload(self, folder: str | os.PathLike[str], commit_message: str, background: bool = False) -> None:
        self.wait()
        result = self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
            run_as_future=background,
        )
        if background:
            self._pending = result
        logger.info("Uploading %s to %s (%s)", folder, self.repo_id, "background" if background else "done")

    def wait(self) -> None:
        """Block until the background upload (if any) is done; re-raises its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
