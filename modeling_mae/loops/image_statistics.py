"""The statistics a run's pixels are normalised with (`--image_stats`, `--image_mean`/`--image_std`), resolved into
config fields before the model is built: the config carries them to the exported image processor, the model card,
the figures and every script that loads the model later.

Pixels are on the data's own scale (8-bit / 255, 16-bit / 65535, float arrays as they are); `rescale_factor`, what
the exported processor multiplies raw pixel values by, is always the one of the data being read.
"""

from __future__ import annotations

import logging
from typing import Any

from ..arguments import ModelArguments
from ..configuration_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MAEConfig
from ..data.channels import RGB_CHANNELS
from ..data.sources import DataArguments
from ..data.statistics import ImageStatistics, check_channels, compute_image_statistics
from ..errors import UsageError

logger = logging.getLogger(__name__)

STATISTICS_FIELDS = ("image_mean", "image_std", "rescale_factor")


def image_statistics(model_args: ModelArguments, data_args: DataArguments, config: MAEConfig) -> dict[str, Any]:
    """The config fields (`image_mean`, `image_std`, `rescale_factor`) this run normalises its pixels with; raises a
    `UsageError` when the data set's images cannot have the config's channels."""
    rescale_factor = check_channels(data_args, config.num_channels)
    choice = model_args.image_stats or default_choice(model_args, config)
    if model_args.image_mean is not None and model_args.image_std is not None:
        chosen = {"image_mean": list(model_args.image_mean), "image_std": list(model_args.image_std)}
    elif choice == "config":
        chosen = {"image_mean": list(config.image_mean), "image_std": list(config.image_std)}
    elif choice == "imagenet":
        chosen = {"image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD)}
    elif choice == "auto":
        measured = compute_image_statistics(data_args, config.num_channels, max_images=model_args.image_stats_images)
        chosen = {"image_mean": measured.mean, "image_std": measured.std}
    else:
        written = ImageStatistics.read(choice)
        chosen = {"image_mean": written.mean, "image_std": written.std}
    if len(chosen["image_mean"]) != config.num_channels:
        raise UsageError(f"the image statistics ({choice}) have {len(chosen['image_mean'])} channels, the model "
                         f"config {config.num_channels}: pass one mean and std per channel")
    logger.info("normalising pixels with mean %s, std %s (%s)", chosen["image_mean"], chosen["image_std"], choice)
    return {**chosen, "rescale_factor": rescale_factor}


def pixel_normalisation(config: MAEConfig) -> dict[str, Any]:
    """The transforms' arguments for the pixels this model reads: its channels and their statistics."""
    return {"mean": config.image_mean, "std": config.image_std, "num_channels": config.num_channels}


def statistics_of(config: MAEConfig) -> dict[str, Any]:
    """The config fields `image_statistics` sets, as they are in `config`."""
    return {name: getattr(config, name) for name in STATISTICS_FIELDS}


def default_choice(model_args: ModelArguments, config: MAEConfig) -> str:
    """A new model of other than 3 channels measures its data; RGB presets and pretrained models keep their own."""
    return "auto" if config.num_channels != RGB_CHANNELS and not model_args.model_name_or_path else "config"
