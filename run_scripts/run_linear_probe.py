"""Linear probing of a frozen MAE encoder: `BatchNorm1d(affine=False)` + a linear classifier (the paper's protocol).

    accelerate launch run_scripts/run_linear_probe.py --model_name_or_path outputs/mae-pretrain   # embedded sample
    accelerate launch run_scripts/run_linear_probe.py --model_config tiny-32px                    # random-init baseline
    accelerate launch run_scripts/run_linear_probe.py --config configuration/linprobe/mae_vit_base.yaml \\
        --model_name_or_path PATH --dataset_name ILSVRC/imagenet-1k                               # the paper's recipe

Two ways to feed the head:
- `--cached_features true` (default, fast): features of center crops are computed once and the head is trained on
  them for many epochs;
- `--cached_features false` (the paper): every step encodes freshly augmented images (RandomResizedCrop + flip).
Either way the encoder is frozen (eval mode), the head is trained with SGD (or LARS, the paper's choice for its
16384-image batches: see configuration/linprobe/) and a warmup + cosine schedule, and the validation split is scored
at the end. Results: `output_dir/all_results.json` (`eval_accuracy`, `eval_top5_accuracy`) and the head's weights in
`output_dir/linear_head.safetensors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modeling_mae.arguments import ModelArguments, parse_arguments
from modeling_mae.data.sources import DataArguments
from modeling_mae.errors import exit_process, run_main
from modeling_mae.evaluation.arguments import LinearProbeArguments
from modeling_mae.evaluation.metrics import MetricArguments


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and score the linear probe; returns the metrics written to `output_dir/all_results.json`."""
    groups = parse_arguments((ModelArguments, DataArguments, LinearProbeArguments, MetricArguments), argv, __doc__)
    from modeling_mae.loops.linear_probe import (
        linear_probe,  # torch and the model only now: --help answers at once
    )

    return linear_probe(*groups)


if __name__ == "__main__":
    exit_process(run_main(main))
