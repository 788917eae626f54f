"""What a pretraining run produces along the way and at the end: the validation loss (the same masks every time),
the reconstruction figure (the paper's Figure 2), checkpoints (and an export for the Hub with each, when pushing),
the results, and the `from_pretrained` export with its model card.
"""

from __future__ import annotations

import logging
import pathlib
from dataclasses import asdict
from typing import Any

import torch
from accelerate.utils import gather_object

from ..arguments import parse_display_channels
from ..evaluation.visualization import log_figure, reconstruction_figure
from ..interop.hub import export_model
from ..interop.model_card import pretraining_card, write_model_card
from ..training.accelerator import (
    iterate_in_lockstep,
)
from ..training.checkpoints import (
    reporting_full_disk,
    save_checkpoint,
    write_json,
)
from ..training.progress import (
    LossWindow,
    TrainingProgress,
)
from .pretraining_state import (
    FIGURE_FILE,
    LOG_HISTORY_FILE,
    RESULTS_FILE,
    Trainer,
    epochs_done,
    model_source,
)

logger = logging.getLogger(__name__)


@torch.no_grad()
def validation_loss(trainer: Trainer) -> float | None:
    """Mean reconstruction loss on the validation split, with the same masks at every evaluation."""
    if trainer.eval_loader is None:
        return None
    accelerator = trainer.accelerator
    generator = torch.Generator().manual_seed(trainer.args.run.seed)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    trainer.model.eval()
    for batch, is_real in iterate_in_lockstep(accelerator, trainer.eval_loader):
        pixel_values = batch["pixel_values"]
        noise = torch.rand(pixel_values.shape[0], trainer.config.num_patches, generator=generator)
        pixel_values, noise = pixel_values.to(accelerator.device), noise.to(accelerator.device)
        loss = trainer.model(pixel_values, noise=noise, logits_to_keep="masked").loss
        if is_real:
            totals += torch.stack(
                [
                    loss.double() * pixel_values.shape[0],
                    torch.tensor(float(pixel_values.shape[0]), dtype=torch.float64, device=accelerator.device),
                ]
            )
    trainer.model.train()
    totals = accelerator.reduce(totals, reduction="sum") if accelerator.num_processes > 1 else totals
    return (totals[0] / totals[1]).item()


def log_validation(trainer: Trainer, step: int) -> float | None:
    if step in trainer.validation_losses:
        return trainer.validation_losses[step]
    loss = validation_loss(trainer)
    if loss is not None:
        trainer.validation_losses[step] = loss
        logger.info("step %d: validation loss %.4f", step, loss)
        trainer.accelerator.log({"eval/loss": loss}, step=step)
    return loss


def save_figure(trainer: Trainer, step: int, periodic: bool = True) -> pathlib.Path:
    """Figure 2 of the paper on the fixed figure batch: `reconstruction.png`, and `reconstruction_step{N}.png` when
    `periodic` (--log_images_steps; not the end-of-run figure, which would only copy reconstruction.png). The same
    picture goes to the trackers: `--display_channels` of images of more than 3 channels, un-normalised with the
    config's statistics."""
    accelerator = trainer.accelerator
    generator = torch.Generator().manual_seed(trainer.args.run.seed)  # the same masks in every figure
    noise = torch.rand(trainer.figure_batch.shape[0], trainer.config.num_patches, generator=generator)
    figure = reconstruction_figure(
        trainer.model,
        trainer.unwrapped,
        trainer.figure_batch.to(accelerator.device),
        trainer.config.image_mean,
        trainer.config.image_std,
        noise.to(accelerator.device),
        parse_display_channels(trainer.args.run.display_channels),
    )
    latest = trainer.output_dir / FIGURE_FILE
    if accelerator.is_main_process:
        if periodic:
            figure.save(trainer.output_dir / f"reconstruction_step{step}.png")
        figure.save(latest)
        log_figure(accelerator, "reconstruction", figure, step)
    return latest


def checkpoint(trainer: Trainer, progress: TrainingProgress, losses: LossWindow) -> pathlib.Path:
    losses.flush(trainer.accelerator, progress)  # the saved loss statistics must include every step so far
    path = save_checkpoint(
        trainer.accelerator,
        trainer.output_dir,
        progress.completed_steps,
        asdict(progress),
        trainer.resumable,
        trainer.args.run.checkpoints_total_limit,
    )
    if trainer.args.run.push_to_hub:
        with reporting_full_disk(trainer.output_dir, progress.completed_steps, "the model export for the Hub"):
            export(trainer, progress)
        if trainer.uploader is not None:
            trainer.uploader.upload_in_background(
                trainer.output_dir, f"Training in progress, step {progress.completed_steps}"
            )
    return path


def results(trainer: Trainer, progress: TrainingProgress, runtime: float, session_samples: int) -> dict[str, Any]:
    skipped = torch.tensor([trainer.train_loader.skipped_images()], device=trainer.accelerator.device)
    skipped = trainer.accelerator.reduce(skipped, reduction="sum") if trainer.accelerator.num_processes > 1 else skipped
    return {
        "train_loss": progress.train_loss,
        "final_loss": progress.last_loss,
        "eval_loss": log_validation(trainer, progress.completed_steps),
        "train_steps": progress.completed_steps,
        "train_epochs": epochs_done(trainer, progress),
        "train_samples": progress.train_samples,
        "skipped_images": int(skipped.item()),
        "skipped_shards": len(set(gather_object(trainer.train_loader.skipped_shards()))),  # distinct, all processes
        "nonfinite_losses": progress.nonfinite_losses,
        "train_runtime": runtime,
        "train_samples_per_second": session_samples / max(runtime, 1e-9),
        "num_processes": trainer.accelerator.num_processes,
    }


def model_card(trainer: Trainer, progress: TrainingProgress, metrics: dict[str, Any] | None) -> str:
    """The export's card (`model_card.pretraining_card`) from what the run knows; `metrics` at the end only."""
    args = trainer.args
    return pretraining_card(
        trainer.config,
        model_source=model_source(args.model),
        dataset_name=args.data.dataset_name,
        train_split=args.data.train_split,
        images_per_epoch=trainer.train_loader.num_samples,
        optim=args.optim,
        learning_rate=trainer.learning_rate,
        plan=trainer.plan,
        completed_steps=progress.completed_steps,
        num_processes=trainer.accelerator.num_processes,
        mixed_precision=trainer.accelerator.mixed_precision,
        results=metrics or {"final_loss": progress.last_loss, "train_loss": progress.train_loss},
        final=metrics is not None,
        figures=[FIGURE_FILE] if (trainer.output_dir / FIGURE_FILE).is_file() else [],
        repo_id=trainer.uploader.repo_id if trainer.uploader is not None else args.run.hub_model_id,
    )


def export(trainer: Trainer, progress: TrainingProgress, metrics: dict[str, Any] | None = None) -> None:
    """Write the `from_pretrained` folder (+ card, + results at the end) to output_dir; call on every process."""
    export_model(trainer.accelerator, trainer.model, trainer.output_dir)
    if trainer.accelerator.is_main_process:
        write_model_card(trainer.output_dir, model_card(trainer, progress, metrics))
        if metrics is not None:
            write_json(trainer.output_dir / RESULTS_FILE, metrics)
            write_json(trainer.output_dir / LOG_HISTORY_FILE, {"log_history": progress.log_history})
    trainer.accelerator.wait_for_everyone()
