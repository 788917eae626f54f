"""Weighted k-NN evaluation of a frozen MAE encoder (cosine similarity, k=20, temperature 0.07).

    accelerate launch run_scripts/run_knn.py --model_name_or_path outputs/mae-pretrain   # the embedded sample
    accelerate launch run_scripts/run_knn.py --model_config tiny-32px                    # random-init baseline

Features of the train split are computed once (batched, no augmentation), gathered from every process, and each
process classifies its share of the validation split; the predictions of every process are scored by an `evaluate`
module (`--metric`). Results: `output_dir/all_results.json` with `eval_accuracy` and `eval_top5_accuracy` in [0, 1].
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from accelerate.utils import set_seed

from modeling_mae.arguments import AT_LEAST_ONE, POSITIVE, SEED, ModelArguments, Range, parse_arguments
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.transforms import eval_transform
from modeling_mae.errors import exit_process, run_main
from modeling_mae.evaluation.features import POOLINGS, extract_features, extract_local_features
from modeling_mae.evaluation.metrics import ClassificationMetric, MetricArguments
from modeling_mae.evaluation.results import class_names_of, save_results, split_loader, summarize
from modeling_mae.evaluation.models import describe_model, load_encoder
from modeling_mae.evaluation.knn import knn_scores
from modeling_mae.training.accelerator import build_accelerator
from modeling_mae.training.progress import configure_logging, print_outputs


@dataclass
class KnnArguments:
    """The k-NN protocol and where its results go."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "k": AT_LEAST_ONE, "temperature": POSITIVE, "per_device_eval_batch_size": AT_LEAST_ONE, "seed": SEED,
    }

    k: int = field(default=20, metadata={"help": "Neighbours that vote."})
    temperature: float = field(default=0.07, metadata={"help": "Votes weigh exp(cosine similarity / temperature)."})
    pooling: str = field(
        default="mean",
        metadata={"help": "Feature: 'mean' of the patch tokens (MAE never trains its CLS token directly) or 'cls'.",
                  "choices": list(POOLINGS)},
    )
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Images per forward pass."})
    output_dir: str = field(default="outputs/mae-knn", metadata={"help": "Where all_results.json is written."})
    seed: int = field(default=0, metadata={"help": "Seeds the random init when --model_config is used."})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the k-NN evaluation; returns the metrics written to `output_dir/all_results.json`."""
    model_args, data_args, knn_args, metric_args = parse_arguments(
        (ModelArguments, DataArguments, KnnArguments, MetricArguments), argv
    )
    accelerator = build_accelerator(1, knn_args.output_dir)
    configure_logging(accelerator)
    metric = ClassificationMetric(accelerator, metric_args.metric)  # a wrong --metric fails now, not after hours
    start = time.perf_counter()
    set_seed(knn_args.seed)  # the same random init on every process
    encoder = load_encoder(model_args.model_name_or_path, model_args.model_config, model_args.config_overrides)
    encoder.to(accelerator.device)
    transform = eval_transform(encoder.config.image_size)
    batch_size, patch = knn_args.per_device_eval_batch_size, max(encoder.config.patch_size)
    train_loader = split_loader(accelerator, data_args, "train", transform, batch_size, train=False,
                                min_image_size=patch)
    bank, bank_labels = extract_features(accelerator, encoder, train_loader, knn_args.pooling)
    val_loader = split_loader(accelerator, data_args, "validation", transform, batch_size, train=False,
                              min_image_size=patch)
    queries, labels = extract_local_features(encoder, val_loader, knn_args.pooling, accelerator.device)
    num_classes = len(class_names_of(accelerator, train_loader, bank_labels))
    metric.add_batch(knn_scores(queries, bank, bank_labels, num_classes, knn_args.k, knn_args.temperature), labels)
    metrics: dict[str, Any] = {
        **metric.compute(),
        "train_samples": int(bank.shape[0]),
        "k": knn_args.k,
        "temperature": knn_args.temperature,
        "pooling": knn_args.pooling,
        "model": describe_model(model_args.model_name_or_path, model_args.model_config, knn_args.seed),
        "num_processes": accelerator.num_processes,
        "eval_runtime": time.perf_counter() - start,
    }
    results = save_results(accelerator, knn_args.output_dir, metrics)
    print_outputs(accelerator, f"Done: k-NN ({knn_args.k} neighbours), {summarize(metrics)}", {"results": results})
    return metrics


if __name__ == "__main__":
    exit_process(run_main(main))
