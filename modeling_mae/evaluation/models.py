"""Loading the model a run starts from (`load_pretrained`, for every script) and the encoder or classifier an
evaluation runs on: from our exports, from checkpoints of other implementations (through `interop.conversion`), or
from random weights (the controls), and resizing its resolution.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import transformers
from accelerate.utils import set_seed
from safetensors import SafetensorError
from torch import nn

from ..arguments import (
    DEFAULT_MODEL_CONFIG,
    WEIGHT_FILES,
    ModelArguments,
    convert_first,
    load_model_config,
    model_folder_problem,
)
from ..configuration_mae import MAEConfig
from ..errors import UsageError
from ..interop.conversion import convert_checkpoint, unreadable_weights_error
from ..modeling_mae import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    MAEPreTrainedModel,
    resize_position_table,
)
from ..text import counted

logger = logging.getLogger(__name__)

ENCODER_WEIGHTS = ("embeddings.", "encoder.")  # the patch projection, the CLS token and the blocks


LoadedModel = TypeVar("LoadedModel", bound=MAEPreTrainedModel)


def frozen_encoder(model_args: ModelArguments, seed: int, device: torch.device) -> MAEModel:
    """The encoder a frozen-feature protocol (k-NN, linear probe) reads: `load_encoder` of the model flags (a random
    init drawn from `seed`, the same on every process), without gradients, in eval mode, on `device`."""
    set_seed(seed)
    encoder = load_encoder(model_args.model_name_or_path, model_args.model_config, model_args.config_overrides)
    return encoder.requires_grad_(False).to(device).eval()


def load_encoder(
    model_name_or_path: str | None, model_config: str | None, config_overrides: str | None = None
) -> MAEModel:
    """The encoder of a saved MAE model (pretraining or classifier folder, Hub id), or a random init of a config.

    A random init is what the "from scratch" baselines use: seed before calling for reproducible weights.
    """
    if model_name_or_path:
        config = load_model_config(model_name_or_path, config_overrides)
        return load_pretrained(MAEModel, model_name_or_path, config=config)
    if model_config is None:
        raise ValueError("pass --model_name_or_path (pretrained weights) or --model_config (random init)")
    return MAEModel(load_model_config(model_config, config_overrides))


def load_pretrained(model_class: type[LoadedModel], source: str, **kwargs: Any) -> LoadedModel:
    """`model_class.from_pretrained(source, **kwargs)`, the one way every script loads the weights it starts from.

    Refused in one line, instead of a start from random weights that would claim to come from `source`: a folder
    without weights, a model of another type (a transformers ViT: with the command that converts it), a pickle that
    holds more than tensors (never run), a load that missed weights of the encoder. transformers' load-report table (a
    warning of a dozen lines, from every process) becomes one INFO line: which modules start from a random init,
    which checkpoint weights go unused (a classifier from a pretraining checkpoint: a new head, on purpose).
    """
    problem = model_folder_problem(source)
    if problem is not None:
        raise UsageError(f"{source}: {problem}")
    load_model_config(source)  # the config of another model type: one line with the command that converts it
    # transformers' library logger, not the one of modeling_utils: with a level of its own, that one also checks the
    # (absent) tensor-parallel plan and warns that no layer is sharded.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, loading_info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except (pickle.UnpicklingError, SafetensorError) as error:
        raise unreadable_weights_error(weights_file(source), error) from error
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    missing = missing_encoder_weights(model, loading_info)
    if missing:
        raise UsageError(f"{source} lacks {counted(len(missing), 'weight')} of the MAE encoder ({missing[0]}, ...), "
                         f"which would start from random values: {convert_first(source)}")
    changes = describe_loading(loading_info)
    if changes:
        logger.info("%s from %s: %s", model_class.__name__, source, changes)
    return model


def weights_file(source: str) -> str:
    """The weights file of a local model folder, else `source` itself (a Hub id)."""
    folder = pathlib.Path(source).expanduser()
    return next((str(folder / name) for name in WEIGHT_FILES if (folder / name).is_file()), source)


def missing_encoder_weights(model: MAEPreTrainedModel, loading_info: dict[str, Any]) -> list[str]:
    """The weights of the encoder's embeddings and blocks that `from_pretrained` did not find in the checkpoint (or
    found in another shape). Not the sin-cos position table (fixed, and resized on purpose), nor the final LayerNorm
    (a global-pool classifier has its `fc_norm` instead)."""
    prefix = "" if isinstance(model, MAEModel) else f"{model.base_model_prefix}."
    not_loaded = {*loading_info["missing_keys"], *(key for key, *_shapes in loading_info["mismatched_keys"])}
    return [key for key in model.state_dict() if key in not_loaded
            and key.removeprefix(prefix).startswith(ENCODER_WEIGHTS) and not key.endswith("position_embeddings")]


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
    if not os.path.isfile(source):  # a folder or Hub id: ours loads as is, a transformers ViTMAE one is converted
        config_dict, _ = MAEConfig.get_config_dict(source)
        if config_dict.get("model_type") == MAEConfig.model_type:
            return load_pretrained(MAEForPreTraining, source)
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
