"""Export a trained model as a self-contained `from_pretrained` folder and push it to the Hub.

The export folder is the run's `output_dir`: weights (safetensors), `config.json` with an `auto_map`, the two code
files, `preprocessor_config.json`, README.md (the model card: `model_card.py`), results and figures. Checkpoint
folders inside it are never uploaded.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shlex
import time
from concurrent.futures import Future, ThreadPoolExecutor

import huggingface_hub
from accelerate import Accelerator
from huggingface_hub import HfApi, get_token
from torch import nn

from ..arguments import RunArguments
from ..errors import UsageError

logger = logging.getLogger(__name__)

# Training state stays local: checkpoints (and their staging folders) and tracker logs that are still being written.
UPLOAD_IGNORE_PATTERNS = ("step_*", ".step_*", "superseded/*", "runs/*")


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


def manual_upload_command(repo_id: str, folder: str | os.PathLike[str]) -> str:
    """The `hf upload` command that pushes `folder` as the run would (logged in with `hf auth login` or HF_TOKEN)."""
    excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in UPLOAD_IGNORE_PATTERNS)
    return f"hf upload {repo_id} {shlex.quote(str(pathlib.Path(folder).resolve()))} . {excludes}"


def check_hub_access(token: str | None) -> None:
    """Fail before any training, in one line, when `--push_to_hub` cannot work: offline, or no token at all."""
    if huggingface_hub.is_offline_mode():
        raise UsageError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub")
    if token is None and get_token() is None:
        raise UsageError("--push_to_hub needs a Hub token: run `hf auth login`, set HF_TOKEN or pass --hub_token")


def build_uploader(run: RunArguments, is_main_process: bool) -> HubUploader | None:
    """The uploader of `--push_to_hub`, on the main process; every process checks first that a push can work."""
    if not run.push_to_hub:
        return None
    check_hub_access(run.hub_token)
    if not is_main_process:
        return None
    return HubUploader(
        run.hub_model_id or default_repo_name(run.output_dir),
        token=run.hub_token,
        private=run.hub_private_repo,
        retries=run.hub_upload_retries,
        retry_wait_s=run.hub_retry_wait_s,
    )


class HubUploader:
    """Creates the Hub repository once, then uploads the export folder, in the background when asked.

    A network blip must not cost a training run: every upload is retried `retries` times, waiting `retry_wait_s`,
    then twice as long each time (on top of `huggingface_hub`'s own retries of each request). A background upload
    that still fails is logged as a warning with the command that pushes the folder by hand, and training goes on;
    only the final, foreground `upload` raises, once everything is saved locally. At most one upload is in flight:
    `upload` and `upload_in_background` first wait for the previous one, because the caller rewrites the folder's
    files before each upload. The token never appears in a message.
    """

    def __init__(
        self, repo_id: str, token: str | None = None, private: bool = False, retries: int = 4,
        retry_wait_s: float = 30.0,
    ) -> None:
        self.api = HfApi(token=token)
        self._token = token
        self.retries, self.retry_wait_s = retries, retry_wait_s
        try:
            self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        except Exception as error:  # unreachable Hub, refused token, bad name: all end the same way
            raise UsageError(
                f"--push_to_hub: cannot create the Hub repository {repo_id} ({self._describe(error)}); check the "
                "token (`hf auth login`, HF_TOKEN or --hub_token), the network and --hub_model_id. Nothing was trained"
            ) from error
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")
        self._pending: Future[None] | None = None

    def upload_in_background(self, folder: str | os.PathLike[str], commit_message: str) -> None:
        """Start an upload and return; if every try fails, a warning says so as it happens, and training goes on."""
        self.wait()
        self._pending = self._executor.submit(self._upload_or_warn, str(folder), commit_message)
        logger.info("Uploading %s to %s in the background (%s)", folder, self.repo_id, commit_message)

    def upload(self, folder: str | os.PathLike[str], commit_message: str) -> None:
        """Upload now; raises a `UsageError` with the command to push by hand when every try failed."""
        self.wait()
        try:
            self._upload_with_retries(str(folder), commit_message)
        except Exception as error:  # whatever the network did, the user gets the way out
            raise UsageError(
                f"pushing {folder} to the Hub repository {self.repo_id} failed after {self.retries + 1} tries "
                f"({self._describe(error)}). Everything is saved locally in {pathlib.Path(folder).resolve()}; push "
                f"it later with: {manual_upload_command(self.repo_id, folder)}"
            ) from error
        logger.info("Uploaded %s to %s (%s)", folder, self.repo_id, commit_message)

    def wait(self) -> None:
        """Block until the background upload (if any) is done."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _upload_or_warn(self, folder: str, commit_message: str) -> None:
        try:
            self._upload_with_retries(folder, commit_message)
        except Exception as error:  # noqa: BLE001 - a failed checkpoint push must never stop training
            logger.warning(
                "The Hub upload %r to %s failed after %d tries (%s); training goes on, the next checkpoint and the "
                "end of training upload the folder again. To push it by hand: %s",
                commit_message, self.repo_id, self.retries + 1, self._describe(error),
                manual_upload_command(self.repo_id, folder),
            )

    def _upload_with_retries(self, folder: str, commit_message: str) -> None:
        for attempt in range(self.retries + 1):
            try:
                self.api.upload_folder(
                    repo_id=self.repo_id,
                    folder_path=folder,
                    commit_message=commit_message,
                    ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),  # a copy: upload_folder appends to it
                )
                return
            except Exception as error:  # 5xx, dropped connections, timeouts: all worth another try
                if attempt == self.retries:
                    raise
                wait = self.retry_wait_s * 2**attempt
                logger.warning(
                    "Hub upload %r failed (%s): try %d of %d in %.3g s",
                    commit_message, self._describe(error), attempt + 2, self.retries + 1, wait,
                )
                time.sleep(wait)

    def _describe(self, error: BaseException) -> str:
        """`Type: first line` of an error, with the token masked should a server ever echo it back."""
        lines = str(error).strip().splitlines()
        text = f"{type(error).__name__}: {lines[0] if lines else ''}"
        return text.replace(self._token, "***") if self._token else text
