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
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import huggingface_hub
from accelerate import Accelerator
from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import filter_repo_objects
from torch import nn

from ..arguments import RunArguments
from ..errors import UsageError
from ..text import counted

logger = logging.getLogger(__name__)

SNAPSHOTS_FOLDER = ".hub_snapshots"  # inside the export folder: the snapshots that background uploads send
# Training state stays local: checkpoints (and their staging folders), tracker logs that are still being written, the
# upload snapshots, and the output folder's lock (`training.output_lock`).
UPLOAD_IGNORE_PATTERNS = ("step_*", ".step_*", "superseded/*", "runs/*", f"{SNAPSHOTS_FOLDER}/*", ".run.lock*")


def snapshot_for_upload(folder: str | os.PathLike[str]) -> pathlib.Path:
    """The files of `folder` that an upload sends, frozen in a new folder under `folder/.hub_snapshots`: the training
    loop rewrites the export at the next checkpoint while the upload may still run.

    The weights are hard links, not copies: safetensors writes a new file and renames it over the old one, so a link
    keeps the old weights at no cost. Every other file (config, card, code, results) is rewritten in place, and small:
    copied. A filesystem without hard links gets copies of everything.
    """
    folder = pathlib.Path(folder)
    (folder / SNAPSHOTS_FOLDER).mkdir(exist_ok=True)
    snapshot = pathlib.Path(tempfile.mkdtemp(prefix="upload-", dir=folder / SNAPSHOTS_FOLDER))
    names = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    for name in filter_repo_objects(names, ignore_patterns=UPLOAD_IGNORE_PATTERNS):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if not (name.endswith(".safetensors") and _hard_linked(folder / name, snapshot / name)):
            shutil.copy2(folder / name, snapshot / name)
    return snapshot


def _hard_linked(source: pathlib.Path, link: pathlib.Path) -> bool:
    try:
        os.link(source, link)
    except OSError:  # another filesystem, or one without hard links
        return False
    return True


def with_default_mode(*paths: str | os.PathLike[str]) -> None:
    """Give files the mode any new file gets here (0644 under the usual umask 022). safetensors writes through a
    private temporary file (mode 0600) that it renames into place: the weights alone would stay unreadable to the
    other users of a shared folder."""
    umask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def with_default_modes(folder: str | os.PathLike[str]) -> None:
    """`with_default_mode` for every safetensors file of `folder` (a `save_pretrained` folder: one, or shards)."""
    with_default_mode(*pathlib.Path(folder).glob("*.safetensors"))


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
        with_default_modes(output_dir)
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


@dataclass(frozen=True)
class PendingUpload:
    """A checkpoint upload: the snapshot it sends (deleted once sent or given up) and the export folder it froze."""

    snapshot: pathlib.Path
    export_folder: pathlib.Path
    commit_message: str


class HubUploader:
    """Creates the Hub repository once, then uploads the export folder: in the background at checkpoints, in the
    foreground at the end.

    A Hub outage must not cost training time. A checkpoint upload sends a snapshot of the export (`snapshot_for_upload`)
    that the loop never rewrites, so `upload_in_background` returns at once, whatever the Hub does. One upload runs at a
    time; a checkpoint that comes while one is in flight waits for it, and replaces (with a warning) any checkpoint
    that was waiting already: only the newest is worth sending. Every upload is retried `retries` times, waiting
    `retry_wait_s`, then twice as long each time (on top of `huggingface_hub`'s own retries of each request); a
    background upload that still fails is logged as a warning with the command that pushes the folder by hand, and
    training goes on. Only the final `upload` waits: for the background uploads, which stop retrying then (it sends
    everything they would), then for its own, which raises once everything is saved locally. The token never appears in
    a message.
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
        self._lock = threading.Lock()  # guards the two fields below, shared with the upload thread
        self._waiting: PendingUpload | None = None  # the newest checkpoint upload, not started yet
        self._uploading = False  # the upload thread is sending, or about to send, what waits
        self._worker: Future[None] | None = None
        self._final_push = threading.Event()  # set by `upload`: background uploads stop retrying

    def upload_in_background(self, folder: str | os.PathLike[str], commit_message: str) -> None:
        """Snapshot `folder` and return at once; the upload thread sends it when the previous upload is done. If every
        try fails, a warning says so as it happens, and training goes on."""
        pending = PendingUpload(snapshot_for_upload(folder), pathlib.Path(folder), commit_message)
        with self._lock:
            replaced, self._waiting = self._waiting, pending
            start_thread, self._uploading = not self._uploading, True
        if replaced is not None:
            logger.warning("Hub upload %r skipped: the upload before it is still in flight, and %r replaces it",
                           replaced.commit_message, commit_message)
            shutil.rmtree(replaced.snapshot, ignore_errors=True)
        if start_thread:
            self._worker = self._executor.submit(self._upload_waiting)
        logger.info("Uploading %s to %s in the background (%s)", folder, self.repo_id, commit_message)

    def upload(self, folder: str | os.PathLike[str], commit_message: str) -> None:
        """The final push, of `folder` itself (nothing rewrites it any more), after the background uploads; raises a
        `UsageError` with the command to push by hand when every try failed."""
        self._final_push.set()
        if self._worker is not None:
            self._worker.result()
        shutil.rmtree(pathlib.Path(folder) / SNAPSHOTS_FOLDER, ignore_errors=True)  # with those of a killed run
        tries, error = self._upload_with_retries(str(folder), commit_message, stop_retrying=threading.Event())
        if error is not None:  # whatever the network did, the user gets the way out
            raise UsageError(
                f"pushing {folder} to the Hub repository {self.repo_id} failed after {counted(tries, 'try', 'tries')} "
                f"({self._describe(error)}). Everything is saved locally in {pathlib.Path(folder).resolve()}; push "
                f"it later with: {manual_upload_command(self.repo_id, folder)}"
            ) from error
        logger.info("Uploaded %s to %s (%s)", folder, self.repo_id, commit_message)

    def _upload_waiting(self) -> None:
        """The upload thread: send what waits, then what came meanwhile, until nothing waits."""
        while True:
            with self._lock:
                pending, self._waiting = self._waiting, None
                if pending is None:
                    self._uploading = False
                    return
            try:
                self._upload_or_warn(pending)
            finally:
                shutil.rmtree(pending.snapshot, ignore_errors=True)

    def _upload_or_warn(self, pending: PendingUpload) -> None:
        tries, error = self._upload_with_retries(str(pending.snapshot), pending.commit_message, self._final_push)
        if error is None:
            logger.info("Uploaded %s to %s (%s)", pending.export_folder, self.repo_id, pending.commit_message)
            return
        logger.warning(  # a failed checkpoint push must never stop training
            "The Hub upload %r to %s failed after %s (%s); training goes on, the next checkpoint and the end of "
            "training upload the folder again. To push it by hand: %s",
            pending.commit_message, self.repo_id, counted(tries, "try", "tries"), self._describe(error),
            manual_upload_command(self.repo_id, pending.export_folder),
        )

    def _upload_with_retries(
        self, folder: str, commit_message: str, stop_retrying: threading.Event
    ) -> tuple[int, Exception | None]:
        """Upload `folder`, retrying after a doubling wait: (tries, None) once it is done, else (tries, the last error)
        after the last try, or as soon as `stop_retrying` is set."""
        tries = 0
        while True:
            tries += 1
            try:
                self.api.upload_folder(
                    repo_id=self.repo_id,
                    folder_path=folder,
                    commit_message=commit_message,
                    ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),  # a copy: upload_folder appends to it
                )
                return tries, None
            except Exception as error:  # noqa: BLE001 - 5xx, dropped connections, timeouts: all worth another try
                if tries > self.retries or stop_retrying.is_set():
                    return tries, error
                wait = self.retry_wait_s * 2 ** (tries - 1)
                logger.warning(
                    "Hub upload %r failed (%s): try %d of %d in %.3g s",
                    commit_message, self._describe(error), tries + 1, self.retries + 1, wait,
                )
                if stop_retrying.wait(wait):
                    return tries, error

    def _describe(self, error: BaseException) -> str:
        """`Type: first line` of an error, with the token masked should a server ever echo it back."""
        lines = str(error).strip().splitlines()
        text = f"{type(error).__name__}: {lines[0] if lines else ''}"
        return text.replace(self._token, "***") if self._token else text
