"""Loading the encoder or classifier an evaluation runs on: from our exports, from checkpoints of other
implementations (through `interop.conversion`), or from random weights (the controls), and resizing its resolution.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import transformers
from torch import nn

from ..arguments import DEFAULT_MODEL_CONFIG, load_model_config
from ..configuration_mae import MAEConfig
from ..modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel, resize_position_table

logger = logging.getLogger(__name__)


LoadedModel = TypeVar("LoadedModel", bound=MAEModel | MAEForImageClassification)


def load_encoder(
    model_name_or_path: str | None, model_config: str | None, config_overrides: str | None = None
) -> MAEModel:
    """The encoder of a saved MAE model (pretraining or classifier folder, Hub id), or a random init of a config.

    A random init is what the "from scratch" baselines use: seed before calling for reproducible weights.
    """
    if model_name_or_path:
        config = load_model_config(model_name_or_path, config_overrides)
        return from_pretrained_quietly(MAEModel, model_name_or_path, config=config)
    if model_config is None:
        raise ValueError("pass --model_name_or_path (pretrained weights) or --model_config (random init)")
    return MAEModel(load_model_config(model_config, config_overrides))


def from_pretrained_quietly(model_class: type[LoadedModel], source: str, **kwargs: Any) -> LoadedModel:
    """`model_class.from_pretrained(source, **kwargs)` with transformers' load-report table (a warning of a dozen
    lines, from every process) replaced by one INFO line: which modules start from a random init, which checkpoint
    weights go unused. For loads that change the model on purpose: a classifier from a pretraining checkpoint."""
    # transformers' library logger, not the one of modeling_utils: with a level of its own, that one also checks the
    # (absent) tensor-parallel plan and warns that no layer is sharded.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, loading_info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    changes = describe_loading(loading_info)
    if changes:
        logger.info("%s from %s: %s", model_class.__name__, source, changes)
    return model


def describe_loading(loading_info: dict[str, Any]) -> str:
    """`from_pretrained`'s loading info in a few words, by module ("classifier", not "classifier.weight")."""

    def modules(keys: Iterable[str]) -> str:
        return ", ".join(sorted({key.rsplit(".", 1)[0] for key in keys}))

    mismatched = [key for key, *_shapes in loading_info["mismatched_keys"]]
    parts = [(loading_info["missing_keys"], "new (random init)"), (mismatched, "new (another shape)"),
             (loading_info["unexpected_keys"], "not used")]
    return "; ".join(f"{what}: {modules(keys)}" for keys, what in parts if keys)


def describe_model(model_name_or_path: str | None, model_config: str | None, seed: int) -> str:
    """What a run started from, for its results and model card: the weights, or the random init's config and seed."""
    return model_name_or_path or f"random init of {model_config or DEFAULT_MODEL_CONFIG} (seed {seed})"


def load_pretraining_model(source: str) -> MAEForPreTraining:
    """A model with its decoder: one of ours (folder or Hub id), or an official `.pth` / transformers ViTMAE
    checkpoint, converted on the fly."""
    from ..interop.conversion import convert_checkpoint

    if not os.path.isfile(source):  # a folder or Hub id: ours loads as is, a transformers ViTMAE one is converted
        config_dict, _ = MAEConfig.get_config_dict(source)
        if config_dict.get("model_type") == MAEConfig.model_type:
            return MAEForPreTraining.from_pretrained(source)
    model = convert_checkpoint(source)
    if not isinstance(model, MAEForPreTraining):
        raise ValueError(f"{source} holds no decoder: reconstructions need a pretraining checkpoint")
    return model


def resize_model_resolution(model: MAEForImageClassification | MAEModel, image_size: Sequence[int]) -> None:
    """Fine-tune at another resolution: the position table is resized bicubically (the official
    `interpolate_pos_embed`) and the config updated, so the saved model works at the new size."""
    config = model.config
    new_size = (int(image_size[0]), int(image_size[1]))
    if new_size == tuple(config.image_size):
        return
    embeddings = (model.mae if isinstance(model, MAEForImageClassification) else model).embeddings
    old_grid = config.grid_size
    config.image_size = new_size
    table = resize_position_table(embeddings.position_embeddings.data, old_grid, config.grid_size)
    embeddings.position_embeddings = nn.Parameter(table, requires_grad=embeddings.position_embeddings.requires_grad)
