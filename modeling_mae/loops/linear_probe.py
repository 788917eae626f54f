"""The linear probe that `run_scripts/run_linear_probe.py` runs: `BatchNorm1d(affine=False)` + a linear classifier on
the frozen encoder's features (the paper's appendix A.2), fed from features computed once (`--cached_features true`)
or freshly augmented images every step; SGD or LARS, warmup + cosine; the validation split scored at the end.
"""

from __future__ import annotations

import functools
import itertools
import pathlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import save_file

from ..arguments import ModelArguments
from ..data.loader import ImageStreamLoader, refuse_fewer_than_a_batch
from ..data.sources import DataArguments
from ..data.statistics import check_channels
from ..data.transforms import eval_transform, pretrain_transform
from ..evaluation.arguments import LinearProbeArguments
from ..evaluation.features import (
    Pooling,
    extract_features,
    extract_local_features,
    pool_features,
)
from ..evaluation.linear_probe import LARS, LinearProbeHead
from ..evaluation.metrics import ClassificationMetric, MetricArguments
from ..evaluation.models import describe_model, frozen_encoder
from ..evaluation.results import class_names_of, save_results, split_loader, summarize
from ..interop.hub import with_default_mode
from ..modeling_mae import MAEModel
from ..training.accelerator import build_accelerator
from ..training.optimization import (
    TrainingPlan,
    build_scheduler,
    effective_batch_size,
    plan_training,
    scaled_learning_rate,
)
from ..training.output_lock import holding_output_dir
from ..training.progress import configure_logging, print_outputs, progress_bar
from .image_statistics import pixel_normalisation

HEAD_FILE = "linear_head.safetensors"


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


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
    num_epochs: int | None = None,
) -> float:
    """Cross-entropy training of the head, one optimizer step per `gradient_accumulation_steps` micro-batches (each
    epoch holds a whole number of steps); returns the mean micro-batch loss of the last epoch. The main process shows
    the epochs done (of `num_epochs`) and the last one's loss."""
    last_epoch_loss = float("nan")
    bar = progress_bar(num_epochs, "linear probe", unit="epoch", enabled=accelerator.is_main_process)
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
        bar.set_postfix(loss=f"{last_epoch_loss:.4f}")
        bar.update()
    bar.close()
    return last_epoch_loss


def linear_probe(
    model_args: ModelArguments, data_args: DataArguments, probe: LinearProbeArguments, metric_args: MetricArguments
) -> dict[str, Any]:
    """Train and score the linear probe; returns the metrics written to `output_dir/all_results.json`."""
    accelerator = build_accelerator(probe.gradient_accumulation_steps, probe.output_dir)
    configure_logging(accelerator)
    with holding_output_dir(accelerator, probe.output_dir):  # one run at a time; checked writable before building
        return train_and_score(accelerator, model_args, data_args, probe, metric_args)


def train_and_score(
    accelerator: Accelerator, model_args: ModelArguments, data_args: DataArguments, probe: LinearProbeArguments,
    metric_args: MetricArguments,
) -> dict[str, Any]:
    metric = ClassificationMetric(accelerator, metric_args.metric)  # a wrong --metric fails now, not after hours
    start = time.perf_counter()
    encoder = frozen_encoder(model_args, probe.seed, accelerator.device)  # the seed also draws the head's init
    size, batch_size, eval_batch_size = (encoder.config.image_size, probe.per_device_train_batch_size,
                                         probe.per_device_eval_batch_size)
    check_channels(data_args, encoder.config.num_channels)  # a data set of other channels fails now, in one line
    patch, normalisation = max(encoder.config.patch_size), pixel_normalisation(encoder.config)
    evaluation = eval_transform(size, **normalisation)
    eval_loader = split_loader(accelerator, data_args, "validation", evaluation, eval_batch_size, train=False,
                               min_image_size=patch)
    val_features, val_labels = extract_local_features(accelerator, encoder, eval_loader, probe.pooling,
                                                      "validation features")

    if probe.cached_features:
        train_loader = split_loader(accelerator, data_args, "train", evaluation, eval_batch_size, train=False,
                                    min_image_size=patch)
        features, labels = extract_features(accelerator, encoder, train_loader, probe.pooling, "train features")
        refuse_fewer_than_a_batch(train_loader.split, features.shape[0], batch_size, accelerator.num_processes)
        batches_per_epoch = features.shape[0] // (batch_size * accelerator.num_processes)
        epoch_batches: Callable[[int], Batches] = functools.partial(
            cached_batches, accelerator, features, labels, batch_size, seed=probe.seed
        )
    else:
        train_loader = split_loader(accelerator, data_args, "train", pretrain_transform(size, **normalisation),
                                    batch_size, train=True, seed=probe.seed, min_image_size=patch)
        labels = val_labels  # class names need labels only when the dataset has no ClassLabel feature
        batches_per_epoch = len(train_loader)
        epoch_batches = functools.partial(streamed_batches, encoder, train_loader, probe.pooling, device=accelerator.device)
    num_classes = len(class_names_of(accelerator, train_loader, labels))

    training = build_head_training(accelerator, probe, encoder.config.hidden_size, num_classes, batches_per_epoch)
    plan, accumulation = training.plan, probe.gradient_accumulation_steps
    micro_batches = plan.steps_per_epoch * accumulation  # a trailing partial accumulation is dropped
    epochs = (itertools.islice(epoch_batches(epoch), micro_batches) for epoch in range(probe.num_train_epochs))
    train_loss = train_head(accelerator, training.head, training.optimizer, training.scheduler, epochs,
                            probe.num_train_epochs)

    head = accelerator.unwrap_model(training.head).eval()  # no DDP collective: processes score different sample counts
    with torch.no_grad():
        metric.add_batch(head(val_features), val_labels)
    metrics: dict[str, Any] = {
        **metric.compute(),
        "train_loss": train_loss,
        "train_steps": training.scheduler.last_epoch,  # the optimizer steps taken: the scheduler steps with each
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
        with_default_mode(head_file)
    print_outputs(accelerator, f"Done: linear probe, {summarize(metrics)}", {"results": results, "head": head_file})
    return metrics
