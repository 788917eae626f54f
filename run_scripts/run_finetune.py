"""End-to-end fine-tuning of an MAE encoder for image classification, with the paper's recipe (appendix A.1).

    accelerate launch run_scripts/run_finetune.py --model_name_or_path outputs/mae-pretrain   # the embedded sample
    accelerate launch run_scripts/run_finetune.py --model_config tiny-32px                    # from scratch
    accelerate launch run_scripts/run_finetune.py --config configuration/finetune/mae_vit_base.yaml \\
        --model_name_or_path PATH --dataset_name ILSVRC/imagenet-1k                           # the paper's ViT-B recipe

The recipe: AdamW (betas 0.9/0.999), layer-wise lr decay (CLS/position/patch embedding = layer 0, the head on top),
drop path, RandAugment(9, 0.5) + random erasing 0.25, MixUp 0.8 / CutMix 1.0 with label smoothing 0.1, warmup then
cosine, a classifier on the mean of the patch tokens (`fc_norm`). As in the official code, the position table is
fine-tuned (it is fixed during pretraining) and resized bicubically when `--image_size` differs from pretraining.

The result is a `from_pretrained`-loadable `MAEForImageClassification` (with `id2label`) in `output_dir`, with a model
card, `all_results.json` (`eval_accuracy`, `eval_top5_accuracy`) and, with `--push_to_hub`, a Hub repository.
"""


from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from modeling_mae import MAEForImageClassification, load_config, parse_overrides
from modeling_mae.arguments import (
    DEFAULT_MODEL_CONFIG,
    RUN_CONFIG_FILE,
    arguments_to_dict,
    load_model_config,
    parse_arguments,
    save_resolved_config,
)
from modeling_mae.data.loader import ImageStreamLoader
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.transforms import eval_transform, finetune_transform, mixup_cutmix
from modeling_mae.errors import UsageError, exit_process, run_main
from modeling_mae.evaluation.layer_decay import FINETUNE_NO_WEIGHT_DECAY, layer_decay_lr_scale_fn
from modeling_mae.evaluation.metrics import ClassificationMetric, MetricArguments
from modeling_mae.evaluation.models import describe_model, from_pretrained_quietly, resize_model_resolution
from modeling_mae.evaluation.results import save_results, split_loader, summarize
from modeling_mae.interop.hub import build_uploader, export_model
from modeling_mae.interop.model_card import finetuning_card, write_model_card
from modeling_mae.loops.finetuning import (
    Arguments,
    AugmentationArguments,
    FinetuneModelArguments,
    FinetuneOptimizationArguments,
    FinetuneRunArguments,
    Loop,
    best_accuracy,
    train,
)
from modeling_mae.training.accelerator import (
    batch_layout,
    build_accelerator,
)
from modeling_mae.training.checkpoints import reporting_full_disk
from modeling_mae.training.optimization import (
    build_optimizer,
    build_scheduler,
    plan_training,
    scaled_learning_rate,
)
from modeling_mae.training.progress import configure_logging, print_outputs


def build_classifier(model_args: FinetuneModelArguments, class_names: list[str]) -> MAEForImageClassification:
    """The classifier from pretrained weights (its decoder is dropped, the head is new) or from a random init."""
    overrides = {**parse_overrides(model_args.config_overrides), "drop_path_rate": model_args.drop_path_rate,
                 "use_mean_pooling": model_args.global_pool}
    # Single-label, said explicitly: MixUp/CutMix targets are float, which transformers' rule takes for multi-label.
    labels = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
              "label2id": {name: index for index, name in enumerate(class_names)},
              "problem_type": "single_label_classification"}
    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        model = from_pretrained_quietly(  # the new head is on purpose: one line, not transformers' report table
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


def build_loaders(args: Arguments, accelerator: Accelerator) -> tuple[ImageStreamLoader, ImageStreamLoader]:
    """This process's train and validation loaders at the fine-tuning resolution.

    They come before the classifier (it needs the class names), so the resolution is read off the config.
    """
    model_args, optim = args.model, args.optim
    source_config = load_model_config(model_args.model_name_or_path or model_args.model_config or DEFAULT_MODEL_CONFIG,
                                      model_args.config_overrides)  # a wrong --config_overrides fails here
    image_size = (model_args.image_size,) * 2 if model_args.image_size else source_config.image_size
    patch, num_labels = max(source_config.patch_size), model_args.num_labels
    train_loader = split_loader(accelerator, args.data, "train", finetune_transform(image_size),
                                optim.per_device_train_batch_size, train=True, seed=args.run.seed,
                                num_classes=num_labels, min_image_size=patch)
    eval_loader = split_loader(accelerator, args.data, "validation", eval_transform(image_size),
                               optim.per_device_eval_batch_size, train=False, num_classes=num_labels,
                               min_image_size=patch)
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


def setup(args: Arguments) -> Loop:
    """Everything the loop works on: accelerator, metric, uploader, loaders, classifier, MixUp/CutMix, optimizer,
    schedule."""
    optim, run = args.optim, args.run
    accelerator = build_accelerator(optim.gradient_accumulation_steps, run.output_dir,
                                    run.report_to if run.with_tracking else None)
    configure_logging(accelerator)
    metric = ClassificationMetric(accelerator, args.metric.metric)  # a wrong --metric fails now, not after hours
    uploader = build_uploader(run, accelerator.is_main_process)  # a push that cannot work fails before training
    set_seed(run.seed)  # identical weights on every process
    train_loader, eval_loader = build_loaders(args, accelerator)
    class_names = resolve_class_names(train_loader, args.model.num_labels)
    model = build_classifier(args.model, class_names)
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
                learning_rate, eval_loader, uploader)


def resolve_class_names(loader: ImageStreamLoader, num_labels: int | None) -> list[str]:
    """The class names the classifier's id2label carries: a ClassLabel's names, or the string labels sorted; integer
    labels need --num_labels."""
    if loader.class_names is not None:
        return list(loader.class_names)
    if num_labels is None:
        raise UsageError("the labels are integers without class names (no ClassLabel feature): pass --num_labels")
    return [str(index) for index in range(num_labels)]


def model_card(args: Arguments, model: MAEForImageClassification, metrics: dict[str, Any]) -> str:
    """The classifier's card (`model_card.finetuning_card`) from what the run knows."""
    return finetuning_card(
        model.config,
        initialisation=describe_model(args.model.model_name_or_path, args.model.model_config, args.run.seed),
        dataset_name=args.data.dataset_name,
        layer_decay=args.model.layer_decay,
        mixup=args.augment.mixup,
        cutmix=args.augment.cutmix,
        label_smoothing=args.augment.label_smoothing,
        results=metrics,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate; returns the metrics written to `output_dir/all_results.json`."""
    groups = (FinetuneModelArguments, DataArguments, AugmentationArguments, FinetuneOptimizationArguments,
              FinetuneRunArguments, MetricArguments)
    args = Arguments(*parse_arguments(groups, argv))
    start = time.perf_counter()
    loop = setup(args)
    accelerator, run, model = loop.accelerator, args.run, loop.model
    if accelerator.is_main_process:
        pathlib.Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        save_resolved_config(arguments_to_dict(args.model, args.data, args.augment, args.optim, run, args.metric),
                             pathlib.Path(run.output_dir) / RUN_CONFIG_FILE)

    accelerator.init_trackers(run.tracker_project_name)  # a no-op without --with_tracking
    progress = train(loop)
    history = progress.history

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
    }
    with reporting_full_disk(pathlib.Path(run.output_dir), progress.completed_steps, "the fine-tuned model"):
        export_model(accelerator, model, run.output_dir)
        results = save_results(accelerator, run.output_dir, metrics)
        if accelerator.is_main_process:
            card_metrics = {key: value for key, value in metrics.items() if key != "history"}
            write_model_card(run.output_dir, model_card(args, accelerator.unwrap_model(model), card_metrics))
        accelerator.wait_for_everyone()
    accelerator.end_training()
    print_outputs(accelerator, f"Done: fine-tuning, {len(history)} epochs, {summarize(metrics)}",
                  {"model": run.output_dir, "results": results})
    if loop.uploader is not None:  # last: a push that fails for good raises once everything is saved locally
        loop.uploader.upload(run.output_dir, "End of fine-tuning")
    return metrics


if __name__ == "__main__":
    exit_process(run_main(main))
