"""The fine-tuning loop (the paper's appendix A.1), on a `Loop` that `run_scripts/run_finetune.py` builds, and the
flags only fine-tuning has.

Each epoch: whole optimizer steps of MixUp/CutMix-mixed batches (the global RNG seeded from the micro-batch's place
in the run, so that a resumed run draws what an uninterrupted one draws), then top-1/top-5 on the validation split,
each sample counted once whatever the number of processes; checkpoints every --checkpointing_steps, and under
--save_on_signal one and the end of the run when some process got SIGTERM or SIGUSR1 (`training.preemption`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import pathlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from ..data.loader import ImageStreamLoader
from ..data.sources import DataArguments
from ..evaluation.arguments import (
    AugmentationArguments,
    FinetuneModelArguments,
    FinetuneOptimizationArguments,
    FinetuneRunArguments,
)
from ..evaluation.metrics import ClassificationMetric, MetricArguments
from ..interop.hub import HubUploader
from ..text import format_number
from ..training.accelerator import (
    BatchLayout,
    iterate_in_lockstep,
    move_to_device,
    seeded_generator,
)
from ..training.checkpoints import Resumable, save_checkpoint
from ..training.optimization import (
    TrainingPlan,
)
from ..training.preemption import StopSignals, stopped_by
from ..training.progress import progress_bar
from ..training.resume import noting_interruption, resume_training
from ..training.run_identity import RunIdentity, describe_changes

logger = logging.getLogger(__name__)

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Arguments:
    model: FinetuneModelArguments
    data: DataArguments
    augment: AugmentationArguments
    optim: FinetuneOptimizationArguments
    run: FinetuneRunArguments
    metric: MetricArguments


@torch.no_grad()
def evaluate(
    accelerator: Accelerator, model: torch.nn.Module, loader: ImageStreamLoader, metric: ClassificationMetric
) -> dict[str, float | int]:
    """`metric` (top-1/top-5 by default) on the validation split, each sample counted once whatever the number of
    processes."""
    model.eval()
    for batch, is_real in iterate_in_lockstep(accelerator, loader):  # the forward is a collective under ZeRO-3
        batch = move_to_device(batch, accelerator.device)
        metric.add_batch(model(batch["pixel_values"]).logits, batch["labels"], is_real)
    model.train()
    return metric.compute()


@dataclass
class FinetuneProgress:
    """Where the run stands: the trainer state of every checkpoint."""

    completed_steps: int = 0  # optimizer steps
    epoch: int = 0
    epoch_micro_batches: int = 0  # consumed in the current epoch, on each process
    epoch_loss_sum: float = 0.0  # of this process's micro-batch losses in the current epoch
    history: list[dict[str, float | int]] = field(default_factory=list)  # one entry per finished epoch
    # Resumes with --allow_objective_change: {"step", field: [old, new]} each
    objective_changes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Loop:
    """What the training loop works on."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: ImageStreamLoader
    mixer: Mixer
    plan: TrainingPlan
    args: Arguments
    metric: ClassificationMetric
    layout: BatchLayout
    learning_rate: float  # the peak, before layer decay
    eval_loader: ImageStreamLoader
    uploader: HubUploader | None  # None without --push_to_hub and on the other processes
    identity: RunIdentity  # what it trains, recorded in its checkpoints
    stop_signals: StopSignals = field(default_factory=StopSignals)  # --save_on_signal

    @property
    def resumable(self) -> Resumable:
        return Resumable(self.scheduler, self.train_loader, self.layout, self.identity)

    def epoch_budget(self, progress: FinetuneProgress) -> int:
        """Micro-batches left in this epoch: whole optimizer steps, never past the run's last step."""
        accumulation = self.args.optim.gradient_accumulation_steps
        per_epoch = (self.plan.steps_per_epoch or 0) * accumulation
        remaining_steps = self.plan.total_steps - progress.completed_steps
        return max(0, min(per_epoch - progress.epoch_micro_batches, remaining_steps * accumulation))


def seed_micro_batch(loop: Loop, progress: FinetuneProgress) -> None:
    # MixUp/CutMix and drop path draw from the global RNG, which other code (data loader iterators, evaluation) also
    # consumes: seeding it from the micro-batch's place in the run makes a resumed run draw what an uninterrupted one
    # draws (the per-image augmentations are already seeded from the stream position by the loader).
    run, accelerator = loop.args.run, loop.accelerator
    generator = seeded_generator(run.seed, accelerator.process_index, progress.epoch, progress.epoch_micro_batches)
    torch.manual_seed(generator.initial_seed())


def train_one_epoch(loop: Loop, progress: FinetuneProgress) -> None:
    """Train on the rest of the current epoch (whole optimizer steps), checkpointing every --checkpointing_steps."""
    accelerator, model, optim = loop.accelerator, loop.model, loop.args.optim
    interval = loop.args.run.checkpoint_interval()
    model.train()
    # islice, not a break: pulling one batch too many would move the saved stream position past the epoch's end.
    for batch in itertools.islice(loop.train_loader, loop.epoch_budget(progress)):
        seed_micro_batch(loop, progress)
        batch = move_to_device(batch, accelerator.device)
        with accelerator.accumulate(model):
            pixel_values, targets = loop.mixer(batch["pixel_values"], batch["labels"])
            loss = model(pixel_values, labels=targets).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and optim.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
            loop.optimizer.step()
            loop.optimizer.zero_grad(set_to_none=True)
        progress.epoch_loss_sum += loss.item()
        progress.epoch_micro_batches += 1
        if accelerator.sync_gradients:
            loop.scheduler.step()
            progress.completed_steps += 1
            if interval and progress.completed_steps % interval == 0:
                checkpoint(loop, progress)
            stop_if_signalled(loop, progress)


def finish_epoch(loop: Loop, progress: FinetuneProgress, eval_loader: ImageStreamLoader) -> None:
    """Evaluate, log and start the next epoch (checkpointing it with --checkpointing_steps epoch)."""
    train_loss = progress.epoch_loss_sum / max(progress.epoch_micro_batches, 1)
    scores = evaluate(loop.accelerator, loop.model, eval_loader, loop.metric)
    metrics = {"epoch": progress.epoch + 1, "train_loss": train_loss, **scores}
    progress.history.append(metrics)
    loop.accelerator.log({f"finetune/{key}": value for key, value in metrics.items()}, step=progress.completed_steps)
    values = ", ".join(f"{key} {format_number(value)}" for key, value in metrics.items() if key != "epoch")
    loop.accelerator.print(f"epoch {progress.epoch + 1}: {values}")
    progress.epoch, progress.epoch_micro_batches, progress.epoch_loss_sum = progress.epoch + 1, 0, 0.0
    if loop.args.run.checkpoint_every_epoch():
        checkpoint(loop, progress)


def checkpoint(loop: Loop, progress: FinetuneProgress) -> pathlib.Path:
    run = loop.args.run
    return save_checkpoint(loop.accelerator, run.output_dir, progress.completed_steps, asdict(progress),
                           loop.resumable, run.checkpoints_total_limit)


def stop_if_signalled(loop: Loop, progress: FinetuneProgress) -> None:
    """Under --save_on_signal, once some process got SIGTERM or SIGUSR1: every process saves a checkpoint here, then
    the run ends (`errors.StoppedBySignal`)."""
    received = loop.stop_signals.agreed(loop.accelerator)
    if received:
        raise stopped_by(received, progress.completed_steps, checkpoint(loop, progress))


def resume(loop: Loop) -> FinetuneProgress:
    """The progress of `--resume_from_checkpoint` (restored into the loop's objects), or a fresh one; an allowed
    change of the objective is recorded (`objective_changes` of the results)."""
    run = loop.args.run
    resumed = resume_training(loop.accelerator, run.resume_from_checkpoint, run.output_dir, loop.resumable,
                              FinetuneProgress, run.allow_objective_change)
    if resumed is None:
        return FinetuneProgress()
    progress = resumed.progress
    loop.accelerator.print(f"resumed from {resumed.checkpoint}: step {progress.completed_steps}, "
                           f"epoch {progress.epoch}")
    if resumed.objective_changes:
        progress.objective_changes.append({"step": progress.completed_steps, **resumed.objective_changes})
        logger.warning("--allow_objective_change: from step %d on, %s", progress.completed_steps,
                       describe_changes(resumed.objective_changes))
    return progress


def train(loop: Loop, progress: FinetuneProgress) -> FinetuneProgress:
    """Train from `progress` (a fresh one, or `resume`'s) to the last epoch."""
    bar = progress_bar(loop.plan.num_epochs, "fine-tuning", progress.epoch, "epoch",
                       enabled=loop.accelerator.is_local_main_process)
    # The bar is closed on an error too: the error stays the last line printed (Ctrl-C's: the step and how to resume).
    with contextlib.closing(bar), noting_interruption(loop.args.run.output_dir, lambda: progress.completed_steps):
        while progress.epoch < loop.plan.num_epochs:
            loop.train_loader.set_epoch(progress.epoch)  # keeps a stream position loaded for this epoch
            train_one_epoch(loop, progress)
            finish_epoch(loop, progress, loop.eval_loader)
            bar.update(1)
            stop_if_signalled(loop, progress)  # the evaluation may have taken long
    return progress


def best_accuracy(history: list[dict[str, float | int]]) -> dict[str, float]:
    """`best_eval_accuracy` over the epochs, when the metric reports an accuracy."""
    accuracies = [entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry]
    return {"best_eval_accuracy": max(accuracies)} if accuracies else {}
