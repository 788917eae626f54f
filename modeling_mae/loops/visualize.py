"""The figure that `run_scripts/visualize.py` draws: the paper's Figure 2 for given images or the first images of a
split, from any pretraining checkpoint (converted on the fly), with masks drawn from a seed.
"""

from __future__ import annotations

import pathlib

import torch
from PIL import Image

from ..data.loader import build_dataloader
from ..data.sources import DataArguments
from ..data.transforms import eval_transform
from ..evaluation.arguments import VisualizeArguments
from ..evaluation.models import load_pretraining_model
from ..evaluation.visualization import reconstruction_figure
from ..modeling_mae import MAEForPreTraining, build_image_processor


def load_pixel_values(args: VisualizeArguments, data_args: DataArguments, image_size: tuple[int, int]) -> torch.Tensor:
    """`(B, 3, H, W)` normalised images: the given files, else the first images of the split."""
    transform = eval_transform(image_size)
    if args.images:
        return torch.stack([transform(Image.open(path)) for path in args.images])
    loader = build_dataloader(data_args, args.split, transform, args.num_images, train=False, labels=False)
    return next(iter(loader))["pixel_values"]


def render(model: MAEForPreTraining, pixel_values: torch.Tensor, seed: int) -> Image.Image:
    noise = torch.rand(pixel_values.shape[0], model.config.num_patches, generator=torch.Generator().manual_seed(seed))
    processor = build_image_processor(model.config)
    return reconstruction_figure(model, model, pixel_values, processor.image_mean, processor.image_std, noise)


def visualize(args: VisualizeArguments, data_args: DataArguments) -> pathlib.Path:
    """Write the figure; returns its path."""
    model = load_pretraining_model(args.model_name_or_path).eval()
    if args.mask_ratio is not None:
        model.config.mask_ratio = args.mask_ratio
    figure = render(model, load_pixel_values(args, data_args, model.config.image_size), args.seed)
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(output)
    print(f"reconstructions: {output.resolve()}")
    return output
