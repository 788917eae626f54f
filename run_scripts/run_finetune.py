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

import contextlib
import itertools
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from modeling_mae import MAEForImageClassification, load_config, parse_overrides
from modeling_mae.arguments import (
    AT_LEAST_ONE,
    DEFAULT_MODEL_CONFIG,
    FRACTION,
    NON_NEGATIVE,
    RUN_CONFIG_FILE,
    ModelArguments,
    OptimizationArguments,
    Range,
    RunArguments,
    arguments_to_dict,
    load_model_config,
    parse_arguments,
    save_resolved_config,
)
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.loader import ImageStreamLoader
from modeling_mae.data.transforms import eval_transform, finetune_transform, mixup_cutmix
from modeling_mae.errors import UsageError, exit_process, run_main
from modeling_mae.evaluation.layer_decay import FINETUNE_NO_WEIGHT_DECAY, layer_decay_lr_scale_fn
from modeling_mae.evaluation.metrics import ClassificationMetric, MetricArguments
from modeling_mae.evaluation.models import describe_model, from_pretrained_quietly, resize_model_resolution
from modeling_mae.evaluation.results import save_results, split_loader, summarize
from modeling_mae.interop.hub import HubUploader, build_uploader, export_model
from modeling_mae.interop.model_card import finetuning_card, write_model_card
from modeling_mae.training.accelerator import (
    BatchLayout,
    batch_layout,
    build_accelerator,
    iterate_in_lockstep,
    move_to_device,
    seeded_generator,
)
from modeling_mae.training.checkpoints import Resumable, reporting_full_disk, resume_training, save_checkpoint
from modeling_mae.training.optimization import (
    TrainingPlan,
    build_optimizer,
    build_scheduler,
    plan_training,
    scaled_learning_rate,
)
from modeling_mae.training.progress import configure_logging, print_outputs, progress_bar

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FinetuneModelArguments(ModelArguments):
    """`ModelArguments` plus the classifier's fine-tuning knobs."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "layer_decay": Range(low=0, high=1, low_open=True), "drop_path_rate": FRACTION, "image_size": AT_LEAST_ONE,
        "num_labels": AT_LEAST_ONE,
    }

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
        default=None, metadata={"help": "Classes, when the labels are integer ids without names (e.g. webdataset); a label "
                                    "at or above it is an error. Named labels (ClassLabel, strings) give their own."}
    )


@dataclass
class AugmentationArguments:
    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "label_smoothing": FRACTION,
    }

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
    metric: MetricArguments


# ------------------------------------------------------------------------------------------------------------- builders


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


# ------------------------------------------------------------------------------------------------------------ the loop


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

    @property
    def resumable(self) -> Resumable:
        return Resumable(self.scheduler, self.train_loader, self.layout)

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


def finish_epoch(loop: Loop, progress: FinetuneProgress, eval_loader: ImageStreamLoader) -> None:
    """Evaluate, log and start the next epoch (checkpointing it with --checkpointing_steps epoch)."""
    train_loss = progress.epoch_loss_sum / max(progress.epoch_micro_batches, 1)
    scores = evaluate(loop.accelerator, loop.model, eval_loader, loop.metric)
    metrics = {"epoch": progress.epoch + 1, "train_loss": train_loss, **scores}
    progress.history.append(metrics)
    loop.accelerator.log({f"finetune/{key}": value for key, value in metrics.items()}, step=progress.completed_steps)
    loop.accelerator.print(f"epoch {progress.epoch + 1}: {metrics}")
    progress.epoch, progress.epoch_micro_batches, progress.epoch_loss_sum = progress.epoch + 1, 0, 0.0
    if loop.args.run.checkpoint_every_epoch():
        checkpoint(loop, progress)


def checkpoint(loop: Loop, progress: FinetuneProgress) -> None:
    run = loop.args.run
    path = save_checkpoint(loop.accelerator, run.output_dir, progress.completed_steps, asdict(progress),
                           loop.resumable, run.checkpoints_total_limit)
    loop.accelerator.print(f"step {progress.completed_steps}: saved {path}")


def resume(loop: Loop) -> FinetuneProgress:
    resumed = resume_training(loop.accelerator, loop.args.run.resume_from_checkpoint, loop.args.run.output_dir,
                              loop.resumable)
    if resumed is None:
        return FinetuneProgress()
    path, trainer_state = resumed
    progress = FinetuneProgress(**trainer_state)
    loop.accelerator.print(f"resumed from {path}: step {progress.completed_steps}, epoch {progress.epoch}")
    return progress


def train(loop: Loop) -> FinetuneProgress:
    progress = resume(loop)
    bar = progress_bar(loop.plan.num_epochs, "fine-tuning", progress.epoch, "epoch",
                       enabled=loop.accelerator.is_local_main_process)
    with contextlib.closing(bar):  # closed on an error too: the error stays the last line printed
        while progress.epoch < loop.plan.num_epochs:
            loop.train_loader.set_epoch(progress.epoch)  # keeps a stream position loaded for this epoch
            train_one_epoch(loop, progress)
            finish_epoch(loop, progress, loop.eval_loader)
            bar.update(1)
    return progress


# ----------------------------------------------------------------------------------------------------------------- main


def best_accuracy(history: list[dict[str, float | int]]) -> dict[str, float]:
    """`best_eval_accuracy` over the epochs, when the metric reports an accuracy."""
    accuracies = [entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry]
    return {"best_eval_accuracy": max(accuracies)} if accuracies else {}


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
