"""MAE pretraining (He et al., 2021) with Accelerate, from one CPU to DeepSpeed ZeRO clusters.

    accelerate launch run_scripts/run_mae.py                       # small MAE on the embedded sample, on CPU
    accelerate launch --config_file configuration/accelerate/multi_gpu.yaml run_scripts/run_mae.py \\
        --config configuration/pretrain/mae_vit_base_800ep.yaml --dataset_name ILSVRC/imagenet-1k

Every flag is in `modeling_mae.arguments` / `modeling_mae.data.sources.DataArguments`; `--config FILE.yaml` sets
defaults that the other flags override. See docs/training.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modeling_mae.arguments import (
    OptimizationArguments,
    PretrainModelArguments,
    RunArguments,
    parse_arguments,
)
from modeling_mae.data.sources import DataArguments
from modeling_mae.errors import exit_process, run_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the pretraining; returns the results written to `output_dir/all_results.json`."""
    parsed = parse_arguments((PretrainModelArguments, DataArguments, OptimizationArguments, RunArguments), argv, __doc__)
    from modeling_mae.loops.pretraining_setup import (
        pretrain,  # torch and the model only now: --help answers at once
    )
    from modeling_mae.loops.pretraining_state import Arguments

    return pretrain(Arguments(*parsed))


if __name__ == "__main__":
    exit_process(run_main(main))
