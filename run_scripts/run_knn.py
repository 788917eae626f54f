"""Weighted k-NN evaluation of a frozen MAE encoder (cosine similarity, k=20, temperature 0.07).

    accelerate launch run_scripts/run_knn.py --model_name_or_path outputs/mae-pretrain   # the embedded sample
    accelerate launch run_scripts/run_knn.py --model_config tiny-32px                    # random-init baseline

Features of the train split are computed once (batched, no augmentation), gathered from every process, and each
process classifies its share of the validation split; the predictions of every process are scored by an `evaluate`
module (`--metric`). Results: `output_dir/all_results.json` with `eval_accuracy` and `eval_top5_accuracy` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modeling_mae.arguments import ModelArguments, parse_arguments
from modeling_mae.data.sources import DataArguments
from modeling_mae.errors import exit_process, run_main
from modeling_mae.evaluation.arguments import KnnArguments
from modeling_mae.evaluation.metrics import MetricArguments


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the k-NN evaluation; returns the metrics written to `output_dir/all_results.json`."""
    groups = parse_arguments((ModelArguments, DataArguments, KnnArguments, MetricArguments), argv, __doc__)
    from modeling_mae.loops.knn import (
        evaluate_knn,  # torch and the model only now: --help answers at once
    )

    return evaluate_knn(*groups)


if __name__ == "__main__":
    exit_process(run_main(main))
