"""Saving checkpoints: `save_checkpoint` writes `accelerator.save_state` plus the training progress, the
learning-rate schedule, the batch layout, what the run trains (`run_identity`; all JSON) and each process's
data-stream position into a staging folder that is renamed to `step_{N}` only once complete; older ones rotate out.
A `step_N` may be a link to a folder kept elsewhere: it is used, renamed and removed as a link, and its target is
never deleted. Resuming is `resume.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR

from ..errors import UsageError
from .accelerator import BatchLayout
from .checkpoint_files import (
    disk_is_full,
    filesystem_of,
)
from .run_identity import RunIdentity

logger = logging.getLogger(__name__)


CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


TRAINER_STATE_NAME = "trainer_state.json"  # written last: its presence marks a complete checkpoint


SUPERSEDED_DIR = "superseded"  # the checkpoints of a run that a resume went back on (`claim_output_dir`)


PROCESS_STATE_NAME = "process_state_{}.json"


RNG_STATE_NAME = "random_states_{}.pkl"  # Accelerate's, one per process


LR_SCHEDULER_KEY = "lr_scheduler"  # trainer_state keys besides the caller's progress


BATCH_LAYOUT_KEY = "batch_layout"


RUN_IDENTITY_KEY = "run_identity"  # the model and data the checkpoint trained (`run_identity.RunIdentity`)


TRAIN_LOADER_STATE = "train_loader"  # the process_state key of the training data-stream position


class ResumableLoader(Protocol):
    """What a checkpoint needs of `data.ImageStreamLoader` (typed structurally: this module does not import data)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Resumable:
    """What a checkpoint saves besides Accelerate's state (model, optimizer, RNG) and the caller's progress."""

    scheduler: LambdaLR
    train_loader: ResumableLoader
    layout: BatchLayout
    identity: RunIdentity


def checkpoint_step(path: pathlib.Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[pathlib.Path]:
    """Complete checkpoints `step_{N}` in `output_dir`, oldest first."""
    directory = pathlib.Path(output_dir)
    if not directory.is_dir():
        return []
    complete = [p for p in directory.iterdir() if checkpoint_step(p) is not None and (p / TRAINER_STATE_NAME).is_file()]
    return sorted(complete, key=lambda p: checkpoint_step(p) or 0)


def newest_checkpoint_before(output_dir: str | os.PathLike[str], step: int) -> pathlib.Path | None:
    """The newest complete checkpoint of `output_dir` saved before optimizer step `step`."""
    older = [path for path in list_checkpoints(output_dir) if (checkpoint_step(path) or 0) < step]
    return older[-1] if older else None


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike[str],
    step: int,
    progress: Mapping[str, Any],
    resumable: Resumable,
    total_limit: int | None = None,
) -> pathlib.Path:
    """Save the full training state to `output_dir/step_{step}`; call it on every process.

    `trainer_state.json` (written by the main process) holds `progress` (identical on all processes), the
    learning-rate schedule and the batch layout; each process writes its data-stream position. Everything goes to a
    staging folder first, renamed to `step_{step}` at the end, so a crash mid-save never leaves a complete-looking
    folder; a full disk removes the staging folder and raises a `UsageError` that says the previous checkpoint is
    intact.

    Every complete `step_N` in `output_dir` is this run's (`claim_output_dir` saw to it at the start, and the output
    folder's lock keeps other runs out), so an existing `step_{step}` already holds this run's state at that step: it
    is kept, and said so (an end-of-epoch save right after resuming at the epoch's last step, or a save on a signal at
    a step just saved).
    """
    output_dir = pathlib.Path(output_dir)
    final = output_dir / f"step_{step}"
    if (final / TRAINER_STATE_NAME).is_file():
        logger.info("step %d: kept %s, which already holds this run's state at that step", step, final)
        return final
    staging = output_dir / f".step_{step}.incomplete"
    if accelerator.is_main_process:
        remove(staging)  # leftovers of a crashed save
    accelerator.wait_for_everyone()
    with reporting_full_disk(output_dir, step, f"checkpoint step_{step}", staging):
        accelerator.save_state(str(staging))
        process_state = {TRAIN_LOADER_STATE: resumable.train_loader.state_dict()}
        write_json(staging / PROCESS_STATE_NAME.format(accelerator.process_index), process_state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            trainer_state = {
                **progress,
                LR_SCHEDULER_KEY: resumable.scheduler.state_dict(),
                BATCH_LAYOUT_KEY: resumable.layout.to_json(),
                RUN_IDENTITY_KEY: resumable.identity.to_json(),
            }
            write_json(staging / TRAINER_STATE_NAME, trainer_state)
    if accelerator.is_main_process:
        remove(final)  # an incomplete folder of that name (no trainer_state.json), or a link to one
        os.replace(staging, final)
        if total_limit is not None:
            rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    logger.info("step %d: saved %s", step, final)
    return final


def delete_checkpoint(checkpoint: pathlib.Path) -> None:
    """Delete a checkpoint folder; a kill in the middle leaves no half-deleted folder that looks complete: it is first
    renamed to a hidden name that `list_checkpoints` ignores (and uploads skip). A link is removed, never its target."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.deleted")
    remove(hidden)  # left by a process killed while deleting
    os.replace(checkpoint, hidden)
    remove(hidden, missing_ok=False)


def remove(path: pathlib.Path, missing_ok: bool = True) -> None:
    """Remove a folder, or a link without following it: a `step_N` linked to a checkpoint kept elsewhere (another
    disk) loses the link, and the checkpoint stays."""
    if path.is_symlink():
        path.unlink()
    elif missing_ok:
        shutil.rmtree(path, ignore_errors=True)
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def reporting_full_disk(
    output_dir: pathlib.Path, step: int, saving: str, staging: pathlib.Path | None = None
) -> Iterator[None]:
    """A write that runs out of space becomes a `UsageError` naming the filesystem, what was being saved (`saving`)
    and the newest checkpoint, which is intact; a checkpoint's `staging` folder is removed."""
    try:
        yield
    except Exception as error:
        if not disk_is_full(error, output_dir):
            raise
        room = ""
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)  # gives the space back; the previous checkpoints are untouched
            room = " (a save needs room for one more checkpoint beside the --checkpoints_total_limit kept ones)"
        previous = newest_checkpoint_before(output_dir, step + 1)
        intact = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise UsageError(
            f"no space left on {filesystem_of(output_dir)} while saving {saving} to {output_dir}; {intact}. Free "
            f"some space{room} and rerun with --resume_from_checkpoint latest"
        ) from error


def rotate_checkpoints(output_dir: str | os.PathLike[str], total_limit: int) -> None:
    """Delete all but the newest `total_limit` complete checkpoints."""
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        if old.is_symlink():
            logger.info("Removing the link of old checkpoint %s (its target %s stays)", old, os.readlink(old))
        else:
            logger.info("Deleting old checkpoint %s", old)
        delete_checkpoint(old)


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    pathlib.Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
