"""The checkpoint life cycle: save, rotate, resume, claim an output folder, set aside a superseded run.

`save_checkpoint` writes `accelerator.save_state` plus the training progress, the learning-rate schedule, the batch
layout (JSON) and each process's data-stream position into a staging folder that is renamed to `step_{N}` only once
complete; `load_checkpoint` loads nothing before every file of the folder passed
`checkpoint_files.check_checkpoint_files`, and only ever weights-only.
"""

from __future__ import annotations

import contextlib
import itertools
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
from accelerate.utils import (
    SAFE_WEIGHTS_NAME,
    DistributedType,
)
from torch.optim.lr_scheduler import LambdaLR

from ..errors import UsageError
from .accelerator import BatchLayout
from .checkpoint_files import (
    UnusableFile,
    allowed_globals,
    check_checkpoint_files,
    disk_is_full,
    filesystem_of,
    weights_only_loading,
)
from .optimization import restore_scheduler

logger = logging.getLogger(__name__)


CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


TRAINER_STATE_NAME = "trainer_state.json"  # written last: its presence marks a complete checkpoint


SUPERSEDED_DIR = "superseded"  # the checkpoints of a run that a resume went back on (`claim_output_dir`)


PROCESS_STATE_NAME = "process_state_{}.json"


RNG_STATE_NAME = "random_states_{}.pkl"  # Accelerate's, one per process


LR_SCHEDULER_KEY = "lr_scheduler"  # trainer_state keys besides the caller's progress


BATCH_LAYOUT_KEY = "batch_layout"


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


def resolve_resume_checkpoint(
    resume_from_checkpoint: str | None, output_dir: str | os.PathLike[str]
) -> pathlib.Path | None:
    """`"latest"` -> the newest complete checkpoint in `output_dir` (None: start fresh); a path -> that folder."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = pathlib.Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise UsageError(
            f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE_NAME} in "
            f"{path.resolve()}); pass a step_N folder or latest"
        )
    return path


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

    Every complete `step_N` in `output_dir` is this run's (`claim_output_dir` saw to it at the start), so an existing
    `step_{step}` already holds this run's state at that step: it is kept (an end-of-epoch save right after resuming
    at the epoch's last step).
    """
    output_dir = pathlib.Path(output_dir)
    final = output_dir / f"step_{step}"
    if (final / TRAINER_STATE_NAME).is_file():
        return final
    staging = output_dir / f".step_{step}.incomplete"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed save
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
            }
            write_json(staging / TRAINER_STATE_NAME, trainer_state)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder of that name (no trainer_state.json)
        os.replace(staging, final)
        if total_limit is not None:
            rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def delete_checkpoint(checkpoint: pathlib.Path) -> None:
    """Delete a checkpoint folder; a kill in the middle leaves no half-deleted folder that looks complete: it is first
    renamed to a hidden name that `list_checkpoints` ignores (and uploads skip)."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.deleted")
    shutil.rmtree(hidden, ignore_errors=True)  # left by a process killed while deleting
    os.replace(checkpoint, hidden)
    shutil.rmtree(hidden)


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
        logger.info("Deleting old checkpoint %s", old)
        delete_checkpoint(old)


def read_checkpoint_json(checkpoint: pathlib.Path, name: str) -> dict[str, Any]:
    """A JSON file of a checkpoint; one that cannot be read (truncated, not JSON) is a `UsageError` naming it."""
    path = checkpoint / name
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} cannot be read ({error}); {resume_elsewhere(checkpoint)}") from error
    if not isinstance(state, dict):
        raise UsageError(f"{path} cannot be read (a JSON {type(state).__name__}, not an object); "
                         f"{resume_elsewhere(checkpoint)}")
    return state


def read_trainer_state(checkpoint: pathlib.Path, layout: BatchLayout) -> dict[str, Any]:
    """`trainer_state.json` of a checkpoint of this version, saved with `layout`; anything else is a `UsageError`."""
    path = checkpoint / TRAINER_STATE_NAME
    state = read_checkpoint_json(checkpoint, TRAINER_STATE_NAME)
    if not {LR_SCHEDULER_KEY, BATCH_LAYOUT_KEY} <= state.keys():
        raise UsageError(
            f"{path} has no {LR_SCHEDULER_KEY} or {BATCH_LAYOUT_KEY}: {checkpoint} was written by an older version of "
            "modeling_mae, whose checkpoints kept the learning-rate schedule in a pickle, which is no longer loaded"
        )
    saved = BatchLayout.from_json(state[BATCH_LAYOUT_KEY])
    if saved != layout:
        raise UsageError(
            f"{checkpoint} was saved by {saved.describe()}; this run has {layout.describe()}. A resume continues "
            f"exactly only with the same layout: launch {saved.num_processes} process(es) (accelerate launch "
            f"--num_processes {saved.num_processes}) with --per_device_train_batch_size {saved.per_device_batch_size} "
            f"--gradient_accumulation_steps {saved.gradient_accumulation_steps}, or start a new run in another "
            "--output_dir"
        )
    return state


def check_process_files(checkpoint: pathlib.Path, layout: BatchLayout) -> None:
    """Every process's own files are there; when one is missing, say what most likely happened."""
    for index in range(layout.num_processes):
        for name in (PROCESS_STATE_NAME.format(index), RNG_STATE_NAME.format(index)):
            if not (checkpoint / name).is_file():
                raise UsageError(
                    f"{checkpoint / name} is missing: process {index} writes it into the checkpoint folder, so when "
                    f"processes run on several machines (this run: {layout.num_machines}), output_dir must be on a "
                    f"filesystem that all of them share; {resume_elsewhere(checkpoint)}"
                )


def resume_elsewhere(checkpoint: pathlib.Path) -> str:
    """How to go on without `checkpoint`: from the checkpoint before it, when there is one."""
    step = checkpoint_step(checkpoint)
    previous = newest_checkpoint_before(checkpoint.parent, step) if step is not None else None
    if previous is None:
        return "no earlier checkpoint is in that folder: start again without --resume_from_checkpoint"
    return f"resume from the previous one with --resume_from_checkpoint {previous}"


def load_checkpoint(accelerator: Accelerator, checkpoint: pathlib.Path, resumable: Resumable) -> dict[str, Any]:
    """Restore a checkpoint into the accelerator's objects and `resumable`; returns the saved progress.

    Nothing is loaded before every file passed `check_checkpoint_files`, and every load is weights-only.
    """
    trainer_state = read_trainer_state(checkpoint, resumable.layout)
    check_process_files(checkpoint, resumable.layout)
    restore_stream_position(checkpoint, PROCESS_STATE_NAME.format(accelerator.process_index), resumable.train_loader)
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    allowed = allowed_globals(deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED)
    try:
        check_checkpoint_files(checkpoint, allowed, model_weights=None if sharded else SAFE_WEIGHTS_NAME)
    except UnusableFile as error:
        raise UsageError(f"{error}; {resume_elsewhere(checkpoint)}") from error
    with weights_only_loading(allowed):
        accelerator.load_state(str(checkpoint))
    restore_scheduler(resumable.scheduler, trainer_state.pop(LR_SCHEDULER_KEY))
    del trainer_state[BATCH_LAYOUT_KEY]
    return trainer_state


def restore_stream_position(checkpoint: pathlib.Path, name: str, loader: ResumableLoader) -> None:
    """Load this process's data-stream position (file `name`) into `loader`; a file that holds none is named."""
    position = read_checkpoint_json(checkpoint, name).get(TRAIN_LOADER_STATE)
    try:
        if not isinstance(position, dict):
            raise KeyError(TRAIN_LOADER_STATE)
        loader.load_state_dict(position)
    except (KeyError, TypeError) as error:  # a field missing, or one too many: not a position this version wrote
        raise UsageError(
            f"{checkpoint / name} holds no data-stream position ({type(error).__name__}: {error}); "
            f"{resume_elsewhere(checkpoint)}"
        ) from error


def resume_training(
    accelerator: Accelerator,
    resume_from_checkpoint: str | None,
    output_dir: str | os.PathLike[str],
    resumable: Resumable,
) -> tuple[pathlib.Path, dict[str, Any]] | None:
    """Restore `--resume_from_checkpoint`: weights, optimizer, RNG, the learning-rate schedule, the stream position.

    Returns (checkpoint, saved progress), or None to start from scratch ("latest" with no checkpoint yet included).
    """
    path = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)
    if path is None:
        claim_output_dir(accelerator, output_dir, None)
        if resume_from_checkpoint:
            logger.info("no checkpoint in %s yet: starting from scratch", output_dir)
        return None
    trainer_state = load_checkpoint(accelerator, path, resumable)
    claim_output_dir(accelerator, output_dir, path)
    return path, trainer_state


def claim_output_dir(
    accelerator: Accelerator, output_dir: str | os.PathLike[str], resumed: pathlib.Path | None
) -> None:
    """Make every complete checkpoint in `output_dir` this run's, so that `latest` always resumes this run.

    A run that resumes none of them (a fresh start, or a checkpoint from elsewhere) would mix its checkpoints with
    another run's: a `UsageError`. A run that resumes one of them goes on from there, so the later ones belong to the
    run it went back on (damaged, diverged, or a branch the user abandons): they are moved, never deleted, to
    `output_dir/superseded/`, newest first, so that a kill midway never leaves `latest` ahead of the resumed step.
    """
    output_dir = pathlib.Path(output_dir)
    checkpoints = list_checkpoints(output_dir)
    if resumed is None or resumed.resolve().parent != output_dir.resolve():
        if checkpoints:
            found = ", ".join(path.name for path in checkpoints)
            raise UsageError(
                f"--output_dir {output_dir.resolve()} holds the checkpoints of another run ({found}): continue it with "
                "--resume_from_checkpoint latest, or pass another --output_dir"
            )
        return
    later = [path for path in checkpoints if (checkpoint_step(path) or 0) > (checkpoint_step(resumed) or 0)]
    if accelerator.is_main_process and later:
        moved = [set_aside(path, output_dir / SUPERSEDED_DIR) for path in reversed(later)]
        logger.warning("Resumed from %s: moved the later checkpoints of the run it went back on to %s (%s); delete "
                       "them once they are no longer needed", resumed.name, output_dir / SUPERSEDED_DIR,
                       ", ".join(path.name for path in reversed(moved)))
    accelerator.wait_for_everyone()


def set_aside(checkpoint: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """Move a checkpoint folder into `folder` (one rename), under a name no earlier one there has; returns it."""
    folder.mkdir(exist_ok=True)
    target = folder / checkpoint.name
    for attempt in itertools.count(2):
        if not target.exists():
            break
        target = folder / f"{checkpoint.name}.{attempt}"
    os.replace(checkpoint, target)
    return target


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    pathlib.Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
