"""What the evaluation scripts share around the protocols: the loaders of a split, class names, and the results
file and its one-line summary.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch
from accelerate import Accelerator

from ..data.loader import ImageStreamLoader, build_dataloader
from ..data.sources import DataArguments
from ..data.transforms import ImageTransform
from ..errors import UsageError
from ..text import format_number
from ..training.checkpoints import write_json

RESULTS_FILE = "all_results.json"


def split_loader(
    accelerator: Accelerator,
    data_args: DataArguments,
    split: str,
    transform: ImageTransform,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_classes: int | None = None,
    min_image_size: int = 1,
) -> ImageStreamLoader:
    """This process's share of `split` ("train" or "validation") with its labels (raises a `UsageError` when the data
    has none); evaluation loaders keep every sample once. Pass the model's patch size as `min_image_size`, and the
    user's number of classes, if any, as `num_classes` (see `build_dataloader`)."""
    loader = build_dataloader(
        data_args, split, transform, batch_size, train=train, seed=seed,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes, num_classes=num_classes,
        min_image_size=min_image_size,
    )
    if not loader.has_labels:
        raise UsageError(f"No label column found in the {split} split (looked for a ClassLabel feature, then a column "
                         "named label, labels, cls, ...): pass --label_column_name.")
    return loader


def class_names_of(accelerator: Accelerator, loader: ImageStreamLoader, labels: torch.Tensor) -> list[str]:
    """The dataset's class names (a ClassLabel's, or its string labels sorted), else `"0"`, `"1"`, ... up to the
    largest integer label seen by any process (a collective: call it on every process)."""
    if loader.class_names is not None:
        return list(loader.class_names)
    largest = labels.max().reshape(1) if labels.numel() else torch.full((1,), -1, device=labels.device)
    if accelerator.num_processes > 1:
        largest = accelerator.reduce(largest.to(accelerator.device), reduction="max")
    return [str(index) for index in range(int(largest.item()) + 1)]


def save_results(
    accelerator: Accelerator, output_dir: str | os.PathLike[str], metrics: dict[str, Any]
) -> pathlib.Path:
    """`output_dir/all_results.json` (main process), like the other scripts; returns its path."""
    path = pathlib.Path(output_dir) / RESULTS_FILE
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, metrics)
    accelerator.wait_for_everyone()
    return path


def summarize(metrics: dict[str, Any]) -> str:
    """The validation scores of `metrics` in one line: "eval_accuracy 0.8150, eval_top5_accuracy 0.9900, ..."."""
    return ", ".join(f"{key} {format_number(value)}"
                     for key, value in metrics.items() if key.startswith("eval_") and key != "eval_runtime")
