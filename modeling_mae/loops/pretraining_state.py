"""What the pretraining loop works on: the script's arguments and the `Trainer` that `run_scripts/run_mae.py` builds
(model, optimizer, schedule, loaders, plan, uploader), and the files a run writes.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from ..arguments import (
    DEFAULT_MODEL_CONFIG,
    OptimizationArguments,
    PretrainModelArguments,
    RunArguments,
    arguments_to_dict,
)
from ..configuration_mae import MAEConfig
from ..data.loader import ImageStreamLoader
from ..data.sources import DataArguments
from ..interop.hub import HubUploader
from ..modeling_mae import MAEForPreTraining
from ..training.accelerator import (
    BatchLayout,
)
from ..training.checkpoints import (
    Resumable,
)
from ..training.optimization import (
    TrainingPlan,
)
from ..training.preemption import StopSignals
from ..training.progress import (
    TrainingProgress,
)
from ..training.run_identity import RunIdentity

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
    identity: RunIdentity  # what it trains, recorded in its checkpoints
    validation_losses: dict[int, float] = field(default_factory=dict)  # by optimizer step
    stop_signals: StopSignals = field(default_factory=StopSignals)  # --save_on_signal

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
        return Resumable(self.scheduler, self.train_loader, self.layout, self.identity)


def model_source(model_args: PretrainModelArguments) -> str:
    return model_args.model_config or model_args.model_name_or_path or DEFAULT_MODEL_CONFIG


def epochs_done(trainer: Trainer, progress: TrainingProgress) -> float:
    """Epochs trained so far, the current one counted by the fraction of its micro-batches consumed."""
    return progress.epoch + progress.epoch_micro_batches / (trainer.micro_batches_per_epoch or math.inf)
