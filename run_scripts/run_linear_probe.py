"""Linear probing of a frozen MAE encoder: `BatchNorm1d(affine=False)` + a linear classifier (the paper's protocol).

    accelerate launch run_scripts/run_linear_probe.py --model_name_or_path outputs/mae-pretrain   # embedded sample
    accelerate launch run_scripts/run_linear_probe.py --model_config tiny-32px                    # random-init baseline
    accelerate launch run_scripts/run_linear_probe.py --config configuration/linprobe/mae_vit_base.yaml \\
        --model_name_or_path PATH --dataset_name ILSVRC/imagenet-1k                               # the paper's recipe

Two ways to feed the head:
- `--cached_features true` (default, fast): features of center crops are computed once and the head is trained on
  them for many epochs;
- `--cached_features false` (the paper): every step encodes freshly augmented images (RandomResizedCrop + flip).
Either way the encoder is frozen (eval mode), the head is trained with SGD (or LARS, the paper's choice for its
16384-image batches: see configuration/linprobe/) and a warmup + cosine schedule, and the validation split is scored
at the end. Results: `output_dir/all_results.json` (`eval_accuracy`, `eval_top5_accuracy`) and the head's weights in
`output_dir/linear_head.safetensors`.
"""

from __future__ import annotations

import functools
import itertools
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file

from modeling_mae import MAEModel
from modeling_mae.arguments import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, ModelArguments, Range, parse_arguments
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.loader import ImageStreamLoader
from modeling_mae.data.transforms import eval_transform, pretrain_transform
from modeling_mae.errors import exit_process, run_main
from modeling_mae.evaluation.linear_probe import LARS, LinearProbeHead
from modeling_mae.evaluation.features import POOLINGS, Pooling, extract_features, extract_local_features, pool_features
from modeling_mae.evaluation.metrics import ClassificationMetric, MetricArguments
from modeling_mae.evaluation.results import class_names_of, save_results, split_loader, summarize
from modeling_mae.evaluation.models import describe_model, load_encoder
from modeling_mae.training.optimization import (
    TrainingPlan,
    build_scheduler,
    effective_batch_size,
    plan_training,
    scaled_learning_rate,
)
from modeling_mae.training.accelerator import build_accelerator
from modeling_mae.training.progress import configure_logging, print_outputs

HEAD_FILE = "linear_head.safetensors"
OPTIMIZERS = ("lars", "sgd")

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LinearProbeArguments:
    """The probe's recipe (paper, appendix A.2: LARS, base lr 0.1, no weight decay, batch 16384, 90 epochs with 10
    of warmup) with defaults sized for the embedded sample on a CPU (SGD instead of LARS, batch 256); the paper's
    exact recipe is in configuration/linprobe/*.yaml."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "per_device_train_batch_size": AT_LEAST_ONE, "gradient_accumulation_steps": AT_LEAST_ONE,
        "per_device_eval_batch_size": AT_LEAST_ONE, "base_learning_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
        "num_train_epochs": POSITIVE, "warmup_epochs": NON_NEGATIVE, "seed": SEED,
    }

    pooling: str = field(default="cls", metadata={"help": "Feature: the 'cls' token (the paper) or the 'mean' of the "
                                                          "patch tokens.", "choices": list(POOLINGS)})
    cached_features: bool = field(
        default=True, metadata={"help": "Train on features of center crops computed once (fast) instead of freshly "
                                        "augmented images every step (the paper)."})
    # LARS's step is lr x 0.001 x |w|: at the linear-scaled lr of small batches it barely moves the head (on the
    # embedded sample, random init: LARS 38.5% vs SGD 73.5% top-1), so LARS is kept for the paper's 16384 batch.
    optimizer: str = field(default="sgd", metadata={"help": "'sgd' (momentum 0.9) or 'lars' (the paper, for its "
                                                            "16384-image batches).", "choices": list(OPTIMIZERS)})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Samples per process per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step (the official accum_iter): the paper's "
                                     "16384-image batch on fewer devices. The head's BatchNorm normalises each "
                                     "micro-batch, as in the official code."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Images per forward pass when encoding."})
    base_learning_rate: float = field(default=0.1, metadata={"help": "lr = base_learning_rate * effective batch / "
                                                                         "256 (micro-batch x accumulation x processes)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the linear layer."})
    num_train_epochs: int = field(default=90, metadata={"help": "Epochs over the train split."})
    warmup_epochs: int = field(default=10, metadata={"help": "Linear warmup, then half-cycle cosine to 0."})
    output_dir: str = field(default="outputs/mae-linear-probe", metadata={"help": "Results and head weights."})
    seed: int = field(default=0, metadata={"help": "Seeds the head, the sample order and a --model_config init."})


def make_optimizer(head: torch.nn.Module, probe: LinearProbeArguments, learning_rate: float) -> torch.optim.Optimizer:
    if probe.optimizer == "lars":
        return LARS(head.parameters(), lr=learning_rate, weight_decay=probe.weight_decay)
    return torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=0.9, weight_decay=probe.weight_decay)


@dataclass
class HeadTraining:
    """The probe's head and how it is trained."""

    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: TrainingPlan
    learning_rate: float  # the peak


def build_head_training(
    accelerator: Accelerator, probe: LinearProbeArguments, feature_dim: int, num_classes: int, batches_per_epoch: int
) -> HeadTraining:
    """The head, its prepared optimizer and warmup + cosine schedule; lr = base lr x effective batch / 256."""
    accumulation = probe.gradient_accumulation_steps
    plan = plan_training(batches_per_epoch, accumulation, probe.num_train_epochs, warmup_epochs=probe.warmup_epochs)
    learning_rate = scaled_learning_rate(
        probe.base_learning_rate,
        effective_batch_size(probe.per_device_train_batch_size, accumulation, accelerator.num_processes),
    )
    head = LinearProbeHead(feature_dim, num_classes).to(accelerator.device)
    head, optimizer = accelerator.prepare(head, make_optimizer(head, probe, learning_rate))
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, learning_rate)
    return HeadTraining(head, optimizer, scheduler, plan, learning_rate)


def cached_batches(
    accelerator: Accelerator, features: torch.Tensor, labels: torch.Tensor, batch_size: int, epoch: int, seed: int
) -> Batches:
    """One epoch over the (gathered, identical everywhere) features: the same shuffle on every process, each taking
    its own slice of every global batch, so DDP sees `batch_size x processes` distinct samples per step."""
    order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
    global_batch = batch_size * accelerator.num_processes
    for start in range(0, features.shape[0] - global_batch + 1, global_batch):  # drop the last partial batch
        first = start + accelerator.process_index * batch_size
        mine = order[first : first + batch_size]
        yield features[mine.to(features.device)], labels[mine.to(labels.device)]


def streamed_batches(
    encoder: MAEModel, loader: ImageStreamLoader, pooling: Pooling, epoch: int, device: torch.device
) -> Batches:
    """One epoch of freshly augmented images through the frozen encoder."""
    loader.set_epoch(epoch)
    for batch in loader:
        with torch.no_grad():
            hidden = encoder(batch["pixel_values"].to(device)).last_hidden_state
        yield pool_features(hidden, pooling).float(), batch["labels"].to(device)


def train_head(
    accelerator: Accelerator,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epochs: Iterator[Batches],
) -> float:
    """Cross-entropy training of the head, one optimizer step per `gradient_accumulation_steps` micro-batches (each
    epoch holds a whole number of steps); returns the mean micro-batch loss of the last epoch."""
    last_epoch_loss = float("nan")
    for batches in epochs:
        head.train()
        losses = []
        for features, labels in batches:
            with accelerator.accumulate(head):  # the prepared optimizer steps (and zeroes) on the last micro-batch only
                loss = F.cross_entropy(head(features), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                scheduler.step()
            losses.append(loss.item())
        last_epoch_loss = sum(losses) / max(len(losses), 1)
    return last_epoch_loss


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and score the linear probe; returns the metrics written to `output_dir/all_results.json`."""
    model_args, data_args, probe, metric_args = parse_arguments(
        (ModelArguments, DataArguments, LinearProbeArguments, MetricArguments), argv
    )
    accelerator = build_accelerator(probe.gradient_accumulation_steps, probe.output_dir)
    configure_logging(accelerator)
    metric = ClassificationMetric(accelerator, metric_args.metric)  # a wrong --metric fails now, not after hours
    start = time.perf_counter()
    set_seed(probe.seed)  # the same random init and head on every process
    encoder = load_encoder(model_args.model_name_or_path, model_args.model_config, model_args.config_overrides)
    encoder.requires_grad_(False)
    encoder.to(accelerator.device).eval()
    size, batch_size, eval_batch_size = (encoder.config.image_size, probe.per_device_train_batch_size,
                                         probe.per_device_eval_batch_size)
    patch = max(encoder.config.patch_size)
    eval_loader = split_loader(accelerator, data_args, "validation", eval_transform(size), eval_batch_size, train=False,
                               min_image_size=patch)
    val_features, val_labels = extract_local_features(encoder, eval_loader, probe.pooling, accelerator.device)

    if probe.cached_features:
        train_loader = split_loader(accelerator, data_args, "train", eval_transform(size), eval_batch_size, train=False,
                                    min_image_size=patch)
        features, labels = extract_features(accelerator, encoder, train_loader, probe.pooling)
        batches_per_epoch = features.shape[0] // (batch_size * accelerator.num_processes)
        epoch_batches: Callable[[int], Batches] = functools.partial(
            cached_batches, accelerator, features, labels, batch_size, seed=probe.seed
        )
    else:
        train_loader = split_loader(accelerator, data_args, "train", pretrain_transform(size), batch_size, train=True,
                                    seed=probe.seed, min_image_size=patch)
        labels = val_labels  # class names need labels only when the dataset has no ClassLabel feature
        batches_per_epoch = len(train_loader)
        epoch_batches = functools.partial(streamed_batches, encoder, train_loader, probe.pooling, device=accelerator.device)
    num_classes = len(class_names_of(accelerator, train_loader, labels))

    training = build_head_training(accelerator, probe, encoder.config.hidden_size, num_classes, batches_per_epoch)
    plan, accumulation = training.plan, probe.gradient_accumulation_steps
    micro_batches = plan.steps_per_epoch * accumulation  # a trailing partial accumulation is dropped
    epochs = (itertools.islice(epoch_batches(epoch), micro_batches) for epoch in range(probe.num_train_epochs))
    train_loss = train_head(accelerator, training.head, training.optimizer, training.scheduler, epochs)

    head = accelerator.unwrap_model(training.head).eval()  # no DDP collective: processes score different sample counts
    with torch.no_grad():
        metric.add_batch(head(val_features), val_labels)
    metrics: dict[str, Any] = {
        **metric.compute(),
        "train_loss": train_loss,
        "train_steps": plan.total_steps,
        "learning_rate": training.learning_rate,
        "gradient_accumulation_steps": accumulation,
        "pooling": probe.pooling,
        "cached_features": probe.cached_features,
        "optimizer": probe.optimizer,
        "model": describe_model(model_args.model_name_or_path, model_args.model_config, probe.seed),
        "num_processes": accelerator.num_processes,
        "runtime": time.perf_counter() - start,
    }
    results = save_results(accelerator, probe.output_dir, metrics)
    head_file = pathlib.Path(probe.output_dir) / HEAD_FILE
    if accelerator.is_main_process:
        save_file({name: tensor.contiguous().cpu() for name, tensor in head.state_dict().items()}, head_file)
    print_outputs(accelerator, f"Done: linear probe, {summarize(metrics)}", {"results": results, "head": head_file})
    return metrics


if __name__ == "__main__":
    exit_process(run_main(main))
