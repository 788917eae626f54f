"""The fine-tuning loop (the paper's appendix A.1), on a `Loop` that `run_scripts/run_finetune.py` builds, and the
flags only fine-tuning has.

Each epoch: whole optimizer steps of MixUp/CutMix-mixed batches (the global RNG seeded from the micro-batch's place
in the run, so that a resumed run draws what an uninterrupted one draws), then top-1/top-5 on the validation split,
each sample counted once whatever the number of processes; checkpoints every --checkpointing_steps.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from accelerate import Accelerator

from ..arguments import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    ModelArguments,
    OptimizationArguments,
    Range,
    RunArguments,
)
from ..data.loader import ImageStreamLoader
from ..data.sources import DataArguments
from ..evaluation.metrics import ClassificationMetric, MetricArguments
from ..interop.hub import HubUploader
from ..training.accelerator import (
    BatchLayout,
    iterate_in_lockstep,
    move_to_device,
    seeded_generator,
)
from ..training.checkpoints import Resumable, resume_training, save_checkpoint
from ..training.optimization import (
    TrainingPlan,
)
from ..training.progress import progress_bar

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


def best_accuracy(history: list[dict[str, float | int]]) -> dict[str, float]:
    """`best_eval_accuracy` over the epochs, when the metric reports an accuracy."""
    accuracies = [entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry]
    return {"best_eval_accuracy": max(accuracies)} if accuracies else {}
