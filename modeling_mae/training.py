"""Training building blocks shared by the pretraining and fine-tuning scripts.

The recipe follows the official MAE code (facebookresearch/mae): AdamW with no weight decay on biases and 1-D
parameters, `lr = base_lr * effective_batch / 256`, a per-step linear warmup then a half-cycle cosine to `min_lr`.
State handling is built on Accelerate: `save_checkpoint` writes `accelerator.save_state` plus the training progress,
the learning-rate schedule, the batch layout (JSON) and each process's data-stream position into a staging folder that
is renamed to `step_{N}` only once complete; `load_checkpoint` loads nothing before every file of the folder passed
`checkpoint_files.check_checkpoint_files`, and only ever weights-only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import datasets
import huggingface_hub
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import (
    SAFE_WEIGHTS_NAME,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from .checkpoint_files import (
    UnusableFile,
    allowed_globals,
    check_checkpoint_files,
    disk_is_full,
    filesystem_of,
    weights_only_loading,
)
from .errors import UsageError

logger = logging.getLogger(__name__)

LR_REFERENCE_BATCH = 256  # the paper scales its base learning rate per 256 images
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"  # written last: its presence marks a complete checkpoint
SUPERSEDED_DIR = "superseded"  # the checkpoints of a run that a resume went back on (`claim_output_dir`)
PROCESS_STATE_NAME = "process_state_{}.json"
RNG_STATE_NAME = "random_states_{}.pkl"  # Accelerate's, one per process
LR_SCHEDULER_KEY = "lr_scheduler"  # trainer_state keys besides the caller's progress
BATCH_LAYOUT_KEY = "batch_layout"
TRAIN_LOADER_STATE = "train_loader"  # the process_state key of the training data-stream position

PROGRESS_LOG_SECONDS = 30.0  # away from a terminal, a progress line this often instead of one per refresh

# Learning-rate multiplier of a parameter from its name, e.g. layer-wise decay when fine-tuning.
LrScaleFn = Callable[[str, nn.Parameter], float]


# ----------------------------------------------------------------------------------------------- optimizer and schedule


def effective_batch_size(per_device_batch_size: int, gradient_accumulation_steps: int, num_processes: int) -> int:
    """Images per optimizer step, all processes and accumulated micro-batches included."""
    return per_device_batch_size * gradient_accumulation_steps * num_processes


def scaled_learning_rate(base_learning_rate: float, batch_size: int) -> float:
    """The linear scaling rule of the paper: `base_lr * batch / 256`."""
    return base_learning_rate * batch_size / LR_REFERENCE_BATCH


def uses_weight_decay(name: str, parameter: nn.Parameter, no_weight_decay: Iterable[str] = ()) -> bool:
    """Biases, norms and other 1-D parameters are not decayed (timm's `param_groups_weight_decay`), nor named ones."""
    skipped = set(no_weight_decay)
    return (
        parameter.ndim > 1 and not name.endswith(".bias") and name not in skipped and name.split(".")[-1] not in skipped
    )


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale_fn: LrScaleFn | None = None,
    no_weight_decay: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (weight decay, learning-rate scale).

    Each group carries `lr_scale` (1.0 without `lr_scale_fn`); `build_optimizer` turns it into the group's peak lr.
    """
    no_weight_decay = tuple(no_weight_decay)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue  # e.g. the fixed sin-cos position tables
        decay = weight_decay if uses_weight_decay(name, parameter, no_weight_decay) else 0.0
        scale = lr_scale_fn(name, parameter) if lr_scale_fn is not None else 1.0
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(parameter)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    lr_scale_fn: LrScaleFn | None = None,
    no_weight_decay: Iterable[str] = (),
) -> torch.optim.AdamW:
    """Fused AdamW over `build_param_groups`; each group's peak lr is `learning_rate * lr_scale`.

    Fused: one kernel updates every tensor (CPU and GPU), instead of torch's default of one launch per tensor
    group (foreach, GPU) or a Python loop over tensors (CPU)."""
    groups = build_param_groups(model, weight_decay, lr_scale_fn, no_weight_decay)
    for group in groups:
        group["lr"] = learning_rate * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)


@dataclass
class WarmupCosineSchedule:
    """Multiplier of the peak lr at an optimizer step: linear warmup from 0, then half-cycle cosine to `min_lr_ratio`.

    A callable object rather than a lambda, so that `LambdaLR.state_dict()` holds its fields (plain JSON) and a resume
    can tell whether the flags changed the schedule.
    """

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, peak_lr: float, min_lr: float = 0.0
) -> LambdaLR:
    """Per-optimizer-step `WarmupCosineSchedule`; step it only when an optimizer step really happened."""
    min_lr_ratio = min_lr / peak_lr if peak_lr > 0 else 0.0
    return LambdaLR(optimizer, WarmupCosineSchedule(warmup_steps, total_steps, min_lr_ratio))


def restore_scheduler(scheduler: LambdaLR, saved: Mapping[str, Any]) -> None:
    """Continue at the saved step of this run's schedule, warning when the flags changed it.

    The flags win, as in the official code (which recomputes the lr from its arguments at every step): resuming a
    diverged run with a lower --base_learning_rate must lower it. Unchanged flags give the uninterrupted run's lr.
    """
    current = scheduler.state_dict()
    if (saved["base_lrs"], saved["lr_lambdas"]) != (current["base_lrs"], current["lr_lambdas"]):
        logger.warning(
            "the learning-rate schedule differs from the checkpoint's (then: %s; now: %s): going on with this run's "
            "flags",
            _describe_schedule(saved),
            _describe_schedule(current),
        )
    step = saved["last_epoch"]
    lrs = [base_lr * schedule(step) for base_lr, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**current, "last_epoch": step, "_step_count": saved["_step_count"], "_last_lr": lrs})
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr


def _describe_schedule(state: Mapping[str, Any]) -> str:
    """`peak lr 0.0015, min_lr_ratio 0, total_steps 100, warmup_steps 10` (the first parameter group's)."""
    fields = sorted((state["lr_lambdas"][0] or {}).items())
    return ", ".join([f"peak lr {state['base_lrs'][0]:.3g}", *(f"{name} {value:g}" for name, value in fields)])


@dataclass(frozen=True)
class TrainingPlan:
    """How long the run is, in optimizer steps."""

    steps_per_epoch: int | None  # None for streams of unknown length
    total_steps: int
    num_epochs: int
    warmup_steps: int


def plan_training(
    batches_per_epoch: int | None,
    gradient_accumulation_steps: int,
    num_train_epochs: float,
    max_train_steps: int | None = None,
    warmup_epochs: float = 0.0,
    warmup_steps: int | None = None,
) -> TrainingPlan:
    """Resolve epochs/steps: `max_train_steps` wins over `num_train_epochs`, `warmup_steps` over `warmup_epochs`.

    An epoch holds `batches_per_epoch // gradient_accumulation_steps` optimizer steps (a trailing partial
    accumulation is dropped, as in the official code). Streams of unknown length need explicit step counts.
    """
    steps_per_epoch = None if batches_per_epoch is None else batches_per_epoch // gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"an epoch of {batches_per_epoch} batches is shorter than one optimizer step of "
            f"{gradient_accumulation_steps} micro-batches: lower the batch size or the accumulation"
        )
    if max_train_steps is None:
        if steps_per_epoch is None:
            raise ValueError("the training stream has no known length: set --max_train_steps")
        max_train_steps = math.ceil(num_train_epochs * steps_per_epoch)
    if warmup_steps is None:
        if steps_per_epoch is None and warmup_epochs > 0:
            raise ValueError("the training stream has no known length: set --warmup_steps instead of --warmup_epochs")
        warmup_steps = round(warmup_epochs * (steps_per_epoch or 0))
    num_epochs = math.ceil(max_train_steps / steps_per_epoch) if steps_per_epoch else 1
    return TrainingPlan(steps_per_epoch, max_train_steps, num_epochs, min(warmup_steps, max_train_steps))


# ---------------------------------------------------------------------------------------------------------- accelerator


def build_accelerator(
    gradient_accumulation_steps: int, project_dir: str | os.PathLike[str], log_with: str | list[str] | None = None
) -> Accelerator:
    """An Accelerator whose precision/distribution come from `accelerate config` / `accelerate launch` flags.

    The data loaders are not prepared by Accelerate (they shard by process themselves), so gradient accumulation
    counts micro-batches instead of watching for the end of a loader.
    """
    if not torch.accelerator.is_available():
        # Accelerate imports DeepSpeed whenever it is installed (to unwrap models and save them), and DeepSpeed warns
        # on every run that it fell back to the CPU: name the CPU, which is what it would pick anyway.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Without GPUs the default process-group backend of DeepSpeed's CPU accelerator is oneCCL; gloo ships with torch.
    # (Only for real multi-process runs: a backend makes Accelerate initialise a process group.)
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []
    return Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(project_dir), logging_dir=str(pathlib.Path(project_dir) / "runs")
        ),
        kwargs_handlers=handlers,
    )


def fill_deepspeed_config(accelerator: Accelerator, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed JSON's `"auto"` values Accelerate cannot infer without a prepared data loader.

    Accelerate would otherwise turn `"gradient_clipping": "auto"` into 1.0; the MAE recipe does not clip.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm or 0.0


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from integer keys, e.g. (seed, process, epoch, batch).

    Randomness drawn from it depends only on where the run stands, not on how much of the global RNG other code has
    consumed, so a resumed run draws exactly what the uninterrupted run drew (the masks of MAE).
    """
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def move_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch on `device` (the loaders are not prepared by Accelerate, so they stay on the CPU)."""
    return {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in batch.items()
    }


def configure_logging(accelerator: Accelerator, *loggers: logging.Logger) -> None:
    """INFO from the main process only, so that N processes do not print everything N times; the library's own
    loggers (`modeling_mae.*`) always included. Away from a terminal (a log file, a pipe), the progress bars of
    transformers, datasets and the Hub client are turned off: each refresh would be a line of the log."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING
    )
    for each in (logging.getLogger("modeling_mae"), *loggers):
        each.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not is_terminal():
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()


def print_outputs(accelerator: Accelerator, headline: str, outputs: Mapping[str, str | os.PathLike[str]]) -> None:
    """What a script ends with (main process): a headline, then where it wrote what, as absolute paths."""
    width = max(len(label) for label in outputs) + 1
    lines = [headline] + [f"  {label + ':':<{width}} {pathlib.Path(path).resolve()}" for label, path in outputs.items()]
    accelerator.print("\n".join(lines))


def tracker_values(values: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """A configuration as trackers take it (TensorBoard's hparams: scalars and strings only)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in values.items()}


# ------------------------------------------------------------------------------------------------------ loss safeguard


class NonFiniteLossError(UsageError):
    """Too many consecutive non-finite losses: the run diverged (one line: the message says how to go on)."""


class NonFiniteLossGuard:
    """Counts non-finite losses: the caller skips those micro-batches, and stops after `max_consecutive` in a row.

    Remembers the optimizer step at which the current streak began: the weights of that step already give non-finite
    losses, so only a checkpoint saved before it is a state to resume from.
    """

    def __init__(self, max_consecutive: int, total: int = 0) -> None:
        self.max_consecutive = max_consecutive
        self.total = total
        self.consecutive = 0
        self.streak_start_step = 0

    def update(self, finite: bool, step: int) -> bool:
        """Record one micro-batch of optimizer step `step` (steps completed before it); returns `finite`."""
        if finite:
            self.consecutive = 0
            return finite
        if self.consecutive == 0:
            self.streak_start_step = step
        self.total += 1
        self.consecutive += 1
        return finite

    @property
    def diverged(self) -> bool:
        return self.consecutive >= self.max_consecutive


def loss_is_finite_everywhere(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process: all of them must skip the same micro-batch, or DDP hangs."""
    non_finite = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        non_finite = accelerator.reduce(non_finite, reduction="sum")
    return non_finite.item() == 0


# ----------------------------------------------------------------------------------------------------------- progress


def is_terminal() -> bool:
    """Whether progress goes to a terminal (tqdm draws on stderr)."""
    return sys.stderr.isatty()


class ProgressBar(Protocol):
    """What the scripts use of a tqdm bar."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...


class LogProgress:
    """A progress bar as plain log lines: one every `interval` seconds and one at `close`.

    A tqdm bar redraws itself in place, which a log file records as one line per refresh."""

    def __init__(
        self, total: int | None, desc: str, initial: int = 0, unit: str = "it", interval: float = PROGRESS_LOG_SECONDS
    ) -> None:
        self.total, self.desc, self.n, self.unit, self.interval = total, desc, initial, unit, interval
        self.postfix: dict[str, Any] = {}
        self.start = self.last_line = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line >= self.interval:
            self.log()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        self.log()

    def log(self) -> None:
        self.last_line = time.monotonic()
        done = f"{self.n}/{self.total} {self.unit} ({self.n / self.total:.0%})" if self.total else f"{self.n} {self.unit}"
        elapsed = time.strftime("%H:%M:%S", time.gmtime(self.last_line - self.start))
        postfix = "".join(f", {key}={value}" for key, value in self.postfix.items())
        logger.info("%s: %s, %s elapsed%s", self.desc, done, elapsed, postfix)


def progress_bar(total: int | None, desc: str, initial: int = 0, unit: str = "it", enabled: bool = True) -> ProgressBar:
    """A tqdm bar on a terminal, `LogProgress` lines elsewhere (log lines need `configure_logging`); nothing when
    not `enabled` (e.g. on every process but the main one)."""
    if enabled and not is_terminal():
        return LogProgress(total, desc, initial, unit)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


class Throughput:
    """Images per second since the previous call."""

    def __init__(self, samples: int) -> None:
        self.samples, self.time = samples, time.perf_counter()

    def rate(self, samples: int) -> float:
        now = time.perf_counter()
        rate = (samples - self.samples) / max(now - self.time, 1e-9)
        self.samples, self.time = samples, now
        return rate


@dataclass
class TrainingProgress:
    """Where the run stands; saved in every checkpoint (identical on all processes)."""

    completed_steps: int = 0  # optimizer steps
    epoch: int = 0
    epoch_micro_batches: int = 0  # consumed in the current epoch, on each process
    train_samples: int = 0  # images seen by all processes
    nonfinite_losses: int = 0  # skipped micro-batches
    loss_sum: float = 0.0  # of the per-step losses averaged over processes
    loss_steps: int = 0
    last_loss: float | None = None  # mean over the last logging window
    # One entry per logging step ({"step", "epoch", "loss", "learning_rate"}), like transformers' Trainer
    # `log_history`: checkpointed, so a resumed run's history is the uninterrupted run's.
    log_history: list[dict[str, float | int]] = field(default_factory=list)

    @property
    def train_loss(self) -> float | None:
        return self.loss_sum / self.loss_steps if self.loss_steps else None


class LossWindow:
    """Per-step losses of this process since the last `flush`; `flush` averages them over processes."""

    def __init__(self) -> None:
        self.step_losses: list[float] = []
        self._micro_losses: list[float] = []

    def add_micro_batch(self, loss: float) -> None:
        self._micro_losses.append(loss)

    def end_step(self) -> None:
        if self._micro_losses:
            self.step_losses.append(sum(self._micro_losses) / len(self._micro_losses))
        self._micro_losses = []

    def discard_step(self) -> None:
        self._micro_losses = []

    def flush(self, accelerator: Accelerator, progress: TrainingProgress) -> float | None:
        """Add the window's process-averaged losses to `progress`; a collective, call it on every process."""
        totals = torch.tensor(
            [sum(self.step_losses), len(self.step_losses)], dtype=torch.float64, device=accelerator.device
        )
        totals = accelerator.reduce(totals, reduction="sum") if accelerator.num_processes > 1 else totals
        self.step_losses = []
        loss_sum, count = totals.tolist()
        if count == 0:
            return None
        steps = int(round(count / accelerator.num_processes))
        progress.loss_sum += loss_sum / accelerator.num_processes
        progress.loss_steps += steps
        progress.last_loss = loss_sum / count
        return progress.last_loss


def iterate_in_lockstep(
    accelerator: Accelerator, batches: Iterable[dict[str, Any]]
) -> Iterator[tuple[dict[str, Any], bool]]:
    """Yield `(batch, is_real)` until every process has run out of batches.

    Evaluation splits need not divide evenly across processes, but a DDP/ZeRO-3 forward is a collective: a process
    that is done re-yields its last batch with `is_real=False` (to be ignored) while the others finish.
    """
    iterator = iter(batches)
    last: dict[str, Any] | None = None
    while True:
        batch = next(iterator, None)
        has_batch = torch.tensor([float(batch is not None)], device=accelerator.device)
        if accelerator.num_processes > 1:
            has_batch = accelerator.reduce(has_batch, reduction="sum")
        if has_batch.item() == 0:
            return
        if batch is not None:
            last = batch
            yield batch, True
        elif last is not None:
            yield last, False
        else:
            raise RuntimeError("this process has no evaluation batch at all: use fewer processes or a larger split")


# -------------------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class BatchLayout:
    """How a run splits its effective batch. The data stream is split by process and the learning rate follows the
    effective batch, so a resume continues exactly only with the same processes, per-process batch and accumulation."""

    num_processes: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    num_machines: int = field(default=1, compare=False)  # recorded only: nothing depends on how processes spread

    @property
    def effective_batch_size(self) -> int:
        return effective_batch_size(self.per_device_batch_size, self.gradient_accumulation_steps, self.num_processes)

    def describe(self) -> str:
        return (
            f"{self.num_processes} process(es) x {self.per_device_batch_size} images x "
            f"{self.gradient_accumulation_steps} accumulation step(s) = effective batch {self.effective_batch_size}"
        )

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "effective_batch_size": self.effective_batch_size}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> BatchLayout:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})


def machine_count(num_processes: int, environ: Mapping[str, str] = os.environ) -> int:
    """Machines of the launch. Accelerate's state has no node count; the launchers say how many processes each machine
    runs (torchrun, hence `accelerate launch`: LOCAL_WORLD_SIZE; DeepSpeed's launcher: LOCAL_SIZE)."""
    per_machine = environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE")
    return math.ceil(num_processes / int(per_machine)) if per_machine else 1


def batch_layout(accelerator: Accelerator, per_device_batch_size: int, gradient_accumulation_steps: int) -> BatchLayout:
    return BatchLayout(
        accelerator.num_processes,
        per_device_batch_size,
        gradient_accumulation_steps,
        machine_count(accelerator.num_processes),
    )


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
