"""Figure 2 of the paper for any images or dataset split: one row per image,
masked input | reconstruction | reconstruction + visible | original.

    python run_scripts/visualize.py --model_name_or_path outputs/mae-pretrain                  # validation split
    python run_scripts/visualize.py --model_name_or_path mae_visualize_vit_large.pth --images a.jpg b.png
    python run_scripts/visualize.py --model_name_or_path PATH --dataset_name ILSVRC/imagenet-1k --split train

`--model_name_or_path` is one of our pretraining folders / Hub ids, an official `.pth` or a transformers ViTMAE
checkpoint (converted on the fly). With `norm_pix_loss` models the per-patch predictions are mapped back to pixels
with the statistics of the original patch, as in the paper's figures. Masks are drawn from `--seed`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from PIL import Image

from modeling_mae import MAEForPreTraining, build_image_processor
from modeling_mae.arguments import AT_LEAST_ONE, FRACTION, SEED, Range, parse_arguments
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.loader import build_dataloader
from modeling_mae.data.transforms import eval_transform
from modeling_mae.errors import exit_process, run_main
from modeling_mae.evaluation.models import load_pretraining_model
from modeling_mae.evaluation.visualization import reconstruction_figure


@dataclass
class VisualizeArguments:
    FLAG_RANGES: ClassVar[dict[str, Range]] = {"num_images": AT_LEAST_ONE, "mask_ratio": FRACTION, "seed": SEED}

    model_name_or_path: str = field(metadata={"help": "Pretraining folder / Hub id, official .pth or ViTMAE folder."})
    images: list[str] | None = field(default=None, metadata={"help": "Image files; default: --num_images of --split."})
    split: str = field(default="validation", metadata={"help": "'train' or 'validation', when no --images are given.",
                                                       "choices": ["train", "validation"]})
    num_images: int = field(default=8, metadata={"help": "Rows taken from the dataset split."})
    mask_ratio: float | None = field(default=None, metadata={"help": "Default: the model's (0.75 in the paper)."})
    seed: int = field(default=0, metadata={"help": "Seeds the masks."})
    output: str = field(default="outputs/reconstruction.png", metadata={"help": "Where the PNG grid is written."})


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


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    """Write the figure; returns its path."""
    args, data_args = parse_arguments((VisualizeArguments, DataArguments), argv)
    model = load_pretraining_model(args.model_name_or_path).eval()
    if args.mask_ratio is not None:
        model.config.mask_ratio = args.mask_ratio
    figure = render(model, load_pixel_values(args, data_args, model.config.image_size), args.seed)
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(output)
    print(f"reconstructions: {output.resolve()}")
    return output


if __name__ == "__main__":
    exit_process(run_main(main))
