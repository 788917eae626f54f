"""Figure 2 of the paper for any images or dataset split: one row per image,
masked input | reconstruction | reconstruction + visible | original.

    python run_scripts/visualize.py --model_name_or_path outputs/mae-pretrain                  # validation split
    python run_scripts/visualize.py --model_name_or_path mae_visualize_vit_large.pth --images a.jpg b.png
    python run_scripts/visualize.py --model_name_or_path PATH --dataset_name ILSVRC/imagenet-1k --split train

`--model_name_or_path` is one of our pretraining folders / Hub ids, an official `.pth` or a transformers ViTMAE
checkpoint (converted on the fly). With `norm_pix_loss` models the per-patch predictions are mapped back to pixels
with the statistics of the original patch, as in the paper's figures. Masks are drawn from `--seed`.

Images of any channel count are un-normalised with the model config's `image_mean`/`image_std` and drawn as 8-bit RGB:
one channel in grayscale, three as they are, more as the bands of `--display_channels` (0-based, default 0,1,2):

    python run_scripts/visualize.py --model_name_or_path outputs/mae-sentinel --display_channels 3,2,1
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from modeling_mae.arguments import parse_arguments
from modeling_mae.data.sources import DataArguments
from modeling_mae.errors import exit_process, run_main
from modeling_mae.evaluation.arguments import VisualizeArguments


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    """Write the figure; returns its path."""
    args, data_args = parse_arguments((VisualizeArguments, DataArguments), argv, __doc__)
    from modeling_mae.loops.visualize import (
        visualize,  # torch and the model only now: --help answers at once
    )

    return visualize(args, data_args)


if __name__ == "__main__":
    exit_process(run_main(main))
