"""End-to-end fine-tuning of an MAE encoder for image classification, with the paper's recipe (appendix A.1).

    accelerate launch run_scripts/run_finetune.py --model_name_or_path outputs/mae-pretrain   # the embedded sample
    accelerate launch run_scripts/run_finetune.py --model_config tiny-32px                    # from scratch
    accelerate launch run_scripts/run_finetune.py --config configuration/finetune/mae_vit_base.yaml \\
        --model_name_or_path PATH --dataset_name ILSVRC/imagenet-1k                           # the paper's ViT-B recipe

The recipe: AdamW (betas 0.9/0.999), layer-wise lr decay (CLS/position/patch embedding = layer 0, the head on top),
drop path, RandAugment(9, 0.5) + random erasing 0.25, MixUp 0.8 / CutMix 1.0 with label smoothing 0.1, warmup then
cosine, a classifier on the mean of the patch tokens (`fc_norm`). As in the official code, the position table is
fine-tuned (it is fixed during pretraining) and resized bicubically when `--image_size` differs from pretraining.

The result is a `from_pretrained`-loadable `MAEForImageClassification` (with `id2label`) in `output_dir`, with a model
card, `all_results.json` (`eval_accuracy`, `eval_top5_accuracy`) and, with `--push_to_hub`, a Hub repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modeling_mae.arguments import parse_arguments
from modeling_mae.data.sources import DataArguments
from modeling_mae.errors import exit_process, run_main
from modeling_mae.evaluation.arguments import (
    AugmentationArguments,
    FinetuneModelArguments,
    FinetuneOptimizationArguments,
    FinetuneRunArguments,
)
from modeling_mae.evaluation.metrics import MetricArguments


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate; returns the metrics written to `output_dir/all_results.json`."""
    groups = (FinetuneModelArguments, DataArguments, AugmentationArguments, FinetuneOptimizationArguments,
              FinetuneRunArguments, MetricArguments)
    parsed = parse_arguments(groups, argv, __doc__)
    from modeling_mae.loops.finetuning import (
        Arguments,  # torch and the model only now: --help answers at once
    )
    from modeling_mae.loops.finetuning_setup import finetune

    return finetune(Arguments(*parsed))


if __name__ == "__main__":
    exit_process(run_main(main))
