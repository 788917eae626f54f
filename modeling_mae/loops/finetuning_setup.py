"""What `run_scripts/run_finetune.py` runs: the classifier, loaders, MixUp/CutMix, layer-decayed AdamW and schedule
built (`setup`), the loop of `loops.finetuning`, then the export with its model card and results (`finetune`).
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..arguments import (
    DEFAULT_MODEL_CONFIG,
    RUN_CONFIG_FILE,
    arguments_to_dict,
    load_model_config,
    save_resolved_config,
)
from ..configuration_mae import MAEConfig, load_config, parse_overrides
from ..data.loader import ImageStreamLoader
from ..data.transforms import eval_transform, finetune_transform, mixup_cutmix
from ..errors import UsageError
from ..evaluation.arguments import recipe_regime
from ..evaluation.layer_decay import FINETUNE_NO_WEIGHT_DECAY, layer_decay_lr_scale_fn
from ..evaluation.metrics import ClassificationMetric
from ..evaluation.models import (
    describe_model,
    load_pretrained,
    resize_model_resolution,
)
from ..evaluation.results import save_results, split_loader, summarize
from ..interop.hub import build_uploader, export_model
from ..interop.model_card import finetuning_card, write_model_card
from ..modeling_mae import MAEForImageClassification
from ..text import counted
from ..training.accelerator import (
    batch_layout,
    build_accelerator,
)
from ..training.checkpoints import reporting_full_disk
from ..training.optimization import (
    build_optimizer,
    build_scheduler,
    plan_training,
    scaled_learning_rate,
)
from ..training.output_lock import holding_output_dir
from ..training.progress import configure_logging, print_outputs
from ..training.run_identity import run_identity
from .finetuning import (
    Arguments,
    FinetuneModelArguments,
    FinetuneProgress,
    Loop,
    best_accuracy,
    resume,
    train,
)
from .image_statistics import image_statistics, pixel_normalisation, statistics_of


def build_classifier(
    model_args: FinetuneModelArguments, class_names: list[str], statistics: dict[str, Any]
) -> MAEForImageClassification:
    """The classifier from pretrained weights (its decoder is dropped, the head is new) or from a random init, with
    the image statistics its loaders normalise with."""
    overrides = {**parse_overrides(model_args.config_overrides), "drop_path_rate": model_args.drop_path_rate,
                 "use_mean_pooling": model_args.global_pool, **statistics}
    # Single-label, said explicitly: MixUp/CutMix targets are float, which transformers' rule takes for multi-label.
    labels = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
              "label2id": {name: index for index, name in enumerate(class_names)},
              "problem_type": "single_label_classification"}
    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        model = load_pretrained(  # the new head is on purpose: one line, not transformers' report table
            MAEForImageClassification, model_args.model_name_or_path, ignore_mismatched_sizes=True, **overrides,
            **labels, **attention,
        )
    else:
        config = load_config(model_args.model_config or DEFAULT_MODEL_CONFIG, overrides)
        config.update(labels)
        model = MAEForImageClassification._from_config(config, **attention)
    if model_args.image_size is not None:
        resize_model_resolution(model, (model_args.image_size, model_args.image_size))
    model.mae.embeddings.position_embeddings.requires_grad_(model_args.train_position_embeddings)
    return model


def source_config(args: Arguments) -> MAEConfig:
    """The config fine-tuning starts from, with the image statistics of this run (`image_statistics`) written in."""
    model_args = args.model
    config = load_model_config(model_args.model_name_or_path or model_args.model_config or DEFAULT_MODEL_CONFIG,
                               model_args.config_overrides)  # a wrong --config_overrides fails here
    config.update(image_statistics(model_args, args.data, config))
    return config


def build_loaders(
    args: Arguments, accelerator: Accelerator, config: MAEConfig
) -> tuple[ImageStreamLoader, ImageStreamLoader]:
    """This process's train and validation loaders at the fine-tuning resolution.

    They come before the classifier (it needs the class names), so the resolution is read off `source_config`.
    """
    model_args, optim, augment = args.model, args.optim, args.augment
    image_size = (model_args.image_size,) * 2 if model_args.image_size else config.image_size
    patch, num_labels, normalisation = max(config.patch_size), model_args.num_labels, pixel_normalisation(config)
    transform = finetune_transform(image_size, **normalisation, crop_scale=(augment.crop_min_scale, 1.0),
                                   rand_augment=augment.rand_augment, erasing=augment.random_erasing)
    train_loader = split_loader(accelerator, args.data, "train", transform,
                                optim.per_device_train_batch_size, train=True, seed=args.run.seed,
                                num_classes=num_labels, min_image_size=patch)
    eval_loader = split_loader(accelerator, args.data, "validation", eval_transform(image_size, **normalisation),
                               optim.per_device_eval_batch_size, train=False, num_classes=num_labels,
                               min_image_size=patch)
    accelerator.print(recipe_regime(max(image_size), train_loader.num_samples, augment))
    return train_loader, eval_loader


def build_finetune_optimizer(
    args: Arguments, model: MAEForImageClassification, learning_rate: float
) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay, no weight decay on biases, norms, the CLS token and the position table."""
    optim = args.optim
    return build_optimizer(
        model, learning_rate, optim.weight_decay, (optim.adam_beta1, optim.adam_beta2), optim.adam_epsilon,
        lr_scale_fn=layer_decay_lr_scale_fn(model.config.num_hidden_layers, args.model.layer_decay),
        no_weight_decay=FINETUNE_NO_WEIGHT_DECAY,
    )


def start_accelerator(args: Arguments) -> Accelerator:
    """The run's Accelerator, its logging set up (before anything else: the output folder's lock may warn)."""
    accelerator = build_accelerator(args.optim.gradient_accumulation_steps, args.run.output_dir,
                                    args.run.report_to if args.run.with_tracking else None)
    configure_logging(accelerator)
    return accelerator


def setup(args: Arguments, accelerator: Accelerator | None = None) -> Loop:
    """Everything the loop works on: accelerator, metric, uploader, loaders, classifier, MixUp/CutMix, optimizer,
    schedule."""
    optim, run = args.optim, args.run
    accelerator = accelerator or start_accelerator(args)
    metric = ClassificationMetric(accelerator, args.metric.metric)  # a wrong --metric fails now, not after hours
    uploader = build_uploader(run, accelerator.is_main_process)  # a push that cannot work fails before training
    set_seed(run.seed)  # identical weights on every process
    config = source_config(args)
    train_loader, eval_loader = build_loaders(args, accelerator, config)
    class_names = resolve_class_names(train_loader, args.model.num_labels)
    model = build_classifier(args.model, class_names, statistics_of(config))
    identity = run_identity(model.config, args.data, train_loader.split)
    set_seed(run.seed, device_specific=True)  # then different augmentations per process
    mixer = mixup_cutmix(len(class_names), args.augment.mixup, args.augment.cutmix, args.augment.label_smoothing)
    plan = plan_training(len(train_loader), optim.gradient_accumulation_steps, optim.num_train_epochs,
                         optim.max_train_steps, optim.warmup_epochs, optim.warmup_steps)
    layout = batch_layout(accelerator, optim.per_device_train_batch_size, optim.gradient_accumulation_steps)
    learning_rate = optim.learning_rate or scaled_learning_rate(optim.base_learning_rate, layout.effective_batch_size)
    model, optimizer = accelerator.prepare(model, build_finetune_optimizer(args, model, learning_rate))
    # Not prepared (Accelerate would step it once per process) nor registered with Accelerate (which would pickle
    # it): its state is saved in trainer_state.json.
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, learning_rate, optim.min_lr)
    return Loop(accelerator, model, optimizer, scheduler, train_loader, mixer, plan, args, metric, layout,
                learning_rate, eval_loader, uploader, identity)


def resolve_class_names(loader: ImageStreamLoader, num_labels: int | None) -> list[str]:
    """The class names the classifier's id2label carries: a ClassLabel's names, or the string labels sorted; integer
    labels need --num_labels."""
    if loader.class_names is not None:
        return list(loader.class_names)
    if num_labels is None:
        raise UsageError("the labels are integers without class names (no ClassLabel feature): pass --num_labels")
    return [str(index) for index in range(num_labels)]


def model_card(
    args: Arguments, model: MAEForImageClassification, metrics: dict[str, Any], repo_id: str | None
) -> str:
    """The classifier's card (`model_card.finetuning_card`) from what the run knows; `repo_id`: where it is pushed."""
    return finetuning_card(
        model.config,
        model_name_or_path=args.model.model_name_or_path,
        model_config=args.model.model_config,
        seed=args.run.seed,
        dataset_name=args.data.dataset_name,
        layer_decay=args.model.layer_decay,
        mixup=args.augment.mixup,
        cutmix=args.augment.cutmix,
        label_smoothing=args.augment.label_smoothing,
        results=metrics,
        repo_id=repo_id,
    )


def finetune(args: Arguments) -> dict[str, Any]:
    """Fine-tune and evaluate; returns the metrics written to `output_dir/all_results.json`."""
    start = time.perf_counter()
    accelerator, run = start_accelerator(args), args.run
    with holding_output_dir(accelerator, run.output_dir):  # one run at a time; checked writable before building
        loop = setup(args, accelerator)
        progress = resume(loop)  # checked before this run writes any record
        if accelerator.is_main_process:
            save_resolved_config(arguments_to_dict(args.model, args.data, args.augment, args.optim, run, args.metric),
                                 pathlib.Path(run.output_dir) / RUN_CONFIG_FILE)
        accelerator.init_trackers(run.tracker_project_name)  # a no-op without --with_tracking
        with loop.stop_signals.catching(run.saves_on_signal()):
            progress = train(loop, progress)
        return finish(loop, progress, start)


def finish(loop: Loop, progress: FinetuneProgress, start: float) -> dict[str, Any]:
    """The results, the export with its model card, then the push; returns the results."""
    args, accelerator, model = loop.args, loop.accelerator, loop.model
    run, history = args.run, progress.history
    metrics: dict[str, Any] = {
        **{key: value for key, value in history[-1].items() if key.startswith("eval_")},
        **best_accuracy(history),
        "train_loss": history[-1]["train_loss"],
        "train_steps": progress.completed_steps,
        "train_epochs": len(history),
        "learning_rate": loop.learning_rate,
        "effective_batch_size": loop.layout.effective_batch_size,
        "model": describe_model(args.model.model_name_or_path, args.model.model_config, run.seed),
        "seed": run.seed,
        "num_processes": accelerator.num_processes,
        "train_runtime": time.perf_counter() - start,
        "history": history,
        **({"objective_changes": progress.objective_changes} if progress.objective_changes else {}),
    }
    with reporting_full_disk(pathlib.Path(run.output_dir), progress.completed_steps, "the fine-tuned model"):
        export_model(accelerator, model, run.output_dir)
        results = save_results(accelerator, run.output_dir, metrics)
        if accelerator.is_main_process:
            card_metrics = {key: value for key, value in metrics.items()
                            if key not in ("history", "objective_changes")}
            repo_id = loop.uploader.repo_id if loop.uploader is not None else run.hub_model_id
            write_model_card(run.output_dir, model_card(args, accelerator.unwrap_model(model), card_metrics, repo_id))
        accelerator.wait_for_everyone()
    accelerator.end_training()
    print_outputs(accelerator, f"Done: fine-tuning, {counted(len(history), 'epoch')}, {summarize(metrics)}",
                  {"model": run.output_dir, "results": results})
    if loop.uploader is not None:  # last: a push that fails for good raises once everything is saved locally
        loop.uploader.upload(run.output_dir, "End of fine-tuning")
    return metrics
