"""The k-NN evaluation that `run_scripts/run_knn.py` runs: the train split's features computed once (batched, no
augmentation) and gathered from every process, each process's share of the validation split classified by a
weighted vote, the predictions of every process scored by an `evaluate` module.
"""

from __future__ import annotations

import time
from typing import Any

from accelerate import Accelerator

from ..arguments import ModelArguments
from ..data.sources import DataArguments
from ..data.statistics import check_channels
from ..data.transforms import eval_transform
from ..evaluation.arguments import KnnArguments
from ..evaluation.features import extract_features, extract_local_features
from ..evaluation.knn import knn_scores
from ..evaluation.metrics import ClassificationMetric, MetricArguments
from ..evaluation.models import describe_model, frozen_encoder
from ..evaluation.results import class_names_of, save_results, split_loader, summarize
from ..training.accelerator import build_accelerator
from ..training.output_lock import holding_output_dir
from ..training.progress import configure_logging, print_outputs
from .image_statistics import pixel_normalisation


def evaluate_knn(
    model_args: ModelArguments, data_args: DataArguments, knn_args: KnnArguments, metric_args: MetricArguments
) -> dict[str, Any]:
    """Run the k-NN evaluation; returns the metrics written to `output_dir/all_results.json`."""
    accelerator = build_accelerator(1, knn_args.output_dir)
    configure_logging(accelerator)
    with holding_output_dir(accelerator, knn_args.output_dir):  # one run at a time; checked writable before building
        return score_knn(accelerator, model_args, data_args, knn_args, metric_args)


def score_knn(
    accelerator: Accelerator, model_args: ModelArguments, data_args: DataArguments, knn_args: KnnArguments,
    metric_args: MetricArguments,
) -> dict[str, Any]:
    metric = ClassificationMetric(accelerator, metric_args.metric)  # a wrong --metric fails now, not after hours
    start = time.perf_counter()
    encoder = frozen_encoder(model_args, knn_args.seed, accelerator.device)
    check_channels(data_args, encoder.config.num_channels)  # a data set of other channels fails now, in one line
    transform = eval_transform(encoder.config.image_size, **pixel_normalisation(encoder.config))
    batch_size, patch = knn_args.per_device_eval_batch_size, max(encoder.config.patch_size)
    train_loader = split_loader(accelerator, data_args, "train", transform, batch_size, train=False,
                                min_image_size=patch)
    bank, bank_labels = extract_features(accelerator, encoder, train_loader, knn_args.pooling, "train features")
    val_loader = split_loader(accelerator, data_args, "validation", transform, batch_size, train=False,
                              min_image_size=patch)
    queries, labels = extract_local_features(accelerator, encoder, val_loader, knn_args.pooling, "validation features")
    num_classes = len(class_names_of(accelerator, train_loader, bank_labels))
    scores = knn_scores(queries, bank, bank_labels, num_classes, knn_args.k, knn_args.temperature,
                        show_progress=accelerator.is_main_process)
    metric.add_batch(scores, labels)
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
