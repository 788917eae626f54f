"""The MAE pretraining loop, on a `Trainer` that `run_scripts/run_mae.py` builds.

One optimizer step: for each micro-batch of the accumulation window, masking noise drawn from the micro-batch's
position in the run (`mask_noise`: distinct per process, the same again on resume), a forward pass that predicts the
masked patches only, and a backward pass unless the loss is non-finite on some process (`NonFiniteLossGuard`); then
clipping, the optimizer and the schedule (`optimizer_step`). After each step (`after_step`): the loss and learning
rate logged, then validation, the reconstruction figure and a checkpoint when due (`pretraining_outputs`), and under
`--save_on_signal` a checkpoint and the end of the run when some process got SIGTERM or SIGUSR1 (`preemption`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..training.accelerator import (
    move_to_device,
    seeded_generator,
)
from ..training.checkpoints import newest_checkpoint_before
from ..training.preemption import stopped_by
from ..training.progress import (
    LossWindow,
    NonFiniteLossError,
    NonFiniteLossGuard,
    ProgressBar,
    Throughput,
    TrainingProgress,
    loss_is_finite_everywhere,
    progress_bar,
)
from ..training.resume import noting_interruption, resume_training
from ..training.run_identity import describe_changes
from .pretraining_outputs import checkpoint, log_validation, save_figure
from .pretraining_state import Trainer, epochs_done

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Bookkeeping of one session of the loop (not checkpointed: rebuilt from `TrainingProgress` on resume)."""

    guard: NonFiniteLossGuard
    losses: LossWindow
    meter: Throughput
    bar: ProgressBar


def train(trainer: Trainer, progress: TrainingProgress) -> TrainingProgress:
    accelerator, total_steps = trainer.accelerator, trainer.plan.total_steps
    loop = LoopState(
        NonFiniteLossGuard(trainer.args.optim.max_consecutive_nonfinite, progress.nonfinite_losses),
        LossWindow(),
        Throughput(progress.train_samples),
        progress_bar(
            total_steps, "pretraining", progress.completed_steps, "step", enabled=accelerator.is_local_main_process
        ),
    )
    trainer.model.train()
    # The bar is closed on an error too: the error stays the last line printed (Ctrl-C's: the step and how to resume).
    with contextlib.closing(loop.bar), noting_interruption(trainer.output_dir, lambda: progress.completed_steps):
        while progress.completed_steps < total_steps:
            if train_epoch(trainer, progress, loop):
                finish_epoch(trainer, progress, loop.losses)
    loop.losses.flush(accelerator, progress)
    return progress


def train_epoch(trainer: Trainer, progress: TrainingProgress, loop: LoopState) -> bool:
    """Train on the rest of the current epoch, or until the last step of the run; returns whether the epoch ended."""
    accelerator, budget = trainer.accelerator, trainer.micro_batches_per_epoch
    trainer.train_loader.set_epoch(progress.epoch)
    poisoned = False  # the accumulation window saw a non-finite loss: its optimizer step is skipped
    for batch in trainer.train_loader:
        if budget is not None and progress.epoch_micro_batches >= budget:
            break  # a trailing partial accumulation is dropped, as in the official code
        poisoned |= not train_micro_batch(trainer, progress, batch, loop)
        if loop.guard.diverged:
            stop_diverged(trainer, progress, loop)
        if not accelerator.sync_gradients:
            continue
        learning_rate = trainer.optimizer.param_groups[0]["lr"]  # what this step applies; the scheduler moves it next
        if optimizer_step(trainer, skip=poisoned):
            loop.losses.end_step()
            trainer.scheduler.step()
            progress.completed_steps += 1
            loop.bar.update(1)
            after_step(trainer, progress, loop, learning_rate)
            stop_if_signalled(trainer, progress, loop)
        else:
            loop.losses.discard_step()
        poisoned = False
        if progress.completed_steps >= trainer.plan.total_steps:
            return budget is not None and progress.epoch_micro_batches >= budget  # the last step may end an epoch too
    return True


def train_micro_batch(trainer: Trainer, progress: TrainingProgress, batch: dict[str, Any], loop: LoopState) -> bool:
    """Forward and backward of one micro-batch (no backward when its loss is not finite on some process).

    Returns whether the loss was finite everywhere.
    """
    accelerator = trainer.accelerator
    pixel_values = move_to_device(batch, accelerator.device)["pixel_values"]
    with accelerator.accumulate(trainer.model):
        noise = mask_noise(trainer, progress, pixel_values.shape[0])
        loss = trainer.model(pixel_values, noise=noise, logits_to_keep="masked").loss  # the loss's patches only
        finite = loop.guard.update(loss_is_finite_everywhere(accelerator, loss), progress.completed_steps)
        if finite:
            accelerator.backward(loss)
            loop.losses.add_micro_batch(loss.item())
    progress.epoch_micro_batches += 1
    progress.train_samples += pixel_values.shape[0] * accelerator.num_processes
    progress.nonfinite_losses = loop.guard.total
    return finite


def mask_noise(trainer: Trainer, progress: TrainingProgress, batch_size: int) -> torch.Tensor:
    """The masking noise of this micro-batch, from its position in the run (exact on resume), distinct per process."""
    accelerator = trainer.accelerator
    generator = seeded_generator(
        trainer.args.run.seed,
        accelerator.process_index,
        progress.epoch,
        progress.epoch_micro_batches,
        device=accelerator.device,
    )
    return torch.rand(batch_size, trainer.config.num_patches, generator=generator, device=accelerator.device)


def optimizer_step(trainer: Trainer, skip: bool) -> bool:
    """Clip and step, or throw the window's gradients away when it saw a non-finite loss. Returns whether it stepped."""
    if skip:
        trainer.optimizer.zero_grad(set_to_none=True)
        return False
    if trainer.args.optim.max_grad_norm is not None:
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.optim.max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return True


def after_step(trainer: Trainer, progress: TrainingProgress, loop: LoopState, lr: float) -> None:
    """Logging, validation, figures and checkpoints due after optimizer step `progress.completed_steps`, which
    applied the learning rate `lr`."""
    step, run = progress.completed_steps, trainer.args.run
    if step % run.logging_steps == 0:
        loss = loop.losses.flush(trainer.accelerator, progress)
        progress.log_history.append(
            {"step": step, "epoch": round(epochs_done(trainer, progress), 4), "loss": loss, "learning_rate": lr}
        )
        images_per_second = loop.meter.rate(progress.train_samples)
        loop.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}")
        trainer.accelerator.log(
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/images_per_second": images_per_second,
                "train/nonfinite_losses": progress.nonfinite_losses,
            },
            step=step,
        )
    if run.eval_steps and step % run.eval_steps == 0:
        log_validation(trainer, step)
    if run.log_images_steps and step % run.log_images_steps == 0:
        save_figure(trainer, step)
    interval = run.checkpoint_interval()
    if interval and step % interval == 0:
        checkpoint(trainer, progress, loop.losses)


def stop_if_signalled(trainer: Trainer, progress: TrainingProgress, loop: LoopState) -> None:
    """Under --save_on_signal, once some process got SIGTERM or SIGUSR1: every process saves this step's checkpoint,
    then the run ends (`errors.StoppedBySignal`)."""
    received = trainer.stop_signals.agreed(trainer.accelerator)
    if received:
        path = checkpoint(trainer, progress, loop.losses)
        raise stopped_by(received, progress.completed_steps, path)


def finish_epoch(trainer: Trainer, progress: TrainingProgress, losses: LossWindow) -> None:
    progress.epoch += 1
    progress.epoch_micro_batches = 0
    if trainer.args.run.eval_steps is None:
        log_validation(trainer, progress.completed_steps)
    if trainer.args.run.checkpoint_every_epoch():
        checkpoint(trainer, progress, losses)


def stop_diverged(trainer: Trainer, progress: TrainingProgress, loop: LoopState) -> None:
    """Stop, naming the newest checkpoint saved before the streak began: the weights of the step the streak began at
    already give non-finite losses, so that step's checkpoint (or any later one) would diverge again."""
    start = loop.guard.streak_start_step
    good = newest_checkpoint_before(trainer.output_dir, start)
    resume = (
        f"resume from {good}, the newest checkpoint saved before it (--resume_from_checkpoint {good}), with"
        if good is not None
        else f"no checkpoint was saved before step {start} (--checkpointing_steps N keeps some): start again with"
    )
    raise NonFiniteLossError(
        f"{loop.guard.consecutive} consecutive micro-batches had a non-finite loss ({loop.guard.total} in total) from "
        f"step {start} on: training diverged. {resume[0].upper()}{resume[1:]} a lower learning rate "
        "(--base_learning_rate or --learning_rate), a longer warmup (--warmup_epochs), gradient clipping "
        "(--max_grad_norm) or bf16 instead of fp16."
    )


def resume(trainer: Trainer) -> TrainingProgress:
    """The progress of `--resume_from_checkpoint` (restored into the trainer), or a fresh one; an allowed change of
    the objective is logged in the run's history."""
    run = trainer.args.run
    resumed = resume_training(trainer.accelerator, run.resume_from_checkpoint, trainer.output_dir, trainer.resumable,
                              TrainingProgress, run.allow_objective_change)
    if resumed is None:
        return TrainingProgress()
    progress = resumed.progress
    logger.info("resumed from %s: step %d, epoch %d", resumed.checkpoint, progress.completed_steps, progress.epoch)
    if resumed.objective_changes:
        progress.log_history.append({"step": progress.completed_steps, "objective_change": resumed.objective_changes})
        logger.warning("--allow_objective_change: from step %d on, %s", progress.completed_steps,
                       describe_changes(resumed.objective_changes))
    return progress
