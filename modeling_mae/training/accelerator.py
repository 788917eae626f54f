"""Accelerate set-up and the batch layout: the `Accelerator` (trackers, DeepSpeed's batch and clipping values),
seeded generators, moving batches to the device, the processes' lockstep over uneven evaluation splits, and
`BatchLayout` (processes x batch x accumulation), which a resume must match.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)

from ..modeling_mae import name_the_cpu_for_deepspeed
from .optimization import effective_batch_size


def build_accelerator(
    gradient_accumulation_steps: int, project_dir: str | os.PathLike[str], log_with: str | list[str] | None = None
) -> Accelerator:
    """An Accelerator whose precision/distribution come from `accelerate config` / `accelerate launch` flags.

    The data loaders are not prepared by Accelerate (they shard by process themselves), so gradient accumulation
    counts micro-batches instead of watching for the end of a loader.
    """
    name_the_cpu_for_deepspeed()
    # Without GPUs the default process-group backend of DeepSpeed's CPU accelerator is oneCCL; gloo ships with torch.
    # (Only for real multi-process runs: a backend makes Accelerate initialise a process group.)
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []
    return Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(project_dir), logging_dir=str(pathlib.Path(project_dir) / "runs")
        ),
        kwargs_handlers=handlers,
    )


def fill_deepspeed_config(accelerator: Accelerator, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed JSON's `"auto"` values Accelerate cannot infer without a prepared data loader.

    Accelerate would otherwise turn `"gradient_clipping": "auto"` into 1.0; the MAE recipe does not clip.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm or 0.0


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from integer keys, e.g. (seed, process, epoch, batch).

    Randomness drawn from it depends only on where the run stands, not on how much of the global RNG other code has
    consumed, so a resumed run draws exactly what the uninterrupted run drew (the masks of MAE).
    """
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def move_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch on `device` (the loaders are not prepared by Accelerate, so they stay on the CPU)."""
    return {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in batch.items()
    }


def iterate_in_lockstep(
    accelerator: Accelerator, batches: Iterable[dict[str, Any]]
) -> Iterator[tuple[dict[str, Any], bool]]:
    """Yield `(batch, is_real)` until every process has run out of batches.

    Evaluation splits need not divide evenly across processes, but a DDP/ZeRO-3 forward is a collective: a process
    that is done re-yields its last batch with `is_real=False` (to be ignored) while the others finish.
    """
    iterator = iter(batches)
    last: dict[str, Any] | None = None
    while True:
        batch = next(iterator, None)
        has_batch = torch.tensor([float(batch is not None)], device=accelerator.device)
        if accelerator.num_processes > 1:
            has_batch = accelerator.reduce(has_batch, reduction="sum")
        if has_batch.item() == 0:
            return
        if batch is not None:
            last = batch
            yield batch, True
        elif last is not None:
            yield last, False
        else:
            raise RuntimeError("this process has no evaluation batch at all: use fewer processes or a larger split")


@dataclass(frozen=True)
class BatchLayout:
    """How a run splits its effective batch. The data stream is split by process and the learning rate follows the
    effective batch, so a resume continues exactly only with the same processes, per-process batch and accumulation."""

    num_processes: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    num_machines: int = field(default=1, compare=False)  # recorded only: nothing depends on how processes spread

    @property
    def effective_batch_size(self) -> int:
        return effective_batch_size(self.per_device_batch_size, self.gradient_accumulation_steps, self.num_processes)

    def describe(self) -> str:
        return (
            f"{self.num_processes} process(es) x {self.per_device_batch_size} images x "
            f"{self.gradient_accumulation_steps} accumulation step(s) = effective batch {self.effective_batch_size}"
        )

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "effective_batch_size": self.effective_batch_size}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> BatchLayout:
        """`to_json`'s output read back; a missing field is a `KeyError`, one that is no whole number a `TypeError`."""
        fields = {name: values[name] for name in cls.__dataclass_fields__}
        for name, value in fields.items():
            if type(value) is not int:
                raise TypeError(f"{name} is {value!r}, not a whole number")
        return cls(**fields)


def machine_count(num_processes: int, environ: Mapping[str, str] = os.environ) -> int:
    """Machines of the launch. Accelerate's state has no node count; the launchers say how many processes each machine
    runs (torchrun, hence `accelerate launch`: LOCAL_WORLD_SIZE; DeepSpeed's launcher: LOCAL_SIZE)."""
    per_machine = environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE")
    return math.ceil(num_processes / int(per_machine)) if per_machine else 1


def batch_layout(accelerator: Accelerator, per_device_batch_size: int, gradient_accumulation_steps: int) -> BatchLayout:
    return BatchLayout(
        accelerator.num_processes,
        per_device_batch_size,
        gradient_accumulation_steps,
        machine_count(accelerator.num_processes),
    )
