"""MAE pretraining (He et al., 2021) with Accelerate, from one CPU to DeepSpeed ZeRO clusters.

    accelerate launch run_scripts/run_mae.py                       # small MAE on the embedded sample, on CPU
    accelerate launch --config_file configuration/accelerate/multi_gpu.yaml run_scripts/run_mae.py \\
        --config configuration/pretrain/mae_vit_base_800ep.yaml --dataset_name ILSVRC/imagenet-1k

Every flag is in `modeling_mae.arguments` / `modeling_mae.data.DataArguments`; `--config FILE.yaml` sets defaults
that the other flags override. See docs/training.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from modeling_mae import MAEConfig, MAEForPreTraining, build_image_processor
from modeling_mae.arguments import (
    DEFAULT_MODEL_CONFIG,
    RUN_CONFIG_FILE,
    OptimizationArguments,
    PretrainModelArguments,
    RunArguments,
    arguments_to_dict,
    load_model_config,
    parse_arguments,
    save_resolved_config,
    without_secrets,
)
from modeling_mae.data.sources import DataArguments, resolve_split_name
from modeling_mae.data.loader import ImageStreamLoader, build_dataloader
from modeling_mae.data.transforms import eval_transform, pretrain_transform
from modeling_mae.errors import exit_process, run_main
from modeling_mae.interop.hub import HubUploader, build_uploader, export_model
from modeling_mae.interop.model_card import pretraining_card, write_model_card
from modeling_mae.training.accelerator import (
    BatchLayout,
    batch_layout,
    build_accelerator,
    fill_deepspeed_config,
    iterate_in_lockstep,
    move_to_device,
    seeded_generator,
)
from modeling_mae.training.progress import (
    LossWindow,
    NonFiniteLossError,
    NonFiniteLossGuard,
    ProgressBar,
    Throughput,
    TrainingProgress,
    configure_logging,
    loss_is_finite_everywhere,
    print_outputs,
    progress_bar,
    tracker_values,
)
from modeling_mae.training.checkpoints import (
    Resumable,
    newest_checkpoint_before,
    reporting_full_disk,
    resume_training,
    save_checkpoint,
    write_json,
)
from modeling_mae.training.optimization import (
    TrainingPlan,
    build_optimizer,
    build_scheduler,
    plan_training,
    scaled_learning_rate,
)
from modeling_mae.evaluation.visualization import log_figure, reconstruction_figure

logger = logging.getLogger("run_mae")

FIGURE_FILE = "reconstruction.png"
FIGURE_IMAGES = 8
RESULTS_FILE = "all_results.json"
LOG_HISTORY_FILE = "log_history.json"  # every logging step's loss and applied learning rate


@dataclass
class Arguments:
    model: PretrainModelArguments
    data: DataArguments
    optim: OptimizationArguments
    run: RunArguments

    def resolved(self) -> dict[str, Any]:
        return arguments_to_dict(self.model, self.data, self.optim, self.run)


@dataclass
class Trainer:
    """What the loop works on, built once by `setup`."""

    args: Arguments
    accelerator: Accelerator
    config: MAEConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: ImageStreamLoader
    eval_loader: ImageStreamLoader | None
    figure_batch: torch.Tensor
    plan: TrainingPlan
    learning_rate: float
    uploader: HubUploader | None
    layout: BatchLayout
    validation_losses: dict[int, float] = field(default_factory=dict)  # by optimizer step

    @property
    def output_dir(self) -> pathlib.Path:
        return pathlib.Path(self.args.run.output_dir)

    @property
    def micro_batches_per_epoch(self) -> int | None:
        """Batches an epoch uses on each process (None for a stream of unknown length: all of them)."""
        steps = self.plan.steps_per_epoch
        return steps * self.args.optim.gradient_accumulation_steps if steps else None

    @property
    def unwrapped(self) -> MAEForPreTraining:
        return self.accelerator.unwrap_model(self.model)

    @property
    def resumable(self) -> Resumable:
        return Resumable(self.scheduler, self.train_loader, self.layout)


# ------------------------------------------------------------------------------------------------------------- builders


def model_source(model_args: PretrainModelArguments) -> str:
    return model_args.model_config or model_args.model_name_or_path or DEFAULT_MODEL_CONFIG


def build_config(model_args: PretrainModelArguments) -> MAEConfig:
    """`--model_config` (else the config of `--model_name_or_path`, else tiny-32px) + overrides; the dedicated
    `--mask_ratio`/`--norm_pix_loss` flags win over `--config_overrides`."""
    flags = {name: getattr(model_args, name) for name in ("mask_ratio", "norm_pix_loss")}
    given = {name: value for name, value in flags.items() if value is not None}
    return load_model_config(model_source(model_args), model_args.config_overrides, **given)


def build_model(args: Arguments, config: MAEConfig) -> MAEForPreTraining:
    attention = {"attn_implementation": args.model.attn_implementation} if args.model.attn_implementation else {}
    if args.model.model_name_or_path:
        model = MAEForPreTraining.from_pretrained(args.model.model_name_or_path, config=config, **attention)
    else:
        model = MAEForPreTraining._from_config(config, **attention)
    if args.optim.gradient_checkpointing:
        # The name of newer transformers (5.24 here), which warns on the old one (gone in v6); 5.17 has only the old.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if args.optim.torch_compile:
        # in place: parameter names (checkpoints, export) stay those of the plain model
        model.compile(mode=args.optim.torch_compile_mode)
    return model


def build_dataloaders(
    args: Arguments, config: MAEConfig, accelerator: Accelerator
) -> tuple[ImageStreamLoader, ImageStreamLoader | None, torch.Tensor]:
    """Train and (when the data has one) validation loaders of this process, and a fixed batch for the figures."""
    shard = {
        "seed": args.run.seed,
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
    }
    unlabelled = {"labels": False, "min_image_size": max(config.patch_size)}  # pretraining never reads the labels
    train_loader = build_dataloader(
        args.data,
        "train",
        pretrain_transform(config.image_size),
        args.optim.per_device_train_batch_size,
        train=True,
        **shard,
        **unlabelled,
    )
    has_validation = resolve_split_name(args.data, "validation") is not None
    eval_loader = (
        build_dataloader(
            args.data,
            "validation",
            eval_transform(config.image_size),
            args.optim.per_device_eval_batch_size,
            train=False,
            **shard,
            **unlabelled,
        )
        if has_validation
        else None
    )
    # The same few images on every process (the figure's forward pass is a collective under DDP/ZeRO-3).
    figure_split = "validation" if has_validation else "train"
    figure_loader = build_dataloader(
        args.data, figure_split, eval_transform(config.image_size), FIGURE_IMAGES, train=False, **unlabelled
    )
    return train_loader, eval_loader, next(iter(figure_loader))["pixel_values"]


def setup(args: Arguments) -> Trainer:
    accelerator = build_accelerator(
        args.optim.gradient_accumulation_steps,
        args.run.output_dir,
        args.run.report_to if args.run.with_tracking else None,
    )
    configure_logging(accelerator, logger)
    layout = batch_layout(
        accelerator, args.optim.per_device_train_batch_size, args.optim.gradient_accumulation_steps
    )
    logger.info(
        "%d process(es) on %d machine(s), %s, device %s, mixed precision %s",
        layout.num_processes,
        layout.num_machines,
        accelerator.distributed_type,
        accelerator.device,
        accelerator.mixed_precision,
    )
    uploader = build_uploader(args.run, accelerator.is_main_process)  # a push that cannot work fails before training
    set_seed(args.run.seed)  # identical initial weights on every process
    config = build_config(args.model)
    model = build_model(args, config)
    set_seed(args.run.seed, device_specific=True)  # then different masks per process (the official seed + rank)
    train_loader, eval_loader, figure_batch = build_dataloaders(args, config, accelerator)
    plan = plan_training(
        len(train_loader) if train_loader.num_samples is not None else None,
        args.optim.gradient_accumulation_steps,
        args.optim.num_train_epochs,
        args.optim.max_train_steps,
        args.optim.warmup_epochs,
        args.optim.warmup_steps,
    )
    learning_rate = args.optim.learning_rate or scaled_learning_rate(
        args.optim.base_learning_rate, layout.effective_batch_size
    )
    optimizer = build_optimizer(
        model,
        learning_rate,
        args.optim.weight_decay,
        (args.optim.adam_beta1, args.optim.adam_beta2),
        args.optim.adam_epsilon,
    )
    fill_deepspeed_config(accelerator, args.optim.per_device_train_batch_size, args.optim.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared (Accelerate would step it once per process) nor registered with Accelerate (which would pickle
    # it): stepped once per optimizer step, its state saved in trainer_state.json.
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, learning_rate, args.optim.min_lr)
    logger.info(
        "%s, lr %.3g, %d steps (%s per epoch), %d warmup steps",
        layout.describe(),
        learning_rate,
        plan.total_steps,
        plan.steps_per_epoch,
        plan.warmup_steps,
    )
    return Trainer(
        args,
        accelerator,
        config,
        model,
        optimizer,
        scheduler,
        train_loader,
        eval_loader,
        figure_batch,
        plan,
        learning_rate,
        uploader,
        layout,
    )


# ------------------------------------------------------------------------------------------------------------- the loop


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
    with contextlib.closing(loop.bar):  # closed on an error too: the error stays the last line printed
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


def finish_epoch(trainer: Trainer, progress: TrainingProgress, losses: LossWindow) -> None:
    progress.epoch += 1
    progress.epoch_micro_batches = 0
    if trainer.args.run.eval_steps is None:
        log_validation(trainer, progress.completed_steps)
    if trainer.args.run.checkpoint_every_epoch():
        checkpoint(trainer, progress, losses)


# ------------------------------------------------------------------------------------------------ evaluation, figures


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


def save_figure(trainer: Trainer, step: int) -> pathlib.Path:
    """Figure 2 of the paper on the fixed figure batch: `reconstruction_step{N}.png` and `reconstruction.png`."""
    accelerator = trainer.accelerator
    generator = torch.Generator().manual_seed(trainer.args.run.seed)  # the same masks in every figure
    noise = torch.rand(trainer.figure_batch.shape[0], trainer.config.num_patches, generator=generator)
    processor = build_image_processor(trainer.config)
    figure = reconstruction_figure(
        trainer.model,
        trainer.unwrapped,
        trainer.figure_batch.to(accelerator.device),
        processor.image_mean,
        processor.image_std,
        noise.to(accelerator.device),
    )
    latest = trainer.output_dir / FIGURE_FILE
    if accelerator.is_main_process:
        figure.save(trainer.output_dir / f"reconstruction_step{step}.png")
        figure.save(latest)
        log_figure(accelerator, "reconstruction", figure, step)
    return latest


# ---------------------------------------------------------------------------------------------- checkpoints and export


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
    logger.info("step %d: saved %s", progress.completed_steps, path)
    if trainer.args.run.push_to_hub:
        with reporting_full_disk(trainer.output_dir, progress.completed_steps, "the model export for the Hub"):
            export(trainer, progress)
        if trainer.uploader is not None:
            trainer.uploader.upload_in_background(
                trainer.output_dir, f"Training in progress, step {progress.completed_steps}"
            )
    return path


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


def epochs_done(trainer: Trainer, progress: TrainingProgress) -> float:
    """Epochs trained so far, the current one counted by the fraction of its micro-batches consumed."""
    return progress.epoch + progress.epoch_micro_batches / (trainer.micro_batches_per_epoch or math.inf)


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
    )


def export(trainer: Trainer, progress: TrainingProgress, metrics: dict[str, Any] | None = None) -> None:
    """Write the `from_pretrained` folder (+ card, + results at the end) to output_dir; call on every process."""
    if trainer.uploader is not None:
        trainer.uploader.wait()  # its files are about to be rewritten
    export_model(trainer.accelerator, trainer.model, trainer.output_dir)
    if trainer.accelerator.is_main_process:
        write_model_card(trainer.output_dir, model_card(trainer, progress, metrics))
        if metrics is not None:
            write_json(trainer.output_dir / RESULTS_FILE, metrics)
            write_json(trainer.output_dir / LOG_HISTORY_FILE, {"log_history": progress.log_history})
    trainer.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------- main


def resume(trainer: Trainer) -> TrainingProgress:
    resumed = resume_training(
        trainer.accelerator, trainer.args.run.resume_from_checkpoint, trainer.output_dir, trainer.resumable
    )
    if resumed is None:
        return TrainingProgress()
    path, trainer_state = resumed
    progress = TrainingProgress(**trainer_state)
    logger.info("resumed from %s: step %d, epoch %d", path, progress.completed_steps, progress.epoch)
    return progress


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the pretraining; returns the results written to `output_dir/all_results.json`."""
    args = Arguments(
        *parse_arguments((PretrainModelArguments, DataArguments, OptimizationArguments, RunArguments), argv)
    )
    trainer = setup(args)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(args.resolved(), trainer.output_dir / RUN_CONFIG_FILE)
    accelerator.init_trackers(args.run.tracker_project_name, config=tracker_values(without_secrets(args.resolved())))
    progress = resume(trainer)
    start_time, start_samples = time.perf_counter(), progress.train_samples
    progress = train(trainer, progress)
    runtime = time.perf_counter() - start_time
    with reporting_full_disk(trainer.output_dir, progress.completed_steps, "the final model"):
        figure = save_figure(trainer, progress.completed_steps)
        metrics = results(trainer, progress, runtime, progress.train_samples - start_samples)
        export(trainer, progress, metrics=metrics)
    accelerator.end_training()
    print_outputs(accelerator, f"Done: {progress.completed_steps} steps, final loss {progress.last_loss}",
                  {"model": trainer.output_dir, "reconstruction": figure, "results": trainer.output_dir / RESULTS_FILE})
    if trainer.uploader is not None:  # last: a push that fails for good raises once everything is saved locally
        trainer.uploader.upload(trainer.output_dir, "End of training")
    return metrics


if __name__ == "__main__":
    exit_process(run_main(main))
