"""Resuming a run: which checkpoint (`--resume_from_checkpoint latest` or a path), whether it may be resumed here
(the batch layout, the model and data it trained, its trainer state readable and well typed, every file loadable
weights-only), loading it, and claiming the output folder (a resume from an earlier step sets the later ones aside).
Also the line a stopped run ends with: the newest checkpoint and the command that resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import pathlib
import shlex
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from accelerate import Accelerator
from accelerate.utils import (
    SAFE_WEIGHTS_NAME,
    DistributedType,
)

from ..errors import UsageError
from .accelerator import BatchLayout
from .checkpoint_files import (
    UnusableFile,
    allowed_globals,
    check_checkpoint_files,
    weights_only_loading,
)
from .checkpoints import (
    BATCH_LAYOUT_KEY,
    LR_SCHEDULER_KEY,
    PROCESS_STATE_NAME,
    RNG_STATE_NAME,
    RUN_IDENTITY_KEY,
    SUPERSEDED_DIR,
    TRAIN_LOADER_STATE,
    TRAINER_STATE_NAME,
    Resumable,
    ResumableLoader,
    checkpoint_step,
    list_checkpoints,
    newest_checkpoint_before,
)
from .optimization import restore_scheduler
from .run_identity import RunIdentity, check_resumed_identity

logger = logging.getLogger(__name__)


SCHEDULER_FIELDS: dict[str, Any] = {  # what `restore_scheduler` reads of the saved schedule, and of what type
    "base_lrs": list[float], "lr_lambdas": list[dict[str, float] | None], "last_epoch": int, "_step_count": int,
}


Progress = TypeVar("Progress")  # the caller's progress dataclass (`TrainingProgress`, `FinetuneProgress`)


@dataclass
class Resumed(Generic[Progress]):
    """A resumed checkpoint: where from, the progress it saved, and the objective's changes it was resumed with
    (`--allow_objective_change`: `{field: [old, new]}`)."""

    checkpoint: pathlib.Path
    progress: Progress
    objective_changes: dict[str, list[Any]]


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
    schedule = state[LR_SCHEDULER_KEY]
    wrong = [name for name, kind in SCHEDULER_FIELDS.items()
             if not isinstance(schedule, dict) or not fits(schedule.get(name), kind)]
    if wrong:
        raise UsageError(f"{path} cannot be read ({LR_SCHEDULER_KEY} has no usable {', '.join(wrong)}); "
                         f"{resume_elsewhere(checkpoint)}")
    try:
        saved = BatchLayout.from_json(state[BATCH_LAYOUT_KEY])
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{path} cannot be read ({BATCH_LAYOUT_KEY}: {type(error).__name__}: {error}); "
                         f"{resume_elsewhere(checkpoint)}") from error
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


def resume_command(argv: Sequence[str]) -> str:
    """The command that continues the run of `argv` (the script, then its flags): the same flags, any
    `--resume_from_checkpoint` replaced by `--resume_from_checkpoint latest`."""
    resume_flag = "--resume_from_checkpoint"
    script, *flags = argv
    kept: list[str] = []
    value_follows = False
    for flag in flags:
        if value_follows:
            value_follows = False
        elif flag.split("=", 1)[0] in (resume_flag, resume_flag.replace("_", "-")):  # HfArgumentParser takes both
            value_follows = "=" not in flag
        else:
            kept.append(flag)
    launcher = "accelerate launch" if os.environ.get("TORCHELASTIC_RUN_ID") else "python"  # several processes
    return shlex.join([*launcher.split(), script, *kept, resume_flag, "latest"])


@contextlib.contextmanager
def noting_interruption(output_dir: str | os.PathLike[str], completed_steps: Callable[[], int]) -> Iterator[None]:
    """Add to a Ctrl-C inside the block what `errors.run_main` prints with it: the optimizer step reached, and the
    newest checkpoint of `output_dir` with the command that resumes from it."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        checkpoints = list_checkpoints(output_dir)
        where = (f"newest checkpoint: {checkpoints[-1].resolve()}; resume with: {resume_command(sys.argv)}"
                 if checkpoints else "no checkpoint saved yet (--checkpointing_steps N saves them)")
        interrupt.add_note(f"at step {completed_steps()}; {where}")
        raise


def load_checkpoint(
    accelerator: Accelerator,
    checkpoint: pathlib.Path,
    resumable: Resumable,
    progress_type: type[Progress],
    allow_objective_change: bool,
) -> Resumed[Progress]:
    """Restore a checkpoint into the accelerator's objects and `resumable`; returns the saved progress.

    Nothing is loaded before the checkpoint trained this run's model on this run's data (`run_identity`) and every
    file passed `check_checkpoint_files`, and every load is weights-only.
    """
    trainer_state = read_trainer_state(checkpoint, resumable.layout)
    objective_changes = check_identity(trainer_state.pop(RUN_IDENTITY_KEY, None), resumable.identity, checkpoint,
                                       allow_objective_change)
    lr_scheduler = trainer_state.pop(LR_SCHEDULER_KEY)
    del trainer_state[BATCH_LAYOUT_KEY]
    progress = progress_from_state(progress_type, trainer_state, checkpoint)
    check_process_files(checkpoint, resumable.layout)
    restore_stream_position(checkpoint, PROCESS_STATE_NAME.format(accelerator.process_index), resumable.train_loader)
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    allowed = allowed_globals(deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED)
    try:
        check_checkpoint_files(checkpoint, allowed, model_weights=None if sharded else SAFE_WEIGHTS_NAME)
    except UnusableFile as error:
        raise UsageError(f"{error}; {resume_elsewhere(checkpoint)}") from error
    with weights_only_loading(allowed), refusing_another_model(checkpoint):
        accelerator.load_state(str(checkpoint))
    restore_scheduler(resumable.scheduler, lr_scheduler)
    return Resumed(checkpoint, progress, objective_changes)


def check_identity(
    saved: Any, current: RunIdentity, checkpoint: pathlib.Path, allow_objective_change: bool
) -> dict[str, list[Any]]:
    """`run_identity.check_resumed_identity` on the trainer state's record; a checkpoint of an older version, which
    recorded none, is resumed unchecked, with a warning."""
    if saved is None:
        logger.warning("%s records neither its model nor its data (an older version wrote it): resumed without "
                       "checking that this run trains the same", checkpoint)
        return {}
    try:
        identity = RunIdentity.from_json(saved)
    except ValueError as error:
        raise UsageError(f"{checkpoint / TRAINER_STATE_NAME} cannot be read ({error}); "
                         f"{resume_elsewhere(checkpoint)}") from error
    return check_resumed_identity(identity, current, checkpoint, allow_objective_change)


@contextlib.contextmanager
def refusing_another_model(checkpoint: pathlib.Path) -> Iterator[None]:
    """A model whose weights do not fit the checkpoint's (one the run identity could not tell: an older checkpoint)
    is one line, not PyTorch's state-dict report."""
    try:
        yield
    except RuntimeError as error:
        if "state_dict" not in str(error):
            raise
        first = str(error).strip().splitlines()[0]
        raise UsageError(f"{checkpoint} holds another model ({first}): resume with the model flags it was trained "
                         "with, or start a new run in another --output_dir") from error


def progress_from_state(progress_type: type[Progress], state: Mapping[str, Any], checkpoint: pathlib.Path) -> Progress:
    """The caller's progress dataclass from a trainer state, each field of the type its annotation says: a value of
    another type is the one line of a file that cannot be read. A field the state lacks (an older version wrote it)
    keeps its default and a key this version does not know (a newer one's) is left out, each with a warning."""
    path = checkpoint / TRAINER_STATE_NAME
    types_of = typing.get_type_hints(progress_type)
    fields = {field.name for field in dataclasses.fields(progress_type) if field.init}
    for names, why in ((state.keys() - fields, "unknown to this version (a newer one wrote it?): left out"),
                       (fields - state.keys(), "missing (an older version wrote it?): starting from the default")):
        if names:
            logger.warning("%s: %s %s", path, ", ".join(sorted(names)), why)
    for name in sorted(fields & state.keys()):
        if not fits(state[name], types_of[name]):
            raise UsageError(f"{path} cannot be read ({name} is {state[name]!r}, not {type_name(types_of[name])}); "
                             f"{resume_elsewhere(checkpoint)}")
    return progress_type(**{name: state[name] for name in fields & state.keys()})


def fits(value: Any, kind: Any) -> bool:
    """Whether a JSON value is of type `kind` (an annotation: int, float, str, bool, `X | None`, `list[X]`,
    `dict[K, V]`, Any); an int is a float, a bool is no number."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        return any(fits(value, each) for each in arguments)
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if origin is list or kind is list:
        return isinstance(value, list) and all(fits(item, arguments[0]) for item in value if arguments)
    if origin is dict or kind is dict:
        return isinstance(value, dict) and (not arguments or all(
            fits(key, arguments[0]) and fits(item, arguments[1]) for key, item in value.items()))
    return isinstance(value, kind)


def type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) and not typing.get_args(kind) else str(kind)


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
    progress_type: type[Progress],
    allow_objective_change: bool = False,
) -> Resumed[Progress] | None:
    """Restore `--resume_from_checkpoint`: weights, optimizer, RNG, the learning-rate schedule, the stream position.

    Returns the checkpoint and its progress (a `progress_type`), or None to start from scratch ("latest" with no
    checkpoint yet included). Call it before the run writes any record: a resume that is refused leaves the output
    folder as it was.
    """
    path = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)
    if path is None:
        claim_output_dir(accelerator, output_dir, None)
        if resume_from_checkpoint:
            logger.info("no checkpoint in %s yet: starting from scratch", output_dir)
        return None
    resumed = load_checkpoint(accelerator, path, resumable, progress_type, allow_objective_change)
    claim_output_dir(accelerator, output_dir, path)
    return resumed


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
    # The folders compared, not the checkpoint itself: a step_N of output_dir linked elsewhere is still one of its own.
    if resumed is None or os.path.realpath(resumed.parent) != os.path.realpath(output_dir):
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
