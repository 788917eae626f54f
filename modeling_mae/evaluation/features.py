"""Features of a frozen encoder: `extract_features` runs it once over a split (no masking) and gathers every
process's features, so each process holds the whole split in the same order; CLS or mean pooling. The main process
shows the progress (`training.progress`: a bar on a terminal, a line every 30 s in a log).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from accelerate import Accelerator

from ..modeling_mae import MAEModel
from ..training.progress import tracked
from .arguments import POOLINGS

Pooling = Literal["cls", "mean"]


def pool_features(last_hidden_state: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """`(B, 1 + L, D)` -> `(B, D)`: the CLS token (the paper's linear probe) or the mean of the patch tokens."""
    if pooling == "cls":
        return last_hidden_state[:, 0]
    if pooling == "mean":
        return last_hidden_state[:, 1:].mean(dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def gather_variable_length(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` of every process along dim 0, in process order, when the lengths differ.

    `accelerator.gather` needs equal shapes: pad to the longest, gather, then cut each process's padding away.
    """
    if accelerator.num_processes == 1:
        return tensor
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = accelerator.gather(length).tolist()
    padded = accelerator.pad_across_processes(tensor, dim=0)
    gathered = accelerator.gather(padded)
    longest = padded.shape[0]
    return torch.cat([gathered[rank * longest : rank * longest + size] for rank, size in enumerate(lengths)])


@torch.no_grad()
def extract_local_features(
    accelerator: Accelerator, encoder: MAEModel, batches: Iterable[dict[str, torch.Tensor]], pooling: Pooling,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features `(N, D)` (float32) and labels `(N,)` of this process's batches, encoder in eval mode; the main
    process shows the progress as `desc`."""
    encoder.eval()
    device = accelerator.device
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for batch in tracked(batches, desc, unit="batch", enabled=accelerator.is_main_process):
        hidden = encoder(batch["pixel_values"].to(device)).last_hidden_state
        features.append(pool_features(hidden, pooling).float())
        labels.append(batch["labels"].to(device))
    if not features:
        empty = torch.empty(0, encoder.config.hidden_size, device=device)
        return empty, torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


def extract_features(
    accelerator: Accelerator, encoder: MAEModel, batches: Iterable[dict[str, torch.Tensor]], pooling: Pooling,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the whole split (every process's share), the same on every process."""
    features, labels = extract_local_features(accelerator, encoder, batches, pooling, desc)
    return gather_variable_length(accelerator, features), gather_variable_length(accelerator, labels)
