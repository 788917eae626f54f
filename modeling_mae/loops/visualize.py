"""The figure that `run_scripts/visualize.py` draws: the paper's Figure 2 for given images or the first images of a
split, from any pretraining checkpoint (converted on the fly), with masks drawn from a seed. Images of any channel
count: prepared with the model config's statistics, and shown as `evaluation.visualization.display_bands`.
"""

from __future__ import annotations

import io
import pathlib

import torch
from PIL import Image

from ..arguments import parse_display_channels
from ..configuration_mae import MAEConfig
from ..data.channels import ChannelMismatch, decode_channels, uses_rgb_path
from ..data.loader import build_dataloader
from ..data.sources import DataArguments
from ..data.transforms import eval_transform
from ..errors import UsageError
from ..evaluation.arguments import VisualizeArguments
from ..evaluation.models import load_pretraining_model
from ..evaluation.visualization import display_bands, reconstruction_figure
from ..modeling_mae import MAEForPreTraining
from .image_statistics import pixel_normalisation


def read_image_file(path: str, num_channels: int) -> Image.Image | torch.Tensor:
    """An `--images` file as the data pipeline reads a record: an encoded image for an RGB model as a PIL image (the
    transform converts it to RGB), anything else (a .npy array, an image for another channel count) as `(C, H, W)`
    float pixels on the data's own scale. An image of another channel count than the model's is one line."""
    data = pathlib.Path(path).read_bytes()
    if uses_rgb_path(data, num_channels):
        return Image.open(io.BytesIO(data))
    try:
        return decode_channels(data, num_channels)
    except ChannelMismatch as error:
        raise UsageError(f"--images {path}: {error}") from error


def load_pixel_values(args: VisualizeArguments, data_args: DataArguments, config: MAEConfig) -> torch.Tensor:
    """`(B, C, H, W)` normalised images: the given files, else the first images of the split."""
    transform = eval_transform(config.image_size, **pixel_normalisation(config))
    if args.images:
        return torch.stack([transform(read_image_file(path, config.num_channels)) for path in args.images])
    loader = build_dataloader(data_args, args.split, transform, args.num_images, train=False, labels=False)
    return next(iter(loader))["pixel_values"]


def render(
    model: MAEForPreTraining, pixel_values: torch.Tensor, seed: int, bands: tuple[int, ...] | None = None
) -> Image.Image:
    noise = torch.rand(pixel_values.shape[0], model.config.num_patches, generator=torch.Generator().manual_seed(seed))
    config = model.config
    return reconstruction_figure(model, model, pixel_values, config.image_mean, config.image_std, noise, bands)


def visualize(args: VisualizeArguments, data_args: DataArguments) -> pathlib.Path:
    """Write the figure; returns its path."""
    model = load_pretraining_model(args.model_name_or_path).eval()
    bands = display_bands(model.config.num_channels, parse_display_channels(args.display_channels))  # before the data
    if args.mask_ratio is not None:
        model.config.mask_ratio = args.mask_ratio
    figure = render(model, load_pixel_values(args, data_args, model.config), args.seed, bands)
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(output)
    print(f"reconstructions: {output.resolve()}")
    return output
