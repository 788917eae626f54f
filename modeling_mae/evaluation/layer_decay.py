"""Layer-wise learning-rate decay for fine-tuning (the official `util/lr_decay.py`): each parameter's layer id and
scale, as an `LrScaleFn` that `training.optimization.build_optimizer` applies.
"""

from __future__ import annotations

import re

from ..training.optimization import LrScaleFn

# Parameters of the classifier the official fine-tuning never decays (timm's `no_weight_decay`).
FINETUNE_NO_WEIGHT_DECAY = ("cls_token", "position_embeddings")


_ENCODER_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def layer_id_for(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay (BEiT / official MAE `param_groups_lrd`): the CLS token, position
    table and patch embedding are layer 0, block i is layer i + 1, everything after the blocks (norms, head) is
    `num_layers + 1`."""
    match = _ENCODER_LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    if "embeddings." in name:
        return 0
    return num_layers + 1


def lr_scale(name: str, num_layers: int, layer_decay: float) -> float:
    """`layer_decay ** (num_layers + 1 - layer_id)`: the head keeps the full lr, each block below gets
    `layer_decay` times the lr of the block above it."""
    return layer_decay ** (num_layers + 1 - layer_id_for(name, num_layers))


def layer_decay_lr_scale_fn(num_layers: int, layer_decay: float) -> LrScaleFn:
    """`lr_scale` in the form `training.build_optimizer(lr_scale_fn=...)` takes."""
    return lambda name, _parameter: lr_scale(name, num_layers, layer_decay)
