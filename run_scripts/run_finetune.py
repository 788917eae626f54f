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
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from modeling_mae import MAEForImageClassification, load_config, parse_overrides
from modeling_mae.arguments import (
    ModelArguments,
    OptimizationArguments,
    RunArguments,
    arguments_to_dict,
    parse_arguments,
    save_resolved_config,
)
from modeling_mae.data import DataArguments, ImageStreamLoader, eval_transform, finetune_transform, mixup_cutmix
from modeling_mae.evaluation import (
    FINETUNE_NO_WEIGHT_DECAY,
    TopKAccuracy,
    layer_decay_lr_scale_fn,
    resize_model_resolution,
    save_results,
    split_loader,
)
from modeling_mae.hub import HubUploader, default_repo_name, export_model, render_model_card, write_model_card
from modeling_mae.training import (
    build_accelerator,
    build_optimizer,
    build_scheduler,
    effective_batch_size,
    iterate_in_lockstep,
    move_to_device,
    plan_training,
    scaled_learning_rate,
)

DEFAULT_MODEL_CONFIG = "tiny-32px"
RUN_CONFIG_FILE = "run_config.yaml"

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FinetuneModelArguments(ModelArguments):
    """`ModelArguments` plus the classifier's fine-tuning knobs."""

    layer_decay: float = field(default=0.75, metadata={"help": "Layer-wise lr decay (paper: 0.65 ViT-B, 0.75 L/H)."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth (paper: 0.1 B, 0.2 L, 0.3 H)."})
    global_pool: bool = field(default=True, metadata={"help": "Classify the mean of the patch tokens (paper) or CLS"})
    image_size: int | None = field(
        default=None, metadata={"help": "Fine-tune at this resolution (position table resized); default: pretraining's"}
    )
    train_position_embeddings: bool = field(
        default=True, metadata={"help": "Fine-tune the position table, as the official code does (timm's pos_embed)."}
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Classes, when the dataset's label column is no ClassLabel (e.g. webdataset)"}
    )


@dataclass
class AugmentationArguments:
    mixup: float = field(default=0.8, metadata={"help": "MixUp alpha (0: off)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0: off; with both on, one per batch)."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the targets."})


@dataclass
class FinetuneOptimizationArguments(OptimizationArguments):
    """The paper's fine-tuning optimizer (base lr 5e-4 for ViT-B, 1e-3 for L/H, per 256 images)."""

    base_learning_rate: float = field(default=1e-3, metadata={"help": "lr = base_learning_rate * batch / 256"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (the official fine-tuning keeps 0.999)."})
    min_lr: float = field(default=1e-6, metadata={"help": "Floor of the cosine decay."})
    num_train_epochs: float = field(default=10, metadata={"help": "Epochs (paper: 100 ViT-B, 50 L/H)."})
    warmup_epochs: float = field(default=1.0, metadata={"help": "Linear warmup in epochs (paper: 5)."})


@dataclass
class FinetuneRunArguments(RunArguments):
    output_dir: str = field(default="outputs/mae-finetune", metadata={"help": "Model, results and model card."})
    tracker_project_name: str = "mae-finetune"


@dataclass
class Arguments:
    model: FinetuneModelArguments
    data: DataArguments
    augment: AugmentationArguments
    optim: FinetuneOptimizationArguments
    run: FinetuneRunArguments


# ------------------------------------------------------------------------------------------------------------- builders


def build_classifier(model_args: FinetuneModelArguments, class_names: list[str]) -> MAEForImageClassification:
    """The classifier from pretrained weights (its decoder is dropped, the head is new) or from a random init."""
    overrides = {**parse_overrides(model_args.config_overrides), "drop_path_rate": model_args.drop_path_rate,
                 "use_mean_pooling": model_args.global_pool}
    labels = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
              "label2id": {name: index for index, name in enumerate(class_names)}}
    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        model = MAEForImageClassification.from_pretrained(
            model_args.model_name_or_path, ignore_mismatched_sizes=True, **overrides, **labels, **attention
        )
    else:
        config = load_config(model_args.model_config or DEFAULT_MODEL_CONFIG, overrides)
        config.update(labels)
        model = MAEForImageClassification._from_config(config, **attention)
    if model_args.image_size is not None:
        resize_model_resolution(model, (model_args.image_size, model_args.image_size))
    model.mae.embeddings.position_embeddings.requires_grad_(model_args.train_position_embeddings)
    return model


def resolve_class_names(loader: ImageStreamLoader, num_labels: int | None) -> list[str]:
    if loader.class_names is not None:
        return list(loader.class_names)
    if num_labels is None:
        raise ValueError("the label column is not a ClassLabel: pass --num_labels")
    return [str(index) for index in range(num_labels)]


# ------------------------------------------------------------------------------------------------------------ the loop


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: ImageStreamLoader) -> dict[str, float | int]:
    """Top-1/top-5 on the validation split, each sample counted once whatever the number of processes."""
    model.eval()
    accuracy = TopKAccuracy()
    for batch, is_real in iterate_in_lockstep(accelerator, loader):  # the forward is a collective under ZeRO-3
        batch = move_to_device(batch, accelerator.device)
        logits = model(batch["pixel_values"]).logits
        if is_real:
            accuracy.update(logits, batch["labels"])
    model.train()
    return accuracy.compute(accelerator)


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: ImageStreamLoader,
    mixer: Mixer,
    micro_batches: int,
    max_grad_norm: float | None,
) -> tuple[float, int]:
    """At most `micro_batches` micro-batches (whole optimizer steps); returns (mean loss, optimizer steps)."""
    model.train()
    losses: list[float] = []
    steps = 0
    for index, batch in enumerate(loader):
        if index >= micro_batches:
            break
        batch = move_to_device(batch, accelerator.device)
        with accelerator.accumulate(model):
            pixel_values, targets = mixer(batch["pixel_values"], batch["labels"])
            loss = model(pixel_values, labels=targets).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if accelerator.sync_gradients:
            scheduler.step()
            steps += 1
    return sum(losses) / max(len(losses), 1), steps


# ----------------------------------------------------------------------------------------------------------------- main


def model_card(args: Arguments, model: MAEForImageClassification, metrics: dict[str, Any]) -> str:
    config = model.config
    sections = {
        "Recipe": {
            "initialisation": args.model.model_name_or_path
            or f"random ({args.model.model_config or DEFAULT_MODEL_CONFIG})",
            "dataset": args.data.dataset_name or "the embedded Fashion-MNIST sample",
            "model": f"ViT {config.hidden_size}x{config.num_hidden_layers}, patch {config.patch_size}, "
                     f"image {config.image_size}",
            "head": "mean of patch tokens + fc_norm" if config.use_mean_pooling else "CLS token",
            "layer decay": args.model.layer_decay, "drop path": config.drop_path_rate,
            "augmentation": f"RandAugment(9, 0.5), random erasing 0.25, MixUp {args.augment.mixup}, CutMix "
                            f"{args.augment.cutmix}, label smoothing {args.augment.label_smoothing}",
        },
        "Results": metrics,
    }
    usage = ("from transformers import AutoModelForImageClassification\n\n"
             'model = AutoModelForImageClassification.from_pretrained("PATH_OR_REPO", trust_remote_code=True)')
    return render_model_card(
        "MAE fine-tuned image classifier", "A ViT fine-tuned end to end from a Masked Autoencoder encoder "
        "(He et al., 2021) with the paper's recipe.", sections,
        tags=["mae", "image-classification", "vision"], usage=usage,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate; returns the metrics written to `output_dir/all_results.json`."""
    groups = (FinetuneModelArguments, DataArguments, AugmentationArguments, FinetuneOptimizationArguments,
              FinetuneRunArguments)
    args = Arguments(*parse_arguments(groups, argv))
    optim, run = args.optim, args.run
    accelerator = build_accelerator(optim.gradient_accumulation_steps, run.output_dir,
                                    run.report_to if run.with_tracking else None)
    start = time.perf_counter()
    set_seed(run.seed)  # identical weights on every process
    # The loaders come first (the classifier needs the class names), so the resolution is read off the config.
    source_config = load_config(args.model.model_name_or_path or args.model.model_config or DEFAULT_MODEL_CONFIG,
                                args.model.config_overrides)
    image_size = (args.model.image_size,) * 2 if args.model.image_size else source_config.image_size
    shard = {"seed": run.seed}
    train_loader = split_loader(accelerator, args.data, "train", finetune_transform(image_size),
                                optim.per_device_train_batch_size, train=True, **shard)
    eval_loader = split_loader(accelerator, args.data, "validation", eval_transform(image_size),
                               optim.per_device_eval_batch_size, train=False)
    class_names = resolve_class_names(train_loader, args.model.num_labels)
    model = build_classifier(args.model, class_names)
    set_seed(run.seed, device_specific=True)  # then different augmentations per process
    mixer = mixup_cutmix(len(class_names), args.augment.mixup, args.augment.cutmix, args.augment.label_smoothing)

    plan = plan_training(len(train_loader), optim.gradient_accumulation_steps, optim.num_train_epochs,
                         optim.max_train_steps, optim.warmup_epochs, optim.warmup_steps)
    batch = effective_batch_size(optim.per_device_train_batch_size, optim.gradient_accumulation_steps,
                                 accelerator.num_processes)
    learning_rate = optim.learning_rate or scaled_learning_rate(optim.base_learning_rate, batch)
    optimizer = build_optimizer(
        model, learning_rate, optim.weight_decay, (optim.adam_beta1, optim.adam_beta2), optim.adam_epsilon,
        lr_scale_fn=layer_decay_lr_scale_fn(model.config.num_hidden_layers, args.model.layer_decay),
        no_weight_decay=FINETUNE_NO_WEIGHT_DECAY,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, learning_rate, optim.min_lr)
    if accelerator.is_main_process:
        pathlib.Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        save_resolved_config(arguments_to_dict(args.model, args.data, args.augment, optim, run),
                             pathlib.Path(run.output_dir) / RUN_CONFIG_FILE)

    accelerator.init_trackers(run.tracker_project_name)  # a no-op without --with_tracking
    completed_steps, history = 0, []
    micro_batches_per_epoch = (plan.steps_per_epoch or 0) * optim.gradient_accumulation_steps
    for epoch in tqdm(range(plan.num_epochs), desc="fine-tuning", disable=not accelerator.is_local_main_process):
        train_loader.set_epoch(epoch)
        budget = min(micro_batches_per_epoch, (plan.total_steps - completed_steps) * optim.gradient_accumulation_steps)
        train_loss, steps = train_one_epoch(accelerator, model, optimizer, scheduler, train_loader, mixer, budget,
                                            optim.max_grad_norm)
        completed_steps += steps
        epoch_metrics = {"epoch": epoch + 1, "train_loss": train_loss, **evaluate(accelerator, model, eval_loader)}
        history.append(epoch_metrics)
        accelerator.log({f"finetune/{key}": value for key, value in epoch_metrics.items()}, step=completed_steps)
        accelerator.print(f"epoch {epoch + 1}: {epoch_metrics}")

    metrics: dict[str, Any] = {
        **{key: value for key, value in history[-1].items() if key.startswith("eval_")},
        "best_eval_accuracy": max(entry["eval_accuracy"] for entry in history),
        "train_loss": history[-1]["train_loss"],
        "train_steps": completed_steps,
        "train_epochs": len(history),
        "learning_rate": learning_rate,
        "effective_batch_size": batch,
        "model": args.model.model_name_or_path or f"random init of {args.model.model_config or DEFAULT_MODEL_CONFIG}",
        "seed": run.seed,
        "num_processes": accelerator.num_processes,
        "train_runtime": time.perf_counter() - start,
        "history": history,
    }
    export_model(accelerator, model, run.output_dir)
    save_results(accelerator, run.output_dir, metrics)
    if accelerator.is_main_process:
        card_metrics = {key: value for key, value in metrics.items() if key != "history"}
        write_model_card(run.output_dir, model_card(args, accelerator.unwrap_model(model), card_metrics))
        if run.push_to_hub:
            uploader = HubUploader(run.hub_model_id or default_repo_name(run.output_dir), run.hub_token,
                                   run.hub_private_repo)
            uploader.upload(run.output_dir, "End of fine-tuning")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
