"""What `run_scripts/run_mae.py` runs: the output folder's lock taken, the accelerator, model, loaders, AdamW and
schedule built (`setup`, into a `Trainer`), the resume checked, the loop of `loops.pretraining`, then the figure,
results and export (`pretrain`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..arguments import (
    RUN_CONFIG_FILE,
    load_model_config,
    parse_display_channels,
    save_resolved_config,
    without_secrets,
)
from ..configuration_mae import MAEConfig
from ..data.loader import ImageStreamLoader, build_dataloader
from ..data.sources import resolve_split_name
from ..data.transforms import eval_transform, pretrain_transform
from ..evaluation.models import load_pretrained
from ..evaluation.visualization import display_bands
from ..interop.hub import build_uploader
from ..modeling_mae import MAEForPreTraining
from ..text import counted, format_number
from ..training.accelerator import (
    batch_layout,
    build_accelerator,
    fill_deepspeed_config,
)
from ..training.checkpoints import (
    reporting_full_disk,
)
from ..training.optimization import (
    build_optimizer,
    build_scheduler,
    plan_training,
    scaled_learning_rate,
)
from ..training.output_lock import holding_output_dir
from ..training.progress import (
    TrainingProgress,
    configure_logging,
    print_outputs,
    tracker_values,
)
from ..training.run_identity import run_identity
from .image_statistics import image_statistics, pixel_normalisation
from .pretraining import resume, train
from .pretraining_outputs import export, results, save_figure
from .pretraining_state import (
    FIGURE_IMAGES,
    RESULTS_FILE,
    Arguments,
    Trainer,
    model_source,
)

logger = logging.getLogger(__name__)


def build_config(args: Arguments) -> MAEConfig:
    """`--model_config` (else the config of `--model_name_or_path`, else tiny-32px) + overrides; the dedicated
    `--mask_ratio`/`--norm_pix_loss` flags win over `--config_overrides`; then the image statistics (which need the
    config's channel count) written in."""
    model_args = args.model
    flags = {name: getattr(model_args, name) for name in ("mask_ratio", "norm_pix_loss")}
    given = {name: value for name, value in flags.items() if value is not None}
    config = load_model_config(model_source(model_args), model_args.config_overrides, **given)
    statistics = image_statistics(model_args, args.data, config)
    return load_model_config(model_source(model_args), model_args.config_overrides, **given, **statistics)


def build_model(args: Arguments, config: MAEConfig) -> MAEForPreTraining:
    attention = {"attn_implementation": args.model.attn_implementation} if args.model.attn_implementation else {}
    if args.model.model_name_or_path:
        model = load_pretrained(MAEForPreTraining, args.model.model_name_or_path, config=config, **attention)
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
    normalisation = pixel_normalisation(config)
    evaluation = eval_transform(config.image_size, **normalisation)
    train_loader = build_dataloader(
        args.data,
        "train",
        pretrain_transform(config.image_size, **normalisation),
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
            evaluation,
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
        args.data, figure_split, evaluation, FIGURE_IMAGES, train=False, **unlabelled
    )
    return train_loader, eval_loader, next(iter(figure_loader))["pixel_values"]


def start_accelerator(args: Arguments) -> Accelerator:
    """The run's Accelerator, its logging set up (before anything else: the output folder's lock may warn)."""
    accelerator = build_accelerator(
        args.optim.gradient_accumulation_steps,
        args.run.output_dir,
        args.run.report_to if args.run.with_tracking else None,
    )
    configure_logging(accelerator, logger)
    return accelerator


def setup(args: Arguments, accelerator: Accelerator | None = None) -> Trainer:
    accelerator = accelerator or start_accelerator(args)
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
    config = build_config(args)
    display_bands(config.num_channels, parse_display_channels(args.run.display_channels))  # fails now, not at a figure
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
        "%s, lr %.3g, %s (%s per epoch), %s",
        layout.describe(),
        learning_rate,
        counted(plan.total_steps, "step"),
        plan.steps_per_epoch,
        counted(plan.warmup_steps, "warmup step"),
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
        run_identity(config, args.data, train_loader.split),
    )


def pretrain(args: Arguments) -> dict[str, Any]:
    """Run the pretraining; returns the results written to `output_dir/all_results.json`."""
    accelerator = start_accelerator(args)
    with holding_output_dir(accelerator, args.run.output_dir):  # one run at a time; checked writable before building
        trainer = setup(args, accelerator)
        progress = resume(trainer)  # checked before this run writes any record
        if accelerator.is_main_process:
            save_resolved_config(args.resolved(), trainer.output_dir / RUN_CONFIG_FILE)
        accelerator.init_trackers(args.run.tracker_project_name,
                                  config=tracker_values(without_secrets(args.resolved())))
        with trainer.stop_signals.catching(args.run.saves_on_signal()):
            start_time, start_samples = time.perf_counter(), progress.train_samples
            progress = train(trainer, progress)
            runtime = time.perf_counter() - start_time
        return finish(trainer, progress, runtime, progress.train_samples - start_samples)


def finish(trainer: Trainer, progress: TrainingProgress, runtime: float, session_samples: int) -> dict[str, Any]:
    """The final figure, results and export, then the push; returns the results."""
    accelerator = trainer.accelerator
    with reporting_full_disk(trainer.output_dir, progress.completed_steps, "the final model"):
        figure = save_figure(trainer, progress.completed_steps, periodic=False)
        metrics = results(trainer, progress, runtime, session_samples)
        export(trainer, progress, metrics=metrics)
    accelerator.end_training()
    done = f"Done: {counted(progress.completed_steps, 'step')}, final loss {format_number(progress.last_loss)}"
    print_outputs(accelerator, done,
                  {"model": trainer.output_dir, "reconstruction": figure, "results": trainer.output_dir / RESULTS_FILE})
    if trainer.uploader is not None:  # last: a push that fails for good raises once everything is saved locally
        trainer.uploader.upload(trainer.output_dir, "End of training")
    return metrics
