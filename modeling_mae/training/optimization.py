"""The official recipe's optimizer and schedule: AdamW with no weight decay on biases and 1-D parameters,
`lr = base_lr * effective_batch / 256`, a per-step linear warmup then a half-cycle cosine to `min_lr`, and the
`TrainingPlan` (steps per epoch, total and warmup steps) they follow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..text import counted

logger = logging.getLogger(__name__)


LR_REFERENCE_BATCH = 256  # the paper scales its base learning rate per 256 images


# Learning-rate multiplier of a parameter from its name, e.g. layer-wise decay when fine-tuning.
LrScaleFn = Callable[[str, nn.Parameter], float]


def effective_batch_size(per_device_batch_size: int, gradient_accumulation_steps: int, num_processes: int) -> int:
    """Images per optimizer step, all processes and accumulated micro-batches included."""
    return per_device_batch_size * gradient_accumulation_steps * num_processes


def scaled_learning_rate(base_learning_rate: float, batch_size: int) -> float:
    """The linear scaling rule of the paper: `base_lr * batch / 256`."""
    return base_learning_rate * batch_size / LR_REFERENCE_BATCH


def uses_weight_decay(name: str, parameter: nn.Parameter, no_weight_decay: Iterable[str] = ()) -> bool:
    """Biases, norms and other 1-D parameters are not decayed (timm's `param_groups_weight_decay`), nor named ones."""
    skipped = set(no_weight_decay)
    return (
        parameter.ndim > 1 and not name.endswith(".bias") and name not in skipped and name.split(".")[-1] not in skipped
    )


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale_fn: LrScaleFn | None = None,
    no_weight_decay: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (weight decay, learning-rate scale).

    Each group carries `lr_scale` (1.0 without `lr_scale_fn`); `build_optimizer` turns it into the group's peak lr.
    """
    no_weight_decay = tuple(no_weight_decay)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue  # e.g. the fixed sin-cos position tables
        decay = weight_decay if uses_weight_decay(name, parameter, no_weight_decay) else 0.0
        scale = lr_scale_fn(name, parameter) if lr_scale_fn is not None else 1.0
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(parameter)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    lr_scale_fn: LrScaleFn | None = None,
    no_weight_decay: Iterable[str] = (),
) -> torch.optim.AdamW:
    """Fused AdamW over `build_param_groups`; each group's peak lr is `learning_rate * lr_scale`.

    Fused: one kernel updates every tensor (CPU and GPU), instead of torch's default of one launch per tensor
    group (foreach, GPU) or a Python loop over tensors (CPU)."""
    groups = build_param_groups(model, weight_decay, lr_scale_fn, no_weight_decay)
    for group in groups:
        group["lr"] = learning_rate * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)


@dataclass
class WarmupCosineSchedule:
    """Multiplier of the peak lr at an optimizer step: linear warmup from 0, then half-cycle cosine to `min_lr_ratio`.

    A callable object rather than a lambda, so that `LambdaLR.state_dict()` holds its fields (plain JSON) and a resume
    can tell whether the flags changed the schedule.
    """

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, peak_lr: float, min_lr: float = 0.0
) -> LambdaLR:
    """Per-optimizer-step `WarmupCosineSchedule`; step it only when an optimizer step really happened."""
    min_lr_ratio = min_lr / peak_lr if peak_lr > 0 else 0.0
    return LambdaLR(optimizer, WarmupCosineSchedule(warmup_steps, total_steps, min_lr_ratio))


def restore_scheduler(scheduler: LambdaLR, saved: Mapping[str, Any]) -> None:
    """Continue at the saved step of this run's schedule, warning when the flags changed it.

    The flags win, as in the official code (which recomputes the lr from its arguments at every step): resuming a
    diverged run with a lower --base_learning_rate must lower it. Unchanged flags give the uninterrupted run's lr.
    """
    current = scheduler.state_dict()
    if (saved["base_lrs"], saved["lr_lambdas"]) != (current["base_lrs"], current["lr_lambdas"]):
        logger.warning(
            "the learning-rate schedule differs from the checkpoint's (then: %s; now: %s): going on with this run's "
            "flags",
            _describe_schedule(saved),
            _describe_schedule(current),
        )
    step = saved["last_epoch"]
    lrs = [base_lr * schedule(step) for base_lr, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**current, "last_epoch": step, "_step_count": saved["_step_count"], "_last_lr": lrs})
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr


def _describe_schedule(state: Mapping[str, Any]) -> str:
    """`peak lr 0.0015, min_lr_ratio 0, total_steps 100, warmup_steps 10` (the first parameter group's)."""
    fields = sorted((state["lr_lambdas"][0] or {}).items())
    return ", ".join([f"peak lr {state['base_lrs'][0]:.3g}", *(f"{name} {value:g}" for name, value in fields)])


@dataclass(frozen=True)
class TrainingPlan:
    """How long the run is, in optimizer steps."""

    steps_per_epoch: int | None  # None for streams of unknown length
    total_steps: int
    num_epochs: int
    warmup_steps: int


def plan_training(
    batches_per_epoch: int | None,
    gradient_accumulation_steps: int,
    num_train_epochs: float,
    max_train_steps: int | None = None,
    warmup_epochs: float = 0.0,
    warmup_steps: int | None = None,
) -> TrainingPlan:
    """Resolve epochs/steps: `max_train_steps` wins over `num_train_epochs`, `warmup_steps` over `warmup_epochs`.

    An epoch holds `batches_per_epoch // gradient_accumulation_steps` optimizer steps (a trailing partial
    accumulation is dropped, as in the official code). Streams of unknown length need explicit step counts.
    """
    steps_per_epoch = None if batches_per_epoch is None else batches_per_epoch // gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"an epoch of {counted(batches_per_epoch, 'batch', 'batches')} is shorter than one optimizer step of "
            f"{gradient_accumulation_steps} micro-batches: lower the batch size or the accumulation"
        )
    if max_train_steps is None:
        if steps_per_epoch is None:
            raise ValueError("the training stream has no known length: set --max_train_steps")
        max_train_steps = math.ceil(num_train_epochs * steps_per_epoch)
    if warmup_steps is None:
        if steps_per_epoch is None and warmup_epochs > 0:
            raise ValueError("the training stream has no known length: set --warmup_steps instead of --warmup_epochs")
        warmup_steps = round(warmup_epochs * (steps_per_epoch or 0))
    num_epochs = math.ceil(max_train_steps / steps_per_epoch) if steps_per_epoch else 1
    return TrainingPlan(steps_per_epoch, max_train_steps, num_epochs, min(warmup_steps, max_train_steps))
